"""A TCP proxy that delays every byte by a fixed one-way latency, and can cut its links.

This kernel has no ``netem`` qdisc, so the region benchmark puts one of these on each
gateway connection between clusters (``delay_s`` each way: 20 ms makes a 40 ms round
trip), and the leaf-node test cuts a leaf's link with it. It runs on its own thread and
event loop, so a busy caller does not add to the delay it measures.

Delay is per chunk, from when it was read to when it is written on: the latency of a long
link without a bandwidth limit (a chunk read at t leaves at t + delay, in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from concurrent.futures import Future

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


class DelayProxy:
    """Listens on ``127.0.0.1:port`` and forwards to ``target`` (``host:port``)."""

    def __init__(self, target: str, delay_s: float = 0.0, port: int = 0) -> None:
        host, _, p = target.rpartition(":")
        self.target = (host or "127.0.0.1", int(p))  # may be set again before start()
        self.delay_s = delay_s
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port: int = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._cut = False

    @property
    def address(self) -> str:
        """Where to connect instead of the target."""
        return f"127.0.0.1:{self.port}"

    def _call(self, coro: object) -> object:
        fut: Future[object] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(timeout=10)

    def start(self) -> DelayProxy:
        """Start accepting (on its own thread)."""
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, sock=self._sock)

    def cut(self) -> None:
        """Drop every link now and refuse new ones, as a cable pulled out would."""
        self._cut = True
        self._call(self._drop())

    def restore(self) -> None:
        """Accept links again."""
        self._cut = False

    async def _drop(self) -> None:
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    def stop(self) -> None:
        """Close everything and stop the thread."""
        if not self._thread.is_alive():
            self._sock.close()
            self._loop.close()
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(task)
            for w in (writer, up_w):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk held until ``delay_s`` after it was read."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(_CHUNK):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait((0.0, b""))
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            with contextlib.suppress(OSError):
                writer.write_eof()
