"""Settings every headrace process shares, read once from flags and ``HEADRACE_*`` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Base of the per-process settings classes (edge, worker, stack)."""

    model_config = SettingsConfigDict(env_prefix="HEADRACE_", extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated"
    )
    region: str = Field(default="local", min_length=1, description="region this process runs in")
    replicas: int | None = Field(
        default=None,
        ge=1,
        le=5,
        description="copies of each stream and bucket this process re-creates when a server "
        "lacks them (3 on a 3-node cluster); None: 1",
    )
    log_level: str = Field(default="INFO", description="logging level")

    def nats_servers(self) -> list[str]:
        """The NATS URLs as a list, for ``nats.connect(servers=...)``."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]
