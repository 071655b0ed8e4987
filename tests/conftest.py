"""Fixtures shared by the tests: free loopback ports and rank launching.

Ranks are real processes (forkserver, with torch preloaded so each starts in
milliseconds) or threads, talking to a real TCPStore on 127.0.0.1.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import socket
import threading
import time

import pytest

import ranks

from conftest_shared import LOOPBACK


def pick_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    """A loopback port that was free a moment ago."""
    return pick_free_port()


@pytest.fixture(scope="session")
def mp_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tcpstore_barrier", "ranks", "conftest_shared"])
    return ctx


class RankFailure(AssertionError):
    pass


def collect_reports(results_queue, expected, timeout, alive):
    """Reads ``(rank, ok, value)`` reports until every rank in ``expected``
    has reported, ``timeout`` s pass, or ``alive(pending)`` says none of the
    ranks still pending runs. Returns ``(results, failures)`` by rank."""
    results, failures = {}, {}
    deadline = time.monotonic() + timeout
    while pending := expected - results.keys() - failures.keys():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, ok, value = results_queue.get(timeout=min(remaining, 0.2))
        except queue_module.Empty:
            if not alive(pending):
                # Let the queue's feeder deliver what they managed to send.
                time.sleep(0.2)
                try:
                    while True:
                        rank, ok, value = results_queue.get_nowait()
                        (results if ok else failures)[rank] = value
                except queue_module.Empty:
                    break
            continue
        (results if ok else failures)[rank] = value
    return results, failures


def _report(world_size, results, failures, timeout):
    if failures:
        raise RankFailure(
            "\n".join(f"rank {r} failed:\n{failures[r]}" for r in sorted(failures))
        )
    missing = sorted(set(range(world_size)) - set(results))
    if missing:
        raise RankFailure(f"ranks {missing} did not finish within {timeout} s")
    return [results[r] for r in range(world_size)]


def _run_workers(make_worker, results_queue, target, world_size, args, timeout, started):
    """Starts one worker (process or thread) per rank, recorded in
    ``started`` first so that they are cleaned up whatever happens; returns
    the results by rank, failing with the ranks' tracebacks or silence."""
    workers = [
        make_worker(
            target=ranks.rank_main,
            args=(results_queue, target, rank, (world_size, *args)),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    started.extend(workers)
    for worker in workers:
        worker.start()
    results, failures = collect_reports(
        results_queue,
        set(range(world_size)),
        timeout,
        lambda pending: any(workers[r].is_alive() for r in pending),
    )
    return _report(world_size, results, failures, timeout)


@pytest.fixture
def run_ranks(mp_context):
    """run_ranks(target, world_size, *args, timeout=60) -> [result per rank].

    Runs ``target(rank, world_size, *args)`` in one process per rank and returns what
    each returned; a rank that raises or overruns fails the test with its
    traceback. Leftover processes are killed.
    """
    started = []

    def run(target, world_size, *args, timeout=60.0):
        results = _run_workers(
            mp_context.Process, mp_context.Queue(), target, world_size, args, timeout, started
        )
        for p in started[-world_size:]:
            p.join(timeout=5)
        return results

    yield run
    for p in started:
        if p.is_alive():
            p.kill()
            p.join()


@pytest.fixture
def run_rank_threads():
    """run_rank_threads(target, world_size, *args, timeout=60): ranks as threads of this process."""

    def run(target, world_size, *args, timeout=60.0):
        return _run_workers(
            threading.Thread, queue_module.Queue(), target, world_size, args, timeout, []
        )

    return run
