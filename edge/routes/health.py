"""Liveness, readiness and Prometheus metrics (no key needed)."""

from __future__ import annotations

import nats.errors
import nats.js.errors
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge.context import ctx
from edge.errors import json_response
from edge.routing import Routes
from schemas.subjects import jobs_stream, results_stream

routes = Routes()


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    """200 while the process runs."""
    return json_response({"status": "ok"})


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    """200 once NATS is connected, the streams exist and a worker is live; else 503 with reasons.

    An unreachable Redis makes it "degraded" (200) when limits fail open, 503 when they fail closed.
    """
    c = ctx(request)
    reasons: list[str] = []
    if c.nc is None or not c.nc.is_connected:
        reasons.append("NATS is not connected")
    else:
        region = c.settings.scope  # in a super-cluster: this edge's own region's streams
        for stream in (jobs_stream(region), results_stream(region)):
            try:
                await c.nc.jetstream().stream_info(stream)
            except (nats.js.errors.NotFoundError, nats.errors.Error, TimeoutError):
                reasons.append(f"stream {stream} is missing or unreachable")
    workers = c.fleet.live() if c.nc is not None else []
    if not workers:
        reasons.append("no live worker")
    # Without Redis the edge still serves when it fails open: degraded, not down.
    degraded: list[str] = []
    if c.limiter is not None and not await c.limiter.buckets.reachable():
        (reasons if c.limiter.fail_closed else degraded).append(
            "Redis (rate limits) is unreachable"
        )
    models = sorted({m.id for w in workers for m in w.models})
    status = "not_ready" if reasons else ("degraded" if degraded else "ready")
    body = {
        "status": status,
        "degraded": degraded,
        "reasons": reasons,
        "workers": len(workers),
        "models": models,
    }
    return json_response(body, 503 if reasons else 200)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    body = generate_latest(ctx(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
