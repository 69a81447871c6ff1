"""Every route declares how it is charged and whose error shape it speaks, where it is registered."""

from __future__ import annotations

from typing import Any

from edge.app import build_app
from edge.routing import ROUTES, Charging


def _table(edge_settings: Any) -> dict[tuple[str, str], Any]:
    app = build_app(edge_settings)
    return {
        (route.method, route.resource.canonical): info
        for route, info in app[ROUTES].items()
        if route.resource is not None
    }


def test_generation_routes_are_charged_by_their_session(edge_settings: Any) -> None:
    table = _table(edge_settings)
    by_session = {path for (_, path), info in table.items() if info.charging is Charging.SESSION}
    assert by_session == {
        "/v1/chat/completions",
        "/v1/completions",
        "/chat/completions",  # llama.cpp's unversioned paths, the same handlers
        "/completions",
        "/completion",
        "/api/chat",
        "/api/generate",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/v1/images/generations",
        "/v1/embeddings",  # charged their input tokens (edge/routes/embeddings.py)
        "/embedding",
        "/embeddings",
        "/api/embed",
        "/embed",
        "/api/embeddings",
    }
    free = {path for (_, path), info in table.items() if info.charging is Charging.NONE}
    assert free == {"/sdapi/v1/progress"}  # polled every second by A1111 clients


def test_each_family_speaks_its_own_error_shape(edge_settings: Any) -> None:
    table = _table(edge_settings)
    apis = {path: info.api.name for (_, path), info in table.items()}
    assert {p for p, name in apis.items() if name == "ollama"} == {
        "/api/chat",
        "/api/generate",
        "/api/tags",
        "/api/show",
        "/api/ps",
        "/api/version",
        "/api/embed",
        "/embed",
        "/api/embeddings",
    }
    assert apis["/completion"] == apis["/embedding"] == apis["/embeddings"] == "llamacpp"
    assert apis["/v1/embeddings"] == "openai"
    assert apis["/v1/chat/completions"] == apis["/sdapi/v1/txt2img"] == "openai"
    assert apis["/chat/completions"] == apis["/v1/models/{model}"] == "openai"
