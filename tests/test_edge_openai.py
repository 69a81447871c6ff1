"""The OpenAI surface through the real edge, nats-server and an echo worker, with the official SDK."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from nats.js import JetStreamContext

from edge.openai.responses import SYSTEM_FINGERPRINT
from schemas.client import JobClient
from schemas.errors import ContextLengthExceeded, HeadraceError, InvalidRequest
from schemas.events import Delta, EngineEvent
from schemas.jobs import TextJob
from tests.conftest import API_KEY, OTHER_KEY, finished_history, only_job_id, running
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

CHAT = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]


async def test_chat_completion_not_streamed(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        r = await oai.chat.completions.create(model="echo", messages=CHAT, max_tokens=5, seed=7)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert len(r.choices[0].message.content.split()) == 5
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r._request_id


async def test_chat_stream_matches_the_unstreamed_answer(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    client = oai
    async with running(worker_settings):
        whole = await client.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=6, seed=3
        )
        stream = await client.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=6, seed=3, stream=True
        )
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.created for c in chunks} == {chunks[0].created}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content


async def test_include_usage_adds_one_usage_chunk(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        stream = await oai.chat.completions.create(
            model="echo",
            messages=CHAT,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


async def test_completions_streamed_and_not(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    client = oai
    async with running(worker_settings):
        whole = await client.completions.create(
            model="echo", prompt="one two three", max_tokens=4, seed=1
        )
        stream = await client.completions.create(
            model="echo", prompt="one two three", max_tokens=4, seed=1, stream=True
        )
        chunks = [c async for c in stream]
    assert whole.object == "text_completion"
    assert whole.usage.completion_tokens == 4
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_n_runs_n_jobs_with_consecutive_seeds(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    client = oai
    async with running(worker_settings.model_copy(update={"slots": 2})):
        both = await client.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=8, seed=10, n=2
        )
        second = await client.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=8, seed=11
        )
        stream = await client.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=8, seed=10, n=2, stream=True
        )
        chunks = [c async for c in stream]
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[1].message.content == second.choices[0].message.content
    assert both.usage.completion_tokens == 16
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        assert text == both.choices[i].message.content


async def test_sse_framing_is_byte_exact(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    body = {"model": "echo", "messages": CHAT, "max_tokens": 3, "seed": 5, "stream": True}
    async with running(worker_settings):
        whole = await oai.chat.completions.create(model="echo", messages=CHAT, max_tokens=3, seed=5)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{edge}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as resp,
        ):
            raw = await resp.read()
            headers = resp.headers
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    job_id = headers["x-headrace-job-ids"]
    first = orjson.loads(raw.split(b"\n\n")[0].removeprefix(b"data: "))
    base = {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk", "created": first["created"],
            "model": "echo", "system_fingerprint": SYSTEM_FINGERPRINT}  # fmt: skip

    def chunk(choice: dict[str, Any]) -> bytes:
        return orjson.dumps({**base, "choices": [choice]})

    words = whole.choices[0].message.content.split(" ")[:3]
    expected = (
        b"data: "
        + chunk(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )
        + b"\n\n"
    )
    for seq, word in enumerate(words, start=2):  # seq 1 is `started`
        c = chunk(
            {"index": 0, "delta": {"content": word + " "}, "logprobs": None, "finish_reason": None}
        )
        expected += f"id: 1-{seq}\n".encode() + b"data: " + c + b"\n\n"
    last = chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"})
    expected += b"id: 1-5\ndata: " + last + b"\n\ndata: [DONE]\n\n"
    assert raw == expected


async def test_client_disconnect_cancels_the_job(
    edge: str, client: JobClient, worker_settings: WorkerSettings
) -> None:
    body = {"model": "echo", "messages": CHAT, "max_tokens": 400, "stream": True}
    async with running(worker_settings, EchoEngine(token_delay_s=0.02)):
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{edge}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            job_id = resp.headers["x-headrace-job-ids"]
            for _ in range(4):
                await resp.content.readuntil(b"\n\n")
            resp.close()  # the client goes away mid-stream
        history = await finished_history(client, job_id)
    done = history[-1].event
    assert done.type == "done"
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 100
    assert [r.event.type for r in history].count("delta") == done.usage.completion_tokens


async def test_last_event_id_resumes_exactly_the_missed_events(
    oai: openai.AsyncOpenAI, edge: str, client: JobClient, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        r = await oai.chat.completions.with_raw_response.create(
            model="echo", messages=CHAT, max_tokens=5
        )
        job_id = r.headers["x-headrace-job-ids"]
        async with aiohttp.ClientSession() as http:
            url = f"{edge}/v1/jobs/{job_id}/events"
            async with http.get(
                url, headers={"Authorization": f"Bearer {API_KEY}", "Last-Event-ID": "1-3"}
            ) as resp:
                raw = await resp.read()
            async with http.get(url, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as other:
                assert other.status == 404
    events = [e for e in raw.decode().split("\n\n") if e.startswith("id: ")]
    assert [e.split("\n")[0] for e in events] == ["id: 1-4", "id: 1-5", "id: 1-6", "id: 1-7"]
    assert events[-1].split("\n")[1] == "event: done"
    history = await client.history(job_id)
    assert [e.split("\n")[2].removeprefix("data: ").encode() for e in events] == [
        orjson.dumps(orjson.loads(h.event.model_dump_json(exclude_none=True))) for h in history[3:]
    ]


async def test_models_lists_live_models(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        models = await oai.models.list()
    assert [m.id for m in models.data] == ["echo"]
    assert models.data[0].context_length == 4096  # type: ignore[attr-defined]
    assert models.data[0].created > 1_700_000_000  # when its worker came up


@pytest.mark.parametrize(
    ("key", "message"), [(None, "Missing bearer token"), ("sk-wrong", "Incorrect API key")]
)
async def test_bad_or_missing_key_is_401(edge: str, key: str | None, message: str) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{edge}/v1/models", headers=headers) as resp,
    ):
        body = await resp.json()
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert body["error"]["code"] == "invalid_api_key"
    assert message in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_health_and_metrics_need_no_key(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge}/health/live") as live:
            assert live.status == 200
        async with http.get(f"{edge}/health/ready") as not_ready:
            assert not_ready.status == 503
            assert "no live worker" in (await not_ready.json())["reasons"]
        async with running(worker_settings):
            async with http.get(f"{edge}/health/ready") as ready:
                assert ready.status == 200
            await oai.chat.completions.create(model="echo", messages=CHAT, max_tokens=2)
        async with http.get(f"{edge}/metrics") as metrics:
            text = await metrics.text()
    assert 'headrace_edge_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'headrace_edge_tokens_total{direction="completion",model="echo"} 2.0' in text


async def test_request_id_is_echoed_or_made(edge: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge}/health/live", headers={"X-Request-ID": "trace-123"}) as given:
            assert given.headers["x-request-id"] == "trace-123"
        async with http.get(f"{edge}/v1/models") as made:
            assert made.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 100}, "n"),
        ({"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}, "stop"),
        ({"stop": ["x" * 300]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x" * 200_001}]}, "messages"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"1": 500}}, "logit_bias.1"),
        ({"logit_bias": {"1": False}}, "logit_bias.1"),  # a number, not llama.cpp's ban
        ({"logit_bias": {"hello": 1}}, "logit_bias.hello"),  # keys are token ids
        ({"top_logprobs": 3}, None),
        ({"stream_options": {"include_usage": True}}, None),
        ({"model": ""}, "model"),
    ],
)
async def test_invalid_requests_are_400_naming_the_field(
    edge: str, client: JobClient, js: JetStreamContext, change: dict[str, Any], param: str | None
) -> None:
    body = {"model": "echo", "messages": CHAT, **change}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{edge}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as resp,
    ):
        error = (await resp.json())["error"]
        assert resp.status == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert (await js.stream_info("JOBS")).state.messages == 0  # nothing invalid is enqueued


async def test_unknown_fields_are_ignored(
    oai: openai.AsyncOpenAI, edge: str, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        r = await oai.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=1, extra_body={"frobnicate": True}
        )
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (b"{nope", 400, "not valid JSON"),
        (b"[1]", 400, "JSON object"),
        (b"x" * (5 * 1024 * 1024), 413, "too large"),
    ],
)
async def test_malformed_bodies(edge: str, data: bytes, status: int, fragment: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{edge}/v1/chat/completions",
            data=io.BytesIO(data),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status == status
        assert fragment in (await resp.json())["error"]["message"]


async def test_unknown_model_is_404(oai: openai.AsyncOpenAI, edge: str) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await oai.chat.completions.create(model="gpt-17", messages=CHAT)
    assert e.value.code == "model_not_found"


async def test_no_live_worker_is_503(oai: openai.AsyncOpenAI, edge: str) -> None:
    with pytest.raises(openai.InternalServerError) as e:
        await oai.chat.completions.create(model="echo", messages=CHAT)
    assert e.value.status_code == 503
    assert e.value.code == "no_worker"
    assert e.value.response.headers["Retry-After"]


async def test_full_queue_is_503_with_retry_after(
    oai: openai.AsyncOpenAI, edge: str, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    from schemas.topology import Limits, provision

    await provision(js, Limits(jobs_max_msgs=1))
    client = oai
    async with running(worker_settings, EchoEngine(token_delay_s=0.05)):
        busy = await client.chat.completions.create(
            model="echo", messages=CHAT, max_tokens=40, stream=True
        )
        await busy.__anext__()  # the only slot holds the only message the queue may hold
        with pytest.raises(openai.InternalServerError) as e:
            await client.chat.completions.create(model="echo", messages=CHAT, max_tokens=1)
        await busy.close()
    assert e.value.status_code == 503
    assert e.value.code == "queue_full"
    assert e.value.response.headers["Retry-After"] == "2"


async def test_deadline_is_504_and_cancels_the_job(
    oai: openai.AsyncOpenAI,
    edge: str,
    client: JobClient,
    js: JetStreamContext,
    worker_settings: WorkerSettings,
) -> None:
    async with running(worker_settings, EchoEngine(token_delay_s=0.05)):
        with pytest.raises(openai.APIStatusError) as e:
            await oai.chat.completions.create(
                model="echo", messages=CHAT, max_tokens=200, extra_headers={"Timeout": "0.5"}
            )
        history = await finished_history(client, await only_job_id(js))
    assert e.value.status_code == 504
    assert e.value.code == "deadline_exceeded"
    done = history[-1].event
    assert done.type == "done"
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 20  # 0.5 s of 50 ms tokens, then stopped


async def test_openapi_document(edge: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{edge}/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    schema = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert schema["properties"]["temperature"]["maximum"] == 2.0
    assert "/v1/chat/completions" in doc["paths"]
    assert {"/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"} <= set(doc["paths"])
    assert doc["components"]["schemas"]["Txt2ImgRequest"]["properties"]["steps"]["default"] == 50


class FailingEngine(EchoEngine):
    """Fault injection: fails permanently, at once or after a few tokens."""

    def __init__(self, after_tokens: int, error: HeadraceError) -> None:
        super().__init__()
        self.after_tokens = after_tokens
        self.error = error

    async def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        for _ in range(self.after_tokens):
            yield Delta(text="word ", tokens=1)
        if self.after_tokens:
            await asyncio.sleep(0.8)  # past the first-event wait: the headers are out by now
        raise self.error


async def test_failure_before_any_text_gets_its_http_status(
    oai: openai.AsyncOpenAI, worker_settings: WorkerSettings
) -> None:
    engine = FailingEngine(
        0, ContextLengthExceeded("the prompt has 9000 tokens; the context holds 2048")
    )
    async with running(worker_settings, engine):
        with pytest.raises(openai.BadRequestError) as e:
            await oai.chat.completions.create(model="echo", messages=CHAT, stream=True)
    assert e.value.code == "context_length_exceeded"
    assert "2048" in e.value.message


async def test_failure_mid_stream_is_an_error_event_then_done(
    edge: str, worker_settings: WorkerSettings
) -> None:
    body = {"model": "echo", "messages": CHAT, "stream": True}
    engine = FailingEngine(2, InvalidRequest("the engine gave up"))
    async with (
        running(worker_settings, engine),
        aiohttp.ClientSession() as http,
        http.post(
            f"{edge}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as resp,
    ):
        assert resp.status == 200
        raw = (await resp.read()).decode()
    # keep-alive comment lines may sit between events; they carry nothing
    data = "\n".join(line for line in raw.split("\n") if not line.startswith(":"))
    events = data.strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    error = orjson.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"] == "the engine gave up"
    assert set(error) == {"message", "type", "param", "code"}
    assert sum('"content":"word "' in e for e in events) == 2


async def test_unstreamed_client_that_goes_away_cancels_its_job(
    edge: str, client: JobClient, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    body = {"model": "echo", "messages": CHAT, "max_tokens": 400}
    async with running(worker_settings, EchoEngine(token_delay_s=0.02)):
        async with aiohttp.ClientSession() as http:
            request = asyncio.create_task(
                http.post(
                    f"{edge}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
            )
            await asyncio.sleep(0.5)
            request.cancel()  # the client hangs up before the answer is ready
            with contextlib.suppress(asyncio.CancelledError):
                await request
        history = await finished_history(client, await only_job_id(js))
    done = history[-1].event
    assert done.type == "done"
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 100


async def test_too_many_messages_is_400(edge: str) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}] * 1025}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{edge}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "messages"


async def test_metrics_show_queue_depth_per_model(
    edge_settings: Any, client: JobClient, js: JetStreamContext
) -> None:
    from prometheus_client import CollectorRegistry

    from edge.app import start
    from tests.conftest import text_job

    settings = edge_settings.model_copy(update={"queue_poll_s": 0.1})
    runner = await start(settings, CollectorRegistry())
    try:
        for _ in range(3):  # no worker runs: they wait in JOBS
            await client.publish(text_job())
        await asyncio.sleep(0.5)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{settings.port}/metrics") as resp,
        ):
            text = await resp.text()
    finally:
        await runner.cleanup()
    assert 'headrace_edge_queue_depth{consumer="llm-echo"} 3.0' in text
    assert 'headrace_edge_jobs_running{consumer="llm-echo"} 0.0' in text
