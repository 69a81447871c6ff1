"""One generation request's life, from admission to its last byte.

A generation route (``edge.routing.Routes.generation``) is handed a ``Session``. The
route says what to submit (``submit_text``, ``submit_image``) and how to format the
answer (``edge.respond``, ``edge.imaging``); the session does the rest, once each:

* admits the request against its key's limits, with the cost it now knows;
* publishes the jobs, or joins the jobs of an identical request in flight (``edge.dedup``);
* follows them (``self.relay``) and opens a streamed answer once;
* when it ends, however it ends: stops following, cancels what is unfinished, and
  settles the charge from the usage the jobs reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from typing import Literal

from aiohttp import web

from edge.context import JOB_IDS, REQUEST_ID, caller, ctx
from edge.errors import Api
from edge.jobs import deadline_ms, job_headers
from edge.ratelimit.admission import embed_estimate, prompt_estimate, token_estimate
from edge.ratelimit.charge import charge_of
from edge.ratelimit.limits import megapixel_steps
from edge.relay import Relay
from edge.sse import Bounds, Framing, SlowClient
from edge.tasks import Task
from schemas.client import JobStream
from schemas.errors import InvalidRequest, ModelNotFound, Unavailable
from schemas.events import Done
from schemas.fleet import ModelInfo
from schemas.jobs import (
    EmbedJob,
    EmbedParams,
    ImageInput,
    ImageJob,
    ImageParams,
    TextJob,
    TextParams,
)
from schemas.subjects import new_job_id

log = logging.getLogger(__name__)

# How long a request that ended early (client gone, deadline) waits for its cancelled jobs'
# ``done`` to learn their real usage; a cancelled job stops within one token.
SETTLE_WAIT_S = 10.0

Outcome = Literal["finished", "failed", "deadline", "client_gone", "slow_client"]


class Session:
    """One generation request: its charge, its jobs and their events, its answer's end."""

    def __init__(self, request: web.Request, api: Api) -> None:
        self.request = request
        self.edge = ctx(request)
        self.key = caller(request)
        self.api = api  # the shape of its errors
        self.started = time.perf_counter()
        self.charge = charge_of(request)
        # From the request's arrival, not from admission: the client's timeout started then.
        # A malformed timeout header is a 400 here, before anything is charged or published.
        self.deadline_ms = deadline_ms(request)
        self.outcome: Outcome = "client_gone"  # until the answer says otherwise
        self.model: ModelInfo | None = None
        self.job_ids: list[str] = []
        self.created_s = int(time.time())
        self.relay: Relay | None = None
        self.task: Task | None = None  # an image request's A1111 task
        self._fingerprint: str | None = None  # set when identical requests share these jobs
        self._joined = False  # follows jobs another request published (and pays for)
        self._opened: Framing | None = None
        self._ended = False

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.end()

    @property
    def headers(self) -> dict[str, str]:
        """``x-headrace-job-ids`` (for /v1/jobs/{id}/events) and, for images, the task id."""
        headers = {"x-headrace-job-ids": ",".join(self.job_ids)}
        if self.task is not None:
            headers["x-headrace-task-id"] = self.task.id
        if (region := self.region) is not None:
            headers["x-headrace-region"] = region
        return headers

    @property
    def region(self) -> str | None:
        """In a super-cluster, the region that served the jobs (their workers' started events;
        before those arrive, the region whose queue holds them), comma-separated if several."""
        if self.relay is None or self.edge.placement is None:
            return None
        regions: list[str] = []
        for ch in self.relay.choices:
            placed = ch.stream.placed
            region = ch.region or (placed.region if placed is not None else None)
            if region and region not in regions:
                regions.append(region)
        return ",".join(regions) or None

    async def submit_text(
        self, model: str, params: list[TextParams], *, stream: bool, fingerprint: str | None
    ) -> None:
        """Admit, wait for a worker of the model, then publish one job per choice.

        With a ``fingerprint`` already in flight, join those jobs instead (see edge.dedup).
        """
        c = self.edge
        self.key.check(model)
        if c.limiter is not None:
            await self.charge.acquire(
                tokens=token_estimate(params, c.limiter.completion_default),
                prompt_tokens=max((prompt_estimate(p) for p in params), default=0),
            )
        self.model = await c.fleet.require("llm", model, c.settings.no_worker_wait_s)
        if self.model.embedding_only:
            raise InvalidRequest(f"{model} computes embeddings only", param="model")
        jobs = [self._text_job(model, p, stream) for p in params]
        if fingerprint is None:
            self._follow(await self._publish(jobs))
            return
        self._fingerprint = fingerprint
        entry, new = c.dedup.join(fingerprint)
        if not new:
            self._joined = True
            await asyncio.shield(entry.ready)
            self.job_ids, self.created_s = entry.job_ids, entry.created_s
            self.request[JOB_IDS] = self.job_ids
            self._follow([await c.jobs.watch(j, replay=True) for j in entry.job_ids])
            return
        try:
            streams = await self._publish(jobs)
        except BaseException as e:
            c.dedup.failed(fingerprint, entry, e)
            raise
        c.dedup.published(entry, self.job_ids, self.created_s)
        self._follow(streams)

    async def submit_embed(self, model: str, params: EmbedParams) -> None:
        """Admit (charging the inputs' estimated tokens), wait for a worker of the model,
        publish one ``EmbedJob`` with every input; its vectors gather in the relay."""
        c = self.edge
        self.key.check(model)
        if c.limiter is not None:
            estimate = embed_estimate(params)
            await self.charge.acquire(tokens=estimate, prompt_tokens=estimate)
        self.model = await c.fleet.require("llm", model, c.settings.no_worker_wait_s)
        if not self.model.embeddings:
            raise InvalidRequest(f"{model} does not compute embeddings", param="model")
        job = EmbedJob(
            id=new_job_id(),
            model=model,
            created_ms=int(time.time() * 1000),
            deadline_ms=self.deadline_ms,
            stream=False,
            params=params,
        )
        self._follow(await self._publish([job]))

    async def submit_image(
        self, model: str, params: ImageParams, init_images: list[bytes], task_id: str | None
    ) -> ImageJob:
        """Admit (charging the image budget), wait for a worker of the model, publish the job."""
        c = self.edge
        self.key.check(model)
        if c.limiter is not None:
            count = params.batch_size * params.n_iter
            await self.charge.acquire(
                images=megapixel_steps(params.width, params.height, params.steps, count)
            )
        try:
            self.model = await c.fleet.require("sd", model, c.settings.no_worker_wait_s)
        except ModelNotFound:
            raise ModelNotFound(
                f"The image model '{model}' does not exist", param="model"
            ) from None
        job_id = new_job_id()
        inputs: list[ImageInput] = await c.images.inputs_for(job_id, init_images)
        job = ImageJob(
            id=job_id,
            model=model,
            created_ms=int(time.time() * 1000),
            deadline_ms=self.deadline_ms,
            params=params.model_copy(update={"init_images": inputs}),
        )
        streams = await self._publish([job])
        self.task = Task(id=task_id or job_id, key_id=self.key.id, job_id=job_id)
        c.tasks.open(self.task)
        self._follow(streams)
        return job

    def _text_job(self, model: str, params: TextParams, stream: bool) -> TextJob:
        return TextJob(
            id=new_job_id(),
            model=model,
            created_ms=int(time.time() * 1000),
            deadline_ms=self.deadline_ms,
            stream=stream,
            params=params,
        )

    async def _publish(
        self, jobs: list[TextJob] | list[ImageJob] | list[EmbedJob]
    ) -> list[JobStream]:
        """Publish every job, all or nothing (half of an n>1 request is not left running)."""
        self.job_ids = [j.id for j in jobs]
        self.created_s = jobs[0].created_ms // 1000
        self.request[JOB_IDS] = self.job_ids
        headers = job_headers(self.request)
        streams: list[JobStream] = []
        try:
            for job in jobs:
                streams.append(await self._submit(job, headers))
        except BaseException:
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.cancel()
                    await s.close()
            raise
        return streams

    async def _submit(
        self, job: TextJob | ImageJob | EmbedJob, headers: dict[str, str]
    ) -> JobStream:
        """Publish one job: in a super-cluster, into the region ``edge.placement`` chooses,
        and into the next choice when that region's JetStream does not answer."""
        c = self.edge
        placement = c.placement
        if placement is None:
            return await c.jobs.submit(job, headers=headers)
        while True:
            region = placement.choose(job.kind, job.model)  # NoWorker when no region is live
            published = False
            try:
                stream = await c.jobs.submit(job, headers=headers, place=region, attempts=3)
                published = True
                return stream
            except Unavailable:
                placement.unreachable(region)  # the next choice skips it
                if not placement.live_regions():
                    raise
            finally:
                placement.release(job.kind, job.model, region, published=published)

    def _follow(self, streams: list[JobStream]) -> None:
        s = self.edge.settings
        first_tick = s.first_event_wait_s if self.task is None else s.keepalive_s
        self.relay = Relay(streams, first_tick, s.keepalive_s)

    @property
    def following(self) -> Relay:
        """The relay of the submitted jobs' events (only after a submit)."""
        assert self.relay is not None, "nothing was submitted"
        return self.relay

    @property
    def bounds(self) -> Bounds:
        """How far the client of its streamed answer may fall behind."""
        return Bounds(self.edge.settings.stream_buffer_bytes, self.deadline_ms)

    async def drop(self, framing: Framing, e: SlowClient) -> None:
        """A client too far behind: end (its jobs are cancelled), then drop its connection."""
        extra = {"request_id": self.request[REQUEST_ID], "job_ids": self.job_ids}
        log.warning("dropping a client that stopped reading: %s", e, extra=extra)
        await self.end("deadline" if e.deadline else "slow_client")
        framing.abort()

    async def open(self, framing: Framing) -> None:
        """Send a streamed answer's headers, once (counted in the open-streams gauge)."""
        if self._opened is not None:
            return
        await framing.open()
        self._opened = framing
        self.edge.metrics.open_streams.inc()

    async def end(self, outcome: Outcome | None = None) -> None:
        """Stop following, cancel what is unfinished, settle the charge. Once; later calls
        (the route table ends every session) do nothing."""
        if self._ended:
            return
        self._ended = True
        self.outcome = outcome or self.outcome
        c = self.edge
        if self.task is not None:
            c.tasks.close(self.task)
        unfinished = await self.relay.close() if self.relay is not None else []
        await self._cancel(unfinished)
        await self._settle(unfinished)
        if self._opened is not None:
            c.metrics.open_streams.dec()
        if c.placement is not None and self.relay is not None and not self._joined:
            for ch in self.relay.choices:
                if ch.region:
                    c.metrics.region_served.labels(ch.region).inc()

    async def _cancel(self, unfinished: list[str]) -> None:
        """Cancel unfinished jobs (shared ones: once their last follower left, see edge.dedup)."""
        c = self.edge
        if self._fingerprint is not None:
            c.dedup.release(self._fingerprint, unfinished, c.jobs.cancel)
        else:
            for job_id in unfinished:
                with contextlib.suppress(Exception):
                    await c.jobs.cancel(job_id)
        if unfinished:
            c.metrics.cancels.labels(self.outcome).inc(len(unfinished))

    async def _settle(self, unfinished: list[str]) -> None:
        """Charge what the jobs used; jobs just cancelled report theirs within a token."""
        if self.relay is None or self._joined:
            await self.charge.settle(0)  # nothing ran for it, or the request it joined pays
            return
        prompt = self.charge.prompt_estimate
        if not unfinished or not self.charge.counts_tokens:
            await self.charge.settle(self.relay.tokens_used(prompt))
            return
        await self.charge.settle(self._usage_later(self.relay, prompt))

    async def _usage_later(self, relay: Relay, prompt: int) -> int:
        """Wait (bounded) for the ``done`` of jobs left unfinished; returns the whole usage."""
        late: dict[int, Done] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_WAIT_S):
                for ch in relay.choices:
                    if ch.finished:
                        continue
                    async with await self.edge.jobs.watch(ch.stream.job_id, replay=True) as s:
                        async for received in s:
                            if isinstance(received.event, Done):
                                late[ch.index] = received.event
        return relay.tokens_used(prompt, late)
