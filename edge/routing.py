"""Route tables that say, for each route, how it is charged and in which API's shape it errs.

A handler that generates (submits jobs) is registered with ``Routes.generation``: it is
called with a ``Session`` that admits the request once it knows the cost, and the table
ends that session however the handler ends. A handler without a session cannot submit
jobs, so a generation route cannot forget its admission or settle twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from aiohttp import web

from edge.errors import OPENAI, Api
from edge.session import Session

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SessionHandler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


class Charging(Enum):
    """How a route is charged to the caller's rate limits."""

    REQUEST = "request"  # one request and a lease while it runs (the middleware)
    SESSION = "session"  # its session, with the cost it knows (tokens, image budget)
    NONE = "none"  # nothing: a poll clients repeat every second


@dataclass(frozen=True)
class RouteInfo:
    """What the middlewares need to know about a route."""

    api: Api
    charging: Charging


DEFAULT = RouteInfo(OPENAI, Charging.REQUEST)
ROUTES = web.AppKey("headrace_routes", dict[web.AbstractRoute, RouteInfo])


def route_info(request: web.Request) -> RouteInfo:
    """How the matched route is charged and shapes its errors (unmatched: OpenAI's way)."""
    return request.app[ROUTES].get(request.match_info.route, DEFAULT)


@dataclass(frozen=True)
class _Def:
    method: str
    path: str
    handler: Handler
    charging: Charging


class Routes:
    """The routes of one API family."""

    def __init__(self, api: Api = OPENAI) -> None:
        self.api = api
        self._defs: list[_Def] = []

    def route(
        self, method: str, path: str, *, charging: Charging = Charging.REQUEST
    ) -> Callable[[Handler], Handler]:
        """Register a plain handler (charged per request unless ``charging`` says otherwise)."""

        def register(handler: Handler) -> Handler:
            self._defs.append(_Def(method, path, handler, charging))
            return handler

        return register

    def get(
        self, path: str, *, charging: Charging = Charging.REQUEST
    ) -> Callable[[Handler], Handler]:
        """Register a GET handler."""
        return self.route("GET", path, charging=charging)

    def post(
        self, path: str, *, charging: Charging = Charging.REQUEST
    ) -> Callable[[Handler], Handler]:
        """Register a POST handler."""
        return self.route("POST", path, charging=charging)

    def generation(self, path: str) -> Callable[[SessionHandler], SessionHandler]:
        """Register a POST handler that submits jobs through the ``Session`` it is given."""

        def register(handler: SessionHandler) -> SessionHandler:
            api = self.api

            async def run(request: web.Request) -> web.StreamResponse:
                async with Session(request, api) as session:
                    return await handler(request, session)

            run.__name__ = run.__qualname__ = handler.__name__
            run.__doc__ = handler.__doc__
            self._defs.append(_Def("POST", path, run, Charging.SESSION))
            return handler

        return register

    def add_to(self, app: web.Application) -> None:
        """Add the routes to ``app`` and record how each is charged and shapes its errors."""
        infos = app.setdefault(ROUTES, {})
        for d in self._defs:
            route = app.router.add_route(d.method, d.path, d.handler)
            infos[route] = RouteInfo(self.api, d.charging)
