"""``python -m tcpstore_barrier bench``: our barrier against a C++ reference
loop and torch's class, interleaved in one run; the pieces are in ``_bench``."""

from __future__ import annotations

import argparse
import inspect
import sys
import time

from ._bench import launch, results
from ._bench.cli import (
    TREE_CONTENDERS,
    BenchConfig,
    ConfigError,
    add_bench_arguments,
    config_from_args,
)
from ._bench.launch import BenchError
from ._bench.rank import RankPlan, calibrate_work_loops, rank_groups, ranks_main

__all__ = ["BenchConfig", "BenchError", "add_bench_arguments", "main", "run_bench"]


def blocks_of(config: BenchConfig) -> list[results.Block]:
    """The schedule every world size of ``config`` runs."""
    if config.split_phase:
        torch = "torch" in config.contenders
        kinds = [k for k in results.SPLIT_KINDS if k != "torch_serial" or torch]
        return results.schedule(kinds, config.rounds, first="work")
    return results.schedule(config.contenders, config.rounds, last="floor")


def run_world(
    config: BenchConfig, world_size: int, deadline: float, work_loops: int
) -> results.Run:
    """Run every rank of one world size; its summary and its figures."""
    blocks = blocks_of(config)
    # Split phase needs ours and torch's class only.
    needed = ("ours", "torch") if config.split_phase else config.contenders
    built = tuple(c for c in config.contenders if c in needed)
    plan = RankPlan(
        config=config, world_size=world_size, contenders=built,
        ports=tuple(launch.pick_free_ports(len(built))), schedule=tuple(blocks),
        deadline_unix=time.time() + deadline - time.monotonic(), work_loops=work_loops,
    )  # fmt: skip
    processes = world_size if config.ranks == "processes" else config.processes
    groups = rank_groups(world_size, processes)
    jobs = [(f"bench-ranks{g[0]}-{g[-1]}", ranks_main, (g, plan)) for g in groups]
    where = f"world size {world_size}"
    if sys.stderr.isatty():  # rank 0 redraws the line as its blocks finish
        print(f"{launch.CLEAR_LINE}{where}: starting ranks", end="", file=sys.stderr)
    by_rank = launch.run_jobs(jobs, set(range(world_size)), deadline, f"{where}: ranks")
    figures = [by_rank[r] for r in range(world_size)]
    world = results.World(world_size, blocks, figures, config.iters)
    if config.split_phase:
        return results.summarize_split(world), world
    summary = results.summarize_world(world, config.contenders, config, fan_in(config))
    return summary, world


def fan_in(config: BenchConfig) -> int:
    """The tree contenders' tree_fan_in: --fan-in, or the constructor's default."""
    if config.fan_in is not None:
        return config.fan_in
    from tcpstore_barrier import TCPStoreBarrier

    return inspect.signature(TCPStoreBarrier).parameters["tree_fan_in"].default


def run_bench(config: BenchConfig) -> list[results.Run]:
    """Run every world size of ``config`` in turn; raise BenchError on failure."""
    deadline = time.monotonic() + config.timeout_secs
    # Calibrated before any rank or busy thread runs; the same for all.
    work_loops = calibrate_work_loops(config.work_us) if config.split_phase else 0
    runs = []
    for world_size in config.world_sizes:
        if deadline <= time.monotonic():
            raise BenchError(f"--timeout ran out before world size {world_size}")
        runs.append(run_world(config, world_size, deadline, work_loops))
    return runs


def print_bench(config: BenchConfig) -> None:
    """Run ``config``, print its tables, write its JSON and plot."""
    runs = run_bench(config)
    run_versions = results.versions()
    summaries = [summary for summary, _ in runs]
    print(results.describe_run(config, run_versions), end="\n\n")
    if any(c in config.contenders for c in TREE_CONTENDERS):
        print(f"trees: {config.ranks_per_host} ranks a host, fan-in {fan_in(config)}\n")
    if config.split_phase:
        print(results.format_split_table(summaries))
    else:
        print(results.format_table(summaries, config.contenders))
    document = results.build_document(config, run_versions, runs)
    launch.write_json(config.json_path, document)
    if config.plot_path is not None:
        title = f"{config.ranks}, torch {run_versions['torch']}, median (solid) and p99 (dashed)"
        results.plot_latency(summaries, config.contenders, config.plot_path, title)
        print(f"wrote {config.plot_path}")


def main(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand parsed into ``args``; return the exit code."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return launch.run_command(lambda: print_bench(config))
