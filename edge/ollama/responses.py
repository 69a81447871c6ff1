"""Ollama's NDJSON objects: one per piece of text, the last with ``done: true`` and counts in ns."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from edge.tools import Call
from schemas.events import Done
from schemas.fleet import ModelInfo


def now() -> str:
    """Ollama's ``created_at``."""
    return timestamp(time.time())


def timestamp(s: float) -> str:
    """Seconds since the epoch as Ollama writes times (RFC 3339, UTC)."""
    return datetime.fromtimestamp(s, UTC).isoformat().replace("+00:00", "Z")


def details() -> dict[str, Any]:
    """Ollama's ``details`` of a model; headrace knows only that workers load GGUF files."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def listed(m: ModelInfo) -> dict[str, Any]:
    """One model of ``/api/tags`` (size and digest unknown at the edge: 0 and empty)."""
    return {
        "name": m.id,
        "model": m.id,
        "modified_at": timestamp(m.created),
        "size": 0,
        "digest": "",
        "details": details(),
    }


def show(m: ModelInfo, template: str) -> dict[str, Any]:
    """``/api/show``: what the edge and the model's workers know (its chat template)."""
    model_info: dict[str, Any] = {"general.name": m.id}
    if m.context_length is not None:
        model_info["general.context_length"] = m.context_length  # the workers' n_ctx
    return {
        "license": "",
        "modelfile": "",
        "parameters": "",
        "template": template,
        "details": details(),
        "model_info": model_info,
        "capabilities": ["completion", "tools"],  # every model: edge/tools/
        "modified_at": timestamp(m.created),
    }


def running(m: ModelInfo, expires_s: float) -> dict[str, Any]:
    """One model of ``/api/ps``: loaded while a worker of it lives, so it "expires" when the
    last heartbeat would go stale."""
    return {
        **listed(m),
        "expires_at": timestamp(expires_s),
        "size_vram": 0,
        "context_length": m.context_length,
    }


def piece(model: str, text: str, *, chat: bool) -> dict[str, Any]:
    """One streamed piece."""
    body: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        body["message"] = {"role": "assistant", "content": text}
    else:
        body["response"] = text
    body["done"] = False
    return body


def tool_calls(calls: list[Call]) -> list[dict[str, Any]]:
    """``message.tool_calls`` in Ollama's shape: arguments as an object, no ids."""
    return [{"function": {"name": c.name, "arguments": c.arguments_object()}} for c in calls]


def calls_piece(model: str, calls: list[Call]) -> dict[str, Any]:
    """A streamed piece carrying tool calls, as Ollama sends one once a call is parsed."""
    body = piece(model, "", chat=True)
    body["message"]["tool_calls"] = tool_calls(calls)
    return body


def last(
    model: str,
    text: str,
    done: Done,
    started: float,
    *,
    chat: bool,
    calls: list[Call] | None = None,
) -> dict[str, Any]:
    """The final object (``text`` empty when streamed, the whole answer when not; ``calls``
    the tool calls of a whole answer)."""
    head = piece(model, text, chat=chat)
    if calls:
        head["message"]["tool_calls"] = tool_calls(calls)
    return {
        **head,
        "done": True,
        "done_reason": "length" if done.finish_reason == "length" else "stop",
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": done.usage.prompt_tokens,
        "prompt_eval_duration": int(done.timings.prompt_ms * 1e6),
        "eval_count": done.usage.completion_tokens,
        "eval_duration": int(done.timings.predicted_ms * 1e6),
    }
