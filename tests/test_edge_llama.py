"""Real SmolLM2 on llama.cpp through the whole pipeline: client, edge, nats-server, worker."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import API_KEY, running
from tests.llmunity import convert_content, multi_chat_content
from workers.settings import WorkerSettings

pytest.importorskip("llama_cpp", reason="the llm extra is not installed (make install-llm)")

from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

MODEL = DEFAULT_MODEL_ID
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    """One engine for the module; each runtime start()s and close()s it."""
    return LlamaEngine([ModelConfig(id=MODEL, path=bundled_gguf(), n_ctx=512, n_threads=1)])


async def test_openai_sdk_chat_streamed_and_not_agree(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings
) -> None:
    # No prefix cache: the second request would reuse the first one's prompt cells and
    # evaluate only its last token, and logits computed in a batch of one differ in their
    # last bits from those of a whole prompt's batch, enough to move a seeded draw.
    uncached = ModelConfig(id=MODEL, path=bundled_gguf(), n_ctx=512, n_threads=1, cache_seqs=0)
    async with running(worker_settings, LlamaEngine([uncached])):
        whole = await oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, seed=5)
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=12,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == 12
    assert whole.choices[0].finish_reason == "length"


async def test_context_overflow_is_a_400(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    long = [{"role": "user", "content": "word " * 2000}]  # far past the 512-token context
    async with running(worker_settings, engine):
        with pytest.raises(openai.BadRequestError) as e:
            await oai.chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert e.value.param == "messages"  # the engine's detail survives the error event


async def test_json_object_through_the_edge_parses(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    ask = [{"role": "user", "content": "Give a JSON object with a name and an age."}]
    async with running(worker_settings, engine):
        r = await oai.chat.completions.create(
            model=MODEL,
            messages=ask,
            max_tokens=60,
            seed=1,
            response_format={"type": "json_object"},
        )
    assert isinstance(orjson.loads(r.choices[0].message.content), dict)


async def test_completion_stream_in_llamacpp_shape(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    body = {"prompt": "The capital of France is", "n_predict": 6, "stream": True, "seed": 1}
    async with (
        running(worker_settings, engine),
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(f"{edge}/completion", json=body) as resp,
    ):
        raw = await resp.read()
    chunks = [
        orjson.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")
    ]
    assert chunks[-1]["stop"] is True
    assert chunks[-1]["stop_type"] == "limit"
    assert chunks[-1]["tokens_predicted"] == 6
    assert chunks[-1]["timings"]["predicted_n"] == 6
    assert all(c["stop"] is False for c in chunks[:-1])
    assert "".join(c["content"] for c in chunks)


async def test_llmunity_reads_a_real_completion_stream(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    body = {"prompt": "Once upon a time", "n_predict": 8, "seed": 4, "temperature": 0.7}
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{edge}/completion", json=body) as resp:
            whole = (await resp.json())["content"]
        async with http.post(f"{edge}/completion", json={**body, "stream": True}) as resp:
            raw = (await resp.read()).decode()
    assert raw.startswith("data: ")
    chunks = convert_content(raw)  # LLMUnity's parse, from its LLMCaller.ConvertContent
    assert chunks[-1]["stop"] is True
    assert multi_chat_content(raw) == whole.strip()


async def test_tokenize_detokenize_round_trip_through_the_edge(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    text = "Hello, headrace!"
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{edge}/tokenize", json={"content": text}) as resp:
            tokens = (await resp.json())["tokens"]
        async with http.post(f"{edge}/detokenize", json={"tokens": tokens}) as resp:
            back = (await resp.json())["content"]
        async with http.get(f"{edge}/template") as resp:
            template = (await resp.json())["template"]
    assert all(isinstance(t, int) for t in tokens)
    assert back == text
    assert "im_start" in template  # SmolLM2's ChatML template, from the GGUF


async def test_ollama_chat_ndjson_with_a_real_model(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": CHAT,
        "options": {"num_predict": 5, "seed": 2},
    }
    async with (
        running(worker_settings, engine),
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(f"{edge}/api/chat", json=body) as resp,
    ):
        lines = [orjson.loads(line) for line in (await resp.read()).decode().strip().split("\n")]
    assert lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == 5
    assert lines[-1]["prompt_eval_count"] > 0
    assert lines[-1]["eval_duration"] > 0
    assert all(not line["done"] for line in lines[:-1])


async def test_completion_reports_the_reused_prefix_and_cache_prompt_false_turns_it_off(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    body = {"prompt": "Once upon a time, in a land far away,", "n_predict": 4, "temperature": 0}
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        answers = []
        for extra in ({}, {}, {"cache_prompt": False}, {"cache_prompt": "yes"}):
            async with http.post(f"{edge}/completion", json={**body, **extra}) as resp:
                answers.append((resp.status, await resp.json()))
    (_, first), (_, again), (_, uncached), (status, bad) = answers
    prompt_n = first["tokens_evaluated"]
    assert first["timings"]["cache_n"] == 0
    assert first["timings"]["prompt_n"] == prompt_n
    # The same prompt again: all but its last token come from the cells the first one left.
    assert again["timings"]["cache_n"] == prompt_n - 1
    assert again["timings"]["prompt_n"] == 1
    assert again["tokens_cached"] == prompt_n + again["tokens_predicted"]
    assert uncached["timings"]["cache_n"] == 0
    assert uncached["timings"]["prompt_n"] == prompt_n
    assert status == 400
    assert "cache_prompt" in str(bad)
