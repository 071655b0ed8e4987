"""A store server that stalls for real: the legacy TCPStore backend serves
its clients one request at a time, reading each in full with blocking
reads, so a client that sends half a request holds its one server thread
until it sends the rest or hangs up. While it does, every other client's
requests wait unanswered, as behind a server thread that is descheduled,
swapped out or busy: the store is slow, not gone. (The libuv backend reads
requests without blocking and is not stalled this way.)"""

from __future__ import annotations

import contextlib
import socket
import struct

# c10d's QueryType values and handshake (TCPStoreBackend.hpp).
_VALIDATE, _ADD = 0, 4
_VALIDATION_MAGIC = 0x3C85F7CE


@contextlib.contextmanager
def stalled_legacy_store(host, port):
    """Within the block, the legacy-backend store at host:port answers no
    one; on leaving it, it serves what waited, in order."""
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(struct.pack("=BI", _VALIDATE, _VALIDATION_MAGIC))
        # An ADD whose key length is cut off after 3 of its 8 bytes.
        client.sendall(struct.pack("=B", _ADD) + b"\x05\x00\x00")
        yield
