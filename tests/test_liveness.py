"""Liveness and deadlines on a bad day: a peer killed, a store host frozen,
and no false alarm when a rank is merely slow or busy.

Faults are made for real (SIGKILL, SIGSTOP) on rank processes that talk to a
real TCPStore on 127.0.0.1. Measured figures print as ``FIGURE name: value``
lines (``pytest -s``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import liveness_ranks as lr
import ranks
from conftest import collect_reports

# How late past its limit an error may come: the "deadline plus 1 s".
SLACK = 1.0
TESTS = Path(__file__).resolve().parent


def report_figure(name, value):
    print(f"FIGURE {name}: {value:.3f}")


class RankProcesses:
    """One process per rank, each reporting what its body returned."""

    def __init__(self, mp_context, target, world_size, *args):
        self.queue = mp_context.Queue()
        self.procs = {
            rank: mp_context.Process(
                target=ranks.rank_main,
                args=(self.queue, target, rank, (world_size, *args)),
                daemon=True,
            )
            for rank in range(world_size)
        }
        for proc in self.procs.values():
            proc.start()

    def signal(self, rank, signum):
        os.kill(self.procs[rank].pid, signum)

    def results(self, expected, timeout):
        results, failures = collect_reports(
            self.queue,
            set(expected),
            timeout,
            lambda pending: any(self.procs[r].is_alive() for r in pending),
        )
        assert not failures, "\n".join(failures.values())
        missing = sorted(set(expected) - results.keys())
        assert not missing, f"ranks {missing} did not report within {timeout} s"
        return results

    def stop(self):
        for proc in self.procs.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.join()


@pytest.fixture
def launch(mp_context):
    started = []

    def start(target, world_size, *args):
        group = RankProcesses(mp_context, target, world_size, *args)
        started.append(group)
        return group

    yield start
    for group in started:
        group.stop()


# --- a peer killed ------------------------------------------------------------


@pytest.mark.parametrize("peer_timeout", [1.0, None], ids=["1s", "default 5s"])
def test_killed_peer_is_named_lost_by_every_survivor(launch, mp_context, port, peer_timeout):
    world_size, victim = 4, 2
    killed_at = mp_context.Value("d", 0.0)
    limit = 5.0 if peer_timeout is None else peer_timeout
    group = launch(
        lr.killed_peer, world_size, port, victim,
        peer_timeout if peer_timeout is not None else 5.0, killed_at,
    )
    survivors = [r for r in range(world_size) if r != victim]
    results = group.results(survivors, timeout=60)
    detections = []
    for rank in survivors:
        error = results[rank]["error"]
        assert error is not None, f"rank {rank} completed a round without rank {victim}"
        assert error["type"] == "PeerLostError", error
        assert error["is_barrier_timeout"]
        assert error["lost_ranks"] == [victim]
        assert victim in error["missing_ranks"]
        detection = results[rank]["ended_at"] - killed_at.value
        assert detection < limit + 1.0 + SLACK, f"rank {rank} took {detection:.2f} s"
        detections.append(detection)
        # The barrier is over: a retry raises the same error at once.
        assert results[rank]["again"]["type"] == "PeerLostError"
        assert results[rank]["close_elapsed"] < 2 * limit
    report_figure(f"killed peer detected, peer timeout {limit:g} s (median)",
                  statistics.median(detections))


# --- a frozen store host -------------------------------------------------------


def run_frozen_host(launch, mp_context, port, *, peer_timeout, timeout, when):
    world_size = 3
    ready = [mp_context.Event() for _ in range(world_size)]
    frozen = mp_context.Event()
    group = launch(lr.frozen_host, world_size, port, peer_timeout, timeout, ready, frozen, when)
    for event in ready:
        assert event.wait(30), "ranks did not get ready"
    time.sleep(0.2)
    group.signal(0, signal.SIGSTOP)
    frozen_at = time.monotonic()
    frozen.set()
    results = group.results([1, 2], timeout=timeout + 30)
    group.signal(0, signal.SIGCONT)
    return frozen_at, results


@pytest.mark.parametrize("when", ["waiting", "before arrival"])
def test_frozen_store_host_is_reported_within_the_peer_timeout(launch, mp_context, port, when):
    peer_timeout = 1.0
    frozen_at, results = run_frozen_host(
        launch, mp_context, port, peer_timeout=peer_timeout, timeout=120.0, when=when
    )
    for rank, outcome in results.items():
        error = outcome["error"]
        assert error is not None
        assert error["type"] == "StoreUnreachableError", error
        assert error["is_dist_network_error"] and error["is_peer_lost"]
        assert error["lost_ranks"] == [0]
        message = error["message"]
        assert f"127.0.0.1:{port}" in message
        assert f"rank {rank} of 3" in message and "'ckpt'" in message
        assert "sequence 1" in message and "stopped answering" in message
        detection = outcome["ended_at"] - frozen_at
        assert detection < peer_timeout + 1.0 + SLACK, f"{detection:.2f} s"
        assert outcome["again"]["type"] == "StoreUnreachableError"
        assert outcome["close_elapsed"] < SLACK
        report_figure(f"frozen store host detected ({when})", detection)


def test_frozen_store_host_without_liveness_still_meets_the_deadline(launch, mp_context, port):
    timeout = 2.0
    frozen_at, results = run_frozen_host(
        launch, mp_context, port, peer_timeout=None, timeout=timeout, when="waiting"
    )
    for outcome in results.values():
        assert outcome["error"]["is_dist_network_error"], outcome["error"]
        assert outcome["elapsed"] < timeout + SLACK


def test_joining_a_frozen_store_host_fails_within_the_init_timeout(launch, port):
    host = launch(lr.host_awaiting_a_peer, 1, port)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "rank 0 never listened"
            time.sleep(0.05)
    # Frozen: the kernel still accepts connections, nothing answers them.
    host.signal(0, signal.SIGSTOP)
    init = 2.0
    outcome = launch(lr.join_frozen_host, 1, port, init).results([0], timeout=30)[0]
    host.signal(0, signal.SIGCONT)
    error = outcome["error"]
    assert error is not None and error["is_dist_network_error"], error
    assert "timeout_barrier_init_secs" in error["message"]
    assert outcome["elapsed"] < init + SLACK


# --- no false alarms -------------------------------------------------------------


@pytest.mark.parametrize(
    "how, busy_thread",
    [
        ("gil held in C", False),
        ("sleep", True),
        ("shard write", False),
    ],
    ids=["gil-held-in-C", "busy-python-thread", "long-shard-write"],
)
def test_a_late_rank_is_not_declared_lost(run_ranks, port, how, busy_thread):
    peer_timeout, late = 1.0, 3.5
    outcomes = run_ranks(lr.late_rank, 3, port, peer_timeout, late, how, busy_thread,
                         timeout=60)
    for outcome in outcomes:
        assert outcome["error"] is None, outcome["error"]
    assert min(o["elapsed"] for o in outcomes[:-1]) >= late - 0.5


def test_no_false_alarm_under_cpu_oversubscription(run_ranks, port):
    burners = [
        subprocess.Popen([sys.executable, "-c",
                          "import time\nend = time.time() + 12\n"
                          "while time.time() < end: pass"])
        for _ in range(2 * (os.cpu_count() or 2))
    ]
    try:
        outcomes = run_ranks(lr.late_rank, 3, port, 1.0, 3.5, "sleep", True, timeout=60)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    for outcome in outcomes:
        assert outcome["error"] is None, outcome["error"]


def test_a_late_torch_rank_is_never_declared_lost(run_ranks, port):
    outcomes = run_ranks(lr.mixed_with_torch, 3, port, 2, 3.5, 60.0, timeout=60)
    for outcome in outcomes[:2]:
        assert outcome["error"] is None, outcome["error"]


def test_a_torch_rank_that_never_arrives_times_out_as_usual(run_ranks, port):
    outcomes = run_ranks(lr.mixed_with_torch, 3, port, 2, None, 3.0, timeout=60)
    for outcome in outcomes[:2]:
        error = outcome["error"]
        assert error["type"] == "BarrierTimeoutError", error
        assert error["missing_ranks"] == [2]
        assert 3.0 <= outcome["elapsed"] < 3.0 + SLACK
