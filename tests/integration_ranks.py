"""Rank bodies for test_torch_integration.py (imported by name in rank processes)."""

from __future__ import annotations

from conftest_shared import LOOPBACK


def barrier_args(rank, world_size, port):
    return {
        "global_rank": rank,
        "global_world_size": world_size,
        "barrier_prefix": "ckpt",
        "timeout_barrier_init_secs": 30,
        "use_checkpoint_barrier_tcpstore_libuv": True,
        "tcpstore_port": port,
        "master_address": LOOPBACK,
        "timeout_secs": 30,
    }


def save_checkpoint(rank, world_size, port, path):
    """Saves a checkpoint with torch's experimental checkpointer through our barrier."""
    import torch
    from torch.distributed.checkpoint._experimental import (
        BarrierConfig,
        CheckpointerConfig,
        RankInfo,
        make_sync_checkpointer,
    )

    import tcpstore_barrier

    config = CheckpointerConfig(
        barrier_config=BarrierConfig(
            barrier_type="tcp_store_native",
            barrier_args=barrier_args(rank, world_size, port),
        )
    )
    checkpointer = make_sync_checkpointer(
        config=config,
        rank_info=RankInfo(global_world_size=world_size, global_rank=rank),
    )
    barrier = checkpointer._writer._barrier
    assert isinstance(barrier, tcpstore_barrier.TCPStoreBarrier)
    state = {"weight": torch.full((4,), float(rank)), "step": 7}
    checkpointer.save(path, state)
    assert barrier.sequence == 1
    loaded = checkpointer.load(path)
    barrier.close()
    return loaded["weight"].tolist(), loaded["step"]


def from_prefix_store(rank, world_size, port, rounds):
    import torch.distributed as dist

    from tcpstore_barrier import TCPStoreBarrier

    tcp = dist.TCPStore(LOOPBACK, port, world_size, rank == 0)
    store = dist.PrefixStore("trainer/", tcp)
    barrier = TCPStoreBarrier.from_store(store, rank, world_size, "ckpt", 30)
    for _ in range(rounds):
        barrier.execute_barrier()
    keys = tcp.list_keys() if rank == 0 else None
    barrier.close()
    # from_store leaves the store open for its owner.
    tcp.set(f"after_close{rank}", "ok")
    return barrier.sequence, keys
