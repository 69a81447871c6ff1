"""Settings every headrace process shares, read once from flags and ``HEADRACE_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.subjects import parse_regions


class CommonSettings(BaseSettings):
    """Base of the per-process settings classes (edge, worker, stack)."""

    model_config = SettingsConfigDict(env_prefix="HEADRACE_", extra="ignore")

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated"
    )
    nats_user: str | None = Field(default=None, description="NATS user (none: anonymous)")
    nats_password: SecretStr | None = Field(default=None, description="the NATS user's password")
    nats_creds: Path | None = Field(
        default=None,
        description="a <user>.env file (HEADRACE_NATS_USER=, HEADRACE_NATS_PASSWORD=) as "
        "`headrace auth` writes it; user and password given directly win",
    )
    nats_tls_ca: Path | None = Field(
        default=None, description="CA certificate(s) that verify the NATS server (PEM)"
    )
    nats_tls_cert: Path | None = Field(
        default=None, description="client certificate for servers that verify clients (PEM)"
    )
    nats_tls_key: Path | None = Field(default=None, description="the client certificate's key")
    region: str = Field(default="local", min_length=1, description="region this process runs in")
    regions: str = Field(
        default="",
        description="the regions of a NATS super-cluster, comma-separated, the first holding "
        "the shared buckets (empty: one region, the classic stream names)",
    )
    replicas: int | None = Field(
        default=None,
        ge=1,
        le=5,
        description="copies of each stream and bucket this process re-creates when a server "
        "lacks them (3 on a 3-node cluster); None: 1",
    )
    log_level: str = Field(default="INFO", description="logging level")

    @model_validator(mode="after")
    def _read_creds(self) -> Self:
        """Fill user and password from ``nats_creds`` once, at start-up."""
        if self.nats_creds is None or (self.nats_user and self.nats_password):
            return self
        values = _env_file(self.nats_creds)
        self.nats_user = self.nats_user or values.get("HEADRACE_NATS_USER")
        if self.nats_password is None and "HEADRACE_NATS_PASSWORD" in values:
            self.nats_password = SecretStr(values["HEADRACE_NATS_PASSWORD"])
        if not self.nats_user or self.nats_password is None:
            raise ValueError(f"{self.nats_creds} names no HEADRACE_NATS_USER and PASSWORD")
        return self

    @model_validator(mode="after")
    def _region_known(self) -> Self:
        """In a super-cluster, this process's region must be one of its regions."""
        names = parse_regions(self.regions)
        if names and self.region not in names:
            raise ValueError(
                f"region {self.region!r} is not one of the regions {', '.join(names)} "
                "(HEADRACE_REGION must name one of HEADRACE_REGIONS)"
            )
        return self

    def region_names(self) -> tuple[str, ...]:
        """The super-cluster's regions (empty: one region)."""
        return parse_regions(self.regions)

    @property
    def scope(self) -> str | None:
        """This process's region for stream and subject names; None outside a super-cluster."""
        return self.region if self.regions.strip() else None

    @property
    def home(self) -> str | None:
        """The region that holds the shared buckets (options, images); None: one region."""
        names = self.region_names()
        return names[0] if names else None

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("nats_tls_cert and nats_tls_key go together")
        return self

    def nats_servers(self) -> list[str]:
        """The NATS URLs as a list, for ``nats.connect(servers=...)``."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


def _env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (blank lines and ``#`` comments skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: a line is not KEY=VALUE")
            out[key.strip()] = value.strip()
    return out
