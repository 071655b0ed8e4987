"""The one way every bench command starts its processes and collects what
they send: forkserver processes, an event queue, a deadline, and a ``done``
event that tells them every figure is in."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"

#: A process to start: a name, its target, and its arguments (the event
#: queue and ``done`` are appended), or a function of the pids of the
#: processes started before it.
Job = tuple[str, Callable[..., None], "tuple[Any, ...] | Callable[[dict[str, int]], tuple]"]


class BenchError(RuntimeError):
    """A rank failed, died or overran; the message says which and why."""


def pick_free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def report(name: Any, events: Any, body: Callable[[], Any]) -> None:
    """Run ``body`` in a bench process and send its figures, or its error,
    which the parent raises as a BenchError. None: nothing to send."""
    try:
        figures = body()
        if figures is not None:
            events.put(("result", name, figures))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        events.put(("error", name, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_jobs(
    jobs: list[Job],
    expected: set[Any],
    deadline: float,
    what: str,
    on_progress: Callable[[Any], None] = lambda _: None,
) -> dict[Any, Any]:
    """Start ``jobs``, return the figures of every name in ``expected``.

    ``deadline`` is a time.monotonic() value; ``what`` names the run in
    errors. Every process started here is gone when this returns or raises.
    """
    context = multiprocessing.get_context("forkserver")
    # Importing torch takes a second or two; the forkserver pays it once.
    context.set_forkserver_preload(["tcpstore_barrier", "tcpstore_barrier._bench.rank"])
    events, done = context.Queue(), context.Event()
    processes: list[Any] = []
    try:
        pids: dict[str, int] = {}
        for name, target, args in jobs:
            args = args(pids) if callable(args) else args
            process = context.Process(
                target=target, args=(*args, events, done), name=name, daemon=True
            )
            processes.append(process)
            process.start()
            pids[name] = process.pid
        results = _collect(events, expected, processes, deadline, what, on_progress)
    except BaseException:
        done.set()
        _stop(processes, grace_secs=0)
        raise
    else:
        # Ranks keep their stores up until every figure is in, then exit.
        done.set()
        _stop(processes, grace_secs=max(0.1, min(10.0, deadline - time.monotonic())))
    finally:
        events.close()
    return results


def _collect(events, expected, processes, deadline, what, on_progress) -> dict:
    results: dict[Any, Any] = {}
    all_gone = False
    while missing := sorted(expected - results.keys()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{what}: {missing} overran --timeout")
        try:
            kind, name, value = events.get(timeout=min(remaining, 0.2))
        except queue_module.Empty:
            if any(p.is_alive() for p in processes):
                continue
            # Exited processes may still have figures in the pipe: one more poll.
            if all_gone:
                codes = [p.exitcode for p in processes]
                raise BenchError(f"{what}: {missing} exited without reporting "
                                 f"(exit codes {codes})") from None  # fmt: skip
            all_gone = True
            continue
        if kind == "error":
            raise BenchError(f"{what}: {name} failed:\n{value}")
        if kind == "progress":
            on_progress(value)
        else:
            results[name] = value
    return results


def _stop(processes: list[Any], grace_secs: float) -> None:
    grace_end = time.monotonic() + grace_secs
    for process in processes:
        if process.pid is not None:
            process.join(timeout=max(0.0, grace_end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
