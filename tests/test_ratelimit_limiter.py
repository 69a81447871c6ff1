"""The limiter against a real valkey: exact windows, settlement, leases, scripts, Redis trouble."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio

from edge.auth import ApiKey, digest
from edge.metrics import EdgeMetrics
from edge.ratelimit.admission import Limiter, Ticket, token_estimate
from edge.ratelimit.headers import duration
from edge.ratelimit.limits import Limits, megapixel_steps
from edge.ratelimit.scripts import keys_of
from edge.settings import EdgeSettings
from headrace.servers import ValkeyServer
from schemas.errors import Unavailable
from schemas.jobs import ChatMessage, TextParams

Make = Callable[..., Any]


def key(name: str = "alice", **limits: int) -> ApiKey:
    d = digest(name)
    return ApiKey(id=f"key-{d.hex()[:12]}", name=name, sha256=d, limits=Limits(**limits))


@pytest.fixture
async def make(valkey: ValkeyServer) -> AsyncIterator[Make]:
    """Limiters on the test's valkey (several of them stand for several edges)."""
    made: list[Limiter] = []

    async def _make(window_s: float = 60.0, **settings: Any) -> Limiter:
        s = EdgeSettings(redis_url=valkey.url, api_keys="x", **settings)
        limiter = Limiter(s, EdgeMetrics(), window_s=window_s)
        await limiter.start()
        made.append(limiter)
        return limiter

    yield _make
    for limiter in made:
        await limiter.close()


async def tokens_in_window(valkey: ValkeyServer, k: ApiKey) -> int:
    async with redis.asyncio.Redis.from_url(valkey.url) as r:
        return int(await r.get(keys_of(k.id)["tok_sum"]) or 0)


async def test_requests_per_minute_is_exact_across_limiters(make: Make) -> None:
    edges = [await make() for _ in range(3)]
    k = key(rpm=20)
    tickets: list[Ticket] = await asyncio.gather(*(edges[i % 3].admit(k) for i in range(60)))
    admitted = [t for t in tickets if t.refusal is None]
    refused = [t for t in tickets if t.refusal is not None]
    assert len(admitted) == 20
    assert {t.refusal.limit for t in refused if t.refusal} == {"requests"}
    assert all(t.headers["x-ratelimit-remaining-requests"] == "0" for t in refused)
    assert sorted(int(t.headers["x-ratelimit-remaining-requests"]) for t in admitted) == list(
        range(20)
    )
    assert all(t.headers["x-ratelimit-limit-requests"] == "20" for t in tickets)
    retry = refused[0].refusal.retry_after_s if refused[0].refusal else 0
    assert 55 < retry <= 60  # the oldest charge leaves the window a minute after it was made


async def test_the_window_slides(make: Make) -> None:
    limiter = await make(window_s=0.5)
    k = key(rpm=2)
    assert (await limiter.admit(k)).refusal is None
    assert (await limiter.admit(k)).refusal is None
    refused = await limiter.admit(k)
    assert refused.refusal is not None
    assert refused.refusal.retry_after_s <= 0.5
    await asyncio.sleep(0.6)
    assert (await limiter.admit(k)).refusal is None


async def test_tokens_are_settled_with_real_usage(make: Make, valkey: ValkeyServer) -> None:
    limiter = await make()
    k = key(tpm=1000)
    first = await limiter.admit(k, tokens=300)
    assert first.headers["x-ratelimit-remaining-tokens"] == "700"
    await limiter.settle(first, 120)
    assert await tokens_in_window(valkey, k) == 120
    second = await limiter.admit(k, tokens=100)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 120 - 100)
    await limiter.settle(second, 250)  # more than estimated: the excess is charged too
    assert await tokens_in_window(valkey, k) == 370
    await limiter.settle(second, 10)  # settled once only
    assert await tokens_in_window(valkey, k) == 370
    third = await limiter.admit(k, tokens=700)
    assert third.refusal is not None
    assert third.refusal.limit == "tokens"
    assert "tokens per minute" in third.refusal.message


async def test_an_estimate_past_the_limit_waits_for_an_empty_window(make: Make) -> None:
    limiter = await make()
    k = key(tpm=100)
    big = await limiter.admit(k, tokens=5000)
    assert big.refusal is None
    assert big.tokens == 100
    assert (await limiter.admit(k, tokens=1)).refusal is not None


async def test_excess_is_charged_when_the_estimate_already_left_the_window(
    make: Make, valkey: ValkeyServer
) -> None:
    limiter = await make(window_s=0.3)
    k = key(tpm=1000)
    ticket = await limiter.admit(k, tokens=50)
    await asyncio.sleep(0.4)  # a long job: its admission charge expired meanwhile
    await limiter.settle(ticket, 80)
    assert await tokens_in_window(valkey, k) == 30


async def test_parallel_leases_are_released_renewed_and_expire(make: Make) -> None:
    a = await make(ratelimit_lease_ttl_s=0.3)
    b = await make(ratelimit_lease_ttl_s=0.3)
    k = key(max_parallel=1)
    held = await a.admit(k)
    assert held.refusal is None
    refused = await b.admit(k)
    assert refused.refusal is not None
    assert refused.refusal.limit == "parallel_requests"
    await a.settle(held)  # released: the next one fits at once
    held = await b.admit(k)
    assert held.refusal is None
    await asyncio.sleep(0.8)  # b renews its lease every 0.1 s
    assert (await a.admit(k)).refusal is not None
    await b.close()  # an edge that stops renewing (as a killed one): its lease expires
    await asyncio.sleep(0.4)
    assert (await a.admit(k)).refusal is None


async def test_images_budget(make: Make) -> None:
    limiter = await make()
    k = key(image_budget=10)
    cost = megapixel_steps(512, 512, 30)
    assert cost == 8
    assert (await limiter.admit(k, images=cost)).refusal is None
    refused = await limiter.admit(k, images=cost)
    assert refused.refusal is not None
    assert refused.refusal.limit == "images"
    assert (await limiter.admit(k, images=2)).refusal is None


async def test_scripts_are_reloaded_after_noscript(make: Make, valkey: ValkeyServer) -> None:
    limiter = await make()
    k = key(rpm=5)
    assert (await limiter.admit(k)).refusal is None
    async with redis.asyncio.Redis.from_url(valkey.url) as r:
        await r.script_flush()
    t = await limiter.admit(k)
    assert t.refusal is None
    assert t.recorded
    assert t.headers["x-ratelimit-remaining-requests"] == "3"


async def test_keys_without_limits_never_touch_redis(make: Make, valkey: ValkeyServer) -> None:
    limiter = await make()
    valkey.stop()
    ticket = await limiter.admit(key())
    assert ticket.refusal is None
    assert ticket.headers == {}
    assert limiter.buckets.breaker.failures == 0


def _failures(limiter: Limiter) -> float:
    return sum(
        s.value
        for m in limiter.metrics.redis_failures.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


async def test_a_hung_redis_costs_one_timeout_then_the_breaker_skips_it(
    make: Make, valkey: ValkeyServer
) -> None:
    timeout_s = 0.1
    opened = await make(redis_timeout_s=timeout_s, ratelimit_breaker_s=0.5)
    closed = await make(redis_timeout_s=timeout_s, ratelimit_breaker_s=0.5, ratelimit_fail="closed")
    k = key(rpm=3)
    assert valkey.proc is not None
    os.kill(valkey.proc.pid, signal.SIGSTOP)  # hung, not gone: every call would wait
    try:
        started = time.monotonic()
        tickets = await asyncio.gather(*(opened.admit(k) for _ in range(20)))
        assert time.monotonic() - started < timeout_s + 0.5
        assert all(t.refusal is None and not t.recorded for t in tickets)  # failed open
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await closed.admit(k)
            assert time.monotonic() - started < timeout_s + 0.5
        assert opened.buckets.breaker.is_open
        assert closed.buckets.breaker.is_open
        calls = _failures(opened)
        await asyncio.gather(*(opened.admit(k) for _ in range(50)))
        assert _failures(opened) == calls  # the open breaker skipped Redis
    finally:
        os.kill(valkey.proc.pid, signal.SIGCONT)
    await asyncio.sleep(0.6)  # past the cooldown: the next call probes and closes the breaker
    # (A fresh key: the calls that timed out were still queued in valkey, and ran on SIGCONT.)
    admitted = [await opened.admit(key("bob", rpm=3)) for _ in range(5)]
    assert [t.refusal is None for t in admitted] == [True, True, True, False, False]
    assert not opened.buckets.breaker.is_open


async def test_limits_apply_again_after_redis_restarts(make: Make, valkey: ValkeyServer) -> None:
    limiter = await make(redis_timeout_s=0.1, ratelimit_breaker_s=0.2)
    k = key(rpm=2)
    assert (await limiter.admit(k)).recorded
    valkey.stop()
    assert not (await limiter.admit(k)).recorded  # refused connection: fails open at once
    valkey.start()  # same port, empty: buckets and script cache are gone
    await asyncio.sleep(0.3)
    admitted = [await limiter.admit(k) for _ in range(3)]
    assert [t.refusal is None for t in admitted] == [True, True, False]


def test_token_estimate() -> None:
    chat = TextParams(messages=[ChatMessage(role="user", content="x" * 40)], max_tokens=50, seed=1)
    assert token_estimate([chat], 256) == 10 + 4 + 50
    ids = TextParams(prompt=[1, 2, 3], max_tokens=None, seed=1)
    assert token_estimate([ids, ids], 100) == 3 + 200  # the prompt once, each completion


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (120, "120ms"),
        (1000, "1s"),
        (8640, "8.64s"),
        (60_000, "1m0s"),
        (90_500, "1m30.5s"),
    ],
)
def test_durations_are_written_as_openai_does(ms: int, text: str) -> None:
    assert duration(ms) == text
