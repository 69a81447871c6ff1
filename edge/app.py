"""The edge application: build it, connect it to NATS, serve it."""

from __future__ import annotations

import asyncio
import logging
import signal

import nats.errors
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from edge import cors, middlewares
from edge.auth import KeyStore
from edge.context import CTX, EdgeContext
from edge.dedup import Dedup
from edge.fleet import Fleet
from edge.metrics import EdgeMetrics
from edge.options import Options
from edge.placement import Placement
from edge.queues import QueueDepth
from edge.ratelimit import http as ratelimit
from edge.ratelimit.admission import Limiter
from edge.routes import (
    a1111,
    embeddings,
    health,
    llamacpp,
    ollama,
    openai,
    openai_images,
    openapi,
)
from edge.settings import EdgeSettings
from edge.tasks import TaskBook
from schemas.client import JobClient
from schemas.connection import connect
from schemas.image_store import ImageStore
from schemas.subjects import jobs_stream
from schemas.topology import Limits, ensure_present

log = logging.getLogger(__name__)

_REWATCH_ATTEMPTS = 120  # about two minutes of one-second retries


def build_app(settings: EdgeSettings, registry: CollectorRegistry | None = None) -> web.Application:
    """The aiohttp application. Refuses to build without API keys: the edge never runs open."""
    keys = KeyStore.from_settings(settings)
    if not keys:
        raise ValueError("no API keys configured: set HEADRACE_API_KEYS (or a keys file)")
    policy = cors.CorsPolicy.parse(settings.cors_origins)
    metrics = EdgeMetrics(registry)
    limiter = None
    if keys.limited:
        if not settings.redis_url:
            raise ValueError("keys have rate limits: set HEADRACE_REDIS_URL (Redis or Valkey)")
        limiter = Limiter(settings, metrics)
    # A preflight is answered before auth: browsers send it without credentials.
    preflight = [cors.preflight] if policy is not None else []
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[middlewares.errors, *preflight, middlewares.auth, ratelimit.middleware],
    )
    app[CTX] = EdgeContext(
        settings, keys, metrics, Dedup(settings.dedup_grace_s), TaskBook(), limiter=limiter
    )
    app.on_startup.append(_connect)
    app.on_cleanup.append(_disconnect)
    app.on_response_prepare.append(middlewares.stamp_request_id)
    app.on_response_prepare.append(ratelimit.stamp)
    if policy is not None:
        app[cors.POLICY] = policy
        app.on_response_prepare.append(cors.stamp)
    for module in (openai, openai_images, a1111, llamacpp, ollama, health, openapi):
        module.routes.add_to(app)
    for table in embeddings.tables:
        table.add_to(app)
    return app


async def _connect(app: web.Application) -> None:
    c = app[CTX]
    nc = await connect(
        c.settings,
        f"edge-{c.settings.region}",
        connect_timeout_s=5,
        on_reconnect=lambda: _reconnected(app),
    )
    js = nc.jetstream()
    s = c.settings
    # A new (or replaced) server: what the edge relies on is created, at this deployment's R
    # (in a super-cluster: its own region's streams, and the shared buckets in the home's).
    await ensure_present(js, limits=Limits(replicas=s.replicas), region=s.scope, home=s.home)
    fleet = Fleet(js, s.worker_stale_s, s.region_names(), s.scope)
    await fleet.start()
    queues = QueueDepth(
        js, c.metrics.queued, c.metrics.running, s.queue_poll_s, jobs_stream(s.scope)
    )
    queues.start()
    jobs = JobClient(nc, region=s.scope)
    c.attach(nc, jobs=jobs, fleet=fleet, images=ImageStore(js), queues=queues, options=Options(js))
    if s.scope is not None:
        c.placement = Placement(
            nc.jetstream(timeout=max(s.region_poll_s, 0.5)),
            fleet,
            jobs,
            c.metrics,
            region=s.scope,
            regions=s.region_names(),
            poll_s=s.region_poll_s,
            lost_s=s.region_lost_s,
        )
        jobs.placer = c.placement  # where a continuation goes when its region is lost
        c.placement.start()
        log.info("edge of region %s in a super-cluster of %s", s.scope, ", ".join(s.region_names()))
    await c.tasks.start(jobs)
    log.info("edge connected to NATS; %d live worker(s)", len(fleet.live()))
    if c.limiter is not None:
        await c.limiter.start()
        log.info("rate limits on, kept in Redis (failing %s)", c.settings.ratelimit_fail)


async def _reconnected(app: web.Application) -> None:
    """The server may be a restarted or replaced one: every open job catches up from RESULTS,
    then what the edge relies on is brought back and the fleet followed afresh (retried while
    the cluster elects its leaders)."""
    c = app[CTX]
    if c.nc is None:
        return
    await c.jobs.recover()
    js = c.nc.jetstream(timeout=1.0)  # short: a call into an election should not hold us long
    s = c.settings
    limits = Limits(replicas=s.replicas)
    for attempt in range(1, _REWATCH_ATTEMPTS + 1):
        try:
            await ensure_present(js, limits=limits, timeout_s=5, region=s.scope, home=s.home)
            await c.fleet.rewatch()
            return
        except (nats.errors.Error, TimeoutError) as e:
            if attempt == 1:
                log.warning(
                    "after a reconnect: JetStream not ready (%s); retrying", type(e).__name__
                )
            await asyncio.sleep(1.0)
    log.error("after a reconnect: the worker registry could not be followed again")


async def _disconnect(app: web.Application) -> None:
    c = app[CTX]
    if c.limiter is not None:
        await c.limiter.close()
    await c.tasks.stop()
    if c.nc is not None:
        if c.queues is not None:
            await c.queues.stop()
        if c.placement is not None:
            await c.placement.stop()
        await c.fleet.stop()
        await c.nc.close()


async def start(settings: EdgeSettings, registry: CollectorRegistry | None = None) -> web.AppRunner:
    """Start serving on the configured address; the caller cleans the runner up."""
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its jobs.
    # max_line_size: aiohttp answers a request line longer than this itself, in plain text,
    # before any middleware runs (its parser errors have no hook: aiohttp#3287), so the bound
    # is set well above any real URL and what the routes accept is bounded by the routes, in
    # their own error shape (``id_task``: 128 characters).
    runner = web.AppRunner(
        build_app(settings, registry),
        handler_cancellation=True,
        access_log=None,
        max_line_size=settings.max_url_bytes,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    return runner


async def serve(settings: EdgeSettings) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = await start(settings)
    log.info("edge listening on http://%s:%d", settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(settings: EdgeSettings) -> None:
    """Blocking entry point of ``headrace edge``."""
    uvloop.run(serve(settings))
