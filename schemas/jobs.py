"""The job envelope: what the edge (or any NATS client) publishes to ``jobs.<kind>.<model>``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Bounds every producer must respect; the edge rejects requests outside them
# before anything is enqueued, and a worker treats a job outside them as poison.
MAX_PROMPT_CHARS = 1_000_000
MAX_MESSAGES = 1024
MAX_STOP = 8
MAX_STOP_CHARS = 256
MAX_TOKENS_LIMIT = 1_000_000
SEED_MAX = 2**32 - 1
MAX_INIT_IMAGES = 16
MAX_INLINE_IMAGE_CHARS = 8 * 1024 * 1024  # an inline image must also fit one NATS message
# Levels of objects and arrays in a JSON schema (``{"type": "string"}`` is 1; each nested
# ``{"properties": {"x": ...}}`` adds 2). Real schemas stay far below it; what it guards is
# the job itself: orjson refuses to write more than 254 levels, and the envelope adds 2.
MAX_SCHEMA_DEPTH = 64


def json_depth(value: object, limit: int) -> int:
    """How deeply dicts and lists nest in ``value`` (a scalar is 0), counted up to ``limit + 1``.

    Level by level rather than recursively: a hostile body may nest a thousand levels.
    """
    depth, level = 0, [value]
    while depth <= limit:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def _shallow_schema(value: Any) -> Any:
    if isinstance(value, dict) and json_depth(value, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"a JSON schema may nest at most {MAX_SCHEMA_DEPTH} levels deep")
    return value


# On a field that holds a JSON schema (alone or in a union): at most MAX_SCHEMA_DEPTH levels.
SchemaDepth = AfterValidator(_shallow_schema)


class Contract(BaseModel):
    """Base of the envelope, event and registry models: extra fields are kept, so a newer
    producer does not break an older reader."""

    # Forward-compatible on purpose: what these models carry (ids, deadlines, usage, timings)
    # is metadata a reader that does not know a new field can safely ignore; it never changes
    # what a job generates. Job parameters are the opposite: see ``Params``.
    model_config = ConfigDict(extra="allow", frozen=True)


class Params(BaseModel):
    """Base of job parameters and the values inside them: an unknown field is a validation
    error, so a worker treats the job as poison."""

    # A parameter decides what is generated: a misspelt key (``max_token``) or one newer than
    # the worker must fail the job, not run it quietly with a default (STYLE.md 12). So a new
    # parameter reaches workers before any producer sends it.
    model_config = ConfigDict(extra="forbid", frozen=True)


# The stop sequences a text job (and the llama.cpp and Ollama APIs) accept.
Stops = Annotated[
    list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)
]


class ChatMessage(Params):
    """One chat turn; content parts are flattened to text by the producer."""

    role: str = Field(min_length=1, max_length=64)
    content: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    name: str | None = None


class TextParams(Params):
    """Generation parameters of a text job, with every sampling value concrete."""

    prompt: str | list[int] | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    typical_p: float = Field(default=1.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0)
    repeat_last_n: int = Field(default=64, ge=-1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    mirostat: Literal[0, 1, 2] = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = Field(ge=0, le=SEED_MAX)
    stop: Stops = []
    logit_bias: dict[str, float] = {}
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    grammar: str | None = None
    json_schema: Annotated[dict[str, Any] | None, SchemaDepth] = None
    response_format: Literal["text", "json_object", "json_schema"] = "text"
    ignore_eos: bool = False
    # Reuse the KV cells of a prefix this worker holds (llama.cpp's cache_prompt): faster, but
    # the logits may differ in their last bits from evaluating the whole prompt.
    cache_prompt: bool = True


class ImageInput(Params):
    """An input image (img2img): inline base64 PNG/JPEG/WebP when small, else an object in the
    ``images`` store. The worker fetches objects before the engine sees the job."""

    b64: str | None = Field(default=None, max_length=MAX_INLINE_IMAGE_CHARS)
    object: str | None = Field(default=None, max_length=256)


class ImageParams(Params):
    """Parameters of an image job, A1111-shaped, with a concrete seed.

    ``sampler`` is a name from ``schemas.samplers.SAMPLERS`` (a Karras schedule folded in);
    image ``i`` of the job uses seed ``seed + i``; ``preview_every`` k > 0 asks for a
    low-resolution preview with every k-th progress event.
    """

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = ""
    steps: int = Field(default=20, ge=1, le=150)
    cfg_scale: float = Field(default=7.0, ge=0.0, le=30.0)
    width: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    height: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    seed: int = Field(ge=0, le=SEED_MAX)
    sampler: str = "Euler"
    batch_size: int = Field(default=1, ge=1, le=16)
    n_iter: int = Field(default=1, ge=1, le=16)
    denoising_strength: float = Field(default=0.75, ge=0.0, le=1.0)
    init_images: Annotated[list[ImageInput], Field(max_length=MAX_INIT_IMAGES)] = []
    preview_every: int = Field(default=0, ge=0)


class JobBase(Contract):
    """Fields every job carries."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{16,64}$")
    model: str = Field(min_length=1, max_length=256)
    created_ms: int = Field(ge=0)
    deadline_ms: int | None = Field(default=None, ge=0)
    stream: bool = True


class Resume(Params):
    """Where a continued text job picks up: what earlier attempts already delivered.

    ``token_ids`` are the tokens of every delivered ``Delta`` in order and ``text``
    the text those deltas carried (it can be shorter than the tokens' text: a
    stop-string holdback may have kept a tail back). The engine evaluates the
    prompt followed by ``token_ids``, counts them against ``max_tokens``, and
    sends only text after ``text``: the client's stream goes on with nothing
    repeated and nothing missing, whatever the hardware of either worker.
    """

    token_ids: Annotated[list[int], Field(max_length=MAX_TOKENS_LIMIT)]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class TextJob(JobBase):
    """A text generation job (``jobs.llm.<model>``)."""

    kind: Literal["llm"] = "llm"
    params: TextParams
    resume: Resume | None = None


class ImageJob(JobBase):
    """An image generation job (``jobs.sd.<model>``)."""

    kind: Literal["sd"] = "sd"
    params: ImageParams


Job = Annotated[TextJob | ImageJob, Field(discriminator="kind")]

_ID = r"[A-Za-z0-9_-]{16,64}"


class JobHeaders(BaseModel):
    """The headers of a job message: its JSON Schema tells NATS-native clients what to send
    (``schemas.subjects.Header`` spells the names)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    msg_id: str = Field(
        alias="Nats-Msg-Id",
        pattern=f"^{_ID}$",
        description="the job's id: JetStream drops a copy published again within the "
        "JOBS stream's duplicate window",
    )
    reply: str = Field(
        alias="Headrace-Reply",
        pattern=rf"^results\.([a-z][a-z0-9_-]{{0,31}}\.)?{_ID}$",
        description="where the worker publishes the job's events: results.<job id> (the "
        "edge), or results.<user>.<job id> for a NATS-native client, where <user> is its NATS "
        "user: its permissions let it read results.<user>.> and nothing else. The last token "
        "is the job's id; a worker dead-letters a job whose reply has any other shape",
    )
    deadline: str | None = Field(
        default=None,
        alias="Headrace-Deadline",
        pattern=r"^[0-9]+$",
        description="milliseconds since the epoch after which the job is not worth running",
    )
    request_id: str | None = Field(
        default=None, alias="Headrace-Request-Id", description="for log lines"
    )
    traceparent: str | None = Field(default=None, description="W3C trace context")
