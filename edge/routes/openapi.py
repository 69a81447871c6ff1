"""``GET /openapi.json``, generated from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from edge.a1111.requests import Img2ImgRequest, Txt2ImgRequest
from edge.errors import json_response
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
        "security": [{"bearer": []}],
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
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/chat/completions": {
                "post": _operation("Chat completion", "ChatCompletionRequest", True)
            },
            "/v1/completions": {"post": _operation("Text completion", "CompletionRequest", True)},
            "/v1/models": {"get": _operation("Models with a live worker", None, False)},
            "/v1/images/generations": {
                "post": _operation("Images (b64_json)", "ImageGenerationRequest", True)
            },
            "/sdapi/v1/txt2img": {"post": _operation("A1111 txt2img", "Txt2ImgRequest", True)},
            "/sdapi/v1/img2img": {"post": _operation("A1111 img2img", "Img2ImgRequest", True)},
            "/sdapi/v1/progress": {"get": _operation("The caller's image task", None, False)},
            "/sdapi/v1/interrupt": {"post": _operation("Stop the caller's tasks", None, False)},
            "/v1/jobs/{job_id}/events": {
                "get": {
                    **_operation("A job's events; Last-Event-ID resumes", None, True),
                    "parameters": [
                        {
                            "name": "job_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                }
            },
        },
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document."""
    return json_response(document())
