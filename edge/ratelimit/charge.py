"""One request's charge against its key's rate limits: acquired once, settled once."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from edge.auth import ApiKey
from edge.context import caller, ctx
from edge.ratelimit.admission import Limiter, Ticket


class Charge:
    """What one request is charged against its key: acquired once, settled once."""

    def __init__(self, limiter: Limiter | None, key: ApiKey) -> None:
        self.limiter = limiter
        self.key = key
        self.ticket: Ticket | None = None

    @property
    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` for the response (empty when nothing was checked)."""
        return self.ticket.headers if self.ticket is not None else {}

    @property
    def counts_tokens(self) -> bool:
        """True when the request's real token usage is to be charged (the key has a TPM)."""
        return self.ticket is not None and self.ticket.counts_tokens

    @property
    def prompt_estimate(self) -> int:
        """The prompt tokens estimated at admission (charged for a job that reports no usage)."""
        return self.ticket.prompt_tokens if self.ticket is not None else 0

    async def acquire(self, *, tokens: int = 0, images: int = 0, prompt_tokens: int = 0) -> None:
        """Admit the request; raises RateLimited (429) when a limit refuses it."""
        if self.limiter is None:
            return
        if self.ticket is not None:
            raise RuntimeError("a request is charged once")
        self.ticket = await self.limiter.admit(self.key, tokens=tokens, images=images)
        self.ticket.prompt_tokens = prompt_tokens
        if self.ticket.refusal is not None:
            raise self.ticket.refusal

    async def settle(self, used: int | Coroutine[Any, Any, int] | None) -> None:
        """Release the lease and charge ``used`` tokens (a coroutine: what it finds later)."""
        if self.limiter is None or self.ticket is None:
            if isinstance(used, Coroutine):
                used.close()
            return
        await self.limiter.settle(self.ticket, used)


CHARGE = web.RequestKey("headrace_ratelimit_charge", Charge)


def charge_of(request: web.Request) -> Charge:
    """The request's charge (made on first use; its headers go out with the response)."""
    if CHARGE not in request:
        request[CHARGE] = Charge(ctx(request).limiter, caller(request))
    return request[CHARGE]
