"""Per request: admit against the key's limits, then settle the tokens and release the lease.

Charged at admission: one request, an estimate of the tokens (prompt plus the completion
budget), the image budget, and a parallel-request lease. Settled when the request ends:
the estimate is replaced by the real usage (streamed or not, cancelled or not) and the
lease is released. Leases live ``lease_ttl_s`` unless renewed; this edge renews its own
every third of that, so a crashed edge's leases expire on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from edge.auth import ApiKey
from edge.metrics import EdgeMetrics
from edge.ratelimit.breaker import Breaker
from edge.ratelimit.buckets import Buckets, LimiterDown
from edge.ratelimit.headers import duration, rate_headers
from edge.ratelimit.scripts import ADMIT, DENIED, RENEW, SETTLE, keys_of
from edge.settings import EdgeSettings
from schemas.errors import RateLimited, Unavailable
from schemas.jobs import EmbedParams, TextParams

log = logging.getLogger(__name__)

_PER_MESSAGE_TOKENS = 4  # what a chat template adds around each message, roughly
_RENEW_BATCH = 500


def prompt_estimate(p: TextParams) -> int:
    """Prompt tokens, estimated without a tokenizer: token ids counted, text at 4 characters a token."""
    if isinstance(p.prompt, list):
        return len(p.prompt)
    chars = len(p.prompt or "") + sum(len(m.content) for m in p.messages or [])
    return math.ceil(chars / 4) + _PER_MESSAGE_TOKENS * len(p.messages or [])


def embed_estimate(p: EmbedParams) -> int:
    """An embedding request's tokens, estimated as prompts are: every input is a prompt."""
    return sum(len(i) if isinstance(i, list) else math.ceil(len(i) / 4) for i in p.inputs)


def token_estimate(params: list[TextParams], completion_default: int) -> int:
    """What a text request is charged at admission: the prompt once (as ``usage`` counts it)
    plus every choice's ``max_tokens`` (or ``completion_default`` when unset)."""
    if not params:
        return 0
    completions = sum(p.max_tokens or completion_default for p in params)
    return max(prompt_estimate(p) for p in params) + completions


@dataclass
class Ticket:
    """What one request was charged, until it is settled (once)."""

    key: ApiKey
    charge_id: str
    tokens: int = 0  # charged at admission (the estimate)
    prompt_tokens: int = 0  # the estimate's prompt part, for jobs that end without usage
    leased: bool = False
    recorded: bool = False  # the charges are in Redis (not when the limiter failed open)
    headers: dict[str, str] = field(default_factory=dict)
    refusal: RateLimited | None = None
    settled: bool = False

    @property
    def counts_tokens(self) -> bool:
        """True when the real token usage of this request is to be charged."""
        return self.recorded and self.key.limits.tpm is not None


class Limiter:
    """Admission, settlement and lease renewal against Redis, for every key of this edge."""

    def __init__(
        self,
        settings: EdgeSettings,
        metrics: EdgeMetrics,
        *,
        window_s: float = 60.0,
        breaker_failures: int = 3,
    ) -> None:
        self.metrics = metrics
        self.buckets = Buckets(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            breaker=Breaker(breaker_failures, settings.ratelimit_breaker_s),
            metrics=metrics,
            fail=settings.ratelimit_fail,
        )
        self.fail_closed = settings.ratelimit_fail == "closed"
        self.window_ms = int(window_s * 1000)
        self.lease_ttl_ms = int(settings.ratelimit_lease_ttl_s * 1000)
        self.completion_default = settings.ratelimit_completion_estimate
        self.leases: dict[str, set[str]] = {}  # key id -> lease ids this edge holds
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    async def start(self) -> None:
        """Load the scripts and start renewing leases."""
        await self.buckets.load()
        self._renewer = asyncio.create_task(self._renew_forever())

    async def close(self) -> None:
        """Stop renewing (held leases then expire), drop pending settlements, close Redis."""
        # The renewer stops between two calls: cancelling it inside one leaves that
        # connection's socket behind, unclosed.
        self._closing.set()
        if self._renewer is not None:
            await asyncio.gather(self._renewer, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.buckets.close()

    async def admit(self, key: ApiKey, *, tokens: int = 0, images: int = 0) -> Ticket:
        """Charge one request; the ticket's ``refusal`` is set when a limit refuses it.

        Raises Unavailable when Redis cannot decide and the edge fails closed.
        """
        ticket = Ticket(key, secrets.token_hex(8))
        lim = key.limits
        if not lim.any:
            return ticket
        # A request larger than the whole limit waits for an empty window rather than never fitting.
        ticket.tokens = min(tokens, lim.tpm) if lim.tpm else 0
        images = min(images, lim.image_budget) if lim.image_budget else 0
        k = keys_of(key.id)
        try:
            denied, retry_ms, req_used, req_reset, tok_used, tok_reset = await self.buckets.run(
                ADMIT,
                [k["req"], k["req_sum"], k["tok"], k["tok_sum"], k["img"], k["img_sum"], k["par"]],
                [ticket.charge_id, self.window_ms, self.lease_ttl_ms, lim.rpm or 0, lim.tpm or 0,
                 lim.image_budget or 0, lim.max_parallel or 0, ticket.tokens, images],
            )  # fmt: skip
        except LimiterDown:
            return self._down(ticket)
        ticket.headers = rate_headers(lim, (req_used, req_reset), (tok_used, tok_reset))
        if denied:
            ticket.refusal = _refusal(key, DENIED[denied], retry_ms, ticket.tokens, images)
            self.metrics.ratelimit.labels("limited", DENIED[denied]).inc()
            return ticket
        ticket.recorded = True
        if lim.max_parallel is not None:
            ticket.leased = True
            self.leases.setdefault(key.id, set()).add(ticket.charge_id)
        self.metrics.ratelimit.labels("admitted", "none").inc()
        return ticket

    def _down(self, ticket: Ticket) -> Ticket:
        if self.fail_closed:
            self.metrics.ratelimit.labels("fail_closed", "none").inc()
            raise Unavailable("rate limits cannot be checked right now; retry shortly")
        self.metrics.ratelimit.labels("fail_open", "none").inc()
        return ticket  # served, uncharged: nothing to settle

    async def settle(
        self, ticket: Ticket, used: int | Coroutine[Any, Any, int] | None = None
    ) -> None:
        """Release the lease and charge the real token usage, once per ticket.

        ``used`` is the usage, None to let the estimate stand, or a coroutine that finds the
        usage (jobs still finishing): then the lease is released now and the tokens later.
        """
        if ticket.settled or not (ticket.recorded or ticket.leased):
            _discard(used)
            return
        ticket.settled = True
        release = self._release(ticket)
        if not isinstance(used, Coroutine):
            await self._settle(ticket, used if ticket.counts_tokens else None, release)
            return
        if not ticket.counts_tokens:
            used.close()
            await self._settle(ticket, None, release)
            return
        await self._settle(ticket, None, release)
        task = asyncio.create_task(self._settle_when(ticket, used))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_when(self, ticket: Ticket, usage: Coroutine[Any, Any, int]) -> None:
        try:
            used = await usage
        except Exception as e:
            log.warning("rate limiter: the usage of a request is unknown (%s)", type(e).__name__)
            return  # the estimate stands
        await self._settle(ticket, used, release=False)

    def _release(self, ticket: Ticket) -> bool:
        """Forget the ticket's lease here (no more renewals); True when it holds one."""
        if not ticket.leased:
            return False
        held = self.leases.get(ticket.key.id)
        if held is not None:
            held.discard(ticket.charge_id)
            if not held:
                del self.leases[ticket.key.id]
        return True

    async def _settle(self, ticket: Ticket, used: int | None, release: bool) -> None:
        if (used is None or used == ticket.tokens) and not release:
            return
        k = keys_of(ticket.key.id)
        tokens = -1 if used is None else max(0, used)
        # On failure the estimate stands and the lease expires by itself.
        with contextlib.suppress(LimiterDown):
            await self.buckets.run(
                SETTLE,
                [k["tok"], k["tok_sum"], k["par"]],
                [ticket.charge_id, self.window_ms, ticket.tokens, tokens, int(release)],
            )

    async def _renew_forever(self) -> None:
        """Push back the expiry of this edge's leases, every third of their lifetime."""
        while True:
            try:
                async with asyncio.timeout(self.lease_ttl_ms / 3000):
                    await self._closing.wait()
                return  # close() was called
            except TimeoutError:
                pass  # time to renew
            for key_id, held in list(self.leases.items()):
                ids = list(held)
                for i in range(0, len(ids), _RENEW_BATCH):
                    with contextlib.suppress(LimiterDown):
                        await self.buckets.run(
                            RENEW,
                            [keys_of(key_id)["par"]],
                            ["", 0, self.lease_ttl_ms, *ids[i : i + _RENEW_BATCH]],
                        )


def _discard(used: object) -> None:
    if isinstance(used, Coroutine):
        used.close()


def _refusal(key: ApiKey, limit: str, retry_ms: int, tokens: int, images: int) -> RateLimited:
    """A 429 that says which limit refused and when to retry, as OpenAI words it."""
    lim = key.limits
    retry_s = max(retry_ms, 0) / 1000
    if limit == "parallel_requests":
        return RateLimited(
            f"Too many parallel requests: the limit is {lim.max_parallel}. "
            "Retry when one of them has finished.",
            limit=limit,
            retry_after_s=1.0,
        )
    per_minute = {
        "requests": (lim.rpm, "requests per minute (RPM)", 1),
        "tokens": (lim.tpm, "tokens per minute (TPM)", tokens),
        "images": (lim.image_budget, "megapixel-steps per minute", images),
    }
    value, what, requested = per_minute[limit]
    return RateLimited(
        f"Rate limit reached on {what}: limit {value}, requested {requested}. "
        f"Please try again in {duration(retry_ms)}.",
        limit=limit,
        retry_after_s=retry_s,
    )
