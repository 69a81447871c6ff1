"""Answering with a submission's results: streamed (SSE or NDJSON), or collected into one body.

Both paths cancel the jobs when the client goes away or the deadline passes, so
no worker spends time on an answer nobody will read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from edge.context import ctx
from edge.errors import body_of, from_exception
from edge.jobs import Submission
from edge.ratelimit import http as ratelimit
from edge.relay import Failed, Finished, Idle, Out, Relay, Text
from edge.sse import DONE, EventStream, Framing
from schemas.errors import DeadlineExceeded, HeadraceError, error_from_code
from schemas.events import Done, TokenLogprob
from schemas.subjects import cancel_subject


@dataclass
class Collected:
    """A finished request's text, logprobs and done event per choice."""

    texts: list[str]
    dones: list[Done]
    logprobs: list[list[TokenLogprob] | None]


def _nothing(*_: object) -> list[dict[str, Any]]:
    return []


@dataclass
class StreamFormat:
    """What a route writes for each kind of relay output, and how it frames the stream."""

    text: Callable[[Text], dict[str, Any]]
    finished: Callable[[Finished], dict[str, Any]]
    opening: Callable[[int], list[dict[str, Any]]] = _nothing  # sent with the headers, given n
    closing: Callable[[list[Done]], list[dict[str, Any]]] = _nothing
    error: Callable[[HeadraceError], dict[str, Any]] = lambda e: body_of(e.code, e.message)
    framing: type[Framing] = EventStream
    end: bytes = DONE  # written after the last event (b"" for none)
    headers: dict[str, str] = field(default_factory=dict)


def _relay(request: web.Request, sub: Submission) -> Relay:
    s = ctx(request).settings
    return Relay(sub.streams, s.first_event_wait_s, s.keepalive_s)


def _observe(request: web.Request, sub: Submission, relay: Relay, dones: list[Done]) -> None:
    m, model = ctx(request).metrics, sub.model.id
    firsts = [c.first_text_at for c in relay.choices if c.first_text_at is not None]
    if firsts:
        m.ttft.labels(model).observe(min(firsts) - sub.started)
    m.e2e.labels(model).observe(time.perf_counter() - sub.started)
    for c in relay.choices:
        if c.queue_ms is not None:
            m.queue_time.labels(model).observe(c.queue_ms / 1000)
        if c.first_text_at is not None and c.last_text_at is not None and c.tokens > 1:
            m.tpot.labels(model).observe((c.last_text_at - c.first_text_at) / (c.tokens - 1))
    m.tokens.labels(model, "prompt").inc(max((d.usage.prompt_tokens for d in dones), default=0))
    m.tokens.labels(model, "completion").inc(sum(d.usage.completion_tokens for d in dones))


async def _close(request: web.Request, sub: Submission, relay: Relay, reason: str) -> None:
    """Stop following; cancel what is unfinished (shared jobs: once their last client left)."""
    c = ctx(request)
    unfinished = await relay.close()
    if sub.fingerprint is not None:
        c.dedup.release(sub.fingerprint, unfinished, c.jobs.cancel)
    else:
        for job_id in unfinished:
            with contextlib.suppress(Exception):
                await c.jobs.nc.publish(cancel_subject(job_id), b"")
    if unfinished:
        c.metrics.cancels.labels(reason).inc(len(unfinished))


async def collect(request: web.Request, sub: Submission) -> Collected:
    """Wait for every choice to finish; a failed choice fails the request."""
    relay = _relay(request, sub)
    dones: list[Done | None] = [None] * len(sub.streams)
    reason = "client_gone"
    try:
        async for out in relay:
            if isinstance(out, Failed):
                raise error_from_code(out.error.code, out.error.message)
            if isinstance(out, Finished):
                dones[out.index] = out.done
        reason = "finished"
    except DeadlineExceeded:
        reason = "deadline"
        raise
    finally:
        await _close(request, sub, relay, reason)
        await ratelimit.settle(request, relay)
    finished = [d for d in dones if d is not None]
    _observe(request, sub, relay, finished)
    logprobs = [_logprobs_of(relay, i) for i in range(len(dones))]
    return Collected(["".join(c.parts) for c in relay.choices], finished, logprobs)


def _logprobs_of(relay: Relay, index: int) -> list[TokenLogprob] | None:
    items = relay.choices[index].logprobs
    return items if items else None


async def stream(request: web.Request, sub: Submission, fmt: StreamFormat) -> web.StreamResponse:
    """Relay as a stream. Headers wait briefly for the first event, so early errors get a real status."""
    relay = _relay(request, sub)
    sse = fmt.framing(request, fmt.headers)
    dones: list[Done | None] = [None] * len(sub.streams)
    reason = "client_gone"
    try:
        async for out in relay:
            if isinstance(out, Failed) and not sse.opened:
                reason = "failed"
                error = error_from_code(out.error.code, out.error.message)
                return from_exception(error, ctx(request).settings.retry_after_s)
            await _open(request, sse, fmt, len(dones))
            await _write(sse, fmt, out, dones)
            if isinstance(out, Failed):
                reason = "failed"
                return sse.response
        # Before the end marker: a client that starts its next request on [DONE] finds
        # this one's lease released and its tokens settled.
        await ratelimit.settle(request, relay)
        for chunk in fmt.closing([d for d in dones if d is not None]):
            await sse.send(orjson.dumps(chunk))
        await sse.raw(fmt.end)
        reason = "finished"
    except DeadlineExceeded as e:
        reason = "deadline"
        if not sse.opened:
            raise
        await _send_error(sse, fmt, e)
    except (ConnectionResetError, asyncio.CancelledError):
        raise  # the client went away: the finally block cancels the jobs
    finally:
        await _close(request, sub, relay, reason)
        await ratelimit.settle(request, relay)  # a no-op when already settled
        if sse.opened:
            ctx(request).metrics.open_streams.dec()
    _observe(request, sub, relay, [d for d in dones if d is not None])
    return sse.response


async def _open(request: web.Request, sse: Framing, fmt: StreamFormat, n: int) -> None:
    if sse.opened:
        return
    await sse.open()
    ctx(request).metrics.open_streams.inc()
    for chunk in fmt.opening(n):
        await sse.send(orjson.dumps(chunk))


async def _write(sse: Framing, fmt: StreamFormat, out: Out, dones: list[Done | None]) -> None:
    if isinstance(out, Idle):
        await sse.keepalive()
    elif isinstance(out, Text):
        await sse.send(orjson.dumps(fmt.text(out)), id=_sse_id(out.index, out.event_id, len(dones)))
    elif isinstance(out, Finished):
        dones[out.index] = out.done
        await sse.send(
            orjson.dumps(fmt.finished(out)), id=_sse_id(out.index, out.event_id, len(dones))
        )
    else:  # Failed after the headers went out: an error event, then the end marker
        await _send_error(sse, fmt, error_from_code(out.error.code, out.error.message))


def _sse_id(index: int, event_id: str, n: int) -> str:
    """``<attempt>-<seq>`` of the job's event (``<choice>:<attempt>-<seq>`` when n > 1)."""
    return event_id if n == 1 else f"{index}:{event_id}"


async def _send_error(sse: Framing, fmt: StreamFormat, e: HeadraceError) -> None:
    await sse.send(orjson.dumps(fmt.error(e)))
    await sse.raw(fmt.end)
