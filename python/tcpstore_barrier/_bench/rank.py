"""What one rank does: runs in the rank processes (or threads) only.

Imported by name in the forkserver children, which have torch and this
package preloaded, so that a rank process starts in milliseconds.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from .schedule import Block

LOOPBACK = "127.0.0.1"

# Outside both barriers' key space.
FLOOR_KEY = "bench/floor"


class EventSink(Protocol):
    """Where ranks send ("progress" | "result" | "error", rank, value)."""

    def put(self, item: Any) -> None: ...


@dataclass(frozen=True)
class RankPlan:
    """What every rank of one world size runs; pickled to each rank."""

    world_size: int
    ours_port: int
    torch_port: int | None
    use_libuv: bool
    protocol: str
    iters: int
    warmup: int
    schedule: tuple[Block, ...]
    cpus: tuple[int | None, ...]
    busy_thread: bool
    timeout_secs: float
    init_timeout_secs: float
    deadline_unix: float


class _Barrier(Protocol):
    def execute_barrier(self) -> None: ...


def _make_ours(rank: int, plan: RankPlan) -> Any:
    from tcpstore_barrier import TCPStoreBarrier

    return TCPStoreBarrier(
        rank,
        plan.world_size,
        "bench/ours/",
        plan.init_timeout_secs,
        plan.use_libuv,
        plan.ours_port,
        LOOPBACK,
        plan.timeout_secs,
        protocol=plan.protocol,
    )


def _make_torch(rank: int, plan: RankPlan) -> Any:
    from torch.distributed.checkpoint._experimental.barriers import TCPStoreBarrier

    assert plan.torch_port is not None
    return TCPStoreBarrier(
        global_rank=rank,
        global_world_size=plan.world_size,
        barrier_prefix="bench/torch/",
        timeout_barrier_init_secs=max(1, int(plan.init_timeout_secs)),
        use_checkpoint_barrier_tcpstore_libuv=plan.use_libuv,
        tcpstore_port=plan.torch_port,
        master_address=LOOPBACK,
        timeout_secs=max(1, int(plan.timeout_secs)),
    )


def _time_barriers(barrier: _Barrier, iters: int, warmup: int) -> dict[str, Any]:
    # The first warm-up barrier also lines the ranks up for the block.
    for _ in range(warmup):
        barrier.execute_barrier()
    clock = time.perf_counter_ns
    samples = [0] * iters
    start = clock()
    for i in range(iters):
        before = clock()
        barrier.execute_barrier()
        samples[i] = clock() - before
    return {"samples_ns": samples, "wall_ns": clock() - start}


def _time_adds(store: Any, iters: int, warmup: int) -> list[int]:
    for _ in range(warmup):
        store.add(FLOOR_KEY, 1)
    clock = time.perf_counter_ns
    samples = [0] * iters
    for i in range(iters):
        before = clock()
        store.add(FLOOR_KEY, 1)
        samples[i] = clock() - before
    return samples


def floor_ranks(world_size: int) -> list[int]:
    """The ranks that measure the floor, in turn.

    Rank 0's client shares a process with the store's server; the last rank
    is a peer like every other rank.
    """
    return sorted({0, world_size - 1})


def _floor_block(rank: int, ours: Any, torch_barrier: Any, plan: RankPlan) -> dict:
    result: dict[str, Any] = {}
    for measuring in floor_ranks(plan.world_size):
        if rank == measuring:
            result["ours_store_ns"] = _time_adds(ours.store, plan.iters, plan.warmup)
            if torch_barrier is not None:
                # torch's class keeps its store private; it differs from ours'
                # when --backend is not libuv.
                torch_store = torch_barrier._tcp_store
                result["torch_store_ns"] = _time_adds(
                    torch_store, plan.iters, plan.warmup
                )
        # The other ranks wait here, off the CPU, while one rank measures.
        ours.execute_barrier()
    return result


def busy_loop(stop: threading.Event, deadline_unix: float) -> None:
    """Burn CPU in pure Python, holding the GIL as much as CPython lets it."""
    total = 0
    while not stop.is_set() and time.time() < deadline_unix:
        for i in range(2000):
            total += i * i


class BusyThread:
    """A :func:`busy_loop` daemon thread for the length of a ``with`` block."""

    def __init__(self, deadline_unix: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=busy_loop, args=(self._stop, deadline_unix), name="busy", daemon=True
        )

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _run_schedule(
    rank: int, plan: RankPlan, ours: Any, torch_barrier: Any, events: EventSink
) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for block in plan.schedule:
        if block.kind == "floor":
            blocks.append(_floor_block(rank, ours, torch_barrier, plan))
        elif block.kind == "ours":
            blocks.append(_time_barriers(ours, plan.iters, plan.warmup))
        else:
            blocks.append(_time_barriers(torch_barrier, plan.iters, plan.warmup))
        if rank == 0:
            events.put(("progress", rank, block.index))
    return blocks


def run_rank(
    rank: int, plan: RankPlan, events: EventSink, busy_thread: bool
) -> dict[str, Any]:
    """Construct both barriers, run every block of the schedule, close.

    Returns this rank's figures, with one entry per block in schedule order.
    With ``busy_thread``, a :class:`BusyThread` runs while the blocks do.
    """
    cpu = plan.cpus[rank]
    if cpu is not None:
        # Before the stores exist, so that rank 0's server threads (and the
        # busy thread) inherit the CPU.
        os.sched_setaffinity(0, {cpu})
    ours = _make_ours(rank, plan)
    torch_barrier = _make_torch(rank, plan) if plan.torch_port is not None else None
    if rank == 0:
        events.put(("progress", rank, -1))
    if busy_thread:
        with BusyThread(plan.deadline_unix):
            blocks = _run_schedule(rank, plan, ours, torch_barrier, events)
    else:
        blocks = _run_schedule(rank, plan, ours, torch_barrier, events)
    figures = {
        "blocks": blocks,
        "cpu": cpu,
        "ours_uses_libuv": ours.uses_libuv,
        "torch_uses_libuv": (
            None if torch_barrier is None else torch_barrier._tcp_store.libuvBackend
        ),
    }
    # Rank 0 hosts both stores: the other ranks let go of torch's store
    # first, and rank 0's close() waits for every other rank's, so no rank
    # loses a store it still uses.
    if rank != 0:
        torch_barrier = None
    ours.close()
    return figures


def _report(rank: int, plan: RankPlan, events: EventSink, busy_thread: bool) -> None:
    try:
        events.put(("result", rank, run_rank(rank, plan, events, busy_thread)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        events.put(("error", rank, text))


def process_main(rank: int, plan: RankPlan, events: EventSink) -> None:
    """Entry of one rank process."""
    _report(rank, plan, events, busy_thread=plan.busy_thread)


def threads_main(plan: RankPlan, events: EventSink) -> None:
    """Entry of the one process that runs every rank as a thread.

    Its busy thread, if any, is one for the whole process, as in a rank
    process.
    """
    threads = [
        threading.Thread(
            target=_report, args=(rank, plan, events, False), name=f"rank{rank}"
        )
        for rank in range(plan.world_size)
    ]
    with BusyThread(plan.deadline_unix) if plan.busy_thread else nullcontext():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, plan.deadline_unix - time.time()))
