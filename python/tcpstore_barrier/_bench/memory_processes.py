"""The process machinery of both measurements: building a barrier of either
implementation, reporting from a process, and starting, collecting and
stopping the processes of one measurement."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from .launch import BenchError, _context, receive_events, stop_processes
from .memory_config import MemoryConfig
from .rank import LOOPBACK, EventSink


def barrier_class(implementation: str) -> Any:
    """The class of ``implementation``, imported: before a baseline reading,
    so that importing torch's checkpoint package does not count."""
    if implementation == "ours":
        from tcpstore_barrier import TCPStoreBarrier
    else:
        from torch.distributed.checkpoint._experimental.barriers import (
            TCPStoreBarrier,
        )
    return TCPStoreBarrier


def make_barrier(
    implementation: str,
    rank: int,
    world_size: int,
    port: int,
    config: MemoryConfig,
    prefix: str,
) -> Any:
    cls = barrier_class(implementation)
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


def run_and_report(
    name: str, events: EventSink, body: Callable[[], dict[str, Any] | None]
) -> None:
    """Run ``body`` and report its figures (None: it reported them itself),
    or its exception, which the parent raises as a BenchError."""
    try:
        figures = body()
        if figures is not None:
            events.put(("result", name, figures))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        events.put(("error", name, text))


def _collect(
    events: Any,
    expected: set[str],
    processes: list[Any],
    deadline: float,
    on_event: Callable[[str, dict[str, Any]], None],
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for kind, name, value in receive_events(
        events,
        processes,
        deadline,
        lambda: expected <= set(results),
        lambda: str(sorted(expected - set(results))),
    ):
        if kind == "error":
            raise BenchError(f"{name} failed:\n{value}")
        results[name] = value
        on_event(name, value)
    return results


#: A process to start: its name, its target, and its arguments (before the
#: event queue), or a function of the pids of the processes started before.
_Target = tuple[
    str,
    Callable[..., None],
    "tuple[Any, ...] | Callable[[dict[str, int]], tuple[Any, ...]]",
]


def run_processes(
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
    except BaseException:
        done.set()
        stop_processes(processes, grace_secs=0)
        raise
    else:
        # The host lets go of its store once ``done`` is set; then every
        # process exits on its own.
        done.set()
        grace_secs = max(0.1, min(10.0, deadline - time.monotonic()))
        stop_processes(processes, grace_secs)
    finally:
        events.close()
    return results
