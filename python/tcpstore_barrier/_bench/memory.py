"""``bench-memory``: what a barrier costs in memory, and that it stays flat."""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .cli import _positive_int, add_shared_arguments, describe
from .launch import Job, pick_free_ports, report, run_command, run_jobs, write_json
from .rank import build, raise_fd_limit
from .results import align

DESCRIPTION = """\
Two measurements, each in fresh processes:

- objects: one process ("the measurer") constructs --objects barriers, ranks
  1..N of a world whose rank 0 runs in another ("the host") and hosts the
  store. Per object: the slopes of RSS and of malloc'd bytes (glibc's
  mallinfo2) between a tenth of the objects and all, so that one-time costs
  do not count; fds, threads; the host's RSS per joined rank. Ours also after
  one round (all arrive(), then all wait(), from one thread).
- store: rank 0 of a world of 2 runs --barriers barriers, sampling its RSS and
  store.num_keys() every --sample-every; then torch's class, --torch-barriers."""


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
    #: Always the constructor's default.
    peer_timeout: None = None

    def barrier(self, name: str, rank: int, world_size: int, port: int) -> Any:
        secs = self.timeout_secs
        return build(name, rank, world_size, port, self, min(60.0, secs), secs)


# fmt: off
def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench-memory`` options, description and epilog."""
    d = MemoryConfig()
    describe(parser, DESCRIPTION, "Example: python -m tcpstore_barrier bench-memory "
             "--objects 200 --barriers 100000")
    add = parser.add_argument
    add("--objects", type=_positive_int, default=d.objects,
        help=f"barrier objects the measurer constructs (default: {d.objects})")
    add("--barriers", type=_positive_int, default=d.barriers,
        help=f"barriers of ours in the store run (default: {d.barriers})")
    add("--sample-every", type=_positive_int, default=d.sample_every,
        help=f"barriers between samples of ours (default: {d.sample_every})")
    add("--torch-barriers", type=_positive_int, default=d.torch_barriers,
        help=f"barriers of torch's class in the store run (default: {d.torch_barriers})")
    add("--torch-sample-every", type=_positive_int, default=d.torch_sample_every,
        help=f"barriers between samples of torch's class (default: {d.torch_sample_every})")
    add("--only", choices=["objects", "store"], help="run one of the two measurements")
    add("--no-torch", dest="include_torch", action="store_false", help="measure ours only")
    add_shared_arguments(parser, "write the configuration and every reading here")
# fmt: on


# --- readings of a process ------------------------------------------------------
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]  # fmt: skip


def heap_in_use() -> int | None:
    """Bytes malloc has handed out (glibc >= 2.33's mallinfo2), or None. C and
    C++ allocations and Python's large objects; not pymalloc's arenas."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Reading:
    """One process at one moment, after a collection so garbage does not
    count; with the host's RSS (None once the host is gone)."""

    rss: int
    heap: int | None
    fds: int
    threads: int
    host_rss: int | None

    @classmethod
    def now(cls, host_pid: int) -> Reading:
        gc.collect()
        try:
            host_rss: int | None = rss_bytes(host_pid)
        except OSError:  # the host is gone
            host_rss = None
        fds, threads = os.listdir("/proc/self/fd"), os.listdir("/proc/self/task")
        return cls(rss_bytes(), heap_in_use(), len(fds), len(threads), host_rss)


# --- objects ------------------------------------------------------------------
def checkpoints(objects: int) -> list[int]:
    """After how many objects the measurer reads: 0, a tenth, all."""
    return sorted({0, max(1, objects // 10), objects})


def objects_host(
    name: str, port: int, config: MemoryConfig, events: Any, done: Any
) -> None:
    """Rank 0: hosts the store, and serves it until every figure is in."""

    def body() -> tuple[None, list[Any]]:
        raise_fd_limit()
        barrier = config.barrier(name, 0, config.objects + 1, port)
        if name != "torch":
            barrier.execute_barrier()  # the measurer's round
        return None, [barrier]

    report("host", events, done, time.time() + config.timeout_secs, body)


@dataclass(frozen=True)
class ObjectsFigures:
    """The measurer's readings at each checkpoint, and after a round (ours)."""

    constructed: dict[int, Reading]
    after_round: Reading | None


def objects_measurer(name: str, port: int, config: MemoryConfig, host_pid: int,
                     events: Any, done: Any) -> None:  # fmt: skip
    """Ranks 1..N, constructed one by one, read at each checkpoint."""

    def body() -> tuple[ObjectsFigures, list[Any]]:
        raise_fd_limit()
        # Imported before the first reading, so that its import does not count.
        import torch.distributed.checkpoint._experimental.barriers  # noqa: F401

        barriers: list[Any] = []
        marks, readings = checkpoints(config.objects), {0: Reading.now(host_pid)}
        for rank in range(1, config.objects + 1):
            barriers.append(config.barrier(name, rank, config.objects + 1, port))
            if len(barriers) in marks:
                readings[len(barriers)] = Reading.now(host_pid)
        if name == "torch":  # it has no split phase
            return ObjectsFigures(readings, None), barriers
        for barrier in barriers:
            barrier.arrive()
        for barrier in barriers:
            barrier.wait()
        return ObjectsFigures(readings, Reading.now(host_pid)), barriers

    report("measurer", events, done, time.time() + config.timeout_secs, body)


#: The objects table's rows (label, JSON key, Reading field), each as constructed
#: and "_after_round". RSS, heap and host RSS are slopes from a tenth of the
#: objects to all, leaving one-time costs out; fds and threads exact counts.
FIGURES = [("RSS per object (KiB)", "rss_per_object", "rss"),
           ("malloc'd per object (KiB)", "heap_per_object", "heap"),
           ("fds per object", "fds_per_object", "fds"),
           ("threads per object", "threads_per_object", "threads"),
           ("host RSS per joined rank (KiB)", "host_rss_per_rank", "host_rss")]  # fmt: skip
SLOPES = {"rss", "heap", "host_rss"}
AFTER = (("constructed", ""), ("after a round", "_after_round"))


def summarize_objects(name: str, objects: int, raw: ObjectsFigures) -> dict[str, Any]:
    """Each of FIGURES per object as constructed and after a round (whose
    addition is spread over every object; None if not measured), and the raw."""
    low = next((m for m in sorted(raw.constructed) if 0 < m < objects), 0)
    zero, first, last = (raw.constructed[m] for m in (0, low, objects))
    summary: dict[str, Any] = {"implementation": name, "objects": objects}
    for _, key, field in FIGURES:
        for (_, suffix), at in zip(AFTER, (last, raw.after_round), strict=True):
            readings = (zero, first, last, at)
            values: list[Any] = [r and getattr(r, field) for r in readings]
            v_zero, v_first, v_last, v_at = values
            if None in values:
                summary[key + suffix] = None
            elif field in SLOPES:
                slope = (v_last - v_first) / max(1, objects - low)
                summary[key + suffix] = slope + (v_at - v_last) / objects
            else:
                summary[key + suffix] = (v_at - v_zero) / objects
    return summary | {"readings": raw}


# --- the store over many barriers -------------------------------------------------
@dataclass(frozen=True)
class StoreSample:
    barriers: int
    rss: int
    keys: int
    secs: float


def store_rank(rank: int, name: str, port: int, barriers: int, every: int,
               config: MemoryConfig, events: Any, done: Any) -> None:  # fmt: skip
    """One of 2 ranks; rank 0 samples its RSS and the store's keys."""

    def body() -> tuple[list[StoreSample], list[Any]]:
        barrier = config.barrier(name, rank, 2, port)
        store = barrier._tcp_store if name == "torch" else barrier.store
        samples, start = [], time.perf_counter()
        for count in range(1, barriers + 1):
            barrier.execute_barrier()
            if rank == 0 and (count == 1 or count % every == 0 or count == barriers):
                gc.collect()
                rss, keys = rss_bytes(), store.num_keys()
                secs = time.perf_counter() - start
                samples.append(StoreSample(count, rss, keys, secs))
        # torch's class cannot wait for its peer: rank 0 keeps the store up.
        return samples, [barrier]

    report(f"rank{rank}", events, done, time.time() + config.timeout_secs, body)


# --- the command ------------------------------------------------------------------
def _measurer_args(name: str, port: int, config: MemoryConfig) -> Callable:
    """The measurer's arguments, once the host it measures has a pid."""
    return lambda pids: (name, port, config, pids["mem-host"])


def run_memory(config: MemoryConfig) -> tuple[list, list]:
    """Run the measurements ``config`` asks for; raise BenchError on failure."""
    started = time.monotonic()
    deadline = started + config.timeout_secs

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr)

    names = ["ours", "torch"] if config.include_torch else ["ours"]
    objects, stores = [], []
    for name in names if config.only != "store" else ():
        log(f"objects: {name}, {config.objects} objects")
        (port,) = pick_free_ports(1)
        jobs: list[Job] = [
            ("mem-host", objects_host, (name, port, config)),
            ("mem-measurer", objects_measurer, _measurer_args(name, port, config)),
        ]
        raw = run_jobs(jobs, {"measurer"}, deadline, f"objects of {name}")["measurer"]
        objects.append(summarize_objects(name, config.objects, raw))
    for name in names if config.only != "objects" else ():
        ours = name == "ours"
        barriers = config.barriers if ours else config.torch_barriers
        every = config.sample_every if ours else config.torch_sample_every
        log(f"store: {name}, {barriers} barriers")
        (port,) = pick_free_ports(1)
        args = (name, port, barriers, every, config)
        jobs = [(f"mem-rank{r}", store_rank, (r, *args)) for r in (0, 1)]
        figures = run_jobs(jobs, {"rank0", "rank1"}, deadline, f"store of {name}")
        stores.append(
            dict(implementation=name, barriers=barriers, samples=figures["rank0"])
        )
    return objects, stores


def format_objects(summaries: list[dict[str, Any]]) -> str:
    """Rows: figures; columns: implementations."""
    rows = [["", *(s["implementation"] for s in summaries)]]
    for label, key, field in FIGURES:
        for when, suffix in AFTER:
            values = [s[key + suffix] for s in summaries]
            unit, spec = (1024, ".1f") if field in SLOPES else (1, ".2f")
            shown = ["-" if v is None else f"{v / unit:{spec}}" for v in values]
            rows.append([f"{label}, {when}", *shown])
    return align(rows, label_left=True)


def format_store(samples: list[StoreSample]) -> str:
    """One row per sample, then first/last/max."""
    mib, first, last = 1024 * 1024, samples[0], samples[-1]
    rows = [["barriers", "rank0 RSS MiB", "store keys", "secs"]]
    for s in samples:
        rows.append(
            [str(s.barriers), f"{s.rss / mib:.2f}", str(s.keys), f"{s.secs:.2f}"]
        )
    per_barrier = max(1, last.barriers - first.barriers)
    return align(rows) + (
        f"\nRSS MiB first {first.rss / mib:.2f}, last {last.rss / mib:.2f}, max "
        f"{max(s.rss for s in samples) / mib:.2f}; keys first {first.keys}, last "
        f"{last.keys}, max {max(s.keys for s in samples)} "
        f"({(last.keys - first.keys) / per_barrier:+.3f} a barrier); "
        f"{(last.secs - first.secs) / per_barrier * 1e6:.2f} us a barrier"
    )


def print_memory(config: MemoryConfig) -> None:
    """Run ``config``'s measurements, print their tables, write the JSON."""
    objects, stores = run_memory(config)
    if objects:
        n, tenth = config.objects, checkpoints(config.objects)[1]
        print(f"memory per barrier object, ranks 1..{n} in one process, rank 0 hosting the "
              f"store in another;\nslopes from {tenth} to {n} objects; ours' protocol "
              f"{config.protocol}, backend {config.backend}\n")  # fmt: skip
        print(format_objects(objects))
    for store in stores:
        who = "ours" if store["implementation"] == "ours" else "torch's class"
        print(f"\nstore over {store['barriers']} barriers of {who} (world size 2, ranks as "
              "processes, rank 0 hosts the store and samples):")  # fmt: skip
        print(format_store(store["samples"]))
    document = {"config": config, "objects": objects, "stores": stores}
    write_json(config.json_path, document)


def main(args: argparse.Namespace) -> int:
    """Run ``bench-memory``; return the exit code."""
    fields = MemoryConfig.__dataclass_fields__
    config = MemoryConfig(**{k: v for k, v in vars(args).items() if k in fields})
    return run_command(lambda: print_memory(config))
