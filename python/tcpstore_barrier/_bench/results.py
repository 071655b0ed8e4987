"""From the figures the ranks send to one summary per world size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .schedule import Block, BlockKind
from .stats import LatencySummary, ratio, summarize


@dataclass(frozen=True)
class WorldSummary:
    """Everything the table shows for one world size."""

    world_size: int
    ours: LatencySummary
    torch: LatencySummary | None
    #: A peer's (the last rank's) round trips to ours' store.
    floor: LatencySummary
    #: Rank 0's round trips to ours' store, served in rank 0's own process.
    host_floor: LatencySummary
    #: A peer's round trips to torch's store (libuv whatever --backend says).
    torch_store_floor: LatencySummary | None

    @property
    def torch_over_ours(self) -> float | None:
        """How many times torch's median barrier is ours."""
        torch_median = self.torch.median_us if self.torch else None
        return ratio(torch_median, self.ours.median_us)

    @property
    def ours_over_floor(self) -> float | None:
        """Our median barrier in units of the median store round trip."""
        return ratio(self.ours.median_us, self.floor.median_us)


def _barrier_summary(
    kind: BlockKind,
    schedule: Sequence[Block],
    figures: Sequence[dict[str, Any]],
    iters: int,
) -> LatencySummary | None:
    indices = [b.index for b in schedule if b.kind == kind]
    if not indices:
        return None
    samples = [
        ns
        for rank in figures
        for i in indices
        for ns in rank["blocks"][i]["samples_ns"]
    ]
    walls = [rank["blocks"][i]["wall_ns"] for rank in figures for i in indices]
    return summarize(samples, walls, iters)


def _floor_summary(
    store: str,
    rank: int,
    schedule: Sequence[Block],
    figures: Sequence[dict[str, Any]],
) -> LatencySummary | None:
    key = f"{store}_store_ns"
    blocks = [figures[rank]["blocks"][b.index] for b in schedule if b.kind == "floor"]
    samples = [ns for block in blocks for ns in block.get(key, ())]
    return summarize(samples) if samples else None


def summarize_world(
    world_size: int,
    schedule: Sequence[Block],
    figures: Sequence[dict[str, Any]],
    iters: int,
) -> WorldSummary:
    """Pool every rank's samples of each kind of block of one world size.

    ``figures[r]`` is what rank ``r`` returned: ``blocks`` in schedule order,
    barrier blocks with ``samples_ns`` and ``wall_ns``, floor blocks with
    ``ours_store_ns`` and maybe ``torch_store_ns`` on the ranks that measured
    them: rank 0 and the last rank.
    """
    if len(figures) != world_size:
        raise ValueError(f"expected figures of {world_size} ranks, got {len(figures)}")
    ours = _barrier_summary("ours", schedule, figures, iters)
    peer = world_size - 1
    floor = _floor_summary("ours", peer, schedule, figures)
    host_floor = _floor_summary("ours", 0, schedule, figures)
    if ours is None or floor is None or host_floor is None:
        raise ValueError("the schedule has no block of ours or no floor block")
    return WorldSummary(
        world_size=world_size,
        ours=ours,
        torch=_barrier_summary("torch", schedule, figures, iters),
        floor=floor,
        host_floor=host_floor,
        torch_store_floor=_floor_summary("torch", peer, schedule, figures),
    )
