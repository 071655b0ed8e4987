"""The schedule of a world size, and from the ranks' figures to its summary,
the tables, the JSON document and the plot. Pure: no store in here."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cli import BenchConfig
    from .rank import BlockFigures, RankFigures

#: The ratios of medians the table shows, when both contenders ran.
RATIOS = [("ours", "reference"), ("torch", "ours"), ("ours", "ours-noliveness"),
          ("torch", "native")]  # fmt: skip
#: Short names in the table's headers.
SHORT = {"reference": "ref", "ours-noliveness": "nolive"}
SPLIT_KINDS = ("split", "serial", "torch_serial")


@dataclass(frozen=True)
class Block:
    """One block of the schedule: ``iters`` timed operations of one kind, a
    contender's barriers, a "floor" of store round trips, or with
    --split-phase "work", "split", "serial" or "torch_serial" iterations."""

    index: int
    round: int
    kind: str


def schedule(
    kinds: Sequence[str], rounds: int, first: str = "", last: str = ""
) -> list[Block]:
    """``rounds`` rounds of a block of each of ``kinds``, between ``first`` and
    ``last`` when given. The order rotates by one each round, so that over
    len(kinds) rounds each kind runs once in each position and a drift over
    the run (a CPU warming up, a store growing) favours none of them."""
    blocks: list[Block] = []
    for r in range(rounds):
        shift = r % len(kinds)
        order = [first, *kinds[shift:], *kinds[:shift], last]
        blocks += [
            Block(len(blocks) + i, r, k) for i, k in enumerate(filter(None, order))
        ]
    return blocks


@dataclass(frozen=True)
class Latency:
    """Latency of one kind of block at one world size, in microseconds: over
    every rank's samples of every block; ``wall_per_iter_us`` is a block's
    wall time over its iterations, averaged over ranks and blocks."""

    samples: int
    median_us: float
    p99_us: float
    wall_per_iter_us: float | None = None


def latency(
    samples_ns: Sequence[int], walls_ns: Sequence[int] = (), iters: int = 0
) -> Latency:
    us = [ns / 1000 for ns in samples_ns]
    # "inclusive" interpolates as numpy.percentile does by default.
    p99 = (
        statistics.quantiles(us, n=100, method="inclusive")[98]
        if len(us) > 1
        else us[0]
    )
    wall = statistics.fmean(walls_ns) / iters / 1000 if walls_ns and iters else None
    return Latency(len(us), statistics.median(us), p99, wall)


@dataclass(frozen=True)
class CpuCost:
    """CPU time per barrier of one contender, in microseconds: its store's
    server threads, and every rank process (servers included)."""

    server_us: float | None
    total_us: float | None


@dataclass(frozen=True)
class WorldSummary:
    """Everything the tables show for one world size, by contender."""

    world_size: int
    latency: dict[str, Latency]
    #: Round trips to ours' store from the last rank (a peer) and from rank 0.
    floor: Latency
    host_floor: Latency
    cost: dict[str, CpuCost]

    def ratio(self, numerator: str, denominator: str) -> float | None:
        """How many times ``denominator``'s median ``numerator``'s is."""
        if numerator not in self.latency or denominator not in self.latency:
            return None
        return self.latency[numerator].median_us / self.latency[denominator].median_us


def _blocks(kind: str, plan: Sequence[Block], figures: Sequence[RankFigures]):
    return [rank.blocks[b.index] for b in plan if b.kind == kind for rank in figures]


def _latency_of(kind, plan, figures, iters) -> Latency | None:
    blocks = _blocks(kind, plan, figures)
    samples = [ns for block in blocks for ns in block.samples_ns]
    return latency(samples, [b.wall_ns for b in blocks], iters) if samples else None


def _required(kind, plan, figures, iters) -> Latency:
    found = _latency_of(kind, plan, figures, iters)
    if found is None:
        raise ValueError(f"no samples of {kind!r} blocks")
    return found


def _cost(blocks: Sequence[BlockFigures], ranks: int, iters: int) -> CpuCost | None:
    """Means per barrier over blocks; a block's total sums its ranks' readings."""
    per_block = [blocks[i : i + ranks] for i in range(0, len(blocks), ranks)]
    server = [b[0].server_cpu_ns for b in per_block if b[0].server_cpu_ns is not None]
    total = [sum(r.process_cpu_ns or 0 for r in b) for b in per_block
             if any(r.process_cpu_ns is not None for r in b)]  # fmt: skip
    if not server and not total:
        return None
    mean = lambda ns: statistics.fmean(ns) / iters / 1000 if ns else None  # noqa: E731
    return CpuCost(mean(server), mean(total))


def summarize_world(
    world_size: int, plan: Sequence[Block], figures: Sequence[RankFigures],
    contenders: Sequence[str], iters: int,
) -> WorldSummary:  # fmt: skip
    """Pool every rank's samples of each kind of block of one world size."""
    floors = {r: [ns for b in plan if b.kind == "floor"
                  for ns in figures[r].blocks[b.index].samples_ns]
              for r in (0, world_size - 1)}  # fmt: skip
    costs = {c: _cost(_blocks(c, plan, figures), world_size, iters) for c in contenders}
    return WorldSummary(
        world_size=world_size,
        latency={c: _required(c, plan, figures, iters) for c in contenders},
        floor=latency(floors[world_size - 1]),
        host_floor=latency(floors[0]),
        cost={c: cost for c, cost in costs.items() if cost is not None},
    )


@dataclass(frozen=True)
class SplitSummary:
    """One world size of --split-phase: per loop iteration, microseconds."""

    world_size: int
    work: Latency
    split: Latency
    serial: Latency
    torch_serial: Latency | None
    #: Share of split iterations whose round had released before wait().
    released_at_wait: float
    #: Medians within split iterations: arrive() and wait() alone.
    arrive_median_us: float
    wait_median_us: float

    @property
    def saved_us(self) -> float:
        """What the split phase saves per iteration (median serial - split)."""
        return self.serial.median_us - self.split.median_us


def summarize_split(world_size, plan, figures, iters) -> SplitSummary:
    """Pool every rank's iterations of each kind of --split-phase block."""
    split = _blocks("split", plan, figures)
    return SplitSummary(
        world_size=world_size,
        work=_required("work", plan, figures, iters),
        split=_required("split", plan, figures, iters),
        serial=_required("serial", plan, figures, iters),
        torch_serial=_latency_of("torch_serial", plan, figures, iters),
        released_at_wait=sum(b.released_at_wait for b in split) / (len(split) * iters),
        arrive_median_us=statistics.median(ns / 1000 for b in split for ns in b.arrive_ns),
        wait_median_us=statistics.median(ns / 1000 for b in split for ns in b.wait_ns),
    )  # fmt: skip


# --- text --------------------------------------------------------------------


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def align(columns: Sequence[tuple[str, Callable[[Any], str]]], items: Sequence[Any],
          label_left: bool = False) -> str:  # fmt: skip
    """A text table: a row per item, a (header, cell of an item) per column;
    right-aligned, but for the first column with ``label_left``."""
    rows = [[header for header, _ in columns]]
    rows += [[cell(item) for _, cell in columns] for item in items]
    widths = [max(len(row[c]) for row in rows) for c in range(len(columns))]
    return "\n".join("  ".join(t.ljust(w) if label_left and c == 0 else t.rjust(w)
                               for c, (t, w) in enumerate(zip(row, widths, strict=True))) for row in rows)  # fmt: skip


def _latency_column(contender: str, field: str) -> Callable[[WorldSummary], str]:
    return lambda s: _us(getattr(s.latency[contender], field))


def _ratio_column(a: str, b: str) -> Callable[[WorldSummary], str]:
    return lambda s: _times(s.ratio(a, b))


def _cost_column(contender: str, field: str) -> Callable[[WorldSummary], str]:
    return lambda s: _us(
        getattr(s.cost[contender], field) if contender in s.cost else None
    )


def format_table(summaries: Sequence[WorldSummary], contenders: Sequence[str]) -> str:
    """One row per world size: each contender's median and p99, the ratios,
    the floor; in microseconds."""
    columns: list[tuple[str, Callable[[WorldSummary], str]]] = [
        ("world", lambda s: str(s.world_size))
    ]
    for c in contenders:
        name = SHORT.get(c, c)
        columns += [(f"{name} med", _latency_column(c, "median_us")),
                    (f"{name} p99", _latency_column(c, "p99_us"))]  # fmt: skip
    for a, b in RATIOS:
        if a in contenders and b in contenders:
            header = f"{SHORT.get(a, a)}/{SHORT.get(b, b)}"
            columns.append((header, _ratio_column(a, b)))
    columns += [("floor med", lambda s: _us(s.floor.median_us)),
                ("rank0 floor", lambda s: _us(s.host_floor.median_us))]  # fmt: skip
    text = align(columns, summaries)
    if any(s.cost for s in summaries):
        cost: list[tuple[str, Callable[[WorldSummary], str]]] = [
            ("world", lambda s: str(s.world_size))
        ]
        for c in contenders:
            name = SHORT.get(c, c)
            cost += [(f"{name} srv/it", _cost_column(c, "server_us")),
                     (f"{name} cpu/it", _cost_column(c, "total_us"))]  # fmt: skip
        text += ("\n\nwhere the time goes, per barrier (CPU us): srv/it the store's server "
                 "threads;\ncpu/it every rank process, servers included\n\n" + align(cost, summaries))  # fmt: skip
    return text


def format_split_table(summaries: Sequence[SplitSummary]) -> str:
    """One row per world size of --split-phase, per loop iteration (us)."""
    return align([
        ("world", lambda s: str(s.world_size)),
        ("work med", lambda s: _us(s.work.median_us)),
        ("split med", lambda s: _us(s.split.median_us)),
        ("split p99", lambda s: _us(s.split.p99_us)),
        ("serial med", lambda s: _us(s.serial.median_us)),
        ("serial p99", lambda s: _us(s.serial.p99_us)),
        ("saved med", lambda s: _us(s.saved_us)),
        ("arrive med", lambda s: _us(s.arrive_median_us)),
        ("wait med", lambda s: _us(s.wait_median_us)),
        ("torch med", lambda s: _us(s.torch_serial and s.torch_serial.median_us)),
        ("torch p99", lambda s: _us(s.torch_serial and s.torch_serial.p99_us)),
        ("released", lambda s: f"{100 * s.released_at_wait:.0f}%"),
    ], summaries)  # fmt: skip


def versions() -> dict[str, str]:
    """This package's version, the torch it was built with and runs with."""
    import torch

    import tcpstore_barrier

    return {
        "tcpstore_barrier": tcpstore_barrier.__version__,
        "built_with_torch": tcpstore_barrier.built_with_torch,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def describe_run(config: BenchConfig, run_versions: dict[str, str]) -> str:
    """The lines above the table: what ran, with which torch, how."""
    v, timeout = run_versions, config.peer_timeout
    ranks = ("ranks as processes" if config.ranks == "processes"
             else f"ranks as threads of at most {config.processes} process(es)")  # fmt: skip
    legend = (f"per loop iteration (us), {config.work_us:g} us of Python work; saved: "
              "serial - split;\nreleased: split iterations whose round had released "
              "before wait()" if config.split_phase else
              "latency per barrier (us); ref: the C++ reference loop; a/b: ratio of "
              "medians;\nfloor: a store.add round trip from the last rank; rank0 "
              "floor: from rank 0")  # fmt: skip
    return (
        f"torch {v['torch']}, tcpstore_barrier {v['tcpstore_barrier']} (built with "
        f"torch {v['built_with_torch']}), Python {v['python']}\n"
        f"{ranks}, {config.iters} barriers x {config.rounds} rounds per contender, "
        f"{config.warmup} warm-up barriers per block; {os.cpu_count()} CPUs\n"
        f"store backend {config.backend} (torch's class: always libuv); ours' protocol "
        f"{config.protocol}; peer timeout "
        f"{f'{timeout:g} s' if isinstance(timeout, float) else timeout or 'default'}; "
        f"busy thread: {'yes' if config.busy_thread else 'no'}\n{legend}"
    )


# --- JSON and plot ------------------------------------------------------------


def summary_json(summary: WorldSummary | SplitSummary) -> dict[str, Any]:
    """A summary as the ``--json`` document has it: contenders by name."""
    if isinstance(summary, SplitSummary):
        return {**asdict(summary), "saved_us": summary.saved_us}
    return {
        "world_size": summary.world_size,
        **{c: asdict(lat) for c, lat in summary.latency.items()},
        "floor": asdict(summary.floor),
        "host_floor": asdict(summary.host_floor),
        **{f"{c}_cost": asdict(cost) for c, cost in summary.cost.items()},
        **{f"{a}_over_{b}".replace("-", "_"): summary.ratio(a, b) for a, b in RATIOS},
        "ours_over_floor": summary.latency["ours"].median_us / summary.floor.median_us,
    }


def build_document(config, run_versions, worlds) -> dict[str, Any]:
    """The ``--json`` document: configuration, versions, summaries, and every
    rank's raw figures of each block (ns), for any other statistic."""
    return {
        "config": asdict(config),  # tuples become JSON lists
        "versions": run_versions,
        "machine": {
            "cpu_count": os.cpu_count(),
            "allowed_cpus": sorted(os.sched_getaffinity(0)),
        },  # fmt: skip
        "worlds": [
            {
                "world_size": summary.world_size,
                "summary": summary_json(summary),
                "ranks": [
                    {k: v for k, v in asdict(r).items() if k != "blocks"}
                    for r in figures
                ],
                "blocks": [
                    {**asdict(b), "ranks": [asdict(r.blocks[b.index]) for r in figures]}
                    for b in plan
                ],  # fmt: skip
            }
            for summary, plan, figures in worlds
        ],
    }


def plot_latency(summaries: Sequence[WorldSummary], contenders: Sequence[str], path: str,
                 title: str) -> None:  # fmt: skip
    """A PNG of each contender's median (solid) and p99 (dashed) per barrier,
    and the store round trip, against world size; both axes logarithmic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s.world_size for s in summaries]
    figure, axes = plt.subplots(figsize=(8, 5))
    for i, c in enumerate(contenders):
        color = f"C{i}"
        axes.plot(sizes, [s.latency[c].median_us for s in summaries], "o-", color=color,
                  label=f"{c} median")  # fmt: skip
        axes.plot(sizes, [s.latency[c].p99_us for s in summaries], "--", color=color,
                  alpha=0.5, label=f"{c} p99")  # fmt: skip
    axes.plot(sizes, [s.floor.median_us for s in summaries], ":", color="grey",
              label="one store round trip")  # fmt: skip
    axes.set(xscale="log", yscale="log", xlabel="world size",
             ylabel="latency per barrier (us)", title=title)  # fmt: skip
    axes.set_xticks(sizes, [str(n) for n in sizes])
    axes.tick_params(axis="x", which="minor", labelbottom=False)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
