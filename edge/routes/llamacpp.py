"""llama.cpp server's native routes, as LLMUnity and llama.cpp clients call them."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from edge import rpc
from edge.body import parse, read_object
from edge.context import ctx
from edge.errors import LLAMACPP, json_response
from edge.jobs import check_bounds, fingerprint_of, seeds
from edge.llamacpp.prompts import job_prompt, resolve_biases
from edge.llamacpp.requests import CompletionRequest, prompt_chars
from edge.llamacpp.responses import CompletionView
from edge.respond import StreamFormat, collect, stream
from edge.routing import Routes
from edge.session import Session
from edge.sse import DataOnlyStream
from schemas.errors import InvalidRequest

routes = Routes(LLAMACPP)


@routes.generation("/completion")
async def completion(request: web.Request, session: Session) -> web.StreamResponse:
    """llama.cpp's completion: ``data: {content, stop}`` events only, the last with timings.

    A batch of prompts is one job each: a list of bodies, or chunks told apart by ``index``.
    """
    req = await parse(request, CompletionRequest)
    prompts = req.prompts()
    c = ctx(request)
    if len(prompts) > c.settings.max_n:
        raise InvalidRequest(f"at most {c.settings.max_n} prompts in one request", param="prompt")
    check_bounds(request, n=1, max_tokens=req.token_limit(), prompt_chars=prompt_chars(prompts))
    model = await rpc.served_model(request, req.model)
    biases = await resolve_biases(request, model, req.biases())
    job_prompts = await asyncio.gather(*(job_prompt(request, model, p) for p in prompts))
    (seed,) = seeds(req.asked_seed(), 1)  # as llama.cpp: every prompt of a batch, one seed
    params = [req.job_params(seed, p, biases) for p in job_prompts]
    dedup_body = await request.read() if c.settings.dedup_completion else None
    fp = fingerprint_of(request, dedup_body)
    await session.submit_text(model, params, stream=req.stream, fingerprint=fp)
    view = CompletionView(model, req, prompts, biases, seed)
    if req.stream:
        fmt = StreamFormat(
            text=view.chunk,
            finished=view.final_chunk,
            framing=DataOnlyStream,  # what LLMUnity can parse: no ids, no keep-alives
            end=b"",
            headers=session.headers,
        )
        return await stream(session, fmt)
    result = await collect(session)
    bodies = [
        view.final(i, done, text, ids, logprobs)
        for i, (done, text, ids, logprobs) in enumerate(
            zip(result.dones, result.texts, result.token_ids, result.logprobs, strict=True)
        )
    ]
    # llama.cpp answers one result as an object, several as a list.
    return json_response(bodies[0] if len(bodies) == 1 else bodies, headers=session.headers)


async def _forward(request: web.Request, op: str) -> dict[str, Any]:
    body = await read_object(request)
    model = await rpc.served_model(request, body.pop("model", None))
    return await rpc.call(request, model, op, body)


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    """``{content, add_special, with_pieces}`` -> ``{tokens}``."""
    return json_response(await _forward(request, "tokenize"))


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    """``{tokens}`` -> ``{content}``."""
    return json_response(await _forward(request, "detokenize"))


@routes.post("/apply-template")
async def apply_template(request: web.Request) -> web.Response:
    """``{messages}`` -> ``{prompt}``: the model's own chat template applied."""
    return json_response(await _forward(request, "apply-template"))


@routes.get("/props")
async def props(request: web.Request) -> web.Response:
    """The model's properties (context size, chat template ...)."""
    model = await rpc.served_model(request, request.query.get("model"))
    return json_response(await rpc.call(request, model, "props", {}))


@routes.get("/template")
@routes.post("/template")
async def template(request: web.Request) -> web.Response:
    """LLMUnity asks for ``{"template": ...}`` with GET or POST ``{}``."""
    asked = request.query.get("model")
    if request.method == "POST" and request.can_read_body:
        asked = (await read_object(request)).get("model") or asked
    model = await rpc.served_model(request, asked)
    info = await rpc.call(request, model, "props", {})
    return json_response({"template": info.get("chat_template", "")})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """llama.cpp's health: ``{"status": "ok"}``, or 503 while no text worker is ready."""
    if ctx(request).fleet.models("llm"):
        return json_response({"status": "ok"})
    error = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    return json_response({"error": error}, 503)
