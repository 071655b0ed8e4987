"""The table on stdout and the JSON document of a run."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from .config import BenchConfig
from .results import WorldSummary
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


def format_table(summaries: Sequence[WorldSummary]) -> str:
    """One right-aligned row per world size; every time in microseconds."""
    rows = [[header for header, _ in _COLUMNS]]
    rows += [[cell(s) for _, cell in _COLUMNS] for s in summaries]
    widths = [max(len(row[c]) for row in rows) for c in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in rows
    )


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
    return [
        f"ranks as {config.ranks}, {config.iters} barriers x {config.rounds} "
        f"rounds per implementation, {config.warmup} warm-up barriers per block",
        f"store backend: ours {config.backend} ({torch_part}); ours' protocol: "
        f"{config.protocol}",
        f"busy thread: {'yes' if config.busy_thread else 'no'}; {pinning}; "
        f"{os.cpu_count()} CPUs",
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


def build_document(
    config: BenchConfig,
    run_versions: dict[str, str],
    cpus: Sequence[int],
    worlds: Sequence[tuple[WorldSummary, Sequence[Block], Sequence[dict[str, Any]]]],
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
                "summary": {
                    **asdict(summary),
                    "torch_over_ours": summary.torch_over_ours,
                    "ours_over_floor": summary.ours_over_floor,
                },
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
