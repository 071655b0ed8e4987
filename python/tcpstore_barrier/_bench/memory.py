"""``bench-memory``: what a barrier costs in memory, and that it stays flat.

This module runs the command: the measurements its options ask for, then
the tables and the JSON file. The pieces, one concern a module (how the
measurements work is the command's description, in ``memory_config``):

- ``memory_config``: the command line, parsed into a :class:`MemoryConfig`.
- ``memory_readings``: a process's RSS, malloc'd bytes, fds and threads.
- ``memory_processes``: building either barrier in a measurement process,
  and starting, collecting and stopping those processes.
- ``memory_objects``: memory per barrier object (the host and measurer
  processes, and the per-object summary).
- ``memory_store``: rank 0's RSS and the store's keys over many barriers.
- ``memory_report``: the tables.

The names callers use are imported here, so ``memory.X`` reaches them all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

from .launch import BenchError
from .memory_config import (
    DESCRIPTION,
    MemoryConfig,
    add_memory_arguments,
    memory_config_from_args,
)
from .memory_objects import (
    ObjectsSummary,
    checkpoints,
    measure_objects,
    summarize_objects,
)
from .memory_readings import heap_in_use, open_fds, rss_bytes, thread_count
from .memory_report import format_objects, format_store
from .memory_store import StoreSummary, measure_store

__all__ = [
    "DESCRIPTION",
    "MemoryConfig",
    "ObjectsSummary",
    "StoreSummary",
    "add_memory_arguments",
    "checkpoints",
    "format_objects",
    "format_store",
    "heap_in_use",
    "main",
    "measure_objects",
    "measure_store",
    "memory_config_from_args",
    "open_fds",
    "rss_bytes",
    "run_memory",
    "summarize_objects",
    "thread_count",
]


def run_memory(
    config: MemoryConfig, log: Callable[[str], None] = lambda _: None
) -> tuple[list[ObjectsSummary], list[StoreSummary]]:
    """Run the measurements ``config`` asks for; raise BenchError on failure."""
    deadline = time.monotonic() + config.timeout_secs
    objects: list[ObjectsSummary] = []
    stores: list[StoreSummary] = []
    if config.only in (None, "objects"):
        for implementation in config.implementations():
            log(f"objects: {implementation}, {config.objects} objects")
            raw = measure_objects(implementation, config, deadline)
            objects.append(summarize_objects(implementation, config.objects, raw))
    if config.only in (None, "store"):
        runs = [("ours", config.barriers, config.sample_every)]
        if config.include_torch:
            runs.append(("torch", config.torch_barriers, config.torch_sample_every))
        for implementation, barriers, every in runs:
            log(f"store: {implementation}, {barriers} barriers")
            samples = measure_store(implementation, barriers, every, config, deadline)
            stores.append(StoreSummary(implementation, barriers, samples))
    return objects, stores


def main(args: argparse.Namespace) -> int:
    """Run ``bench-memory``; return the exit code."""
    config = memory_config_from_args(args)
    started = time.monotonic()

    def log(text: str) -> None:
        elapsed = time.monotonic() - started
        print(f"[{elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)

    try:
        objects, stores = run_memory(config, log)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if objects:
        print(
            f"memory per barrier object: {config.objects} objects as ranks "
            f"1..{config.objects} of a world of {config.objects + 1}, in one "
            "process;\nrank 0 hosts the store in another (\"host\"). RSS per "
            "object is the slope between\n"
            f"{checkpoints(config.objects)[1]} and {config.objects} objects; "
            f"ours' protocol: {config.protocol}, backend: {config.backend}"
        )
        print()
        print(format_objects(objects))
    for summary in stores:
        print()
        who = "ours" if summary.implementation == "ours" else "torch's class"
        print(
            f"store over {summary.barriers} barriers of {who} (world size 2, "
            "ranks as processes, rank 0 hosts the store and samples):"
        )
        print(format_store(summary))
    if config.json_path is not None:
        document = {
            "config": asdict(config),
            "objects": [asdict(s) for s in objects],
            "stores": [asdict(s) for s in stores],
        }
        with open(config.json_path, "w") as f:
            json.dump(document, f)
        print(f"\nwrote {config.json_path}")
    return 0
