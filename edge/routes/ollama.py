"""Ollama's routes: ``/api/chat``, ``/api/generate`` (NDJSON streams), and the model listings
``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from edge import rpc
from edge.body import parse
from edge.context import caller, ctx
from edge.errors import OLLAMA, json_response
from edge.jobs import check_bounds, fingerprint_of, seeds
from edge.ollama import responses
from edge.ollama.requests import ChatRequest, Common, GenerateRequest, ShowRequest
from edge.ollama.responses import last, piece
from edge.relay import Finished, Text
from edge.respond import StreamFormat, collect, stream
from edge.routing import Routes
from edge.session import Session
from edge.sse import NdjsonStream
from edge.tools import CallDone, Content, Event, Plan, parse_all
from edge.tools import template as chat_template
from schemas.errors import ModelNotFound
from schemas.fleet import VERSION, ModelInfo

routes = Routes(OLLAMA)
Chunks = dict[str, Any] | list[dict[str, Any]]


def _seed(req: ChatRequest | GenerateRequest) -> int:
    (seed,) = seeds(req.options.asked_seed(), 1)
    return seed


def _pieces(model: str, events: list[Event]) -> list[dict[str, Any]]:
    """NDJSON objects for what a tool parser found: text as pieces, each call once parsed."""
    out = []
    for e in events:
        if isinstance(e, Content):
            out.append(piece(model, e.text, chat=True))
        elif isinstance(e, CallDone):
            out.append(responses.calls_piece(model, [e.call]))
    return out


async def _answer(
    session: Session, req: Common, *, chat: bool, plan: Plan | None = None
) -> web.StreamResponse:
    model = req.model
    parser = plan.parser() if plan is not None else None
    if req.stream:
        text: Callable[[Text], Chunks] = lambda out: piece(model, out.text, chat=chat)  # noqa: E731
        if parser is not None:
            text = lambda out: _pieces(model, parser.feed(out.text))  # noqa: E731

        def finished(out: Finished) -> Chunks:
            held = _pieces(model, parser.finish()) if parser is not None else []
            return [*held, last(model, "", out.done, session.started, chat=chat)]

        fmt = StreamFormat(
            text=text,
            finished=finished,
            framing=NdjsonStream,
            end=b"",
            headers=session.headers,
        )
        return await stream(session, fmt)
    result = await collect(session)
    answer, calls = result.texts[0], None
    if parser is not None and parse_all(parser, answer).calls:
        answer, calls = parser.text.strip(), parser.calls
    body = last(model, answer, result.dones[0], session.started, chat=chat, calls=calls)
    return json_response(body, headers=session.headers)


@routes.generation("/api/chat")
async def chat(request: web.Request, session: Session) -> web.StreamResponse:
    """Ollama chat."""
    req = await parse(request, ChatRequest)
    check_bounds(
        request,
        n=1,
        max_tokens=req.options.token_limit(),  # before the job's own bound could be hit (a 500)
        prompt_chars=sum(len(m.content or "") for m in req.messages),
    )
    plan = req.tool_plan()
    prompt = None
    if plan is not None:
        template = await chat_template.fetch(request, req.model)
        if template is not None and template.has_tools:
            prompt = await chat_template.prompt(
                request, req.model, template, req.turns(), plan.functions
            )
    params = req.job_params(_seed(req), plan, prompt)
    chars = len(prompt or "") + sum(len(m.content) for m in params.messages or ())
    check_bounds(request, n=1, max_tokens=params.max_tokens, prompt_chars=chars)
    fp = fingerprint_of(request, None)
    await session.submit_text(req.model, [params], stream=req.stream, fingerprint=fp)
    return await _answer(session, req, chat=True, plan=plan)


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
    params = req.job_params(_seed(req))
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
