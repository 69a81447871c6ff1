"""The rate limiter's Redis client: EVALSHA with reload on NOSCRIPT, a hard timeout, a breaker.

Every call is bounded by ``timeout_s`` (socket timeouts and an ``asyncio.timeout`` around the
whole call, with redis-py's own retries off: its default retries with backoff are how one
unreachable Redis ends up hanging every request). A failure opens the breaker, so the
requests that follow skip Redis at once instead of each waiting for the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from edge.metrics import EdgeMetrics
from edge.ratelimit.breaker import Breaker
from edge.ratelimit.scripts import SCRIPTS, Script

log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 30.0


class LimiterDown(Exception):
    """Redis did not answer in time, or the breaker is open: no decision was made."""


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(e, RedisConnectionError | OSError):
        return "connection"
    return "error"


class Buckets:
    """Runs the limiter's scripts in Redis."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        breaker: Breaker,
        metrics: EdgeMetrics,
        fail: str = "open",
    ) -> None:
        self.redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.timeout_s = timeout_s
        self.breaker = breaker
        self.metrics = metrics
        self.fail = fail
        self._last_report = -_LOG_INTERVAL_S
        self._unreported = 0

    async def load(self) -> None:
        """Load the scripts once at start-up (best effort: EVALSHA reloads them on NOSCRIPT)."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 1.0)):
                for script in SCRIPTS:
                    await self.redis.script_load(script.source)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)

    async def reachable(self) -> bool:
        """One PING within the timeout (for readiness; it does not touch the breaker)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def run(self, script: Script, keys: list[str], args: list[Any]) -> list[int]:
        """Run a script; raises LimiterDown when Redis fails or the breaker is open."""
        if not self.breaker.allow():
            raise LimiterDown("the breaker is open")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self._evalsha(script, keys, args)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            raise LimiterDown(_reason(e)) from e
        self.metrics.redis_seconds.labels(script.name).observe(time.perf_counter() - started)
        self._succeeded()
        return [int(v) for v in result]

    async def _evalsha(self, script: Script, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            result: list[Any] = await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or its script cache was flushed: load it again, once.
            await self.redis.script_load(script.source)
            result = await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        return result

    def _failed(self, e: BaseException) -> None:
        reason = _reason(e)
        self.metrics.redis_failures.labels(reason).inc()
        if self.breaker.failed():
            self.metrics.breaker_open.set(1)
        self._unreported += 1
        now = time.monotonic()
        if now - self._last_report >= _LOG_INTERVAL_S:  # once per interval, not once per request
            log.warning(
                "rate limiter: Redis failed (%s, %d time(s) since the last report); failing %s",
                reason,
                self._unreported,
                self.fail,
            )
            self._last_report, self._unreported = now, 0

    def _succeeded(self) -> None:
        if self.breaker.failures:
            if self.breaker.is_open:
                log.warning("rate limiter: Redis answers again; limits apply")
            self.breaker.succeeded()
            self.metrics.breaker_open.set(0)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()
