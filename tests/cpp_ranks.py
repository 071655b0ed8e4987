"""Rank bodies for test_cpp.py: Python ranks beside the C++ trainer example."""

from __future__ import annotations

import re
import subprocess
import time

import protocol_ranks
from conftest_shared import LOOPBACK

STEP_LINE = re.compile(r"^step (\d+) entered ([\d.]+) left ([\d.]+)$", re.MULTILINE)


def trainer_command(
    trainer, rank, world_size, port, iterations, checkpoint_dir, timeout=30
):
    return [
        str(trainer),
        "--rank", str(rank),
        "--world-size", str(world_size),
        "--port", str(port),
        "--iterations", str(iterations),
        "--master-address", LOOPBACK,
        "--timeout", str(timeout),
        "--init-timeout", "30",
        "--checkpoint-dir", str(checkpoint_dir),
    ]  # fmt: skip


def trainer_stamps(stdout):
    """The trainer's (entered, left) wall-clock times, one pair per step."""
    steps = [(int(s), float(e), float(x)) for s, e, x in STEP_LINE.findall(stdout)]
    assert [s for s, _, _ in steps] == list(range(len(steps))), stdout
    return [(e, left) for _, e, left in steps]


def mixed_rank(rank, world_size, port, rounds, trainer, checkpoint_dir, keep_alive):
    """Rank 0: tcpstore_barrier, hosting the store; rank 1: the C++ trainer;
    other ranks: torch's TCPStoreBarrier. Returns (entered, left) per round."""
    if rank == 1:
        proc = subprocess.run(
            trainer_command(trainer, rank, world_size, port, rounds, checkpoint_dir),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, (
            f"trainer exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
        return trainer_stamps(proc.stdout)
    make = protocol_ranks.native_barrier if rank == 0 else protocol_ranks.torch_barrier
    barrier = make(rank, world_size, port)
    # The host's store must outlive the trainer's last round and its
    # close(), and torch's ranks never close: the test drops it at the end.
    keep_alive.append(barrier)
    stamps = []
    for _ in range(rounds):
        entered = time.time()
        barrier.execute_barrier()
        stamps.append((entered, time.time()))
    return stamps
