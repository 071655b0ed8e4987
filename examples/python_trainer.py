"""A training loop that checkpoints every step behind a barrier.

Each rank writes its shard of the checkpoint, then waits at the barrier:
once ``execute_barrier()`` returns, every rank's shard of this step is on
disk, so the previous step's shard can be deleted.

    python examples/python_trainer.py --world-size 4 --iterations 5

runs 4 ranks as local processes. On a cluster, start one process per rank
with ``--rank``, ``--world-size``, ``--master-address`` and ``--port``; the
ranks may mix this class, torch's TCPStoreBarrier and the C++ trainer in
examples/cpp_trainer.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import time
from pathlib import Path

import torch

from tcpstore_barrier import TCPStoreBarrier


def train(rank, world_size, master_address, port, iterations, checkpoint_dir):
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # torch's constructor; rank 0 hosts the store.
    with TCPStoreBarrier(
        global_rank=rank,
        global_world_size=world_size,
        barrier_prefix="ckpt",
        timeout_barrier_init_secs=60,
        use_checkpoint_barrier_tcpstore_libuv=True,
        tcpstore_port=port,
        master_address=master_address,
        timeout_secs=300,
    ) as barrier:
        for step in range(iterations):
            shard = {"step": step, "weights": torch.full((1024,), float(rank))}
            torch.save(shard, checkpoint_dir / f"step{step}-rank{rank}.pt")
            entered = time.perf_counter()
            barrier.execute_barrier()
            waited = time.perf_counter() - entered
            (checkpoint_dir / f"step{step - 1}-rank{rank}.pt").unlink(missing_ok=True)
            print(f"rank {rank}: step {step} saved, waited {waited * 1e3:.2f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rank", type=int, help="run only this rank")
    parser.add_argument("--master-address", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: a free port (local runs)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"))
    args = parser.parse_args()

    if args.rank is not None:
        if args.port is None:
            parser.error("--port is needed with --rank")
        train(
            args.rank,
            args.world_size,
            args.master_address,
            args.port,
            args.iterations,
            args.checkpoint_dir,
        )
        return

    port = args.port
    if port is None:
        with socket.socket() as s:
            s.bind((args.master_address, 0))
            port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ranks = [
        ctx.Process(
            target=train,
            args=(
                rank,
                args.world_size,
                args.master_address,
                port,
                args.iterations,
                args.checkpoint_dir,
            ),
        )
        for rank in range(args.world_size)
    ]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join()
    failed = [rank for rank, p in enumerate(ranks) if p.exitcode != 0]
    if failed:
        raise SystemExit(f"ranks {failed} failed")


if __name__ == "__main__":
    main()
