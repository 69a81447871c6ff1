"""Rate limits through real edges sharing one valkey, with nats-server and an echo worker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from edge.app import start
from edge.auth import digest
from edge.ratelimit.scripts import keys_of
from edge.settings import EdgeSettings
from headrace.servers import ValkeyServer, free_port
from schemas.client import JobClient
from tests.conftest import AuthNatsServer, finished_history, running
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

CHAT = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
HEADERS = ("limit", "remaining", "reset")

StartEdge = Callable[..., Awaitable[str]]


def secret(name: str) -> str:
    return f"sk-{name}"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(name)}"}


def key_id(name: str) -> str:
    return f"key-{digest(secret(name)).hex()[:12]}"


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    """Keys with limits, the secret of each being ``sk-<name>``."""
    keys = {
        "hundred": "rpm = 100",
        "tokens": "tpm = 100000",
        "headers": "rpm = 50\ntpm = 10000",
        "two": "rpm = 2",
        "pair": "max_parallel = 2",
        "solo": "max_parallel = 1",
        "plenty": "rpm = 100000",
        "three": "rpm = 3",
        "echo-only": 'models = ["echo"]\nrpm = 100',
        "nothing": 'models = ["another"]',
    }
    text = ""
    for name, limits in keys.items():
        sha = hashlib.sha256(secret(name).encode()).hexdigest()
        text += f'[[keys]]\nname = "{name}"\nsha256 = "{sha}"\n{limits}\n\n'
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


@pytest.fixture
async def start_edge(
    js: JetStreamContext, nats_server: AuthNatsServer, valkey: ValkeyServer, keys_file: Path
) -> AsyncIterator[StartEdge]:
    """Edges in this event loop on free ports, sharing the test's valkey; yields a starter."""
    runners = []

    async def _start(**overrides: Any) -> str:
        port = free_port()
        settings = EdgeSettings(
            nats_url=nats_server.url,
            **nats_server.login("edge"),
            port=port,
            api_keys="",
            keys_file=keys_file,
            redis_url=valkey.url,
            first_event_wait_s=0.5,
            keepalive_s=0.2,
            no_worker_wait_s=0.5,
            **overrides,
        )
        runners.append(await start(settings, CollectorRegistry()))
        return f"http://127.0.0.1:{port}"

    yield _start
    for runner in runners:
        await runner.cleanup()


@contextlib.contextmanager
def edge_processes(
    count: int,
    server: AuthNatsServer,
    valkey: ValkeyServer,
    keys_file: Path,
    log: Path,
    **env: str,
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """``headrace edge`` processes on free ports; yields (base URL, process) of each."""
    procs = []
    try:
        with log.open("ab") as out:
            for _ in range(count):
                port = free_port()
                environ = dict(
                    os.environ,
                    HEADRACE_PORT=str(port),
                    HEADRACE_NATS_URL=server.url,
                    **server.env("edge"),
                    HEADRACE_REDIS_URL=valkey.url,
                    HEADRACE_KEYS_FILE=str(keys_file),
                    HEADRACE_API_KEYS="",
                    HEADRACE_LOG_LEVEL="WARNING",
                    **env,
                )
                proc = subprocess.Popen(
                    [sys.executable, "-m", "headrace", "edge"], env=environ, stdout=out, stderr=out
                )
                procs.append((f"http://127.0.0.1:{port}", proc))
        yield procs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


async def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Until the edge answers (without blocking the event loop the worker runs in)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the edge exited"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base}/health/live") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{base} did not come up")


async def chat(
    http: aiohttp.ClientSession, base: str, name: str, **body: Any
) -> tuple[int, dict[str, str], dict[str, Any]]:
    payload = {"model": "echo", "messages": CHAT, "max_tokens": 1, **body}
    async with http.post(f"{base}/v1/chat/completions", json=payload, headers=auth(name)) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def tokens_charged(valkey: ValkeyServer, name: str) -> int:
    async with redis.asyncio.Redis.from_url(valkey.url) as r:
        return int(await r.get(keys_of(key_id(name))["tok_sum"]) or 0)


@pytest.mark.slow
async def test_three_edges_admit_exactly_the_limit(
    js: JetStreamContext,
    nats_server: AuthNatsServer,
    valkey: ValkeyServer,
    keys_file: Path,
    worker_settings: WorkerSettings,
    tmp_path: Path,
) -> None:
    # A generous Redis timeout: on 2 loaded cores a slow answer must not fail open and over-admit.
    with edge_processes(
        3, nats_server, valkey, keys_file, tmp_path / "edges.log", HEADRACE_REDIS_TIMEOUT_S="5"
    ) as edges:
        for base, proc in edges:
            await wait_ready(base, proc)
        async with (
            running(worker_settings.model_copy(update={"slots": 16})),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):
            answers = await asyncio.gather(
                *(chat(http, edges[i % 3][0], "hundred") for i in range(300))
            )
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 100
    assert statuses.count(429) == 200
    refused = [(h, body) for status, h, body in answers if status == 429]
    assert all(body["error"]["code"] == "rate_limit_exceeded" for _, body in refused)
    assert all(body["error"]["type"] == "requests" for _, body in refused)
    assert all(int(h["Retry-After"]) >= 1 for h, _ in refused)
    assert all(h["x-ratelimit-remaining-requests"] == "0" for h, _ in refused)


async def test_tokens_are_settled_with_real_usage_streamed_or_cancelled(
    start_edge: StartEdge,
    valkey: ValkeyServer,
    client: JobClient,
    worker_settings: WorkerSettings,
) -> None:
    base = await start_edge()
    async with (
        running(worker_settings, EchoEngine(token_delay_s=0.02)),
        aiohttp.ClientSession() as http,
    ):
        _, _, whole = await chat(http, base, "tokens", max_tokens=5)
        charged = whole["usage"]["total_tokens"]
        assert await tokens_charged(valkey, "tokens") == charged  # not the estimate (prompt + 5)

        body = {"model": "echo", "messages": CHAT, "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        async with http.post(
            f"{base}/v1/chat/completions", json=body, headers=auth("tokens")
        ) as resp:
            raw = await resp.read()
        usage_chunk = [c for c in raw.split(b"\n\n") if b'"usage":{' in c][-1]
        charged += openai_usage(usage_chunk)
        assert await tokens_charged(valkey, "tokens") == charged  # settled before [DONE]

        body = {"model": "echo", "messages": CHAT, "max_tokens": 400, "stream": True}
        resp = await http.post(f"{base}/v1/chat/completions", json=body, headers=auth("tokens"))
        job_id = resp.headers["x-headrace-job-ids"]
        for _ in range(4):
            await resp.content.readuntil(b"\n\n")
        resp.close()  # the client goes away: the job is cancelled after a few tokens
        history = await finished_history(client, job_id)
        done = history[-1].event
        assert done.type == "done"
        assert done.finish_reason == "cancelled"
        charged += done.usage.total_tokens
        for _ in range(100):
            if await tokens_charged(valkey, "tokens") == charged:
                break
            await asyncio.sleep(0.05)
        assert await tokens_charged(valkey, "tokens") == charged  # its real usage, not 400


def openai_usage(chunk: bytes) -> int:
    import orjson

    total: int = orjson.loads(chunk.removeprefix(b"data: "))["usage"]["total_tokens"]
    return total


async def test_headers_on_streamed_and_unstreamed_responses(
    start_edge: StartEdge, worker_settings: WorkerSettings
) -> None:
    base = await start_edge()
    async with running(worker_settings), aiohttp.ClientSession() as http:
        status, first, whole = await chat(http, base, "headers", max_tokens=5)
        assert status == 200
        estimate = int(first["x-ratelimit-limit-tokens"]) - int(
            first["x-ratelimit-remaining-tokens"]
        )
        assert first["x-ratelimit-limit-requests"] == "50"
        assert first["x-ratelimit-remaining-requests"] == "49"
        assert first["x-ratelimit-reset-requests"].endswith("s")
        body = {"model": "echo", "messages": CHAT, "max_tokens": 5, "stream": True}
        async with http.post(
            f"{base}/v1/chat/completions", json=body, headers=auth("headers")
        ) as resp:
            streamed = dict(resp.headers)
            await resp.read()
        assert streamed["Content-Type"].startswith("text/event-stream")
        assert streamed["x-ratelimit-remaining-requests"] == "48"
        # The first request was settled with its real usage; the second charged the same estimate.
        used = whole["usage"]["total_tokens"]
        assert streamed["x-ratelimit-remaining-tokens"] == str(10000 - used - estimate)
        for name in HEADERS:
            assert streamed[f"x-ratelimit-{name}-requests"]
            assert streamed[f"x-ratelimit-{name}-tokens"]

        other = [
            ("POST", "/api/chat", {"model": "echo", "messages": CHAT, "options": {"num_predict": 2}}),
            ("POST", "/completion", {"prompt": "one two", "n_predict": 2, "stream": True}),
            ("GET", "/v1/models", None),
            ("POST", "/tokenize", {"content": "one two"}),
        ]  # fmt: skip
        remaining = []
        for method, path, payload in other:
            async with http.request(
                method, f"{base}{path}", json=payload, headers=auth("headers")
            ) as resp:
                await resp.read()
                assert resp.status == 200, path
                assert resp.headers["x-ratelimit-limit-tokens"] == "10000"
                remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [47, 46, 45, 44]


async def test_refusals_are_openai_429s(
    start_edge: StartEdge, worker_settings: WorkerSettings
) -> None:
    base = await start_edge()
    async with (
        running(worker_settings),
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=secret("two"), max_retries=0) as oai,
    ):
        for _ in range(2):
            await oai.chat.completions.create(model="echo", messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as e:
            await oai.chat.completions.create(model="echo", messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
    assert e.value.status_code == 429
    assert e.value.code == "rate_limit_exceeded"
    assert "requests per minute" in e.value.message
    headers = e.value.response.headers
    assert 55 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert set(e.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


async def test_allowed_models(start_edge: StartEdge, worker_settings: WorkerSettings) -> None:
    base = await start_edge()
    async with running(worker_settings), aiohttp.ClientSession() as http:
        assert (await chat(http, base, "echo-only"))[0] == 200
        status, _, body = await chat(http, base, "nothing")
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        async with http.get(f"{base}/v1/models", headers=auth("nothing")) as resp:
            assert (await resp.json())["data"] == []


async def test_parallel_limit_refuses_one_more_and_frees_when_one_ends(
    start_edge: StartEdge,
    nats_server: AuthNatsServer,
    valkey: ValkeyServer,
    keys_file: Path,
    worker_settings: WorkerSettings,
    tmp_path: Path,
) -> None:
    base = await start_edge()
    slow = {"model": "echo", "messages": CHAT, "max_tokens": 30, "stream": True}
    async with (
        running(worker_settings.model_copy(update={"slots": 4}), EchoEngine(token_delay_s=0.03)),
        aiohttp.ClientSession() as http,
    ):
        url = f"{base}/v1/chat/completions"
        first = await http.post(url, json=slow, headers=auth("pair"))
        second = await http.post(url, json=slow, headers=auth("pair"))
        assert (first.status, second.status) == (200, 200)
        status, _, body = await chat(http, base, "pair")
        assert status == 429
        assert body["error"]["type"] == "parallel_requests"
        await first.read()  # the first one ends: its lease is released before [DONE]
        assert (await chat(http, base, "pair"))[0] == 200
        second.close()

        # An edge killed while it holds a lease: the lease expires after its TTL.
        with edge_processes(
            1, nats_server, valkey, keys_file, tmp_path / "edge.log",
            HEADRACE_RATELIMIT_LEASE_TTL_S="1",
        ) as [(doomed, proc)]:  # fmt: skip
            await wait_ready(doomed, proc)
            held = await http.post(f"{doomed}/v1/chat/completions", json=slow, headers=auth("solo"))
            assert held.status == 200
            await held.content.readuntil(b"\n\n")
            proc.kill()
            proc.wait()
            held.close()
            assert (await chat(http, base, "solo"))[0] == 429
            for _ in range(50):
                await asyncio.sleep(0.1)
                if (await chat(http, base, "solo"))[0] == 200:
                    break
            else:
                raise AssertionError("the killed edge's lease never expired")


@pytest.mark.slow
async def test_valkey_stopped_mid_load_then_restarted(
    start_edge: StartEdge, valkey: ValkeyServer, worker_settings: WorkerSettings
) -> None:
    timeout_s, margin_s = 0.2, 1.5
    common = {"redis_timeout_s": timeout_s, "ratelimit_breaker_s": 0.3}
    fail_open = await start_edge(**common)
    fail_closed = await start_edge(ratelimit_fail="closed", **common)
    results: dict[str, list[tuple[int, float, dict[str, str]]]] = {"open": [], "closed": []}
    stop = asyncio.Event()

    async def load(http: aiohttp.ClientSession, base: str, into: str) -> None:
        while not stop.is_set():
            started = time.monotonic()
            status, headers, _ = await chat(http, base, "plenty")
            results[into].append((status, time.monotonic() - started, headers))

    assert valkey.proc is not None
    async with (
        running(worker_settings.model_copy(update={"slots": 8})),
        aiohttp.ClientSession() as http,
    ):
        loaders = [
            asyncio.create_task(load(http, base, into))
            for base, into in ((fail_open, "open"), (fail_closed, "closed"))
            for _ in range(4)
        ]
        await asyncio.sleep(0.5)
        before = {k: len(v) for k, v in results.items()}
        os.kill(valkey.proc.pid, signal.SIGSTOP)  # mid-load: valkey stops answering
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*loaders)
        valkey.kill()  # then restarted, empty, on the same port
        valkey.start()
        async with http.get(f"{fail_open}/metrics") as resp:
            metrics = await resp.text()
        await asyncio.sleep(0.4)  # the breaker's cooldown
        after = [(await chat(http, fail_open, "three"))[0] for _ in range(5)]

    for into in ("open", "closed"):
        assert before[into] > 0
        assert len(results[into]) > before[into] + 4
        slowest = max(seconds for _, seconds, _ in results[into])
        assert slowest < 2 * timeout_s + margin_s  # admission and settlement each time out
    during_open = {status for status, _, _ in results["open"][before["open"] :]}
    during_closed = [status for status, _, _ in results["closed"][before["closed"] :]]
    assert during_open == {200}  # fails open: served
    assert 503 in during_closed  # fails closed: refused
    assert set(during_closed) <= {200, 503}
    assert "headrace_edge_ratelimit_redis_failures_total" in metrics
    assert 'headrace_edge_ratelimit_decisions_total{limit="none",outcome="fail_open"}' in metrics
    assert after == [200, 200, 200, 429, 429]  # limits apply again, with no restart


async def test_readiness_reports_redis_degraded_or_down(
    start_edge: StartEdge, valkey: ValkeyServer, worker_settings: WorkerSettings
) -> None:
    fail_open = await start_edge(redis_timeout_s=0.2)
    fail_closed = await start_edge(redis_timeout_s=0.2, ratelimit_fail="closed")

    async def ready(http: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, Any]]:
        async with http.get(f"{base}/health/ready") as resp:
            return resp.status, await resp.json()

    async with running(worker_settings), aiohttp.ClientSession() as http:
        assert (await ready(http, fail_open))[1]["status"] == "ready"
        valkey.stop()
        open_status, open_body = await ready(http, fail_open)
        closed_status, closed_body = await ready(http, fail_closed)
    assert open_status == 200  # fails open: still serving, so ready but degraded
    assert open_body["status"] == "degraded"
    assert open_body["degraded"] == ["Redis (rate limits) is unreachable"]
    assert closed_status == 503  # fails closed: limited keys are refused
    assert "Redis (rate limits) is unreachable" in closed_body["reasons"]
