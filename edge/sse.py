"""Streamed response framings: Server-Sent Events and newline-delimited JSON.

Each writes every event straight to the socket (no buffering); aiohttp sets
TCP_NODELAY, so the first token leaves when the worker publishes it.
"""

from __future__ import annotations

from aiohttp import web

DONE = b"data: [DONE]\n\n"


class Framing:
    """A streamed response; subclasses say how one event and a keep-alive look on the wire."""

    content_type = "application/octet-stream"

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
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
        if not self.response.prepared:
            await self.response.prepare(self.request)

    async def send(self, data: bytes, *, id: str | None = None, event: str | None = None) -> None:
        """One event."""
        raise NotImplementedError

    async def keepalive(self) -> None:
        """Something harmless that keeps proxies from timing the connection out."""

    async def raw(self, data: bytes) -> None:
        """Bytes as they are (``data: [DONE]``)."""
        await self.response.write(data)


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
        await self.response.write(head + b"data: " + data + b"\n\n")

    async def keepalive(self) -> None:
        """A comment line written between two events.

        No blank line follows it: the OpenAI SDK's decoder keeps the last ``id:`` and
        dispatches an empty (unparseable) event on any blank line once it has seen one.
        """
        await self.response.write(b": keep-alive\n")


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
        await self.response.write(b"data: " + data + b"\n\n")

    async def keepalive(self) -> None:
        """Nothing: llama.cpp's server sends no keep-alives either."""


class NdjsonStream(Framing):
    """Newline-delimited JSON (Ollama): one object per line, no keep-alives (clients parse every line)."""

    content_type = "application/x-ndjson"

    async def send(self, data: bytes, *, id: str | None = None, event: str | None = None) -> None:
        """One JSON object and a newline."""
        await self.response.write(data + b"\n")
