"""llama.cpp's ``/completion`` fields and forms where the model does not matter: the real edge,
nats-server and an echo worker (its tokenize RPC gives each word's length as its id; the
ids of what it generates are the words' places in the prompt).

The same fields with a real model (probabilities, logit_bias, stop words, truncation and
context overflow) are in tests/test_llamacpp_model.py.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest

from edge.openai.responses import SYSTEM_FINGERPRINT
from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def post(edge: str, body: dict[str, Any], path: str = "/completion") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(edge + path, json=body) as r,
    ):
        return r.status, await r.json()


async def stream(edge: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``data:`` events of a streamed /completion, in order."""
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(f"{edge}/completion", json={**body, "stream": True}) as r,
    ):
        assert r.status == 200
        raw = (await r.read()).decode()
    return [orjson.loads(e.removeprefix("data: ")) for e in raw.split("\n\n") if e]


async def test_final_body_has_llamacpps_fields(edge: str, worker_settings: WorkerSettings) -> None:
    body = {"prompt": "red green blue", "n_predict": 5, "seed": 3, "temperature": 0.2}
    async with running(worker_settings):
        _, plain = await post(edge, body)
        _, with_tokens = await post(edge, {**body, "return_tokens": True})
    assert plain["tokens"] == []  # as llama.cpp: ids only when return_tokens is true
    words = body["prompt"].split()
    assert with_tokens["tokens"] == [words.index(w) for w in with_tokens["content"].split()]
    assert with_tokens["content"] == plain["content"]
    assert plain["stop"] is True
    assert plain["stop_type"] == "limit"
    assert plain["stopping_word"] == ""
    assert plain["truncated"] is False
    assert plain["has_new_line"] is False
    assert (plain["tokens_predicted"], plain["tokens_evaluated"]) == (5, 3)
    assert plain["timings"]["predicted_n"] == 5
    assert plain["timings"]["cache_n"] == 0
    assert plain["prompt"] == "red green blue"
    settings = plain["generation_settings"]
    assert (settings["n_predict"], settings["seed"], settings["temperature"]) == (5, 3, 0.2)
    assert (settings["top_k"], settings["top_p"], settings["min_p"]) == (40, 0.95, 0.05)
    assert settings["samplers"][0] == "penalties"
    assert settings["logit_bias"] == []


async def test_a_stop_word_ends_it_with_stop_type_word(
    edge: str, worker_settings: WorkerSettings
) -> None:
    body = {"prompt": "red green blue", "n_predict": 40, "seed": 3, "stop": ["blue"]}
    async with running(worker_settings):
        _, answer = await post(edge, body)
    assert (answer["stop_type"], answer["stopping_word"]) == ("word", "blue")


async def test_each_streamed_chunk_carries_its_token_ids(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        chunks = await stream(edge, {"prompt": "one three fifteen", "n_predict": 4, "seed": 1})
    *pieces, last = chunks
    assert len(pieces) == 4
    for i, c in enumerate(pieces, 1):
        assert c["stop"] is False
        assert c["index"] == 0
        assert c["tokens"] == [["one", "three", "fifteen"].index(c["content"].strip())]
        assert c["tokens_predicted"] == i
    assert last["stop"] is True
    assert last["content"] == ""
    assert last["tokens"] == []
    assert last["stop_type"] == "limit"
    assert last["generation_settings"]["n_predict"] == 4


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_batch_of_prompts_is_one_result_each(
    edge: str, worker_settings: WorkerSettings, streamed: bool
) -> None:
    body = {"prompt": ["alpha beta", "gamma delta epsilon", [1, 2]], "n_predict": 3, "seed": 9}
    async with running(worker_settings):
        if streamed:
            chunks = await stream(edge, body)
        else:
            status, results = await post(edge, body)
            assert status == 200
    if not streamed:
        assert [r["index"] for r in results] == [0, 1, 2]
        assert [r["tokens_evaluated"] for r in results] == [2, 3, 2]
        assert set(results[0]["content"].split()) <= {"alpha", "beta"}
        assert set(results[2]["content"].split()) <= {"1", "2"}
        return
    finals = [c for c in chunks if c["stop"]]
    assert sorted(c["index"] for c in finals) == [0, 1, 2]
    for i, words in enumerate(({"alpha", "beta"}, {"gamma", "delta", "epsilon"}, {"1", "2"})):
        text = "".join(c["content"] for c in chunks if c["index"] == i)
        assert len(text.split()) == 3
        assert set(text.split()) <= words


async def test_mixed_and_object_prompts(edge: str, worker_settings: WorkerSettings) -> None:
    async with running(worker_settings):
        # ids and strings in one list are one prompt: the strings are tokenized by a worker
        _, mixed = await post(edge, {"prompt": [7, "hello world", 2], "n_predict": 2})
        _, obj = await post(edge, {"prompt": {"prompt_string": "up down"}, "n_predict": 2})
        _, objs = await post(edge, {"prompt": [{"prompt_string": "a"}, "b c"], "n_predict": 1})
    assert mixed["tokens_evaluated"] == 4  # 7, 5, 5, 2
    assert set(mixed["content"].split()) <= {"7", "5", "2"}
    assert set(obj["content"].split()) <= {"up", "down"}
    assert next(r["content"].strip() for r in objs) == "a"


async def test_response_fields_filter_the_final_body(
    edge: str, worker_settings: WorkerSettings
) -> None:
    fields = ["content", "generation_settings/n_predict", "prompt", "no/such"]
    async with running(worker_settings):
        _, body = await post(edge, {"prompt": "x y", "n_predict": 2, "response_fields": fields})
        chunks = await stream(edge, {"prompt": "x y", "n_predict": 2, "response_fields": ["stop"]})
    assert set(body) == {"content", "generation_settings/n_predict", "prompt"}
    assert body["generation_settings/n_predict"] == 2
    assert body["prompt"] == "x y"
    assert chunks[-1] == {"stop": True}  # the stream's last chunk is a final body too
    assert all("content" in c for c in chunks[:-1])


async def test_model_is_whatever_is_served(edge: str, worker_settings: WorkerSettings) -> None:
    """llama.cpp's server answers with its model whatever ``model`` names (its own test suite
    and clients send names like gpt-3.5-turbo); so do headrace's llama.cpp-style routes."""
    async with running(worker_settings):
        status, body = await post(edge, {"model": "gpt-3.5-turbo", "prompt": "a", "n_predict": 1})
        _, tokens = await post(edge, {"model": "nope", "content": "a bc"}, "/tokenize")
        async with openai.AsyncOpenAI(base_url=edge, api_key=API_KEY, max_retries=0) as bare:
            chat = await bare.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        async with openai.AsyncOpenAI(base_url=f"{edge}/v1", api_key=API_KEY, max_retries=0) as v1:
            with pytest.raises(openai.NotFoundError):  # the OpenAI API itself stays strict
                await v1.chat.completions.create(
                    model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}]
                )
    assert status == 200
    assert body["model"] == "echo"
    assert tokens == {"tokens": [1, 2]}
    assert chat.model == "echo"


async def test_system_fingerprint_on_the_openai_routes(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        whole = await oai.completions.create(model="echo", prompt="a b", max_tokens=2)
        chat = await oai.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "a"}], max_tokens=2, stream=True
        )
        chunks = [c async for c in chat]
    assert whole.system_fingerprint == SYSTEM_FINGERPRINT
    assert SYSTEM_FINGERPRINT.startswith("headrace-")
    assert all(c.system_fingerprint == SYSTEM_FINGERPRINT for c in chunks)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": []}, "prompt", "non-empty"),
        ({"prompt": [[1, -2]]}, "prompt", "not negative"),
        ({"prompt": [1, 2.5]}, "prompt", "each prompt"),
        ({"prompt": {"prompt_string": "a", "multimodal_data": ["AAAA"]}}, "prompt", "multimodal"),
        ({"prompt": {"text": "a"}}, "prompt", "prompt_string"),
        ({"prompt": "a", "logit_bias": [[1, True]]}, "logit_bias", "false to ban"),
        ({"prompt": "a", "logit_bias": [[None, 1]]}, "logit_bias", "id or a non-empty"),
        ({"prompt": "a", "logit_bias": [["", 1]]}, "logit_bias", "id or a non-empty"),
        ({"prompt": "a", "logit_bias": [[1]]}, "logit_bias", "pairs"),
        ({"prompt": "a", "response_fields": "content"}, "response_fields", "list"),
        ({"prompt": "a", "return_tokens": "yes"}, "return_tokens", "boolean"),
        ({"prompt": ["a"] * 20}, "prompt", "at most"),
    ],
)
async def test_bad_forms_are_400_in_llamacpps_shape(
    edge: str, worker_settings: WorkerSettings, body: dict[str, Any], param: str, says: str
) -> None:
    async with running(worker_settings):
        status, answer = await post(edge, body)
    assert status == 400
    error = answer["error"]
    assert (error["code"], error["type"], error["param"]) == (400, "invalid_request_error", param)
    assert says in error["message"]
