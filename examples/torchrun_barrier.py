"""Checkpoint-style barriers over the process group's store, under torchrun.

    torchrun --nproc-per-node 4 examples/torchrun_barrier.py --steps 20

The barrier joins the store torchrun's rendezvous already set up (the
default process group's), so no second port is opened.
"""

from __future__ import annotations

import argparse
import time

import torch.distributed as dist

from tcpstore_barrier import TCPStoreBarrier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    barrier = TCPStoreBarrier.from_store(
        store, rank, world_size, "checkpoint/", timeout_secs=60
    )
    started = time.perf_counter()
    for _ in range(args.steps):
        # A real trainer writes its checkpoint shard here.
        barrier.execute_barrier()
    elapsed = time.perf_counter() - started
    print(
        f"rank {rank}/{world_size}: {barrier.sequence} barriers, "
        f"{elapsed / args.steps * 1e6:.0f} us each",
        flush=True,
    )
    barrier.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
