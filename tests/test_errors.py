"""Errors keep their detail from the engine to the client, in each API family's shape."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson
from nats.js import JetStreamContext

from edge.errors import LLAMACPP, OLLAMA, OPENAI
from schemas.errors import (
    ContextLengthExceeded,
    EngineError,
    ErrorCode,
    InvalidRequest,
    NoWorker,
    RateLimited,
    Retry,
)
from schemas.events import EngineEvent, Error
from schemas.jobs import TextJob
from tests.conftest import API_KEY, running
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings


def test_error_events_carry_param_and_retry_hint_both_ways() -> None:
    event = Error.of(ContextLengthExceeded("too long", param="messages"))
    assert (event.code, event.param, event.retryable) == (
        "context_length_exceeded",
        "messages",
        False,
    )
    back = event.exception()
    assert isinstance(back, ContextLengthExceeded)
    assert (back.message, back.param) == ("too long", "messages")
    assert Error.of(NoWorker("later")).exception().retryable


def test_an_engine_error_comes_back_as_itself() -> None:
    back = Error.of(EngineError("the engine failed")).exception()
    assert type(back) is EngineError
    assert back.code == ErrorCode.ENGINE_ERROR
    retried = Error.of(Retry("out of memory"), retryable=False).exception()
    assert type(retried) is EngineError  # Retry steers the runtime; clients see the code
    assert not retried.retryable  # what the sender said wins over the class default


def test_a_rebuilt_rate_limit_keeps_its_defaults() -> None:
    back = Error(code="rate_limit_exceeded", message="slow down", retryable=True).exception()
    assert isinstance(back, RateLimited)
    assert back.retry_after_s == 1.0


def test_each_api_shapes_the_same_error_its_way() -> None:
    e = ContextLengthExceeded("too long", param="messages")
    openai = orjson.loads(OPENAI.from_exception(e, 2).body)  # type: ignore[arg-type]
    assert openai == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    assert orjson.loads(OLLAMA.from_exception(e, 2).body) == {"error": "too long"}  # type: ignore[arg-type]
    assert OLLAMA.stream_error(e) == {"error": "too long"}
    assert LLAMACPP.stream_error(e) == {
        "error": {
            "code": 400,
            "message": "too long",
            "type": "exceed_context_size_error",
            "param": "messages",
        }
    }
    invalid = orjson.loads(OPENAI.from_exception(InvalidRequest("bad", param="n"), 2).body)  # type: ignore[arg-type]
    assert invalid["error"]["code"] is None  # as OpenAI: a plain 400 has no code


def test_retryable_errors_say_when_to_retry() -> None:
    assert OPENAI.from_exception(NoWorker("none"), 3).headers["Retry-After"] == "3"
    assert (
        OPENAI.from_exception(RateLimited("slow", retry_after_s=7.2), 3).headers["Retry-After"]
        == "8"
    )
    assert "Retry-After" not in OPENAI.from_exception(InvalidRequest("bad"), 3).headers


class TooLong(EchoEngine):
    """Echo, except that every prompt is over its context (as llama.cpp says of a long one)."""

    async def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        raise ContextLengthExceeded("the prompt does not fit the context", param="messages")
        yield  # pragma: no cover - makes this a generator


async def _post(edge: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{edge}{path}", json=body, headers=headers) as r,
    ):
        return r.status, orjson.loads(await r.read())


async def test_an_engines_param_reaches_openai_and_ollama_clients(
    edge: str, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    async with running(worker_settings, TooLong()):
        status, body = await _post(edge, "/v1/chat/completions", chat)
        assert status == 400
        assert body["error"]["param"] == "messages"
        assert body["error"]["code"] == "context_length_exceeded"
        status, body = await _post(edge, "/api/chat", {**chat, "stream": False})
        assert status == 400
        assert body == {"error": "the prompt does not fit the context"}
