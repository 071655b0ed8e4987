"""``python -m tcpstore_barrier bench``: our barrier against a C++ reference
loop and torch's class, interleaved in one run; the pieces are in ``_bench``."""

from __future__ import annotations

import argparse
import sys
import time

from ._bench import launch, results
from ._bench.cli import BenchConfig, ConfigError, add_bench_arguments, config_from_args
from ._bench.launch import BenchError
from ._bench.rank import RankPlan, calibrate_work_loops, rank_groups, ranks_main

__all__ = ["BenchConfig", "BenchError", "add_bench_arguments", "main", "run_bench"]


class Progress:
    """Finished blocks out of ``total``, redrawn in place on a terminal only."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def show(self, label: str, advance: bool = False) -> None:
        self.done += advance
        if self.tty:
            bar = "#" * (24 * self.done // self.total)
            sys.stderr.write(f"\r\x1b[2K[{bar:.<24}] {self.done}/{self.total} {label}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[2K")


def blocks_of(config: BenchConfig) -> list[results.Block]:
    """The schedule every world size of ``config`` runs."""
    if config.split_phase:
        torch = "torch" in config.contenders
        kinds = [k for k in results.SPLIT_KINDS if k != "torch_serial" or torch]
        return results.schedule(kinds, config.rounds, first="work")
    return results.schedule(config.contenders, config.rounds, last="floor")


def run_world(
    config: BenchConfig, world_size: int, deadline: float, work_loops: int,
    progress: Progress,
) -> tuple[dict, results.World]:  # fmt: skip
    """Run every rank of one world size; its summary and its figures."""
    blocks = blocks_of(config)
    # Split phase needs ours and torch's class only.
    built = tuple(
        c for c in config.contenders if c in ("ours", "torch") or not config.split_phase
    )
    plan = RankPlan(
        config=config, world_size=world_size, contenders=built,
        ports=tuple(launch.pick_free_ports(len(built))), schedule=tuple(blocks),
        deadline_unix=time.time() + deadline - time.monotonic(), work_loops=work_loops,
    )  # fmt: skip
    processes = world_size if config.ranks == "processes" else config.processes
    groups = rank_groups(world_size, processes)
    jobs = [(f"bench-ranks{g[0]}-{g[-1]}", ranks_main, (g, plan)) for g in groups]
    where = f"world size {world_size}"

    def on_progress(index: int) -> None:
        if index < 0:
            progress.show(f"{where}: ranks ready")
        else:
            block = blocks[index]
            step = f"round {block.round + 1}/{config.rounds} {block.kind}"
            progress.show(f"{where}: {step}", advance=True)

    progress.show(f"{where}: starting ranks")
    by_rank = launch.run_jobs(
        jobs, set(range(world_size)), deadline, f"{where}: ranks", on_progress
    )
    figures = [by_rank[r] for r in range(world_size)]
    world = results.World(world_size, blocks, figures, config.iters)
    if config.split_phase:
        return results.summarize_split(world), world
    return results.summarize_world(world, config.contenders), world


def run_bench(config: BenchConfig) -> list[tuple[dict, results.World]]:
    """Run every world size of ``config`` in turn; raise BenchError on failure."""
    progress = Progress(len(blocks_of(config)) * len(config.world_sizes))
    deadline = time.monotonic() + config.timeout_secs
    # Calibrated before any rank or busy thread runs; the same for all.
    work_loops = calibrate_work_loops(config.work_us) if config.split_phase else 0
    runs = []
    try:
        for world_size in config.world_sizes:
            if deadline <= time.monotonic():
                raise BenchError(f"--timeout ran out before world size {world_size}")
            runs.append(run_world(config, world_size, deadline, work_loops, progress))
    finally:
        progress.close()
    return runs


def print_bench(config: BenchConfig) -> None:
    """Run ``config``, print its tables, write its JSON and plot."""
    runs = run_bench(config)
    run_versions = results.versions()
    summaries = [summary for summary, _ in runs]
    print(results.describe_run(config, run_versions), end="\n\n")
    if config.split_phase:
        print(results.format_split_table(summaries))
    else:
        print(results.format_table(summaries, config.contenders))
    launch.write_json(
        config.json_path, results.build_document(config, run_versions, runs)
    )
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
