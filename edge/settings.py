"""Edge settings: one object, built at start-up and passed inward."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field

from schemas.settings import CommonSettings


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
    keepalive_s: float = Field(default=15.0, gt=0, description="SSE ': keep-alive' interval")
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
    max_prompt_chars: int = Field(default=200_000, ge=1)
    max_tokens: int = Field(default=32_768, ge=1, description="largest max_tokens accepted")
    max_n: int = Field(default=8, ge=1, le=128, description="largest n accepted")
    worker_stale_s: float = Field(
        default=15.0, gt=0, description="a worker whose heartbeat is older than this is gone"
    )
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After sent with 503")
    dedup_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="a shared job outlives its last client this long, for retries",
    )
    dedup_completion: bool = Field(
        default=True, description="identical in-flight /completion bodies of one key share a job"
    )
