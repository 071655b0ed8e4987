"""``python -m tcpstore_barrier bench``: our barrier against torch's, A/B.

The pieces live in :mod:`tcpstore_barrier._bench`; this module runs them in
order: parse, launch each world size, summarize, print, save.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ._bench import report
from ._bench.config import (
    BenchConfig,
    ConfigError,
    add_bench_arguments,
    config_from_args,
    cpu_for_rank,
)
from ._bench.launch import BenchError, pick_free_ports, run_world
from ._bench.plot import PlotUnavailable, plot_latency, require_matplotlib
from ._bench.progress import Progress
from ._bench.rank import RankPlan, calibrate_work_loops
from ._bench.results import SplitSummary, WorldSummary, summarize_split, summarize_world
from ._bench.schedule import Block, ab_schedule, split_schedule

__all__ = [
    "BenchConfig",
    "BenchError",
    "WorldRun",
    "add_bench_arguments",
    "main",
    "run_bench",
]

#: One world size's summary, schedule and per-rank raw figures.
WorldRun = tuple[WorldSummary | SplitSummary, list[Block], list[dict[str, Any]]]

# Longest that rank 0's store waits for the other ranks to connect: a minute,
# and more for worlds so large that connecting them all takes a while.
_MAX_INIT_SECS = 60.0
_INIT_SECS_PER_RANK = 0.1


def init_timeout_secs(world_size: int, remaining_secs: float) -> float:
    """How long construction may wait for ``world_size`` ranks."""
    wanted = max(_MAX_INIT_SECS, _INIT_SECS_PER_RANK * world_size)
    return min(wanted, remaining_secs)


def schedule_for(config: BenchConfig) -> list[Block]:
    """The blocks every world size of ``config`` runs."""
    if config.split_phase:
        return split_schedule(config.rounds, config.include_torch)
    return ab_schedule(config.rounds, config.include_torch)


def _plan(
    config: BenchConfig,
    world_size: int,
    schedule: list[Block],
    cpus: list[int],
    remaining_secs: float,
    work_loops: int = 0,
) -> RankPlan:
    ports = pick_free_ports(2 if config.include_torch else 1)
    return RankPlan(
        world_size=world_size,
        ours_port=ports[0],
        torch_port=ports[1] if config.include_torch else None,
        use_libuv=config.use_libuv,
        protocol=config.protocol,
        iters=config.iters,
        warmup=config.warmup,
        schedule=tuple(schedule),
        cpus=tuple(cpu_for_rank(world_size, cpus, config.pin)),
        busy_thread=config.busy_thread,
        timeout_secs=remaining_secs,
        init_timeout_secs=init_timeout_secs(world_size, remaining_secs),
        deadline_unix=time.time() + remaining_secs,
        work_loops=work_loops,
    )


def run_bench(config: BenchConfig, progress: Progress | None = None) -> list[WorldRun]:
    """Run every world size of ``config`` in turn; raise BenchError on failure."""
    schedule = schedule_for(config)
    progress = progress or Progress(len(schedule) * len(config.world_sizes))
    cpus = sorted(os.sched_getaffinity(0))
    deadline = time.monotonic() + config.timeout_secs
    # Calibrated here, before any rank or busy thread runs, and the same for
    # every rank and world size.
    work_loops = calibrate_work_loops(config.work_us) if config.split_phase else 0
    runs: list[WorldRun] = []
    for world_size in config.world_sizes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"--timeout ran out before world size {world_size}")
        plan = _plan(config, world_size, schedule, cpus, remaining, work_loops)

        def on_progress(index: int, world_size: int = world_size) -> None:
            if index < 0:
                progress.show(f"world size {world_size}: ranks ready")
                return
            block = schedule[index]
            progress.advance(
                f"world size {world_size}: round {block.round + 1}/{config.rounds} "
                f"{block.kind}"
            )

        progress.show(f"world size {world_size}: starting ranks")
        figures = run_world(
            plan, config.ranks, deadline, on_progress, config.processes
        )
        summary: WorldSummary | SplitSummary
        if config.split_phase:
            summary = summarize_split(world_size, schedule, figures, config.iters)
        else:
            summary = summarize_world(
                world_size, schedule, figures, config.iters, config.protocol
            )
        runs.append((summary, schedule, figures))
    progress.close()
    return runs


def format_report(summaries: list[WorldSummary | SplitSummary]) -> str:
    """The table(s) printed after a run."""
    split = [s for s in summaries if isinstance(s, SplitSummary)]
    if split:
        return report.format_split_table(split)
    worlds = [s for s in summaries if isinstance(s, WorldSummary)]
    text = report.format_table(worlds)
    if report.has_costs(worlds):
        legend = "\n".join(report.COST_LEGEND)
        text += "\n\n" + legend + "\n\n" + report.format_cost_table(worlds)
    return text


def main(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand parsed into ``args``; return the exit code."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.plot_path is not None:
        try:
            require_matplotlib()
        except PlotUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    cpus = sorted(os.sched_getaffinity(0))
    blocks_per_world = len(schedule_for(config))
    progress = Progress(blocks_per_world * len(config.world_sizes))
    try:
        runs = run_bench(config, progress)
    except BenchError as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # run_world has killed the ranks on the way out.
        progress.close()
        print("interrupted", file=sys.stderr)
        return 130
    print("\n".join(report.describe_run(config, cpus)))
    print()
    summaries = [summary for summary, _, _ in runs]
    print(format_report(summaries))
    if config.json_path is not None:
        document = report.build_document(config, report.versions(), cpus, runs)
        with open(config.json_path, "w") as f:
            json.dump(document, f)
        print(f"\nwrote {config.json_path}")
    if config.plot_path is not None:
        plot_latency(
            [s for s in summaries if isinstance(s, WorldSummary)], config.plot_path
        )
        print(f"wrote {config.plot_path}")
    return 0
