"""The one way tests run ranks: each calls ``target(rank, world_size, *args)``
and reports what it returned or raised.

Ranks are processes forked by a forkserver that has torch (through
tcpstore_barrier) and pytest preloaded, so each starts in milliseconds; or,
with ``threads=True``, threads of the test's process; or, with
``start_rank_groups``, threads of a few such processes (a process per
simulated host). A process's target is sent by name: a module-level
function of an importable module (tests/ is on sys.path, so a test file's
functions qualify). Arguments may include
multiprocessing Events and Values of ``CONTEXT``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import signal
import threading
import time
import traceback

CONTEXT = multiprocessing.get_context("forkserver")
# pytest: the test modules that hold rank bodies import it.
CONTEXT.set_forkserver_preload(["tcpstore_barrier", "pytest", "support.launch"])


def _rank_main(reports, target, rank, world_size, args):
    try:
        result = target(rank, world_size, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the test
        reports.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    else:
        reports.put((rank, True, result))


class Ranks:
    """Running ranks: signal them, collect their results, stop them (also on
    leaving a ``with`` block)."""

    def __init__(self, target, world_size, args, threads):
        make = threading.Thread if threads else CONTEXT.Process
        self._reports = queue_module.Queue() if threads else CONTEXT.Queue()
        self._results, self._failures = {}, {}
        self.workers = [
            make(
                target=_rank_main,
                args=(self._reports, target, rank, world_size, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for worker in self.workers:
            worker.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def signal(self, rank, signum):
        os.kill(self.workers[rank].pid, signum)

    def _take(self, report):
        rank, ok, value = report
        (self._results if ok else self._failures)[rank] = value

    def results(self, ranks, timeout):
        """What `ranks` returned, as a list by rank (None for other ranks).
        Fails with a rank's traceback, or once `timeout` s pass or every
        rank still to report has ended without reporting."""
        deadline = time.monotonic() + timeout
        while pending := set(ranks) - self._results.keys() - self._failures.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._take(self._reports.get(timeout=min(remaining, 0.2)))
            except queue_module.Empty:
                if not any(self.workers[r].is_alive() for r in pending):
                    # Let the queue's feeder deliver what they managed to send.
                    time.sleep(0.2)
                    try:
                        while True:
                            self._take(self._reports.get_nowait())
                    except queue_module.Empty:
                        break
        if self._failures:
            raise AssertionError(
                "\n".join(
                    f"rank {r} failed:\n{v}" for r, v in sorted(self._failures.items())
                )
            )
        silent = sorted(set(ranks) - self._results.keys())
        assert not silent, (
            f"ranks {silent} did not report within {timeout} s "
            f"(exit codes {self.exit_codes()})"
        )
        return [self._results.get(r) for r in range(len(self.workers))]

    def exit_codes(self):
        return [getattr(w, "exitcode", None) for w in self.workers]

    def assert_exited(self, killed=()):
        """Processes in `killed` died by SIGKILL, the others exited normally."""
        for worker in self.workers:
            worker.join(timeout=10)
        codes = self.exit_codes()
        for rank, code in enumerate(codes):
            expected = -signal.SIGKILL if rank in killed else 0
            assert code == expected, f"rank {rank} exit code {code} (all: {codes})"

    def stop(self):
        for worker in self.workers:
            if isinstance(worker, threading.Thread):
                continue  # daemon threads: they end with the test process
            if worker.is_alive():
                # A stopped one cannot die; one may also exit (and be
                # reaped) between is_alive() and the signal.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGCONT)
                worker.kill()
            worker.join()


def _group_main(index, count, groups, target, *args):
    """Process `index` of start_rank_groups: its ranks, as threads."""
    world_size = sum(len(group) for group in groups)
    results, failures = {}, {}

    def run(rank):
        try:
            results[rank] = target(rank, world_size, *args)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            failures[rank] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"

    threads = [threading.Thread(target=run, args=(rank,)) for rank in groups[index]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise AssertionError(
            "\n".join(f"rank {r} failed:\n{v}" for r, v in sorted(failures.items()))
        )
    return results


def start_rank_groups(target, groups, *args):
    """Ranks as threads of a few processes: process i runs the ranks in
    `groups[i]`, each calling ``target(rank, world_size, *args)``, so that a
    signal to process i (``signal(i, ...)``) reaches all of its ranks at
    once, as a fault reaches a host. Process i reports a dict, by rank, of
    what its ranks returned; use in a ``with``."""
    return Ranks(_group_main, len(groups), (groups, target, *args), threads=False)


def run_rank_groups(target, groups, *args, timeout=60.0):
    """Runs start_rank_groups to the end; returns what each rank returned,
    as a list by rank. A rank that raises, or a process that stays silent
    or exits abnormally, fails the test."""
    with start_rank_groups(target, groups, *args) as processes:
        reports = processes.results(range(len(groups)), timeout)
        processes.assert_exited()
    return by_rank(reports, sum(len(group) for group in groups))


def mark_ready(ready):
    """Counts this rank into `ready` (a CONTEXT.Value): its round 0 is done."""
    with ready.get_lock():
        ready.value += 1


def await_ready(ready, ranks, within=30.0):
    """Until `ranks` ranks have counted themselves into `ready` (round 0 done
    everywhere), so that a fault made next hits the round after."""
    deadline = time.monotonic() + within
    while ready.value < ranks:
        assert time.monotonic() < deadline, "round 0 never completed"
        time.sleep(0.01)


def await_fault(rank, fault):
    """Where a rank whose process the test kills or stops waits for it: a
    rank that outlives it fails."""
    time.sleep(60)
    raise AssertionError(f"rank {rank} outlived its {fault}")


def by_rank(reports, world_size):
    """What start_rank_groups' processes reported (a dict by rank, or None
    for a process that did not report), as one list by rank."""
    merged = {}
    for report in reports:
        merged.update(report or {})
    return [merged.get(rank) for rank in range(world_size)]


def start_ranks(target, world_size, *args, threads=False):
    """Ranks running ``target(rank, world_size, *args)``; use in a ``with``."""
    return Ranks(target, world_size, args, threads)


def run_ranks(target, world_size, *args, threads=False, killed=(), timeout=60.0):
    """Runs the ranks to the end: returns what each returned, as a list by
    rank (None for ranks in `killed`, which must die by SIGKILL without
    reporting); a rank that raises, stays silent or (as a process) exits
    abnormally fails the test."""
    with start_ranks(target, world_size, *args, threads=threads) as ranks:
        expected = [r for r in range(world_size) if r not in killed]
        results = ranks.results(expected, timeout)
        if not threads:
            ranks.assert_exited(killed)
        return results
