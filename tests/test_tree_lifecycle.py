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
from support import free_port
from support.barriers import assert_no_early_release, describe, our_barrier
from support.launch import CONTEXT, by_rank, run_ranks, start_rank_groups
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
        assert not extra, f"after tree barrier {n + 1} closed, the process holds {extra}"


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
