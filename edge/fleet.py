"""The edge's view of the fleet: a live watch of the ``workers`` KV bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError

from schemas.codec import decode_worker
from schemas.errors import ModelNotFound, NoWorker
from schemas.fleet import ModelInfo, WorkerInfo
from schemas.subjects import JOBS_STREAM, WORKERS_BUCKET, JobKind, consumer_name

log = logging.getLogger(__name__)


class Fleet:
    """Live workers by id, kept current by a KV watch; stale heartbeats are ignored."""

    def __init__(self, js: JetStreamContext, stale_s: float) -> None:
        self.js = js
        self.stale_s = stale_s
        self.workers: dict[str, WorkerInfo] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._guard: asyncio.Task[None] | None = None
        self._heard = time.monotonic()  # the last record the watch delivered

    async def start(self) -> None:
        """Begin watching (returns once the current records are loaded)."""
        await self._start_watch()
        if self._guard is None:
            self._guard = asyncio.create_task(self._guard_watch())

    async def rewatch(self) -> None:
        """Watch afresh: after a reconnect the bucket may be a new one (a server that lost its
        state re-creates it empty); records the old watch held are dropped, live workers
        put theirs again within a heartbeat."""
        await self._stop_watch()
        async with self._changed:
            self.workers.clear()
        await self._start_watch()

    async def stop(self) -> None:
        """Stop watching."""
        if self._guard is not None:
            self._guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._guard
        await self._stop_watch()

    async def _start_watch(self) -> None:
        kv = await self.js.key_value(WORKERS_BUCKET)
        self._watcher = watcher = await kv.watchall()
        self._heard = time.monotonic()
        loaded = asyncio.Event()
        self._task = asyncio.create_task(self._watch(watcher, loaded))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await loaded.wait()

    async def _stop_watch(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._watcher is not None:
            # Unsubscribing the watch's ordered consumer first lets the connection close at once.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._watcher.stop()  # type: ignore[no-untyped-call]

    async def _guard_watch(self) -> None:
        """Watch afresh when the watch went quiet while workers were known: its consumer lived
        on a cluster node that died (this edge's own connection may never have dropped)."""
        while True:
            await asyncio.sleep(self.stale_s / 3)
            if self.workers and time.monotonic() - self._heard > self.stale_s / 2:
                log.warning("the worker registry went quiet; watching it afresh")
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await self.rewatch()

    async def _watch(self, watcher: KeyValue.KeyWatcher, loaded: asyncio.Event) -> None:
        # ``async for``, not ``updates(timeout=)``: asyncio.wait_for on Python 3.11 can swallow
        # the cancellation that stop() sends when an update arrives at the same moment.
        async for entry in watcher:
            self._heard = time.monotonic()
            if entry is None:  # the end of the initial values
                loaded.set()
                continue
            async with self._changed:
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.workers.pop(entry.key, None)
                else:
                    try:
                        self.workers[entry.key] = decode_worker(entry.value)
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
        """A model is known (if not live) when its consumer exists on JOBS."""
        try:
            await self.js.consumer_info(JOBS_STREAM, consumer_name(kind, model))
        except nats.js.errors.NotFoundError:
            return False
        except ValueError:  # not a valid consumer name: not a model id we could serve
            return False
        return True
