"""The objects measurement: the memory, file descriptors and threads of one
barrier object, from a host process (rank 0, the store) and a measurer
process (ranks 1..N), and the per-object figures summarized from them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .launch import pick_free_ports
from .memory_config import MemoryConfig
from .memory_processes import (
    barrier_class,
    make_barrier,
    run_and_report,
    run_processes,
)
from .memory_readings import rss_bytes, snapshot
from .rank import EventSink, raise_fd_limit


# --- what the processes do ----------------------------------------------------


def objects_host_main(
    implementation: str, port: int, config: MemoryConfig, events: EventSink, done: Any
) -> None:
    """Rank 0 of the objects measurement: hosts the store, reports its RSS.

    Reports as soon as it has its figures, then keeps serving the store
    until ``done`` is set (the measurer has reported).
    """

    def body() -> None:
        raise_fd_limit(64 + 3 * (config.objects + 1))
        barrier_class(implementation)
        before = snapshot()
        barrier = make_barrier(
            implementation, 0, config.objects + 1, port, config, "mem/"
        )
        figures = {"before": before, "joined": snapshot()}
        if implementation == "ours":
            barrier.execute_barrier()
            figures["after_round"] = snapshot()
        events.put(("result", "host", figures))
        done.wait(config.timeout_secs)
        if implementation == "ours":
            barrier.close()

    run_and_report("host", events, body)


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
        return {**snapshot(), "host_rss": _host_rss(host_pid)}

    def body() -> dict[str, Any]:
        raise_fd_limit(64 + 3 * config.objects)
        barrier_class(implementation)
        world_size = config.objects + 1
        barriers: list[Any] = []
        readings = {}
        marks = checkpoints(config.objects)
        readings[0] = reading()
        started = time.perf_counter()
        for rank in range(1, world_size):
            barriers.append(
                make_barrier(implementation, rank, world_size, port, config, "mem/")
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

    run_and_report("measurer", events, body)


def measure_objects(
    implementation: str, config: MemoryConfig, deadline: float
) -> dict[str, Any]:
    """Raw readings of the host and the measurer for one implementation."""
    (port,) = pick_free_ports(1)
    common = (implementation, port, config)
    results = run_processes(
        [
            ("host", objects_host_main, common),
            ("measurer", objects_measurer_main, lambda pids: (*common, pids["host"])),
        ],
        {"host", "measurer"},
        deadline,
        done_when="measurer",
    )
    return {"host": results["host"], "measurer": results["measurer"]}


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
