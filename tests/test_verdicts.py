"""Verdicts: when ranks die, every survivor ends its round with the same
error, naming the same ranks, and never with StoreUnreachableError because
the store's host, itself a survivor, left first.

The store host (rank 0) is a rank like the others: it raises its own
PeerLostError or BarrierTimeoutError and its process may end right after,
without close(). Its barrier, destroyed then, keeps the store up until every
survivor has the verdict (or a short linger passes), so what a survivor names
does not depend on which rank happened to learn it first.

Faults are real (SIGKILL) on rank processes talking to a real TCPStore on
127.0.0.1; ranks wait for evidence on the store (a rank's arrival is its
round's `num_members` counter), never for a fixed time. Measured detection
times print as ``FIGURE name: value`` lines (``pytest -s``).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from support import LOOPBACK, report_figure
from support.barriers import (
    await_arrivals,
    await_key,
    describe,
    our_barrier,
    timed_round,
)
from support.launch import CONTEXT, run_ranks, start_ranks

PREFIX = "ckpt"
# A round's own timeout where only liveness may end it: far above any
# detection time, so a survivor that waits for it shows that liveness failed.
LONG_TIMEOUT = 120.0
# How late a detection or a timeout may come on a busy 2-CPU machine: late
# ticks and wake-ups.
MARGIN = 1.0


def observer(port):
    """A plain c10d client of the barrier's store, as any process of the job
    could open: it sees the keys the barrier writes, under the same names.
    It does not count as a worker (wait_for_workers=False), so rank 0's
    constructor still waits for the ranks alone."""
    return dist.TCPStore(
        LOOPBACK,
        port,
        is_master=False,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
    )


def detection_window(peer_timeout):
    """(earliest, latest) after a kill at which a survivor may name the
    killed rank lost, at the worlds of this file (interval = peer timeout /
    5). The counter stopped at its last heartbeat, up to an interval before
    the kill (two on a busy machine), and no one may name it before the
    limit has passed since; the first reading of its final value comes
    within an interval of its last heartbeat, the declaration at the first
    watch the limit later (one more interval), and a survivor that does not
    watch learns it from its next heartbeat's reply (one more)."""
    interval = peer_timeout / 5
    return peer_timeout - 2 * interval, peer_timeout + 3 * interval + MARGIN


def assert_one_verdict(results, survivors, lost):
    """Every survivor raised PeerLostError naming `lost`, and all name the
    same ranks: lost and missing alike, as declared once on the store."""
    for rank in survivors:
        error = results[rank]["error"]
        assert error is not None, f"rank {rank} completed a round without {lost}"
        # Not StoreUnreachableError: the host's leaving changed no verdict.
        assert error["type"] == "PeerLostError", (rank, error)
        assert error["is_barrier_timeout"] and not error["is_dist_network_error"]
        assert error["lost_ranks"] == lost, (rank, error)
    verdicts = {
        (tuple(results[r]["error"]["lost_ranks"]),
         tuple(results[r]["error"]["missing_ranks"]))
        for r in survivors
    }  # fmt: skip
    assert len(verdicts) == 1, f"survivors disagree: {verdicts}"


def detections(results, survivors, killed_at, peer_timeout):
    """How long after the kill each survivor raised, checked against the
    detection window."""
    earliest, latest = detection_window(peer_timeout)
    times = {}
    for rank in survivors:
        detection = results[rank]["ended_at"] - killed_at
        assert earliest <= detection < latest, f"rank {rank}: {detection:.2f} s"
        times[rank] = detection
    return times


# --- two peers killed at once, the host exiting right after its verdict -------


def two_killed_host_exits(rank, world_size, port, victims, host_first):
    """Ranks in `victims` construct, then idle (heartbeating from C++) until
    the test kills them. The others wait in round 0: the first two arrivers
    and rank 0 are its watchers. With `host_first` rank 0 arrives first, its
    worker (started first) usually declares, learns the verdict first and
    leaves first; else ranks 2 and 3 arrive first and rank 0 after them, and
    three watchers contest the declaration. No close():
    each survivor returns right after its error, which destroys its barrier,
    and its process ends; the store host's too."""
    # The peer timeout by omission: the documented default.
    barrier = our_barrier(rank, world_size, port, init=30, timeout=LONG_TIMEOUT)
    peer_timeout = barrier.peer_timeout_secs
    if rank in victims:
        time.sleep(600)
        return None
    if (rank == 0) != host_first:
        await_arrivals(barrier.store, PREFIX, 0, 1 if host_first else 2)
    outcome = timed_round(barrier)
    outcome["peer_timeout_secs"] = peer_timeout
    return outcome


@pytest.mark.parametrize("host_first", [True, False], ids=["host first", "host last"])
def test_two_peers_killed_at_once_are_named_alike_by_every_survivor(port, host_first):
    world_size, victims = 5, (1, 4)
    survivors = [r for r in range(world_size) if r not in victims]
    with start_ranks(
        two_killed_host_exits, world_size, port, victims, host_first
    ) as ranks:
        store = observer(port)
        await_arrivals(store, PREFIX, 0, len(survivors))
        # Back to back: both counters stop within the same interval. This
        # is before any watcher's first watch (one interval after it
        # entered), so every watcher's first reading shows both counters
        # final.
        for victim in victims:
            ranks.signal(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        results = ranks.results(survivors, timeout=60)
        # Every survivor's process, the host's included, ended normally.
        ranks.assert_exited(killed=victims)
    assert {results[r]["peer_timeout_secs"] for r in survivors} == {5.0}
    assert_one_verdict(results, survivors, lost=list(victims))
    times = detections(results, survivors, killed_at, 5.0)
    for rank, detection in times.items():
        report_figure(f"two killed, default 5 s: rank {rank} detection", detection)
    report_figure(
        "two killed, default 5 s: detection (median)", statistics.median(times.values())
    )


# --- the host exiting right after its own timeout -------------------------------


def host_times_out_first(rank, world_size, port, absent, timeout):
    """Liveness off. Ranks in `absent` die right after constructing; rank 0
    enters round 0 at once, the others 150 ms after its arrival is on the
    store: rank 0 times out first and its process ends while the others
    still wait, and then need the store to name the missing ranks."""
    barrier = our_barrier(
        rank, world_size, port, init=30, timeout=timeout,
        options={"peer_timeout_secs": None},
    )  # fmt: skip
    if rank in absent:
        os.kill(os.getpid(), signal.SIGKILL)
    if rank != 0:
        await_arrivals(barrier.store, PREFIX, 0, 1)
        time.sleep(0.15)
    return timed_round(barrier)


def test_a_host_exiting_after_its_timeout_leaves_the_others_their_timeout(port):
    world_size, absent, timeout = 5, (1, 4), 2.0
    survivors = [r for r in range(world_size) if r not in absent]
    results = run_ranks(
        host_times_out_first, world_size, port, absent, timeout,
        killed=absent, timeout=60,
    )  # fmt: skip
    # The scenario held: the host's round ended before anyone else's.
    assert results[0]["ended_at"] < min(results[r]["ended_at"] for r in survivors[1:])
    for rank in survivors:
        error = results[rank]["error"]
        assert error is not None, f"rank {rank} completed a round without {absent}"
        # A plain timeout (liveness is off), not StoreUnreachableError.
        assert error["type"] == "BarrierTimeoutError", (rank, error)
        assert not error["is_peer_lost"] and not error["is_dist_network_error"]
        assert error["missing_ranks"] == list(absent), (rank, error)
        assert timeout <= results[rank]["elapsed"] < timeout + MARGIN, (rank, results)


# --- two deaths after many rounds, a watcher among them -------------------------


def two_killed_after_rounds(rank, world_size, port, victims, rounds, peer_timeout):
    """`rounds` rounds with everyone; then the victims idle until the test
    kills them while the others wait in the next round. Rank 1, a watcher of
    every round by rank, is one of them. Every rank closes, as the README
    asks."""
    barrier = our_barrier(
        rank, world_size, port, init=30, timeout=LONG_TIMEOUT,
        options={"peer_timeout_secs": peer_timeout},
    )  # fmt: skip
    for _ in range(rounds):
        barrier.execute_barrier()
    if rank in victims:
        time.sleep(600)
        return None
    outcome = timed_round(barrier)
    close_start = time.monotonic()
    barrier.close()
    outcome["close_elapsed"] = time.monotonic() - close_start
    return outcome


def kill_while_the_others_wait(port, world_size, victims, rounds, peer_timeout, after):
    """Runs two_killed_after_rounds; once the survivors wait in round
    `rounds`, and `after` seconds more, kills the victims back to back.
    Returns the survivors' results and when the kill was sent."""
    survivors = [r for r in range(world_size) if r not in victims]
    with start_ranks(
        two_killed_after_rounds, world_size, port, victims, rounds, peer_timeout
    ) as ranks:
        store = observer(port)
        await_arrivals(store, PREFIX, rounds, len(survivors), timeout=60)
        time.sleep(after)
        for victim in victims:
            ranks.signal(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        results = ranks.results(survivors, timeout=60)
        ranks.assert_exited(killed=victims)
    return results, killed_at


def test_two_peers_killed_after_twenty_rounds_one_a_watcher_are_named_alike(port):
    world_size, victims, rounds, peer_timeout = 5, (1, 2), 20, 1.0
    survivors = [r for r in range(world_size) if r not in victims]
    # Round 20 is the 21st: the survivors wait in it. The kill comes before
    # the watchers' first watch of this round.
    results, killed_at = kill_while_the_others_wait(
        port, world_size, victims, rounds, peer_timeout, after=0.0
    )
    assert_one_verdict(results, survivors, lost=list(victims))
    for rank in survivors:
        assert results[rank]["error"]["sequence"] == rounds
        # Rank 0's close() does not wait for the lost ranks to close.
        assert results[rank]["close_elapsed"] < 2 * peer_timeout, results[rank]
    times = detections(results, survivors, killed_at, peer_timeout)
    for rank, detection in times.items():
        report_figure(f"two killed after 20 rounds, 1 s: rank {rank}", detection)
    report_figure(
        "two killed after 20 rounds, 1 s: detection (median)",
        statistics.median(times.values()),
    )


# --- arrive() after a declared loss --------------------------------------------


def loss_declared_between_rounds(rank, world_size, port, peer_timeout, checked):
    """Rank 2 dies right after constructing. Rank 0 waits in round 0 and is
    its only watcher; rank 1 is in no round while the loss is declared: it
    idles, its barrier alive, until the loss is on the store and its own
    heartbeats have had time to bring it the verdict, then calls arrive().
    Rank 0, the store's host, stays up until rank 1 has read the store."""
    barrier = our_barrier(
        rank, world_size, port, init=30, timeout=LONG_TIMEOUT,
        options={"peer_timeout_secs": peer_timeout},
    )  # fmt: skip
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        outcome = timed_round(barrier)
        assert checked.wait(60), "rank 1 never read the store"
        return outcome
    store = observer(port)
    await_key(store, f"{PREFIX}/lost", timeout=30)
    # A rank learns a verdict from its next heartbeat's reply, one every
    # peer_timeout / 5: ten of them, plenty on a busy machine.
    time.sleep(2 * peer_timeout)
    outcome = {}
    for attempt in ("error", "again"):
        try:
            barrier.arrive()
            outcome[attempt] = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome[attempt] = describe(e)
    outcome["num_members"] = store.get(f"{PREFIX}0/num_members")
    outcome["rank_key"] = store.get("rank1") if store.check(["rank1"]) else None
    checked.set()
    return outcome


def test_arrive_after_a_declared_loss_raises_without_counting_itself_in(port):
    world_size, peer_timeout = 3, 1.0
    checked = CONTEXT.Event()
    results = run_ranks(
        loss_declared_between_rounds, world_size, port, peer_timeout, checked,
        killed=(2,), timeout=60,
    )  # fmt: skip
    host, idle = results[0], results[1]
    assert host["error"]["type"] == "PeerLostError", host["error"]
    assert host["error"]["lost_ranks"] == [2]
    for attempt in ("error", "again"):
        error = idle[attempt]
        assert error is not None, f"arrive() ({attempt}) raised nothing"
        assert error["type"] == "PeerLostError", error
        assert error["lost_ranks"] == [2]
        # The one verdict: rank 1 names what rank 0 named.
        assert error["missing_ranks"] == host["error"]["missing_ranks"]
    # No arrival was sent: round 0 counts rank 0 alone, and rank 1's rank
    # key never said that it entered round 0.
    assert idle["num_members"] == b"1"
    assert idle["rank_key"] != b"0", idle["rank_key"]


def test_two_peers_killed_while_the_watchers_watch_are_both_named(port):
    # Killed together, two ranks still stop heartbeating up to an interval
    # apart, and a watcher whose own heartbeat falls between theirs sees one
    # counter go still a watch before the other. The first declaration is
    # final, so it must not name only the first of them.
    world_size, victims, peer_timeout = 5, (1, 4), 1.0
    survivors = [r for r in range(world_size) if r not in victims]
    # At least three intervals (0.2 s each) after the survivors entered:
    # every watcher has begun its watches.
    results, killed_at = kill_while_the_others_wait(
        port, world_size, victims, 0, peer_timeout, after=3 * peer_timeout / 5
    )
    assert_one_verdict(results, survivors, lost=list(victims))
    detections(results, survivors, killed_at, peer_timeout)
