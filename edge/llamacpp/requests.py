"""``POST /completion`` as llama.cpp's server takes it, with llama.cpp's defaults."""

from __future__ import annotations

from typing import Annotated, Any

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
from schemas.jobs import SEED_MAX, SchemaDepth, Stops, TextParams

# llama.cpp treats these seeds as "pick one at random".
RANDOM_SEEDS = {-1, 0xFFFFFFFF}


class CompletionRequest(Lenient):
    """llama.cpp's completion fields (unknown ones ignored, as its server does)."""

    model: str | None = Field(default=None, max_length=256)
    prompt: str | list[int]
    n_predict: int = Field(default=-1, ge=-1)
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
    stream: StrictBool = False
    cache_prompt: StrictBool = True

    @field_validator("n_predict")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("n_predict must be -1 (until a stop) or positive")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids are not negative")
        return value

    def biases(self) -> dict[str, float]:
        """``logit_bias`` as token id -> bias; ``false`` means never (llama.cpp's -inf)."""
        pairs = (
            self.logit_bias.items()
            if isinstance(self.logit_bias, dict)
            else (self.logit_bias or [])
        )
        out = {}
        for pair in pairs:
            token, bias = (pair[0], pair[1]) if len(pair) == 2 else (None, None)
            if not isinstance(token, int | str) or not isinstance(bias, int | float | bool):
                raise ValueError("logit_bias entries are [token, bias] pairs")
            out[str(token)] = -100.0 if bias is False else float(bias)
        return out

    def asked_seed(self) -> int | None:
        """The seed asked for, or None for a random one (llama.cpp's -1 and 2**32-1)."""
        return None if self.seed in RANDOM_SEEDS else self.seed

    def token_limit(self) -> int | None:
        """``n_predict`` as a token limit: None until a stop (-1)."""
        return None if self.n_predict == -1 else self.n_predict

    def job_params(self, seed: int) -> TextParams:
        """The job parameters, generated with ``seed``; a malformed ``logit_bias`` is a 400."""
        try:
            biases = self.biases()
        except ValueError as e:
            raise InvalidRequest(str(e), param="logit_bias") from None
        return TextParams(
            prompt=self.prompt,
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
            logit_bias=biases,
            logprobs=self.n_probs > 0,
            top_logprobs=self.n_probs or None,
            cache_prompt=self.cache_prompt,
        )
