"""A TCP forwarder that counts the connections made through it: put in front
of a store, it says how many connects that store took from the ranks that
reach it through the forwarder. It runs in a process of its own, so that
ranks running as threads of the test's process do not slow it down."""

from __future__ import annotations

import asyncio
import contextlib

from support import LOOPBACK, free_port
from support.launch import CONTEXT


async def _pipe(reader, writer):
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def _forward(port, target_port, connects, ready):
    async def serve(client_reader, client_writer):
        with connects.get_lock():
            connects.value += 1
        try:
            store_reader, store_writer = await asyncio.open_connection(
                LOOPBACK, target_port
            )
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, store_writer), _pipe(store_reader, client_writer)
        )

    server = await asyncio.start_server(serve, LOOPBACK, port, backlog=1024)
    ready.set()
    async with server:
        await server.serve_forever()


def _forwarder_main(port, target_port, connects, ready):
    asyncio.run(_forward(port, target_port, connects, ready))


class CountingProxy:
    def __init__(self, target_port):
        self.port = free_port()
        self._connects = CONTEXT.Value("q", 0)
        ready = CONTEXT.Event()
        self._process = CONTEXT.Process(
            target=_forwarder_main,
            args=(self.port, target_port, self._connects, ready),
            daemon=True,
        )
        self._process.start()
        assert ready.wait(timeout=30), "the forwarder did not start"

    def connects(self) -> int:
        """The connections accepted so far."""
        return self._connects.value

    def stop(self):
        self._process.kill()
        self._process.join()


@contextlib.contextmanager
def counting_proxy(target_port):
    """A forwarder to the loopback port `target_port`, for the block."""
    proxy = CountingProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.stop()
