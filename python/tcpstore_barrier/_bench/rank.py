"""What one rank does: runs in the rank processes (or threads) only.

Imported by name in the forkserver children, which have torch and this
package preloaded, so that a rank process starts in milliseconds.
"""

from __future__ import annotations

import os
import resource
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
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
    #: Iterations of :func:`python_work` a split-phase block does per barrier.
    work_loops: int = 0


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


def _time_barriers(
    barrier: _Barrier, iters: int, warmup: int, meter: CpuMeter | None = None
) -> dict[str, Any]:
    # The first warm-up barrier also lines the ranks up for the block.
    for _ in range(warmup):
        barrier.execute_barrier()
    # CPU time over the timed barriers only: lining up may overlap other
    # ranks' previous block, or their construction.
    cpu_before = meter.read() if meter is not None else None
    clock = time.perf_counter_ns
    samples = [0] * iters
    start = clock()
    for i in range(iters):
        before = clock()
        barrier.execute_barrier()
        samples[i] = clock() - before
    figures: dict[str, Any] = {"samples_ns": samples, "wall_ns": clock() - start}
    if meter is not None and cpu_before is not None:
        figures.update(CpuMeter.spent(cpu_before, meter.read()))
    return figures


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


def python_work(loops: int) -> int:
    """A fixed amount of pure-Python work: ``loops`` multiply-adds."""
    total = 0
    for i in range(loops):
        total += i * i
    return total


def calibrate_work_loops(work_us: float, tries: int = 5) -> int:
    """Loops of :func:`python_work` that take about ``work_us`` here, alone.

    The fastest of ``tries`` timings of a trial size sets the rate, so that
    a noisy moment does not shrink the work.
    """
    if work_us <= 0:
        return 0
    trial = 20_000
    best = min(_timed_work(trial) for _ in range(tries))
    return max(1, round(work_us * 1000 * trial / max(best, 1)))


def _timed_work(loops: int) -> int:
    start = time.perf_counter_ns()
    python_work(loops)
    return time.perf_counter_ns() - start


def _time_split_block(
    kind: str, ours: Any, torch_barrier: Any, plan: RankPlan
) -> dict[str, Any]:
    """One iteration = --work-us of Python work and one barrier, timed whole.

    ``work``: the work alone (warm-up barriers only line the ranks up);
    ``split``: arrive(), work, wait(); ``serial``: work, execute_barrier();
    ``torch_serial``: work, torch's execute_barrier().
    """
    loops = plan.work_loops
    clock = time.perf_counter_ns
    released_at_wait = 0
    # Within split iterations: how long arrive() and wait() took.
    arrive_ns: list[int] = []
    wait_ns: list[int] = []

    def split() -> None:
        nonlocal released_at_wait
        start = clock()
        ours.arrive()
        arrived = clock()
        python_work(loops)
        if ours.released:
            released_at_wait += 1
        before_wait = clock()
        ours.wait()
        arrive_ns.append(arrived - start)
        wait_ns.append(clock() - before_wait)

    def serial() -> None:
        python_work(loops)
        ours.execute_barrier()

    def torch_serial() -> None:
        python_work(loops)
        torch_barrier.execute_barrier()

    def work() -> None:
        python_work(loops)

    step = {
        "work": work,
        "split": split,
        "serial": serial,
        "torch_serial": torch_serial,
    }[kind]
    for _ in range(plan.warmup):
        if kind == "work":
            ours.execute_barrier()
        else:
            step()
    if kind == "work" and plan.warmup == 0:
        ours.execute_barrier()
    released_at_wait = 0
    arrive_ns.clear()
    wait_ns.clear()
    samples = [0] * plan.iters
    start = clock()
    for i in range(plan.iters):
        before = clock()
        step()
        samples[i] = clock() - before
    block: dict[str, Any] = {"samples_ns": samples, "wall_ns": clock() - start}
    if kind == "split":
        block["released_at_wait"] = released_at_wait
        block["arrive_ns"] = arrive_ns
        block["wait_ns"] = wait_ns
    return block


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


#: Thread names of c10d's TCPStore server threads (libuv, legacy).
SERVER_THREAD_PREFIX = "pt_tcpstore"


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def server_threads() -> set[int]:
    """Thread ids of this process's TCPStore server threads, by name."""
    found = set()
    for tid in _thread_ids():
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith(SERVER_THREAD_PREFIX):
                    found.add(tid)
        except OSError:
            continue
    return found


def thread_cpu_ns(tids: Iterable[int]) -> int:
    """CPU time (ns) the threads ``tids`` of this process have run so far.

    The first field of /proc/self/task/TID/schedstat; a gone thread counts 0.
    """
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


class CpuMeter:
    """CPU time spent during a block: by store servers and by the process.

    ``servers`` maps a store name ("ours", "torch") to its server threads,
    non-empty on the rank that hosts the stores; ``whole_process`` is set on
    one rank of each process so that every process is counted once.
    """

    def __init__(self, servers: dict[str, set[int]], whole_process: bool) -> None:
        self.servers = servers
        self.whole_process = whole_process

    def read(self) -> dict[str, int]:
        values = {name: thread_cpu_ns(tids) for name, tids in self.servers.items()}
        if self.whole_process:
            values["process"] = time.process_time_ns()
        return values

    @staticmethod
    def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """``{"ours_server_cpu_ns": ..., "process_cpu_ns": ...}`` of a block."""
        out = {}
        for name, value in after.items():
            label = "process" if name == "process" else f"{name}_server"
            out[f"{label}_cpu_ns"] = value - before[name]
        return out


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


def _run_block(
    kind: str,
    rank: int,
    plan: RankPlan,
    ours: Any,
    torch_barrier: Any,
    meter: CpuMeter,
) -> dict[str, Any]:
    if kind == "floor":
        return _floor_block(rank, ours, torch_barrier, plan)
    if kind == "ours":
        return _time_barriers(ours, plan.iters, plan.warmup, meter)
    if kind == "torch":
        return _time_barriers(torch_barrier, plan.iters, plan.warmup, meter)
    return _time_split_block(kind, ours, torch_barrier, plan)


def _run_schedule(
    rank: int,
    plan: RankPlan,
    ours: Any,
    torch_barrier: Any,
    events: EventSink,
    meter: CpuMeter,
) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for block in plan.schedule:
        blocks.append(_run_block(block.kind, rank, plan, ours, torch_barrier, meter))
        if rank == 0:
            events.put(("progress", rank, block.index))
    return blocks


def run_rank(
    rank: int,
    plan: RankPlan,
    events: EventSink,
    busy_thread: bool,
    whole_process: bool = True,
) -> dict[str, Any]:
    """Construct both barriers, run every block of the schedule, close.

    Returns this rank's figures, with one entry per block in schedule order.
    With ``busy_thread``, a :class:`BusyThread` runs while the blocks do.
    With ``whole_process``, each block also carries the CPU time of this
    whole process (one rank per process is asked to).
    """
    cpu = plan.cpus[rank]
    if cpu is not None:
        # Before the stores exist, so that rank 0's server threads (and the
        # busy thread) inherit the CPU.
        os.sched_setaffinity(0, {cpu})
    # Only rank 0 starts store servers, so the new server threads are its.
    servers: dict[str, set[int]] = {}
    known = server_threads() if rank == 0 else set()
    ours = _make_ours(rank, plan)
    if rank == 0:
        servers["ours"] = server_threads() - known
        known |= servers["ours"]
    torch_barrier = _make_torch(rank, plan) if plan.torch_port is not None else None
    if rank == 0 and torch_barrier is not None:
        servers["torch"] = server_threads() - known
    meter = CpuMeter(servers, whole_process)
    if rank == 0:
        events.put(("progress", rank, -1))
    if busy_thread:
        with BusyThread(plan.deadline_unix):
            blocks = _run_schedule(rank, plan, ours, torch_barrier, events, meter)
    else:
        blocks = _run_schedule(rank, plan, ours, torch_barrier, events, meter)
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


def _report(
    rank: int,
    plan: RankPlan,
    events: EventSink,
    busy_thread: bool,
    whole_process: bool = True,
) -> None:
    try:
        figures = run_rank(rank, plan, events, busy_thread, whole_process)
        events.put(("result", rank, figures))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        events.put(("error", rank, text))


def process_main(rank: int, plan: RankPlan, events: EventSink) -> None:
    """Entry of one rank process."""
    raise_fd_limit(
        fds_needed(1, plan.world_size, rank == 0, plan.torch_port is not None)
    )
    _report(rank, plan, events, busy_thread=plan.busy_thread)


def rank_groups(world_size: int, processes: int) -> list[tuple[int, ...]]:
    """Ranks ``0..world_size-1`` in ``min(processes, world_size)`` contiguous
    groups whose sizes differ by at most one, larger groups first."""
    if world_size < 1 or processes < 1:
        raise ValueError(
            f"need a world size and processes of at least 1, got {world_size}, "
            f"{processes}"
        )
    count = min(processes, world_size)
    base, extra = divmod(world_size, count)
    groups, start = [], 0
    for g in range(count):
        size = base + (1 if g < extra else 0)
        groups.append(tuple(range(start, start + size)))
        start += size
    return groups


# File descriptors besides the stores' sockets: Python, torch, the queue.
_BASE_FDS = 64
# Per store server: listening socket, epoll/eventfd/pipes of its loop.
_SERVER_FDS = 8


def fds_needed(
    ranks_here: int, world_size: int, hosts_stores: bool, include_torch: bool
) -> int:
    """File descriptors a process running ``ranks_here`` ranks may hold open.

    A rank of ours has two store connections (its own and its watcher's), a
    rank of torch's one; the process hosting the stores also holds the
    server's end of every rank's connections.
    """
    per_rank = 2 + (1 if include_torch else 0)
    needed = _BASE_FDS + per_rank * ranks_here
    if hosts_stores:
        needed += per_rank * world_size + _SERVER_FDS * (2 if include_torch else 1)
    return needed


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``needed``.

    Never beyond the hard limit; returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed <= soft:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


#: Stack size of each rank thread. Python's default follows `ulimit -s`
#: (often 8 MiB); a rank thread needs far less, and 1024 of them at 8 MiB
#: would reserve 8 GiB of address space.
RANK_THREAD_STACK_BYTES = 2 * 1024 * 1024


def threads_main(
    plan: RankPlan, events: EventSink, ranks: Sequence[int] | None = None
) -> None:
    """Entry of a process that runs ``ranks`` (default: all) as threads.

    Its busy thread, if any, is one for the whole process, as in a rank
    process. The first of its ranks also measures the process's CPU time.
    """
    ranks = list(range(plan.world_size)) if ranks is None else list(ranks)
    raise_fd_limit(
        fds_needed(len(ranks), plan.world_size, 0 in ranks, plan.torch_port is not None)
    )
    threads = [
        threading.Thread(
            target=_report,
            args=(rank, plan, events, False, i == 0),
            name=f"rank{rank}",
        )
        for i, rank in enumerate(ranks)
    ]
    with BusyThread(plan.deadline_unix) if plan.busy_thread else nullcontext():
        # The size applies to threads started while it is set.
        previous_stack = threading.stack_size(RANK_THREAD_STACK_BYTES)
        try:
            for thread in threads:
                thread.start()
        finally:
            threading.stack_size(previous_stack)
        for thread in threads:
            thread.join(timeout=max(0.0, plan.deadline_unix - time.time()))
