"""The one place where headrace errors become HTTP statuses and OpenAI-style bodies."""

from __future__ import annotations

import math
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


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error response in OpenAI's shape."""
    return json_response(error_body(message, type_, code, param), status, headers)


def from_exception(e: HeadraceError, retry_after_s: int) -> web.Response:
    """Translate a headrace error; 429 and 503 carry Retry-After (a rate limit says how long)."""
    status, _ = status_of(e.code)
    if isinstance(e, RateLimited):
        retry_after_s = max(1, math.ceil(e.retry_after_s))  # whole seconds (RFC 9110)
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    body = body_of(e.code, e.message, e.param)
    if isinstance(e, RateLimited) and e.limit:
        body["error"]["type"] = e.limit  # as OpenAI: "requests" or "tokens"
    return json_response(body, status, headers)
