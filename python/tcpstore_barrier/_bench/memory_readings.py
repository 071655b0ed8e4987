"""Readings of a process's memory, file descriptors and threads, from /proc
and glibc."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


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


def snapshot() -> dict[str, int]:
    """Every reading of this process, after a collection so that garbage
    does not count."""
    gc.collect()
    return {
        "rss": rss_bytes(),
        "heap": heap_in_use(),
        "fds": open_fds(),
        "threads": thread_count(),
    }
