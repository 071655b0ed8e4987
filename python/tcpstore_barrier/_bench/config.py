"""The ``bench`` command line and the configuration it parses into."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .argtypes import (
    _non_negative_float,
    _non_negative_int,
    _positive_int,
    _positive_seconds,
    describe,
)

DESCRIPTION = """\
Measure the latency of one barrier round of this package's TCPStoreBarrier
("ours") against torch's Python class
torch.distributed.checkpoint._experimental.barriers.TCPStoreBarrier ("torch"),
with N ranks on 127.0.0.1, rank 0 hosting each TCPStore.

What is measured, for each world size:
  - every rank times each execute_barrier() call with time.perf_counter_ns;
    the median and p99 are over all ranks' samples of all blocks. A rank's
    sample includes waiting for the slowest rank, so it is the barrier's
    latency as a trainer sees it;
  - wall/it: a block's wall time divided by its barriers (mean over ranks
    and blocks), i.e. the back-to-back throughput;
  - floor: the last rank's sequential store.add(key, 1) round trips from
    Python to ours' store, while the other ranks wait: a barrier cannot beat
    one round trip. "rank0 floor" is the same from rank 0, whose client
    shares a process (and, with --pin, a CPU) with the store's server.
Ours and torch's run in alternating blocks of --iters barriers (ours, torch,
floor, then torch, ours, floor, ...) in the same processes, each on its own
store, so that machine noise hits both alike. Each block starts with
--warmup untimed barriers, which also line the ranks up.

Where the time goes (the second table): rank 0 reads the CPU time of each
store's server thread (/proc/self/task/TID/schedstat) around every block,
and the first rank of each process its process's CPU time; per barrier, and
the server's per request, given the requests a round sends the store: 3N+1
for torch's class (N sets, N adds, the last arriver's set, N waits), 3N+2.25
for ours with --protocol torch (no wait for the last arriver; finished
rounds' deletes), N+1 with --protocol native (N server-side BARRIER
requests; deletes; rank keys are only written in rounds slower than 200 ms).

--ranks threads --processes K spreads the N rank threads over K processes
(contiguous ranks, rank 0 in the first): each thread has its own barrier
objects and store connections, so large worlds fit on a small machine.

--split-phase measures, instead, one loop iteration of a rank that does
--work-us of pure-Python work each barrier: "split" is arrive(), the work,
wait(); "serial" the work, then execute_barrier(); "work" the work alone;
"torch" torch's execute_barrier() after the work. Use it with --busy-thread
to see what overlapping the round with the work saves under GIL contention.
"""

EPILOG = """\
torch's class always uses the libuv TCPStore backend, whatever it is given;
--backend only changes ours (and the floor's store).
Examples:
  python -m tcpstore_barrier bench --world-size 2 4 8 --json out.json
  python -m tcpstore_barrier bench --ranks threads --processes 8 \\
      --world-size 16 64 256 1024 --iters 100 --rounds 1
  python -m tcpstore_barrier bench --split-phase --busy-thread --world-size 2
"""

RanksMode = Literal["processes", "threads"]
PinMode = Literal["spread", "same"]


@dataclass(frozen=True)
class BenchConfig:
    """Everything one bench run is asked to do."""

    world_sizes: tuple[int, ...] = (4,)
    iters: int = 500
    rounds: int = 4
    warmup: int = 5
    ranks: RanksMode = "processes"
    #: With ranks as threads: at most this many processes share the ranks.
    processes: int = 1
    busy_thread: bool = False
    backend: Literal["libuv", "legacy"] = "libuv"
    protocol: Literal["torch", "native"] = "torch"
    include_torch: bool = True
    pin: PinMode | None = None
    timeout_secs: float = 600.0
    json_path: str | None = None
    plot_path: str | None = None
    split_phase: bool = False
    work_us: float = 200.0

    @property
    def use_libuv(self) -> bool:
        """The use_checkpoint_barrier_tcpstore_libuv value ours is given."""
        return self.backend == "libuv"

    def processes_for(self, world_size: int) -> int:
        """How many processes run the ranks of ``world_size``."""
        if self.ranks == "processes":
            return world_size
        return min(self.processes, world_size)

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain JSON values."""
        return {**asdict(self), "world_sizes": list(self.world_sizes)}


# One option a statement, so that the options read as a table.
# fmt: off
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options, description and epilog to ``parser``."""
    defaults = BenchConfig()
    describe(parser, DESCRIPTION, EPILOG)
    add = parser.add_argument
    add("--world-size", type=_positive_int, nargs="+", metavar="N",
        default=list(defaults.world_sizes),
        help="one or more world sizes, run one after the other (default: 4)")
    add("--iters", type=_positive_int, default=defaults.iters,
        help=f"timed barriers per block (default: {defaults.iters})")
    add("--rounds", type=_positive_int, default=defaults.rounds,
        help=f"A/B rounds: blocks of each implementation (default: {defaults.rounds})")
    add("--warmup", type=_non_negative_int, default=defaults.warmup,
        help=f"untimed barriers before each block (default: {defaults.warmup})")
    add("--ranks", choices=["processes", "threads"], default=defaults.ranks,
        help="one process per rank, or every rank a thread of one process (or "
        "of --processes K), each with its own barriers and store clients "
        "(default: processes)")
    add("--processes", type=_positive_int, metavar="K",
        help="with --ranks threads: spread the rank threads over at most K "
        "processes, contiguous ranks each (default: 1)")
    add("--busy-thread", action="store_true",
        help="run a CPU-bound pure-Python thread in each rank process while "
        "measuring, as a trainer's data-loading threads do")
    add("--backend", choices=["libuv", "legacy"], default=defaults.backend,
        help="TCPStore backend of ours (use_checkpoint_barrier_tcpstore_libuv); "
        "torch's class always uses libuv (default: libuv)")
    add("--protocol", choices=["torch", "native"], default=defaults.protocol,
        help="key protocol of ours (default: torch)")
    add("--no-torch", dest="include_torch", action="store_false",
        help="measure ours and the floor only")
    add("--pin", nargs="?", const="spread", choices=["spread", "same"],
        help="pin ranks to CPUs with sched_setaffinity: 'spread' (the default "
        "when given bare) puts rank r on the r-th allowed CPU, round robin; "
        "'same' puts every rank on the first. Rank 0's store server threads "
        "share rank 0's CPU")
    add("--timeout", dest="timeout_secs", type=_positive_seconds, metavar="SECS",
        default=defaults.timeout_secs,
        help="give up, killing every rank, after this long in all "
        f"(default: {defaults.timeout_secs:g})")
    add("--json", dest="json_path", metavar="FILE",
        help="write the configuration, versions and every raw sample here")
    add("--plot", dest="plot_path", metavar="FILE.png",
        help="plot latency against world size (needs matplotlib)")
    add("--split-phase", action="store_true",
        help="measure arrive(), work, wait() against work, execute_barrier() "
        "per loop iteration (see above); best with --busy-thread")
    add("--work-us", type=_non_negative_float, metavar="US",
        default=defaults.work_us,
        help="with --split-phase: the pure-Python work per iteration, in "
        "microseconds of this machine, calibrated once "
        f"(default: {defaults.work_us:g})")
# fmt: on


class ConfigError(ValueError):
    """Options that parse one by one but do not go together."""


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` that parsed ``bench`` options describe.

    Raises :class:`ConfigError` for options that do not go together.
    """
    processes = getattr(args, "processes", None)
    if processes is not None and args.ranks != "threads":
        raise ConfigError("--processes needs --ranks threads")
    if args.split_phase and args.plot_path is not None:
        raise ConfigError("--plot does not apply to --split-phase")
    return BenchConfig(
        world_sizes=tuple(args.world_size),
        iters=args.iters,
        rounds=args.rounds,
        warmup=args.warmup,
        ranks=args.ranks,
        processes=1 if processes is None else processes,
        busy_thread=args.busy_thread,
        backend=args.backend,
        protocol=args.protocol,
        include_torch=args.include_torch,
        pin=args.pin,
        timeout_secs=args.timeout_secs,
        json_path=args.json_path,
        plot_path=args.plot_path,
        split_phase=args.split_phase,
        work_us=args.work_us,
    )


def cpu_for_rank(
    world_size: int, cpus: list[int], pin: PinMode | None
) -> list[int | None]:
    """The CPU each rank is pinned to, or None for every rank when unpinned."""
    if pin is None:
        return [None] * world_size
    if not cpus:
        raise ValueError("no CPU to pin to")
    ordered = sorted(cpus)
    if pin == "same":
        return [ordered[0]] * world_size
    return [ordered[r % len(ordered)] for r in range(world_size)]
