"""Server-Sent Events: headers once, then each event straight to the socket (no buffering)."""

from __future__ import annotations

from aiohttp import web

DONE = b"data: [DONE]\n\n"


class EventStream:
    """One SSE response. Lines starting with ``:`` are comments: clients ignore them."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
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
        """One event: optional ``id:`` and ``event:`` lines, then ``data:``."""
        head = b""
        if id is not None:
            head += b"id: " + id.encode() + b"\n"
        if event is not None:
            head += b"event: " + event.encode() + b"\n"
        await self.response.write(head + b"data: " + data + b"\n\n")

    async def comment(self, text: str = "keep-alive") -> None:
        """A comment line, used as a keep-alive, written between two events.

        No blank line follows it: the OpenAI SDK's decoder keeps the last ``id:`` and
        dispatches an empty (unparseable) event on any blank line once it has seen one.
        """
        await self.response.write(b": " + text.encode() + b"\n")

    async def raw(self, data: bytes) -> None:
        """Bytes as they are (``data: [DONE]``)."""
        await self.response.write(data)

    async def close(self) -> None:
        """End the response body."""
        await self.response.write_eof()
