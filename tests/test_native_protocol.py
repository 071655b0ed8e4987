"""protocol="native" (the store's server-side BARRIER, every rank using it)
keeps the promises the torch protocol keeps: a killed peer is named lost,
Ctrl-C works while waiting, and finished rounds' keys are deleted. (A retry
after a timeout resuming the same round: test_reliability.py's resumed
rounds, run with both protocols.)

Ranks are processes (forkserver, see support/launch.py) on a real TCPStore
on 127.0.0.1. The test process watches the store through a client of its
own: a native round's only key is the server's count of arrivals,
``{prefix}{sequence}/barrier``, so "these ranks are in the round" is read
from the store, never assumed after a sleep. Measured figures print as
``FIGURE name: value`` lines (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from support import LOOPBACK, free_port, report_figure
from support.barriers import describe, our_barrier, timed_round
from support.launch import run_ranks, start_ranks

PREFIX = "ckpt"
# How long anything waits for a coordination key or a store observation:
# far beyond what a passing test needs, short enough that a broken one ends.
COORDINATION = timedelta(seconds=20)


def make(rank, world_size, port, *, timeout=30.0, peer_timeout=5.0):
    return our_barrier(
        rank, world_size, port, prefix=PREFIX, init=20, timeout=timeout,
        options={"protocol": "native", "peer_timeout_secs": peer_timeout},
    )  # fmt: skip


def count_key(sequence):
    """The server's count of the ranks that entered round `sequence`."""
    return f"{PREFIX}{sequence}/barrier"


@contextlib.contextmanager
def observing(port):
    """A store client of the test's own. It does not count as a worker
    (wait_for_workers=False), so rank 0's constructor still waits for the
    ranks alone."""
    store = dist.TCPStore(
        LOOPBACK, port, is_master=False, wait_for_workers=False, timeout=COORDINATION
    )
    yield store


def wait_until_stored(store, key, value=None):
    """Polls until `key` exists (and holds `value`, if given); returns when."""
    deadline = time.monotonic() + COORDINATION.total_seconds()
    while True:
        if store.check([key]) and (value is None or store.get(key) == value):
            return time.monotonic()
        assert time.monotonic() < deadline, f"{key!r} never became {value!r}"
        time.sleep(0.005)


# --- a peer killed mid-round ---------------------------------------------------

WORLD_SIZE = 4
VICTIM = 2
PEER_TIMEOUT = 1.0
# The heartbeat's period at this world size: a fifth of the peer timeout.
INTERVAL = PEER_TIMEOUT / 5
# The watchers (ranks 0 and 1: native arrivals carry no order) read the
# victim's counter once an interval, so they see its last beat at most an
# interval after the kill, and declare it lost at their first read a full
# peer timeout later: within an interval more. Every other survivor learns
# of it from the reply to its own next heartbeat, another interval on. What
# is left is scheduling on 2 busy cores.
DETECTION_BOUND = INTERVAL + PEER_TIMEOUT + INTERVAL + INTERVAL + 1.0


def killed_while_others_wait(rank, world_size, port, victim):
    """Round 0 with everyone; the victim then idles (heartbeating) until the
    test SIGKILLs it, while the others wait in round 1."""
    barrier = make(rank, world_size, port, timeout=60.0, peer_timeout=PEER_TIMEOUT)
    barrier.execute_barrier()
    if rank == victim:
        time.sleep(120)
        raise AssertionError("the victim outlived its SIGKILL")
    outcome = timed_round(barrier)
    # The barrier is over: a retry must say so at once, not wait again.
    outcome["again"] = timed_round(barrier)
    barrier.close()
    return outcome


def test_a_peer_killed_mid_round_is_named_lost_by_every_survivor(port):
    survivors = [r for r in range(WORLD_SIZE) if r != VICTIM]
    with (
        start_ranks(killed_while_others_wait, WORLD_SIZE, port, VICTIM) as ranks,
        observing(port) as store,
    ):
        # Kill only once every survivor's BARRIER request is on the server.
        wait_until_stored(store, count_key(1), str(len(survivors)).encode())
        ranks.signal(VICTIM, signal.SIGKILL)
        killed_at = time.monotonic()
        results = ranks.results(survivors, timeout=60)
        ranks.assert_exited(killed=(VICTIM,))
    detections = {}
    for rank in survivors:
        error = results[rank]["error"]
        assert error is not None, f"rank {rank} completed round 1 without the victim"
        assert error["type"] == "PeerLostError", error
        assert error["lost_ranks"] == [VICTIM], error
        assert error["sequence"] == 1 and error["barrier_key"] == count_key(1)
        detections[rank] = results[rank]["ended_at"] - killed_at
        again = results[rank]["again"]
        assert again["error"]["type"] == "PeerLostError", again
        assert again["elapsed"] < 0.1
    report_figure(
        "native killed peer named lost after, max (s)", max(detections.values())
    )
    assert max(detections.values()) <= DETECTION_BOUND, detections


# --- Ctrl-C -----------------------------------------------------------------------

INTERRUPT_LATENCY = 0.5


def interrupted_in_round(rank, world_size, port):
    """Rank 1 enters round 0 alone and is interrupted there by the test; it
    says so on the store and calls again; only then does rank 0 enter."""
    barrier = make(rank, world_size, port)
    store = barrier.store
    if rank == 0:
        store.wait(["test/resumed"], COORDINATION)
        entered = time.monotonic()
        barrier.execute_barrier()
        barrier.close()
        return {"entered": entered, "sequence": barrier.sequence}

    signal.signal(signal.SIGINT, signal.default_int_handler)
    result = {"interrupted_at": None, "other_outcome": None}
    # The test signals only once this call's BARRIER request is on the
    # server, so the signal cannot land before the try.
    try:
        barrier.execute_barrier()
        result["other_outcome"] = "the round released without rank 0"
    except KeyboardInterrupt:
        result["interrupted_at"] = time.monotonic()
    except BaseException as e:  # noqa: BLE001 - judged by the test
        result["other_outcome"] = describe(e)
    result["sequence_after_interrupt"] = barrier.sequence
    store.set("test/resumed", "1")
    barrier.execute_barrier()
    result["left"] = time.monotonic()
    result["sequence"] = barrier.sequence
    result["count"] = store.get(count_key(0))
    barrier.close()
    return result


# When the test interrupts rank 1: as soon as its arrival is counted, or
# once its round has been slow long enough for it to write its `rank1` key
# (after 100 ms), well into the wait.
SIGNAL_WHEN = {
    "on-arrival": (count_key(0), b"1"),
    "once-slow": ("rank1", b"0"),
}


@pytest.fixture(scope="module", params=sorted(SIGNAL_WHEN))
def interrupted(request):
    port = free_port()
    key, value = SIGNAL_WHEN[request.param]
    with start_ranks(interrupted_in_round, 2, port) as ranks, observing(port) as store:
        wait_until_stored(store, key, value)
        sent = time.monotonic()
        ranks.signal(1, signal.SIGINT)
        results = ranks.results([0, 1], timeout=60)
        ranks.assert_exited()
    return request.param, sent, results[0], results[1]


def test_sigint_raises_keyboard_interrupt_within_half_a_second(interrupted):
    when, sent, _, blocked = interrupted
    assert blocked["other_outcome"] is None, blocked["other_outcome"]
    latency = blocked["interrupted_at"] - sent
    report_figure(f"native ctrl_c_latency_s[{when}]", latency)
    assert 0 <= latency < INTERRUPT_LATENCY


def test_interrupt_leaves_the_round_entered_and_the_next_call_completes_it(
    interrupted,
):
    _, _, host, blocked = interrupted
    assert blocked["sequence_after_interrupt"] == 0
    assert blocked["sequence"] == host["sequence"] == 1
    assert blocked["left"] >= host["entered"]
    # Rank 1 was counted once: the next call resumed its request.
    assert blocked["count"] == b"2"


# --- bounded keys ----------------------------------------------------------------

ROUNDS = 300
# Finished rounds are deleted in batches of 32, the ranks taking turns,
# once the barrier has been quiet for 50 ms (csrc/src/housekeeping.cpp);
# a native round leaves one key. Quiet, the store holds at most the rounds
# of the unfinished batch, two keys per rank (its heartbeat counter, its
# `rank{r}` key) and a few of the store's own.
BATCH = 32
QUIET_PAUSE = 0.3


def quiet_key_bound(world_size):
    return 2 * world_size + 4 + BATCH


def many_native_rounds(rank, world_size, port):
    """ROUNDS barriers, then a quiet pause; rank 0 reports the store's key
    count and which rounds still have a key."""
    barrier = make(rank, world_size, port)
    store = barrier.store
    for _ in range(ROUNDS):
        barrier.execute_barrier()
    result = None
    if rank == 0:
        time.sleep(QUIET_PAUSE)
        result = {
            "num_keys": store.num_keys(),
            "rounds_with_keys": [
                s for s in range(ROUNDS) if store.check([count_key(s)])
            ],
        }
        store.set("test/counted", "1")
    store.wait(["test/counted"], COORDINATION)
    barrier.close()
    return result


def test_a_quiet_barrier_keeps_the_store_bounded_after_many_rounds(port):
    world_size = 3
    outcome = run_ranks(many_native_rounds, world_size, port, timeout=120)[0]
    report_figure("native keys after 300 rounds and a quiet pause", outcome["num_keys"])
    # Without deletes the rounds alone would leave ROUNDS keys.
    assert quiet_key_bound(world_size) < ROUNDS // 5
    assert outcome["num_keys"] <= quiet_key_bound(world_size), outcome
    leftover = outcome["rounds_with_keys"]
    assert not leftover or min(leftover) >= ROUNDS - BATCH, leftover
