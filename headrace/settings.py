"""Settings of the headrace command's own processes: the local stack and provisioning."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field

from schemas.settings import CommonSettings
from schemas.topology import Limits


class ProvisionSettings(CommonSettings, Limits):
    """``headrace provision``: where NATS is and which limits to apply (HEADRACE_JOBS_MAX_MSGS ...)."""


class StackSettings(ProvisionSettings):
    """``headrace up``: ports and the data directory of the local stack."""

    data_dir: Path = Field(
        default=Path(".headrace"), description="nats and valkey keep their files here"
    )
    nats_port: int = Field(default=4222, ge=0, le=65535)
    nats_http_port: int = Field(default=8222, ge=0, le=65535)
    valkey_port: int = Field(default=6379, ge=0, le=65535)
    port: int = Field(default=8000, ge=0, le=65535, description="the edge's HTTP port")
    echo_workers: int = Field(default=1, ge=0, le=16, description="echo workers to start")
    llm_workers: int = Field(
        default=1,
        ge=0,
        le=16,
        description="llama.cpp workers on the bundled SmolLM2 (needs the llm extra)",
    )
    sd_workers: int = Field(
        default=1,
        ge=0,
        le=16,
        description="diffusers workers on the demo tiny-sd pipeline (needs the sd extra)",
    )
    api_keys: str = Field(
        default="",
        validation_alias=AliasChoices("HEADRACE_API_KEYS", "API_TOKENS", "api_keys"),
        description="keys the edge accepts; empty: generate a development key",
    )
