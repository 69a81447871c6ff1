"""What every handler needs, built once at start-up and stored on the application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from nats.aio.client import Client as NATS

from edge.auth import ApiKey, KeyStore
from edge.dedup import Dedup
from edge.metrics import EdgeMetrics
from edge.options import Options
from edge.queues import QueueDepth
from edge.ratelimit.admission import Limiter
from edge.registry import Registry
from edge.settings import EdgeSettings
from edge.tasks import TaskBook
from schemas.client import JobClient
from schemas.images import ImageStore


@dataclass
class EdgeContext:
    """The edge's shared state."""

    settings: EdgeSettings
    keys: KeyStore
    metrics: EdgeMetrics
    dedup: Dedup
    tasks: TaskBook
    nc: NATS | None = None
    client: JobClient | None = None
    registry: Registry | None = None
    queues: QueueDepth | None = None
    limiter: Limiter | None = None  # None: no key has a rate limit
    options: Options | None = None  # A1111 options per key (once connected)
    store: ImageStore | None = None  # the images object store (once connected)

    @property
    def jobs(self) -> JobClient:
        """The job client (only once connected)."""
        assert self.client is not None, "the edge is not connected to NATS"
        return self.client

    @property
    def images(self) -> ImageStore:
        """The images object store (only once connected)."""
        assert self.store is not None, "the edge is not connected to NATS"
        return self.store

    @property
    def fleet(self) -> Registry:
        """The worker registry (only once connected)."""
        assert self.registry is not None, "the edge is not connected to NATS"
        return self.registry


CTX = web.AppKey("headrace_edge", EdgeContext)
KEY = web.RequestKey("headrace_key", ApiKey)  # the authenticated caller
REQUEST_ID = web.RequestKey("headrace_request_id", str)
JOB_IDS = web.RequestKey("headrace_job_ids", list[str])  # the jobs answering it, for its log line


def ctx(request: web.Request) -> EdgeContext:
    """The edge context of a request's application."""
    return request.app[CTX]


def caller(request: web.Request) -> ApiKey:
    """The authenticated key of a request (the auth middleware guarantees one)."""
    return request[KEY]
