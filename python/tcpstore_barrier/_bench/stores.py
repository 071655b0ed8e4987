"""Which store a c10d server thread of this process serves, from /proc: the
root of a tree is told apart from the host and group stores that rank 0's
process also hosts by the port it listens on."""

from __future__ import annotations

import os
import time

#: x86_64 and aarch64 numbers of epoll_wait, epoll_pwait, epoll_pwait2.
EPOLL_WAITS = {"232", "281", "441", "22"}
#: A listening socket's state in /proc/net/tcp.
TCP_LISTEN = "0A"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _listening_ports() -> dict[int, int]:
    """Socket inode -> port of every listening TCP socket of this network
    namespace."""
    ports = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in _read(table).splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_LISTEN:
                ports[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return ports


def _socket_inode(fd: str) -> int | None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return int(target[8:-1]) if target.startswith("socket:[") else None


def _epoll_fd(tid: int, tries: int = 200) -> str | None:
    """The epoll fd a libuv loop thread waits on; None if it never waits in
    epoll (the legacy backend polls) within ``tries`` looks."""
    for _ in range(tries):
        call = _read(f"/proc/self/task/{tid}/syscall").split()
        if call and call[0] in EPOLL_WAITS:
            return str(int(call[1], 16))
        if call and call[0] != "running":
            return None
        time.sleep(0.001)
    return None


def listening_ports(tids: set[int]) -> dict[int, int | None]:
    """The port whose listening socket each store server thread of ``tids``
    (c10d's libuv backend) watches: its loop waits in epoll on an fd whose
    watched fds (/proc/self/fdinfo) include that socket. None if it cannot
    be told (the legacy backend)."""
    ports = _listening_ports()
    found: dict[int, int | None] = {}
    for tid in tids:
        epfd = _epoll_fd(tid)
        fdinfo = _read(f"/proc/self/fdinfo/{epfd}") if epfd is not None else ""
        watched = [
            line.split()[1] for line in fdinfo.splitlines() if line.startswith("tfd:")
        ]
        inodes = [_socket_inode(fd) for fd in watched]
        found[tid] = next((ports[i] for i in inodes if i in ports), None)
    return found


def threads_cpu_ns(tids: list[int]) -> list[int]:
    """CPU time each of the threads ``tids`` has run (schedstat); 0 if gone."""
    times = []
    for tid in tids:
        fields = _read(f"/proc/self/task/{tid}/schedstat").split()
        times.append(int(fields[0]) if fields else 0)
    return times
