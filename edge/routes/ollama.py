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
from schemas.jobs import ChatMessage, TextParams

routes = Routes(OLLAMA)


def _params(req: Common, messages: list[ChatMessage] | None, prompt: str | None) -> TextParams:
    o = req.options
    (seed,) = seeds(None if o.seed in (None, -1) else o.seed, 1)
    fmt = req.format
    return TextParams(
        messages=messages,
        prompt=prompt,
        max_tokens=None if o.num_predict < 0 else (o.num_predict or None),
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        typical_p=o.typical_p,
        repeat_penalty=o.repeat_penalty,
        repeat_last_n=o.repeat_last_n,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        mirostat=o.mirostat,
        mirostat_tau=o.mirostat_tau,
        mirostat_eta=o.mirostat_eta,
        seed=seed,
        stop=o.stop,
        response_format="json_object"
        if fmt == "json"
        else ("json_schema" if isinstance(fmt, dict) else "text"),
        json_schema=fmt if isinstance(fmt, dict) else None,
    )


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
    messages = [ChatMessage(role=m.role, content=m.content) for m in req.messages]
    params = _params(req, messages, None)
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
    if req.raw:
        params = _params(req, None, req.prompt)
    else:
        messages = [ChatMessage(role="system", content=req.system)] if req.system else []
        params = _params(req, [*messages, ChatMessage(role="user", content=req.prompt)], None)
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
