"""CORS for browser clients (web games, notebooks, UIs on another origin).

``HEADRACE_CORS_ORIGINS`` lists the origins allowed (comma-separated; ``*`` for any; empty,
the default: off, and nothing here is installed). A preflight (``OPTIONS`` with
``Access-Control-Request-Method``) for any route that has that method is answered 204 before
authentication, since browsers send no credentials on it; every response to an allowed
origin, streamed ones included, carries ``Access-Control-Allow-Origin``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long a browser may cache a preflight (Chromium caps it at 2 h, Firefox at 24 h).
MAX_AGE_S = 600
# Response headers a page may read besides the CORS-safelisted ones: what resumes a stream
# (job ids), follows a task, and backs off (rate limits, Retry-After).
EXPOSED = ", ".join(
    [
        "x-request-id",
        "x-headrace-job-ids",
        "x-headrace-task-id",
        "Retry-After",
        *(f"x-ratelimit-{w}-{u}" for u in ("requests", "tokens") for w in ("limit", "remaining", "reset")),
    ]
)  # fmt: skip
# An origin is scheme://host[:port], no path (RFC 6454): "https://a.example/" never matches.
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s,]+$", re.IGNORECASE)


@dataclass(frozen=True)
class CorsPolicy:
    """The origins allowed; ``any_origin`` when ``*`` was given."""

    origins: frozenset[str]
    any_origin: bool = False

    @classmethod
    def parse(cls, value: str) -> CorsPolicy | None:
        """``HEADRACE_CORS_ORIGINS`` as a policy; None when empty (CORS off)."""
        entries = [e.strip() for e in value.split(",") if e.strip()]
        if not entries:
            return None
        bad = [e for e in entries if e != "*" and not _ORIGIN.match(e)]
        if bad:
            raise ValueError(
                f"HEADRACE_CORS_ORIGINS: {', '.join(bad)} is not an origin "
                "(scheme://host[:port], no path) or *"
            )
        return cls(frozenset(e.lower() for e in entries if e != "*"), "*" in entries)

    def allow(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``; None when not allowed."""
        if not origin:
            return None
        if self.any_origin:
            return "*"
        return origin if origin.lower() in self.origins else None


POLICY = web.AppKey("headrace_cors", CorsPolicy)


@web.middleware
async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a CORS preflight for an allowed origin and a method the route has; the rest pass."""
    asked = request.headers.get("Access-Control-Request-Method")
    origin = request.headers.get("Origin")
    if request.method != "OPTIONS" or not asked or request.app[POLICY].allow(origin) is None:
        return await handler(request)
    match = await request.app.router.resolve(request.clone(method=asked))
    if match.http_exception is not None:  # no such route, or not with that method
        return await handler(request)
    headers = {"Access-Control-Allow-Methods": asked, "Access-Control-Max-Age": str(MAX_AGE_S)}
    if wanted := request.headers.get("Access-Control-Request-Headers"):
        # Echoed: a wildcard would not cover Authorization (the Fetch standard excludes it).
        headers["Access-Control-Allow-Headers"] = wanted
    return web.Response(status=204, headers=headers)


async def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """CORS headers on every response to an allowed origin (on_response_prepare, so streamed
    responses get them with their headers)."""
    policy = request.app[POLICY]
    if not policy.any_origin:
        vary = response.headers.get("Vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
    allowed = policy.allow(request.headers.get("Origin"))
    if allowed is None:
        return
    response.headers["Access-Control-Allow-Origin"] = allowed
    response.headers["Access-Control-Expose-Headers"] = EXPOSED
