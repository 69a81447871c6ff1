"""AUTOMATIC1111's API (``/sdapi/v1``), with progress, interrupt and options scoped per API key."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from edge.a1111 import responses
from edge.a1111.pnginfo import PNG_SIGNATURE, text_chunks
from edge.a1111.requests import MAX_TASK_ID_CHARS, Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from edge.body import invalid, parse, read_object
from edge.context import caller, ctx
from edge.errors import OPENAI, json_response
from edge.imaging import answer, check_image_bounds, decode_image, pick_model
from edge.jobs import seeds
from edge.options import CHECKPOINT, PREVIEW_EVERY
from edge.routing import Charging, Routes
from edge.session import Session
from schemas.client import Received
from schemas.errors import InvalidRequest, ModelNotFound
from schemas.events import Done, Progress
from schemas.samplers import SCHEDULES
from schemas.subjects import is_job_id

routes = Routes(OPENAI)


async def _generate(
    request: web.Request, session: Session, model_type: type[Txt2ImgRequest]
) -> web.StreamResponse:
    body = await read_object(request)
    try:
        req = model_type.model_validate(body)
    except ValidationError as e:
        raise invalid(e) from None
    req.refuse_unsupported()
    budget = ctx(request).settings.image_max_input_pixels
    init = (
        [decode_image(v, "init_images", max_pixels=budget) for v in req.init_images]
        if isinstance(req, Img2ImgRequest)
        else []
    )
    check_image_bounds(
        request,
        width=req.width,
        height=req.height,
        steps=req.steps,
        count=req.batch_size * req.n_iter,
        count_param="batch_size",
    )
    settings = await _settings(request, req)
    params = req.job_params(seeds(req.asked_seed(), 1)[0], _preview_every(settings))
    checkpoint = settings.get(CHECKPOINT)
    model = pick_model(request, checkpoint if isinstance(checkpoint, str) and checkpoint else None)
    job = await session.submit_image(model, params, init, req.force_task_id)
    return await answer(
        session, job, lambda result: responses.generation(body, req, params, model, result)
    )


async def _settings(request: web.Request, req: Txt2ImgRequest) -> dict[str, Any]:
    """The key's stored options with the request's ``override_settings`` on top."""
    options = ctx(request).options
    stored = await options.get(caller(request).id) if options else {}
    return {**stored, **req.override_settings}


def _preview_every(settings: dict[str, Any]) -> int:
    """A1111's live previews: ``show_progress_every_n_steps`` > 0 puts a preview in every n-th
    progress (``current_image``); unset or -1, none (they cost a little on the worker)."""
    every = settings.get(PREVIEW_EVERY)
    return every if isinstance(every, int) and not isinstance(every, bool) and every > 0 else 0


@routes.generation("/sdapi/v1/txt2img")
async def txt2img(request: web.Request, session: Session) -> web.StreamResponse:
    """Text to image; ``Accept: text/event-stream`` streams progress, then the result."""
    return await _generate(request, session, Txt2ImgRequest)


@routes.generation("/sdapi/v1/img2img")
async def img2img(request: web.Request, session: Session) -> web.StreamResponse:
    """Image to image (the first init image, at denoising_strength)."""
    return await _generate(request, session, Img2ImgRequest)


@routes.get("/sdapi/v1/progress", charging=Charging.NONE)
async def progress(request: web.Request) -> web.Response:
    """Progress of the caller's current task, or of ``id_task``; never another key's."""
    c, key = ctx(request), caller(request)
    task_id = request.query.get("id_task")
    if task_id is None:
        return json_response(responses.progress(c.tasks.current(key.id)))
    if len(task_id) > MAX_TASK_ID_CHARS:
        raise InvalidRequest(
            f"id_task is at most {MAX_TASK_ID_CHARS} characters (a force_task_id or a job id)",
            param="id_task",
        )
    task = c.tasks.find(key.id, task_id)
    if task is None and is_job_id(task_id):
        return json_response(await _stored_progress(request, task_id))
    return json_response(responses.progress(task))


async def _stored_progress(request: web.Request, job_id: str) -> dict[str, Any]:
    """A task followed by another edge: its last progress, as RESULTS holds it."""
    history: list[Received] = await ctx(request).jobs.history(job_id, timeout_s=0.5)
    if any(r.owner not in (None, caller(request).id) for r in history):
        history = []  # another key's task: as if it did not exist
    body = responses.progress(None)
    for r in history:
        if isinstance(r.event, Progress):
            body["progress"] = min(1.0, r.event.step / r.event.total)
            body["eta_relative"] = r.event.eta_s or 0.0
            body["state"].update(sampling_step=r.event.step, sampling_steps=r.event.total)
        elif isinstance(r.event, Done):
            body["progress"] = 1.0
    return body


@routes.post("/sdapi/v1/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    """Stop the caller's running image tasks, on every edge; other keys' tasks go on."""
    await ctx(request).tasks.interrupt(caller(request).id)
    return json_response({})


@routes.post("/sdapi/v1/skip")
async def skip(request: web.Request) -> web.Response:
    """Stop the caller's current task only (the one progress reports); null, as A1111 answers."""
    await ctx(request).tasks.skip(caller(request).id)
    return json_response(None)


@routes.post("/sdapi/v1/png-info")
async def png_info(request: web.Request) -> web.Response:
    """The ``parameters`` text of a PNG, as written and parsed; other images have none here."""
    req = await parse(request, PngInfoRequest)
    image = decode_image(req.image, "image", max_pixels=None)  # its text is read, no pixels
    texts = text_chunks(image) if image.startswith(PNG_SIGNATURE) else {}
    return json_response(responses.png_info(texts))


@routes.get("/sdapi/v1/upscalers")
async def upscalers(request: web.Request) -> web.Response:
    """None: headrace runs no upscaler (hires fix is refused)."""
    return json_response([])


@routes.get("/sdapi/v1/loras")
async def loras(request: web.Request) -> web.Response:
    """None: workers load no LoRA networks."""
    return json_response([])


@routes.get("/sdapi/v1/scripts")
async def scripts(request: web.Request) -> web.Response:
    """No scripts on either route (webuiapi looks here for ControlNet and ADetailer)."""
    return json_response({"txt2img": [], "img2img": []})


@routes.get("/sdapi/v1/cmd-flags")
async def cmd_flags(request: web.Request) -> web.Response:
    """None: headrace is not started with A1111's command-line flags."""
    return json_response({})


@routes.get("/sdapi/v1/memory")
async def memory(request: web.Request) -> web.Response:
    """The edge process's memory in A1111's shape (the GPUs are on the workers)."""
    return json_response(responses.memory())


@routes.post("/sdapi/v1/refresh-checkpoints")
async def refresh_checkpoints(request: web.Request) -> web.Response:
    """Nothing to do: sd-models is always the live fleet. Null, as A1111 answers."""
    return json_response(None)


@routes.get("/sdapi/v1/sd-models")
async def sd_models(request: web.Request) -> web.Response:
    """The live image models this key may use."""
    key = caller(request)
    models = [m for m in ctx(request).fleet.models("sd").values() if key.allows(m.id)]
    return json_response(responses.sd_models(models))


@routes.get("/sdapi/v1/samplers")
async def samplers(request: web.Request) -> web.Response:
    """The sampler names image jobs accept."""
    return json_response(responses.samplers())


@routes.get("/sdapi/v1/schedulers")
async def schedulers(request: web.Request) -> web.Response:
    """The noise schedules that may be named separately from the sampler."""
    return json_response([{"name": s.lower(), "label": s} for s in SCHEDULES])


@routes.get("/sdapi/v1/options")
async def get_options(request: web.Request) -> web.Response:
    """The caller's options; ``sd_model_checkpoint`` defaults to the model it would get now."""
    c, key = ctx(request), caller(request)
    stored = await c.options.get(key.id) if c.options else {}
    if CHECKPOINT not in stored:
        live = sorted(m for m in c.fleet.models("sd") if key.allows(m))
        stored[CHECKPOINT] = c.settings.default_image_model or (live[0] if live else None)
    return json_response(stored)


@routes.post("/sdapi/v1/options")
async def set_options(request: web.Request) -> web.Response:
    """Store options for the caller's key only (A1111 changes them for everyone)."""
    c, key = ctx(request), caller(request)
    changes = await read_object(request)
    asked = changes.get(CHECKPOINT)
    if asked is not None:
        if not isinstance(asked, str) or not asked:
            raise InvalidRequest(f"{CHECKPOINT} must be a model title", param=CHECKPOINT)
        model = pick_model(request, asked)
        if model not in c.fleet.models("sd") or not key.allows(model):
            raise ModelNotFound(f"The image model '{asked}' does not exist", param=CHECKPOINT)
        changes[CHECKPOINT] = model
    if c.options is not None:
        await c.options.update(key.id, changes)
    return json_response(None)
