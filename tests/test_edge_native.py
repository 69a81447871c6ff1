"""llama.cpp/LLMUnity and Ollama surfaces through the real edge, nats-server and an echo worker."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from nats.js import JetStreamContext

from tests.conftest import API_KEY, running
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def post(
    edge: str, path: str, body: dict[str, Any], **headers: str
) -> tuple[int, bytes, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{edge}{path}", json=body, headers={**AUTH, **headers}) as resp,
    ):
        return resp.status, await resp.read(), resp.headers


def sse_data(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body (comment lines dropped)."""
    lines = [line for line in raw.decode().split("\n") if line.startswith("data: ")]
    return [orjson.loads(line.removeprefix("data: ")) for line in lines]


async def test_completion_not_streamed_has_llamacpp_shape(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        status, raw, _ = await post(
            edge, "/completion", {"prompt": "a b c d", "n_predict": 5, "seed": 3}
        )
    body = orjson.loads(raw)
    assert status == 200
    assert body["stop"] is True
    assert body["stop_type"] == "limit"
    assert body["tokens_predicted"] == 5
    assert len(body["content"].split()) == 5
    assert body["timings"]["predicted_n"] == 5
    assert {"prompt_ms", "predicted_per_second"} <= set(body["timings"])


async def test_completion_stream_is_llamacpp_chunks_without_done(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        status, raw, headers = await post(
            edge, "/completion", {"prompt": [1, 2, 3], "n_predict": 4, "stream": True}
        )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert b"[DONE]" not in raw
    chunks = sse_data(raw)
    assert [c["stop"] for c in chunks] == [False] * 4 + [True]
    assert all(
        {"content", "multimodal", "slot_id", "stop"} <= set(c) for c in chunks
    )  # what LLMUnity reads
    assert chunks[-1]["content"] == ""
    assert chunks[-1]["tokens_predicted"] == 4
    assert "timings" in chunks[-1]


async def test_rpc_routes_reach_a_worker(edge: str, worker_settings: WorkerSettings) -> None:
    async with running(worker_settings):
        status, raw, _ = await post(edge, "/tokenize", {"content": "hello big world"})
        assert status == 200
        assert orjson.loads(raw) == {"tokens": [5, 3, 5]}  # the echo engine's whitespace tokenizer
        async with aiohttp.ClientSession(headers=AUTH) as http:
            async with http.get(f"{edge}/props") as resp:
                assert (await resp.json())["n_ctx"] == 4096
            async with http.post(f"{edge}/template", json={}) as resp:
                assert await resp.json() == {"template": ""}
        status, raw, _ = await post(edge, "/detokenize", {"tokens": [1, 2]})
    assert status == 400
    assert "does not support" in orjson.loads(raw)["error"]["message"]


async def test_health_in_llamacpp_shape_needs_no_key(
    edge: str, worker_settings: WorkerSettings
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge}/health") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["message"] == "Loading model"
        async with running(worker_settings), http.get(f"{edge}/health") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}


async def test_identical_inflight_completions_share_one_job(
    edge: str, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    body = {"prompt": "one two three", "n_predict": 20, "stream": True}
    async with running(worker_settings, EchoEngine(token_delay_s=0.02)):
        (s1, raw1, h1), (s2, raw2, h2) = await asyncio.gather(
            post(edge, "/completion", body), post(edge, "/completion", body)
        )
    assert s1 == s2 == 200
    assert h1["x-headrace-job-ids"] == h2["x-headrace-job-ids"]
    assert "".join(c["content"] for c in sse_data(raw1)) == "".join(
        c["content"] for c in sse_data(raw2)
    )
    subjects = (await js.stream_info("RESULTS", subjects_filter=">")).state.subjects or {}
    assert len([s for s in subjects if not s.endswith(".fence")]) == 1  # one job ran


async def test_retry_after_a_hang_up_joins_the_running_job(
    edge: str, worker_settings: WorkerSettings
) -> None:
    body = {"prompt": "one two three", "n_predict": 40, "stream": True}
    async with (
        running(worker_settings, EchoEngine(token_delay_s=0.02)),
        aiohttp.ClientSession() as http,
    ):
        first = await http.post(f"{edge}/completion", json=body, headers=AUTH)
        job_id = first.headers["x-headrace-job-ids"]
        await first.content.readuntil(b"\n\n")
        first.close()  # LLMUnity gave up on this one; its retry follows
        await asyncio.sleep(0.2)
        async with http.post(f"{edge}/completion", json=body, headers=AUTH) as retry:
            raw = await retry.read()
            assert retry.headers["x-headrace-job-ids"] == job_id
    chunks = sse_data(raw)
    assert chunks[-1]["tokens_predicted"] == 40  # the job was not cancelled by the first hang-up
    assert len("".join(c["content"] for c in chunks).split()) == 40


async def test_idempotency_key_joins_across_routes_of_openai(
    edge: str, worker_settings: WorkerSettings
) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "x y"}], "max_tokens": 10}
    async with running(worker_settings, EchoEngine(token_delay_s=0.02)):
        (_, _, h1), (_, _, h2), (_, _, h3) = await asyncio.gather(
            post(edge, "/v1/chat/completions", body, **{"Idempotency-Key": "abc"}),
            post(edge, "/v1/chat/completions", body, **{"Idempotency-Key": "abc"}),
            post(edge, "/v1/chat/completions", body),
        )
    assert h1["x-headrace-job-ids"] == h2["x-headrace-job-ids"]
    assert (
        h3["x-headrace-job-ids"] != h1["x-headrace-job-ids"]
    )  # no key, no sharing on OpenAI routes


async def test_ollama_chat_streams_ndjson(edge: str, worker_settings: WorkerSettings) -> None:
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "p q r"}],
        "options": {"num_predict": 3},
    }
    async with running(worker_settings):
        status, raw, headers = await post(edge, "/api/chat", body)  # stream defaults to true
    assert status == 200
    assert headers["Content-Type"] == "application/x-ndjson"
    lines = [orjson.loads(line) for line in raw.decode().strip().split("\n")]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert all(line["message"]["role"] == "assistant" for line in lines)
    final = lines[-1]
    assert final["eval_count"] == 3
    assert final["done_reason"] == "length"
    assert isinstance(final["total_duration"], int)
    assert final["total_duration"] > 0


async def test_ollama_generate_not_streamed_and_tags(
    edge: str, worker_settings: WorkerSettings
) -> None:
    body = {
        "model": "echo",
        "prompt": "p q r",
        "stream": False,
        "options": {"num_predict": 2, "seed": 1},
    }
    async with running(worker_settings):
        status, raw, _ = await post(edge, "/api/generate", body)
        async with (
            aiohttp.ClientSession(headers=AUTH) as http,
            http.get(f"{edge}/api/tags") as resp,
        ):
            tags = await resp.json()
    answer = orjson.loads(raw)
    assert status == 200
    assert answer["done"] is True
    assert len(answer["response"].split()) == 2
    assert [m["name"] for m in tags["models"]] == ["echo"]


async def test_ollama_errors_are_in_ollamas_shape(edge: str) -> None:
    status, raw, _ = await post(
        edge, "/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 404
    assert orjson.loads(raw) == {"error": "The model 'nope' does not exist"}


async def test_unnamed_model_needs_a_default_when_several_are_served(
    edge: str, edge_settings: Any, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    from prometheus_client import CollectorRegistry

    from edge.app import start
    from headrace.servers import free_port

    other = worker_settings.model_copy(update={"worker_id": "w2"})
    settings = edge_settings.model_copy(update={"port": free_port(), "default_model": "echo-b"})
    runner = await start(settings, CollectorRegistry())
    try:
        async with running(worker_settings), running(other, EchoEngine("echo-b")):
            status, raw, _ = await post(edge, "/completion", {"prompt": "x", "n_predict": 2})
            assert status == 400
            assert "HEADRACE_DEFAULT_MODEL" in orjson.loads(raw)["error"]["message"]
            status, raw, _ = await post(
                f"http://127.0.0.1:{settings.port}", "/completion", {"prompt": "x", "n_predict": 2}
            )
            assert status == 200
            assert orjson.loads(raw)["model"] == "echo-b"
    finally:
        await runner.cleanup()
