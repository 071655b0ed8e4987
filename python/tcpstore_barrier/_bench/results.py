"""The schedule; the ranks' figures to summaries, tables, JSON and plot."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import fmean, median, quantiles
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cli import BenchConfig
    from .rank import BlockFigures, RankFigures

#: The ratios of medians the table shows, when both contenders ran.
RATIOS = [
    ("ours", "reference"),
    ("torch", "ours"),
    ("ours", "ours-noliveness"),
    ("torch", "native"),
]
SHORT = {"reference": "ref", "ours-noliveness": "nolive"}
SPLIT_KINDS = ("split", "serial", "torch_serial")


@dataclass(frozen=True)
class Block:
    """``iters`` timed operations of one kind: a contender's barriers, "floor"
    store round trips, or a --split-phase kind of loop iteration."""

    index: int
    round: int
    kind: str


def schedule(
    kinds: Sequence[str], rounds: int, first: str = "", last: str = ""
) -> list[Block]:
    """``rounds`` rounds of a block of each of ``kinds``, between ``first`` and
    ``last`` if given. The order rotates each round, so that a drift over the
    run (a CPU warming up, a store growing) favours no kind."""
    blocks: list[Block] = []
    for r in range(rounds):
        shift = r % len(kinds)
        for kind in filter(None, [first, *kinds[shift:], *kinds[:shift], last]):
            blocks.append(Block(len(blocks), r, kind))
    return blocks


@dataclass(frozen=True)
class World:
    """One world size's schedule and every rank's figures, rank order."""

    size: int
    plan: Sequence[Block]
    figures: Sequence[RankFigures]
    iters: int

    def blocks(self, kind: str, ranks: slice = slice(None)) -> list[BlockFigures]:
        """The figures of ``kind``'s blocks, block by block, rank by rank."""
        chosen = self.figures[ranks]
        return [r.blocks[b.index] for b in self.plan if b.kind == kind for r in chosen]

    def latency(self, kind: str, ranks: slice = slice(None)) -> dict[str, Any] | None:
        """Microseconds per operation of ``kind``'s blocks over every sample of
        ``ranks``, and a block's mean wall time per iteration; None if none ran."""
        blocks = self.blocks(kind, ranks)
        if not (us := [ns / 1000 for block in blocks for ns in block.samples_ns]):
            return None
        # "inclusive" interpolates as numpy.percentile does by default.
        p99 = quantiles(us, n=100, method="inclusive")[98] if us[1:] else us[0]
        wall = fmean(b.wall_ns for b in blocks) / self.iters / 1000
        return {
            "samples": len(us),
            "median_us": median(us),
            "p99_us": p99,
            "wall_per_iter_us": wall,
        }

    def cpu_cost(self, kind: str) -> dict[str, float | int | None] | None:
        """CPU us per barrier, means over blocks: the root store's server
        thread, the most loaded and the sum of all the contender's stores,
        and all rank processes (servers included), summing a block's readings."""
        blocks, ranks = self.blocks(kind), self.size
        groups = [blocks[i : i + ranks] for i in range(0, len(blocks), ranks)]
        server = [b[0].server_cpu_ns for b in groups if b[0].server_cpu_ns is not None]
        total = [
            sum(r.process_cpu_ns or 0 for r in b)
            for b in groups
            if any(r.process_cpu_ns is not None for r in b)
        ]
        stores = [[ns for r in b for ns in r.stores_cpu_ns or []] for b in groups]
        stores = [s for s in stores if s]
        if not server and not total:
            return None
        mean = lambda ns: fmean(ns) / self.iters / 1000 if ns else None  # noqa: E731
        return {
            "server_us": mean(server),
            "stores_max_us": mean([max(s) for s in stores]),
            "stores_sum_us": mean([sum(s) for s in stores]),
            "stores": len(stores[0]) if stores else None,
            "total_us": mean(total),
        }


def tree_root_members(world_size: int, ranks_per_host: int, fan_in: int) -> int:
    """How many top leaders meet at a tree's root: hosts' leaders gathered
    in groups of at most ``fan_in`` until at most ``fan_in`` are left, as
    ``planTree`` (csrc/src/tree_plan.cpp) does with contiguous hosts."""
    nodes = -(-world_size // ranks_per_host)
    while nodes > fan_in:
        nodes = -(-nodes // fan_in)
    return nodes


def tree_stores(world_size: int, ranks_per_host: int, fan_in: int) -> list[int]:
    """The member counts of a tree's stores below the root."""
    hosts, members = divmod(world_size, ranks_per_host)
    sizes = [ranks_per_host] * hosts + ([members] if members else [])
    stores = [m for m in sizes if m > 1]
    nodes = len(sizes)
    while nodes > fan_in:
        groups, last = divmod(nodes, fan_in)
        stores += [fan_in] * groups + ([last] if last > 1 else [])
        nodes = groups + (1 if last else 0)
    return stores


def relay_requests(world_size: int, ranks_per_host: int, fan_in: int) -> int:
    """Requests of a round at a tree's stores below the root: a member's `in`
    and its wait, the leader's `out`, and its worker's wait for the `in` keys;
    where the leader's own caller is not a member (above a store of hosts'
    ranks), its worker sets the leader's `in` too."""
    hosts, members = divmod(world_size, ranks_per_host)
    sizes = [ranks_per_host] * hosts + ([members] if members else [])
    bottom = [m for m in sizes if m > 1]
    requests = sum(2 * m + 2 for m in bottom)
    callers_meet_in_groups = not bottom
    nodes = len(sizes)
    while nodes > fan_in:
        groups, last = divmod(nodes, fan_in)
        level = [fan_in] * groups + ([last] if last > 1 else [])
        requests += sum(2 * m + (2 if callers_meet_in_groups else 1) for m in level)
        callers_meet_in_groups = False
        nodes = groups + (1 if last else 0)
    return requests


def requests_per_round(
    contender: str, world_size: int, protocol: str, ranks_per_host: int, fan_in: int
) -> dict[str, int]:
    """Requests a round costs the root store, and all stores, counted from
    the protocol (heartbeats aside): torch's keys are a rank key and an add
    per arriver, a wait per arriver but the last, whose set releases (torch's
    class also waits after its set); the native protocol one BARRIER per
    arriver. A tree's arrivers at the root are its top leaders; each store
    below runs a relay round (relay_requests)."""
    native = contender in ("native", "native-tree") or (
        contender in ("ours", "ours-noliveness", "tree") and protocol == "native"
    )
    arrivers = world_size
    below = 0
    if contender in ("tree", "native-tree"):
        arrivers = tree_root_members(world_size, ranks_per_host, fan_in)
        below = relay_requests(world_size, ranks_per_host, fan_in)
    root = arrivers if native else 3 * arrivers + (contender == "torch")
    return {"root": root, "all": root + below}


#: One world size as the bench reports it: its summary, and what it is made of.
Run = tuple[dict[str, Any], World]


def ratio_key(numerator: str, denominator: str) -> str:
    return f"{numerator}_over_{denominator}".replace("-", "_")


def summarize_world(
    world: World, contenders: Sequence[str], config: BenchConfig, fan_in: int
) -> dict[str, Any]:
    """One world size as the tables and the JSON have it: each contender's
    latency, the round trips to ours' store from the last rank (a peer,
    "floor") and from rank 0, each contender's CPU cost and requests per
    round (counted), its tree's levels, ratios of medians."""
    summary: dict[str, Any] = {"world_size": world.size}
    summary |= {c: world.latency(c) for c in contenders}
    summary["floor"] = world.latency("floor", slice(-1, None))
    summary["host_floor"] = world.latency("floor", slice(0, 1))
    rank0 = world.figures[0]
    for c in contenders:
        if cost := world.cpu_cost(c):
            cost["root_by_port"] = rank0.root_by_port.get(c)
            summary[f"{c}_cost"] = cost
        summary[f"{c}_requests"] = requests_per_round(
            c, world.size, config.protocol, config.ranks_per_host, fan_in
        )
        summary[f"{c}_levels"] = rank0.levels.get(c, 1)
    medians = {c: summary[c]["median_us"] for c in (*contenders, "floor")}
    for a, b in RATIOS:
        both = {a, b} <= medians.keys()
        summary[ratio_key(a, b)] = medians[a] / medians[b] if both else None
    summary["ours_over_floor"] = medians["ours"] / medians["floor"]
    return summary


def summarize_split(world: World) -> dict[str, Any]:
    """One world size of --split-phase, per loop iteration in us: each kind of
    block, the share of split iterations released before wait(), the medians of
    arrive() and wait() alone, and what splitting saves (median serial - split)."""
    split = world.blocks("split")

    def median_us(field: str) -> float:
        return median(ns / 1000 for b in split for ns in getattr(b, field))

    summary: dict[str, Any] = {"world_size": world.size}
    summary |= {kind: world.latency(kind) for kind in ("work", *SPLIT_KINDS)}
    released = sum(b.released_at_wait or 0 for b in split)
    summary["released_at_wait"] = released / (len(split) * world.iters)
    summary["arrive_median_us"] = median_us("arrive_ns")
    summary["wait_median_us"] = median_us("wait_ns")
    summary["saved_us"] = summary["serial"]["median_us"] - summary["split"]["median_us"]
    return summary


# --- text --------------------------------------------------------------------
def us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def align(rows: Sequence[Sequence[str]], label_left: bool = False) -> str:
    """``rows`` as a text table, right-aligned but ``label_left`` for column 0."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            text.ljust(w) if label_left and c == 0 else text.rjust(w)
            for c, (text, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def format_table(summaries: Sequence[dict], contenders: Sequence[str]) -> str:
    """One row per world size: each contender's median and p99, the ratios,
    the floor; then where the time goes. In microseconds."""
    short = [SHORT.get(c, c) for c in contenders]
    ratios = [(a, b) for a, b in RATIOS if a in contenders and b in contenders]
    header = ["world", *(f"{n} {q}" for n in short for q in ("med", "p99"))]
    header += [f"{SHORT.get(a, a)}/{SHORT.get(b, b)}" for a, b in ratios]
    rows = [[*header, "floor med", "rank0 floor"]]
    cost_rows = [["world", "contender", "levels", "root srv/it", "stores", "max srv/it",
                  "sum srv/it", "cpu/it", "root req", "all req"]]  # fmt: skip
    for s in summaries:
        row = [str(s["world_size"])]
        for c in contenders:
            row += [us(s[c]["median_us"]), us(s[c]["p99_us"])]
        row += [f"{s[ratio_key(a, b)]:.2f}x" for a, b in ratios]
        row += [us(s["floor"]["median_us"]), us(s["host_floor"]["median_us"])]
        rows.append(row)
        for c in contenders:
            cost, requests = s.get(f"{c}_cost", {}), s[f"{c}_requests"]
            cells = [cost.get(k) for k in ("server_us", "stores", "stores_max_us",
                                           "stores_sum_us", "total_us")]  # fmt: skip
            cells[1] = None if cells[1] is None else str(cells[1])
            cost_rows.append([
                str(s["world_size"]), c, str(s[f"{c}_levels"]),
                *(cell if isinstance(cell, str) else us(cell) for cell in cells),
                str(requests["root"]), str(requests["all"]),
            ])  # fmt: skip
    if not any(k.endswith("_cost") for s in summaries for k in s):
        return align(rows)
    return (
        f"{align(rows)}\n\nwhere the time goes, per barrier (CPU us): root srv/it the "
        "root store's server thread\n(rank 0's store); stores: how many stores the "
        "contender has (its c10d server threads),\nmax and sum srv/it over them; "
        "cpu/it every rank process, servers included;\nroot req, all req: requests "
        "per round to the root, to all stores: counted from the\nprotocol, not "
        "measured (heartbeats aside)\n\n" + align(cost_rows, label_left=True)
    )


def format_split_table(summaries: Sequence[dict]) -> str:
    """One row per world size of --split-phase, per loop iteration (us)."""
    header = "world,work med,split med,split p99,serial med,serial p99,saved med,"
    rows = [(header + "arrive med,wait med,torch med,torch p99,released").split(",")]
    for s in summaries:
        work, split, serial = s["work"], s["split"], s["serial"]
        torch = s["torch_serial"] or {}
        cells = [work["median_us"], split["median_us"], split["p99_us"]]
        cells += [serial["median_us"], serial["p99_us"], s["saved_us"]]
        cells += [s["arrive_median_us"], s["wait_median_us"]]
        cells += [torch.get("median_us"), torch.get("p99_us")]
        released = f"{100 * s['released_at_wait']:.0f}%"
        rows.append([str(s["world_size"]), *map(us, cells), released])
    return align(rows)


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
def build_document(
    config: BenchConfig, run_versions: dict[str, str], worlds: Sequence[Run]
) -> dict[str, Any]:
    """The ``--json`` document: configuration, versions, summaries, and every
    rank's raw figures of each block (ns), for any other statistic."""
    return {
        "config": config,
        "versions": run_versions,
        "machine": {
            "cpu_count": os.cpu_count(),
            "allowed_cpus": sorted(os.sched_getaffinity(0)),
        },
        "worlds": [
            {
                "world_size": world.size,
                "summary": summary,
                "ranks": [
                    {k: v for k, v in asdict(r).items() if k != "blocks"}
                    for r in world.figures
                ],
                "blocks": [
                    {**asdict(b), "ranks": [r.blocks[b.index] for r in world.figures]}
                    for b in world.plan
                ],
            }
            for summary, world in worlds
        ],
    }


def plot_latency(
    summaries: Sequence[dict], contenders: Sequence[str], path: str, title: str
) -> None:
    """A PNG of each contender's median (solid) and p99 (dashed) per barrier,
    and the store round trip, against world size; both axes logarithmic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["world_size"] for s in summaries]
    figure, axes = plt.subplots(figsize=(8, 5))
    for i, c in enumerate(contenders):
        medians = [s[c]["median_us"] for s in summaries]
        p99 = [s[c]["p99_us"] for s in summaries]
        axes.plot(sizes, medians, "o-", color=f"C{i}", label=f"{c} median")
        axes.plot(sizes, p99, "--", color=f"C{i}", alpha=0.5, label=f"{c} p99")
    floor = [s["floor"]["median_us"] for s in summaries]
    axes.plot(sizes, floor, ":", color="grey", label="one store round trip")
    axes.set(xscale="log", yscale="log", xlabel="world size", title=title)
    axes.set_ylabel("latency per barrier (us)")
    axes.set_xticks(sizes, [str(n) for n in sizes])
    axes.tick_params(axis="x", which="minor", labelbottom=False)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
