"""Result events: every message on a job's reply subject is one of these."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.errors import HeadraceError, error_from_code
from schemas.jobs import Contract

FinishReason = Literal["stop", "length", "cancelled"]


class Usage(Contract):
    """Token counts, from the tokenizer, never estimated."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Timings(Contract):
    """Where the time of a job went, in llama.cpp's vocabulary (milliseconds)."""

    queue_ms: float = 0.0
    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    cache_n: int = 0  # prompt tokens whose KV cells were reused (not in prompt_n)


class TopLogprob(Contract):
    """One alternative token and its log-probability."""

    token: str
    logprob: float


class TokenLogprob(Contract):
    """The chosen token's log-probability with the top alternatives."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = []


class ImageRef(Contract):
    """An image result: inline base64 PNG when small, else an object in the ``images`` store."""

    width: int
    height: int
    seed: int
    b64_png: str | None = None
    object: str | None = None


class Started(Contract):
    """The worker took the job."""

    type: Literal["started"] = "started"
    worker: str
    region: str
    attempt: int = Field(ge=1)
    queue_ms: float = Field(ge=0)


class Delta(Contract):
    """Generated text: one or more tokens, coalesced when they come faster than they can be sent."""

    type: Literal["delta"] = "delta"
    text: str
    tokens: int = Field(ge=0)
    logprobs: list[TokenLogprob] | None = None
    # The ids of the ``tokens`` tokens, from engines with a tokenizer: a continuation
    # (``TextJob.resume``) replays them, and llama.cpp's API shows them.
    token_ids: list[int] | None = None


class Progress(Contract):
    """A diffusion step finished."""

    type: Literal["progress"] = "progress"
    step: int = Field(ge=0)
    total: int = Field(ge=1)
    eta_s: float | None = None
    preview: str | None = None


class Done(Contract):
    """The job finished (also when it was cancelled)."""

    type: Literal["done"] = "done"
    finish_reason: FinishReason
    usage: Usage = Usage()
    timings: Timings = Timings()
    seed: int | None = None
    images: list[ImageRef] = []
    # The stop string that ended the text, when one did (finish_reason "stop").
    stop_word: str | None = None


class Error(Contract):
    """The job failed; ``code`` is an ``ErrorCode`` value, ``param`` the field at fault."""

    type: Literal["error"] = "error"
    code: str
    message: str
    param: str | None = None
    retryable: bool = False

    @classmethod
    def of(cls, e: HeadraceError, *, retryable: bool | None = None) -> Error:
        """The event that reports ``e`` (``retryable`` overrides the error's own hint)."""
        hint = e.retryable if retryable is None else retryable
        return cls(code=e.code, message=e.message, param=e.param, retryable=hint)

    def exception(self) -> HeadraceError:
        """The error this event reports, as the class its code names, detail kept."""
        return error_from_code(self.code, self.message, param=self.param, retryable=self.retryable)


Event = Annotated[Started | Delta | Progress | Done | Error, Field(discriminator="type")]
EngineEvent = Delta | Progress | Done
