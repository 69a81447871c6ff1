"""The broker restarts under load: nothing accepted is lost or hangs, nobody runs a command.

A real nats-server is stopped (SIGTERM) or killed (SIGKILL) while requests are in
flight through a real edge to an echo worker, then started again on the same port:
with its store (a restart), or with an empty one (a replaced node).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from nats.js import JetStreamContext

from headrace.bench.restarts import TOKENS, ask
from headrace.servers import NatsServer
from tests.conftest import API_KEY, running
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

pytestmark = pytest.mark.slow


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        yield session


@pytest.fixture
def slow_worker(worker_settings: WorkerSettings) -> WorkerSettings:
    return worker_settings.model_copy(update={"slots": 32})


async def _restart_under_load(
    nats_server: NatsServer,
    edge: str,
    http: aiohttp.ClientSession,
    how: str,
    *,
    n: int = 20,
) -> tuple[list[tuple[str, str]], float]:
    """``n`` requests in flight (half streamed), the broker restarted ``how``; returns every
    outcome and the seconds from the broker's return to the last answer."""
    asks = [asyncio.create_task(ask(http, edge, i, stream=i % 2 == 0)) for i in range(n)]
    await asyncio.sleep(0.6)  # every request accepted and generating
    if how == "sigkill":
        nats_server.kill()
    else:
        nats_server.stop()
    if how == "empty":
        shutil.rmtree(nats_server.data_dir)
    await asyncio.sleep(0.3)
    nats_server.start()
    back = time.monotonic()
    _, hung = await asyncio.wait(asks, timeout=60)  # their own deadline is 600 s
    assert not hung, f"{len(hung)} of {n} requests hung: {sorted(asks.index(t) for t in hung)}"
    return [t.result() for t in asks], time.monotonic() - back


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_in_flight_requests_survive_a_broker_restart(
    nats_server: NatsServer,
    js: JetStreamContext,
    edge: str,
    slow_worker: WorkerSettings,
    http: aiohttp.ClientSession,
    how: str,
) -> None:
    async with running(slow_worker, EchoEngine(token_delay_s=0.05)):
        outcomes, _ = await _restart_under_load(nats_server, edge, http, how)
        assert [kind for kind, _ in outcomes] == ["ok"] * 20
        # The same text as an undisturbed run of the same request: nothing repeated or missing.
        for i, (_, text) in enumerate(outcomes):
            kind, again = await ask(http, edge, i, stream=False)
            assert (kind, text) == ("ok", again)
            assert len(text.split()) == TOKENS


async def test_a_replaced_broker_with_an_empty_store_recovers_by_itself(
    nats_server: NatsServer,
    js: JetStreamContext,
    edge: str,
    slow_worker: WorkerSettings,
    http: aiohttp.ClientSession,
) -> None:
    async with running(slow_worker, EchoEngine(token_delay_s=0.05)):
        outcomes, took_s = await _restart_under_load(nats_server, edge, http, "empty")
        # Whatever ran while the state was lost ends with its text or a clear error, promptly.
        for kind, what in outcomes:
            assert kind == "ok" or (kind in ("http 503", "error") and what == "unavailable")
        # New requests work without anyone provisioning anything.
        for _ in range(150):
            if (await ask(http, edge, 99, stream=False))[0] == "ok":
                break
            await asyncio.sleep(0.2)
        kind, text = await ask(http, edge, 100, stream=True)
        assert kind == "ok"
        assert len(text.split()) == TOKENS
        assert took_s < 45  # a lost event fails its stream once the gap has waited 20 s
