"""OpenAI's text API: chat completions, completions, models, and resumable job events."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import ValidationError

from edge import rpc
from edge.body import invalid, parse, read_object
from edge.context import caller, ctx
from edge.errors import OPENAI, json_response
from edge.jobs import check_bounds, deadline_ms, fingerprint_of, seeds
from edge.openai.requests import ChatCompletionRequest, CompletionRequest, Sampling
from edge.openai.responses import ChunkMaker, chat_response, completion_response
from edge.relay import Finished, Text
from edge.respond import StreamFormat, collect, stream
from edge.routing import Routes
from edge.session import Session
from edge.sse import Bounds, EventStream, SlowClient
from edge.tools import Plan, parse_all
from edge.tools import template as chat_template
from schemas.client import START, Position
from schemas.codec import encode
from schemas.errors import InvalidRequest, ModelNotFound
from schemas.events import Done
from schemas.fleet import ModelInfo
from schemas.image_store import ImageStore
from schemas.jobs import TextParams
from schemas.subjects import is_job_id

routes = Routes(OPENAI)
R = TypeVar("R", ChatCompletionRequest, CompletionRequest)


async def _parse(request: web.Request, cls: type[R]) -> R:
    """The body as ``cls``. On llama.cpp's unversioned paths ``model`` may be missing or name
    anything, as llama.cpp's server serves its model whatever it says (``rpc.served_model``)."""
    if request.path.startswith("/v1/"):
        return await parse(request, cls)
    data = await read_object(request)
    asked = data.get("model")
    if asked is not None and not isinstance(asked, str):
        raise InvalidRequest("model must be a string", param="model")
    try:  # the body's own problems first, whatever the model
        req = cls.model_validate({**data, "model": asked or "-"})
    except ValidationError as e:
        raise invalid(e) from None
    return req.model_copy(update={"model": await rpc.served_model(request, asked)})


Chunks = dict[str, Any] | list[dict[str, Any]]


async def _chat_params(request: web.Request, req: ChatCompletionRequest) -> tuple[list[TextParams], Plan | None]:  # fmt: skip
    """Each choice's job parameters, and the tools plan; with tools offered to a model whose
    template has a tools section, the prompt is that template's rendering (edge.tools.template)."""
    plan = req.tool_plan()
    check_bounds(request, n=req.n, max_tokens=req.token_limit(), prompt_chars=_chars(req))
    prompt = None
    if plan is not None and plan.choice != "none":
        template = await chat_template.fetch(request, req.model)
        if template is not None and template.has_tools:
            prompt = await chat_template.prompt(
                request, req.model, template, req.turns(), plan.functions
            )
    params = [req.job_params(seed, plan, prompt) for seed in seeds(req.seed, req.n)]
    chars = len(prompt) if prompt is not None else _chars(req, params[0])
    check_bounds(request, n=req.n, max_tokens=req.token_limit(), prompt_chars=chars)
    return params, plan


def _chars(req: ChatCompletionRequest, params: TextParams | None = None) -> int:
    """The prompt's characters: the messages as sent, or as rendered (tools included)."""
    if params is not None and params.messages is not None:
        return sum(len(m.content) for m in params.messages)
    return sum(len(m.text()) for m in req.messages)


def _tool_format(maker: ChunkMaker, plan: Plan, n: int) -> tuple[Callable[[Text], Chunks], Callable[[Finished], Chunks]]:  # fmt: skip
    """Chunk makers for text and finish that pass each choice's text through a tool parser."""
    parsers = [plan.parser() for _ in range(n)]

    def text(out: Text) -> Chunks:
        parser = parsers[out.index]
        if parser is None:
            return maker.text(out.index, out.text, out.logprobs)
        return maker.tool_events(out.index, parser.feed(out.text))

    def finished(out: Finished) -> Chunks:
        parser = parsers[out.index]
        held = maker.tool_events(out.index, parser.finish()) if parser is not None else []
        return [*held, maker.finish(out.index, out.done, parser)]

    return text, finished


async def _answer(
    session: Session, req: Sampling, *, chat: bool, plan: Plan | None = None
) -> web.StreamResponse:
    """Stream OpenAI chunks, or collect one chat.completion / text_completion body."""
    id_ = f"{'chatcmpl' if chat else 'cmpl'}-{session.job_ids[0]}"
    n = len(session.job_ids)
    if req.stream:
        maker = ChunkMaker(
            chat=chat,
            id_=id_,
            created=session.created_s,
            model=req.model,
            include_usage=req.include_usage,
        )
        text: Callable[[Text], Chunks] = lambda out: maker.text(out.index, out.text, out.logprobs)  # noqa: E731
        finished: Callable[[Finished], Chunks] = lambda out: maker.finish(out.index, out.done)  # noqa: E731
        if plan is not None:
            text, finished = _tool_format(maker, plan, n)
        fmt = StreamFormat(
            opening=(lambda n: [maker.role(i) for i in range(n)]) if chat else (lambda n: []),
            text=text,
            finished=finished,
            closing=(lambda dones: [maker.usage(dones)])
            if req.include_usage
            else (lambda dones: []),
            headers=session.headers,
        )
        return await stream(session, fmt)
    result = await collect(session)
    if chat:
        parsers = [
            parse_all(p, t) if (p := plan.parser()) is not None else None for t in result.texts
        ] if plan is not None else None  # fmt: skip
        body = chat_response(
            id_, session.created_s, req.model, result.texts, result.dones, result.logprobs, parsers
        )
    else:
        body = completion_response(
            id_, session.created_s, req.model, result.texts, result.dones, result.logprobs
        )
    return json_response(body, headers=session.headers)


@routes.generation("/chat/completions")  # llama.cpp's server serves both paths
@routes.generation("/v1/chat/completions")
async def chat_completions(request: web.Request, session: Session) -> web.StreamResponse:
    """OpenAI chat completions, streamed (SSE) or not."""
    req = await _parse(request, ChatCompletionRequest)
    params, plan = await _chat_params(request, req)
    fp = fingerprint_of(request, None)
    await session.submit_text(req.model, params, stream=req.stream, fingerprint=fp)
    return await _answer(session, req, chat=True, plan=plan)


@routes.generation("/completions")
@routes.generation("/v1/completions")
async def completions(request: web.Request, session: Session) -> web.StreamResponse:
    """OpenAI legacy completions, streamed (SSE) or not."""
    req = await _parse(request, CompletionRequest)
    prompt = req.prompt
    chars = len(prompt) if isinstance(prompt, str) else len(prompt) * 4
    check_bounds(request, n=req.n, max_tokens=req.max_tokens, prompt_chars=chars)
    if isinstance(prompt, list) and any(not isinstance(t, int) or t < 0 for t in prompt):
        raise InvalidRequest("a prompt given as a list must be token ids", param="prompt")
    params = [req.job_params(seed) for seed in seeds(req.seed, req.n)]
    fp = fingerprint_of(request, None)
    await session.submit_text(req.model, params, stream=req.stream, fingerprint=fp)
    return await _answer(session, req, chat=False)


def _model(m: ModelInfo) -> dict[str, object]:
    """OpenAI's model object, with the context length llama.cpp's server adds."""
    entry: dict[str, object] = {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": m.owned_by,
    }
    if m.context_length is not None:
        entry["context_length"] = m.context_length
    return entry


@routes.get("/models")
@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """Models with at least one live worker (that this key may use)."""
    key = caller(request)
    data = [_model(m) for m in ctx(request).fleet.models().values() if key.allows(m.id)]
    return json_response({"object": "list", "data": sorted(data, key=lambda d: str(d["id"]))})


@routes.get("/v1/models/{model:.+}")  # ids may hold slashes (org/name)
async def model(request: web.Request) -> web.Response:
    """One live model (``client.models.retrieve``); 404 ``model_not_found`` like any unknown one."""
    asked = request.match_info["model"]
    m = ctx(request).fleet.models().get(asked)
    if m is None or not caller(request).allows(m.id):
        raise ModelNotFound(f"The model '{asked}' does not exist", param="model")
    return json_response(_model(m))


async def _inline(store: ImageStore, done: Done) -> Done:
    """``done`` with every stored image fetched and inlined as base64."""
    refs = [
        r.model_copy(update={"b64_png": base64.b64encode(await store.fetch(r)).decode(), "object": None})
        for r in done.images
    ]  # fmt: skip
    return done.model_copy(update={"images": refs})


@routes.get("/v1/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    """A job's raw events as SSE; ``Last-Event-ID`` resumes after the last event a client saw."""
    job_id = request.match_info["job_id"]
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    try:
        after = Position.parse(last) if last else START
    except ValueError:
        raise InvalidRequest("Last-Event-ID must look like 1-7", param="Last-Event-ID") from None
    c = ctx(request)
    history = await c.jobs.history(job_id) if is_job_id(job_id) else []
    # Only the key that submitted the job may read it; others cannot tell it exists.
    if not history or any(r.owner not in (None, caller(request).id) for r in history):
        return json_response(
            {"error": {"message": "no such job, or its events have expired", "type": "invalid_request_error",
                       "param": None, "code": "job_not_found"}},
            404,
        )  # fmt: skip
    bounds = Bounds(c.settings.stream_buffer_bytes, deadline_ms(request))
    stream = await c.jobs.watch(job_id, after=after, replay=True)
    sse = EventStream(request, bounds)
    c.metrics.open_streams.inc()
    try:
        await sse.open()
        while not stream.finished:
            received = await stream.next(c.settings.keepalive_s)
            if received is None:
                await sse.keepalive()
                continue
            event = received.event
            if isinstance(event, Done) and any(r.object for r in event.images):
                event = await _inline(c.images, event)  # a browser cannot read the object store
            await sse.send(encode(event), id=received.pos.event_id(), event=event.type)
        await sse.raw(b"data: " + orjson.dumps({"type": "end"}) + b"\n\n")
        await sse.finish()
    except SlowClient:
        sse.abort()  # a reader of events only: the job goes on for whoever submitted it
    finally:
        c.metrics.open_streams.dec()
        await stream.close()
    return sse.response
