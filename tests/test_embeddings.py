"""Embeddings through the whole pipeline on the echo engine (no model): every route's shape,
read by the real clients (OpenAI SDK, Ollama's client, LLMUnity's parse), and bad input.

The real model's vectors are checked in tests/test_embed_llama.py.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from edge.embeddings.requests import inputs_of
from edge.relay import Choice
from headrace.servers import ValkeyServer
from schemas.client import Position, Received
from schemas.codec import decode_job, encode
from schemas.errors import InvalidRequest, Poison
from schemas.events import Embeddings
from schemas.jobs import EmbedJob, EmbedParams
from schemas.subjects import job_subject, queue_kind
from schemas.vectors import decode_vector, encode_vector
from tests.conftest import API_KEY, running
from tests.llmunity import embeddings_content, embeddings_request
from tests.test_ratelimit import (  # the fixtures of edges with rate-limited keys
    StartEdge,
    auth,
    keys_file,
    start_edge,
    tokens_charged,
)
from workers.engines.echo import EchoEngine
from workers.engines.vectors import normalize
from workers.settings import WorkerSettings

ollama = pytest.importorskip("ollama")
__all__ = ["keys_file", "start_edge"]  # fixtures used by name

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = ["the red fox", "a blue whale", "the red fox"]


async def post(edge: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(f"{edge}{path}", json=body) as r,
    ):
        return r.status, orjson.loads(await r.read()), dict(r.headers)


@pytest.fixture
async def ollama_client(edge: str) -> AsyncIterator[Any]:
    client = ollama.AsyncClient(host=edge, headers=AUTH)
    yield client
    await client.close()


def norm2(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_normalize_follows_llamacpp_embd_normalize() -> None:
    v = [3.0, -4.0]
    assert normalize(v, 2) == pytest.approx([0.6, -0.8])
    assert normalize(v, 1) == pytest.approx([3 / 7, -4 / 7])
    assert normalize(v, -1) == v
    assert normalize(v, 0) == pytest.approx([3 * 32760 / 4, -32760])  # int16 range
    assert normalize([0.0, 0.0], 2) == [0.0, 0.0]


def test_vectors_travel_as_openai_base64() -> None:
    b64 = encode_vector([1.0, -2.5, 0.125])
    assert struct.unpack("<3f", base64.b64decode(b64)) == (1.0, -2.5, 0.125)
    assert decode_vector(b64) == [1.0, -2.5, 0.125]


def test_embed_jobs_ride_the_text_queue_and_forbid_unknown_params() -> None:
    job = EmbedJob(id="j" * 16, model="echo", created_ms=0, params=EmbedParams(inputs=["a"]))
    assert job_subject(queue_kind(job.kind), job.model) == "jobs.llm.echo"
    assert decode_job(encode(job)) == job
    raw = orjson.loads(encode(job))
    raw["params"]["pooling"] = "mean"
    with pytest.raises(Poison):
        decode_job(orjson.dumps(raw))


def test_input_shapes() -> None:
    assert inputs_of("a", "input") == ["a"]
    assert inputs_of([1, 2, 3], "input") == [[1, 2, 3]]
    assert inputs_of([[1, 2], "b"], "input") == [[1, 2], "b"]
    for bad in ([], [[]], [1, "a"]):
        with pytest.raises(InvalidRequest) as e:
            inputs_of(bad, "input")
        assert e.value.param == "input"


async def test_openai_sdk_float_base64_and_default(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings, EchoEngine()):
        default = await oai.embeddings.create(model="echo", input=TEXTS)  # sends base64
        floats = await oai.embeddings.create(model="echo", input=TEXTS, encoding_format="float")
        b64 = await oai.embeddings.create(model="echo", input=TEXTS, encoding_format="base64")
        one = await oai.embeddings.create(model="echo", input="a blue whale")
        tokens = await oai.embeddings.create(model="echo", input=[[5, 6], [7]])
    vectors = [d.embedding for d in floats.data]
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert all(len(v) == 64 and abs(norm2(v) - 1) < 1e-5 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]  # deterministic per input
    assert [d.embedding for d in default.data] == vectors  # the SDK decoded its base64
    assert [decode_vector(d.embedding) for d in b64.data] == vectors  # type: ignore[arg-type]
    assert one.data[0].embedding == vectors[1]  # alone or in a batch: the same vector
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 9  # the echo's words
    assert floats.model == "echo"
    assert floats.object == "list"
    assert tokens.usage.prompt_tokens == 3


async def test_one_request_is_one_job(edge: str, worker_settings: WorkerSettings) -> None:
    async with running(worker_settings, EchoEngine()):
        status, body, headers = await post(
            edge, "/v1/embeddings", {"model": "echo", "input": TEXTS}
        )
    assert status == 200
    assert len(body["data"]) == 3
    assert len(headers["x-headrace-job-ids"].split(",")) == 1


async def test_llamacpp_native_shapes_and_llmunity(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings, EchoEngine()), aiohttp.ClientSession() as http:
        # LLMUnity: its own request body, its own parse of the raw body.
        async with http.post(
            f"{edge}/embeddings",
            data=orjson.dumps(embeddings_request("a blue whale")),
            headers={**AUTH, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 200
            llmunity = embeddings_content(await r.text())
        _, native, _ = await post(edge, "/embedding", {"input": ["a blue whale", "the red fox"]})
        _, listed, _ = await post(edge, "/embeddings", {"content": ["a blue whale"]})
        _, raw, _ = await post(
            edge, "/embedding", {"content": "a blue whale", "embd_normalize": -1}
        )
        _, oai, _ = await post(edge, "/v1/embeddings", {"model": "echo", "input": "a blue whale"})
    assert len(llmunity) == 64
    assert abs(norm2(llmunity) - 1) < 1e-5
    assert [e["index"] for e in native] == [0, 1]
    assert native[0]["embedding"] == [llmunity]  # llama.cpp: one pooled vector per input
    assert listed == [{"index": 0, "embedding": [llmunity]}]
    assert oai["data"][0]["embedding"] == llmunity
    assert abs(norm2(raw["embedding"]) - 1) > 1e-3  # embd_normalize -1: not normalized
    # What broke before: llama.cpp's array shape is not what LLMUnity can read.
    with pytest.raises(ValueError, match="object type"):
        embeddings_content(orjson.dumps(native).decode())


async def test_ollama_client_embed_and_embeddings(
    ollama_client: Any, worker_settings: WorkerSettings, edge: str
) -> None:
    async with running(worker_settings, EchoEngine()):
        embed = await ollama_client.embed(model="echo", input=["a blue whale", "the red fox"])
        single = await ollama_client.embed(model="echo", input="a blue whale")
        legacy = await ollama_client.embeddings(model="echo", prompt="a blue whale")
        empty = await ollama_client.embed(model="echo", input=[])  # loads the model: no vectors
        _, old_path, _ = await post(edge, "/embed", {"model": "echo", "input": "a blue whale"})
    assert len(embed.embeddings) == 2
    assert embed.embeddings[0] == single.embeddings[0]
    assert abs(norm2(list(embed.embeddings[0])) - 1) < 1e-5
    assert embed.prompt_eval_count == 6
    assert embed.model == "echo"
    assert embed.total_duration is not None
    assert embed.total_duration > 0
    legacy_v = list(legacy.embedding)
    assert len(legacy_v) == 64
    assert abs(norm2(legacy_v) - 1) > 1e-3
    assert [x / norm2(legacy_v) for x in legacy_v] == pytest.approx(embed.embeddings[0], abs=1e-6)
    assert list(empty.embeddings) == []
    assert old_path["embeddings"] == [single.embeddings[0]]


async def test_bad_inputs_are_400s_in_each_shape(
    edge: str, worker_settings: WorkerSettings, oai: openai.AsyncOpenAI
) -> None:
    engine = EchoEngine(context_length=8)
    long = " ".join(["word"] * 20)
    async with running(worker_settings, engine):
        with pytest.raises(openai.BadRequestError) as e:
            await oai.embeddings.create(model="echo", input=["fine", long])
        assert e.value.code == "context_length_exceeded"
        assert e.value.param == "input"
        with pytest.raises(openai.BadRequestError) as e:
            await oai.embeddings.create(model="echo", input=[])
        assert e.value.param == "input"
        with pytest.raises(openai.NotFoundError) as nf:
            await oai.embeddings.create(model="no-such-model", input="x")
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            await oai.embeddings.create(model="echo", input="x", dimensions=8)
        assert e.value.param == "dimensions"
        with pytest.raises(openai.BadRequestError) as e:
            await oai.embeddings.create(model="echo", input="x", encoding_format="hex")  # type: ignore[arg-type]
        assert e.value.param == "encoding_format"
        status, body, _ = await post(edge, "/embedding", {"content": long})
        assert status == 400  # llama.cpp's shape: the status as the code, the kind as the type
        assert body["error"]["code"] == 400
        assert body["error"]["type"] == "exceed_context_size_error"
        status, body, _ = await post(
            edge, "/v1/embeddings", {"model": "echo", "input": "x" * 1_000_001}
        )
        assert status == 400
        assert body["error"]["param"] == "input"
        status, body, _ = await post(edge, "/embeddings", {"nothing": 1})
        assert status == 400
        assert "content" in body["error"]["message"]
        # Ollama truncates by default, and says so when told not to.
        status, body, _ = await post(edge, "/api/embed", {"model": "echo", "input": long})
        assert status == 200
        assert len(body["embeddings"]) == 1
        assert body["prompt_eval_count"] == 8
        status, body, _ = await post(
            edge, "/api/embed", {"model": "echo", "input": long, "truncate": False}
        )
        assert status == 400
        assert isinstance(body["error"], str)
        status, body, _ = await post(edge, "/api/embed", {"model": "nope", "input": "x"})
        assert status == 404
        assert isinstance(body["error"], str)
        status, body, _ = await post(edge, "/api/embeddings", {"model": "echo", "prompt": 5})
        assert status == 400
        assert isinstance(body["error"], str)


async def test_up_to_2048_inputs_in_one_request(edge: str, worker_settings: WorkerSettings) -> None:
    texts = [f"item {i}" for i in range(2048)]
    async with running(worker_settings, EchoEngine()):
        status, body, _ = await post(edge, "/v1/embeddings", {"model": "echo", "input": texts})
        too_many, _, _ = await post(
            edge, "/v1/embeddings", {"model": "echo", "input": [*texts, "x"]}
        )
    assert status == 200
    assert [d["index"] for d in body["data"]] == list(range(2048))
    assert too_many == 400


def test_embeddings_events_are_keyed_by_index() -> None:
    choice = Choice(0, stream=None)  # type: ignore[arg-type]  # accept() reads no stream
    pieces = ((1, 2, ["c"]), (1, 1, ["a", "b"]), (2, 1, ["a", "b"]))  # a redelivery repeats
    for attempt, index, vectors in pieces:
        event = Embeddings(index=index - 1 if index == 1 else index, dims=1, vectors=vectors)
        assert choice.accept(Received(Position(attempt, 1), event)) is None
    assert choice.vectors == {0: "a", 1: "b", 2: "c"}


async def test_embeddings_are_charged_their_input_tokens(
    start_edge: StartEdge, valkey: ValkeyServer, worker_settings: WorkerSettings
) -> None:
    base = await start_edge()
    texts = ["one two three four", "five six"]
    body = {"model": "echo", "input": texts}
    async with running(worker_settings, EchoEngine()), aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/embeddings", json=body, headers=auth("headers")) as r:
            first, used = dict(r.headers), (await r.json())["usage"]["total_tokens"]
        async with http.post(f"{base}/api/embed", json=body, headers=auth("headers")) as r:
            second = dict(r.headers)
    # Admitted at the prompt estimate (4 characters a token, every input) ...
    estimate = 10000 - int(first["x-ratelimit-remaining-tokens"])
    assert estimate == math.ceil(len(texts[0]) / 4) + math.ceil(len(texts[1]) / 4)
    # ... then settled at the real prompt tokens, before the next request was admitted.
    assert used == 6
    assert int(second["x-ratelimit-remaining-tokens"]) == 10000 - used - estimate
    assert await tokens_charged(valkey, "headers") == 2 * used
