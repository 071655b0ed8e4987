"""A tree of stores over its whole life: it leaves nothing behind in the
process once closed or destroyed, close() keeps its deadline at any depth,
a prefix can be used again on a store that outlived a barrier, and close()
waits for the right members after a loss.

Simulated hosts are `host` strings on one machine; ranks are threads of the
test's process (where its threads, sockets and ports are counted) or of a
few processes (support/launch.py's start_rank_groups), so that SIGKILL or
SIGSTOP of a process is a host's crash or freeze. Every store is a real
TCPStore on 127.0.0.1.
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from support import free_port, report_figure
from support.barriers import assert_no_early_release, describe, our_barrier
from support.launch import (
    CONTEXT,
    await_fault,
    await_ready,
    by_rank,
    mark_ready,
    run_ranks,
    start_rank_groups,
)
from support.resources import resources, settled_leftovers

from tcpstore_barrier import TCPStoreBarrier

FAN_IN = 2


def tree_options(rank, ranks_per_host=2, **extra):
    return {
        "topology": "tree",
        "host": f"h{rank // ranks_per_host}",
        "tree_fan_in": FAN_IN,
        **extra,
    }


def tree_barrier(rank, world_size, port, *, timeout=10.0, peer_timeout=5.0, **kw):
    """A rank of a tree whose hosts are pairs of ranks, fan-in 2: 4 ranks
    make 2 host stores and the root; 8 ranks make 3 levels."""
    return our_barrier(
        rank, world_size, port, prefix="life", init=20, timeout=timeout,
        options=tree_options(rank, peer_timeout_secs=peer_timeout, **kw),
    )  # fmt: skip


# --- 1. nothing left behind ---------------------------------------------------

RESOURCE_WORLD = 4
# Server threads end on their own schedule once released.
SETTLE = 2.0


def rounds_then_close(rank, world_size, port, trees=1):
    """Rank `rank` of `trees` trees of RESOURCE_WORLD ranks each, run at once
    (tree i's root at port[i]): three rounds, then close()."""
    tree, local = divmod(rank, RESOURCE_WORLD)
    barrier = tree_barrier(local, RESOURCE_WORLD, port[tree])
    for _ in range(3):
        barrier.execute_barrier()
    barrier.close()


def rounds_then_drop(rank, world_size, port, left):
    """Three rounds; once every rank has left the last one, the barrier is
    destroyed without close()."""
    barrier = tree_barrier(rank, world_size, port[0])
    for _ in range(3):
        barrier.execute_barrier()
    left.wait(timeout=20)
    del barrier
    gc.collect()


def test_tree_barriers_closed_one_after_another_leave_no_thread_socket_or_port():
    baseline = resources()
    for n in range(3):
        run_ranks(
            rounds_then_close, RESOURCE_WORLD, [free_port()], threads=True, timeout=30
        )
        extra = settled_leftovers(baseline, SETTLE)
        assert not extra, (
            f"after tree barrier {n + 1} closed, the process holds {extra}"
        )


def test_two_tree_barriers_at_once_closed_leave_no_thread_socket_or_port():
    baseline = resources()
    run_ranks(
        rounds_then_close, 2 * RESOURCE_WORLD, [free_port(), free_port()], 2,
        threads=True, timeout=30,
    )  # fmt: skip
    extra = settled_leftovers(baseline, SETTLE)
    assert not extra, f"after two tree barriers closed, the process holds {extra}"


def test_tree_barriers_destroyed_without_close_leave_no_thread_socket_or_port():
    baseline = resources()
    for n in range(2):
        left = threading.Barrier(RESOURCE_WORLD)
        run_ranks(
            rounds_then_drop, RESOURCE_WORLD, [free_port()], left,
            threads=True, timeout=30,
        )  # fmt: skip
        extra = settled_leftovers(baseline, SETTLE)
        assert not extra, (
            f"after tree barrier {n + 1} was destroyed, the process holds {extra}"
        )


# --- 2. close() keeps its deadline at any depth --------------------------------

# 8 ranks on hosts of 2, fan-in 2: host stores {0,1} {2,3} {4,5} {6,7}, group
# stores {0,2} {4,6}, the root {0,4}. Rank 0 hosts a store at every level,
# and at each one member stays open, heartbeating, through rank 0's close():
# rank 1 (host store), rank 2 (group store), rank 4 (root).
DEEP_HOSTS = ((0, 1), (2, 3), (4, 5), (6, 7))
STRAGGLERS = (1, 2, 4)
CLOSE_TIMEOUT = 2.0
# close() returns within timeout_secs plus about a second, whatever the depth.
CLOSE_SLACK = 1.0


def close_with_stragglers(rank, world_size, port, rank0_closed):
    barrier = tree_barrier(rank, world_size, port, timeout=CLOSE_TIMEOUT)
    for _ in range(2):
        barrier.execute_barrier()
    if rank in STRAGGLERS:
        assert rank0_closed.wait(timeout=20), "rank 0's close() never returned"
        barrier.close()
        return None
    start = time.monotonic()
    barrier.close()
    elapsed = time.monotonic() - start
    if rank == 0:
        rank0_closed.set()
    return elapsed


def test_close_returns_within_timeout_secs_with_a_live_straggler_at_every_level():
    rank0_closed = CONTEXT.Event()
    with start_rank_groups(
        close_with_stragglers, DEEP_HOSTS, free_port(), rank0_closed
    ) as processes:
        results = by_rank(processes.results(range(len(DEEP_HOSTS)), 30), 8)
    report_figure("close() with a straggler at 3 levels, timeout 2 s (s)", results[0])
    assert results[0] >= CLOSE_TIMEOUT - 0.1, "rank 0 did not wait for its members"
    assert results[0] < CLOSE_TIMEOUT + CLOSE_SLACK, (
        f"rank 0's close() took {results[0]:.2f} s with timeout_secs={CLOSE_TIMEOUT}"
    )


# --- 3. close() after a loss waits for the live members, not the lost ---------

# Hosts of 2, fan-in 3: host stores {0,1} {2,3} {4,5} {6,7}; the leaders
# 0, 2, 4 meet at a group store of rank 0, where they are members 0, 1, 2;
# 6 goes up alone; the root is {0, 6}. Rank 2 (member 1 there) is killed,
# and with it the store of host {2,3}: the verdict names its subtree, ranks
# 2 and 3, the global number 2 being rank 4's index at the group store. Rank
# 0's close() there must skip member 1 (rank 2, dead) and not take member 2
# (rank 4, alive; it closes LIVE_CLOSES_AFTER s after its PeerLostError) for
# the lost rank 2.
LOSS_GROUPS = ((0, 1), (2,), (3,), (4, 5), (6, 7))
KILLED_GROUP, KILLED_RANK, LOST = 1, 2, [2, 3]
LATE_CLOSER, LIVE_CLOSES_AFTER = 4, 1.5
# Far above the test's length: only the close handshake decides when rank
# 0's close() returns, not a lost member's silence nor the deadline.
LOSS_PEER_TIMEOUT, LOSS_TIMEOUT = 8.0, 15.0


def close_after_a_loss(rank, world_size, port, ready):
    barrier = tree_barrier(
        rank, world_size, port, timeout=LOSS_TIMEOUT,
        peer_timeout=LOSS_PEER_TIMEOUT, tree_fan_in=3,
    )  # fmt: skip
    barrier.execute_barrier()
    mark_ready(ready)
    if rank == KILLED_RANK:
        await_fault(rank, "SIGKILL")
    try:
        barrier.execute_barrier()
        error = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = describe(e)
    if rank == LATE_CLOSER:
        time.sleep(LIVE_CLOSES_AFTER)
    start = time.monotonic()
    barrier.close()
    return {"error": error, "close_start": start, "close_end": time.monotonic()}


def test_close_after_a_loss_skips_the_lost_member_and_waits_for_the_live_one():
    ready = CONTEXT.Value("i", 0)
    with start_rank_groups(
        close_after_a_loss, LOSS_GROUPS, free_port(), ready
    ) as processes:
        await_ready(ready, 8)
        processes.signal(KILLED_GROUP, signal.SIGKILL)
        survivors = [i for i in range(len(LOSS_GROUPS)) if i != KILLED_GROUP]
        results = by_rank(processes.results(survivors, 40), 8)
    for rank in (0, LATE_CLOSER):
        error = results[rank]["error"]
        assert error is not None and error["lost_ranks"] == LOST, (rank, error)
    # The lost member at index 1 is not awaited: rank 0 is done long before
    # a lost member's silence (LOSS_PEER_TIMEOUT) or the deadline. The live
    # one at index 2 (rank 4, whose global number is not its index) has the
    # verdict, so it needs the store no more (it said so, as a rank that
    # learns a verdict does); its close() raising would have failed its rank.
    host = results[0]
    took = host["close_end"] - host["close_start"]
    assert took < 3.0, f"rank 0's close() took {took:.2f} s: it waited for rank 2"


# --- 4. a prefix used again on a store that outlived a barrier ----------------

REUSE_WORLD = 4
REUSED = "p"
LATE_RANK, LATE_BY = 3, 1.5
REUSE_TIMEOUT = 10.0


def shared_store(rank, world_size, port):
    """Rank `rank`'s client of one TCPStore that outlives the barriers (rank
    0 hosts it), as torchrun's store does."""
    return dist.TCPStore(
        "127.0.0.1", port, world_size, rank == 0, timedelta(seconds=20),
        wait_for_workers=False,
    )  # fmt: skip


def barrier_on(store, rank, world_size, topology, timeout=REUSE_TIMEOUT):
    """A barrier with the prefix REUSED over `store` (construction waits up
    to `timeout` too)."""
    options = tree_options(rank) if topology == "tree" else {"topology": "flat"}
    return TCPStoreBarrier.from_store(
        store, rank, world_size, REUSED, timeout, **options
    )


def late_rounds(rank, barrier, rounds=2):
    """(entered, left) of each round; LATE_RANK enters round 0 LATE_BY s
    after the others."""
    stamps = []
    for s in range(rounds):
        if s == 0 and rank == LATE_RANK:
            time.sleep(LATE_BY)
        entered = time.monotonic()
        barrier.execute_barrier()
        stamps.append((entered, time.monotonic()))
    return stamps


def reuse_after_close(rank, world_size, port, topology, everyone):
    store = shared_store(rank, world_size, port)
    first = barrier_on(store, rank, world_size, topology)
    for _ in range(3):
        first.execute_barrier()
    first.close()
    everyone.wait(timeout=20)  # every rank has closed the first barrier
    second = barrier_on(store, rank, world_size, topology)
    stamps = late_rounds(rank, second)
    second.close()
    everyone.wait(timeout=20)  # rank 0's store outlives every client's use
    return stamps


@pytest.mark.parametrize("topology", ["flat", "tree"])
def test_a_prefix_reused_after_close_on_the_same_store_waits_for_a_late_rank(
    topology,
):
    everyone = threading.Barrier(REUSE_WORLD)
    stamps = run_ranks(
        reuse_after_close, REUSE_WORLD, free_port(), topology, everyone,
        threads=True, timeout=40,
    )  # fmt: skip
    late_entry = stamps[LATE_RANK][0][0]
    for rank, rank_stamps in enumerate(stamps):
        left = rank_stamps[0][1]
        assert left >= late_entry, (
            f"rank {rank} left round 0 of the second barrier "
            f"{late_entry - left:.2f} s before rank {LATE_RANK} entered it"
        )
    assert_no_early_release(stamps)


def reuse_while_open(rank, world_size, port, topology, everyone):
    """A second barrier with the prefix of one still open on the same store:
    how its construction and round 0 ended."""
    store = shared_store(rank, world_size, port)
    first = barrier_on(store, rank, world_size, topology)
    first.execute_barrier()
    everyone.wait(timeout=20)
    outcome = {}
    try:
        # torch's own server (this test's store) can stall up to 5 s on a
        # reverse name lookup of a client where DNS is unreachable (this
        # machine): construction gets the usual REUSE_TIMEOUT.
        second = barrier_on(store, rank, world_size, topology)
    except Exception as e:  # noqa: BLE001 - reported to the test
        outcome["construction"] = describe(e)
    else:
        try:
            outcome["stamps"] = late_rounds(rank, second, rounds=1)
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome["round"] = describe(e)
        second.close()
    everyone.wait(timeout=20)
    first.close()
    everyone.wait(timeout=20)
    return outcome


@pytest.mark.parametrize("topology", ["flat", "tree"])
def test_a_prefix_reused_while_its_barrier_is_open_is_refused_or_waits(topology):
    everyone = threading.Barrier(REUSE_WORLD)
    outcomes = run_ranks(
        reuse_while_open, REUSE_WORLD, free_port(), topology, everyone,
        threads=True, timeout=40,
    )  # fmt: skip
    refused = [o["construction"] for o in outcomes if "construction" in o]
    if refused:
        assert any(f"'{REUSED}'" in e["message"] for e in refused), refused
    late = outcomes[LATE_RANK].get("stamps")
    for rank, outcome in enumerate(outcomes):
        if "stamps" not in outcome:
            continue
        # Released: only after the late rank entered, and it must have.
        assert late is not None, f"rank {rank} was released without rank 3"
        assert outcome["stamps"][0][1] >= late[0][0], (
            f"rank {rank} left round 0 of the second barrier before rank "
            f"{LATE_RANK} entered it"
        )
    if not refused:
        assert all("stamps" in o for o in outcomes), outcomes


# --- 5. liveness off: a frozen level store is not a peer "lost for 0 s" -------

# Hosts {0,1} {2,3}, fan-in 2: rank 2 hosts the store of host {2,3} and meets
# rank 0 at the root. With liveness off, rank 2's process is frozen after
# round 0; rank 3 waits at rank 2's store, ranks 0 and 1 at the root.
FROZEN_GROUPS = ((0, 1), (2,), (3,))
FROZEN_GROUP = 1
FROZEN_TIMEOUT = 1.5


def round_with_frozen_leader(rank, world_size, port, ready):
    barrier = tree_barrier(
        rank, world_size, port, timeout=FROZEN_TIMEOUT, peer_timeout=None
    )
    barrier.execute_barrier()
    mark_ready(ready)
    if rank == 2:
        await_fault(rank, "SIGSTOP")
    try:
        barrier.execute_barrier()
        return None
    except Exception as e:  # noqa: BLE001 - reported to the test
        return describe(e)
    finally:
        barrier.close()


def test_with_liveness_off_a_frozen_level_store_is_a_timeout_or_unreachable():
    ready = CONTEXT.Value("i", 0)
    with start_rank_groups(
        round_with_frozen_leader, FROZEN_GROUPS, free_port(), ready
    ) as processes:
        await_ready(ready, 4)
        processes.signal(FROZEN_GROUP, signal.SIGSTOP)
        errors = by_rank(processes.results([0, 2], 30), 4)
    for rank in (0, 1, 3):
        error = errors[rank]
        assert error is not None, f"rank {rank} completed round 1 without rank 2"
        assert error["is_dist_error"], (rank, error["type"], error["message"])
        # Nobody's silence was timed: nobody was lost "for 0 s".
        assert "for 0 s" not in error["message"], (rank, error["message"])
    # Rank 3, whose own store went silent, ends as flat ends with liveness
    # off: its round timed out, or its store did not answer.
    error = errors[3]
    assert error["type"] in ("BarrierTimeoutError", "StoreUnreachableError"), (
        error["type"], error["message"],
    )  # fmt: skip
