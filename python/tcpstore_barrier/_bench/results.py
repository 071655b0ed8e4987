"""From the figures the ranks send to one summary per world size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .schedule import Block, BlockKind
from .stats import LatencySummary, median, ratio, summarize


#: Finished rounds' keys are deleted in batches (every 4th round, csrc at
#: the time of writing): with torch's protocol 2 deletes a round and one
#: failed delete a batch, with the native protocol 1 delete a round.
_DELETES_PER_ROUND = {"torch": 2.25, "native": 1.0}


def requests_per_round(world_size: int, implementation: str, protocol: str) -> float:
    """Requests one round sends the store, averaged over rounds.

    torch's class: every rank sets ``rank{r}``, adds to the count and waits
    for the last member's key, which the last arriver sets: 3N+1. Ours with
    torch's protocol: the last arriver does not wait (3N), plus deletes.
    Ours native: one server-side BARRIER request per rank (N), plus deletes;
    a rank also sets ``rank{r}`` in a round that has not released within
    200 ms, which is not counted. A set has no reply; an add, a wait and a
    BARRIER have one.
    """
    n = world_size
    if implementation == "torch":
        return 3 * n + 1
    if protocol == "native":
        return n + _DELETES_PER_ROUND["native"]
    return 3 * n + _DELETES_PER_ROUND["torch"]


@dataclass(frozen=True)
class CpuCost:
    """CPU time per barrier of one implementation, in microseconds."""

    #: The store's server thread (rank 0's process).
    server_us: float | None
    #: Every rank process, servers included (busy threads too, if any).
    total_us: float | None
    #: Requests a round sends the store (see :func:`requests_per_round`).
    requests: float
    #: ``server_us / requests``: the server's cost of one request.
    server_per_request_us: float | None


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
    #: Where ours' and torch's CPU time goes, when the ranks measured it.
    ours_cost: CpuCost | None = None
    torch_cost: CpuCost | None = None

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


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cpu_cost(
    kind: BlockKind,
    schedule: Sequence[Block],
    figures: Sequence[dict[str, Any]],
    barriers_per_block: int,
    requests: float,
) -> CpuCost | None:
    """Mean CPU time per barrier over the blocks of ``kind``.

    A block's server time is rank 0's reading of that implementation's
    server thread; its total the sum over ranks of the process CPU time that
    one rank of each process read. Both are read around the timed
    ``barriers_per_block`` barriers of the block, after its warm-up.
    """
    indices = [b.index for b in schedule if b.kind == kind]
    if not indices or barriers_per_block < 1:
        return None
    server_key = f"{kind}_server_cpu_ns"
    server = [
        figures[0]["blocks"][i][server_key] / barriers_per_block / 1000
        for i in indices
        if server_key in figures[0]["blocks"][i]
    ]
    totals = []
    for i in indices:
        readings = [
            rank["blocks"][i]["process_cpu_ns"]
            for rank in figures
            if "process_cpu_ns" in rank["blocks"][i]
        ]
        if readings:
            totals.append(sum(readings) / barriers_per_block / 1000)
    server_us, total_us = _mean(server), _mean(totals)
    if server_us is None and total_us is None:
        return None
    return CpuCost(
        server_us=server_us,
        total_us=total_us,
        requests=requests,
        server_per_request_us=ratio(server_us, requests),
    )


def summarize_world(
    world_size: int,
    schedule: Sequence[Block],
    figures: Sequence[dict[str, Any]],
    iters: int,
    protocol: str = "torch",
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
        ours_cost=cpu_cost(
            "ours", schedule, figures, iters,
            requests_per_round(world_size, "ours", protocol),
        ),
        torch_cost=cpu_cost(
            "torch", schedule, figures, iters,
            requests_per_round(world_size, "torch", protocol),
        ),
    )  # fmt: skip


@dataclass(frozen=True)
class SplitSummary:
    """One world size of --split-phase: per loop iteration, microseconds."""

    world_size: int
    #: The Python work alone.
    work: LatencySummary
    #: arrive(), the work, wait().
    split: LatencySummary
    #: The work, then execute_barrier().
    serial: LatencySummary
    #: The work, then torch's execute_barrier().
    torch_serial: LatencySummary | None
    #: Share of split iterations whose round had released before wait().
    released_at_wait: float
    #: Medians within split iterations: arrive() and wait() alone (us).
    arrive_median_us: float | None = None
    wait_median_us: float | None = None

    @property
    def saved_us(self) -> float:
        """What the split phase saves per iteration (median serial - split)."""
        return self.serial.median_us - self.split.median_us


def summarize_split(
    world_size: int,
    schedule: Sequence[Block],
    figures: Sequence[dict[str, Any]],
    iters: int,
) -> SplitSummary:
    """Pool every rank's iterations of each kind of --split-phase block."""
    if len(figures) != world_size:
        raise ValueError(f"expected figures of {world_size} ranks, got {len(figures)}")
    parts = {
        kind: _barrier_summary(kind, schedule, figures, iters)
        for kind in ("work", "split", "serial", "torch_serial")
    }
    work, split, serial = parts["work"], parts["split"], parts["serial"]
    if work is None or split is None or serial is None:
        raise ValueError("the schedule lacks a work, split or serial block")
    split_blocks = [
        rank["blocks"][b.index]
        for rank in figures
        for b in schedule
        if b.kind == "split"
    ]
    released = sum(block.get("released_at_wait", 0) for block in split_blocks)

    def part_median(key: str) -> float | None:
        values = [ns / 1000 for block in split_blocks for ns in block.get(key, ())]
        return median(values) if values else None

    return SplitSummary(
        world_size=world_size,
        work=work,
        split=split,
        serial=serial,
        torch_serial=parts["torch_serial"],
        released_at_wait=released / (len(split_blocks) * iters),
        arrive_median_us=part_median("arrive_ns"),
        wait_median_us=part_median("wait_ns"),
    )
