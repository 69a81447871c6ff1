"""The limiter in the request path: admission, OpenAI headers, and settlement from job events.

Text-generation routes admit once they know the token estimate (``admit_text``, called by
``edge.jobs.submit_text``); every other authenticated route is charged one request and holds
a lease while it runs (the middleware). The headers go out with the response's headers,
streamed responses included (``on_response_prepare`` runs before the first byte).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from edge.context import KEY, caller, ctx
from edge.ratelimit.admission import Ticket, prompt_estimate, token_estimate
from edge.relay import Choice, Relay
from schemas.client import JobClient
from schemas.events import Done
from schemas.jobs import TextParams

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TICKET = web.RequestKey("headrace_ratelimit_ticket", Ticket)

# How long a request that ended early (client gone, deadline) waits for its cancelled jobs'
# ``done`` to learn their real usage; a cancelled job stops within one token.
SETTLE_WAIT_S = 10.0

_SELF_ADMITTING: set[Handler] = set()
_UNCHARGED: set[Handler] = set()


def admits_itself(handler: Handler) -> Handler:
    """Mark a route that admits itself once it knows its token estimate (text generation)."""
    _SELF_ADMITTING.add(handler)
    return handler


async def admit(request: web.Request, *, tokens: int = 0, images: int = 0) -> Ticket | None:
    """Charge this request to its key; raises RateLimited (429) when a limit refuses it."""
    limiter = ctx(request).limiter
    if limiter is None:
        return None
    ticket = await limiter.admit(caller(request), tokens=tokens, images=images)
    request[TICKET] = ticket  # its headers go out with the response, a 429 included
    if ticket.refusal is not None:
        raise ticket.refusal
    return ticket


async def admit_text(request: web.Request, params: list[TextParams]) -> Ticket | None:
    """Admit a text request, charging prompt plus completion budget as its token estimate."""
    limiter = ctx(request).limiter
    if limiter is None:
        return None
    ticket = await admit(request, tokens=token_estimate(params, limiter.completion_default))
    if ticket is not None:
        ticket.prompt_tokens = max((prompt_estimate(p) for p in params), default=0)
    return ticket


def uncharged(handler: Handler) -> Handler:
    """Mark a route that costs nothing: a poll clients repeat every second (A1111 progress)."""
    _UNCHARGED.add(handler)
    return handler


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit non-text routes; whatever happens, release the lease and refund an unsettled estimate."""
    limiter = ctx(request).limiter
    if limiter is None or KEY not in request or request.match_info.handler in _UNCHARGED:
        return await handler(request)
    if request.match_info.handler not in _SELF_ADMITTING:
        await admit(request)
    try:
        return await handler(request)
    finally:
        if (ticket := request.get(TICKET)) is not None:
            # Ended before its jobs reported usage (refused, no worker, queue full ...): nothing
            # ran, so the estimate is refunded. Settled tickets make this a no-op.
            await limiter.settle(ticket, 0)


async def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """``x-ratelimit-*`` on the response (on_response_prepare: before a stream's first byte)."""
    ticket = request.get(TICKET)
    if ticket is not None and ticket.headers:
        response.headers.update(ticket.headers)


async def settle(request: web.Request, relay: Relay) -> None:
    """The request is done with its jobs: release its lease and charge what they really used.

    Jobs still running (the client went away, the deadline passed) were just cancelled: their
    ``done`` comes within a token, and the tokens are settled when it arrives.
    """
    c = ctx(request)
    ticket = request.get(TICKET)
    if c.limiter is None or ticket is None:
        return
    if ticket.shared:  # the request that started the shared job pays for it
        await c.limiter.settle(ticket, 0)
        return
    unfinished = [ch for ch in relay.choices if not ch.finished]
    if not unfinished or not ticket.wants_usage:
        await c.limiter.settle(ticket, usage(relay.choices, ticket))
        return
    await c.limiter.settle(ticket, None)  # the lease now; the tokens once the jobs are done
    c.limiter.settle_later(ticket, _follow(c.jobs, relay.choices, ticket))


def usage(choices: Sequence[Choice], ticket: Ticket, dones: dict[int, Done] | None = None) -> int:
    """Tokens used as ``usage`` reports them: the prompt once, every choice's completion.

    A job that never reported usage is charged the completion tokens it sent, plus the
    prompt estimate once a worker took it.
    """
    prompt = completion = 0
    for ch in choices:
        done = ch.done or (dones or {}).get(ch.index)
        if done is not None:
            prompt = max(prompt, done.usage.prompt_tokens)
            completion += done.usage.completion_tokens
        else:
            if ch.started or ch.tokens:
                prompt = max(prompt, ticket.prompt_tokens)
            completion += ch.tokens
    return prompt + completion


async def _follow(jobs: JobClient, choices: list[Choice], ticket: Ticket) -> int:
    """Wait (bounded) for the ``done`` of jobs the request left unfinished; returns the usage."""
    dones: dict[int, Done] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SETTLE_WAIT_S):
            for ch in choices:
                if not ch.finished:
                    async with await jobs.watch(ch.stream.job_id, replay=True) as stream:
                        async for received in stream:
                            if isinstance(received.event, Done):
                                dones[ch.index] = received.event
    return usage(choices, ticket, dones)
