"""What every handler needs, built once at start-up and stored on the application."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from nats.aio.client import Client as NATS

from edge.auth import ApiKey, KeyStore
from edge.dedup import Dedup
from edge.fleet import Fleet
from edge.metrics import EdgeMetrics
from edge.options import Options
from edge.placement import Placement
from edge.queues import QueueDepth
from edge.ratelimit.admission import Limiter
from edge.settings import EdgeSettings
from edge.tasks import TaskBook
from schemas.client import JobClient
from schemas.image_store import ImageStore


@dataclass
class EdgeContext:
    """The edge's shared state; what comes from NATS is attached once connected."""

    settings: EdgeSettings
    keys: KeyStore
    metrics: EdgeMetrics
    dedup: Dedup
    tasks: TaskBook
    limiter: Limiter | None = None  # None: no key has a rate limit
    nc: NATS | None = None
    queues: QueueDepth | None = None
    options: Options | None = None  # A1111 options per key
    placement: Placement | None = None  # a super-cluster's: which region takes each job
    _jobs: JobClient | None = field(default=None, repr=False)
    _fleet: Fleet | None = field(default=None, repr=False)
    _images: ImageStore | None = field(default=None, repr=False)

    def attach(
        self,
        nc: NATS,
        *,
        jobs: JobClient,
        fleet: Fleet,
        images: ImageStore,
        queues: QueueDepth,
        options: Options,
    ) -> None:
        """Everything that needs a NATS connection, once it is there."""
        self.nc, self.queues, self.options = nc, queues, options
        self._jobs, self._fleet, self._images = jobs, fleet, images

    @property
    def jobs(self) -> JobClient:
        """The job client (only once connected)."""
        assert self._jobs is not None, "the edge is not connected to NATS"
        return self._jobs

    @property
    def images(self) -> ImageStore:
        """The images object store (only once connected)."""
        assert self._images is not None, "the edge is not connected to NATS"
        return self._images

    @property
    def fleet(self) -> Fleet:
        """The worker registry (only once connected)."""
        assert self._fleet is not None, "the edge is not connected to NATS"
        return self._fleet


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
