"""Ollama's NDJSON objects: one per piece of text, the last with ``done: true`` and counts in ns."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from schemas.events import Done


def now() -> str:
    """Ollama's ``created_at``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def piece(model: str, text: str, *, chat: bool) -> dict[str, Any]:
    """One streamed piece."""
    body: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        body["message"] = {"role": "assistant", "content": text}
    else:
        body["response"] = text
    body["done"] = False
    return body


def last(model: str, text: str, done: Done, started: float, *, chat: bool) -> dict[str, Any]:
    """The final object (``text`` empty when streamed, the whole answer when not)."""
    return {
        **piece(model, text, chat=chat),
        "done": True,
        "done_reason": "length" if done.finish_reason == "length" else "stop",
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": done.usage.prompt_tokens,
        "prompt_eval_duration": int(done.timings.prompt_ms * 1e6),
        "eval_count": done.usage.completion_tokens,
        "eval_duration": int(done.timings.predicted_ms * 1e6),
    }
