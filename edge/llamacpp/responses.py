"""Bodies and streamed chunks in llama.cpp's shapes (LLMUnity parses ``content``, ``stop``, ``slot_id``)."""

from __future__ import annotations

from typing import Any

from schemas.events import Done, Timings

# llama.cpp's stop types; a job that stopped at EOS or a stop word both read "eos" here.
_STOP_TYPE = {"stop": "eos", "length": "limit", "cancelled": "none"}


def chunk(content: str) -> dict[str, Any]:
    """One streamed piece of text."""
    return {
        "content": content,
        "stop": False,
        "id_slot": -1,
        "slot_id": -1,
        "multimodal": False,
        "index": 0,
    }


def timings(t: Timings) -> dict[str, float]:
    """llama.cpp's ``timings`` object."""

    def per(ms: float, n: int) -> tuple[float, float]:
        return (ms / n if n else 0.0), (1000 * n / ms if ms else 0.0)

    prompt_per_token, prompt_per_s = per(t.prompt_ms, t.prompt_n)
    predicted_per_token, predicted_per_s = per(t.predicted_ms, t.predicted_n)
    return {
        "cache_n": t.cache_n,
        "prompt_n": t.prompt_n,
        "prompt_ms": t.prompt_ms,
        "prompt_per_token_ms": prompt_per_token,
        "prompt_per_second": prompt_per_s,
        "predicted_n": t.predicted_n,
        "predicted_ms": t.predicted_ms,
        "predicted_per_token_ms": predicted_per_token,
        "predicted_per_second": predicted_per_s,
    }


def final(model: str, content: str, done: Done) -> dict[str, Any]:
    """The last streamed chunk (``content`` empty) or the whole non-streamed answer."""
    return {
        **chunk(content),
        "stop": True,
        "model": model,
        "tokens_predicted": done.usage.completion_tokens,
        "tokens_evaluated": done.usage.prompt_tokens,
        # What the sequence's cells hold at the end, as llama.cpp counts it: the reused
        # prefix, what was evaluated and what was generated.
        "tokens_cached": done.usage.prompt_tokens + done.usage.completion_tokens,
        "stop_type": _STOP_TYPE.get(done.finish_reason, "none"),
        "stopping_word": "",
        "truncated": False,
        "generation_settings": {"seed": done.seed},
        "timings": timings(done.timings),
    }
