"""CORS through the real edge: preflights for every route, and the allowed origin on answers,
streamed ones included. A browser's fetch is what these requests imitate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from edge.app import build_app, start
from edge.cors import CorsPolicy
from edge.settings import EdgeSettings
from headrace.servers import free_port
from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

GAME = "https://game.example"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 3}

StartEdge = Callable[[str], Awaitable[str]]


@pytest.fixture
async def start_edge(js: JetStreamContext, edge_settings: EdgeSettings) -> AsyncIterator[StartEdge]:
    """Edges with the test keys and the given ``HEADRACE_CORS_ORIGINS``."""
    runners = []

    async def _start(origins: str) -> str:
        settings = edge_settings.model_copy(update={"port": free_port(), "cors_origins": origins})
        runners.append(await start(settings, CollectorRegistry()))
        return f"http://127.0.0.1:{settings.port}"

    yield _start
    for runner in runners:
        await runner.cleanup()


def preflight(method: str, origin: str = GAME) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/chat/completions"),
        ("GET", "/v1/models/echo"),
        ("GET", "/v1/jobs/0123abcd/events"),
        ("POST", "/completion"),
        ("POST", "/template"),
        ("POST", "/api/chat"),
        ("POST", "/api/show"),
        ("POST", "/sdapi/v1/txt2img"),
        ("GET", "/sdapi/v1/progress"),
        ("POST", "/v1/images/generations"),
        ("GET", "/health"),
    ],
)
async def test_preflight_is_answered_for_every_route_without_a_key(
    start_edge: StartEdge, method: str, path: str
) -> None:
    edge = await start_edge(f"https://other.example, {GAME}")
    async with (
        aiohttp.ClientSession() as http,
        http.options(f"{edge}{path}", headers=preflight(method)) as r,
    ):
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == GAME
        assert r.headers["Access-Control-Allow-Methods"] == method
        assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert int(r.headers["Access-Control-Max-Age"]) > 0
        assert "Origin" in r.headers["Vary"]


async def test_preflights_that_are_not_answered(start_edge: StartEdge) -> None:
    edge = await start_edge(GAME)
    async with aiohttp.ClientSession(edge) as http:
        for path, headers in (
            ("/v1/chat/completions", preflight("POST", "https://evil.example")),
            ("/v1/chat/completions", preflight("DELETE")),  # not a method of the route
            ("/no/such/route", preflight("GET")),
        ):
            async with http.options(path, headers=headers) as r:
                assert r.status != 204, (path, headers)
                assert "Access-Control-Allow-Methods" not in r.headers
        async with http.get("/v1/models", headers={**AUTH, "Origin": "https://evil.example"}) as r:
            assert r.status == 200
            assert "Access-Control-Allow-Origin" not in r.headers
            assert r.headers["Vary"] == "Origin"  # caches keep the answers per origin apart


async def test_answers_carry_the_origin_streamed_ones_too(
    start_edge: StartEdge, worker_settings: WorkerSettings
) -> None:
    edge = await start_edge(GAME)
    headers = {**AUTH, "Origin": GAME}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {**CHAT, "stream": True}),  # SSE
        ("/completion", {"prompt": "a b", "n_predict": 2, "stream": True}),  # data-only SSE
        ("/api/chat", {"model": "echo", "messages": CHAT["messages"]}),  # NDJSON
        ("/v1/chat/completions", CHAT),
    ]
    async with running(worker_settings), aiohttp.ClientSession(edge, headers=headers) as http:
        for path, body in calls:
            async with http.post(path, json=body) as r:
                assert r.status == 200
                await r.read()
                assert r.headers["Access-Control-Allow-Origin"] == GAME, path
                exposed = r.headers["Access-Control-Expose-Headers"]
                assert "x-headrace-job-ids" in exposed
                assert "x-request-id" in exposed
    async with (
        aiohttp.ClientSession(edge) as http,
        http.get("/v1/models", headers={"Origin": GAME}) as r,  # no key
    ):
        assert r.status == 401
        assert r.headers["Access-Control-Allow-Origin"] == GAME  # the page can read why


async def test_any_origin_and_off_by_default(start_edge: StartEdge, edge: str) -> None:
    anywhere = await start_edge("*")
    async with aiohttp.ClientSession() as http:
        async with http.options(
            f"{anywhere}/v1/chat/completions", headers=preflight("POST", "https://x.example")
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "Vary" not in r.headers
        async with http.options(f"{edge}/v1/chat/completions", headers=preflight("POST")) as r:
            assert r.status != 204  # the default edge: CORS off
            assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("bad", ["https://game.example/", "game.example", "https://a b"])
def test_malformed_origins_stop_the_edge_from_starting(bad: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        CorsPolicy.parse(f"{GAME},{bad}")
    with pytest.raises(ValueError, match="not an origin"):
        build_app(EdgeSettings(api_keys=API_KEY, cors_origins=bad))


def test_an_empty_list_is_off() -> None:
    assert CorsPolicy.parse(" , ") is None
    policy = CorsPolicy.parse("HTTPS://Game.Example")
    assert policy is not None
    assert policy.allow("https://game.example") == "https://game.example"
