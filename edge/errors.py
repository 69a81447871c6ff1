"""The one place where headrace errors become HTTP statuses and error bodies.

Statuses are the same for every API; the body's shape is the API family's (``Api``):
OpenAI's error object for most routes, Ollama's ``{"error": "<message>"}``, and
llama.cpp's ``{"error": {"code": <status>, "message", "type"}}``. A context overflow adds
llama.cpp's ``n_prompt_tokens`` and ``n_ctx`` to OpenAI's and llama.cpp's error objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from schemas.errors import ContextLengthExceeded, ErrorCode, HeadraceError, RateLimited

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


def _sizes(e: HeadraceError) -> dict[str, int]:
    """What a context overflow adds to an error object (llama.cpp's ``n_prompt_tokens``, ``n_ctx``)."""
    return e.detail() if isinstance(e, ContextLengthExceeded) else {}


def _openai_body(
    status: int, message: str, type_: str, code: str | None, param: str | None
) -> dict[str, Any]:
    return error_body(message, type_, code, param)


@dataclass(frozen=True)
class Api:
    """How one API family shapes an error: as a response body, and as an event in a stream."""

    name: str
    # (status, message, OpenAI type, code, param) -> body
    body: Callable[[int, str, str, str | None, str | None], dict[str, Any]] = _openai_body
    stream_error: Callable[[HeadraceError], dict[str, Any]] = stream_error_of

    def response(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        detail: dict[str, int] | None = None,
    ) -> web.Response:
        """An error response in this API's shape (``detail``: more fields of its error object)."""
        body = self.body(status, message, type_, code, param)
        if detail and isinstance(body.get("error"), dict):
            body["error"].update(detail)
        return json_response(body, status, headers)

    def from_exception(self, e: HeadraceError, retry_after_s: int) -> web.Response:
        """Translate a headrace error; a retryable one carries Retry-After (a rate limit says
        how long)."""
        status, type_ = status_of(e.code)
        if isinstance(e, RateLimited):
            retry_after_s = max(1, math.ceil(e.retry_after_s))  # whole seconds (RFC 9110)
            type_ = e.limit or type_  # as OpenAI: "requests" or "tokens"
        headers = {"Retry-After": str(retry_after_s)} if e.retryable else None
        code = None if e.code == ErrorCode.INVALID_REQUEST else str(e.code)
        return self.response(status, e.message, type_, code, e.param, headers, _sizes(e))


def _ollama_body(_status: int, message: str, *_: str | None) -> dict[str, Any]:
    return {"error": message}


# llama.cpp's error types by status (its server's format_error_response).
_LLAMACPP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def _llamacpp_body(
    status: int, message: str, _type: str, code: str | None, param: str | None
) -> dict[str, Any]:
    """llama.cpp's ``{"error": {"code": <status>, "message", "type"}}``, with headrace's
    ``param`` when a field is at fault."""
    if code == ErrorCode.CONTEXT_LENGTH_EXCEEDED:
        type_ = "exceed_context_size_error"
    else:
        type_ = _LLAMACPP_TYPES.get(status, "rate_limit_error" if status == 429 else "server_error")
    error: dict[str, Any] = {"code": status, "message": message, "type": type_}
    if param is not None:
        error["param"] = param
    return {"error": error}


def _llamacpp_stream_error(e: HeadraceError) -> dict[str, Any]:
    status, _ = status_of(e.code)
    body = _llamacpp_body(status, e.message, "", str(e.code), e.param)
    body["error"].update(_sizes(e))
    return body


def _openai_stream_error(e: HeadraceError) -> dict[str, Any]:
    body = stream_error_of(e)
    body["error"].update(_sizes(e))
    return body


OPENAI = Api("openai", stream_error=_openai_stream_error)
OLLAMA = Api("ollama", body=_ollama_body, stream_error=lambda e: {"error": e.message})
LLAMACPP = Api("llamacpp", body=_llamacpp_body, stream_error=_llamacpp_stream_error)
