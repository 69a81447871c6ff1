"""The pull-consumer runtime: fetch, run, publish, acknowledge. Independent of any model."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import failover
from schemas.codec import decode_job
from schemas.connection import connect
from schemas.errors import ErrorCode, HeadraceError, InvalidRequest, Poison, Retry, Unavailable
from schemas.events import Delta, Done, EngineEvent, Error, Progress, Started
from schemas.fleet import VERSION, WorkerInfo
from schemas.image_store import ImageStore
from schemas.jobs import AnyJob, EmbedJob, ImageJob, TextJob
from schemas.subjects import (
    CANCEL_ALL,
    RESULTS_PREFIX,
    Header,
    JobKind,
    alive_subject,
    attempt_number,
    consumer_name,
    dlq_subject,
    fence_subject,
    is_reply_subject,
    jobs_stream,
    model_slug,
    reply_region,
    reply_results_stream,
    results_subject,
    rpc_subject,
    trace_id,
    workers_bucket,
)
from schemas.topology import Limits, ensure_present
from workers.cancels import CancelBook
from workers.emitter import Emitter
from workers.engines.abilities import AnswersRpc, Embeds, ReportsGpuMemory
from workers.engines.base import Engine
from workers.heartbeat import Heartbeat
from workers.metrics import Outcome, WorkerMetrics
from workers.queue_time import queue_ms
from workers.settings import WorkerSettings
from workers.slots import SlotPool

log = logging.getLogger(__name__)

_ACK_ATTEMPTS = 5  # about 12 s of retries: longer than a consumer leader election


@dataclass
class Binding:
    """One model's durable consumer, bound by this worker."""

    model: str
    psub: JetStreamContext.PullSubscription
    max_deliver: int


@dataclass
class Held:
    """One job this worker runs now: what a SIGTERM needs to finish it or hand it over."""

    msg: Msg
    job: AnyJob
    emitter: Emitter
    epoch: int
    attempt: int
    cancel: threading.Event
    reply: str
    units: int = 0  # tokens or diffusion steps done in this attempt
    started_at: float = field(default_factory=time.perf_counter)
    last_unit_at: float | None = None
    eta_s: float | None = None  # an image job's own estimate
    leaving: Literal["hand_over", "superseded"] | None = None

    def count(self, event: EngineEvent) -> None:
        """Note an event's progress."""
        now = time.perf_counter()
        if isinstance(event, Delta):
            self.units += event.tokens
        elif isinstance(event, Progress):
            self.units, self.eta_s = event.step, event.eta_s
        else:
            return
        self.last_unit_at = now

    def remaining_s(self) -> float | None:
        """How long the job should still take here; None when that cannot be told."""
        if isinstance(self.job, ImageJob):
            return self.eta_s
        if isinstance(self.job, EmbedJob):
            return 0.0  # one batched evaluation, nothing to continue from: let it finish
        total, last = self.job.params.max_tokens, self.last_unit_at
        if total is None or last is None or not self.units:
            return None  # no end in sight, or still reading the prompt
        done = self.units + (len(self.job.resume.token_ids) if self.job.resume else 0)
        return (last - self.started_at) / self.units * max(0, total - done)

    def leave(self, why: Literal["hand_over", "superseded"]) -> None:
        """Stop at the next event, sending nothing more (see Runtime._leave)."""
        self.leaving = self.leaving or why
        self.cancel.set()


class Runtime:
    """Serves one engine's models from JetStream until stopped."""

    def __init__(
        self, settings: WorkerSettings, engine: Engine[Any], metrics: WorkerMetrics | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.slots = SlotPool(settings.slots or 1)
        self.cancels = CancelBook(settings.cancel_memory_s)
        self.started_ms = int(time.time() * 1000)
        self.jobs_done = 0
        self._stopping = asyncio.Event()
        self._held: dict[asyncio.Task[None], Msg] = {}
        self._running: dict[asyncio.Task[None], Held] = {}  # of _held, those in _run
        self._nc: NATS | None = None
        self._images: ImageStore | None = None
        self._heartbeat: Heartbeat | None = None
        self._emitters: set[Emitter] = set()  # of the jobs held now, for resend()
        self._limits = Limits(replicas=settings.replicas)  # for what it re-creates
        self.metrics = metrics or WorkerMetrics()
        self.metrics.slots.set(self.slots.size)
        self.metrics.busy_slots.set_function(lambda: len(self._held))
        # Optional abilities are looked for once, here; the rest of the runtime reads these.
        # The rpc subjects belong to text models (rpc.llm.<model>.<op>): only text engines serve them.
        self._rpc = engine if engine.kind == "llm" and isinstance(engine, AnswersRpc) else None
        self._embed = engine if isinstance(engine, Embeds) else None
        if isinstance(engine, ReportsGpuMemory):
            gpu_memory = engine.gpu_memory_bytes
            self.metrics.gpu_memory_bytes.set_function(lambda: gpu_memory() or 0)

    @property
    def nc(self) -> NATS:
        """The NATS connection (only while running)."""
        assert self._nc is not None, "the runtime is not running"
        return self._nc

    def stop(self) -> None:
        """Stop fetching; held jobs that end soon finish, the others are handed over (see
        ``_shutdown``)."""
        self._stopping.set()

    @property
    def _regional(self) -> bool:
        """True in a super-cluster: replies name the submitter's region (``results.<region>.``)."""
        return self.settings.scope is not None

    def describe(self) -> WorkerInfo:
        """This worker's registry record."""
        return WorkerInfo(
            id=self.settings.worker_id,
            region=self.settings.region,
            version=VERSION,
            models=self.engine.models(),
            slots=self.slots.size,
            busy=len(self._held),
            started_ms=self.started_ms,
            heartbeat_ms=0,
        )

    async def run(self, *, until_idle: bool = False) -> None:
        """Serve until ``stop()``; with ``until_idle``, also return once the queue is empty."""
        loading = time.perf_counter()
        await self.engine.start()
        loaded_s = time.perf_counter() - loading
        for m in self.engine.models():  # start() loads every model at once: each gets the total
            self.metrics.model_load_seconds.labels(m.id).set(loaded_s)
        self._nc = await connect(
            self.settings, self.settings.worker_id, wait=True, on_reconnect=self._reconnected
        )
        js = self.nc.jetstream()
        self._images = ImageStore(js, self.settings.image_inline_chars)
        self._heartbeat = heartbeat = Heartbeat(
            js,
            self.describe,
            self.settings.heartbeat_s,
            self._limits,
            bucket=workers_bucket(self.settings.scope),
            region=self.settings.scope,
            home=self.settings.home,
        )
        try:
            ready = await self._ensure_topology(js)
        except BaseException:  # e.g. UnknownRegion: a region no cluster answers to
            await self._disconnect()
            raise
        if not ready:  # stopped while NATS could not provide it
            await self._disconnect()
            return
        bindings = [await self._bind(js, m.id) for m in self.engine.models()]
        await self.nc.subscribe(CANCEL_ALL, cb=self._on_cancel)
        await self._serve_rpc()
        beating = asyncio.create_task(heartbeat.run())
        log.info(
            "worker %s ready: %s, %d slot(s)",
            self.settings.worker_id,
            ", ".join(b.model for b in bindings),
            self.slots.size,
        )
        loops = [asyncio.create_task(self._fetch_loop(b, until_idle)) for b in bindings]
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown(loops)
            beating.cancel()
            await heartbeat.remove(self.settings.worker_id)
            await self._disconnect()

    async def _disconnect(self) -> None:
        """Flush what was published, close the connection, release the engine."""
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.nc.flush(timeout=2)  # results and acks already published must leave
        # nats-py's close() raises RuntimeError when the server went away before us.
        with contextlib.suppress(nats.errors.Error, TimeoutError, RuntimeError):
            await self.nc.close()
        await self.engine.close()

    def _needs(self) -> list[tuple[JobKind, str]]:
        return [(self.engine.kind, m.id) for m in self.engine.models()]

    async def _ensure_topology(self, js: JetStreamContext) -> bool:
        """Create whatever the server lacks (streams, buckets, this worker's consumers), never
        changing what exists: provisioning owns the limits. Retries until it works; False
        when the worker is stopped meanwhile."""
        waiting = False
        while not self._stopping.is_set():
            try:
                # In a super-cluster: its region's queue, registry and streams (schemas.topology).
                await ensure_present(
                    js,
                    self._needs(),
                    limits=self._limits,
                    region=self.settings.scope,
                    home=self.settings.home,
                )
                return True
            except (nats.errors.Error, TimeoutError) as e:
                if not waiting:
                    log.warning("JetStream is not available yet (%s); waiting", type(e).__name__)
                    waiting = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # not wait_for: 3.11's can eat a cancel
                        await self._stopping.wait()
        return False

    async def _reconnected(self) -> None:
        """A restarted or replaced server may lack the topology: bring it back, beat at once
        so the edges see this worker again without waiting a heartbeat period, and publish
        the events of held jobs again (one written just before the server went down may
        never have reached it; followers drop the copies they already have)."""
        for emitter in list(self._emitters):  # first: followers are waiting for these
            await emitter.resend()
        await self._ensure_topology(self.nc.jetstream())
        if self._heartbeat is not None:
            await self._heartbeat.beat()

    async def _bind(self, js: JetStreamContext, model: str) -> Binding:
        """Bind the model's durable consumer (created explicitly, never by pull_subscribe)."""
        durable = consumer_name(self.engine.kind, model)
        stream = jobs_stream(self.settings.scope)
        info = await js.consumer_info(stream, durable)
        psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
        return Binding(model, psub, info.config.max_deliver or 1)

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.subject.rpartition(".")[2]
        if self.cancels.cancel(job_id):
            log.info("job %s: cancel requested", job_id)

    async def _serve_rpc(self) -> None:
        rpc = self._rpc
        if rpc is None:
            return
        for m in self.engine.models():
            await self.nc.subscribe(
                rpc_subject(m.id, "*"),
                queue=f"rpc-{model_slug(m.id)}",
                cb=functools.partial(self._on_rpc, rpc),
            )

    async def _on_rpc(self, rpc: AnswersRpc, msg: Msg) -> None:
        _, _, slug, op = msg.subject.split(".", 3)
        model = next((m.id for m in self.engine.models() if model_slug(m.id) == slug), slug)
        try:
            payload = orjson.loads(msg.data or b"{}")
            result: dict[str, Any] = {"result": await rpc.rpc(model, op, payload)}
        except HeadraceError as e:
            result = {"error": {"code": e.code, "message": e.message, "param": e.param}}
        except (orjson.JSONDecodeError, TypeError, ValueError):
            result = {
                "error": {
                    "code": ErrorCode.INVALID_REQUEST,
                    "message": "payload must be a JSON object",
                }
            }
        await msg.respond(orjson.dumps(result))

    async def _fetch_loop(self, b: Binding, until_idle: bool) -> None:
        failing = False
        while not self._stopping.is_set():
            n = await self.slots.take(self.slots.size)
            if self._stopping.is_set():
                await self.slots.give(n)
                return
            msgs: list[Msg] = []
            try:
                msgs = await b.psub.fetch(n, timeout=self.settings.fetch_timeout_s)
                failing = False
            except nats.errors.TimeoutError:
                pass
            except (nats.errors.Error, nats.js.errors.Error, OSError) as e:
                if not failing:
                    log.warning("fetch for %s failed (%s); retrying", b.model, type(e).__name__)
                failing = True
                await asyncio.sleep(0.5)
            await self.slots.give(n - len(msgs))
            for msg in msgs:
                task = asyncio.create_task(self._hold(b, msg))
                self._held[task] = msg
            if until_idle and not msgs and not failing and self.slots.busy == 0:
                self.stop()

    async def _hold(self, b: Binding, msg: Msg) -> None:
        """Handle one message in its slot; whatever happens, the slot is given back."""
        try:
            await self._handle(b, msg)
        except (nats.errors.Error, TimeoutError) as e:
            # The outcome could not be reported (NATS away): redelivery after ack_wait covers it.
            log.warning("a job's outcome was not acknowledged (%s)", type(e).__name__)
        finally:
            self._held.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            await self.slots.give(1)

    async def _shutdown(self, loops: list[asyncio.Task[None]]) -> None:
        """Stop fetching; hand over at once the held jobs that would not end soon, let the
        others finish within the grace period, nak what is left."""
        for held_job in self._running.values():
            left = held_job.remaining_s()
            if left is None or left > self.settings.handover_below_s:
                held_job.leave("hand_over")
        _, stuck = await asyncio.wait(loops, timeout=self.settings.fetch_timeout_s + 1)
        for t in stuck:
            t.cancel()
        held = list(self._held)
        if not held:
            return
        log.info(
            "stopping: waiting up to %.0f s for %d job(s) (%d handed over)",
            self.settings.shutdown_grace_s,
            len(held),
            sum(1 for h in self._running.values() if h.leaving),
        )
        _, late = await asyncio.wait(held, timeout=self.settings.shutdown_grace_s)
        for task in late:
            msg = self._held.get(task)
            task.cancel()
            if msg is not None:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await msg.nak()
        await asyncio.gather(*late, return_exceptions=True)

    async def _handle(self, b: Binding, msg: Msg) -> None:
        """Run one delivered job to an outcome: ack, nak, term or dead letter."""
        headers = msg.headers or {}
        raw_epoch = headers.get(Header.EPOCH, "0")
        epoch = int(raw_epoch) if raw_epoch.isdigit() else 0
        attempt = attempt_number(epoch, msg.metadata.num_delivered or 1)
        try:
            job = decode_job(msg.data)
        except Poison as e:
            self.metrics.ended(b.model, "dead_lettered", 0, None)
            await self._dead_letter(msg, e, _results_reply(headers, self._regional), attempt)
            return
        reply = headers.get(Header.REPLY) or results_subject(job.id)
        if not is_reply_subject(reply, job.id, self._regional):
            self.metrics.ended(b.model, "dead_lettered", 0, None)
            bad = Poison(f"{Header.REPLY} must be results.<job id> or results.<user>.<job id>")
            await self._dead_letter(msg, bad, None, attempt)
            return
        emitter = Emitter(self.nc, job.id, reply, attempt, headers.get(Header.OWNER))
        self._emitters.add(emitter)
        try:
            # A redelivery or a continuation may have been taken over. In a super-cluster so
            # may a job from another region's edge that waited here (this region was lost for
            # a while and the job went on elsewhere): its fence says (one read in the
            # submitter's region before it starts).
            foreign = self._regional and reply_region(reply) != self.settings.scope
            if (epoch or attempt > 1 or foreign) and await self._superseded(reply, epoch):
                await msg.term()
                self._ended(b, msg, job, "superseded")
                return
            held = Held(msg, job, emitter, epoch, attempt, self.cancels.track(job.id), reply)
            await self._start(b, held, headers)
        finally:
            self._emitters.discard(emitter)
            emitter.close()
            self.cancels.forget(job.id)

    async def _superseded(self, reply: str, epoch: int) -> bool:
        """True when the job's fence is past this epoch: a continuation took it over (or it
        finished and its ack was lost), so this delivery must not run."""
        if not reply.startswith(f"{RESULTS_PREFIX}."):
            return False
        stream = reply_results_stream(reply, self._regional)
        return await failover.read_fence(self.nc.jetstream(timeout=2.0), reply, stream) > epoch

    async def _start(self, b: Binding, held: Held, headers: dict[str, str]) -> None:
        """Skip a cancelled or expired job; run any other."""
        msg, job, emitter = held.msg, held.job, held.emitter
        if self.cancels.was_cancelled(job.id):
            self.cancels.forget(job.id)
            await emitter.emit(
                Done(finish_reason="cancelled", seed=getattr(job.params, "seed", None))
            )
            await self._settle(msg)
            self._ended(b, msg, job, "cancelled")
            return
        deadline_ms = _deadline_ms(job, headers)
        if deadline_ms is not None and time.time() * 1000 >= deadline_ms:
            await emitter.emit(
                Error(code=ErrorCode.DEADLINE_EXCEEDED, message="the job expired in the queue")
            )
            await msg.term()
            self.cancels.forget(job.id)
            self._ended(b, msg, job, "expired")
            return
        if self._stopping.is_set():  # fetched as the worker stopped: another worker runs it
            await msg.nak()
            self.cancels.forget(job.id)
            self._ended(b, msg, job, "retried")
            return
        task = asyncio.current_task()
        assert task is not None
        self._running[task] = held
        try:
            await self._run(b, held, deadline_ms)
        finally:
            self._running.pop(task, None)

    async def _run(self, b: Binding, held: Held, deadline_ms: int | None) -> None:
        msg, job, emitter, attempt, cancel = (
            held.msg,
            held.job,
            held.emitter,
            held.attempt,
            held.cancel,
        )
        keeper = asyncio.create_task(self._keep_alive(held, deadline_ms))
        ran_from = time.perf_counter()
        done: Done | None = None
        outcome: Outcome
        try:
            waited_ms = queue_ms(job)
            await emitter.emit(self._started(held, waited_ms))
            self.metrics.started(b.model, attempt, waited_ms)
            # aclosing: if this task is cancelled, the engine's generator is closed now (its
            # finally stops any generation thread), not whenever it is garbage collected.
            async with contextlib.aclosing(self._events(job, cancel, attempt)) as events:
                async for event in events:
                    if held.leaving and _not_final(event):
                        break  # nothing more from this attempt: see _leave
                    await emitter.emit(event)
                    held.count(event)
                    done = event if isinstance(event, Done) else done
            if held.leaving and done is None:
                outcome = await self._leave(held)
            else:
                await self._raise_fence(held)
                await self._settle(msg)
                self.jobs_done += 1
                cancelled = done is not None and done.finish_reason == "cancelled"
                outcome = "cancelled" if cancelled else "done"
        except Retry as e:
            outcome = await self._retry(b, msg, emitter, attempt, e)
        except HeadraceError as e:
            if e.retryable:  # e.g. a store or service the engine needs is away for now
                retry = Retry(e.message, delay_s=self.settings.retry_delay_s)
                outcome = await self._retry(b, msg, emitter, attempt, retry)
            else:
                await emitter.emit(Error.of(e))
                await msg.term()
                outcome = "failed"
        except nats.errors.Error:
            # NATS, not the engine: the outcome cannot be reported now (a restart, an
            # election). No nak either: the job comes back after ack_wait (see _hold).
            raise
        except Exception as e:  # an engine bug: another attempt (maybe elsewhere) may fare better
            log.error("job %s: engine failed with %s", job.id, type(e).__name__)
            log.debug("engine failure", exc_info=True)
            outcome = await self._retry(
                b,
                msg,
                emitter,
                attempt,
                Retry("the engine failed", delay_s=self.settings.retry_delay_s),
            )
        finally:
            keeper.cancel()
            self.cancels.forget(job.id)
        self._ended(b, msg, job, outcome, done=done, ran_from=ran_from)

    def _started(self, held: Held, waited_ms: float) -> Started:
        resume = held.job.resume if isinstance(held.job, TextJob) else None
        after = (held.msg.headers or {}).get(Header.RESUMED_AFTER)
        return Started(
            worker=self.settings.worker_id,
            region=self.settings.region,
            attempt=held.attempt,
            queue_ms=waited_ms,
            beat_ms=max(1, round(self.settings.job_beat_s * 1000)),
            resumed_after=after if held.epoch else None,
            resumed_chars=len(resume.text) if resume and held.epoch else 0,
            resumed_tokens=len(resume.token_ids) if resume and held.epoch else 0,
            job_seq=held.msg.metadata.sequence.stream or None,
        )

    async def _leave(self, held: Held) -> Outcome:
        """Stop an attempt without a final event.

        Stopped (SIGTERM): once every event it sent is stored, a last beat says so, and the
        job's followers hand it over at once, as a continuation of what they received
        (they publish jobs; a worker may not). The message is nak'ed with a delay: when
        nobody follows the job it starts again elsewhere, and when somebody handed it over
        its fence has the redelivery terminated unrun. Superseded (a continuation took over
        while this worker was paused): terminated.
        """
        if held.leaving == "superseded":
            await held.msg.term()
            return "superseded"
        await held.emitter.confirm()  # followers may need any of them from RESULTS
        headers: dict[str, str] = {
            Header.ATTEMPT: str(held.attempt),
            Header.LEAVING: str(held.emitter.seq),
        }
        await self.nc.publish(alive_subject(held.reply), b"", headers=headers)
        await held.msg.nak(delay=self.settings.handover_nak_delay_s)
        log.info("job %s: handed over (%d tokens delivered)", held.job.id, held.emitter.tokens)
        return "handed_over"

    async def _raise_fence(self, held: Held) -> None:
        """A finished job's fence: a redelivery (its ack lost in an election) is not run."""
        if held.reply.startswith(f"{RESULTS_PREFIX}."):
            headers: dict[str, str] = {Header.EPOCH: str(held.epoch + 1)}
            await self.nc.publish(fence_subject(held.reply), b"", headers=headers)

    async def _events(
        self, job: AnyJob, cancel: threading.Event, attempt: int
    ) -> AsyncGenerator[EngineEvent, None]:
        """The engine's events, with image bytes moved through the object store where too large."""
        images = self._images
        assert images is not None
        try:
            if isinstance(job, ImageJob):
                job = await images.resolve(job)
            async with contextlib.aclosing(self._engine_events(job, cancel)) as events:
                async for event in events:
                    if isinstance(event, Done) and event.images:
                        event = await images.offload(event, job.id, attempt)
                    yield event
        except Unavailable as e:  # the object store, not the job: another attempt may succeed
            raise Retry(e.message, delay_s=self.settings.retry_delay_s) from e

    def _engine_events(
        self, job: AnyJob, cancel: threading.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        if not isinstance(job, EmbedJob):
            return self.engine.run(job, cancel)
        if self._embed is None:
            raise InvalidRequest(f"this worker computes no embeddings for {job.model}")
        return self._embed.embed(job, cancel)

    def _ended(
        self,
        b: Binding,
        msg: Msg,
        job: AnyJob,
        outcome: Outcome,
        *,
        done: Done | None = None,
        ran_from: float | None = None,
    ) -> None:
        """Count an attempt's outcome and log its one line (ids and numbers, never text)."""
        tokens = done.usage.completion_tokens if done is not None else 0
        ran_s = None if ran_from is None else time.perf_counter() - ran_from
        self.metrics.ended(b.model, outcome, tokens, ran_s)
        if done is not None and isinstance(job, ImageJob):
            self.metrics.imaged(b.model, done)
        log.info(
            "job %s %s",
            job.id,
            outcome,
            extra={
                "job_id": job.id,
                "model": b.model,
                "attempt": attempt_number(
                    int(raw)
                    if (raw := (msg.headers or {}).get(Header.EPOCH, "0")).isdigit()
                    else 0,
                    msg.metadata.num_delivered or 1,
                ),
                "outcome": outcome,
                "tokens": tokens,
                "duration_ms": round((ran_s or 0.0) * 1000, 1),
                "request_id": (msg.headers or {}).get(Header.REQUEST_ID),
                "trace_id": trace_id((msg.headers or {}).get(Header.TRACEPARENT)),
            },
        )

    async def _keep_alive(self, held: Held, deadline_ms: int | None) -> None:
        """Beat on the job's alive subject every ``job_beat_s`` (followers hand the job over
        when the beats stop), +WPI every ``in_progress_s`` so it is not redelivered
        (ack_wait restarts on in_progress, ADR-37); stop at the deadline.

        Beats come from the event loop, which the engines' threads never block. When the
        loop itself was held up past what followers wait (the process was paused, or
        starved of CPU), the job may have gone on elsewhere meanwhile: the fence says.
        """
        s = self.settings
        beat: dict[str, str] = {Header.ATTEMPT: str(held.attempt)}
        subject = alive_subject(held.reply)
        wpi_at = time.monotonic() + s.in_progress_s
        while True:
            # On a grid of job_beat_s shared by every job of the process: their beats (and
            # +WPIs) go out in one wake-up of the loop, one write to the socket, and reach
            # nats-server and the followers together, instead of one wake-up each per job.
            wait = s.job_beat_s - time.monotonic() % s.job_beat_s
            if s.in_progress_s < s.job_beat_s:  # +WPI more often than beats: off the grid
                wait = min(wait, max(0.0, wpi_at - time.monotonic()))
            if deadline_ms is not None:
                wait = min(wait, max(0.0, deadline_ms / 1000 - time.time()))
            slept_from = time.monotonic()
            await asyncio.sleep(wait)
            if deadline_ms is not None and time.time() * 1000 >= deadline_ms:
                held.cancel.set()
                return
            late = time.monotonic() - slept_from - wait
            if held.leaving:
                return  # _leave sends the last beat
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self.nc.publish(subject, b"", headers=beat)
                if time.monotonic() >= wpi_at:
                    wpi_at = time.monotonic() + s.in_progress_s
                    await held.msg.in_progress()
                stalled = late > s.job_beat_s * (failover.MISSED_BEATS - 1)
                if stalled and await self._superseded(held.reply, held.epoch):
                    log.warning("job %s: taken over elsewhere while stalled", held.job.id)
                    held.leave("superseded")
                    return

    async def _settle(self, msg: Msg) -> None:
        """Ack and wait for the server's confirmation (a lost ack would rerun the job).

        While a cluster elects the consumer's leader (seconds after a node dies) an ack finds
        no responder: asked again for a while rather than leaving a finished job to rerun.
        """
        delay = 0.25
        for attempt in range(1, _ACK_ATTEMPTS + 1):
            try:
                with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                    await msg.ack_sync(timeout=5.0)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if attempt == _ACK_ATTEMPTS:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)

    async def _retry(
        self, b: Binding, msg: Msg, emitter: Emitter, attempt: int, e: Retry
    ) -> Outcome:
        if (msg.metadata.num_delivered or 1) < b.max_deliver:
            log.warning(
                "job attempt %d failed (%s); redelivering in %.1f s", attempt, e.message, e.delay_s
            )
            await msg.nak(delay=e.delay_s)
            return "retried"
        message = f"the job failed on all {msg.metadata.num_delivered or 1} attempts: {e.message}"
        await emitter.emit(Error(code=ErrorCode.DEAD_LETTERED, message=message, retryable=False))
        await self._dead_letter(msg, e, None, attempt)
        return "dead_lettered"

    async def _dead_letter(
        self, msg: Msg, e: HeadraceError, reply: str | None, attempt: int
    ) -> None:
        """Copy the message to ``dlq.<subject>`` with the reason, then stop its redelivery."""
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers[Header.REASON] = e.message[:512]
        headers[Header.ATTEMPT] = str(attempt)
        log.warning("dead-lettering a message from %s: %s", msg.subject, e.code)
        await self.nc.jetstream().publish(dlq_subject(msg.subject), msg.data, headers=headers)
        if reply:
            emitter = Emitter(self.nc, "", reply, attempt)
            await emitter.emit(Error.of(e, retryable=False))
        await msg.term()


def _not_final(event: EngineEvent) -> bool:
    """True for any event but a ``done`` the engine reached by itself (not by the cancel
    that stopping an attempt sets)."""
    return not isinstance(event, Done) or event.finish_reason == "cancelled"


def _deadline_ms(job: AnyJob, headers: dict[str, str]) -> int | None:
    raw = headers.get(Header.DEADLINE)
    if raw is not None and raw.isdigit():
        return int(raw)
    return job.deadline_ms


def _results_reply(headers: dict[str, str], regions: bool = False) -> str | None:
    """The reply of a job that could not be decoded, when it has a results subject's shape
    (its id is unknown, so this is all that can be checked)."""
    reply = headers.get(Header.REPLY)
    if reply and is_reply_subject(reply, reply.rpartition(".")[2], regions):
        return reply
    return None
