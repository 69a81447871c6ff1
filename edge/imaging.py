"""Image requests, whatever their API: one job per request, its progress, and its result bytes.

The routes (A1111, OpenAI) turn their bodies into image parameters and their results
into their own shapes; the ``Session`` admits and publishes the job; following it,
progress for ``/sdapi/v1/progress`` and the result bytes are handled here.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from edge.context import ctx
from edge.errors import json_response
from edge.relay import Failed, Finished, Idle, Stepped
from edge.session import Session
from edge.sse import EventStream, SlowClient
from edge.tasks import Task
from schemas.errors import DeadlineExceeded, HeadraceError, InvalidRequest, NoWorker
from schemas.events import Done, Progress
from schemas.image_size import check_pixels
from schemas.jobs import ImageJob

# What an input image may be (the formats the diffusion engine decodes): PNG and JPEG here,
# WebP below (RIFF....WEBP).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


@dataclass
class ImageResult:
    """A finished image job: its ``done`` event and the PNG bytes of each image."""

    done: Done
    images: list[bytes]


def decode_image(value: str, param: str, *, max_pixels: int | None) -> bytes:
    """An input image given as base64 or a data URI, of at most ``max_pixels`` as its header
    declares them (it is not decoded here; None: nothing will decode its pixels). URLs are
    refused: the edge fetches nothing."""
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
    if max_pixels is not None:
        check_pixels(data, max_pixels, param)
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


OnEvent = Callable[[Progress | None], Awaitable[None]]


async def follow(session: Session, job: ImageJob, on_event: OnEvent) -> ImageResult:
    """Wait for the job's result; ``on_event`` gets each progress event and None when idle."""
    c = session.edge
    done: Done | None = None
    try:
        async for out in session.following:
            if isinstance(out, Failed):
                session.outcome = "failed"
                raise out.error.exception()
            if isinstance(out, Finished):
                done = out.done
            elif isinstance(out, Stepped):
                if session.task is not None:
                    session.task.advance(out.progress)
                await on_event(out.progress)
            elif isinstance(out, Idle):
                await on_event(None)
    except DeadlineExceeded:
        session.outcome = "deadline"
        raise
    assert done is not None, "the relay ends with every job finished"
    images = [await c.images.fetch(ref) for ref in done.images]
    await session.end("finished")
    queue_ms = session.following.choices[0].queue_ms
    if queue_ms is not None:
        c.metrics.queue_time.labels(job.model).observe(queue_ms / 1000)
    c.metrics.e2e.labels(job.model).observe(time.perf_counter() - session.started)
    return ImageResult(done, images)


Render = Callable[[ImageResult], dict[str, Any]]


def wants_events(request: web.Request) -> bool:
    """A client that accepts Server-Sent Events gets progress, then the result, as a stream."""
    return "text/event-stream" in request.headers.get("Accept", "")


async def answer(session: Session, job: ImageJob, render: Render) -> web.StreamResponse:
    """The result as one JSON body, or progress events and then the result as SSE."""
    if not wants_events(session.request):
        result = await follow(session, job, _ignore)
        return json_response(render(result), headers=session.headers)
    sse = EventStream(session.request, session.bounds, session.headers)
    try:
        await _events(session, job, render, sse)
        await sse.finish()
    except SlowClient as e:  # it stopped reading: its job is cancelled, its connection dropped
        await session.drop(sse, e)
    return sse.response


async def _events(session: Session, job: ImageJob, render: Render, sse: EventStream) -> None:
    """Progress events, then the result (or the error) as an event."""

    async def on_event(progress: Progress | None) -> None:
        await session.open(sse)  # at the first progress or the first idle tick
        if progress is None:
            await sse.keepalive()
        elif session.task is not None:
            await sse.send(orjson.dumps(progress_event(session.task)), event="progress")

    try:
        result = await follow(session, job, on_event)
        await session.open(sse)
        await sse.send(orjson.dumps(render(result)), event="result")
    except HeadraceError as e:
        if not sse.opened:
            raise  # nothing sent yet: a real HTTP status
        await sse.send(orjson.dumps(session.api.stream_error(e)), event="error")


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
