"""``GET /openapi.json``, generated from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from edge.a1111.requests import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from edge.embeddings.requests import (
    LlamaCppEmbeddingRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OpenAIEmbeddingRequest,
)
from edge.errors import json_response
from edge.ollama.requests import ShowRequest
from edge.openai.image_generation import ImageGenerationRequest
from edge.openai.requests import ChatCompletionRequest, CompletionRequest
from edge.routing import Routes

routes = Routes()

_ERROR = {
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


def _operation(summary: str, body: str | None, streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}, {"basic": []}],
        "responses": {
            "200": {"description": "OK", "content": ok},
            **{
                str(code): {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                for code, text in ((400, "invalid request"), (401, "missing or wrong key"), (404, "unknown model"),
                                   (503, "queue full or no worker"), (504, "deadline passed"))
            },
        },
    }  # fmt: skip
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return op


def _with_path(op: dict[str, Any], name: str) -> dict[str, Any]:
    """``op`` with one string path parameter."""
    parameter = {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
    return {**op, "parameters": [parameter]}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the edge."""
    _, defs = models_json_schema(
        [
            (m, "validation")
            for m in (
                ChatCompletionRequest,
                CompletionRequest,
                ImageGenerationRequest,
                Txt2ImgRequest,
                Img2ImgRequest,
                PngInfoRequest,
                ShowRequest,
                OpenAIEmbeddingRequest,
                LlamaCppEmbeddingRequest,
                OllamaEmbedRequest,
                OllamaEmbeddingsRequest,
            )
        ],
        ref_template="#/components/schemas/{model}",
    )
    schemas = {**defs.get("$defs", {}), "Error": _ERROR}
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
        "paths": {
            "/v1/chat/completions": {
                "post": _operation("Chat completion", "ChatCompletionRequest", True)
            },
            "/v1/completions": {"post": _operation("Text completion", "CompletionRequest", True)},
            "/v1/models": {"get": _operation("Models with a live worker", None, False)},
            "/v1/models/{model}": {
                "get": _with_path(_operation("One live model", None, False), "model")
            },
            "/chat/completions": {
                "post": _operation(
                    "Chat completion (llama.cpp's unversioned path)", "ChatCompletionRequest", True
                )
            },
            "/completions": {
                "post": _operation(
                    "Text completion (llama.cpp's unversioned path)", "CompletionRequest", True
                )
            },
            "/models": {"get": _operation("Models (llama.cpp's unversioned path)", None, False)},
            "/v1/embeddings": {
                "post": _operation("Embeddings (OpenAI)", "OpenAIEmbeddingRequest", False)
            },
            **{
                path: {
                    "post": _operation(
                        "Embeddings (llama.cpp's native shape; LLMUnity's for one content)",
                        "LlamaCppEmbeddingRequest",
                        False,
                    )
                }
                for path in ("/embedding", "/embeddings")
            },
            **{
                path: {"post": _operation("Ollama: embeddings", "OllamaEmbedRequest", False)}
                for path in ("/api/embed", "/embed")
            },
            "/api/embeddings": {
                "post": _operation(
                    "Ollama: one prompt's embedding (older route)", "OllamaEmbeddingsRequest", False
                )
            },
            "/api/show": {
                "post": _operation("Ollama: a live model's details", "ShowRequest", False)
            },
            "/api/ps": {"get": _operation("Ollama: the models loaded now", None, False)},
            "/api/version": {"get": _operation("Ollama: the server's version", None, False)},
            "/v1/images/generations": {
                "post": _operation("Images (b64_json)", "ImageGenerationRequest", True)
            },
            "/sdapi/v1/txt2img": {"post": _operation("A1111 txt2img", "Txt2ImgRequest", True)},
            "/sdapi/v1/img2img": {"post": _operation("A1111 img2img", "Img2ImgRequest", True)},
            "/sdapi/v1/progress": {"get": _operation("The caller's image task", None, False)},
            "/sdapi/v1/interrupt": {"post": _operation("Stop the caller's tasks", None, False)},
            "/sdapi/v1/skip": {"post": _operation("Stop the caller's current task", None, False)},
            "/sdapi/v1/png-info": {
                "post": _operation("A PNG's parameters text", "PngInfoRequest", False)
            },
            **{
                f"/sdapi/v1/{name}": {method: _operation(summary, None, False)}
                for name, method, summary in (
                    ("upscalers", "get", "Upscalers (none)"),
                    ("loras", "get", "LoRA networks (none)"),
                    ("scripts", "get", "Scripts (none)"),
                    ("cmd-flags", "get", "A1111 command-line flags (none)"),
                    ("memory", "get", "The edge's memory"),
                    (
                        "refresh-checkpoints",
                        "post",
                        "Nothing to refresh: models are the live fleet",
                    ),
                )
            },
            "/v1/jobs/{job_id}/events": {
                "get": _with_path(
                    _operation("A job's events; Last-Event-ID resumes", None, True), "job_id"
                )
            },
        },
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document."""
    return json_response(document())
