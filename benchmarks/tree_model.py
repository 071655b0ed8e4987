"""A round's critical path in a tree of stores, and in the flat barrier, from
measured parts; checked against real runs, extrapolated to 100,000 ranks.

    python benchmarks/tree_model.py --parts members.json --runs scale.json \\
        [--plot benchmarks/scale.png]

Parts, from a bench run of flat ``ours`` and ``native`` at small world sizes
(``--parts``, e.g. ``--ranks threads --processes 8 --world-size 2 4 8 16 32
64 128 --contenders ours native``):

- ``rtt``: one loopback store round trip, the median of the runs' "floor";
- ``server``: a store's server CPU per round against its members, as
  measured (native: one BARRIER per member; torch's keys: three requests per
  member), linear between the points, and beyond the largest its cost per
  member times the members;
- ``client_fixed``, ``client_per_request``: a rank's own CPU per round
  (all rank processes' CPU less the server's, per rank), a call's fixed part
  and a part per request, fitted on the two protocols.

A round at a store with m members takes its round trips plus the server's
CPU for the round (the server serializes the requests; the last arrival's
reply, or the release, comes after all of them): native, one round trip;
torch's keys, two (the add's reply, then the set that releases). A tree (m
ranks a host, fan-in F) runs a relay round at each store below the root
(tree.h): on the way up, the last member's `in` reaches the leader's
worker, which waits for all of them (a round trip), and climbs; on the way
down, the worker's set of `out` reaches the members (one more): two round
trips a store, ceil(log_F(hosts)) of them on the path
(the host store and the group levels), and a flat round at the root, whose
T <= F members are the top leaders. A relay round's server CPU is two
requests a member (its `in` and its wait) where torch's keys take three:
2/3 of the measured torch's-keys cost. That is the critical path on a
cluster, every store on its own host's CPUs ("cluster"). On the bench's
machine all stores and ranks share its CPUs: a round takes at least their
total CPU work divided by the CPUs ("machine"), which is what the real runs
are checked against. No torch needed: it reads the bench's JSON only.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from statistics import median

RANKS_PER_HOST = 8
#: The constructor's tree_fan_in, which a run without --fan-in used.
DEFAULT_FAN_IN = 8


@dataclass(frozen=True)
class Parts:
    rtt: float
    #: A store's measured server CPU per round against its members, as
    #: (members, us) points, for each protocol ("native", "torch").
    server: dict[str, list[tuple[int, float]]]
    client_fixed: float
    client_per_request: float
    cpus: int


@dataclass(frozen=True)
class Tree:
    """The shape of a tree: its stores' member counts, level by level."""

    hosts: int
    #: Member counts of the stores on the critical path, bottom up, root last.
    path: list[int]
    #: The top leaders, who meet at the root; the member counts of every
    #: store below it.
    root_members: int
    stores_below: list[int]


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares line through (xs, ys): (intercept, slope)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def load_worlds(paths: list[str]) -> list[dict]:
    worlds = []
    for path in paths:
        with open(path) as f:
            document = json.load(f)
        worlds += [
            w["summary"] | {"_config": document["config"]} for w in document["worlds"]
        ]
    return worlds


def measure_parts(worlds: list[dict]) -> Parts:
    """The parts, from flat ours (torch's keys) and native worlds."""
    rtt = median(w["floor"]["median_us"] for w in worlds)
    server: dict[str, list[tuple[int, float]]] = {}
    clients: list[tuple[int, float]] = []
    for name, protocol, per_member in (("native", "native", 1), ("ours", "torch", 3)):
        rows = sorted((w for w in worlds if w.get(name)), key=lambda w: w["world_size"])
        server[protocol] = [
            (w["world_size"], w[f"{name}_cost"]["server_us"]) for w in rows
        ]
        clients += [
            (per_member, (w[f"{name}_cost"]["total_us"] - w[f"{name}_cost"]["server_us"])
             / w["world_size"])
            for w in rows if w["world_size"] >= 8
        ]  # fmt: skip
    # A rank's CPU per round = fixed + per_request x its requests (1 or 3).
    fixed, per_request = slope([x for x, _ in clients], [y for _, y in clients])
    return Parts(rtt, server, fixed, per_request, 2)


def plan(world_size: int, ranks_per_host: int, fan_in: int) -> Tree:
    """planTree (csrc/src/tree_plan.cpp) for contiguous hosts of equal size."""
    hosts = math.ceil(world_size / ranks_per_host)
    path = [min(ranks_per_host, world_size)] if ranks_per_host > 1 else []
    stores = [ranks_per_host] * (world_size // ranks_per_host)
    if world_size % ranks_per_host > 1:
        stores.append(world_size % ranks_per_host)
    stores = [m for m in stores if m > 1]
    nodes = hosts
    while nodes > fan_in:
        groups, last = divmod(nodes, fan_in)
        stores += [fan_in] * groups + ([last] if last > 1 else [])
        path.append(fan_in)
        nodes = groups + (1 if last else 0)
    return Tree(hosts, path, nodes, stores)


def server_us(parts: Parts, members: int, native: bool) -> float:
    """A store's server CPU for one round of ``members`` arrivers: the
    measured points, linearly between them; beyond the largest, its cost per
    member times the members."""
    points = parts.server["native" if native else "torch"]
    if members >= points[-1][0]:
        return points[-1][1] * members / points[-1][0]
    for (m0, s0), (m1, s1) in zip(points, points[1:], strict=False):
        if members <= m1:
            return s0 + (s1 - s0) * (max(members, m0) - m0) / (m1 - m0)
    raise AssertionError("unreachable")


def round_us(parts: Parts, members: int, native: bool) -> float:
    """One round at a store with ``members`` arrivers, on a dedicated CPU:
    the round trips, then the server's work, serialized."""
    return (1 if native else 2) * parts.rtt + server_us(parts, members, native)


#: A relay round's round trips on the critical path, and its requests a
#: member (see the module's docstring).
RELAY_TRIPS = 2
RELAY_REQUESTS = 2


def relay_server_us(parts: Parts, members: int) -> float:
    return server_us(parts, members, False) * RELAY_REQUESTS / 3


def relay_round_us(parts: Parts, members: int) -> float:
    """A relay round at a store below the root: up and back down."""
    return RELAY_TRIPS * parts.rtt + relay_server_us(parts, members)


@dataclass(frozen=True)
class Prediction:
    cluster_us: float
    machine_us: float
    root_requests: int
    root_server_us: float
    all_server_us: float
    all_requests: int


def predict(
    parts: Parts, world_size: int, topology: str, native: bool,
    ranks_per_host: int = RANKS_PER_HOST, fan_in: int = DEFAULT_FAN_IN,
) -> Prediction:  # fmt: skip
    """A round's latency on a cluster and on the bench's machine, and the
    root's requests and server CPU per round."""
    if topology == "flat":
        root_requests = world_size if native else 3 * world_size
        cluster = round_us(parts, world_size, native)
        root_server = server_us(parts, world_size, native)
        all_requests, below_server = root_requests, 0.0
        rank_requests = 1 if native else 3
    else:
        tree = plan(world_size, ranks_per_host, fan_in)
        root_requests = tree.root_members if native else 3 * tree.root_members
        cluster = sum(relay_round_us(parts, m) for m in tree.path)
        cluster += round_us(parts, tree.root_members, native)
        root_server = server_us(parts, tree.root_members, native)
        # Each member's barrier and wait, the leader's `out`, and (at a host
        # store) its worker's barrier besides its caller's.
        below = sum(RELAY_REQUESTS * m + 2 for m in tree.stores_below)
        all_requests = root_requests + below
        below_server = sum(relay_server_us(parts, m) for m in tree.stores_below)
        rank_requests = all_requests / world_size
    client = world_size * (
        parts.client_fixed + parts.client_per_request * rank_requests
    )
    machine = max(cluster, (root_server + below_server + client) / parts.cpus)
    return Prediction(
        cluster, machine, root_requests, root_server, root_server + below_server,
        all_requests,
    )  # fmt: skip


CONTENDERS = {
    "ours": ("flat", False),
    "native": ("flat", True),
    "tree": ("tree", False),
    "native-tree": ("tree", True),
}


def fan_in_of(world: dict) -> int:
    return world["_config"].get("fan_in") or DEFAULT_FAN_IN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        required=True,
        metavar="JSON",
        help="bench JSON of flat ours and native at small sizes",
    )
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[],
        metavar="JSON",
        help="bench JSON of real runs to check the model against",
    )
    parser.add_argument("--fan-in", type=int, default=DEFAULT_FAN_IN)
    parser.add_argument("--plot", metavar="PNG")
    args = parser.parse_args()
    parts = measure_parts(load_worlds(args.parts))
    print(
        f"parts: rtt {parts.rtt:.1f} us; a rank's CPU per round "
        f"{parts.client_fixed:.1f} + {parts.client_per_request:.1f} us a request; "
        f"{parts.cpus} CPUs; a store's server CPU per round (us) by members:"
    )
    for protocol, points in parts.server.items():
        print(f"  {protocol:<7}" + "".join(f" {m}: {us:.0f}" for m, us in points))
    print()

    print("check against real runs (us per round; latency medians); model/real")
    print(f"{'world':>6} {'contender':<12} {'real':>8} {'machine':>8} {'ratio':>6} "
          f"{'cluster':>8} {'root srv':>8} {'model':>8} {'ratio':>6} "
          f"{'all srv':>8} {'model':>8} {'ratio':>6}")  # fmt: skip
    checks = []
    for world in load_worlds(args.runs):
        for name, (topology, native) in CONTENDERS.items():
            if not world.get(name):
                continue
            real, cost = world[name]["median_us"], world[f"{name}_cost"]
            p = predict(parts, world["world_size"], topology, native,
                        world["_config"].get("ranks_per_host", 8), fan_in_of(world))  # fmt: skip
            checks.append((world["world_size"], name, real, p))
            root, every = cost["server_us"], cost["stores_sum_us"]
            print(f"{world['world_size']:>6} {name:<12} {real:>8.0f} {p.machine_us:>8.0f} "
                  f"{p.machine_us / real:>5.2f}x {p.cluster_us:>8.0f} {root:>8.0f} "
                  f"{p.root_server_us:>8.0f} {p.root_server_us / root:>5.2f}x "
                  f"{every:>8.0f} {p.all_server_us:>8.0f} {p.all_server_us / every:>5.2f}x")  # fmt: skip

    print(
        f"\npredictions, {RANKS_PER_HOST} ranks a host, fan-in {args.fan_in} "
        "(cluster: every store on its own host)"
    )
    print(f"{'world':>7} {'contender':<12} {'cluster':>11} {'root req':>9} "
          f"{'root srv':>10} {'all req':>9}")  # fmt: skip
    for n in (1024, 4096, 10_000, 100_000):
        for name, (topology, native) in CONTENDERS.items():
            p = predict(parts, n, topology, native, fan_in=args.fan_in)
            print(f"{n:>7} {name:<12} {p.cluster_us / 1000:>8.2f} ms {p.root_requests:>9} "
                  f"{p.root_server_us / 1000:>7.3f} ms {p.all_requests:>9}")  # fmt: skip

    print("\nfan-in: tree's cluster latency (ms) by fan-in, torch's keys at the root")
    fan_ins = (4, 8, 16, 32, 64)
    print(f"{'world':>7} " + " ".join(f"{'F=' + str(f):>8}" for f in fan_ins))
    for n in (1024, 10_000, 100_000):
        cells = [
            predict(parts, n, "tree", False, fan_in=f).cluster_us / 1000
            for f in fan_ins
        ]
        print(f"{n:>7} " + " ".join(f"{c:>8.2f}" for c in cells))

    if args.plot:
        plot(parts, checks, args.fan_in, args.plot, load_worlds(args.runs))


def plot(parts: Parts, checks, fan_in: int, path: str, worlds: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    styles = {
        "ours": "C0",
        "tree": "C1",
        "torch": "C3",
        "native": "C2",
        "native-tree": "C4",
    }
    labels = {"ours": "flat (ours)", "tree": "tree", "torch": "torch's class",
              "native": "flat native", "native-tree": "native tree"}  # fmt: skip
    for name, color in styles.items():
        points = sorted((w["world_size"], w[name]["median_us"] / 1000)
                        for w in worlds if w.get(name))  # fmt: skip
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, "o-", color=color, label=f"{labels[name]}, measured")
    sizes = [2**k for k in range(6, 17)] + [100_000]
    for name, color in (("ours", "C0"), ("tree", "C1")):
        topology, native = CONTENDERS[name]
        ys = [predict(parts, n, topology, native, fan_in=fan_in).cluster_us / 1000
              for n in sizes]  # fmt: skip
        axes.plot(
            sizes, ys, "--", color=color, label=f"{labels[name]}, model (cluster)"
        )
        measured = sorted({w["world_size"] for w in worlds if w.get(name)})
        ys = [predict(parts, n, topology, native, fan_in=fan_in).machine_us / 1000
              for n in measured]  # fmt: skip
        axes.plot(measured, ys, ":", color=color, marker="x",
                  label=f"{labels[name]}, model (this machine)")  # fmt: skip
    axes.set(xscale="log", yscale="log", xlabel="world size (8 ranks a host)",
             ylabel="latency per barrier, median (ms)",
             title=f"flat against tree (fan-in {fan_in}); model to 100k ranks")  # fmt: skip
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
