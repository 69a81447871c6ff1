"""Request ids, authentication, metrics and error translation, for every route."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from edge.auth import presented_secret
from edge.context import JOB_IDS, KEY, REQUEST_ID, ctx
from edge.routing import route_info
from schemas.errors import HeadraceError
from schemas.subjects import trace_id

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PUBLIC = ("/health", "/metrics", "/openapi.json")
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_MISSING = (
    "Missing bearer token in the Authorization header "
    "(or send the API key as the password of HTTP Basic auth)"
)
# Both schemes the edge takes (RFC 9110 allows several challenges in one header).
_CHALLENGES = 'Bearer realm="headrace", Basic realm="headrace", charset="UTF-8"'


def route_name(request: web.Request) -> str:
    """The route pattern (never the raw path: job ids must not become label values)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: request id, metrics, one line of log, and errors in the route's API shape."""
    incoming = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = (
        incoming if _CLIENT_REQUEST_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
    )
    c = ctx(request)
    started = time.perf_counter()
    c.metrics.in_flight.inc()
    try:
        response = await _translated(request, handler)
    finally:
        c.metrics.in_flight.dec()
    c.metrics.requests.labels(route_name(request), str(response.status)).inc()
    extra: dict[str, object] = {"request_id": request[REQUEST_ID]}
    if JOB_IDS in request:
        extra["job_ids"] = request[JOB_IDS]
    if (trace := trace_id(request.headers.get("traceparent"))) is not None:
        extra["trace_id"] = trace
    log.info(
        "%s %s %d %.1f ms",
        request.method,
        route_name(request),
        response.status,
        (time.perf_counter() - started) * 1000,
        extra=extra,
    )
    return response


async def _translated(request: web.Request, handler: Handler) -> web.StreamResponse:
    api = route_info(request).api
    try:
        return await handler(request)
    except HeadraceError as e:
        return api.from_exception(e, ctx(request).settings.retry_after_s)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return api.response(
            e.status, _message(e), code=e.reason.lower().replace(" ", "_"), headers=_keep(e)
        )
    except Exception as e:
        log.error("unhandled %s", type(e).__name__, extra={"request_id": request[REQUEST_ID]})
        log.debug("unhandled error", exc_info=True)
        return api.response(500, "internal error", "server_error", "internal_error")


def _message(e: web.HTTPException) -> str:
    """What the raiser said (``text=``), else the reason phrase; aiohttp's own 413 text names
    sizes in bytes, ours says what happened."""
    if e.status == 413:
        return "the request body is too large"
    given = e.text
    return given if given and given != f"{e.status}: {e.reason}" else e.reason


def _keep(e: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A key (Bearer, or the password of HTTP Basic) on everything but health, metrics and the
    OpenAPI document; no ``Authorization`` header at all means the anonymous key, if any."""
    if request.path.startswith(_PUBLIC):
        return await handler(request)
    keys = ctx(request).keys
    header = request.headers.get("Authorization")
    if header is None:
        key, message = keys.anonymous, _MISSING
    else:  # a credential that does not match is refused, never served as anonymous
        secret = presented_secret(header)
        key = keys.authenticate(secret) if secret else None
        message = "Incorrect API key provided"
    if key is None:
        return route_info(request).api.response(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": _CHALLENGES}
        )
    request[KEY] = key
    return await handler(request)


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``x-request-id`` on every response, streamed ones included (on_response_prepare)."""
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]
