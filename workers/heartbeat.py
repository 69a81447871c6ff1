"""Heartbeats into the ``workers`` KV bucket: the edge's view of who is alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from schemas.codec import encode
from schemas.fleet import WorkerInfo
from schemas.subjects import WORKERS_BUCKET, worker_key
from schemas.topology import Limits, ensure_present

log = logging.getLogger(__name__)


class Heartbeat:
    """Puts this worker's record every ``interval_s``; the bucket's TTL removes it if we die."""

    def __init__(
        self,
        js: JetStreamContext,
        describe: Callable[[], WorkerInfo],
        interval_s: float,
        limits: Limits | None = None,
        *,
        bucket: str = WORKERS_BUCKET,
        region: str | None = None,
        home: str | None = None,
    ) -> None:
        self.js = js
        self.bucket = bucket  # workers, or workers_<region> in a super-cluster
        self.region, self.home = region, home  # what ensure_present re-creates
        self.limits = limits or Limits()
        self.describe = describe
        self.interval_s = interval_s
        self._failing = False

    async def beat(self) -> None:
        """Put the record once; failures are logged once until it works again."""
        info = self.describe().model_copy(update={"heartbeat_ms": int(time.time() * 1000)})
        try:
            kv = await self.js.key_value(self.bucket)
            await kv.put(worker_key(info.id), encode(info))
        except nats.js.errors.BucketNotFoundError:
            # Deleted, or a server that lost its state: bring it back; the next beat lands.
            log.warning("the %s bucket is missing: re-creating it", self.bucket)
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await ensure_present(
                    self.js,
                    limits=self.limits,
                    timeout_s=self.interval_s,
                    region=self.region,
                    home=self.home,
                )
            return
        except (nats.errors.Error, TimeoutError) as e:
            if not self._failing:
                log.warning(
                    "heartbeat failed (%s); retrying every %.1f s",
                    type(e).__name__,
                    self.interval_s,
                )
            self._failing = True
            return
        if self._failing:
            log.info("heartbeat restored")
        self._failing = False

    async def run(self) -> None:
        """Beat until cancelled."""
        while True:
            await self.beat()
            await asyncio.sleep(self.interval_s)

    async def remove(self, worker_id: str) -> None:
        """Delete our record on a clean exit, so the edge stops routing to us at once."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            kv = await self.js.key_value(self.bucket)
            await kv.delete(worker_key(worker_id))
