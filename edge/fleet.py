"""The edge's view of the fleet: a live watch of the ``workers`` KV bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas.codec import decode_worker
from schemas.errors import ModelNotFound, NoWorker
from schemas.fleet import ModelInfo, WorkerInfo
from schemas.subjects import WORKERS_BUCKET, JobKind, consumer_name, jobs_stream, workers_bucket

log = logging.getLogger(__name__)


class _Watch:
    """One registry bucket's watch (one region's, in a super-cluster)."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.task: asyncio.Task[None] | None = None
        self.watcher: KeyValue.KeyWatcher | None = None
        self.heard = time.monotonic()  # the last record the watch delivered
        self.failed = False  # the last (re)start of the watch failed: retried by the guard


class Fleet:
    """Live workers by id, kept current by a KV watch; stale heartbeats are ignored.

    In a super-cluster it watches every region's registry (``workers_<region>``); a region
    that cannot be reached is retried in the background, and its workers go stale.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stale_s: float,
        regions: Sequence[str] = (),
        jobs_region: str | None = None,
    ) -> None:
        self.js = js
        self.stale_s = stale_s
        self.regions = tuple(regions)
        # The region whose queue the edge checks first for a model's consumer (its own).
        self.jobs_region = jobs_region
        self.workers: dict[str, WorkerInfo] = {}
        self._changed = asyncio.Condition()
        buckets = [workers_bucket(r) for r in regions] if regions else [WORKERS_BUCKET]
        self._watches = {b: _Watch(b) for b in buckets}
        self._guard: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin watching (returns once the current records are loaded).

        With one registry a failure raises (the edge cannot serve without it); with a
        region's registry out of reach the edge starts anyway and retries it.
        """
        for w in self._watches.values():
            try:
                await self._start_watch(w)
            except (nats.errors.Error, TimeoutError) as e:
                if len(self._watches) == 1:
                    raise
                w.failed = True
                log.warning(
                    "the registry %s is out of reach (%s); retrying", w.bucket, type(e).__name__
                )
        if self._guard is None:
            self._guard = asyncio.create_task(self._guard_watch())

    async def rewatch(self) -> None:
        """Watch afresh: after a reconnect the bucket may be a new one (a server that lost its
        state re-creates it empty); records the old watch held are dropped, live workers
        put theirs again within a heartbeat."""
        for w in self._watches.values():
            await self._rewatch(w)

    async def _rewatch(self, w: _Watch, *, clear: bool = True) -> None:
        await self._stop_watch(w)
        if clear:
            async with self._changed:
                for key in [k for k in self.workers if k.startswith(f"{w.bucket}/")]:
                    del self.workers[key]
        try:
            await self._start_watch(w)
        except (nats.errors.Error, TimeoutError):
            w.failed = True
            raise

    async def stop(self) -> None:
        """Stop watching."""
        if self._guard is not None:
            self._guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._guard
        for w in self._watches.values():
            await self._stop_watch(w)

    async def _start_watch(self, w: _Watch) -> None:
        async with asyncio.timeout(5):
            kv = await self.js.key_value(w.bucket)
            w.watcher = watcher = await kv.watchall()
        w.heard = time.monotonic()
        w.failed = False
        loaded = asyncio.Event()
        w.task = asyncio.create_task(self._watch(w, watcher, loaded))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await loaded.wait()

    async def _stop_watch(self, w: _Watch) -> None:
        if w.task is not None:
            w.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w.task
            w.task = None
        if w.watcher is not None:
            # Unsubscribing the watch's ordered consumer first lets the connection close at once.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await w.watcher.stop()  # type: ignore[no-untyped-call]
            w.watcher = None

    async def _guard_watch(self) -> None:
        """Watch afresh when the watch went quiet while workers were known: its consumer lived
        on a cluster node that died (this edge's own connection may never have dropped); and
        retry a region's registry that was out of reach."""
        while True:
            await asyncio.sleep(self.stale_s / 3)
            for w in self._watches.values():
                known = any(k.startswith(f"{w.bucket}/") for k in self.workers)
                quiet = time.monotonic() - w.heard > self.stale_s / 2
                if w.failed or (known and quiet):
                    if not w.failed:
                        log.warning(
                            "the worker registry %s went quiet; watching it afresh", w.bucket
                        )
                    # Records kept: a live worker's is overwritten by the new watch within a
                    # heartbeat, a dead one's goes stale by its age (``live``).
                    with contextlib.suppress(nats.errors.Error, TimeoutError):
                        await self._rewatch(w, clear=False)

    async def _watch(self, w: _Watch, watcher: KeyValue.KeyWatcher, loaded: asyncio.Event) -> None:
        # ``async for``, not ``updates(timeout=)``: asyncio.wait_for on Python 3.11 can swallow
        # the cancellation that stop() sends when an update arrives at the same moment.
        async for entry in watcher:
            w.heard = time.monotonic()
            if entry is None:  # the end of the initial values
                loaded.set()
                continue
            key = f"{w.bucket}/{entry.key}"
            async with self._changed:
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.workers.pop(key, None)
                else:
                    try:
                        self.workers[key] = decode_worker(entry.value)
                    except ValidationError:
                        log.warning("ignoring a malformed worker record %s", entry.key)
                self._changed.notify_all()

    def live(self) -> list[WorkerInfo]:
        """Workers whose last heartbeat is recent."""
        cutoff = time.time() * 1000 - self.stale_s * 1000
        return [w for w in self.workers.values() if w.heartbeat_ms >= cutoff]

    def models(self, kind: JobKind | None = None) -> dict[str, ModelInfo]:
        """Models with at least one live worker, by id."""
        out: dict[str, ModelInfo] = {}
        for w in self.live():
            for m in w.models:
                if kind is None or m.kind == kind:
                    # OpenAI's "created": when the model came up, if its engine does not say.
                    out.setdefault(
                        m.id,
                        m if m.created else m.model_copy(update={"created": w.started_ms // 1000}),
                    )
        return out

    async def require(self, kind: JobKind, model: str, wait_s: float) -> ModelInfo:
        """The model's info once a live worker has it; 404 when nobody knows it, 503 when none is live."""
        if (info := self.models(kind).get(model)) is not None:
            return info
        if not await self._provisioned(kind, model):
            raise ModelNotFound(f"The model '{model}' does not exist", param="model")
        deadline = time.monotonic() + wait_s
        async with self._changed:
            while (info := self.models(kind).get(model)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoWorker(f"No worker is serving '{model}' right now; retry shortly")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 0.5)):
                        await self._changed.wait()
        return info

    async def _provisioned(self, kind: JobKind, model: str) -> bool:
        """A model is known (if not live) when its consumer exists on JOBS (in a super-cluster:
        on the edge's own region's queue, else on any region's that answers)."""
        regions: list[str | None] = [None]
        if self.regions:
            regions = sorted(self.regions, key=lambda r: r != self.jobs_region)
        for region in regions:
            try:
                await self.js.consumer_info(jobs_stream(region), consumer_name(kind, model))
            except nats.js.errors.NotFoundError:
                continue
            except ValueError:  # not a valid consumer name: not a model id we could serve
                return False
            except (nats.errors.Error, TimeoutError):  # that region is out of reach
                continue
            return True
        return False
