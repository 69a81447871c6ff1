"""The ``workers`` KV bucket: one heartbeat record per live worker."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pydantic import Field

from schemas.jobs import Contract
from schemas.subjects import JobKind

try:
    VERSION = version("headrace")
except PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0+unknown"


class ModelInfo(Contract):
    """A model a worker serves."""

    id: str
    kind: JobKind
    context_length: int | None = None
    # Text models only: it computes embeddings (``EmbedJob``); it computes nothing else.
    embeddings: bool = False
    embedding_only: bool = False
    owned_by: str = "headrace"
    created: int = 0


class WorkerInfo(Contract):
    """What a worker says about itself every heartbeat."""

    id: str
    region: str
    version: str
    models: list[ModelInfo]
    slots: int = Field(ge=1)
    busy: int = Field(ge=0)
    started_ms: int
    heartbeat_ms: int
