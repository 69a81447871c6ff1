"""``GET /openapi.json``: every route of the edge, from one table (``OPERATIONS``).

Request bodies come from the same pydantic models that validate them. Each operation says
which API family it belongs to (its errors' shape), what its 200 answer is (a JSON schema, and
``text/event-stream`` or ``application/x-ndjson`` when it streams), and whether it needs a key;
the error statuses every authenticated route can answer (400, 401, 404, 405, 413, 429, 503,
504) are added with the family's error schema. Every path also documents its CORS preflight
(``OPTIONS``, answered before authentication when ``HEADRACE_CORS_ORIGINS`` allows the origin).

Adding a route: one ``Op(...)`` line in ``OPERATIONS`` (its request model in ``body``, its
answer in ``ok``). ``tests/test_fuzz.py`` fails while a registered route has no ``Op`` (and
fuzzes every one that has: its answers must match what is written here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from edge.a1111.requests import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from edge.embeddings.requests import (
    LlamaCppEmbeddingRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OpenAIEmbeddingRequest,
)
from edge.errors import json_response
from edge.llamacpp.requests import CompletionRequest as LlamaCompletionRequest
from edge.ollama.requests import ChatRequest, GenerateRequest, ShowRequest
from edge.openai.image_generation import ImageGenerationRequest
from edge.openai.requests import ChatCompletionRequest, CompletionRequest
from edge.routing import Routes

routes = Routes()

Family = Literal["openai", "llamacpp", "ollama", "public"]
Stream = Literal["sse", "ndjson"]
SSE, NDJSON = "text/event-stream", "application/x-ndjson"

# Error bodies: OpenAI's error object (OpenAI and A1111 routes), llama.cpp's and Ollama's.
_OPENAI_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
# llama.cpp's: the status as the code, its kind as the type (exceed_context_size_error adds
# n_prompt_tokens and n_ctx); headrace adds param when a field is at fault.
_LLAMACPP_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "integer"},
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string"},
            },
            "required": ["code", "message", "type"],
        }
    },
    "required": ["error"],
}
_OLLAMA_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
_ERROR_SCHEMA = {
    "openai": "Error",
    "llamacpp": "LlamaCppError",
    "ollama": "OllamaError",
    "public": "Error",
}
_ERRORS = {
    400: "invalid request (the body, a header or a parameter)",
    401: "missing or wrong API key",
    404: "unknown model, job or route",
    405: "method not allowed on this path",
    413: "request body too large",
    429: "rate limited (Retry-After says when to retry)",
    503: "queue full, no live worker, or the broker unreachable (Retry-After)",
    504: "the request's deadline passed",
}


def _obj(*required: str, **properties: Any) -> dict[str, Any]:
    """A JSON object schema with these required keys (others may appear)."""
    return {"type": "object", "properties": properties, "required": list(required)}


_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_ANY_OBJ: dict[str, Any] = {"type": "object"}
_NULL: dict[str, Any] = {"type": "null"}
_ARRAY: dict[str, Any] = {"type": "array"}
_MODEL = _obj("id", "object", "created", "owned_by", id=_STR, object={"const": "model"},
              created=_INT, owned_by=_STR)  # fmt: skip
_CHAT = _obj("id", "object", "created", "model", "choices", "usage",
             object={"const": "chat.completion"}, choices=_ARRAY, usage=_ANY_OBJ)  # fmt: skip
_COMPLETION = _obj("id", "object", "created", "model", "choices", "usage",
                   object={"const": "text_completion"}, choices=_ARRAY)  # fmt: skip
_IMAGES = _obj("created", "data", created=_INT, data=_ARRAY)
_A1111_IMAGES = _obj("images", "parameters", "info", images={"type": "array", "items": _STR},
                     parameters=_ANY_OBJ, info=_STR)  # fmt: skip
_OLLAMA_DONE = _obj("model", "created_at", "done", model=_STR, done={"const": True})
_LLAMA_DONE = _obj("content", "stop", "model", "timings", content=_STR, stop={"const": True})
_READY = _obj("status", "reasons", "workers", "models", status=_STR,
              reasons={"type": "array", "items": _STR}, workers=_INT, models=_ARRAY)  # fmt: skip
# One server-sent event (OpenAPI 3.1 has a text/event-stream schema describe each event): its
# data (JSON, or OpenAI's "[DONE]"), and for the native job events its type and id.
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": _STR, "event": _STR, "id": _STR, "retry": _INT},
    "required": ["data"],
}
# An NDJSON body: one JSON object a line (each a piece, the last with "done": true).
_NDJSON_BODY = {"type": "string", "description": "one JSON object a line"}
_LLAMA_HEALTH_503 = _obj(
    "error", error=_obj("code", "message", code=_INT, message=_STR, type=_STR)
)  # llama.cpp's own shape for "Loading model", not the OpenAI error object


@dataclass(frozen=True)
class Op:
    """One route as the document describes it.

    ``path`` is as registered with aiohttp (``{model:.+}`` patterns are fine); ``body`` is a
    pydantic request model or a JSON schema; ``ok`` the 200 answer's JSON schema; ``stream``
    the media type it streams with when asked to; ``family`` whose error shape it answers in
    (``public``: no key needed, OpenAI's error shape).
    """

    method: str
    path: str
    summary: str
    family: Family = "openai"
    body: type[BaseModel] | dict[str, Any] | None = None
    ok: dict[str, Any] = field(default_factory=lambda: dict(_ANY_OBJ))
    stream: Stream | None = None
    query: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    ok_media: str = "application/json"
    extra: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def openapi_path(self) -> str:
        """``/v1/models/{model:.+}`` as OpenAPI writes it: ``/v1/models/{model}``."""
        return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", self.path)


# llama.cpp's /embedding(s): one {index, embedding} for LLMUnity's one content, else a list.
_LLAMA_EMBEDDING = {"oneOf": [_obj("index", "embedding", index=_INT, embedding=_ARRAY), _ARRAY]}


class UnversionedChatCompletionRequest(ChatCompletionRequest):
    """A chat completion on llama.cpp's unversioned path: as on llama.cpp's server, ``model``
    may be missing or name anything (the served model answers). Described only."""

    model: str | None = None  # type: ignore[assignment]


class UnversionedCompletionRequest(CompletionRequest):
    """A text completion on llama.cpp's unversioned path (``model`` optional). Described only."""

    model: str | None = None  # type: ignore[assignment]


_OPTIONS_BODY = {"type": "object", "description": "A1111 options to store for this key"}
# llama.cpp's tokenizer routes: the object is forwarded to the model's worker as it is.
_RPC_BODY = {"type": "object", "description": "forwarded to the model's worker; model picks it"}

OPERATIONS: list[Op] = [
    # OpenAI
    Op("POST", "/v1/chat/completions", "Chat completion", body=ChatCompletionRequest, ok=_CHAT,
       stream="sse", headers=("Idempotency-Key",)),
    Op("POST", "/v1/completions", "Text completion", body=CompletionRequest, ok=_COMPLETION,
       stream="sse", headers=("Idempotency-Key",)),
    Op("GET", "/v1/models", "Models with a live worker",
       ok=_obj("object", "data", data={"type": "array", "items": _MODEL})),
    Op("GET", "/v1/models/{model:.+}", "One live model", ok=_MODEL),
    Op("POST", "/v1/images/generations", "Images (b64_json)", body=ImageGenerationRequest,
       ok=_IMAGES),
    Op("POST", "/v1/embeddings", "Embeddings", body=OpenAIEmbeddingRequest,
       ok=_obj("object", "data", "model", "usage", data=_ARRAY)),
    # headrace's own: a job's events, resumable
    Op("GET", "/v1/jobs/{job_id}/events", "A job's events as SSE; Last-Event-ID resumes",
       ok_media=SSE, ok=_SSE_EVENT, query=("last_event_id",),
       headers=("Last-Event-ID",)),
    # llama.cpp's server
    Op("POST", "/chat/completions", "Chat completion (llama.cpp's unversioned path)",
       body=UnversionedChatCompletionRequest, ok=_CHAT, stream="sse"),
    Op("POST", "/completions", "Text completion (llama.cpp's unversioned path)",
       body=UnversionedCompletionRequest, ok=_COMPLETION, stream="sse"),
    Op("GET", "/models", "Models (llama.cpp's unversioned path)",
       ok=_obj("object", "data", data={"type": "array", "items": _MODEL})),
    Op("POST", "/completion", "llama.cpp completion", family="llamacpp", body=LlamaCompletionRequest, ok=_LLAMA_DONE,
       stream="sse"),
    Op("POST", "/tokenize", "Tokenize with the model's tokenizer", family="llamacpp",
       body={**_RPC_BODY, "description": "{content, add_special, with_pieces, model}"},
       ok=_obj("tokens", tokens=_ARRAY)),
    Op("POST", "/detokenize", "Token ids back to text", family="llamacpp",
       body={**_RPC_BODY, "description": "{tokens, model}"},
       ok=_obj("content", content=_STR)),
    Op("POST", "/apply-template", "The model's chat template applied", family="llamacpp",
       body={**_RPC_BODY, "description": "{messages, model}"}, ok=_obj("prompt", prompt=_STR)),
    Op("GET", "/props", "The model's properties", family="llamacpp", query=("model",)),
    Op("GET", "/template", "The model's chat template", family="llamacpp", query=("model",),
       ok=_obj("template", template=_STR)),
    Op("POST", "/template", "The model's chat template", family="llamacpp", body=_RPC_BODY,
       ok=_obj("template", template=_STR)),
    *(Op("POST", path, "Embeddings, llama.cpp's native shape (LLMUnity's for one content)", family="llamacpp",
         body=LlamaCppEmbeddingRequest, ok=_LLAMA_EMBEDDING) for path in ("/embedding", "/embeddings")),
    Op("GET", "/health", "llama.cpp's health: 503 until a text worker is ready", family="public",
       ok=_obj("status", status={"const": "ok"}),
       extra={503: ("no text worker yet", _LLAMA_HEALTH_503)}),
    # Ollama
    Op("POST", "/api/chat", "Ollama chat", family="ollama", body=ChatRequest, ok=_OLLAMA_DONE,
       stream="ndjson"),
    Op("POST", "/api/generate", "Ollama generate", family="ollama", body=GenerateRequest,
       ok=_OLLAMA_DONE, stream="ndjson"),
    Op("GET", "/api/tags", "Ollama: models with a live worker", family="ollama",
       ok=_obj("models", models=_ARRAY)),
    Op("POST", "/api/show", "Ollama: a live model's details", family="ollama", body=ShowRequest,
       ok=_obj("template", "details", "model_info", template=_STR)),
    *(Op("POST", path, "Ollama: embeddings", family="ollama", body=OllamaEmbedRequest,
         ok=_obj("model", "embeddings", embeddings=_ARRAY)) for path in ("/api/embed", "/embed")),
    Op("POST", "/api/embeddings", "Ollama: one prompt's embedding (older route)",
       family="ollama", body=OllamaEmbeddingsRequest, ok=_obj("embedding", embedding=_ARRAY)),
    Op("GET", "/api/ps", "Ollama: the models loaded now", family="ollama",
       ok=_obj("models", models=_ARRAY)),
    Op("GET", "/api/version", "Ollama: the server's version", family="ollama",
       ok=_obj("version", version=_STR)),
    # AUTOMATIC1111
    Op("POST", "/sdapi/v1/txt2img", "A1111 txt2img (Accept: text/event-stream streams progress)",
       body=Txt2ImgRequest, ok=_A1111_IMAGES, stream="sse"),
    Op("POST", "/sdapi/v1/img2img", "A1111 img2img (Accept: text/event-stream streams progress)",
       body=Img2ImgRequest, ok=_A1111_IMAGES, stream="sse"),
    Op("GET", "/sdapi/v1/progress", "The caller's image task, or id_task's", query=("id_task",),
       ok=_obj("progress", "eta_relative", "state", progress=_NUM, state=_ANY_OBJ)),
    Op("POST", "/sdapi/v1/interrupt", "Stop the caller's tasks"),
    Op("POST", "/sdapi/v1/skip", "Stop the caller's current task", ok=_NULL),
    Op("POST", "/sdapi/v1/png-info", "A PNG's parameters text", body=PngInfoRequest,
       ok=_obj("info", "items", "parameters", info=_STR)),
    Op("GET", "/sdapi/v1/upscalers", "Upscalers (none)", ok=_ARRAY),
    Op("GET", "/sdapi/v1/loras", "LoRA networks (none)", ok=_ARRAY),
    Op("GET", "/sdapi/v1/scripts", "Scripts (none)",
       ok=_obj("txt2img", "img2img", txt2img=_ARRAY, img2img=_ARRAY)),
    Op("GET", "/sdapi/v1/cmd-flags", "A1111 command-line flags (none)"),
    Op("GET", "/sdapi/v1/memory", "The edge's memory", ok=_obj("ram", "cuda")),
    Op("POST", "/sdapi/v1/refresh-checkpoints", "Nothing to refresh: models are the live fleet",
       ok=_NULL),
    Op("GET", "/sdapi/v1/sd-models", "Image models with a live worker", ok=_ARRAY),
    Op("GET", "/sdapi/v1/samplers", "Sampler names image jobs accept", ok=_ARRAY),
    Op("GET", "/sdapi/v1/schedulers", "Noise schedules", ok=_ARRAY),
    Op("GET", "/sdapi/v1/options", "The caller's options"),
    Op("POST", "/sdapi/v1/options", "Store options for the caller's key", body=_OPTIONS_BODY,
       ok=_NULL),
    # Operations (no key)
    Op("GET", "/health/live", "200 while the process runs", family="public",
       ok=_obj("status", status={"const": "ok"})),
    Op("GET", "/health/ready", "Ready: NATS, streams and a live worker (else 503 with reasons)",
       family="public", ok=_READY, extra={503: ("not ready", _READY)}),
    Op("GET", "/metrics", "Prometheus metrics", family="public", ok={"type": "string"},
       ok_media="text/plain"),
    Op("GET", "/openapi.json", "This document", family="public"),
]  # fmt: skip


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(op: Op) -> dict[str, Any]:
    schema = _ref(_ERROR_SCHEMA[op.family])
    codes = [405] if op.family == "public" else [c for c in _ERRORS if op.body or c != 413]
    out = {
        str(c): {"description": _ERRORS[c], "content": {"application/json": {"schema": schema}}}
        for c in codes
    }
    for code, (text, body) in op.extra.items():
        out[str(code)] = {"description": text, "content": {"application/json": {"schema": body}}}
    return out


def _operation(op: Op, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    ok: dict[str, Any] = {op.ok_media: {"schema": op.ok}}
    if op.stream == "sse":
        ok[SSE] = {"schema": _SSE_EVENT}
    elif op.stream == "ndjson":
        ok[NDJSON] = {"schema": _NDJSON_BODY}
    out: dict[str, Any] = {
        "summary": op.summary,
        "responses": {"200": {"description": "OK", "content": ok}, **_errors(op)},
    }
    out["security"] = [] if op.family == "public" else [{"bearer": []}, {"basic": []}]
    parameters = _path_parameters(op.path)
    parameters += [{"name": q, "in": "query", "schema": _STR} for q in op.query]
    parameters += [{"name": h, "in": "header", "schema": _STR} for h in op.headers]
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        schema = refs[op.body] if isinstance(op.body, type) else op.body
        # A POST without a body is read as ``{}``: the body is required only when ``{}`` is not
        # a valid one.
        if isinstance(op.body, type):
            required = any(f.is_required() for f in op.body.model_fields.values())
        else:
            required = bool(op.body.get("required"))
        content = {"application/json": {"schema": schema}}
        out["requestBody"] = {"required": required, "content": content}
    return out


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in re.findall(r"\{(\w+)", path)
    ]


def _preflight(path: str, methods: list[str]) -> dict[str, Any]:
    """A path's CORS preflight: 204 for an allowed origin, else what the route answers."""
    path_parameters = _path_parameters(path)
    return {
        "summary": "CORS preflight (answered before authentication)",
        "security": [],
        "parameters": [
            *path_parameters,
            {
                "name": "Origin",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
            },
            {
                "name": "Access-Control-Request-Method",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "enum": methods},
            },
        ],
        "responses": {
            "204": {"description": "allowed: Access-Control-Allow-* headers"},
            "401": {
                "description": "origin not allowed, sent on as a request",
                "content": {"application/json": {"schema": _ref("Error")}},
            },
            "404": {
                "description": "no such route (a path parameter its pattern refuses)",
                "content": {"application/json": {"schema": _ref("Error")}},
            },
            "405": {
                "description": "CORS is off, or the origin is not allowed",
                "content": {"application/json": {"schema": _ref("Error")}},
            },
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the edge."""
    models = list(dict.fromkeys(op.body for op in OPERATIONS if isinstance(op.body, type)))
    mapping, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    refs = {m: mapping[(m, "validation")] for m in models}
    schemas = {**defs.get("$defs", {}), "Error": _OPENAI_ERROR,
               "LlamaCppError": _LLAMACPP_ERROR, "OllamaError": _OLLAMA_ERROR}  # fmt: skip
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.openapi_path, {})[op.method.lower()] = _operation(op, refs)
    for path, ops in paths.items():
        ops["options"] = _preflight(path, sorted(m.upper() for m in ops))
    return {
        "openapi": "3.1.0",
        "info": {"title": "headrace edge", "version": "1"},
        "components": {
            "schemas": schemas,
            # The key as a Bearer token, or as the password of HTTP Basic (any user name).
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
        },
        "paths": paths,
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document."""
    return json_response(document())
