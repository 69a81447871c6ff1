"""The one exception family of headrace. Codes travel in ``error`` events.

The edge maps codes to HTTP statuses in one place; the worker runtime maps the
classes to ack, nak, term and dead-lettering in one place.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Machine-readable error codes, shared by events and HTTP error bodies."""

    INVALID_REQUEST = "invalid_request_error"
    INVALID_JOB = "invalid_job"
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    QUEUE_FULL = "queue_full"
    RATE_LIMITED = "rate_limit_exceeded"
    NO_WORKER = "no_worker"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    ENGINE_ERROR = "engine_error"
    DEAD_LETTERED = "dead_lettered"
    INTERNAL = "internal_error"


class HeadraceError(Exception):
    """Root of every error headrace raises on purpose.

    ``param`` names the request field at fault (OpenAI's ``error.param``); ``retryable``
    says whether the same request may succeed later: the worker runtime naks retryable
    failures instead of terminating them, and the edge sends ``Retry-After`` with them.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(
        self, message: str, *, param: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retryable is not None:  # a rebuilt error keeps what its sender said
            self.retryable = retryable


class InvalidRequest(HeadraceError):
    """The request or job is malformed or out of bounds."""

    code = ErrorCode.INVALID_REQUEST


class ModelNotFound(HeadraceError):
    """No such model is configured anywhere."""

    code = ErrorCode.MODEL_NOT_FOUND


class ContextLengthExceeded(HeadraceError):
    """The prompt (plus requested tokens) does not fit the model's context.

    ``n_prompt_tokens`` and ``n_ctx`` say by how much, when the engine knows (llama.cpp's
    server puts both in its ``exceed_context_size_error`` body).
    """

    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        n_prompt_tokens: int | None = None,
        n_ctx: int | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx

    def detail(self) -> dict[str, int]:
        """The sizes, for error bodies and events (empty when unknown)."""
        sizes = {"n_prompt_tokens": self.n_prompt_tokens, "n_ctx": self.n_ctx}
        return {k: v for k, v in sizes.items() if v is not None}


class QueueFull(HeadraceError):
    """JetStream refused the job: the JOBS stream is at its limit (discard=new)."""

    code = ErrorCode.QUEUE_FULL
    retryable = True


class RateLimited(HeadraceError):
    """The caller's key is past one of its limits (``limit``: requests, tokens, parallel, images)."""

    code = ErrorCode.RATE_LIMITED
    retryable = True

    def __init__(self, message: str, *, limit: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


class NoWorker(HeadraceError):
    """No live worker serves the model."""

    code = ErrorCode.NO_WORKER
    retryable = True


class Unavailable(HeadraceError):
    """NATS or JetStream could not be reached in time."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(HeadraceError):
    """The job's deadline passed before it finished."""

    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True


class EngineError(HeadraceError):
    """The engine failed to run the job."""

    code = ErrorCode.ENGINE_ERROR


class Retry(EngineError):
    """Raised by an engine: this attempt failed but another may succeed (nak with delay)."""

    retryable = True

    def __init__(self, message: str, *, delay_s: float = 1.0) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class Poison(HeadraceError):
    """The job message can never be processed: dead-letter it and stop redelivery."""

    code = ErrorCode.INVALID_JOB


class DeadLettered(HeadraceError):
    """The job failed on every delivery and was moved to the DLQ."""

    code = ErrorCode.DEAD_LETTERED


_BY_CODE: dict[ErrorCode, type[HeadraceError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ModelNotFound,
        ContextLengthExceeded,
        QueueFull,
        RateLimited,
        NoWorker,
        Unavailable,
        DeadlineExceeded,
        EngineError,
        Poison,
        DeadLettered,
    )
}


def error_from_code(
    code: str,
    message: str,
    *,
    param: str | None = None,
    retryable: bool | None = None,
    detail: dict[str, object] | None = None,
) -> HeadraceError:
    """Rebuild the exception an ``error`` event or RPC reply describes, with its detail
    (unknown codes become internal errors; ``detail`` holds a class's own fields)."""
    try:
        cls = _BY_CODE.get(ErrorCode(code), HeadraceError)
    except ValueError:
        cls = HeadraceError
    error = cls(message)
    error.param = param
    if retryable is not None:
        error.retryable = retryable
    if isinstance(error, ContextLengthExceeded) and detail:
        n_prompt, n_ctx = detail.get("n_prompt_tokens"), detail.get("n_ctx")
        error.n_prompt_tokens = n_prompt if isinstance(n_prompt, int) else None
        error.n_ctx = n_ctx if isinstance(n_ctx, int) else None
    return error
