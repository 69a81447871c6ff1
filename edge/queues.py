"""Queue depth per model, read from the JOBS stream's consumers, for ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from prometheus_client import Gauge

from schemas.subjects import JOBS_STREAM

log = logging.getLogger(__name__)


class QueueDepth:
    """Polls every model consumer's pending and running counts into two gauges."""

    def __init__(
        self,
        js: JetStreamContext,
        queued: Gauge,
        running: Gauge,
        interval_s: float,
        stream: str = JOBS_STREAM,  # JOBS_<region>: this edge's own region's queue
    ) -> None:
        self.js = js
        self.stream = stream
        self.queued = queued
        self.running = running
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def poll(self) -> None:
        """Read every consumer once (a consumer is one model: ``llm-<slug>``, ``sd-<slug>``)."""
        for info in await self.js.consumers_info(self.stream):
            self.queued.labels(info.name).set(info.num_pending or 0)
            self.running.labels(info.name).set(info.num_ack_pending or 0)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await self.poll()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Poll in the background until stop()."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
