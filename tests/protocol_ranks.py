"""Rank bodies for test_protocol.py (imported by name in rank processes)."""

from __future__ import annotations

import random
import time

from conftest_shared import LOOPBACK


def torch_arguments(rank, world_size, port, prefix="ckpt", timeout=30):
    """torch's constructor arguments for a rank of a barrier on 127.0.0.1:port."""
    return {
        "global_rank": rank,
        "global_world_size": world_size,
        "barrier_prefix": prefix,
        "timeout_barrier_init_secs": timeout,
        "use_checkpoint_barrier_tcpstore_libuv": True,
        "tcpstore_port": port,
        "master_address": LOOPBACK,
        "timeout_secs": timeout,
    }


def native_barrier(rank, world_size, port, prefix="ckpt", timeout=30.0, **kwargs):
    from tcpstore_barrier import TCPStoreBarrier

    return TCPStoreBarrier(
        **torch_arguments(rank, world_size, port, prefix, timeout), **kwargs
    )


def torch_barrier(rank, world_size, port, prefix="ckpt", timeout=30):
    from torch.distributed.checkpoint._experimental.barriers import TCPStoreBarrier

    return TCPStoreBarrier(**torch_arguments(rank, world_size, port, prefix, timeout))


def timestamped_rounds(rank, world_size, port, rounds, torch_ranks=(), protocol="torch"):
    """Enter `rounds` barriers after random delays; return (enter, leave) times.

    Ranks in `torch_ranks` use torch's Python class, the others ours.
    """
    if rank in torch_ranks:
        barrier = torch_barrier(rank, world_size, port)
    else:
        barrier = native_barrier(rank, world_size, port, protocol=protocol)
    rng = random.Random(rank)
    stamps = []
    for _ in range(rounds):
        time.sleep(rng.uniform(0, 0.002))
        entered = time.time()
        barrier.execute_barrier()
        stamps.append((entered, time.time()))
    if rank not in torch_ranks:
        assert barrier.sequence == rounds
        barrier.close()
    else:
        # torch's class has no close(); give our ranks' close handshake a
        # moment so rank 0 does not count on a close that never comes.
        pass
    return stamps
