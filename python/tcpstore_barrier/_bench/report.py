"""The table on stdout and the JSON document of a run."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from .config import BenchConfig
from .results import CpuCost, SplitSummary, WorldSummary
from .schedule import Block


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


_Column = tuple[str, Callable[[WorldSummary], str]]

_COLUMNS: list[_Column] = [
    ("world", lambda s: str(s.world_size)),
    ("ours med", lambda s: _us(s.ours.median_us)),
    ("ours p99", lambda s: _us(s.ours.p99_us)),
    ("torch med", lambda s: _us(s.torch.median_us if s.torch else None)),
    ("torch p99", lambda s: _us(s.torch.p99_us if s.torch else None)),
    ("torch/ours", lambda s: _times(s.torch_over_ours)),
    ("floor med", lambda s: _us(s.floor.median_us)),
    ("ours/floor", lambda s: _times(s.ours_over_floor)),
    ("rank0 floor", lambda s: _us(s.host_floor.median_us)),
    ("ours wall/it", lambda s: _us(s.ours.wall_per_iter_us)),
    ("torch wall/it", lambda s: _us(s.torch.wall_per_iter_us if s.torch else None)),
]


def _align(
    columns: Sequence[tuple[str, Callable[[Any], str]]], items: Sequence[Any]
) -> str:
    rows = [[header for header, _ in columns]]
    rows += [[cell(item) for _, cell in columns] for item in items]
    widths = [max(len(row[c]) for row in rows) for c in range(len(columns))]
    return "\n".join(
        "  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in rows
    )


def format_table(summaries: Sequence[WorldSummary]) -> str:
    """One right-aligned row per world size; every time in microseconds."""
    return _align(_COLUMNS, summaries)


def _cost(attribute: str, implementation: str) -> Callable[[WorldSummary], str]:
    def cell(s: WorldSummary) -> str:
        cost: CpuCost | None = getattr(s, f"{implementation}_cost")
        if cost is None:
            return "-"
        value = getattr(cost, attribute)
        if attribute == "requests":
            return f"{value:g}"
        if attribute == "server_per_request_us":
            return "-" if value is None else f"{value:.2f}"
        return _us(value)

    return cell


_COST_COLUMNS: list[_Column] = [
    ("world", lambda s: str(s.world_size)),
    ("ours req/it", _cost("requests", "ours")),
    ("ours srv/it", _cost("server_us", "ours")),
    ("ours srv/req", _cost("server_per_request_us", "ours")),
    ("ours cpu/it", _cost("total_us", "ours")),
    ("torch req/it", _cost("requests", "torch")),
    ("torch srv/it", _cost("server_us", "torch")),
    ("torch srv/req", _cost("server_per_request_us", "torch")),
    ("torch cpu/it", _cost("total_us", "torch")),
]


def has_costs(summaries: Sequence[WorldSummary]) -> bool:
    """Whether any world size carries CPU readings to show."""
    return any(s.ours_cost is not None for s in summaries)


def format_cost_table(summaries: Sequence[WorldSummary]) -> str:
    """Where the time goes: requests, server and total CPU per barrier (us)."""
    return _align(_COST_COLUMNS, summaries)


COST_LEGEND = [
    "where the time goes, per barrier (CPU us): req/it requests a round sends",
    "the store; srv/it the store server thread's CPU time; srv/req the same",
    "per request; cpu/it every rank process's CPU time, servers included",
]

_SPLIT_COLUMNS: list[tuple[str, Callable[[SplitSummary], str]]] = [
    ("world", lambda s: str(s.world_size)),
    ("work med", lambda s: _us(s.work.median_us)),
    ("split med", lambda s: _us(s.split.median_us)),
    ("split p99", lambda s: _us(s.split.p99_us)),
    ("serial med", lambda s: _us(s.serial.median_us)),
    ("serial p99", lambda s: _us(s.serial.p99_us)),
    ("saved med", lambda s: _us(s.saved_us)),
    ("arrive med", lambda s: _us(s.arrive_median_us)),
    ("wait med", lambda s: _us(s.wait_median_us)),
    ("torch med", lambda s: _us(s.torch_serial.median_us if s.torch_serial else None)),
    ("torch p99", lambda s: _us(s.torch_serial.p99_us if s.torch_serial else None)),
    ("split wall/it", lambda s: _us(s.split.wall_per_iter_us)),
    ("serial wall/it", lambda s: _us(s.serial.wall_per_iter_us)),
    ("released", lambda s: f"{100 * s.released_at_wait:.0f}%"),
]


def format_split_table(summaries: Sequence[SplitSummary]) -> str:
    """One row per world size of --split-phase, per loop iteration (us)."""
    return _align(_SPLIT_COLUMNS, summaries)


def describe_run(config: BenchConfig, cpus: Sequence[int]) -> list[str]:
    """The lines above the table: what was run, in which conditions."""
    torch_part = "torch's class: " + (
        "always libuv" if config.include_torch else "skipped"
    )
    if config.pin is None:
        pinning = "not pinned"
    elif config.pin == "same":
        pinning = f"every rank pinned to CPU {min(cpus)}"
    else:
        pinning = f"rank r pinned to CPU r mod {len(cpus)} of {sorted(cpus)}"
    if config.ranks == "threads":
        ranks = f"ranks as threads of at most {config.processes} process(es)"
    else:
        ranks = "ranks as processes"
    lines = [
        f"{ranks}, {config.iters} barriers x {config.rounds} "
        f"rounds per implementation, {config.warmup} warm-up barriers per block",
        f"store backend: ours {config.backend} ({torch_part}); ours' protocol: "
        f"{config.protocol}",
        f"busy thread: {'yes' if config.busy_thread else 'no'}; {pinning}; "
        f"{os.cpu_count()} CPUs",
    ]
    if config.split_phase:
        return lines + [
            f"per loop iteration in microseconds, with {config.work_us:g} us of "
            "Python work (calibrated alone);",
            "work: the work alone; split: arrive(), work, wait(); serial: work,",
            "execute_barrier(); torch: work, torch's execute_barrier(); saved:",
            "serial - split; arrive/wait med: arrive() and wait() alone within",
            "split iterations; released: split iterations whose round had",
            "released before wait()",
        ]
    return lines + [
        "latency per barrier in microseconds; floor: one store.add round trip",
        "from the last rank; rank0 floor: from rank 0, in the server's process",
    ]


def versions() -> dict[str, str]:
    """Versions of this package, of the torch it was built with and of its run."""
    import torch

    import tcpstore_barrier

    return {
        "tcpstore_barrier": tcpstore_barrier.__version__,
        "built_with_torch": tcpstore_barrier.built_with_torch,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _summary_json(summary: WorldSummary | SplitSummary) -> dict[str, Any]:
    if isinstance(summary, SplitSummary):
        return {**asdict(summary), "saved_us": summary.saved_us}
    return {
        **asdict(summary),
        "torch_over_ours": summary.torch_over_ours,
        "ours_over_floor": summary.ours_over_floor,
    }


def build_document(
    config: BenchConfig,
    run_versions: dict[str, str],
    cpus: Sequence[int],
    worlds: Sequence[
        tuple[WorldSummary | SplitSummary, Sequence[Block], Sequence[dict[str, Any]]]
    ],
) -> dict[str, Any]:
    """The ``--json`` document: configuration, versions, summaries, raw figures.

    Each world's ``blocks`` lists the schedule with every rank's samples
    (ns), so that any other statistic can be computed afterwards.
    """
    return {
        "config": config.to_json(),
        "versions": run_versions,
        "machine": {"cpu_count": os.cpu_count(), "allowed_cpus": sorted(cpus)},
        "worlds": [
            {
                "world_size": summary.world_size,
                "summary": _summary_json(summary),
                "ranks": [
                    {k: v for k, v in rank.items() if k != "blocks"} for rank in figures
                ],
                "blocks": [
                    {
                        **asdict(block),
                        "ranks": [rank["blocks"][block.index] for rank in figures],
                    }
                    for block in schedule
                ],
            }
            for summary, schedule, figures in worlds
        ],
    }
