"""A store that stalls for a while (its server thread held, see
support/stall.py) is slow, not lost: a round times out as usual and the
next call resumes it, and close() after an arrival cut short by Ctrl-C
still waits for the peers without misreading the store's late replies."""

from __future__ import annotations

import signal
import time

import pytest
from support import LOOPBACK
from support.barriers import await_arrivals, describe, our_barrier
from support.launch import CONTEXT, run_ranks
from support.stall import stalled_legacy_store

PREFIX = "ckpt"


class _Alarm(Exception):
    """Raised by the SIGALRM handler, as Ctrl-C raises KeyboardInterrupt."""


def _raise_alarm(signum, frame):
    raise _Alarm


def interrupted_arrival_rank(rank, world_size, port, peer_closes):
    """Rank 0 enters a round while its store stalls, is interrupted before
    the store answers the arrival, then closes once the store serves again;
    rank 1 closes a second after rank 0 was interrupted."""
    barrier = our_barrier(rank, world_size, port, libuv=False, timeout=30)
    if rank == 1:
        peer_closes.wait(30)
        time.sleep(1.0)
        closing_at = time.monotonic()
        barrier.close()
        return {"closing_at": closing_at}
    signal.signal(signal.SIGALRM, _raise_alarm)
    outcome = {}
    with stalled_legacy_store(LOOPBACK, port):
        try:
            # The timer is armed inside the try, so it cannot fire before
            # the call is guarded; the arrival leaves at once (a send), and
            # the store cannot answer it before the stall ends.
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            barrier.execute_barrier()
            outcome["interrupted"] = False
        except _Alarm:
            outcome["interrupted"] = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    # The store now serves the arrival: its answer waits, unread, on the
    # connection rank 0 awaits its rounds on.
    await_arrivals(barrier.store, PREFIX, 0, 1)
    peer_closes.set()
    start = time.monotonic()
    barrier.close()
    outcome["close_returned_at"] = time.monotonic()
    outcome["close_secs"] = outcome["close_returned_at"] - start
    return outcome


def test_host_close_after_an_arrival_cut_short_still_waits_for_its_peers(port):
    # The host's close() waits for every peer to close, with requests whose
    # replies would be taken for the arrival's answer, still due on the
    # connection, if close() asked on that connection.
    host, peer = run_ranks(
        interrupted_arrival_rank, 2, port, CONTEXT.Event(), timeout=60
    )
    assert host["interrupted"], host
    assert host["close_returned_at"] >= peer["closing_at"], (
        "rank 0 closed the store before its peer had closed"
    )
    assert host["close_secs"] < 10, host


def stalled_timeout_rank(rank, world_size, port, rank1_may_arrive, timeout):
    """Rank 0 enters round 0 while its store stalls, for longer than the
    round may take and, once it has timed out, for longer than naming the
    missing ranks may take; rank 1 arrives once the store serves again, and
    rank 0's next call completes the round."""
    barrier = our_barrier(rank, world_size, port, libuv=False, timeout=timeout)
    if rank == 1:
        rank1_may_arrive.wait(30)
        barrier.execute_barrier()
        barrier.close()
        return {"sequence": barrier.sequence}
    outcome = {}
    with stalled_legacy_store(LOOPBACK, port):
        start = time.monotonic()
        try:
            barrier.execute_barrier()
            outcome["first"] = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome["first"] = describe(e)
        outcome["first_secs"] = time.monotonic() - start
        # Still stalled: the worker, stuck in a heartbeat, could not have
        # named the missing ranks for the timed-out caller by now.
        time.sleep(1.0)
    rank1_may_arrive.set()
    try:
        barrier.execute_barrier()
        outcome["second"] = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        outcome["second"] = describe(e)
    outcome["sequence"] = barrier.sequence
    outcome["counted"] = int(barrier.store.add(f"{PREFIX}0/num_members", 0))
    barrier.close()
    return outcome


@pytest.fixture(scope="module")
def stalled_timeout():
    from support import free_port

    timeout = 1.0
    results = run_ranks(
        stalled_timeout_rank, 2, free_port(), CONTEXT.Event(), timeout, timeout=60
    )
    return timeout, results[0], results[1]


def test_a_round_timing_out_on_a_stalled_store_is_a_barrier_timeout(
    stalled_timeout,
):
    timeout, host, _ = stalled_timeout
    error = host["first"]
    assert error is not None, "the round completed although rank 1 never arrived"
    assert error["type"] == "BarrierTimeoutError", error
    assert timeout <= host["first_secs"] < timeout + 1.0, host
    # The store never said who was missing: the message says so rather than
    # naming nobody.
    assert "missing ranks unknown" in error["message"], error


def test_the_call_after_a_timeout_on_a_stalled_store_resumes_the_round(
    stalled_timeout,
):
    _, host, peer = stalled_timeout
    assert host["second"] is None, host["second"]
    assert host["sequence"] == peer["sequence"] == 1
    # Entered once, although its arrival waited out a timeout.
    assert host["counted"] == 2
