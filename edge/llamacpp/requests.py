"""``POST /completion`` as llama.cpp's server takes it, with llama.cpp's defaults."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.jobs import MAX_STOP, MAX_STOP_CHARS, SEED_MAX

# llama.cpp treats these seeds as "pick one at random".
RANDOM_SEEDS = {-1, 0xFFFFFFFF}


class CompletionRequest(BaseModel):
    """llama.cpp's completion fields (unknown ones ignored, as its server does)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=256)
    prompt: str | list[int]
    n_predict: int = Field(default=-1, ge=-1)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_k: int = Field(default=40, ge=0, le=1000)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    typical_p: float = Field(default=1.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0, le=10.0)
    repeat_last_n: int = Field(default=64, ge=-1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    mirostat: int = Field(default=0, ge=0, le=2)
    mirostat_tau: float = Field(default=5.0, ge=0.0)
    mirostat_eta: float = Field(default=0.1, ge=0.0)
    grammar: str | None = Field(default=None, max_length=100_000)
    json_schema: dict[str, Any] | None = None
    seed: int = Field(default=-1, ge=-1, le=SEED_MAX)
    stop: Annotated[
        list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)
    ] = []
    ignore_eos: bool = False
    logit_bias: list[list[Any]] | dict[str, float | bool] | None = None
    n_probs: int = Field(default=0, ge=0, le=20)
    stream: bool = False

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
