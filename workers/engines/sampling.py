"""From a job's ``TextParams`` to a llama.cpp sampler plan: pure, so it is tested without a model.

The plan mirrors the chain llama.cpp's own server builds (common/sampling.cpp):
logit bias, penalties and grammar first, then either greedy (temperature 0),
temperature + mirostat, or top-k, typical, top-p, min-p, temperature and the
seeded distribution sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import orjson

from schemas.errors import ContextLengthExceeded, InvalidRequest
from schemas.jobs import TextParams

# llama.cpp reads this seed as "pick a random one", which would break
# "same seed, same text" (a redelivered job must repeat itself).
LLAMA_DEFAULT_SEED = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Greedy:
    """Always the most likely token (temperature 0)."""


@dataclass(frozen=True, slots=True)
class TopK:
    """Keep the ``k`` most likely tokens (0: all)."""

    k: int


@dataclass(frozen=True, slots=True)
class Typical:
    """Locally typical sampling with mass ``p`` (1.0: off)."""

    p: float


@dataclass(frozen=True, slots=True)
class TopP:
    """Nucleus sampling: the smallest set of tokens with mass ``p`` (1.0: off)."""

    p: float


@dataclass(frozen=True, slots=True)
class MinP:
    """Drop tokens less likely than ``p`` times the most likely one (0: off)."""

    p: float


@dataclass(frozen=True, slots=True)
class Temp:
    """Divide the logits by the temperature."""

    temperature: float


@dataclass(frozen=True, slots=True)
class Dist:
    """Draw from what is left, with a generator seeded by ``seed``."""

    seed: int


@dataclass(frozen=True, slots=True)
class Mirostat:
    """Mirostat 1.0 (target surprise ``tau``, learning rate ``eta``); it draws the token too."""

    seed: int
    tau: float
    eta: float


@dataclass(frozen=True, slots=True)
class MirostatV2:
    """Mirostat 2.0 (target surprise ``tau``, learning rate ``eta``); it draws the token too."""

    seed: int
    tau: float
    eta: float


# Each step keeps its arguments' types (a seed or k is an int, never a float cast back).
Step = Greedy | TopK | Typical | TopP | MinP | Temp | Dist | Mirostat | MirostatV2


@dataclass(frozen=True, slots=True)
class Grammar:
    """A constraint on the output: GBNF text, any JSON value, or a JSON Schema (as JSON text)."""

    kind: Literal["gbnf", "json", "json_schema"]
    source: str = ""


@dataclass(frozen=True, slots=True)
class Penalties:
    """Arguments of llama.cpp's penalties sampler."""

    last_n: int
    repeat: float
    frequency: float
    presence: float


@dataclass(frozen=True, slots=True)
class SamplerPlan:
    """Everything the sampler chain of one job is built from."""

    logit_bias: dict[int, float]
    penalties: Penalties | None
    grammar: Grammar | None
    steps: tuple[Step, ...]
    seed: int


def sampler_seed(seed: int) -> int:
    """The job's seed as llama.cpp takes it (never the value it treats as random)."""
    return LLAMA_DEFAULT_SEED - 1 if seed == LLAMA_DEFAULT_SEED else seed


def logit_bias(p: TextParams, n_vocab: int, eog: Iterable[int] = ()) -> dict[int, float]:
    """Token-id keyed biases (``false``: banned, -inf); ``ignore_eos`` bans every
    end-of-generation token."""
    out: dict[int, float] = {}
    for key, bias in p.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequest(
                f"logit_bias keys are token ids, got {key[:32]!r}", param="logit_bias"
            ) from None
        if not 0 <= token < n_vocab:
            raise InvalidRequest(
                f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})",
                param="logit_bias",
            )
        out[token] = -math.inf if bias is False else bias
    if p.ignore_eos:
        out.update(dict.fromkeys(eog, -math.inf))
    return out


def penalties(p: TextParams, n_ctx: int) -> Penalties | None:
    """Repeat/frequency/presence penalties over the last n tokens (-1 = the whole context)."""
    last_n = n_ctx if p.repeat_last_n == -1 else p.repeat_last_n
    # llama.cpp requires repeat > 0 with 1.0 meaning off; the contract allows 0, read as off too.
    repeat = p.repeat_penalty if p.repeat_penalty > 0 else 1.0
    if last_n == 0 or (repeat == 1.0 and p.frequency_penalty == 0 and p.presence_penalty == 0):
        return None
    return Penalties(last_n, repeat, p.frequency_penalty, p.presence_penalty)


def grammar(p: TextParams) -> Grammar | None:
    """The output constraint asked for by ``grammar``, ``json_schema`` or ``response_format``."""
    wants_schema = p.response_format == "json_schema" or p.json_schema is not None
    if p.grammar and (wants_schema or p.response_format == "json_object"):
        raise InvalidRequest(
            "grammar cannot be combined with a JSON response_format or json_schema",
            param="grammar",
        )
    if p.grammar:
        return Grammar("gbnf", p.grammar)
    if wants_schema:
        if p.json_schema is None:
            raise InvalidRequest(
                "response_format json_schema needs a json_schema", param="json_schema"
            )
        return Grammar("json_schema", orjson.dumps(p.json_schema).decode())
    if p.response_format == "json_object":
        return Grammar("json")
    return None


def steps(p: TextParams, seed: int) -> tuple[Step, ...]:
    """The samplers after bias, penalties and grammar, in llama.cpp's order."""
    if p.temperature == 0:
        return (Greedy(),)
    if p.mirostat == 1:
        return (Temp(p.temperature), Mirostat(seed, p.mirostat_tau, p.mirostat_eta))
    if p.mirostat == 2:
        return (Temp(p.temperature), MirostatV2(seed, p.mirostat_tau, p.mirostat_eta))
    return (
        TopK(p.top_k),
        Typical(p.typical_p),
        TopP(p.top_p),
        MinP(p.min_p),
        Temp(p.temperature),
        Dist(seed),
    )


def plan(p: TextParams, *, n_vocab: int, n_ctx: int, eog: Iterable[int] = ()) -> SamplerPlan:
    """The sampler plan of one job; raises InvalidRequest for parameters that cannot work."""
    seed = sampler_seed(p.seed)
    return SamplerPlan(
        logit_bias=logit_bias(p, n_vocab, eog),
        penalties=penalties(p, n_ctx),
        grammar=grammar(p),
        steps=steps(p, seed),
        seed=seed,
    )


def token_budget(max_tokens: int | None, prompt_n: int, n_ctx: int, model: str) -> int:
    """How many tokens may be generated: max_tokens, cut at the end of the context.

    A prompt that leaves no room for one token is a permanent error; a max_tokens
    beyond the context is not (generation ends with finish_reason ``length``,
    as llama.cpp's server does).
    """
    if prompt_n >= n_ctx:
        raise ContextLengthExceeded(
            f"the prompt is {prompt_n} tokens but the context of {model} holds {n_ctx} "
            "(including at least one generated token)",
            param="messages",
            n_prompt_tokens=prompt_n,
            n_ctx=n_ctx,
        )
    room = n_ctx - prompt_n
    return room if max_tokens is None else min(max_tokens, room)
