"""The limiter in the request path: the middleware and OpenAI's headers.

A route is charged in one of three ways, declared where it is registered (``edge.routing``):
one request with a lease while it runs (the default, admitted by the middleware); by its
``Session`` once it knows the cost (generation routes: tokens or image budget); or not at
all (a poll clients repeat every second). The headers go out with the response's headers,
streamed responses included (``on_response_prepare`` runs before the first byte).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from edge.context import KEY, ctx
from edge.ratelimit.charge import CHARGE, charge_of
from edge.routing import Charging, route_info

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Charge one request to routes charged per request; release its lease however it ends."""
    if ctx(request).limiter is None or KEY not in request:
        return await handler(request)
    if route_info(request).charging is not Charging.REQUEST:
        return await handler(request)  # charged by its session, or not at all
    charge = charge_of(request)
    await charge.acquire()
    try:
        return await handler(request)
    finally:
        await charge.settle(0)


async def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """``x-ratelimit-*`` on the response (on_response_prepare: before a stream's first byte)."""
    if CHARGE in request and (headers := request[CHARGE].headers):
        response.headers.update(headers)
