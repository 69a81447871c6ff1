"""Keys: where they come from, how they are kept, and that the edge never runs open."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from edge.app import build_app, start
from edge.auth import KeyStore, basic_password, bearer, load_keys_file
from edge.settings import EdgeSettings
from headrace.servers import ValkeyServer, free_port
from tests.conftest import API_KEY, AuthNatsServer, running
from workers.settings import WorkerSettings


def test_keys_from_env_and_the_api_tokens_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_API_KEYS", raising=False)
    monkeypatch.setenv("API_TOKENS", "one, two")
    store = KeyStore.from_settings(EdgeSettings())
    assert len(store) == 2
    assert store.authenticate("two") is not None
    assert store.authenticate("three") is None
    assert all("two" not in repr(k) for k in store.keys)  # only digests are kept


def test_keys_file_holds_digests_only(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "alice"\nsha256 = "{digest}"\n')
    store = KeyStore.from_settings(EdgeSettings(api_keys="", keys_file=path))
    key = store.authenticate("s3cret")
    assert key is not None
    assert key.name == "alice"
    assert key.id == f"key-{digest[:12]}"


def test_malformed_keys_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "bob"\nsha256 = "abc"\n')
    with pytest.raises(ValueError, match="hex sha256"):
        load_keys_file(path)


def test_the_edge_refuses_to_start_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_API_KEYS", raising=False)
    monkeypatch.delenv("API_TOKENS", raising=False)
    with pytest.raises(ValueError, match="no API keys"):
        build_app(EdgeSettings())


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer ", None),
        (None, None),
    ],
)
def test_bearer_header_parsing(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


@pytest.mark.parametrize(
    ("header", "password"),
    [
        (f"Basic {base64.b64encode(b'anyone:sk-1').decode()}", "sk-1"),
        (f"basic {base64.b64encode(b':sk-1').decode()}", "sk-1"),  # no user name
        (f"Basic {base64.b64encode(b'u:a:b').decode()}", "a:b"),  # only the first colon splits
        (f"Basic {base64.b64encode(b'user-only').decode()}", None),
        (f"Basic {base64.b64encode(b'user:').decode()}", None),
        ("Basic not*base64", None),
        (f"Basic {base64.b64encode(bytes([0xFF, 0x3A, 0x61])).decode()}", None),  # not UTF-8
        ("Bearer sk-1", None),
        (None, None),
    ],
)
def test_basic_header_parsing(header: str | None, password: str | None) -> None:
    assert basic_password(header) == password


def test_anonymous_key_names_exactly_one_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    sha = hashlib.sha256(b"unused").hexdigest()
    path.write_text(
        f'[[keys]]\nname = "anon"\nsha256 = "{sha}"\nmodels = ["echo"]\n\n'
        f'[[keys]]\nname = "twice"\nsha256 = "{sha}"\n\n[[keys]]\nname = "twice"\nsha256 = "{sha}"\n'
    )
    store = KeyStore.from_settings(EdgeSettings(api_keys="sk-a", keys_file=path))
    assert store.anonymous is None  # off by default
    store = KeyStore.from_settings(
        EdgeSettings(api_keys="sk-a", keys_file=path, anonymous_key="anon")
    )
    assert store.anonymous is not None
    assert store.anonymous.models == frozenset({"echo"})
    for name, how in (("anno", "no key"), ("twice", "2 keys")):
        with pytest.raises(ValueError, match=how):
            KeyStore.from_settings(EdgeSettings(api_keys="", keys_file=path, anonymous_key=name))


def test_an_empty_anonymous_key_variable_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_ANONYMOUS_KEY", "")
    assert EdgeSettings(api_keys="sk-a").anonymous_key is None


def write_key(path: Path, name: str, extra: str) -> Path:
    """A keys file with one key, whose secret is ``sk-<name>``."""
    sha = hashlib.sha256(f"sk-{name}".encode()).hexdigest()
    path.write_text(f'[[keys]]\nname = "{name}"\nsha256 = "{sha}"\n{extra}\n')
    return path


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    """``outsider`` may use no live model."""
    return write_key(tmp_path / "keys.toml", "outsider", 'models = ["x"]')


@pytest.fixture
async def start_edge(
    js: JetStreamContext, nats_server: AuthNatsServer, keys_file: Path
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Edges on free ports with ``sk-test-alice`` and the keys file; yields a starter."""
    runners = []

    async def _start(**overrides: Any) -> str:
        settings = EdgeSettings(
            nats_url=nats_server.url,
            **nats_server.login("edge"),
            port=free_port(),
            api_keys=API_KEY,
            keys_file=keys_file,
            no_worker_wait_s=0.5,
            **overrides,
        )
        runners.append(await start(settings, CollectorRegistry()))
        return f"http://127.0.0.1:{settings.port}"

    yield _start
    for runner in runners:
        await runner.cleanup()


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_basic_auth_carries_the_key_on_every_api_family(
    start_edge: Callable[..., Awaitable[str]], worker_settings: WorkerSettings
) -> None:
    edge = await start_edge()
    calls = [
        ("GET", "/v1/models", None),
        ("POST", "/completion", {"prompt": "a b", "n_predict": 2}),
        ("GET", "/api/tags", None),
        ("GET", "/sdapi/v1/samplers", None),
    ]
    async with running(worker_settings), aiohttp.ClientSession(edge) as http:
        for method, path, body in calls:
            good = {"Authorization": aiohttp.encode_basic_auth("any-user-name", API_KEY)}
            async with http.request(method, path, json=body, headers=good) as resp:
                assert resp.status == 200, (path, await resp.text())
            bad = {"Authorization": aiohttp.encode_basic_auth("any-user-name", "sk-wrong")}
            async with http.request(method, path, json=body, headers=bad) as resp:
                assert resp.status == 401, path
                assert "Basic" in resp.headers["WWW-Authenticate"]
            async with http.request(method, path, json=body) as resp:
                assert resp.status == 401, path  # anonymous access is off by default
        bad = {"Authorization": aiohttp.encode_basic_auth("u", "sk-wrong")}
        async with http.get("/api/tags", headers=bad) as resp:
            assert await resp.json() == {"error": "Incorrect API key provided"}  # Ollama's shape


async def test_anonymous_requests_get_the_named_keys_limits(
    js: JetStreamContext,
    nats_server: AuthNatsServer,
    valkey: ValkeyServer,
    tmp_path: Path,
    worker_settings: WorkerSettings,
) -> None:
    settings = EdgeSettings(
        nats_url=nats_server.url,
        **nats_server.login("edge"),
        port=free_port(),
        api_keys=API_KEY,
        keys_file=write_key(tmp_path / "anon.toml", "anon", 'models = ["echo"]\nrpm = 2'),
        anonymous_key="anon",
        redis_url=valkey.url,
        no_worker_wait_s=0.5,
    )
    runner = await start(settings, CollectorRegistry())
    try:
        async with (
            running(worker_settings),
            aiohttp.ClientSession(f"http://127.0.0.1:{settings.port}") as http,
        ):
            statuses = []
            for _ in range(3):
                async with http.post("/v1/chat/completions", json=CHAT) as resp:
                    statuses.append(resp.status)
                    limit = resp.headers.get("x-ratelimit-limit-requests")
            assert statuses == [200, 200, 429]  # anon's rpm = 2
            assert limit == "2"
            wrong = {"Authorization": "Bearer sk-wrong"}
            async with http.post("/v1/chat/completions", json=CHAT, headers=wrong) as resp:
                assert resp.status == 401  # a wrong key is never served as anonymous
            alice = {"Authorization": f"Bearer {API_KEY}"}
            async with http.post("/v1/chat/completions", json=CHAT, headers=alice) as resp:
                assert resp.status == 200  # a real key keeps its own (no) limits
    finally:
        await runner.cleanup()


async def test_anonymous_requests_get_only_the_named_keys_models(
    start_edge: Callable[..., Awaitable[str]], worker_settings: WorkerSettings
) -> None:
    edge = await start_edge(anonymous_key="outsider")
    alice = {"Authorization": f"Bearer {API_KEY}"}
    async with running(worker_settings), aiohttp.ClientSession(edge) as http:
        async with http.get("/v1/models") as resp:
            assert (await resp.json())["data"] == []
        async with http.get("/v1/models", headers=alice) as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["echo"]
        async with http.post("/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"
        async with http.get("/health/live") as resp:
            assert resp.status == 200
