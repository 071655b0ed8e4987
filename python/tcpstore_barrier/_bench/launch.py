"""The one way every bench command starts its processes, collects what they
send (over an event queue, by a deadline) and exits."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import queue as queue_module
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

LOOPBACK = "127.0.0.1"
#: Back to the start of a terminal's line, and erase it.
CLEAR_LINE = "\r\x1b[2K"

#: A process to start: a name, its target, and its arguments (the event queue
#: and ``done`` appended), or a function of the pids of the ones before it.
Job = tuple[
    str, Callable[..., None], "tuple[Any, ...] | Callable[[dict[str, int]], tuple]"
]


class BenchError(RuntimeError):
    """A bench process failed, died or overran; the message says which and why."""


def pick_free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]


def report(name: Any, events: Any, done: Any, deadline_unix: float,
           body: Callable[[], tuple[Any, list[Any]]]) -> None:  # fmt: skip
    """Run ``body`` in a bench process, send the figures it returns (unless
    None) or its error; keep the barriers it returns up (rank 0 hosts the
    store) until every figure is in or the time.time() ``deadline_unix``."""
    try:
        figures, barriers = body()
        if figures is not None:
            events.put(("result", name, figures))
        done.wait(max(0.0, deadline_unix - time.time()))
        for barrier in barriers:
            if hasattr(barrier, "close"):
                barrier.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        message = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        events.put(("error", name, message))


def run_command(body: Callable[[], None]) -> int:
    """Run a bench command's ``body``; its exit code: 0, 1 on a BenchError (a
    process failed or overran), 130 on Ctrl-C."""
    try:
        body()
        return 0
    except BenchError as e:
        message, code = f"error: {e}", 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    # Over the progress line, if one is drawn.
    print(f"{CLEAR_LINE if sys.stderr.isatty() else ''}{message}", file=sys.stderr)
    return code


def write_json(path: str | None, document: dict[str, Any]) -> None:
    """Write ``document`` (records as their fields) to ``path``, if any."""
    if path is not None:
        with open(path, "w") as f:
            json.dump(document, f, default=asdict)
        print(f"\nwrote {path}")


def run_jobs(
    jobs: Sequence[Job],
    expected: set[Any],
    deadline: float,
    what: str,
) -> dict[Any, Any]:
    """Start ``jobs``, return the figures of every name in ``expected`` by the
    time.monotonic() ``deadline``; ``what`` names the run in errors. Every
    process started here is gone when this returns or raises."""
    context = multiprocessing.get_context("forkserver")
    # Importing torch takes a second or two; the forkserver pays it once.
    context.set_forkserver_preload(["tcpstore_barrier", "tcpstore_barrier._bench.rank"])
    events, done = context.Queue(), context.Event()
    processes: list[Any] = []
    pids: dict[str, int] = {}
    grace_secs = 0.0
    try:
        with _ctrl_c_deferred():
            for name, target, args in jobs:
                args = args(pids) if callable(args) else args
                process = context.Process(
                    target=target, args=(*args, events, done), name=name, daemon=True
                )
                processes.append(process)
                process.start()
                assert process.pid is not None  # set by start()
                pids[name] = process.pid
        results = _collect(events, expected, processes, deadline, what)
        # Ranks keep their stores up until every figure is in, then exit.
        grace_secs = max(0.1, min(10.0, deadline - time.monotonic()))
        return results
    finally:
        done.set()
        _stop(processes, grace_secs)
        events.close()


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C raised on leaving, not inside: interrupted within start(), a
    process would run on with no pid known here to kill."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # SIGINT ignored, as in a background job, or handled by the caller
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _: pressed.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _collect(events, expected, processes, deadline, what) -> dict:
    results: dict[Any, Any] = {}
    all_gone = False  # exited processes may still have figures in the pipe
    while missing := sorted(expected - results.keys()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{what}: {missing} overran --timeout")
        try:
            kind, name, value = events.get(timeout=min(remaining, 0.2))
        except queue_module.Empty:
            if any(p.is_alive() for p in processes):
                continue
            if all_gone:
                codes = [p.exitcode for p in processes]
                gone = f"{missing} exited without reporting (exit codes {codes})"
                raise BenchError(f"{what}: {gone}") from None
            all_gone = True
            continue
        if kind == "error":
            raise BenchError(f"{what}: {name} failed:\n{value}")
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
