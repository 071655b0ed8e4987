"""Starting the ranks of one world size and collecting what they send."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import resource
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import rank as rank_module
from .config import RanksMode
from .rank import LOOPBACK, RankPlan, fds_needed, rank_groups

_PRELOAD = ["tcpstore_barrier", "tcpstore_barrier._bench.rank"]

# How often the collector looks up from an empty queue to check deadlines
# and whether the ranks are still alive.
_POLL_SECS = 0.2


class BenchError(RuntimeError):
    """A rank failed, died or overran; the message says which and why."""


def pick_free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    # Importing torch takes a second or two; the forkserver pays it once.
    context.set_forkserver_preload(_PRELOAD)
    return context


def check_fd_limit(plan: RankPlan, groups: list[tuple[int, ...]]) -> None:
    """Raise BenchError if the process hosting the stores cannot have enough
    file descriptors even at the hard limit (the ranks raise the soft one)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return
    host = next(g for g in groups if 0 in g)
    needed = fds_needed(len(host), plan.world_size, True, plan.torch_port is not None)
    if needed > hard:
        raise BenchError(
            f"world size {plan.world_size}: the process of rank 0 needs about "
            f"{needed} file descriptors, over the hard limit of {hard} "
            "(ulimit -Hn); use more --processes, --no-torch or a smaller world"
        )


def run_world(
    plan: RankPlan,
    ranks: RanksMode,
    deadline: float,
    on_progress: Callable[[int], None],
    processes: int = 1,
) -> list[dict[str, Any]]:
    """Run every rank of ``plan`` and return their figures, indexed by rank.

    ``deadline`` is a time.monotonic() value; ``on_progress`` receives the
    index of each block rank 0 finishes (-1 once the barriers exist). With
    ranks as threads, they are spread over at most ``processes`` processes.
    Every process started here is gone when this returns or raises.
    """
    if ranks == "processes":
        groups = [(rank,) for rank in range(plan.world_size)]
    else:
        groups = rank_groups(plan.world_size, processes)
    check_fd_limit(plan, groups)
    context = _context()
    events = context.Queue()
    if ranks == "processes":
        jobs = [
            (rank_module.process_main, (rank, plan, events), f"bench-rank{rank}")
            for rank in range(plan.world_size)
        ]
    else:
        jobs = [
            (rank_module.threads_main, (plan, events, group),
             f"bench-ranks{group[0]}-{group[-1]}")
            for group in groups
        ]  # fmt: skip
    workers = [
        context.Process(target=target, args=args, name=name, daemon=True)
        for target, args, name in jobs
    ]
    try:
        for process in workers:
            process.start()
        figures = _collect(events, plan.world_size, workers, deadline, on_progress)
    except BaseException:
        stop_processes(workers, grace_secs=0)
        raise
    else:
        stop_processes(workers, grace_secs=5)
    finally:
        events.close()
    return figures


def receive_events(
    events: Any,
    processes: list[Any],
    deadline: float,
    finished: Callable[[], bool],
    missing: Callable[[], str],
) -> Iterator[tuple[str, Any, Any]]:
    """Yield each ``(kind, sender, value)`` event until ``finished()``.

    Raises BenchError once ``deadline`` (time.monotonic()) passes, or once
    every process has exited with events still wanted; the message starts
    with ``missing()``, which says who has not reported.
    """
    all_gone_since: float | None = None
    while not finished():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{missing()} overran --timeout")
        try:
            event = events.get(timeout=min(remaining, _POLL_SECS))
        except queue_module.Empty:
            if any(p.is_alive() for p in processes):
                continue
            # A process that put its last figures and exited may still have
            # them in the pipe; give them one more poll before giving up.
            if all_gone_since is None:
                all_gone_since = time.monotonic()
                continue
            codes = [p.exitcode for p in processes]
            raise BenchError(
                f"{missing()} exited without reporting (exit codes {codes})"
            ) from None
        yield event


def _collect(
    events: Any,
    world_size: int,
    processes: list[Any],
    deadline: float,
    on_progress: Callable[[int], None],
) -> list[dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}

    def missing() -> str:
        ranks = sorted(set(range(world_size)) - set(results))
        return f"world size {world_size}: ranks {ranks}"

    for kind, rank, value in receive_events(
        events, processes, deadline, lambda: len(results) >= world_size, missing
    ):
        if kind == "progress":
            on_progress(value)
        elif kind == "result":
            results[rank] = value
        else:
            raise BenchError(f"world size {world_size}: rank {rank} failed:\n{value}")
    return [results[r] for r in range(world_size)]


def stop_processes(processes: list[Any], grace_secs: float) -> None:
    """Give ``processes`` up to ``grace_secs`` in all to exit, then kill the rest."""
    # Ranks that reported exit on their own in well under a second; after a
    # failure the others are stuck in a barrier whose peer is gone.
    grace_end = time.monotonic() + grace_secs
    for process in processes:
        if process.pid is not None:
            process.join(timeout=max(0.0, grace_end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
