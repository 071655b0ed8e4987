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


def _collect(results_queue, world_size, deadline, alive):
    results, failures = {}, {}
    while len(results) + len(failures) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, ok, value = results_queue.get(timeout=min(remaining, 0.2))
        except queue_module.Empty:
            if not alive():
                # Every worker is gone; drain what they managed to send.
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


@pytest.fixture
def run_ranks(mp_context):
    """run_ranks(target, world_size, *args, timeout=60) -> [result per rank].

    Runs ``target(rank, world_size, *args)`` in one process per rank and returns what
    each returned; a rank that raises or overruns fails the test with its
    traceback. Leftover processes are killed.
    """
    started = []

    def run(target, world_size, *args, timeout=60.0):
        results_queue = mp_context.Queue()
        procs = [
            mp_context.Process(
                target=ranks.rank_main,
                args=(results_queue, target, rank, (world_size, *args)),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        started.extend(procs)
        for p in procs:
            p.start()
        results, failures = _collect(
            results_queue,
            world_size,
            time.monotonic() + timeout,
            lambda: any(p.is_alive() for p in procs),
        )
        for p in procs:
            p.join(timeout=5)
        return _report(world_size, results, failures, timeout)

    yield run
    for p in started:
        if p.is_alive():
            p.kill()
            p.join()


@pytest.fixture
def run_rank_threads():
    """run_rank_threads(target, world_size, *args, timeout=60): ranks as threads of this process."""

    def run(target, world_size, *args, timeout=60.0):
        results_queue = queue_module.Queue()
        threads = [
            threading.Thread(
                target=ranks.rank_main,
                args=(results_queue, target, rank, (world_size, *args)),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for t in threads:
            t.start()
        results, failures = _collect(
            results_queue,
            world_size,
            time.monotonic() + timeout,
            lambda: any(t.is_alive() for t in threads),
        )
        return _report(world_size, results, failures, timeout)

    return run
