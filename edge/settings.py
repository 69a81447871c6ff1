"""Edge settings: one object, built at start-up and passed inward."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field

from schemas.image_size import DEFAULT_MAX_INPUT_PIXELS
from schemas.settings import CommonSettings


def _unset(value: object) -> object:
    """An empty variable (``HEADRACE_DEFAULT_RPM=``) means unset."""
    return None if value == "" else value


# A per-minute or parallel limit: a positive integer, or unset (unlimited).
Limit = Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_unset)]


class EdgeSettings(CommonSettings):
    """How the HTTP edge listens, authenticates, waits and bounds requests."""

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: str = Field(
        default="",
        validation_alias=AliasChoices("HEADRACE_API_KEYS", "API_TOKENS", "api_keys"),
        description="comma-separated bearer keys (API_TOKENS is accepted as an alias)",
    )
    keys_file: Path | None = Field(default=None, description="TOML file of hashed keys")
    anonymous_key: Annotated[str | None, BeforeValidator(_unset)] = Field(
        default=None,
        description="name of the key that requests without credentials are served as "
        "(unset: every request needs a key)",
    )
    cors_origins: str = Field(
        default="",
        description="browser origins allowed by CORS, comma-separated (* for any; empty: off)",
    )
    keepalive_s: float = Field(default=15.0, gt=0, description="SSE ': keep-alive' interval")
    stream_buffer_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        description="a stream's output waiting for its client: past it the client is "
        "dropped and its jobs cancelled",
    )
    first_event_wait_s: float = Field(
        default=1.0,
        ge=0,
        description="wait this long for a job's first event before sending headers",
    )
    no_worker_wait_s: float = Field(
        default=2.0, ge=0, description="wait this long for a worker before answering 503"
    )
    deadline_s: float = Field(
        default=600.0,
        gt=0,
        description="deadline of a request (a shorter client timeout header wins)",
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_url_bytes: int = Field(
        default=64 * 1024,
        ge=8190,
        description="longest request line (method, path and query) taken in; aiohttp's own "
        "default is 8190, and what it refuses never reaches the edge's error shapes",
    )
    max_prompt_chars: int = Field(default=200_000, ge=1)
    max_tokens: int = Field(default=32_768, ge=1, description="largest max_tokens accepted")
    max_n: int = Field(default=8, ge=1, le=128, description="largest n accepted")
    worker_stale_s: float = Field(
        default=15.0, gt=0, description="a worker whose heartbeat is older than this is gone"
    )
    region_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="regions: how often each region's queue depth is read (and whether it answers)",
    )
    region_lost_s: float = Field(
        default=2.0,
        ge=0,
        description="regions: a region that has not answered this long is lost: its open "
        "jobs are placed again elsewhere",
    )
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After sent with 503")
    queue_poll_s: float = Field(
        default=5.0, gt=0, description="how often queue depth is read for /metrics"
    )
    default_model: str | None = Field(
        default=None, description="the text model of requests that name none (llama.cpp routes)"
    )
    default_image_model: str | None = Field(
        default=None,
        description="the image model of requests that name none (default: the one live image model)",
    )
    image_min_side: int = Field(default=64, ge=8, description="smallest image width or height")
    image_max_side: int = Field(default=2048, ge=8, le=4096, description="largest width or height")
    image_max_steps: int = Field(default=150, ge=1, le=150, description="most diffusion steps")
    image_max_count: int = Field(
        default=16, ge=1, le=256, description="most images per request (batch_size x n_iter, n)"
    )
    image_max_input_pixels: int = Field(
        default=DEFAULT_MAX_INPUT_PIXELS,
        ge=64 * 64,
        description="largest input image (img2img), in pixels as its header declares them",
    )
    openai_image_steps: int = Field(
        default=20, ge=1, le=150, description="diffusion steps of /v1/images/generations"
    )
    dedup_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="a shared job outlives its last client this long, for retries",
    )
    dedup_completion: bool = Field(
        default=True, description="identical in-flight /completion bodies of one key share a job"
    )
    redis_url: str = Field(
        default="",
        description="Redis or Valkey holding the rate-limit buckets (needed once a key has limits)",
    )
    default_rpm: Limit = None
    default_tpm: Limit = None
    default_max_parallel: Limit = None
    ratelimit_fail: Literal["open", "closed"] = Field(
        default="open",
        description="while Redis is unreachable: serve (open) or answer 503 (closed)",
    )
    redis_timeout_s: float = Field(
        default=0.2, gt=0, description="the longest any Redis call of the rate limiter may take"
    )
    ratelimit_breaker_s: float = Field(
        default=2.0, gt=0, description="after Redis failed, skip it this long before trying again"
    )
    ratelimit_lease_ttl_s: float = Field(
        default=30.0,
        gt=0,
        description="a parallel-request lease expires this long after its edge stopped renewing it",
    )
    ratelimit_completion_estimate: int = Field(
        default=256,
        ge=0,
        description="completion tokens assumed at admission when a request sets no max_tokens",
    )
