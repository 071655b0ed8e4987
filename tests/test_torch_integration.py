"""Fits torch: its barrier registry and checkpointer, existing stores, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import integration_ranks
from conftest import pick_free_port

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
            barrier_args=integration_ranks.barrier_args(0, 1, port),
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_torch_checkpointer_writes_a_real_checkpoint_through_our_barrier(
    run_ranks, port, tmp_path
):
    path = str(tmp_path / "step7")
    results = run_ranks(integration_ranks.save_checkpoint, 2, port, path, timeout=120)
    assert sorted(os.listdir(path)) == ["checkpoint_0.pt", "checkpoint_1.pt"]
    assert results == [([0.0] * 4, 7), ([1.0] * 4, 7)]
    assert torch.load(tmp_path / "step7" / "checkpoint_1.pt")["weight"].tolist() == [1.0] * 4


def test_from_store_joins_a_prefix_store_without_a_second_port(run_ranks, port):
    results = run_ranks(integration_ranks.from_prefix_store, 3, port, 50, timeout=120)
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
            str(pick_free_port()),
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
