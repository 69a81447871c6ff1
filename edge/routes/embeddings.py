"""Embeddings in three APIs' shapes: OpenAI's ``/v1/embeddings``, llama.cpp's ``/embedding``
and ``/embeddings`` (LLMUnity's), Ollama's ``/api/embed`` (also ``/embed``) and
``/api/embeddings``.

As llama.cpp's server decides, the route decides the shape: ``/v1/embeddings`` answers
OpenAI's list object, the unversioned routes llama.cpp's native one. Every request is one
``EmbedJob`` holding all its inputs, which the worker evaluates in as few batches as fit.
"""

from __future__ import annotations

from aiohttp import web

from edge.body import parse
from edge.context import caller, ctx
from edge.embeddings import responses
from edge.embeddings.requests import (
    LlamaCppEmbeddingRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OpenAIEmbeddingRequest,
    chars_of,
)
from edge.errors import LLAMACPP, OLLAMA, OPENAI, json_response
from edge.respond import collect
from edge.routing import Routes
from edge.session import Session
from schemas.errors import EngineError, InvalidRequest, NoWorker
from schemas.events import Done
from schemas.jobs import EmbedParams

openai_routes = Routes(OPENAI)
llamacpp_routes = Routes(LLAMACPP)
ollama_routes = Routes(OLLAMA)
tables = (openai_routes, llamacpp_routes, ollama_routes)


async def _embed(
    request: web.Request, session: Session, model: str, params: EmbedParams, param: str
) -> tuple[list[str], Done]:
    """Submit the job and wait for its vectors (base64 float32, in input order)."""
    chars, bound = chars_of(params.inputs), ctx(request).settings.max_prompt_chars
    if chars > bound:
        raise InvalidRequest(
            f"the inputs are {chars} characters; at most {bound} are accepted", param=param
        )
    await session.submit_embed(model, params)
    result = await collect(session)
    got = session.following.choices[0].vectors
    if len(got) < len(params.inputs):
        raise EngineError("the worker sent fewer vectors than there are inputs")
    return [got[i] for i in range(len(params.inputs))], result.dones[0]


@openai_routes.generation("/v1/embeddings")
async def openai_embeddings(request: web.Request, session: Session) -> web.StreamResponse:
    """OpenAI's embeddings: float lists, or base64 float32 with ``encoding_format: base64``."""
    req = await parse(request, OpenAIEmbeddingRequest)
    vectors, done = await _embed(request, session, req.model, req.job_params(), "input")
    body = responses.openai(req.model, vectors, done, base64=req.encoding_format == "base64")
    return json_response(body, headers=session.headers)


async def _native_model(request: web.Request, asked: str | None) -> str:
    """The model of a llama.cpp-style request, which names none: the one named, the
    configured default, else the only live model that computes embeddings (a dedicated
    embedding model first)."""
    c = ctx(request)
    asked = asked or c.settings.default_model
    if asked:
        return asked
    key = caller(request)
    able = {k: m for k, m in c.fleet.models("llm").items() if m.embeddings and key.allows(k)}
    dedicated = sorted(k for k, m in able.items() if m.embedding_only)
    for candidates in (dedicated, sorted(able)):
        if len(candidates) == 1:
            return candidates[0]
    if not able:
        raise NoWorker("no model that computes embeddings has a live worker; retry shortly")
    raise InvalidRequest(
        f"several models compute embeddings ({', '.join(sorted(able))}): name one in 'model' "
        "(or set HEADRACE_DEFAULT_MODEL)",
        param="model",
    )


@llamacpp_routes.generation("/embedding")
@llamacpp_routes.generation("/embeddings")
async def llamacpp_embeddings(request: web.Request, session: Session) -> web.StreamResponse:
    """llama.cpp's native embeddings; LLMUnity's ``{"content": "..."}`` gets
    ``{"embedding": [...]}``."""
    req = await parse(request, LlamaCppEmbeddingRequest)
    params = req.job_params()
    model = await _native_model(request, req.model)
    param = "input" if req.input is not None else "content"
    vectors, _ = await _embed(request, session, model, params, param)
    return json_response(responses.llamacpp(vectors, single=req.single), headers=session.headers)


async def _served(request: web.Request, model: str) -> None:
    """404 unless the model is served (Ollama answers an empty request for a known model)."""
    c = ctx(request)
    caller(request).check(model)
    await c.fleet.require("llm", model, c.settings.no_worker_wait_s)


@ollama_routes.generation("/embed")  # the path the original server offered
@ollama_routes.generation("/api/embed")
async def ollama_embed(request: web.Request, session: Session) -> web.StreamResponse:
    """Ollama's embed: L2-normalized vectors, inputs truncated to the context by default."""
    req = await parse(request, OllamaEmbedRequest)
    texts = req.texts()
    if not texts:  # how Ollama clients load a model: nothing to compute
        await _served(request, req.model)
        body = responses.ollama_embed(req.model, [], None, session.started)
        return json_response(body, headers=session.headers)
    vectors, done = await _embed(request, session, req.model, req.job_params(texts), "input")
    body = responses.ollama_embed(req.model, vectors, done, session.started)
    return json_response(body, headers=session.headers)


@ollama_routes.generation("/api/embeddings")
async def ollama_embeddings(request: web.Request, session: Session) -> web.StreamResponse:
    """Ollama's older embeddings: one prompt, its vector as the model gives it (not normalized)."""
    req = await parse(request, OllamaEmbeddingsRequest)
    if not req.prompt:
        await _served(request, req.model)
        return json_response(responses.ollama_embeddings([]), headers=session.headers)
    vectors, _ = await _embed(request, session, req.model, req.job_params(), "prompt")
    return json_response(responses.ollama_embeddings(vectors), headers=session.headers)
