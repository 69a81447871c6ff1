"""Ollama's routes: ``/api/chat``, ``/api/generate`` (NDJSON streams), and the model listings
``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``."""

from __future__ import annotations

from aiohttp import web

from edge import rpc
from edge.body import parse
from edge.context import caller, ctx
from edge.errors import OLLAMA, json_response
from edge.jobs import check_bounds, fingerprint_of, seeds
from edge.ollama import responses
from edge.ollama.requests import ChatRequest, Common, GenerateRequest, ShowRequest
from edge.ollama.responses import last, piece
from edge.respond import StreamFormat, collect, stream
from edge.routing import Routes
from edge.session import Session
from edge.sse import NdjsonStream
from schemas.errors import ModelNotFound
from schemas.fleet import VERSION, ModelInfo
from schemas.jobs import TextParams

routes = Routes(OLLAMA)


def _params(req: ChatRequest | GenerateRequest) -> TextParams:
    (seed,) = seeds(req.options.asked_seed(), 1)
    return req.job_params(seed)


async def _answer(session: Session, req: Common, *, chat: bool) -> web.StreamResponse:
    model = req.model
    if req.stream:
        fmt = StreamFormat(
            text=lambda out: piece(model, out.text, chat=chat),
            finished=lambda out: last(model, "", out.done, session.started, chat=chat),
            framing=NdjsonStream,
            end=b"",
            headers=session.headers,
        )
        return await stream(session, fmt)
    result = await collect(session)
    body = last(model, result.texts[0], result.dones[0], session.started, chat=chat)
    return json_response(body, headers=session.headers)


@routes.generation("/api/chat")
async def chat(request: web.Request, session: Session) -> web.StreamResponse:
    """Ollama chat."""
    req = await parse(request, ChatRequest)
    check_bounds(
        request,
        n=1,
        max_tokens=req.options.token_limit(),  # before the job's own bound could be hit (a 500)
        prompt_chars=sum(len(m.content) for m in req.messages),
    )
    params = _params(req)
    check_bounds(request, n=1, max_tokens=params.max_tokens, prompt_chars=0)
    fp = fingerprint_of(request, None)
    await session.submit_text(req.model, [params], stream=req.stream, fingerprint=fp)
    return await _answer(session, req, chat=True)


@routes.generation("/api/generate")
async def generate(request: web.Request, session: Session) -> web.StreamResponse:
    """Ollama generate: the prompt through the chat template, or as is with ``raw``."""
    req = await parse(request, GenerateRequest)
    check_bounds(
        request,
        n=1,
        max_tokens=req.options.token_limit(),  # before the job's own bound could be hit (a 500)
        prompt_chars=len(req.prompt) + len(req.system or ""),
    )
    params = _params(req)
    chars = len(req.prompt) + len(req.system or "")
    check_bounds(request, n=1, max_tokens=params.max_tokens, prompt_chars=chars)
    fp = fingerprint_of(request, None)
    await session.submit_text(req.model, [params], stream=req.stream, fingerprint=fp)
    return await _answer(session, req, chat=False)


def _text_models(request: web.Request) -> dict[str, ModelInfo]:
    """The live text models this key may use."""
    key = caller(request)
    return {k: m for k, m in ctx(request).fleet.models("llm").items() if key.allows(k)}


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    """Models with a live worker, as Ollama lists local models."""
    models = [responses.listed(m) for _, m in sorted(_text_models(request).items())]
    return json_response({"models": models})


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    """A live model's details and chat template; 404 for any other, as Ollama answers."""
    asked = (await parse(request, ShowRequest)).asked()
    m = _text_models(request).get(asked)
    if m is None:
        raise ModelNotFound(f"model '{asked}' not found", param="model")
    props = await rpc.call(request, m.id, "props", {})
    return json_response(responses.show(m, str(props.get("chat_template") or "")))


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    """The models loaded now: those with a live worker (their weights stay loaded on it)."""
    c = ctx(request)
    models = _text_models(request)
    last_beat: dict[str, int] = {}
    for w in c.fleet.live():
        for wm in w.models:
            last_beat[wm.id] = max(last_beat.get(wm.id, 0), w.heartbeat_ms)
    stale_s = c.settings.worker_stale_s
    body = [
        responses.running(m, last_beat.get(k, 0) / 1000 + stale_s)
        for k, m in sorted(models.items())
    ]
    return json_response({"models": body})


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    """headrace's own version: it is not Ollama, and says so."""
    return json_response({"version": VERSION})
