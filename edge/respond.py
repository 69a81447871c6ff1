"""Answering a text request with its jobs' results: streamed (SSE or NDJSON), or collected
into one body. The ``Session`` owns the request; these write what its relay yields.

A failure before the first byte is a real HTTP status; after it, an error event in the
API's shape. However the answer ends, the session then cancels what is unfinished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from edge.relay import Failed, Finished, Idle, Out, Relay, Stepped, Text
from edge.session import Session
from edge.sse import DONE, EventStream, Framing, SlowClient
from schemas.errors import DeadlineExceeded, HeadraceError
from schemas.events import Done, TokenLogprob


@dataclass
class Collected:
    """A finished request's text, logprobs and done event per choice."""

    texts: list[str]
    dones: list[Done]
    logprobs: list[list[TokenLogprob] | None]
    token_ids: list[list[int]] = field(default_factory=list)  # per choice, where engines say


def _nothing(*_: object) -> list[dict[str, Any]]:
    return []


@dataclass
class StreamFormat:
    """What a route writes for each kind of relay output, and how it frames the stream."""

    # One chunk, or several (none: text held back, as a tool call's start is)
    text: Callable[[Text], dict[str, Any] | list[dict[str, Any]]]
    finished: Callable[[Finished], dict[str, Any] | list[dict[str, Any]]]
    opening: Callable[[int], list[dict[str, Any]]] = _nothing  # sent with the headers, given n
    closing: Callable[[list[Done]], list[dict[str, Any]]] = _nothing
    framing: type[Framing] = EventStream
    end: bytes = DONE  # written after the last event (b"" for none)
    headers: dict[str, str] = field(default_factory=dict)


def _observe(session: Session, relay: Relay) -> None:
    m, model = session.edge.metrics, session.model.id if session.model else ""
    dones = [c.done for c in relay.choices if c.done is not None]
    firsts = [c.first_text_at for c in relay.choices if c.first_text_at is not None]
    if firsts:
        m.ttft.labels(model).observe(min(firsts) - session.started)
    m.e2e.labels(model).observe(time.perf_counter() - session.started)
    for c in relay.choices:
        if c.queue_ms is not None:
            m.queue_time.labels(model).observe(c.queue_ms / 1000)
        if c.first_text_at is not None and c.last_text_at is not None and c.tokens > 1:
            m.tpot.labels(model).observe((c.last_text_at - c.first_text_at) / (c.tokens - 1))
    m.tokens.labels(model, "prompt").inc(max((d.usage.prompt_tokens for d in dones), default=0))
    m.tokens.labels(model, "completion").inc(sum(d.usage.completion_tokens for d in dones))


async def collect(session: Session) -> Collected:
    """Wait for every choice to finish; a failed choice fails the request."""
    relay = session.following
    try:
        async for out in relay:
            if isinstance(out, Failed):
                session.outcome = "failed"
                raise out.error.exception()
    except DeadlineExceeded:
        session.outcome = "deadline"
        raise
    await session.end("finished")
    _observe(session, relay)
    dones = [c.done for c in relay.choices if c.done is not None]
    logprobs = [c.logprobs or None for c in relay.choices]
    texts = ["".join(c.parts) for c in relay.choices]
    return Collected(texts, dones, logprobs, [c.token_ids for c in relay.choices])


async def stream(session: Session, fmt: StreamFormat) -> web.StreamResponse:
    """Relay as a stream. Headers wait briefly for the first event, so early errors get a real status."""
    sse = fmt.framing(session.request, session.bounds, fmt.headers)
    try:
        measured = await _relay(session, sse, fmt)
        await sse.finish()
    except SlowClient as e:  # it stopped reading: its jobs are cancelled, its connection dropped
        await session.drop(sse, e)
        return sse.response
    if measured:
        _observe(session, session.following)
    return sse.response


async def _relay(session: Session, sse: Framing, fmt: StreamFormat) -> bool:
    """Write the relay's events, then the end marker or an error event; False when a choice
    failed mid-stream (such an answer is left out of the latency metrics)."""
    relay = session.following
    n = len(relay.choices)
    try:
        async for out in relay:
            if isinstance(out, Failed) and not sse.opened:
                session.outcome = "failed"
                raise out.error.exception()
            await _open(session, sse, fmt, n)
            await _write(session, sse, fmt, out, n)
            if isinstance(out, Failed):
                session.outcome = "failed"
                return False
        # Ended before the end marker: a client that starts its next request on [DONE] finds
        # this one's lease released and its tokens settled.
        await session.end("finished")
        for chunk in fmt.closing([c.done for c in relay.choices if c.done is not None]):
            await sse.send(orjson.dumps(chunk))
        await sse.raw(fmt.end)
    except HeadraceError as e:  # the deadline passed, or the job's results were lost
        session.outcome = "deadline" if isinstance(e, DeadlineExceeded) else "failed"
        if not sse.opened:
            raise
        await _send_error(session, sse, fmt, e)
    except (ConnectionResetError, asyncio.CancelledError):
        raise  # the client went away: the session cancels the jobs as it ends
    return True


async def _open(session: Session, sse: Framing, fmt: StreamFormat, n: int) -> None:
    if sse.opened:
        return
    await session.open(sse)
    for chunk in fmt.opening(n):
        await sse.send(orjson.dumps(chunk))


async def _write(session: Session, sse: Framing, fmt: StreamFormat, out: Out, n: int) -> None:
    if isinstance(out, Idle):
        await sse.keepalive()
    elif isinstance(out, Text):
        await _send(sse, fmt.text(out), _sse_id(out.index, out.event_id, n))
    elif isinstance(out, Finished):
        await _send(sse, fmt.finished(out), _sse_id(out.index, out.event_id, n))
    elif isinstance(out, Failed):  # after the headers went out: an error event, then the end
        await _send_error(session, sse, fmt, out.error.exception())
    elif isinstance(out, Stepped):
        pass  # diffusion steps mean nothing to a text answer


async def _send(sse: Framing, chunks: dict[str, Any] | list[dict[str, Any]], id: str) -> None:
    for chunk in chunks if isinstance(chunks, list) else [chunks]:
        await sse.send(orjson.dumps(chunk), id=id)


def _sse_id(index: int, event_id: str, n: int) -> str:
    """``<attempt>-<seq>`` of the job's event (``<choice>:<attempt>-<seq>`` when n > 1)."""
    return event_id if n == 1 else f"{index}:{event_id}"


async def _send_error(session: Session, sse: Framing, fmt: StreamFormat, e: HeadraceError) -> None:
    await sse.send(orjson.dumps(session.api.stream_error(e)))
    await sse.raw(fmt.end)
