"""The ``bench`` command line, the option types every bench command shares,
and the configuration the options parse into."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from typing import Literal

#: What can run in one bench, each on its own store; DESCRIPTION says what.
CONTENDERS = (
    "ours", "native", "ours-noliveness", "reference", "torch", "tree", "native-tree",
)  # fmt: skip
#: The contenders that build a tree of stores; the others are flat.
TREE_CONTENDERS = ("tree", "native-tree")
DEFAULT_CONTENDERS = ("ours", "reference", "torch", "native")

DESCRIPTION = """\
Latency of one barrier round, N ranks on 127.0.0.1, rank 0 hosting each
contender's own TCPStore. Contenders (--contenders):
  ours             this package's TCPStoreBarrier (--protocol, --peer-timeout),
                   topology="flat"
  native           ours with protocol="native", topology="flat"
  ours-noliveness  ours with peer_timeout_secs=None, topology="flat"
  tree             ours with topology="tree": rank r on host "h{r // K}"
                   (--ranks-per-host K), groups of --fan-in hosts' leaders;
                   torch's keys at the root (--protocol), native below it
  native-tree      tree with protocol="native" at the root too
  reference        torch's three requests a round in a C++ loop, GIL released
  torch            torch's Python class (torch.distributed.checkpoint.
                   _experimental), which always uses the libuv TCPStore

Every rank times each execute_barrier() with time.perf_counter_ns; median and
p99 are over all ranks' samples. Contenders run in blocks of --iters barriers
(after --warmup untimed ones) in an order that rotates every round, so that
noise hits all alike: compare ratios within a run. Each round ends with
"floor": store.add round trips from the last rank and from rank 0. "Where the
time goes": CPU time of the root store's server thread (rank 0's store; in a
tree told apart from the other stores of rank 0's process by the port its
libuv loop listens on), of every store of the contender (each process's c10d
server threads that appeared while it was built: max and sum over stores),
of every rank process; and the root's requests per round, counted from the
protocol, not measured.

--split-phase instead times loop iterations of --work-us of Python work and a
barrier: "split" arrive(), work, wait(); "serial" work, execute_barrier();
"work" alone; "torch" work, torch's execute_barrier().
"""

EPILOG = """\
Examples:
  python -m tcpstore_barrier bench --world-size 2 4 8 --json out.json --plot out.png
  python -m tcpstore_barrier bench --ranks threads --processes 8 \\
      --world-size 16 64 256 1024 --iters 100 --rounds 1
"""


# The types keep their leading underscores: for text that does not parse at
# all argparse prints the function's name ("invalid _positive_int value").
def _positive_int(text: str) -> int:
    return _checked(int(text), int(text) >= 1, "must be at least 1")


def _non_negative_int(text: str) -> int:
    return _checked(int(text), int(text) >= 0, "must not be negative")


def _at_least_two(text: str) -> int:
    return _checked(int(text), int(text) >= 2, "must be at least 2")


def _non_negative_float(text: str) -> float:
    return _checked(float(text), float(text) >= 0, "must not be negative")


def _positive_seconds(text: str) -> float:
    return _checked(float(text), float(text) > 0, "must be a positive number")


def _checked(value, ok: bool, message: str):
    if not ok:
        raise argparse.ArgumentTypeError(f"{message}, got {value}")
    return value


def _seconds_or_off(text: str) -> float | Literal["off"]:
    return "off" if text == "off" else _positive_seconds(text)


def describe(parser: argparse.ArgumentParser, description: str, epilog="") -> None:
    """Help printed as written: our line breaks and lists are the layout."""
    parser.description, parser.epilog = description, epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


@dataclass(frozen=True)
class BenchConfig:
    """Everything one bench run is asked to do."""

    world_sizes: tuple[int, ...] = (4,)
    iters: int = 500
    rounds: int = 4
    warmup: int = 5
    ranks: Literal["processes", "threads"] = "processes"
    #: With ranks as threads: at most this many processes share the ranks.
    processes: int = 1
    busy_thread: bool = False
    backend: Literal["libuv", "legacy"] = "libuv"
    protocol: Literal["torch", "native"] = "torch"
    contenders: tuple[str, ...] = DEFAULT_CONTENDERS
    #: peer_timeout_secs for ours: None leaves the constructor's default.
    peer_timeout: float | Literal["off"] | None = None
    timeout_secs: float = 600.0
    json_path: str | None = None
    plot_path: str | None = None
    split_phase: bool = False
    work_us: float = 200.0
    #: Tree contenders: rank r's host is f"h{r // ranks_per_host}".
    ranks_per_host: int = 8
    #: Tree contenders' tree_fan_in; None leaves the constructor's default.
    fan_in: int | None = None


# One option a statement, so that the options read as a table.
# fmt: off
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options, description and epilog to ``parser``."""
    d = BenchConfig()
    describe(parser, DESCRIPTION, EPILOG)
    add = parser.add_argument
    add("--world-size", dest="world_sizes", type=_positive_int, nargs="+", metavar="N",
        default=list(d.world_sizes), help="world sizes, run one after the other (default: 4)")
    add("--iters", type=_positive_int, default=d.iters,
        help=f"timed barriers per block (default: {d.iters})")
    add("--rounds", type=_positive_int, default=d.rounds,
        help=f"rounds: blocks of each contender (default: {d.rounds})")
    add("--warmup", type=_non_negative_int, default=d.warmup,
        help=f"untimed barriers before each block (default: {d.warmup})")
    add("--contenders", nargs="+", choices=CONTENDERS, metavar="NAME",
        help=f"what to measure, of {', '.join(CONTENDERS)} (default: "
        f"{' '.join(DEFAULT_CONTENDERS)}; no native with --protocol native)")
    add("--no-torch", action="store_true", help="leave torch's class out")
    add("--ranks", choices=["processes", "threads"], default=d.ranks,
        help="a process per rank, or ranks as threads (own barriers each) of --processes K")
    add("--processes", type=_positive_int, metavar="K",
        help="with --ranks threads: at most K processes, contiguous ranks each (default: 1)")
    add("--busy-thread", action="store_true",
        help="a CPU-bound pure-Python thread in each rank process, as a data loader is")
    add("--peer-timeout", type=_seconds_or_off, metavar="SECS|off",
        help="peer_timeout_secs of ours, native; 'off' for None (default: the constructor's)")
    add("--ranks-per-host", type=_positive_int, metavar="K", default=d.ranks_per_host,
        help="tree contenders: rank r's host is 'h{r // K}', a simulated host "
        f"(default: {d.ranks_per_host})")
    add("--fan-in", type=_at_least_two, metavar="F",
        help="tree contenders' tree_fan_in (default: the constructor's)")
    add("--plot", dest="plot_path", metavar="FILE.png",
        help="plot latency against world size (needs matplotlib)")
    add_shared_arguments(parser, "write the configuration, versions and every raw sample here")
    add("--split-phase", action="store_true",
        help="time arrive(), work, wait() against work, execute_barrier() (see above)")
    add("--work-us", type=_non_negative_float, metavar="US", default=d.work_us,
        help="with --split-phase: Python work per iteration, in microseconds of "
        f"this machine, calibrated once (default: {d.work_us:g})")


def add_shared_arguments(parser: argparse.ArgumentParser, json_help: str) -> None:
    """The options of bench and bench-memory alike: ours' store and protocol,
    the deadline, the JSON document."""
    d = BenchConfig()
    add = parser.add_argument
    add("--backend", choices=["libuv", "legacy"], default=d.backend,
        help="TCPStore backend (use_checkpoint_barrier_tcpstore_libuv); torch's "
        "class always uses libuv (default: libuv)")
    add("--protocol", choices=["torch", "native"], default=d.protocol,
        help="key protocol of ours (default: torch)")
    add("--timeout", dest="timeout_secs", type=_positive_seconds, metavar="SECS",
        default=d.timeout_secs,
        help=f"give up, killing every process, after this long (default: {d.timeout_secs:g})")
    add("--json", dest="json_path", metavar="FILE", help=json_help)
# fmt: on


class ConfigError(ValueError):
    """Options that parse one by one but do not go together."""


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed options; ConfigError if they clash."""
    if args.processes is not None and args.ranks != "threads":
        raise ConfigError("--processes needs --ranks threads")
    if args.split_phase and args.plot_path is not None:
        raise ConfigError("--plot does not apply to --split-phase")
    if args.plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'tcpstore-barrier[plot]'"
        )
    # By default no native where ours is native already; --no-torch always.
    left_out = {"torch"} if args.no_torch else set()
    if args.contenders is None and args.protocol == "native":
        left_out.add("native")
    chosen = args.contenders or DEFAULT_CONTENDERS
    contenders = tuple(dict.fromkeys(c for c in chosen if c not in left_out))
    if "ours" not in contenders:
        raise ConfigError("--contenders must include ours")
    known = BenchConfig.__dataclass_fields__
    fields = {k: v for k, v in vars(args).items() if k in known}
    fields |= {"world_sizes": tuple(args.world_sizes), "processes": args.processes or 1}
    return BenchConfig(**fields | {"contenders": contenders})
