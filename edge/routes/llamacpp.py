"""llama.cpp server's native routes, as LLMUnity and llama.cpp clients call them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from edge import rpc
from edge.body import parse, read_object
from edge.context import ctx
from edge.errors import LLAMACPP, json_response
from edge.jobs import check_bounds, fingerprint_of, seeds
from edge.llamacpp.requests import CompletionRequest
from edge.llamacpp.responses import chunk, final
from edge.respond import StreamFormat, collect, stream
from edge.routing import Routes
from edge.session import Session
from edge.sse import DataOnlyStream
from schemas.errors import InvalidRequest
from schemas.jobs import TextParams

routes = Routes(LLAMACPP)


def _params(req: CompletionRequest) -> TextParams:
    (seed,) = seeds(req.asked_seed(), 1)
    return req.job_params(seed)


@routes.generation("/completion")
async def completion(request: web.Request, session: Session) -> web.StreamResponse:
    """llama.cpp's completion: ``data: {content, stop}`` events only, the last with timings."""
    req = await parse(request, CompletionRequest)
    chars = len(req.prompt) if isinstance(req.prompt, str) else 4 * len(req.prompt)
    max_tokens = None if req.n_predict == -1 else req.n_predict
    check_bounds(request, n=1, max_tokens=max_tokens, prompt_chars=chars)
    model = await rpc.default_model(request, req.model)
    dedup_body = await request.read() if ctx(request).settings.dedup_completion else None
    fp = fingerprint_of(request, dedup_body)
    await session.submit_text(model, [_params(req)], stream=req.stream, fingerprint=fp)
    if req.stream:
        fmt = StreamFormat(
            text=lambda out: chunk(out.text),
            finished=lambda out: final(model, "", out.done),
            framing=DataOnlyStream,  # what LLMUnity can parse: no ids, no keep-alives
            end=b"",
            headers=session.headers,
        )
        return await stream(session, fmt)
    result = await collect(session)
    return json_response(final(model, result.texts[0], result.dones[0]), headers=session.headers)


async def _forward(request: web.Request, op: str) -> dict[str, Any]:
    body = await read_object(request)
    model = await rpc.default_model(request, body.pop("model", None))
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
    model = await rpc.default_model(request, request.query.get("model"))
    return json_response(await rpc.call(request, model, "props", {}))


@routes.get("/template")
@routes.post("/template")
async def template(request: web.Request) -> web.Response:
    """LLMUnity asks for ``{"template": ...}`` with GET or POST ``{}``."""
    asked = request.query.get("model")
    if request.method == "POST" and request.can_read_body:
        asked = (await read_object(request)).get("model") or asked
    model = await rpc.default_model(request, asked)
    info = await rpc.call(request, model, "props", {})
    return json_response({"template": info.get("chat_template", "")})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """llama.cpp's health: ``{"status": "ok"}``, or 503 while no text worker is ready."""
    if ctx(request).fleet.models("llm"):
        return json_response({"status": "ok"})
    error = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    return json_response({"error": error}, 503)


@routes.post("/embeddings")
@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """No configured model computes embeddings: a clear 400 rather than a 404."""
    body = await read_object(request)
    model = body.get("model") or "this deployment's models"
    raise InvalidRequest(
        f"embeddings are not supported by {model}: no embedding model is configured", param="model"
    )
