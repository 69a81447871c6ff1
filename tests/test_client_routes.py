"""Routes real clients call that the edge lacked: OpenAI's model retrieval, llama.cpp's
unversioned aliases and ``ignore_eos``, and Ollama's show, ps and version, each driven by
the client library itself (openai, ollama), unchanged, against the real edge and an echo worker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from nats.aio.client import Client as NATS

from edge.app import build_app
from edge.settings import EdgeSettings
from schemas.codec import decode_job
from schemas.fleet import VERSION
from schemas.jobs import TextJob
from schemas.subjects import job_subject
from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

ollama = pytest.importorskip("ollama")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"Content-Type": "application/json"}  # raw bytes go out as application/octet-stream
CHAT = [{"role": "user", "content": "red green blue"}]


@pytest.fixture
async def ollama_client(edge: str) -> AsyncIterator[Any]:
    """Ollama's own AsyncClient, pointed at the edge with a Bearer key."""
    client = ollama.AsyncClient(host=edge, headers=AUTH)
    yield client
    await client.close()


async def test_models_retrieve_with_the_openai_sdk(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        model = await oai.models.retrieve("echo")
        with pytest.raises(openai.NotFoundError) as e:
            await oai.models.retrieve("no-such-model")
    assert (model.id, model.object, model.owned_by) == ("echo", "model", "headrace")
    assert model.created > 1_700_000_000
    body = e.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found"
    assert set(body) == {"message", "type", "param", "code"}


async def test_llamacpp_unversioned_paths_with_the_openai_sdk(
    edge: str, worker_settings: WorkerSettings
) -> None:
    # llama.cpp's server answers the OpenAI API without /v1 too: an SDK pointed at the bare host.
    async with (
        running(worker_settings),
        openai.AsyncOpenAI(base_url=edge, api_key=API_KEY, max_retries=0) as bare,
    ):
        models = await bare.models.list()
        chat = await bare.chat.completions.create(model="echo", messages=CHAT, max_tokens=3, seed=1)
        text = await bare.completions.create(model="echo", prompt="a b c", max_tokens=2)
        stream = await bare.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=3, seed=1, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert [m.id for m in models.data] == ["echo"]
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 3
    assert streamed == chat.choices[0].message.content
    assert len((text.choices[0].text or "").split()) == 2


async def test_ignore_eos_reaches_the_job(
    oai: openai.AsyncOpenAI, nc: NATS, worker_settings: WorkerSettings
) -> None:
    seen: list[TextJob] = []

    async def keep(msg: Any) -> None:
        job = decode_job(msg.data)
        assert isinstance(job, TextJob)
        seen.append(job)

    await nc.subscribe(job_subject("llm", "echo"), cb=keep)  # the published jobs, as they go
    await nc.flush()
    async with running(worker_settings):
        extra = {"ignore_eos": True}
        await oai.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=2, extra_body=extra
        )
        await oai.completions.create(model="echo", prompt="x y", max_tokens=2, extra_body=extra)
        await oai.completions.create(model="echo", prompt="x y", max_tokens=2)
    assert [j.params.ignore_eos for j in seen] == [True, True, False]


async def test_ollama_show_ps_and_list_with_the_ollama_client(
    ollama_client: Any, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        listed = await ollama_client.list()
        shown = await ollama_client.show("echo")
        running_now = await ollama_client.ps()
        with pytest.raises(ollama.ResponseError) as e:
            await ollama_client.show("nope")
    assert [m.model for m in listed.models] == ["echo"]
    assert shown.modelinfo == {"general.name": "echo", "general.context_length": 4096}
    assert shown.capabilities == ["completion", "tools"]
    assert shown.details.format == "gguf"
    (loaded,) = running_now.models
    assert (loaded.model, loaded.context_length, loaded.size_vram) == ("echo", 4096, 0)
    assert loaded.expires_at.timestamp() > time.time()  # its worker's heartbeat is fresh
    assert (e.value.status_code, e.value.error) == (404, "model 'nope' not found")


async def test_ollama_version_and_bad_show_bodies(edge: str) -> None:
    async with aiohttp.ClientSession(edge, headers=AUTH) as http:
        async with http.get("/api/version") as r:
            assert await r.json() == {"version": VERSION}
        for body, status in ((b"{}", 400), (b"[1]", 400), (b"{not json", 400)):
            async with http.post("/api/show", data=body, headers=JSON) as r:
                answer = await r.json()
                assert r.status == status
                assert set(answer) == {"error"}, answer  # Ollama's shape
        async with http.post("/api/show", json={"name": "nope"}) as r:  # older clients' field
            assert r.status == 404


async def test_unknown_models_on_the_new_openai_routes_are_404s(edge: str) -> None:
    async with aiohttp.ClientSession(edge, headers=AUTH) as http:
        for path in ("/v1/models/nope", "/v1/models/org/nope"):
            async with http.get(path) as r:
                assert r.status == 404
                assert orjson.loads(await r.read())["error"]["code"] == "model_not_found"
        async with http.post("/chat/completions", data=b"{oops", headers=JSON) as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "invalid_request_error"
        bad = {"model": "echo", "messages": CHAT, "ignore_eos": [1]}
        async with http.post("/v1/chat/completions", json=bad) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "ignore_eos"


NEW_PATHS = {
    "/v1/models/{model}": "get",
    "/chat/completions": "post",
    "/completions": "post",
    "/models": "get",
    "/api/show": "post",
    "/api/ps": "get",
    "/api/version": "get",
    "/sdapi/v1/skip": "post",
    "/sdapi/v1/png-info": "post",
    "/sdapi/v1/upscalers": "get",
    "/sdapi/v1/memory": "get",
    "/sdapi/v1/cmd-flags": "get",
    "/sdapi/v1/refresh-checkpoints": "post",
    "/sdapi/v1/loras": "get",
    "/sdapi/v1/scripts": "get",
}


async def test_openapi_lists_the_new_routes_and_only_real_ones(edge: str) -> None:
    async with aiohttp.ClientSession(edge) as http, http.get("/openapi.json") as r:
        doc = await r.json()
    for path, method in NEW_PATHS.items():
        assert method in doc["paths"].get(path, {}), path
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic"}
    app = build_app(EdgeSettings(api_keys=API_KEY))
    routed = {
        (r.resource.canonical, r.method.lower())
        for r in app.router.routes()
        if r.resource is not None
    }
    for path, ops in doc["paths"].items():
        for method in ops:
            if method == "options":
                continue  # every path's CORS preflight, answered by edge.cors's middleware
            assert (path, method) in routed or (path, "*") in routed, (path, method)
