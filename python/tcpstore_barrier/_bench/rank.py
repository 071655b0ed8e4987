"""What one rank of ``bench`` does, in the rank processes or threads. The
forkserver preloads this module (and torch), so a rank starts in milliseconds."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .cli import TREE_CONTENDERS, BenchConfig
from .launch import CLEAR_LINE, LOOPBACK, report
from .results import Block
from .stores import listening_ports, threads_cpu_ns

if TYPE_CHECKING:
    from .memory import MemoryConfig

# Outside every contender's key space.
FLOOR_KEY = "bench/floor"

#: Python's default thread stack follows `ulimit -s` (often 8 MiB); 1024 rank
#: threads at that size would reserve 8 GiB of address space.
RANK_THREAD_STACK_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class RankPlan:
    """What every rank of one world size runs; pickled to each rank."""

    config: BenchConfig
    world_size: int
    #: Built in this order, contender i on ports[i].
    contenders: tuple[str, ...]
    ports: tuple[int, ...]
    schedule: tuple[Block, ...]
    #: The end of --timeout, a time.time() value: every wait's timeout.
    deadline_unix: float
    #: Iterations of :func:`python_work` a split-phase block does per barrier.
    work_loops: int = 0


@dataclass
class BlockFigures:
    """What one rank measured in one block, in nanoseconds."""

    #: One per barrier, loop iteration (--split-phase) or store.add (floor).
    samples_ns: list[int] = field(default_factory=list)
    wall_ns: int = 0
    #: Rank 0: CPU time of the contender's root store's server thread.
    server_cpu_ns: int | None = None
    #: One rank of each process: CPU time of each of the contender's store
    #: server threads in its process (every store of a tree there).
    stores_cpu_ns: list[int] | None = None
    #: One rank of each process: CPU time of its whole process.
    process_cpu_ns: int | None = None
    #: Split blocks: iterations whose round had released before wait(), and
    #: arrive() and wait() timed alone.
    released_at_wait: int | None = None
    arrive_ns: list[int] | None = None
    wait_ns: list[int] | None = None


@dataclass
class RankFigures:
    """What one rank sends back: a BlockFigures per block, schedule order."""

    rank: int
    ours_uses_libuv: bool
    torch_uses_libuv: bool | None
    blocks: list[BlockFigures]
    #: Rank 0: each contender's tree_levels (1 when flat), and whether its
    #: root store's thread was found by its port (else: all of the
    #: contender's server threads in rank 0's process stand for it).
    levels: dict[str, int] = field(default_factory=dict)
    root_by_port: dict[str, bool] = field(default_factory=dict)


def build(
    name: str, rank: int, world_size: int, port: int, config: BenchConfig | MemoryConfig,
    init_timeout_secs: float, timeout_secs: float,
) -> Any:  # fmt: skip
    """Contender ``name``'s barrier for ``rank``, on a store at ``port``, with
    ``config``'s backend, protocol and peer timeout."""
    prefix, use_libuv = f"bench/{name}/", config.backend == "libuv"
    if name == "reference":
        import torch.distributed as dist

        from tcpstore_barrier._reference import ReferenceBarrier

        init_timeout = timedelta(seconds=init_timeout_secs)
        store = dist.TCPStore(
            LOOPBACK, port, world_size, rank == 0, init_timeout, use_libuv=use_libuv
        )
        store.set_timeout(timedelta(seconds=timeout_secs))
        return ReferenceBarrier(store, rank, world_size, prefix)
    kwargs: dict[str, Any] = {}
    if name == "torch":
        from torch.distributed.checkpoint._experimental.barriers import (
            TCPStoreBarrier,
        )

        # torch's class takes whole seconds.
        init_timeout_secs, timeout_secs = (
            max(1, int(secs)) for secs in (init_timeout_secs, timeout_secs)
        )
    else:
        from tcpstore_barrier import TCPStoreBarrier  # type: ignore[assignment]

        native = name in ("native", "native-tree")
        kwargs["protocol"] = "native" if native else config.protocol
        # Explicit: "auto" would turn the flat ones into trees at large sizes.
        kwargs["topology"] = "tree" if name in TREE_CONTENDERS else "flat"
        if name in TREE_CONTENDERS:
            kwargs["host"] = f"h{rank // config.ranks_per_host}"  # type: ignore[union-attr]
            if config.fan_in is not None:  # type: ignore[union-attr]
                kwargs["tree_fan_in"] = config.fan_in  # type: ignore[union-attr]
        if name == "ours-noliveness" or config.peer_timeout == "off":
            kwargs["peer_timeout_secs"] = None
        elif config.peer_timeout is not None:  # else the constructor's default
            kwargs["peer_timeout_secs"] = config.peer_timeout
    # Ours takes torch's arguments, in torch's order.
    args: tuple[Any, ...] = (init_timeout_secs, use_libuv, port, LOOPBACK, timeout_secs)
    return TCPStoreBarrier(rank, world_size, prefix, *args, **kwargs)


def python_work(loops: int) -> int:
    """A fixed amount of pure-Python work: ``loops`` multiply-adds."""
    return sum(i * i for i in range(loops))


def calibrate_work_loops(work_us: float, trial: int = 20_000) -> int:
    """Loops of :func:`python_work` that take about ``work_us`` here, alone;
    the fastest of five tries sets the rate, so a noisy moment cannot shrink it."""
    if work_us <= 0:
        return 0
    fastest = min(timeit.repeat(lambda: python_work(trial), number=1, repeat=5))
    return max(1, round(work_us * 1e-6 * trial / fastest))


def _proc_text(path: str) -> str:
    """A /proc file's text; empty if its thread is gone."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def server_threads() -> set[int]:
    """Thread ids of this process's TCPStore server threads, by c10d's name."""
    tids = os.listdir("/proc/self/task")
    comms = {int(tid): _proc_text(f"/proc/self/task/{tid}/comm") for tid in tids}
    return {tid for tid, comm in comms.items() if comm.startswith("pt_tcpstore")}


def thread_cpu_ns(tids: set[int]) -> int:
    """CPU time the threads ``tids`` have run (schedstat); a gone one counts 0."""
    stats = [_proc_text(f"/proc/self/task/{tid}/schedstat").split() for tid in tids]
    return sum(int(fields[0]) for fields in stats if fields)


class Rank:
    """One rank's contenders, and one iteration of each kind of block."""

    def __init__(self, rank: int, plan: RankPlan, whole_process: bool) -> None:
        self.rank, self.plan, self.whole_process = rank, plan, whole_process
        self.barriers: dict[str, Any] = {}
        #: One rank of each process: each contender's store server threads
        #: in this process, the c10d threads that appeared while it was built.
        self.stores: dict[str, list[int]] = {}
        #: Rank 0 only: each contender's root store's server thread.
        self.servers: dict[str, set[int]] = {}
        self.root_by_port: dict[str, bool] = {}
        remaining = plan.deadline_unix - time.time()
        # A minute to connect, more for worlds so large that it takes longer.
        init_timeout = min(max(60.0, 0.1 * plan.world_size), remaining)
        ports = dict(zip(plan.contenders, plan.ports, strict=True))
        seen = server_threads() if whole_process else set()
        # ours first: a round of it after each contender is built lines the
        # ranks up, so that every store the contender made exists, and none
        # of the next one's does yet, when each process looks at its threads.
        for name in sorted(plan.contenders, key=lambda c: c != "ours"):
            self.barriers[name] = build(
                name, rank, plan.world_size, ports[name], plan.config, init_timeout,
                remaining,
            )  # fmt: skip
            self.barriers["ours"].execute_barrier()
            if whole_process:
                now = server_threads()
                self.stores[name], seen = sorted(now - seen), now
            if rank == 0:
                by_port = listening_ports(set(self.stores[name]))
                root = {t for t, port in by_port.items() if port == ports[name]}
                self.root_by_port[name] = bool(root)
                self.servers[name] = root or set(self.stores[name])
        self.ours = ours = self.barriers["ours"]
        torch: Any = self.barriers.get("torch")  # built whenever its blocks run
        loops = plan.work_loops
        #: One timed iteration of each kind of block but the floor.
        self.steps: dict[str, Callable[[], Any]] = {
            **{c: barrier.execute_barrier for c, barrier in self.barriers.items()},
            "work": lambda: python_work(loops),
            "split": self._split_iteration,
            "serial": lambda: (python_work(loops), ours.execute_barrier()),
            "torch_serial": lambda: (python_work(loops), torch.execute_barrier()),
        }
        #: What the split iterations of the current block saw.
        self.released: list[bool] = []
        self.arrive_ns: list[int] = []
        self.wait_ns: list[int] = []

    def run(self, block: Block) -> BlockFigures:
        """Warm up, then time ``iters`` iterations of the block's kind; a
        contender's blocks also read the CPU time their barriers took."""
        kind = block.kind
        if kind == "floor":
            return self._floor()
        step = self.steps[kind]
        # Lines the ranks up; the work alone needs a barrier to do it.
        for _ in range(max(self.plan.config.warmup, 1 if kind == "work" else 0)):
            self.ours.execute_barrier() if kind == "work" else step()
        self.released, self.arrive_ns, self.wait_ns = [], [], []
        # CPU of the timed barriers only: lining up may overlap others' last block.
        server = self.servers.get(kind)
        server_before = thread_cpu_ns(server) if server is not None else 0
        stores = self.stores.get(kind, [])
        stores_before = threads_cpu_ns(stores)
        process_before = time.process_time_ns()
        figures = self._timed(step)
        if server is not None:
            figures.server_cpu_ns = thread_cpu_ns(server) - server_before
        if self.whole_process and kind in self.barriers:
            figures.process_cpu_ns = time.process_time_ns() - process_before
            after = threads_cpu_ns(stores)
            figures.stores_cpu_ns = [
                a - b for a, b in zip(after, stores_before, strict=True)
            ]
        if kind == "split":
            figures.released_at_wait = sum(self.released)
            figures.arrive_ns, figures.wait_ns = self.arrive_ns, self.wait_ns
        return figures

    def _timed(self, step: Callable[[], Any]) -> BlockFigures:
        """``iters`` calls of ``step``, each timed, and their wall time."""
        clock, samples = time.perf_counter_ns, [0] * self.plan.config.iters
        start = clock()
        for i in range(self.plan.config.iters):
            before = clock()
            step()
            samples[i] = clock() - before
        return BlockFigures(samples, clock() - start)

    def _split_iteration(self) -> None:
        """arrive(), the work, wait(); arrive() and wait() also timed alone."""
        ours, clock = self.ours, time.perf_counter_ns
        start = clock()
        ours.arrive()
        arrived = clock()
        python_work(self.plan.work_loops)
        self.released.append(ours.released)
        before_wait = clock()
        ours.wait()
        self.arrive_ns.append(arrived - start)
        self.wait_ns.append(clock() - before_wait)

    def _floor(self) -> BlockFigures:
        """Rank 0, then the last rank, time store.add round trips while the
        other ranks wait, off the CPU, in ours' barrier."""
        figures = BlockFigures()
        for measuring in sorted({0, self.plan.world_size - 1}):
            if self.rank == measuring:
                store = self.ours.store
                add_one = lambda store=store: store.add(FLOOR_KEY, 1)  # noqa: E731
                for _ in range(self.plan.config.warmup):
                    add_one()
                figures = self._timed(add_one)
            self.ours.execute_barrier()
        return figures


def run_rank(
    rank: int, plan: RankPlan, events: Any, done: Any, whole_process: bool
) -> None:
    """Build every contender, run the schedule, report the figures."""

    def body() -> tuple[RankFigures, list[Any]]:
        me = Rank(rank, plan, whole_process)
        blocks, draws_progress = [], rank == 0 and sys.stderr.isatty()
        for block in plan.schedule:
            blocks.append(me.run(block))
            if draws_progress:
                show_progress(plan, block)
        torch = me.barriers.get("torch")
        torch_uses_libuv = torch and torch._tcp_store.libuvBackend
        figures = RankFigures(rank, me.ours.uses_libuv, torch_uses_libuv, blocks)
        if rank == 0:
            figures.levels = {
                c: getattr(b, "tree_levels", 1) for c, b in me.barriers.items()
            }
            figures.root_by_port = me.root_by_port
        return figures, list(me.barriers.values())

    report(rank, events, done, plan.deadline_unix, body)


def show_progress(plan: RankPlan, block: Block) -> None:
    """The bench's progress line, redrawn in place; cleared after the last block."""
    done, total, rounds = block.index + 1, len(plan.schedule), plan.config.rounds
    step = (
        f"world size {plan.world_size}: round {block.round + 1}/{rounds} {block.kind}"
    )
    line = f"[{'#' * (24 * done // total):.<24}] {done}/{total} {step}"
    sys.stderr.write(CLEAR_LINE + (line if done < total else ""))
    sys.stderr.flush()


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the store host of a large
    world holds a connection per rank and contender."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def ranks_main(ranks: Sequence[int], plan: RankPlan, events: Any, done: Any) -> None:
    """A rank process: ``ranks`` as threads, the first also reading the process's
    CPU time; with --busy-thread a CPU-bound thread competes with them all."""
    raise_fd_limit()
    threads = []
    for i, rank in enumerate(ranks):
        args = (rank, plan, events, done, i == 0)
        threads.append(threading.Thread(target=run_rank, args=args, name=f"rank{rank}"))
    if plan.config.busy_thread:
        # Pure-Python work until the deadline, holding the GIL as much as
        # CPython lets it, as a trainer's data loaders do.
        def burn() -> None:
            while time.time() < plan.deadline_unix:
                python_work(2000)

        threading.Thread(target=burn, name="busy", daemon=True).start()
    threading.stack_size(RANK_THREAD_STACK_BYTES)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, plan.deadline_unix - time.time()))


def rank_groups(world_size: int, processes: int) -> list[tuple[int, ...]]:
    """Ranks in ``min(processes, world_size)`` contiguous groups whose sizes
    differ by at most one, larger groups first."""
    count = min(processes, world_size)
    base, extra = divmod(world_size, count)
    starts = [g * base + min(g, extra) for g in range(count + 1)]
    return [tuple(range(starts[g], starts[g + 1])) for g in range(count)]
