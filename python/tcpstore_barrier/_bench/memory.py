"""``bench-memory``: what a barrier costs in memory, and that it stays flat.

Two measurements, each in fresh forkserver processes (torch preloaded):

- objects: the resident memory of one barrier object. One process ("the
  measurer") constructs ``--objects`` barriers as ranks 1..N of one world of
  N+1 ranks whose rank 0 runs in another process ("the host"), which hosts
  the store. Every object is then a real joined rank with its own store
  connection, as in a trainer, without N ports or N servers; the host's
  server is kept out of the measurer's RSS, and the measurer reads the
  host's RSS at the same moments as its own. The per-object figures are
  slopes between a tenth of the objects and all of them, so that one-time
  costs (first connection, lazily loaded code) do not count: of RSS, and of
  the bytes malloc has handed out (glibc's mallinfo2), which sees small C++
  objects that RSS, page by page, may not. Ours is also measured after one
  round, which gives each object its watcher thread and second connection:
  all N arrive(), then all wait(), from one thread. Also counted: open file
  descriptors and threads per object.
- store: rank 0 (which hosts the store) of a world of 2 runs ``--barriers``
  barriers in a tight loop and samples its RSS and ``store.num_keys()``
  every ``--sample-every``; then torch's class the same for
  ``--torch-barriers``, whose keys grow by 2 a round.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import queue as queue_module
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .launch import BenchError, _context, pick_free_ports
from .rank import LOOPBACK, EventSink, raise_fd_limit

DESCRIPTION = __doc__.split("\n", 1)[1].strip() if __doc__ else ""

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_KIB = 1024
_MIB = 1024 * 1024
_POLL_SECS = 0.2


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of process ``pid`` (default: this one), from statm."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE_BYTES


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    function.argtypes = []
    return function


_mallinfo2 = _load_mallinfo2()


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not had back, over every arena
    (glibc's mallinfo2: uordblks + hblkhd), or None without glibc. C and
    C++ allocations and Python's large objects; not pymalloc's arenas."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    """Threads of this process."""
    return len(os.listdir("/proc/self/task"))


def _snapshot() -> dict[str, int]:
    gc.collect()
    return {
        "rss": rss_bytes(),
        "heap": heap_in_use(),
        "fds": open_fds(),
        "threads": thread_count(),
    }


@dataclass(frozen=True)
class MemoryConfig:
    """What one ``bench-memory`` run measures."""

    objects: int = 200
    barriers: int = 100_000
    sample_every: int = 10_000
    torch_barriers: int = 10_000
    torch_sample_every: int = 1_000
    include_torch: bool = True
    only: str | None = None
    backend: str = "libuv"
    protocol: str = "torch"
    timeout_secs: float = 600.0
    json_path: str | None = None

    @property
    def use_libuv(self) -> bool:
        return self.backend == "libuv"

    def implementations(self) -> list[str]:
        return ["ours", "torch"] if self.include_torch else ["ours"]


# --- what the processes do ----------------------------------------------------


def _barrier_class(implementation: str) -> Any:
    """The class of ``implementation``, imported: before a baseline reading,
    so that importing torch's checkpoint package does not count."""
    if implementation == "ours":
        from tcpstore_barrier import TCPStoreBarrier
    else:
        from torch.distributed.checkpoint._experimental.barriers import (
            TCPStoreBarrier,
        )
    return TCPStoreBarrier


def _make(
    implementation: str,
    rank: int,
    world_size: int,
    port: int,
    config: MemoryConfig,
    prefix: str,
) -> Any:
    cls = _barrier_class(implementation)
    if implementation == "ours":
        return cls(
            rank, world_size, prefix, min(60.0, config.timeout_secs),
            config.use_libuv, port, LOOPBACK, config.timeout_secs,
            protocol=config.protocol,
        )  # fmt: skip
    return cls(
        global_rank=rank,
        global_world_size=world_size,
        barrier_prefix=prefix,
        timeout_barrier_init_secs=int(min(60, config.timeout_secs)),
        use_checkpoint_barrier_tcpstore_libuv=config.use_libuv,
        tcpstore_port=port,
        master_address=LOOPBACK,
        timeout_secs=max(1, int(config.timeout_secs)),
    )


def _guarded(
    name: str, events: EventSink, body: Callable[[], dict[str, Any] | None]
) -> None:
    """Run ``body`` and report its figures (None: it reported them itself)."""
    try:
        figures = body()
        if figures is not None:
            events.put(("result", name, figures))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        events.put(("error", name, text))


def objects_host_main(
    implementation: str, port: int, config: MemoryConfig, events: EventSink, done: Any
) -> None:
    """Rank 0 of the objects measurement: hosts the store, reports its RSS.

    Reports as soon as it has its figures, then keeps serving the store
    until ``done`` is set (the measurer has reported).
    """

    def body() -> dict[str, Any]:
        raise_fd_limit(64 + 3 * (config.objects + 1))
        _barrier_class(implementation)
        before = _snapshot()
        barrier = _make(implementation, 0, config.objects + 1, port, config, "mem/")
        figures = {"before": before, "joined": _snapshot()}
        if implementation == "ours":
            barrier.execute_barrier()
            figures["after_round"] = _snapshot()
        events.put(("result", "host", figures))
        done.wait(config.timeout_secs)
        if implementation == "ours":
            barrier.close()
        return figures

    try:
        body()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        events.put(("error", "host", text))


def checkpoints(objects: int) -> list[int]:
    """After how many objects the measurer reads its RSS: 0, a tenth, half, all."""
    return sorted({0, max(1, objects // 10), max(1, objects // 2), objects})


def _host_rss(host_pid: int) -> int | None:
    try:
        return rss_bytes(host_pid)
    except OSError:
        return None


def objects_measurer_main(
    implementation: str,
    port: int,
    config: MemoryConfig,
    host_pid: int,
    events: EventSink,
) -> None:
    """Ranks 1..N of the objects measurement, constructed one by one.

    At each of :func:`checkpoints` it reads its own RSS, fds and threads,
    and the host's RSS (whose server has then accepted that many ranks).
    """

    def reading() -> dict[str, Any]:
        return {**_snapshot(), "host_rss": _host_rss(host_pid)}

    def body() -> dict[str, Any]:
        raise_fd_limit(64 + 3 * config.objects)
        _barrier_class(implementation)
        world_size = config.objects + 1
        barriers: list[Any] = []
        readings = {}
        marks = checkpoints(config.objects)
        readings[0] = reading()
        started = time.perf_counter()
        for rank in range(1, world_size):
            barriers.append(
                _make(implementation, rank, world_size, port, config, "mem/")
            )
            if len(barriers) in marks:
                readings[len(barriers)] = reading()
        figures: dict[str, Any] = {
            "constructed": readings,
            "construct_secs": time.perf_counter() - started,
        }
        if implementation == "ours":
            started = time.perf_counter()
            for barrier in barriers:
                barrier.arrive()
            for barrier in barriers:
                barrier.wait()
            figures["round_secs"] = time.perf_counter() - started
            figures["after_round"] = reading()
            for barrier in barriers:
                barrier.close()
        return figures

    _guarded("measurer", events, body)


def store_rank_main(
    implementation: str,
    rank: int,
    port: int,
    barriers: int,
    sample_every: int,
    config: MemoryConfig,
    events: EventSink,
    done: Any = None,
) -> None:
    """One of the 2 ranks of the store measurement; rank 0 samples.

    Rank 0 (given ``done``) keeps its store up until ``done`` is set, once
    rank 1 has reported: torch's class has no close() that waits for peers.
    """

    def body() -> dict[str, Any] | None:
        _barrier_class(implementation)
        barrier = _make(implementation, rank, 2, port, config, "flat/")
        store = barrier.store if implementation == "ours" else barrier._tcp_store
        samples = []
        start = time.perf_counter()

        def sample(count: int) -> None:
            if rank == 0:
                gc.collect()
                samples.append(
                    {
                        "barriers": count,
                        "rss": rss_bytes(),
                        "keys": store.num_keys(),
                        "secs": time.perf_counter() - start,
                    }
                )

        barrier.execute_barrier()
        sample(1)
        count = 1
        while count < barriers:
            step = min(sample_every - count % sample_every, barriers - count)
            for _ in range(step):
                barrier.execute_barrier()
            count += step
            if count % sample_every == 0 or count == barriers:
                sample(count)
        if implementation == "ours":
            barrier.close()
        elif done is not None:
            events.put(("result", f"rank{rank}", {"samples": samples}))
            done.wait(config.timeout_secs)
            return None
        return {"samples": samples}

    _guarded(f"rank{rank}", events, body)


# --- the parent -------------------------------------------------------------


def _collect(
    events: Any,
    expected: set[str],
    processes: Sequence[Any],
    deadline: float,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    gone_since: float | None = None
    while not expected <= set(results):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{sorted(expected - set(results))} overran --timeout")
        try:
            kind, name, value = events.get(timeout=min(remaining, _POLL_SECS))
        except queue_module.Empty:
            if any(p.is_alive() for p in processes):
                continue
            if gone_since is None:
                gone_since = time.monotonic()
                continue
            codes = [p.exitcode for p in processes]
            raise BenchError(
                f"{sorted(expected - set(results))} exited without reporting "
                f"(exit codes {codes})"
            ) from None
        if kind == "error":
            raise BenchError(f"{name} failed:\n{value}")
        results[name] = value
        if on_event is not None:
            on_event(name, value)
    return results


#: A process to start: its name, its target, and its arguments (before the
#: event queue), or a function of the pids of the processes started before.
_Target = tuple[
    str,
    Callable[..., None],
    "tuple[Any, ...] | Callable[[dict[str, int]], tuple[Any, ...]]",
]


def _run_processes(
    targets: list[_Target],
    expected: set[str],
    deadline: float,
    done_when: str | None = None,
    host: str = "host",
) -> dict[str, dict[str, Any]]:
    """Start one process per target, collect ``expected``, stop them all.

    The ``host`` target is also given an event, set once ``done_when`` has
    reported, that it waits for before letting go of its store.
    """
    context = _context()
    events = context.Queue()
    done = context.Event()
    processes: list[Any] = []

    def on_event(name: str, _value: dict[str, Any]) -> None:
        if name == done_when:
            done.set()

    try:
        pids: dict[str, int] = {}
        for name, target, args in targets:
            if callable(args):
                args = args(pids)
            extra = (done,) if name == host else ()
            process = context.Process(
                target=target, args=(*args, events, *extra), name=f"mem-{name}",
                daemon=True,
            )  # fmt: skip
            processes.append(process)
            process.start()
            pids[name] = process.pid
        results = _collect(events, expected, processes, deadline, on_event)
        done.set()
        for process in processes:
            process.join(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
    finally:
        done.set()
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        events.close()
    return results


def measure_objects(
    implementation: str, config: MemoryConfig, deadline: float
) -> dict[str, Any]:
    """Raw readings of the host and the measurer for one implementation."""
    (port,) = pick_free_ports(1)
    common = (implementation, port, config)
    results = _run_processes(
        [
            ("host", objects_host_main, common),
            ("measurer", objects_measurer_main, lambda pids: (*common, pids["host"])),
        ],
        {"host", "measurer"},
        deadline,
        done_when="measurer",
    )
    return {"host": results["host"], "measurer": results["measurer"]}


def measure_store(
    implementation: str, barriers: int, sample_every: int, config: MemoryConfig,
    deadline: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rank 0's samples over ``barriers`` barriers of a world of 2."""
    (port,) = pick_free_ports(1)
    results = _run_processes(
        [
            (f"rank{rank}", store_rank_main,
             (implementation, rank, port, barriers, sample_every, config))
            for rank in (0, 1)
        ],  # fmt: skip
        {"rank0", "rank1"},
        deadline,
        done_when="rank1",
        host="rank0",
    )
    return results["rank0"]["samples"]


# --- summaries ----------------------------------------------------------------


@dataclass(frozen=True)
class ObjectsSummary:
    """Memory of one barrier object of one implementation."""

    implementation: str
    objects: int
    #: Marginal RSS per object (bytes), between a tenth of them and all.
    rss_per_object: float
    #: The same once each object has run a round (ours only).
    rss_per_object_after_round: float | None
    #: Marginal malloc'd bytes per object (see :func:`heap_in_use`).
    heap_per_object: float | None
    heap_per_object_after_round: float | None
    fds_per_object: float
    threads_per_object: float
    fds_per_object_after_round: float | None
    threads_per_object_after_round: float | None
    #: Marginal RSS of the host (its server) per joined rank (bytes).
    host_rss_per_rank: float
    host_rss_per_rank_after_round: float | None
    readings: dict[str, Any] = field(default_factory=dict)


def _per(after: float, before: float, count: int) -> float:
    return (after - before) / count if count else 0.0


def _slope_marks(marks: Sequence[int]) -> tuple[int, int]:
    """The two object counts between which the per-object slope is taken:
    the first non-zero checkpoint and the last, or 0 and the last."""
    high = marks[-1]
    nonzero = [m for m in marks if 0 < m < high]
    return (nonzero[0] if nonzero else marks[0]), high


def summarize_objects(
    implementation: str, objects: int, raw: dict[str, Any]
) -> ObjectsSummary:
    """Per-object figures from the host's and the measurer's readings.

    ``raw["measurer"]["constructed"]`` maps an object count (int or, after a
    JSON round trip, str) to ``{"rss", "fds", "threads", "host_rss"}``;
    ``raw["measurer"]["after_round"]`` is one more reading after a round.
    RSS figures are slopes between two checkpoints; the round's addition is
    spread over every object. fds and threads are exact counts over all.
    """
    constructed = {int(k): v for k, v in raw["measurer"]["constructed"].items()}
    low, high = _slope_marks(sorted(constructed))
    span = high - low
    first, last, zero = constructed[low], constructed[high], constructed[0]
    after = raw["measurer"].get("after_round")

    def slope(key: str) -> float | None:
        if first.get(key) is None or last.get(key) is None:
            return None
        return _per(last[key], first[key], span)

    def with_round(key: str, per_object: float | None) -> float | None:
        if after is None or per_object is None or after.get(key) is None:
            return None
        return per_object + _per(after[key], last[key], objects)

    def count_after_round(key: str) -> float | None:
        return None if after is None else _per(after[key], zero[key], objects)

    rss = slope("rss")
    heap = slope("heap")
    host = slope("host_rss")
    return ObjectsSummary(
        implementation=implementation,
        objects=objects,
        rss_per_object=rss if rss is not None else 0.0,
        rss_per_object_after_round=with_round("rss", rss),
        heap_per_object=heap,
        heap_per_object_after_round=with_round("heap", heap),
        fds_per_object=_per(last["fds"], zero["fds"], objects),
        threads_per_object=_per(last["threads"], zero["threads"], objects),
        fds_per_object_after_round=count_after_round("fds"),
        threads_per_object_after_round=count_after_round("threads"),
        host_rss_per_rank=host if host is not None else 0.0,
        host_rss_per_rank_after_round=with_round("host_rss", host),
        readings=raw,
    )


@dataclass(frozen=True)
class StoreSummary:
    """Rank 0's RSS and the store's key count over a run of barriers."""

    implementation: str
    barriers: int
    samples: list[dict[str, Any]]

    def _values(self, key: str) -> list[float]:
        return [s[key] for s in self.samples]

    @property
    def first_rss(self) -> int:
        return self.samples[0]["rss"]

    @property
    def last_rss(self) -> int:
        return self.samples[-1]["rss"]

    @property
    def max_rss(self) -> int:
        return max(s["rss"] for s in self.samples)

    @property
    def first_keys(self) -> int:
        return self.samples[0]["keys"]

    @property
    def last_keys(self) -> int:
        return self.samples[-1]["keys"]

    @property
    def max_keys(self) -> int:
        return max(s["keys"] for s in self.samples)

    @property
    def keys_per_barrier(self) -> float:
        """Key growth per barrier between the first and last sample."""
        done = self.samples[-1]["barriers"] - self.samples[0]["barriers"]
        return (self.last_keys - self.first_keys) / done if done else 0.0

    @property
    def barrier_us(self) -> float | None:
        """Mean time per barrier between the first and last sample."""
        done = self.samples[-1]["barriers"] - self.samples[0]["barriers"]
        secs = self.samples[-1]["secs"] - self.samples[0]["secs"]
        return secs / done * 1e6 if done else None


# --- report -------------------------------------------------------------------


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / _KIB:.1f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_objects(summaries: Sequence[ObjectsSummary]) -> str:
    """Rows: figures; columns: implementations."""
    rows: list[tuple[str, Callable[[ObjectsSummary], str]]] = [
        ("RSS per object, constructed (KiB)", lambda s: _kib(s.rss_per_object)),
        ("RSS per object, after a round (KiB)",
         lambda s: _kib(s.rss_per_object_after_round)),
        ("malloc'd per object, constructed (KiB)",
         lambda s: _kib(s.heap_per_object)),
        ("malloc'd per object, after a round (KiB)",
         lambda s: _kib(s.heap_per_object_after_round)),
        ("fds per object, constructed", lambda s: _count(s.fds_per_object)),
        ("fds per object, after a round",
         lambda s: _count(s.fds_per_object_after_round)),
        ("threads per object, constructed", lambda s: _count(s.threads_per_object)),
        ("threads per object, after a round",
         lambda s: _count(s.threads_per_object_after_round)),
        ("host RSS per joined rank (KiB)", lambda s: _kib(s.host_rss_per_rank)),
        ("host RSS per rank, after a round (KiB)",
         lambda s: _kib(s.host_rss_per_rank_after_round)),
    ]  # fmt: skip
    table = [["", *[s.implementation for s in summaries]]]
    table += [[label, *[cell(s) for s in summaries]] for label, cell in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    return "\n".join(
        "  ".join(
            text.ljust(width) if c == 0 else text.rjust(width)
            for c, (text, width) in enumerate(zip(row, widths))
        )
        for row in table
    )


def format_store(summary: StoreSummary) -> str:
    """One row per sample, then first/last/max."""
    lines = [f"{'barriers':>9}  {'rank0 RSS MiB':>13}  {'store keys':>10}  {'secs':>7}"]
    for s in summary.samples:
        lines.append(
            f"{s['barriers']:>9}  {s['rss'] / _MIB:>13.2f}  {s['keys']:>10}  "
            f"{s['secs']:>7.2f}"
        )
    lines.append(
        f"RSS MiB first {summary.first_rss / _MIB:.2f}, last "
        f"{summary.last_rss / _MIB:.2f}, max {summary.max_rss / _MIB:.2f}; keys "
        f"first {summary.first_keys}, last {summary.last_keys}, max "
        f"{summary.max_keys} ({summary.keys_per_barrier:+.3f} a barrier); "
        f"{_count(summary.barrier_us)} us a barrier"
    )
    return "\n".join(lines)


# --- command line -------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# fmt: off
def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench-memory`` options, description and epilog."""
    defaults = MemoryConfig()
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Example: python -m tcpstore_barrier bench-memory --objects 200 "
        "--barriers 100000"
    )
    add = parser.add_argument
    add("--objects", type=_positive_int, default=defaults.objects,
        help=f"barrier objects the measurer constructs (default: {defaults.objects})")
    add("--barriers", type=_positive_int, default=defaults.barriers,
        help=f"barriers of ours in the store run (default: {defaults.barriers})")
    add("--sample-every", type=_positive_int, default=defaults.sample_every,
        help=f"barriers between samples of ours (default: {defaults.sample_every})")
    add("--torch-barriers", type=_positive_int, default=defaults.torch_barriers,
        help=f"barriers of torch's class in the store run "
        f"(default: {defaults.torch_barriers})")
    add("--torch-sample-every", type=_positive_int,
        default=defaults.torch_sample_every,
        help="barriers between samples of torch's class "
        f"(default: {defaults.torch_sample_every})")
    add("--only", choices=["objects", "store"],
        help="run one of the two measurements (default: both)")
    add("--no-torch", dest="include_torch", action="store_false",
        help="measure ours only")
    add("--backend", choices=["libuv", "legacy"], default=defaults.backend,
        help="TCPStore backend of both (default: libuv)")
    add("--protocol", choices=["torch", "native"], default=defaults.protocol,
        help="key protocol of ours (default: torch)")
    add("--timeout", dest="timeout_secs", type=_positive_seconds, metavar="SECS",
        default=defaults.timeout_secs,
        help=f"give up after this long in all (default: {defaults.timeout_secs:g})")
    add("--json", dest="json_path", metavar="FILE",
        help="write the configuration and every reading here")
# fmt: on


def memory_config_from_args(args: argparse.Namespace) -> MemoryConfig:
    """The :class:`MemoryConfig` that parsed ``bench-memory`` options describe."""
    return MemoryConfig(
        objects=args.objects,
        barriers=args.barriers,
        sample_every=args.sample_every,
        torch_barriers=args.torch_barriers,
        torch_sample_every=args.torch_sample_every,
        include_torch=args.include_torch,
        only=args.only,
        backend=args.backend,
        protocol=args.protocol,
        timeout_secs=args.timeout_secs,
        json_path=args.json_path,
    )


def run_memory(
    config: MemoryConfig, log: Callable[[str], None] = lambda _: None
) -> tuple[list[ObjectsSummary], list[StoreSummary]]:
    """Run the measurements ``config`` asks for; raise BenchError on failure."""
    deadline = time.monotonic() + config.timeout_secs
    objects: list[ObjectsSummary] = []
    stores: list[StoreSummary] = []
    if config.only in (None, "objects"):
        for implementation in config.implementations():
            log(f"objects: {implementation}, {config.objects} objects")
            raw = measure_objects(implementation, config, deadline)
            objects.append(summarize_objects(implementation, config.objects, raw))
    if config.only in (None, "store"):
        runs = [("ours", config.barriers, config.sample_every)]
        if config.include_torch:
            runs.append(("torch", config.torch_barriers, config.torch_sample_every))
        for implementation, barriers, every in runs:
            log(f"store: {implementation}, {barriers} barriers")
            samples = measure_store(implementation, barriers, every, config, deadline)
            stores.append(StoreSummary(implementation, barriers, samples))
    return objects, stores


def main(args: argparse.Namespace) -> int:
    """Run ``bench-memory``; return the exit code."""
    config = memory_config_from_args(args)
    started = time.monotonic()

    def log(text: str) -> None:
        elapsed = time.monotonic() - started
        print(f"[{elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)

    try:
        objects, stores = run_memory(config, log)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if objects:
        print(
            f"memory per barrier object: {config.objects} objects as ranks "
            f"1..{config.objects} of a world of {config.objects + 1}, in one "
            "process;\nrank 0 hosts the store in another (\"host\"). RSS per "
            "object is the slope between\n"
            f"{checkpoints(config.objects)[1]} and {config.objects} objects; "
            f"ours' protocol: {config.protocol}, backend: {config.backend}"
        )
        print()
        print(format_objects(objects))
    for summary in stores:
        print()
        who = "ours" if summary.implementation == "ours" else "torch's class"
        print(
            f"store over {summary.barriers} barriers of {who} (world size 2, "
            "ranks as processes, rank 0 hosts the store and samples):"
        )
        print(format_store(summary))
    if config.json_path is not None:
        document = {
            "config": asdict(config),
            "objects": [asdict(s) for s in objects],
            "stores": [asdict(s) for s in stores],
        }
        with open(config.json_path, "w") as f:
            json.dump(document, f)
        print(f"\nwrote {config.json_path}")
    return 0
