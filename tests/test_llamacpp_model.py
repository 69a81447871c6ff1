"""llama.cpp's ``/completion`` fields where the model matters: real SmolLM2 on llama.cpp behind
the edge and nats-server (n_ctx 512, one thread, a few tokens per request).

``completion_probabilities``, ``logit_bias`` in each of llama.cpp's forms, ``stop_type`` with
``stopping_word``, ``truncated``, and the context overflow's ``n_prompt_tokens`` / ``n_ctx``.
"""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

pytest.importorskip("llama_cpp", reason="the llm extra is not installed (make install-llm)")

from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

AUTH = {"Authorization": f"Bearer {API_KEY}"}
N_CTX = 512
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    """One engine for the module; each runtime start()s and close()s it."""
    config = ModelConfig(id=DEFAULT_MODEL_ID, path=bundled_gguf(), n_ctx=N_CTX, n_threads=1)
    return LlamaEngine([config])


async def post(
    http: aiohttp.ClientSession, edge: str, body: dict[str, Any], path: str = "/completion"
) -> Any:
    async with http.post(edge + path, json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
        return answer


def check_entry(entry: dict[str, Any], key: str, n: int) -> None:
    assert isinstance(entry["id"], int)
    assert entry["id"] >= 0
    assert isinstance(entry["token"], str)
    assert entry["bytes"] == list(entry["token"].encode())
    if key == "top_logprobs":
        assert entry["logprob"] <= 0.0
    else:  # post_sampling_probs: probabilities
        assert 0.0 < entry["prob"] <= 1.0
    assert len(entry[key]) == n
    for top in entry[key]:
        assert isinstance(top["id"], int)
        assert top["id"] >= 0
        assert top["bytes"] == list(top["token"].encode())


async def test_completion_probabilities_in_llamacpps_shape(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    body = {"prompt": PROMPT, "n_predict": 3, "temperature": 0, "n_probs": 4, "return_tokens": True}
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        whole = await post(http, edge, body)
        post_sampling = await post(http, edge, {**body, "post_sampling_probs": True})
        async with http.post(f"{edge}/completion", json={**body, "stream": True}) as r:
            events = [line async for line in r.content if line.startswith(b"data: ")]
    probs = whole["completion_probabilities"]
    assert len(probs) == whole["tokens_predicted"] == 3
    assert [p["id"] for p in probs] == whole["tokens"]  # the token each entry is about
    for p in probs:
        check_entry(p, "top_logprobs", 4)
        assert p["top_logprobs"][0]["id"] == p["id"]  # greedy: the most likely one was chosen
    for p, q in zip(post_sampling["completion_probabilities"], probs, strict=True):
        check_entry(p, "top_probs", 4)
        assert p["prob"] == pytest.approx(math.exp(q["logprob"]))
    chunks = [orjson.loads(e[6:]) for e in events]
    streamed = [p for c in chunks if not c["stop"] for p in c["completion_probabilities"]]
    assert [p["id"] for p in streamed] == whole["tokens"]
    assert "completion_probabilities" not in chunks[-1]  # as llama.cpp: not again at the end


async def test_logit_bias_in_every_llamacpp_form_bans_the_token(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    body = {"prompt": PROMPT, "n_predict": 2, "temperature": 0, "return_tokens": True}
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        first = (await post(http, edge, body))["tokens"][0]
        piece = (await post(http, edge, {"tokens": [first]}, "/detokenize"))["content"]
        forms: list[Any] = [
            [[first, False]],  # [id, false]: banned
            {str(first): False},  # OpenAI-style object, false
            {str(first): -100},  # OpenAI-style object, a number
            [[piece, False]],  # a text piece: every token it is made of
            {piece: -1000.0},  # a piece as an object's key
        ]
        answers = [await post(http, edge, {**body, "logit_bias": f}) for f in forms]
    assert piece.strip()  # SmolLM2 says " Paris": a piece that is one token
    for form, answer in zip(forms, answers, strict=True):
        assert answer["tokens"][0] != first, form
        biased = answer["generation_settings"]["logit_bias"]
        assert [b["token"] for b in biased] == [first]
    assert answers[0]["generation_settings"]["logit_bias"][0]["bias"] is None  # -inf: JSON null


async def test_a_stop_string_is_stop_type_word(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    stops = [".", ",", "\n"]
    body = {"prompt": PROMPT, "n_predict": 24, "temperature": 0, "stop": stops}
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        answer = await post(http, edge, body)
        async with http.post(f"{edge}/completion", json={**body, "stream": True}) as r:
            last = [
                orjson.loads(line[6:]) async for line in r.content if line.startswith(b"data: ")
            ][-1]
    assert answer["stop_type"] == "word"
    assert answer["stopping_word"] in stops
    assert not any(s in answer["content"] for s in stops)
    assert (last["stop_type"], last["stopping_word"]) == ("word", answer["stopping_word"])


async def test_running_into_the_context_is_truncated(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        ids = (await post(http, edge, {"content": "word " * 600}, "/tokenize"))["tokens"]
        prompt = ids[: N_CTX - 3]  # room for three tokens
        answer = await post(http, edge, {"prompt": prompt, "ignore_eos": True, "temperature": 0})
        short = await post(http, edge, {"prompt": prompt[:20], "n_predict": 2, "temperature": 0})
    assert (answer["tokens_evaluated"], answer["tokens_predicted"]) == (N_CTX - 3, 3)
    assert answer["truncated"] is True
    assert answer["stop_type"] == "limit"
    assert short["truncated"] is False  # n_predict ended it, not the context


async def test_context_overflow_says_by_how_much(
    edge: str, oai: openai.AsyncOpenAI, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    long = "word " * 2000
    async with running(worker_settings, engine), aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{edge}/completion", json={"prompt": long, "n_predict": 2}) as r:
            status, native = r.status, await r.json()
        with pytest.raises(openai.BadRequestError) as e:
            await oai.completions.create(model=DEFAULT_MODEL_ID, prompt=long, max_tokens=2)
    assert status == 400
    error = native["error"]
    assert (error["code"], error["type"], error["n_ctx"]) == (
        400,
        "exceed_context_size_error",
        N_CTX,
    )
    assert error["n_prompt_tokens"] > N_CTX
    body = e.value.body
    assert isinstance(body, dict)
    assert body["code"] == "context_length_exceeded"
    assert (body["n_prompt_tokens"], body["n_ctx"]) == (error["n_prompt_tokens"], N_CTX)
