"""Result events: every message on a job's reply subject is one of these."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.errors import ContextLengthExceeded, HeadraceError, error_from_code
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
    """One alternative token and its log-probability (``id``: its token id, when known)."""

    token: str
    logprob: float
    id: int | None = None


class TokenLogprob(Contract):
    """The chosen token's log-probability with the top alternatives."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = []
    id: int | None = None


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
    # While it holds the job the worker beats on ``alive.[<user>.]<job id>`` every
    # ``beat_ms``: a follower that hears nothing for a few beats hands the job over
    # (``schemas.failover``). None: a worker that does not beat (nobody hands over).
    beat_ms: int | None = Field(default=None, ge=1)
    # A continuation: the event (``attempt-seq``) it goes on from, and how many
    # characters and tokens were delivered up to there.
    resumed_after: str | None = None
    resumed_chars: int = Field(default=0, ge=0)
    resumed_tokens: int = Field(default=0, ge=0)
    # The job message's sequence in JOBS: a follower that did not publish the job reads
    # its parameters there to hand it over.
    job_seq: int | None = Field(default=None, ge=1)


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


class Embeddings(Contract):
    """Vectors of an embedding job's inputs ``index``, ``index + 1`` ...: each one is
    ``dims`` little-endian float32 values in base64 (OpenAI's ``encoding_format: base64``).

    A job sends them in pieces (one per evaluated batch, each well under a NATS message),
    then ``done`` with the prompt tokens in ``usage``. A redelivered job sends them again;
    a reader keys them by index.
    """

    type: Literal["embeddings"] = "embeddings"
    index: int = Field(ge=0)
    dims: int = Field(ge=1)
    vectors: list[str]


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
    """The job failed; ``code`` is an ``ErrorCode`` value, ``param`` the field at fault.

    A context overflow also carries ``n_prompt_tokens`` and ``n_ctx`` (extra fields, as
    ``Contract`` keeps them: older readers ignore them).
    """

    type: Literal["error"] = "error"
    code: str
    message: str
    param: str | None = None
    retryable: bool = False

    @classmethod
    def of(cls, e: HeadraceError, *, retryable: bool | None = None) -> Error:
        """The event that reports ``e`` (``retryable`` overrides the error's own hint)."""
        hint = e.retryable if retryable is None else retryable
        detail = e.detail() if isinstance(e, ContextLengthExceeded) else {}
        return cls(code=e.code, message=e.message, param=e.param, retryable=hint, **detail)

    def exception(self) -> HeadraceError:
        """The error this event reports, as the class its code names, detail kept."""
        return error_from_code(
            self.code,
            self.message,
            param=self.param,
            retryable=self.retryable,
            detail=self.model_extra,
        )


Event = Annotated[
    Started | Delta | Progress | Embeddings | Done | Error, Field(discriminator="type")
]
EngineEvent = Delta | Progress | Embeddings | Done
