"""Fits torch: its barrier registry and checkpointer, existing stores, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from support import LOOPBACK, free_port
from support.barriers import barrier_arguments
from support.launch import run_ranks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_registry_builds_our_barrier_and_torch_sees_a_barrier(port):
    from torch.distributed.checkpoint._experimental.barriers import (
        Barrier,
        BarrierConfig,
        create_barrier_from_config,
    )

    import tcpstore_barrier

    barrier = create_barrier_from_config(
        BarrierConfig(
            barrier_type="tcp_store_native",
            barrier_args=barrier_arguments(0, 1, port),
        )
    )
    assert type(barrier) is tcpstore_barrier.TCPStoreBarrier
    assert isinstance(barrier, Barrier)
    barrier.execute_barrier()
    assert barrier.sequence == 1
    barrier.close()


def test_registration_waits_for_torch_module_to_be_imported():
    code = (
        "import sys, tcpstore_barrier\n"
        "mod = 'torch.distributed.checkpoint._experimental.barriers'\n"
        "assert mod not in sys.modules, 'imported eagerly'\n"
        "from torch.distributed.checkpoint._experimental.barriers import BARRIER_REGISTRY\n"
        "assert BARRIER_REGISTRY['tcp_store_native'] is tcpstore_barrier.TCPStoreBarrier\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def save_checkpoint(rank, world_size, port, path):
    """Saves a checkpoint with torch's experimental checkpointer through our barrier."""
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
            barrier_args=barrier_arguments(rank, world_size, port),
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


def test_torch_checkpointer_writes_a_real_checkpoint_through_our_barrier(
    port, tmp_path
):
    path = str(tmp_path / "step7")
    results = run_ranks(save_checkpoint, 2, port, path, timeout=120)
    assert sorted(os.listdir(path)) == ["checkpoint_0.pt", "checkpoint_1.pt"]
    assert results == [([0.0] * 4, 7), ([1.0] * 4, 7)]
    assert (
        torch.load(tmp_path / "step7" / "checkpoint_1.pt")["weight"].tolist()
        == [1.0] * 4
    )


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


def test_from_store_joins_a_prefix_store_without_a_second_port(port):
    results = run_ranks(from_prefix_store, 3, port, 50, timeout=120)
    assert [sequence for sequence, _ in results] == [50, 50, 50]
    keys = results[0][1]
    # PrefixStore joins with a "/": our keys live under the prefix only.
    assert "trainer//rank0" in keys and "rank0" not in keys


def test_torchrun_example_uses_the_process_group_store(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            str(EXAMPLES / "torchrun_barrier.py"),
            "--steps",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in range(4):
        assert f"rank {rank}/4: 20 barriers" in out.stdout
