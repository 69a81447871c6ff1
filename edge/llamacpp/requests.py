"""``POST /completion`` as llama.cpp's server takes it, with llama.cpp's defaults.

Its prompt and ``logit_bias`` forms are llama.cpp's (server-common's tokenize_input_prompts
and server-task's params_from_json_cmpl):

- ``prompt``: a string; token ids; ids and strings mixed in one list (one prompt); a list
  of such prompts (one result each); or ``{"prompt_string": ..., "multimodal_data": [...]}``
  in either place. A list of strings only is several prompts, as llama.cpp reads it.
- ``logit_bias``: ``{"<id>": bias}``, ``{"<text piece>": bias}``, ``[[id, bias], ...]`` or
  ``[["text piece", bias], ...]``; a bias of ``false`` bans the token.

Strings inside prompts and text pieces in ``logit_bias`` need the model's tokenizer: the
route asks a worker of the model for them (``edge.llamacpp.prompts``), so jobs carry ids only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, field_validator

from edge.body import Lenient
from edge.sampling import (
    Grammar,
    MinP,
    MirostatRate,
    Penalty,
    RepeatLastN,
    RepeatPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)
from schemas.errors import InvalidRequest
from schemas.jobs import MAX_PROMPT_CHARS, SEED_MAX, SchemaDepth, Stops, TextParams

# llama.cpp treats these seeds as "pick one at random".
RANDOM_SEEDS = {-1, 0xFFFFFFFF}
# How many entries a logit_bias may have (a vocabulary is ~50k; more is not a real request).
MAX_BIASES = 1024

_DECIMAL = re.compile(r"\s*[+-]?[0-9]+")

Bias = Literal[False] | float
# One prompt: text, or ids and text pieces in order (pieces are tokenized where they stand).
Prompt = str | list[int | str]


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object_prompt(value: dict[str, Any]) -> str:
    """``{"prompt_string", "multimodal_data"}``: the text; media needs a multimodal model."""
    text = value.get("prompt_string")
    if not isinstance(text, str):
        raise ValueError("a prompt object needs a 'prompt_string' string")
    if value.get("multimodal_data"):
        raise ValueError("multimodal_data is not supported: no multimodal model is served here")
    return text


def _one(value: object) -> Prompt:
    """One prompt of a batch."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _object_prompt(value)
    if isinstance(value, list) and value and all(_is_id(v) or isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        "each prompt of a batch is a string, a list of token ids and strings, or an object "
        "with 'prompt_string'"
    )


def split_prompts(value: object) -> list[Prompt]:
    """The prompts a ``prompt`` value holds (one unless it is a batch)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [_object_prompt(value)]
    if not isinstance(value, list) or not value:
        raise ValueError("prompt must be a string, a non-empty list, or a prompt object")
    if any(_is_id(v) for v in value) and all(_is_id(v) or isinstance(v, str) for v in value):
        return [list(value)]  # ids, with or without strings among them: one prompt
    return [_one(v) for v in value]


def _check(prompt: Prompt) -> None:
    if isinstance(prompt, list) and any(isinstance(t, int) and t < 0 for t in prompt):
        raise ValueError("token ids are not negative")
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"a prompt holds at most {MAX_PROMPT_CHARS} tokens")


def prompt_chars(prompts: list[Prompt]) -> int:
    """The prompts' size for the edge's bound: characters, an id counted as four."""
    return sum(
        len(p) if isinstance(p, str) else sum(len(t) if isinstance(t, str) else 4 for t in p)
        for p in prompts
    )


@dataclass
class Biases:
    """``logit_bias`` read: by token id, and text pieces whose every token gets the bias."""

    ids: dict[int, Bias] = field(default_factory=dict)
    pieces: list[tuple[str, Bias]] = field(default_factory=list)

    def add(self, token: int, bias: Bias) -> None:
        """Biases of one token add up, as llama.cpp applies each entry; a ban stays a ban."""
        old = self.ids.get(token)
        self.ids[token] = bias if old is None else (
            False if old is False or bias is False else old + bias
        )  # fmt: skip

    def job_form(self) -> dict[str, Bias]:
        """As ``TextParams.logit_bias`` has it (pieces resolved first)."""
        return {str(t): b for t, b in self.ids.items()}


def _bias(value: object) -> Bias:
    if value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError("a logit bias is a number, or false to ban the token")


def read_biases(value: list[list[Any]] | dict[str, Any] | None) -> Biases:
    """``logit_bias`` in any of llama.cpp's forms; raises ValueError on a malformed one."""
    out = Biases()
    if value is None:
        return out
    if len(value) > MAX_BIASES:
        raise ValueError(f"logit_bias has at most {MAX_BIASES} entries")
    pairs = list(value.items()) if isinstance(value, dict) else value
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError("logit_bias entries are [token, bias] pairs")
        token, bias = pair[0], _bias(pair[1])
        if isinstance(value, dict) and _DECIMAL.fullmatch(token):
            out.add(int(token), bias)  # an object's decimal keys are ids (llama.cpp's strtol)
        elif isinstance(token, int) and not isinstance(token, bool):
            out.add(token, bias)
        elif isinstance(token, str) and token:
            out.pieces.append((token, bias))
        else:
            raise ValueError("a logit_bias token is an id or a non-empty text piece")
    return out


class CompletionRequest(Lenient):
    """llama.cpp's completion fields (unknown ones ignored, as its server does)."""

    # llama.cpp serves its one model whatever this says: see edge.rpc.served_model.
    model: str | None = Field(default=None, max_length=256)
    prompt: Any
    n_predict: int | None = Field(default=None, ge=-1)
    max_tokens: int | None = Field(default=None, ge=-1)  # llama.cpp's fallback for n_predict
    temperature: Temperature = 0.8
    top_k: TopK = 40
    top_p: TopP = 0.95
    min_p: MinP = 0.05
    typical_p: TypicalP = 1.0
    repeat_penalty: RepeatPenalty = 1.0
    repeat_last_n: RepeatLastN = 64
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    mirostat: int = Field(default=0, ge=0, le=2)
    mirostat_tau: MirostatRate = 5.0
    mirostat_eta: MirostatRate = 0.1
    grammar: Grammar | None = None
    json_schema: Annotated[dict[str, Any] | None, SchemaDepth] = None
    seed: int = Field(default=-1, ge=-1, le=SEED_MAX)
    stop: Stops = []
    ignore_eos: StrictBool = False
    logit_bias: list[list[Any]] | dict[str, float | StrictBool] | None = None
    n_probs: int = Field(default=0, ge=0, le=20)
    post_sampling_probs: StrictBool = False
    return_tokens: StrictBool = False
    response_fields: Annotated[
        list[Annotated[str, Field(max_length=256)]], Field(max_length=64)
    ] = []
    stream: StrictBool = False
    cache_prompt: StrictBool = True

    @field_validator("n_predict", "max_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("n_predict must be -1 (until a stop) or positive")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: object) -> list[Prompt]:
        prompts = split_prompts(value)
        for p in prompts:
            _check(p)
        return prompts

    def prompts(self) -> list[Prompt]:
        """The prompts, one job each (validated into a list already)."""
        prompts: list[Prompt] = self.prompt
        return prompts

    def biases(self) -> Biases:
        """``logit_bias`` read; a malformed one is a 400 naming it."""
        try:
            return read_biases(self.logit_bias)
        except ValueError as e:
            raise InvalidRequest(str(e), param="logit_bias") from None

    def asked_seed(self) -> int | None:
        """The seed asked for, or None for a random one (llama.cpp's -1 and 2**32-1)."""
        return None if self.seed in RANDOM_SEEDS else self.seed

    def predict(self) -> int:
        """``n_predict`` (or ``max_tokens``) as llama.cpp reports it: -1 until a stop."""
        asked = self.n_predict if self.n_predict is not None else self.max_tokens
        return -1 if asked is None else asked

    def token_limit(self) -> int | None:
        """``n_predict`` as a token limit: None until a stop (-1)."""
        return None if self.predict() == -1 else self.predict()

    def job_params(
        self, seed: int, prompt: str | list[int] | None = None, biases: Biases | None = None
    ) -> TextParams:
        """The job parameters for one prompt (token ids or text), generated with ``seed``.

        ``biases`` come resolved to ids; without them ``logit_bias`` must hold ids only.
        """
        if biases is None:
            biases = self.biases()
            if biases.pieces:
                raise InvalidRequest("text pieces need the tokenizer", param="logit_bias")
        if prompt is None:
            (only,) = self.prompts()
            if isinstance(only, list) and not all(_is_id(t) for t in only):
                raise InvalidRequest("a mixed prompt needs the tokenizer", param="prompt")
            prompt = only  # type: ignore[assignment]
        return TextParams(
            prompt=prompt,
            max_tokens=self.token_limit(),
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            typical_p=self.typical_p,
            repeat_penalty=self.repeat_penalty,
            repeat_last_n=self.repeat_last_n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            mirostat=self.mirostat,
            mirostat_tau=self.mirostat_tau,
            mirostat_eta=self.mirostat_eta,
            grammar=self.grammar,
            json_schema=self.json_schema,
            response_format="json_schema" if self.json_schema is not None else "text",
            seed=seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logit_bias=biases.job_form(),
            logprobs=self.n_probs > 0,
            top_logprobs=self.n_probs or None,
            cache_prompt=self.cache_prompt,
        )
