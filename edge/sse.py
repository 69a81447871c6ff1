"""Streamed response framings: Server-Sent Events and newline-delimited JSON.

Each writes every event straight to the socket (no buffering); aiohttp sets
TCP_NODELAY, so the first token leaves when the worker publishes it.

Writes do not wait for the client. A client that stops reading would otherwise stall the
writer on aiohttp's drain, while its jobs' events pile up unbounded in front of it (in
``JobStream``'s queue and the relay's), past its deadline. Instead the transport keeps
what the client has not taken, up to ``Bounds.max_buffer_bytes``: past that the stream
raises ``SlowClient`` and its session ends (cancelling its jobs) and drops the connection.
What may still wait (an event larger than the cap, the end of the answer until the client
has all of it) waits no later than the request's deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from aiohttp import web

DONE = b"data: [DONE]\n\n"


class SlowClient(Exception):
    """The client fell too far behind: past its stream's buffer cap, or past its deadline
    while a write waited for it (``deadline``)."""

    def __init__(self, message: str, *, deadline: bool = False) -> None:
        super().__init__(message)
        self.deadline = deadline


@dataclass(frozen=True, slots=True)
class Bounds:
    """How far a stream's client may fall behind: bytes waiting at the edge, and the request's
    deadline (unix ms) for any write that has to wait."""

    max_buffer_bytes: int
    deadline_ms: int


class Framing:
    """A streamed response; subclasses say how one event and a keep-alive look on the wire."""

    content_type = "application/octet-stream"

    def __init__(
        self, request: web.Request, bounds: Bounds, headers: dict[str, str] | None = None
    ) -> None:
        self.request = request
        self.bounds = bounds
        left_s = max(0.0, bounds.deadline_ms / 1000 - time.time())
        self._deadline = asyncio.get_running_loop().time() + left_s
        self._unyielded = 0  # bytes written since this stream last let the loop run
        self.response = web.StreamResponse(
            headers={
                "Content-Type": self.content_type,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer
                **(headers or {}),
            }
        )

    @property
    def opened(self) -> bool:
        """True once the headers were sent."""
        return self.response.prepared

    async def open(self) -> None:
        """Send the status line and headers."""
        if self.response.prepared:
            return
        await self._bounded(self.response.prepare(self.request))
        if (transport := self.request.transport) is not None:
            # aiohttp's write waits (drain) once the transport holds 64 KiB. Here the cap
            # decides instead: a write past it raises, so the buffer holds at most the cap
            # plus one event, and only an event larger than the cap reaches this mark.
            transport.set_write_buffer_limits(high=2 * self.bounds.max_buffer_bytes)

    async def send(self, data: bytes, *, id: str | None = None, event: str | None = None) -> None:
        """One event."""
        raise NotImplementedError

    async def keepalive(self) -> None:
        """Something harmless that keeps proxies from timing the connection out."""

    async def raw(self, data: bytes) -> None:
        """Bytes as they are (``data: [DONE]``)."""
        await self._write(data)

    async def finish(self) -> None:
        """End the response and wait until the client has taken all of it, no later than the
        deadline (SlowClient then): one that stopped reading keeps nothing buffered after it."""
        if (transport := self.request.transport) is not None:
            # A high-water mark of 0 pauses writing while anything is unsent, so write_eof's
            # drain returns once the buffer is empty (asyncio's flow control, as documented).
            transport.set_write_buffer_limits(high=0)
        if asyncio.get_running_loop().time() >= self._deadline:
            # Its time is up: the connection closes after this answer instead of idling on as
            # a keep-alive one, with what the kernel still holds for a client that may not read.
            self.response.force_close()
        await self._bounded(self.response.write_eof())
        if (transport := self.request.transport) is not None:
            transport.set_write_buffer_limits()  # the defaults, for this connection's next request

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes and all: the client stopped reading."""
        if (transport := self.request.transport) is not None:
            transport.abort()

    async def _write(self, data: bytes) -> None:
        transport = self.request.transport
        waiting = transport.get_write_buffer_size() if transport is not None else 0
        if waiting > self.bounds.max_buffer_bytes:
            raise SlowClient(f"{waiting} bytes are waiting for a client that does not read")
        await self._bounded(self.response.write(data))
        self._unyielded += len(data)
        if transport is not None and self._unyielded >= self.bounds.max_buffer_bytes // 4:
            # Once the socket stops taking everything, the transport hands it more only when
            # the loop runs; a stream whose events are already queued never waits otherwise,
            # and would fill its buffer with a backlog a reading client had no time to take.
            self._unyielded = 0
            if transport.get_write_buffer_size():
                await asyncio.sleep(0)

    async def _bounded(self, write: Awaitable[object]) -> None:
        try:
            async with asyncio.timeout_at(self._deadline):
                await write
        except TimeoutError:
            raise SlowClient(
                "the deadline passed while a write waited for the client", deadline=True
            ) from None


class EventStream(Framing):
    """Server-Sent Events. Lines starting with ``:`` are comments: clients ignore them."""

    content_type = "text/event-stream; charset=utf-8"

    async def send(self, data: bytes, *, id: str | None = None, event: str | None = None) -> None:
        """Optional ``id:`` and ``event:`` lines, then ``data:``."""
        head = b""
        if id is not None:
            head += b"id: " + id.encode() + b"\n"
        if event is not None:
            head += b"event: " + event.encode() + b"\n"
        await self._write(head + b"data: " + data + b"\n\n")

    async def keepalive(self) -> None:
        """A comment line written between two events.

        No blank line follows it: the OpenAI SDK's decoder keeps the last ``id:`` and
        dispatches an empty (unparseable) event on any blank line once it has seen one.
        """
        await self._write(b": keep-alive\n")


class DataOnlyStream(EventStream):
    """SSE as llama.cpp's server frames ``/completion``: ``data: {json}`` lines, each followed
    by a blank line, and nothing else.

    LLMUnity reads the body whole (``LLMCaller.ConvertContent``): it trims it, requires it to
    start with ``data: ``, deletes every pair of newlines, splits on ``data: `` and parses the
    pieces as one JSON array. An ``id:`` line or a ``: keep-alive`` comment breaks that parse,
    so neither is written; the events stay resumable through ``/v1/jobs/{id}/events``.
    """

    async def send(self, data: bytes, *, id: str | None = None, event: str | None = None) -> None:
        """``data:`` only (``id`` and ``event`` are dropped)."""
        await self._write(b"data: " + data + b"\n\n")

    async def keepalive(self) -> None:
        """Nothing: llama.cpp's server sends no keep-alives either."""


class NdjsonStream(Framing):
    """Newline-delimited JSON (Ollama): one object per line, no keep-alives (clients parse every line)."""

    content_type = "application/x-ndjson"

    async def send(self, data: bytes, *, id: str | None = None, event: str | None = None) -> None:
        """One JSON object and a newline."""
        await self._write(data + b"\n")
