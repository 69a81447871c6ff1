"""The one place where headrace errors become HTTP statuses and error bodies.

Statuses are the same for every API; the body's shape is the API family's (``Api``):
OpenAI's error object for most routes, Ollama's ``{"error": "<message>"}``, and
llama.cpp's in-stream ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from schemas.errors import ErrorCode, HeadraceError, RateLimited

# (status, OpenAI "type"). The OpenAI SDK retries 408/409/429/5xx: only retryable errors get those.
_STATUS: dict[str, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.INVALID_JOB: (400, "invalid_request_error"),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.RATE_LIMITED: (429, "requests"),
    ErrorCode.QUEUE_FULL: (503, "server_error"),
    ErrorCode.NO_WORKER: (503, "server_error"),
    ErrorCode.UNAVAILABLE: (503, "server_error"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout"),
    ErrorCode.ENGINE_ERROR: (500, "server_error"),
    ErrorCode.DEAD_LETTERED: (500, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}


def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``param`` and ``code`` are strings or null."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(code: str) -> tuple[int, str]:
    """HTTP status and OpenAI error type of an error code."""
    return _STATUS.get(code, (500, "server_error"))


def body_of(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error body of an error code."""
    _, type_ = status_of(code)
    return error_body(
        message, type_, None if code == ErrorCode.INVALID_REQUEST else str(code), param
    )


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def stream_error_of(e: HeadraceError) -> dict[str, Any]:
    """OpenAI's error object as an event inside a stream."""
    return body_of(e.code, e.message, e.param)


@dataclass(frozen=True)
class Api:
    """How one API family shapes an error: as a response body, and as an event in a stream."""

    name: str
    body: Callable[[str, str, str | None, str | None], dict[str, Any]] = error_body
    stream_error: Callable[[HeadraceError], dict[str, Any]] = stream_error_of

    def response(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        """An error response in this API's shape."""
        return json_response(self.body(message, type_, code, param), status, headers)

    def from_exception(self, e: HeadraceError, retry_after_s: int) -> web.Response:
        """Translate a headrace error; a retryable one carries Retry-After (a rate limit says
        how long)."""
        status, type_ = status_of(e.code)
        if isinstance(e, RateLimited):
            retry_after_s = max(1, math.ceil(e.retry_after_s))  # whole seconds (RFC 9110)
            type_ = e.limit or type_  # as OpenAI: "requests" or "tokens"
        headers = {"Retry-After": str(retry_after_s)} if e.retryable else None
        code = None if e.code == ErrorCode.INVALID_REQUEST else str(e.code)
        return self.response(status, e.message, type_, code, e.param, headers)


def _ollama_body(message: str, *_: str | None) -> dict[str, Any]:
    return {"error": message}


def _llamacpp_stream_error(e: HeadraceError) -> dict[str, Any]:
    return {"error": {"code": e.code, "message": e.message}}


OPENAI = Api("openai")
OLLAMA = Api("ollama", body=_ollama_body, stream_error=lambda e: _ollama_body(e.message))
LLAMACPP = Api("llamacpp", stream_error=_llamacpp_stream_error)
