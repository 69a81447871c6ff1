"""Settings of the headrace command's own processes: the local stack and provisioning."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator

from schemas.settings import CommonSettings
from schemas.topology import Limits


class ProvisionSettings(CommonSettings, Limits):
    """``headrace provision``: where NATS is and which limits to apply (HEADRACE_JOBS_MAX_MSGS ...)."""

    @model_validator(mode="after")
    def _region_known(self) -> ProvisionSettings:
        """Provisioning, ``status`` and ``up`` cover every region: no region of their own
        is needed (the first stands in where one is asked for)."""
        names = self.region_names()
        if names and self.region not in names:
            self.region = names[0]
        return self


class StackSettings(ProvisionSettings):
    """``headrace up``: ports and the data directory of the local stack."""

    data_dir: Path = Field(
        default=Path(".headrace"), description="nats and valkey keep their files here"
    )
    nats_port: int = Field(
        default=4222, ge=0, le=65535, description="client port (the first node's on a cluster)"
    )
    nats_http_port: int = Field(default=8222, ge=0, le=65535)
    nats_nodes: int = Field(
        default=1,
        ge=1,
        le=5,
        description="nats-server nodes: 1, or a cluster (3 survives one node; streams at R3)",
    )
    nats_cluster_port: int = Field(
        default=6222, ge=0, le=65535, description="the first node's route port on a cluster"
    )
    nats_regions: int = Field(
        default=1,
        ge=1,
        le=8,
        description="regions: 1, or a super-cluster of this many clusters (nats_nodes each) "
        "joined by gateways, named by HEADRACE_REGIONS or r1, r2 ...",
    )
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

    @model_validator(mode="after")
    def _replicas_fit(self) -> StackSettings:
        # JetStream places each copy on a different node, and refuses a stream it cannot place.
        if self.replicas is not None and self.replicas > self.nats_nodes:
            raise ValueError(
                f"replicas ({self.replicas}) cannot exceed the nats-server nodes ({self.nats_nodes})"
            )
        return self

    def region_list(self) -> tuple[str, ...]:
        """The super-cluster's regions (empty: one region)."""
        named = self.region_names()
        if named:
            if self.nats_regions not in (1, len(named)):
                raise ValueError(
                    f"--regions {self.nats_regions} but HEADRACE_REGIONS names {len(named)}"
                )
            return named if len(named) > 1 else ()
        if self.nats_regions == 1:
            return ()
        return tuple(f"r{i}" for i in range(1, self.nats_regions + 1))

    def stream_replicas(self) -> int | None:
        """The replica count to provision: as set, else 3 (or the node count) on a cluster."""
        if self.replicas is None and self.nats_nodes > 1:
            return min(3, self.nats_nodes)
        return self.replicas
