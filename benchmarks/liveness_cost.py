"""What peer liveness costs, measured with the installed package.

1. N ranks (threads spread over P processes; rank 0 hosts the libuv store),
   liveness on (peer_timeout_secs=5.0) and off (None): the store's requests
   and its server thread's CPU (rank 0's process, schedstat) over a window
   (a) idle, every rank constructed, no barrier running; (b) in a slow round,
   every rank but the last waiting in execute_barrier() while it sleeps.
   Heartbeats are counted from the store: the increase of `{prefix}/alive/{r}`.
2. One barrier object idle (world size 1, rank 0 hosts its store): its
   process's CPU, on vs off.
3. The bench's latency, contenders ours and ours-noliveness.

With ``--tree K F`` part 1 runs a tree of stores instead (rank r on host
``h{r // K}``, fan-in F): heartbeats go to every store a rank meets, so they
are not counted, and the server CPU is every store's, in every process. In a
slow round it includes the leaders' engines' diagnosis (docs/trees.md), the
reason to measure it.

    python benchmarks/liveness_cost.py [--ranks 1024] [--processes 8] [--window 12]
    python benchmarks/liveness_cost.py --ranks 64 --processes 1 --tree 1 2 --skip object bench
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import threading
import time

from tcpstore_barrier import TCPStoreBarrier
from tcpstore_barrier._bench.launch import LOOPBACK, pick_free_ports
from tcpstore_barrier._bench.rank import (
    raise_fd_limit,
    rank_groups,
    server_threads,
    thread_cpu_ns,
)

PREFIX = "lc"


def make(
    rank: int, world: int, port: int, peer_timeout: float | None, tree=None
) -> TCPStoreBarrier:
    shape = {}
    if tree:
        ranks_per_host, fan_in = tree
        shape = {"topology": "tree", "host": f"h{rank // ranks_per_host}",
                 "tree_fan_in": fan_in}  # fmt: skip
    return TCPStoreBarrier(rank, world, PREFIX, 300.0, True, port, LOOPBACK, 300.0,
                           peer_timeout_secs=peer_timeout, **shape)  # fmt: skip


def window(secs: float, store=None, world: int = 0) -> dict:
    """This process's CPU, its store server's CPU, and the heartbeats (given
    the store) over ``secs`` from now; CPU in % of one CPU, per second."""
    keys = [f"{PREFIX}/alive/{r}" for r in range(world)]
    beats = lambda: sum(int(v) for v in store.multi_get(keys)) if store else 0  # noqa: E731
    servers, hb = server_threads(), beats()
    cpu, srv, t = time.process_time_ns(), thread_cpu_ns(servers), time.monotonic()
    time.sleep(secs)
    t = time.monotonic() - t
    cpu, srv = time.process_time_ns() - cpu, thread_cpu_ns(servers) - srv
    return {"cpu_pct": cpu / t / 1e7, "srv_pct": srv / t / 1e7,
            "heartbeats_per_s": (beats() - hb) / t}  # fmt: skip


def ranks_process(ranks, world, port, peer_timeout, idle, slow, tree, results) -> None:
    """Ranks ``ranks`` as threads, and a thread that measures this process
    over the two windows: idle, then the slow round, whose last rank sleeps."""
    raise_fd_limit()
    threading.stack_size(2 * 1024 * 1024)
    barriers: dict[int, TCPStoreBarrier] = {}
    figures: dict[str, dict] = {}
    all_up = threading.Event()

    def rank_main(rank: int) -> None:
        barriers[rank] = b = make(rank, world, port, peer_timeout, tree)
        b.execute_barrier()  # every rank is up
        all_up.set()
        time.sleep(idle + (slow if rank == world - 1 else 0))
        b.execute_barrier()

    def measure() -> None:
        all_up.wait()
        store = barriers[0].store if 0 in ranks and not tree else None
        time.sleep(1)
        figures["idle"] = window(idle - 2, store, world)
        time.sleep(2)  # every rank but the last enters the slow round
        figures["slow"] = window(slow - 3, store, world)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in ranks]
    threads.append(threading.Thread(target=measure))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((ranks[0], figures))
    for r in sorted(barriers, reverse=True):  # rank 0's close() waits for the others
        barriers[r].close()


def at_scale(
    world: int, processes: int, peer_timeout, idle: float, slow: float, tree=None
) -> dict:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tcpstore_barrier"])
    results, (port,) = context.Queue(), pick_free_ports(1)
    procs = [context.Process(target=ranks_process, daemon=True,
                             args=(g, world, port, peer_timeout, idle, slow, tree, results))
             for g in rank_groups(world, processes)]  # fmt: skip
    started = time.monotonic()
    for p in procs:
        p.start()
    try:
        by_first = dict(results.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=120)
            p.kill()
    print(
        f"  ({time.monotonic() - started:.0f} s with construction and close)",
        file=sys.stderr,
    )
    out = by_first[0]
    for phase in ("idle", "slow"):
        for key in ("cpu_pct", "srv_pct"):
            out[phase][f"all_{key}"] = sum(f[phase][key] for f in by_first.values())
    return out


def one_object(peer_timeout, secs: float) -> dict:
    (port,) = pick_free_ports(1)
    barrier = make(0, 1, port, peer_timeout)
    barrier.execute_barrier()
    time.sleep(1)
    figures = window(secs)
    barrier.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--window", type=float, default=12.0, help="seconds per phase")
    parser.add_argument("--object-secs", type=float, default=20.0)
    parser.add_argument("--tree", type=int, nargs=2, metavar=("K", "F"),
                        help="part 1 as a tree: K ranks a host, fan-in F")  # fmt: skip
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["scale", "object", "bench"]
    )
    args = parser.parse_args()
    modes = {"on": 5.0, "off": None}
    if "scale" not in args.skip:
        shape = (f"a tree, {args.tree[0]} ranks a host, fan-in {args.tree[1]}"
                 if args.tree else "libuv store on rank 0")  # fmt: skip
        print(f"1. {args.ranks} ranks as threads of {args.processes} processes, "
              f"{shape}; per second over ~{args.window - 2:g} s windows")  # fmt: skip
        print(f"{'liveness':>8}  {'phase':>5}  {'heartbeats/s':>12}  {'server CPU %':>12}  "
              f"{'all processes CPU %':>19}")  # fmt: skip
        rows = {m: at_scale(args.ranks, args.processes, t, args.window + 2,
                            args.window + 3, args.tree)
                for m, t in modes.items()}  # fmt: skip
        for phase in ("idle", "slow"):
            for m, f in rows.items():
                f = f[phase]
                beats = "-" if args.tree else f"{f['heartbeats_per_s']:.0f}"
                print(f"{m:>8}  {phase:>5}  {beats:>12}  "
                      f"{f['all_srv_pct']:12.2f}  {f['all_cpu_pct']:19.1f}")  # fmt: skip
        for phase in ("idle", "slow"):
            extra = rows["on"][phase]["all_srv_pct"] - rows["off"][phase]["all_srv_pct"]
            print(
                f"liveness's share of the server threads, {phase}: {extra:+.2f}% of a CPU"
            )
        if args.tree:
            # Liveness off: nothing but the engines' diagnosis works in a slow round.
            off = rows["off"]
            print("the diagnosis's share of the server threads (liveness off, slow less "
                  f"idle): {off['slow']['all_srv_pct'] - off['idle']['all_srv_pct']:+.2f}% "
                  "of a CPU")  # fmt: skip
    if "object" not in args.skip:
        print(f"\n2. one barrier object idle (world size 1, hosts its store), "
              f"{args.object_secs:g} s; its process's CPU")  # fmt: skip
        for m, t in modes.items():
            f = one_object(t, args.object_secs)
            print(f"  liveness {m:>3}: {f['cpu_pct']:.3f}% of a CPU = "
                  f"{f['cpu_pct'] * 1e4:.0f} us/s (server thread {f['srv_pct'] * 1e4:.0f} us/s)")  # fmt: skip
    if "bench" not in args.skip:
        print("\n3. python -m tcpstore_barrier bench --contenders ours ours-noliveness "
              "--world-size 2 4 8", flush=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "tcpstore_barrier", "bench", "--contenders",
                        "ours", "ours-noliveness", "--world-size", "2", "4", "8"], check=True)  # fmt: skip


if __name__ == "__main__":
    main()
