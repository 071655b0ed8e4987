"""Liveness and deadlines on a bad day: a peer killed, a store host frozen,
and no false alarm when a rank is merely slow or busy.

Faults are made for real (SIGKILL, SIGSTOP) on rank processes that talk to a
real TCPStore on 127.0.0.1. Measured figures print as ``FIGURE name: value``
lines (``pytest -s``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from support import LOOPBACK, report_figure
from support.barriers import (
    await_arrivals,
    describe,
    our_barrier,
    timed_round,
    torch_barrier,
)
from support.launch import CONTEXT, run_ranks, start_ranks

from tcpstore_barrier import BarrierTimeoutError

# How late past its limit an error may come: the "deadline plus 1 s".
SLACK = 1.0


# Rank bodies return plain data; times are time.monotonic(), one clock for
# every process of the machine. Ranks that must meet outside the barrier use
# multiprocessing events, since the store itself may be frozen.


def make(rank, world_size, port, *, timeout=120.0, peer_timeout=1.0, init=20.0):
    return our_barrier(
        rank, world_size, port, init=init, timeout=timeout,
        options={"peer_timeout_secs": peer_timeout},
    )  # fmt: skip


def killed_peer(rank, world_size, port, victim, options, timeline):
    """Round 0 with everyone; then the victim dies by SIGKILL while the
    others wait in round 1 (timeout_secs far above the detection time).
    `options` are the barrier's own ({} for its defaults)."""
    barrier = our_barrier(rank, world_size, port, init=20, timeout=120, options=options)
    barrier.execute_barrier()
    if rank == victim:
        die_right_after_a_heartbeat(barrier, rank, world_size, timeline)
    outcome = timed_round(barrier)
    again = timed_round(barrier)
    close_start = time.monotonic()
    barrier.close()
    outcome["close_elapsed"] = time.monotonic() - close_start
    outcome["again"] = again["error"]
    outcome["peer_timeout_secs"] = barrier.peer_timeout_secs
    return outcome


def die_right_after_a_heartbeat(barrier, rank, world_size, timeline):
    """SIGKILLs this rank once the others wait in round 1 and their watches
    have begun, right after a heartbeat of its own: its counter stops at a
    known moment, from which the silence limit is counted."""
    store = barrier.store
    interval = barrier.peer_timeout_secs / 5
    await_arrivals(store, "ckpt", 1, world_size - 1)
    # A watcher's first watch comes at most two intervals after it entered.
    time.sleep(2 * interval)
    counter = f"ckpt/alive/{rank}"
    asked = time.monotonic()
    seen = store.add(counter, 0)
    while True:
        time.sleep(0.002)
        # The read sent at `asked` still showed the old value: the heartbeat
        # that moves it reaches the store after that moment.
        timeline["silent_from"].value = asked
        asked = time.monotonic()
        if store.add(counter, 0) != seen:
            break
    timeline["killed_at"].value = time.monotonic()
    os.kill(os.getpid(), signal.SIGKILL)


def frozen_host(rank, world_size, port, peer_timeout, timeout, ready, frozen, when):
    """Rank 0 hosts the store and never enters round 1; the test freezes it
    with SIGSTOP either while the others wait ("waiting") or before they
    arrive ("before arrival")."""
    barrier = make(rank, world_size, port, timeout=timeout, peer_timeout=peer_timeout)
    barrier.execute_barrier()
    if rank == 0:
        ready[0].set()
        time.sleep(120)
        return None
    if when == "before arrival":
        ready[rank].set()
        frozen.wait(30)
    else:
        threading.Timer(0.3, ready[rank].set).start()
    outcome = timed_round(barrier)
    outcome["again"] = timed_round(barrier)["error"]
    close_start = time.monotonic()
    barrier.close()
    outcome["close_elapsed"] = time.monotonic() - close_start
    return outcome


def host_awaiting_a_peer(rank, world_size, port):
    """Rank 0 of 2: hosts the store and waits in its constructor for rank 1."""
    make(0, 2, port, init=60)


def join_frozen_host(rank, world_size, port, init):
    """Rank 1 of 2 joins a store whose host is frozen; reports how its
    construction ended."""
    start = time.monotonic()
    try:
        make(1, 2, port, init=init)
        error = None
    except Exception as e:  # noqa: BLE001
        error = describe(e)
    return {"error": error, "elapsed": time.monotonic() - start}


def _hold_gil(seconds):
    # A C function called through PyDLL keeps the GIL for its whole run, as
    # a long C extension call does.
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))


def _spin_python(stop):
    while not stop.is_set():
        sum(range(1000))


def _write_shard(seconds):
    chunk = os.urandom(1 << 20)
    end = time.monotonic() + seconds
    with tempfile.TemporaryFile() as shard:
        while time.monotonic() < end:
            shard.write(chunk)
            shard.flush()


def late_rank(rank, world_size, port, peer_timeout, late, how, busy_thread):
    """Round 1 waits `late` seconds for the last rank, which is busy `how`
    (holding the GIL in C, sleeping, writing a shard); with `busy_thread`,
    every rank also runs a CPU-bound Python thread."""
    barrier = make(rank, world_size, port, peer_timeout=peer_timeout)
    stop = threading.Event()
    if busy_thread:
        threading.Thread(target=_spin_python, args=(stop,), daemon=True).start()
    barrier.execute_barrier()
    if rank == world_size - 1:
        if how == "gil held in C":
            _hold_gil(late)
        elif how == "shard write":
            _write_shard(late)
        else:
            time.sleep(late)
    outcome = timed_round(barrier)
    stop.set()
    barrier.close()
    return outcome


def mixed_with_torch(rank, world_size, port, torch_rank, late, timeout):
    """Our ranks and one torch rank, which arrives `late` s into round 1
    (never, if `late` is None)."""
    if rank == torch_rank:
        barrier = torch_barrier(rank, world_size, port, init=20, timeout=60)
        barrier.execute_barrier()
        if late is None:
            time.sleep(timeout + 3)
            return None
        time.sleep(late)
        barrier.execute_barrier()
        time.sleep(1)
        return None
    barrier = make(rank, world_size, port, timeout=timeout, peer_timeout=1.0)
    # Round 0 is the start line: torch's rank spawns, imports torch and
    # connects meanwhile, which on a loaded machine can take longer than
    # `timeout`. A timed-out rank stays in the round, so calling again
    # resumes it; round 1 is the one judged.
    while True:
        try:
            barrier.execute_barrier()
            break
        except BarrierTimeoutError:
            pass
    outcome = timed_round(barrier)
    if late is None:
        time.sleep(2)
    barrier.close()
    return outcome


# --- a peer killed ------------------------------------------------------------


# How a loss is found (see docs/liveness.md): every rank's worker adds 1 to
# its counter every interval (peer timeout / 5 at this size: 1 s by default);
# a watcher reads the missing ranks' counters once per interval and declares a
# rank lost once its counter has not moved for the silence limit (the peer
# timeout), timed from the first reading that showed the final value. So,
# from the victim's last heartbeat (at most its kill):
#   the first reading of the final value comes within an interval (watches
#   are running by then), the declaration at the first watch at least the
#   silence limit later (within one more interval), and a survivor that does
#   not watch learns it from the reply to its next heartbeat (one more);
# and no survivor can name it before the limit has passed since the last
# heartbeat. MARGIN is for a busy machine: late ticks and wake-ups.
MARGIN = 1.0


def detection_window(peer_timeout):
    """(earliest after the last heartbeat, latest after the kill) at which a
    survivor may name a killed peer lost."""
    interval = peer_timeout / 5
    return peer_timeout, interval + peer_timeout + interval + interval + MARGIN


@pytest.mark.parametrize(
    "options", [{"peer_timeout_secs": 1.0}, {}], ids=["1s", "default 5s"]
)
def test_killed_peer_is_named_lost_by_every_survivor(port, options):
    world_size, victim = 4, 2
    timeline = {"silent_from": CONTEXT.Value("d"), "killed_at": CONTEXT.Value("d")}
    results = run_ranks(
        killed_peer, world_size, port, victim, options, timeline,
        killed=(victim,), timeout=60,
    )  # fmt: skip
    survivors = [r for r in range(world_size) if r != victim]
    # The default, by omission, is the documented 5 s.
    limit = options.get("peer_timeout_secs", 5.0)
    assert {results[r]["peer_timeout_secs"] for r in survivors} == {limit}
    earliest, latest = detection_window(limit)
    detections = []
    for rank in survivors:
        error = results[rank]["error"]
        assert error is not None, f"rank {rank} completed a round without rank {victim}"
        assert error["type"] == "PeerLostError", error
        assert error["is_barrier_timeout"]
        assert error["lost_ranks"] == [victim]
        assert victim in error["missing_ranks"]
        ended_at = results[rank]["ended_at"]
        silent_for = ended_at - timeline["silent_from"].value
        assert silent_for >= earliest, f"rank {rank} named it after {silent_for:.2f} s"
        detection = ended_at - timeline["killed_at"].value
        assert detection < latest, f"rank {rank} took {detection:.2f} s"
        detections.append(detection)
        # The barrier is over: a retry raises the same error at once.
        assert results[rank]["again"]["type"] == "PeerLostError"
        assert results[rank]["close_elapsed"] < 2 * limit
    report_figure(
        f"killed peer detected, peer timeout {limit:g} s (median)",
        statistics.median(detections),
    )


# --- a frozen store host -------------------------------------------------------


def run_frozen_host(port, *, peer_timeout, timeout, when):
    world_size = 3
    ready = [CONTEXT.Event() for _ in range(world_size)]
    frozen = CONTEXT.Event()
    with start_ranks(
        frozen_host, world_size, port, peer_timeout, timeout, ready, frozen, when
    ) as ranks:
        for event in ready:
            assert event.wait(30), "ranks did not get ready"
        time.sleep(0.2)
        ranks.signal(0, signal.SIGSTOP)
        frozen_at = time.monotonic()
        frozen.set()
        results = ranks.results([1, 2], timeout=timeout + 30)
        ranks.signal(0, signal.SIGCONT)
    return frozen_at, {rank: results[rank] for rank in (1, 2)}


@pytest.mark.parametrize("when", ["waiting", "before arrival"])
def test_frozen_store_host_is_reported_within_the_peer_timeout(port, when):
    peer_timeout = 1.0
    frozen_at, results = run_frozen_host(
        port, peer_timeout=peer_timeout, timeout=120.0, when=when
    )
    for rank, outcome in results.items():
        error = outcome["error"]
        assert error is not None
        assert error["type"] == "StoreUnreachableError", error
        # The C++ hierarchy: a DistNetworkError, not a timeout.
        assert error["is_dist_network_error"], error
        assert not error["is_barrier_timeout"] and not error["is_peer_lost"], error
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


def test_frozen_store_host_without_liveness_still_meets_the_deadline(port):
    timeout = 2.0
    frozen_at, results = run_frozen_host(
        port, peer_timeout=None, timeout=timeout, when="waiting"
    )
    for outcome in results.values():
        assert outcome["error"]["is_dist_network_error"], outcome["error"]
        assert outcome["elapsed"] < timeout + SLACK


def test_joining_a_frozen_store_host_fails_within_the_init_timeout(port):
    init = 2.0
    with start_ranks(host_awaiting_a_peer, 1, port) as host:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "rank 0 never listened"
                time.sleep(0.05)
        # Frozen: the kernel still accepts connections, nothing answers them.
        host.signal(0, signal.SIGSTOP)
        (outcome,) = run_ranks(join_frozen_host, 1, port, init, timeout=30)
        host.signal(0, signal.SIGCONT)
    error = outcome["error"]
    assert error is not None and error["is_dist_network_error"], error
    assert "timeout_barrier_init_secs" in error["message"]
    assert outcome["elapsed"] < init + SLACK


# --- no false alarms -------------------------------------------------------------

# A late rank comes 3.5 silence limits after the others entered: a barrier
# that judged liveness by arrival rather than by heartbeats would have
# declared it lost three times over; and long before timeout_secs (120 s,
# make()'s default), so only a false alarm can end the wait early.
PEER_TIMEOUT, LATE = 1.0, 3.5


@pytest.mark.parametrize(
    "how, busy_thread",
    [
        ("gil held in C", False),
        ("sleep", True),
        ("shard write", False),
    ],
    ids=["gil-held-in-C", "busy-python-thread", "long-shard-write"],
)
def test_a_late_rank_is_not_declared_lost(port, how, busy_thread):
    outcomes = run_ranks(
        late_rank, 3, port, PEER_TIMEOUT, LATE, how, busy_thread, timeout=60
    )
    for outcome in outcomes:
        assert outcome["error"] is None, outcome["error"]
    # The others did wait for it: none left before the late rank entered.
    late_entry = outcomes[-1]["ended_at"] - outcomes[-1]["elapsed"]
    assert min(o["ended_at"] for o in outcomes[:-1]) >= late_entry


def test_no_false_alarm_under_cpu_oversubscription(port):
    burners = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                # Until killed: the whole run is oversubscribed.
                "while True: pass",
            ]
        )
        for _ in range(2 * (os.cpu_count() or 2))
    ]
    try:
        outcomes = run_ranks(
            late_rank, 3, port, PEER_TIMEOUT, LATE, "sleep", True, timeout=60
        )
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    for outcome in outcomes:
        assert outcome["error"] is None, outcome["error"]


def test_a_late_torch_rank_is_never_declared_lost(port):
    outcomes = run_ranks(mixed_with_torch, 3, port, 2, LATE, 60.0, timeout=60)
    for outcome in outcomes[:2]:
        assert outcome["error"] is None, outcome["error"]


def test_a_torch_rank_that_never_arrives_times_out_as_usual(port):
    outcomes = run_ranks(mixed_with_torch, 3, port, 2, None, 3.0, timeout=60)
    for outcome in outcomes[:2]:
        error = outcome["error"]
        assert error["type"] == "BarrierTimeoutError", error
        assert error["missing_ranks"] == [2]
        assert 3.0 <= outcome["elapsed"] < 3.0 + SLACK
