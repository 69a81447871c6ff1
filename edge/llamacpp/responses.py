"""Bodies and streamed chunks in llama.cpp's shapes (server-task's to_json_non_oaicompat).

LLMUnity parses ``content``, ``stop`` and ``slot_id``; llama.cpp's own clients and test
suite read the rest: ``tokens``, ``stop_type`` and ``stopping_word``, ``truncated``,
``has_new_line``, ``generation_settings``, ``completion_probabilities`` (``n_probs`` > 0),
``timings``, and ``response_fields`` filtering of the final body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edge.llamacpp.requests import Biases, CompletionRequest, Prompt
from edge.relay import Finished, Text
from schemas.events import Done, Timings, TokenLogprob

# What headrace's sampler chain runs, in order (workers/engines/sampling.py), named as
# llama.cpp names its samplers.
_SAMPLERS = ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"]


def stop_type(done: Done, limit: int | None) -> str:
    """llama.cpp's ``stop_type``: ``word`` (a stop string), ``eos``, ``limit`` or ``none``."""
    if done.finish_reason == "stop":
        return "word" if done.stop_word else "eos"
    return "limit" if done.finish_reason == "length" else "none"


def truncated(done: Done, limit: int | None) -> bool:
    """Generation ran into the end of the context before ``n_predict`` (llama.cpp's flag)."""
    generated = done.usage.completion_tokens
    return done.finish_reason == "length" and (limit is None or generated < limit)


def timings(t: Timings) -> dict[str, float]:
    """llama.cpp's ``timings`` object (``cache_n`` 0: every job evaluates its whole prompt)."""

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


def probabilities(
    items: list[TokenLogprob], ids: list[int] | None, post_sampling: bool
) -> list[dict[str, Any]]:
    """``completion_probabilities``: per token ``{id, token, bytes, logprob, top_logprobs}``.

    With ``post_sampling_probs`` the keys are ``prob`` and ``top_probs``, as llama.cpp's; the
    values are the model's own probabilities (``exp(logprob)``), not those left after the
    sampler chain: headrace's engines report the raw distribution.
    """
    key, top_key = ("prob", "top_probs") if post_sampling else ("logprob", "top_logprobs")

    def value(logprob: float) -> float:
        return math.exp(logprob) if post_sampling else logprob

    out = []
    for i, lp in enumerate(items):
        token_id = lp.id if lp.id is not None else (ids[i] if ids and i < len(ids) else -1)
        top = [
            {"id": -1 if t.id is None else t.id, "token": t.token, "bytes": list(t.token.encode()),
             key: value(t.logprob)}
            for t in lp.top_logprobs
        ]  # fmt: skip
        out.append({
            "id": token_id, "token": lp.token, "bytes": list(lp.token.encode()),
            key: value(lp.logprob), top_key: top,
        })  # fmt: skip
    return out


def nested_values(paths: list[str], body: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: each path (``a/b`` for nested keys) that exists, keyed
    by the path itself."""
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = body
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


@dataclass
class CompletionView:
    """Writes one ``/completion`` request's chunks and final bodies (one per prompt)."""

    model: str
    req: CompletionRequest
    prompts: list[Prompt]
    biases: Biases
    seed: int
    _new_line: dict[int, bool] = field(default_factory=dict)
    _predicted: dict[int, int] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """``generation_settings``: the parameters the job ran with, in llama.cpp's names
        (samplers headrace does not run are reported off: DRY, XTC, top-n-sigma)."""
        r = self.req
        bias = [
            {"bias": -math.inf if b is False else b, "token": t} for t, b in self.biases.ids.items()
        ]
        return {
            "seed": self.seed, "temperature": r.temperature, "dynatemp_range": 0.0,
            "dynatemp_exponent": 1.0, "top_k": r.top_k, "top_p": r.top_p, "min_p": r.min_p,
            "top_n_sigma": -1.0, "xtc_probability": 0.0, "xtc_threshold": 0.1,
            "typical_p": r.typical_p, "repeat_last_n": r.repeat_last_n,
            "repeat_penalty": r.repeat_penalty, "presence_penalty": r.presence_penalty,
            "frequency_penalty": r.frequency_penalty, "dry_multiplier": 0.0,
            "mirostat": r.mirostat, "mirostat_tau": r.mirostat_tau,
            "mirostat_eta": r.mirostat_eta, "stop": r.stop, "max_tokens": r.predict(),
            "n_predict": r.predict(), "n_keep": 0, "n_discard": 0, "ignore_eos": r.ignore_eos,
            "stream": r.stream, "logit_bias": bias, "n_probs": r.n_probs, "min_keep": 0,
            "grammar": r.grammar or "", "grammar_lazy": False, "grammar_triggers": [],
            "preserved_tokens": [], "chat_format": "Content-only", "reasoning_format": "none",
            "samplers": _SAMPLERS, "timings_per_token": False,
            "post_sampling_probs": r.post_sampling_probs, "lora": [],
        }  # fmt: skip

    def chunk(self, out: Text) -> dict[str, Any]:
        """One streamed piece of text, with its token ids (and probabilities when asked)."""
        self._new_line[out.index] = self._new_line.get(out.index, False) or "\n" in out.text
        self._predicted[out.index] = self._predicted.get(out.index, 0) + out.tokens
        body = {
            "index": out.index,
            "content": out.text,
            "tokens": out.token_ids or [],
            "stop": False,
            "id_slot": -1,
            "slot_id": -1,  # LLMUnity's name of id_slot
            "multimodal": False,
            "tokens_predicted": self._predicted[out.index],
        }
        if self.req.n_probs and out.logprobs:
            body["completion_probabilities"] = probabilities(
                out.logprobs, out.token_ids, self.req.post_sampling_probs
            )
        return body

    def final_chunk(self, out: Finished) -> dict[str, Any]:
        """The stream's last chunk for a prompt: empty content, everything else."""
        return self._final(out.index, out.done, "", [], None, self._new_line.get(out.index, False))

    def final(
        self,
        index: int,
        done: Done,
        content: str,
        ids: list[int],
        logprobs: list[TokenLogprob] | None,
    ) -> dict[str, Any]:
        """A prompt's whole answer (not streamed)."""
        tokens = ids if self.req.return_tokens else []
        return self._final(index, done, content, tokens, (logprobs, ids), "\n" in content)

    def _final(
        self,
        index: int,
        done: Done,
        content: str,
        tokens: list[int],
        probs: tuple[list[TokenLogprob] | None, list[int]] | None,
        new_line: bool,
    ) -> dict[str, Any]:
        limit = self.req.token_limit()
        prompt = self.prompts[index]
        body: dict[str, Any] = {
            "index": index,
            "content": content,
            "tokens": tokens,
            "id_slot": -1,
            "slot_id": -1,
            "multimodal": False,
            "stop": True,
            "model": self.model,
            "tokens_predicted": done.usage.completion_tokens,
            "tokens_evaluated": done.usage.prompt_tokens,
            "generation_settings": self.settings(),
            "prompt": prompt,
            "has_new_line": new_line,
            "truncated": truncated(done, limit),
            "stop_type": stop_type(done, limit),
            "stopping_word": done.stop_word or "",
            # What the sequence's cells hold at the end, as llama.cpp counts it: the reused
            # prefix, what was evaluated and what was generated.
            "tokens_cached": done.usage.prompt_tokens + done.usage.completion_tokens,
            "timings": timings(done.timings),
        }
        if probs is not None and self.req.n_probs and probs[0]:
            body["completion_probabilities"] = probabilities(
                probs[0], probs[1], self.req.post_sampling_probs
            )
        return nested_values(self.req.response_fields, body) if self.req.response_fields else body
