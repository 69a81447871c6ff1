"""Image requests, whatever their API: one job per request, its progress, and its result bytes.

The routes (A1111, OpenAI) turn their bodies into an ``ImageRequest`` and their
results into their own shapes; admission, input images, the job, progress tracking
for ``/sdapi/v1/progress``, cancellation and the object store are handled here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from edge.context import JOB_IDS, caller, ctx
from edge.errors import body_of, json_response
from edge.jobs import deadline_ms, job_headers
from edge.ratelimit.http import admit
from edge.ratelimit.limits import megapixel_steps
from edge.sse import EventStream
from edge.tasks import Task
from schemas.client import JobStream
from schemas.errors import (
    DeadlineExceeded,
    HeadraceError,
    InvalidRequest,
    ModelNotFound,
    NoWorker,
    error_from_code,
)
from schemas.events import Done, Error, Progress, Started
from schemas.jobs import ImageJob, ImageParams
from schemas.subjects import cancel_subject, new_job_id

# What an input image may be (the formats the diffusion engine decodes): PNG and JPEG here,
# WebP below (RIFF....WEBP).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


@dataclass
class ImageRequest:
    """An image generation request, whatever API it came from."""

    model: str
    params: ImageParams
    init_images: list[bytes]
    task_id: str | None = None  # A1111's force_task_id


@dataclass
class ImageSubmission:
    """A published image job and the task that tracks it."""

    job: ImageJob
    stream: JobStream
    task: Task
    started: float


@dataclass
class ImageResult:
    """A finished image job: its ``done`` event and the PNG bytes of each image."""

    done: Done
    images: list[bytes]


def decode_image(value: str, param: str) -> bytes:
    """An input image given as base64 or a data URI. URLs are refused: the edge fetches nothing."""
    text = value.strip()
    if text.lower().startswith(("http://", "https://", "ftp://", "file:")):
        raise InvalidRequest(
            "images must be base64 or data URIs: headrace does not fetch URLs", param=param
        )
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequest("a data URI image must be base64-encoded", param=param)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("an image is not valid base64", param=param) from None
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if not (webp or data.startswith(_MAGIC)):
        raise InvalidRequest("an image must be a PNG, JPEG or WebP", param=param)
    return data


def check_image_bounds(
    request: web.Request, *, width: int, height: int, steps: int, count: int, count_param: str
) -> None:
    """This deployment's limits on size, steps and image count, checked before anything else."""
    s = ctx(request).settings
    for name, side in (("width", width), ("height", height)):
        if not s.image_min_side <= side <= s.image_max_side:
            raise InvalidRequest(
                f"{name} must be between {s.image_min_side} and {s.image_max_side}", param=name
            )
    if steps > s.image_max_steps:
        raise InvalidRequest(f"steps must be at most {s.image_max_steps}", param="steps")
    if count > s.image_max_count:
        raise InvalidRequest(f"at most {s.image_max_count} images per request", param=count_param)


def pick_model(request: web.Request, asked: str | None) -> str:
    """The image model a request means: ``asked`` (an A1111 title or a model id), else the
    configured default, else the one live image model (sorted first when there are several)."""
    live = sorted(ctx(request).fleet.models("sd"))
    if asked:
        title = asked.rsplit(" [", 1)[0].strip()  # A1111 titles end with " [hash]"
        for model in live:
            if title in (model, model.rsplit(".", 1)[0]) or title.rsplit(".", 1)[0] == model:
                return model
        return title  # not live: the registry says whether it is unknown (404) or down (503)
    if (default := ctx(request).settings.default_image_model) is not None:
        return default
    if not live:
        raise NoWorker("No image worker is running right now; retry shortly")
    return live[0]


async def submit_image(request: web.Request, req: ImageRequest) -> ImageSubmission:
    """Admit against the key's limits, wait for a worker of the model, publish the job."""
    c, key = ctx(request), caller(request)
    started = time.perf_counter()
    key.check(req.model)
    p = req.params
    cost = megapixel_steps(p.width, p.height, p.steps, p.batch_size * p.n_iter)
    await admit(request, images=cost)
    try:
        await c.fleet.require("sd", req.model, c.settings.no_worker_wait_s)
    except ModelNotFound:
        raise ModelNotFound(
            f"The image model '{req.model}' does not exist", param="model"
        ) from None
    job_id = new_job_id()
    inputs = await c.images.inputs_for(job_id, req.init_images)
    job = ImageJob(
        id=job_id,
        model=req.model,
        created_ms=int(time.time() * 1000),
        deadline_ms=deadline_ms(request),
        params=p.model_copy(update={"init_images": inputs}),
    )
    request[JOB_IDS] = [job_id]
    stream = await c.jobs.submit(job, headers=job_headers(request))
    task = Task(id=req.task_id or job_id, key_id=key.id, job_id=job_id)
    c.tasks.open(task)
    return ImageSubmission(job, stream, task, started)


OnEvent = Callable[[Progress | None], Awaitable[None]]


async def follow(request: web.Request, sub: ImageSubmission, on_event: OnEvent) -> ImageResult:
    """Wait for the job's result; ``on_event`` gets each progress event and None when idle.

    Leaving early (client gone, deadline, failure) cancels the job.
    """
    c = ctx(request)
    done: Done | None = None
    reason = "client_gone"
    try:
        while done is None:
            received = await sub.stream.next(c.settings.keepalive_s)
            event = None if received is None else received.event
            if isinstance(event, Error):
                reason = "failed"
                raise error_from_code(event.code, event.message)
            if isinstance(event, Done):
                done = event
            elif isinstance(event, Started):
                c.metrics.queue_time.labels(sub.job.model).observe(event.queue_ms / 1000)
            elif isinstance(event, Progress):
                sub.task.advance(event)
                await on_event(event)
            elif event is None:
                await on_event(None)
        reason = "finished"
        images = [await c.images.fetch(ref) for ref in done.images]
    except DeadlineExceeded:
        reason = "deadline"
        raise
    finally:
        await _finish(request, sub, reason)
    c.metrics.e2e.labels(sub.job.model).observe(time.perf_counter() - sub.started)
    return ImageResult(done, images)


async def _finish(request: web.Request, sub: ImageSubmission, reason: str) -> None:
    """Forget the task; a job left running (client gone, deadline) is cancelled."""
    c = ctx(request)
    c.tasks.close(sub.task)
    with contextlib.suppress(Exception):
        await sub.stream.close()
    if reason in ("client_gone", "deadline"):
        c.metrics.cancels.labels(reason).inc()
        with contextlib.suppress(Exception):
            await c.jobs.nc.publish(cancel_subject(sub.job.id), b"")


Render = Callable[[ImageResult], dict[str, Any]]


def wants_events(request: web.Request) -> bool:
    """A client that accepts Server-Sent Events gets progress, then the result, as a stream."""
    return "text/event-stream" in request.headers.get("Accept", "")


async def answer(request: web.Request, sub: ImageSubmission, render: Render) -> web.StreamResponse:
    """The result as one JSON body, or progress events and then the result as SSE."""
    headers = {"x-headrace-job-ids": sub.job.id, "x-headrace-task-id": sub.task.id}
    if not wants_events(request):
        result = await follow(request, sub, _ignore)
        return json_response(render(result), headers=headers)
    sse = EventStream(request, headers)
    metrics = ctx(request).metrics

    async def open_once() -> None:
        if not sse.opened:
            await sse.open()
            metrics.open_streams.inc()

    async def on_event(progress: Progress | None) -> None:
        await open_once()  # at the first progress or the first idle tick
        if progress is None:
            await sse.keepalive()
        else:
            await sse.send(orjson.dumps(progress_event(sub.task)), event="progress")

    try:
        result = await follow(request, sub, on_event)
        await open_once()
        await sse.send(orjson.dumps(render(result)), event="result")
    except HeadraceError as e:
        if not sse.opened:
            raise  # nothing sent yet: a real HTTP status
        await sse.send(orjson.dumps(body_of(e.code, e.message, e.param)), event="error")
    finally:
        if sse.opened:
            metrics.open_streams.dec()
    return sse.response


def progress_event(task: Task) -> dict[str, Any]:
    """One ``event: progress`` of an image stream (``current_image``: a preview, when asked)."""
    return {
        "id_task": task.id,
        "step": task.step,
        "total": task.total,
        "progress": task.fraction,
        "eta_relative": task.eta_s,
        "current_image": task.preview,
    }


async def _ignore(_: Progress | None) -> None:
    pass
