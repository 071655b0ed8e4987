"""Rank bodies for test_protocol.py (imported by name in rank processes)."""

from __future__ import annotations

import random
import time

from conftest_shared import LOOPBACK


def native_barrier(rank, world_size, port, prefix="ckpt", timeout=30.0):
    from tcpstore_barrier import TCPStoreBarrier

    return TCPStoreBarrier(
        global_rank=rank,
        global_world_size=world_size,
        barrier_prefix=prefix,
        timeout_barrier_init_secs=timeout,
        use_checkpoint_barrier_tcpstore_libuv=True,
        tcpstore_port=port,
        master_address=LOOPBACK,
        timeout_secs=timeout,
    )


def torch_barrier(rank, world_size, port, prefix="ckpt", timeout=30):
    from torch.distributed.checkpoint._experimental.barriers import TCPStoreBarrier

    return TCPStoreBarrier(
        global_rank=rank,
        global_world_size=world_size,
        barrier_prefix=prefix,
        timeout_barrier_init_secs=timeout,
        use_checkpoint_barrier_tcpstore_libuv=True,
        tcpstore_port=port,
        master_address=LOOPBACK,
        timeout_secs=timeout,
    )


def timestamped_rounds(rank, world_size, port, rounds, use_torch_for):
    """Enter `rounds` barriers after random delays; return (enter, leave) times."""
    make = torch_barrier if rank in use_torch_for else native_barrier
    barrier = make(rank, world_size, port)
    rng = random.Random(rank)
    stamps = []
    for _ in range(rounds):
        time.sleep(rng.uniform(0, 0.002))
        entered = time.time()
        barrier.execute_barrier()
        stamps.append((entered, time.time()))
    return stamps
