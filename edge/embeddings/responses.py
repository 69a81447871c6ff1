"""Embedding answers in each API's shape, from the vectors a job sent (base64 float32)."""

from __future__ import annotations

import time
from typing import Any

from schemas.events import Done
from schemas.vectors import decode_vector


def openai(model: str, vectors: list[str], done: Done, *, base64: bool) -> dict[str, Any]:
    """``{object: list, data: [{object: embedding, index, embedding}], model, usage}``; with
    ``encoding_format: base64`` the worker's base64 float32 goes out unchanged."""
    data = [
        {"object": "embedding", "index": i, "embedding": v if base64 else decode_vector(v)}
        for i, v in enumerate(vectors)
    ]
    n = done.usage.prompt_tokens
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


def llamacpp(vectors: list[str], *, single: bool) -> Any:
    """llama.cpp's native answer: ``[{index, embedding: [[...]]}]``, one pooled vector per
    input. LLMUnity's request (one ``content`` string) gets ``{"embedding": [...]}``, the
    shape it parses (``EmbeddingsResult``) and llama.cpp's server sent before it learned
    several inputs: a JSON array would fail Unity's ``JsonUtility.FromJson``."""
    if single:
        return {"index": 0, "embedding": decode_vector(vectors[0])}
    return [{"index": i, "embedding": [decode_vector(v)]} for i, v in enumerate(vectors)]


def ollama_embed(
    model: str, vectors: list[str], done: Done | None, started: float
) -> dict[str, Any]:
    """``/api/embed``: ``{model, embeddings, total_duration, load_duration,
    prompt_eval_count}`` (durations in nanoseconds; the model is already loaded)."""
    return {
        "model": model,
        "embeddings": [decode_vector(v) for v in vectors],
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": done.usage.prompt_tokens if done is not None else 0,
    }


def ollama_embeddings(vectors: list[str]) -> dict[str, Any]:
    """``/api/embeddings``: ``{embedding: [...]}`` (empty for an empty prompt, as Ollama)."""
    return {"embedding": decode_vector(vectors[0]) if vectors else []}
