"""Ollama's routes: ``/api/chat``, ``/api/generate`` (NDJSON streams), ``/api/tags``."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from edge.body import parse
from edge.context import caller, ctx
from edge.errors import OLLAMA, json_response
from edge.jobs import check_bounds, fingerprint_of, seeds
from edge.ollama.requests import ChatRequest, Common, GenerateRequest
from edge.ollama.responses import last, piece
from edge.respond import StreamFormat, collect, stream
from edge.routing import Routes
from edge.session import Session
from edge.sse import NdjsonStream
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
        request, n=1, max_tokens=None, prompt_chars=sum(len(m.content) for m in req.messages)
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
        request, n=1, max_tokens=None, prompt_chars=len(req.prompt) + len(req.system or "")
    )
    params = _params(req)
    chars = len(req.prompt) + len(req.system or "")
    check_bounds(request, n=1, max_tokens=params.max_tokens, prompt_chars=chars)
    fp = fingerprint_of(request, None)
    await session.submit_text(req.model, [params], stream=req.stream, fingerprint=fp)
    return await _answer(session, req, chat=False)


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    """Models with a live worker, as Ollama lists local models."""
    models = []
    key = caller(request)
    for m in ctx(request).fleet.models("llm").values():
        if not key.allows(m.id):
            continue
        modified = datetime.fromtimestamp(m.created, UTC).isoformat().replace("+00:00", "Z")
        details = {"format": "gguf", "family": "", "parameter_size": "", "quantization_level": ""}
        models.append(
            {
                "name": m.id,
                "model": m.id,
                "modified_at": modified,
                "size": 0,
                "digest": "",
                "details": details,
            }
        )
    return json_response({"models": sorted(models, key=lambda d: str(d["name"]))})
