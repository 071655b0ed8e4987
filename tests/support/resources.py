"""What a process holds, read from /proc: its threads, its socket file
descriptors and the TCP ports it listens on; so that a test can check that
barriers leave nothing behind, and find the store servers a process runs
without reading any of the barrier's own keys."""

from __future__ import annotations

import os
import time
from typing import NamedTuple

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


class Resources(NamedTuple):
    threads: int
    sockets: int
    # (address, port) of every TCP socket of the process in LISTEN state.
    listening: frozenset


def _socket_inodes(pid):
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _decode_address(text):
    address, port = text.split(":")
    if len(address) == 8:  # IPv4, little-endian
        octets = bytes.fromhex(address)[::-1]
        host = ".".join(str(b) for b in octets)
    else:
        host = "[" + address + "]"
    return host, int(port, 16)


def listening_ports(pid="self", inodes=None):
    """(address, port) of the TCP sockets in LISTEN state owned by process
    `pid` (IPv4 and IPv6)."""
    inodes = _socket_inodes(pid) if inodes is None else inodes
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and fields[9] in inodes:
                found.add(_decode_address(fields[1]))
    return frozenset(found)


def resources(pid="self"):
    """What process `pid` holds now."""
    inodes = _socket_inodes(pid)
    return Resources(
        threads=len(os.listdir(f"/proc/{pid}/task")),
        sockets=len(inodes),
        listening=listening_ports(pid, inodes),
    )


def leftovers(baseline, now):
    """What `now` holds beyond `baseline` (empty: nothing)."""
    extra = {}
    if now.threads > baseline.threads:
        extra["threads"] = now.threads - baseline.threads
    if now.sockets > baseline.sockets:
        extra["sockets"] = now.sockets - baseline.sockets
    if now.listening - baseline.listening:
        extra["listening"] = sorted(now.listening - baseline.listening)
    return extra


def settled_leftovers(baseline, within=2.0, pid="self"):
    """What the process still holds beyond `baseline` once it has had up to
    `within` s to let go (server threads exit on their own schedule); empty
    as soon as it holds no more than the baseline."""
    deadline = time.monotonic() + within
    while True:
        extra = leftovers(baseline, resources(pid))
        if not extra or time.monotonic() >= deadline:
            return extra
        time.sleep(0.05)
