"""What an engine is: the runtime drives any object with this shape."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator
from typing import Any, Protocol, TypeVar

from schemas.events import EngineEvent
from schemas.jobs import ImageJob, TextJob
from schemas.registry import ModelInfo
from schemas.subjects import JobKind

JobT = TypeVar("JobT", TextJob, ImageJob, contravariant=True)


class Engine(Protocol[JobT]):
    """Runs jobs of one kind for the models it has loaded.

    ``run`` yields ``Delta``/``Progress`` events and ends with exactly one ``Done``.
    It checks ``cancel`` between tokens or steps and, once set, ends with
    ``Done(finish_reason="cancelled")``. It raises ``Retry`` for failures another
    attempt may get past and another ``HeadraceError`` for permanent ones; the
    runtime alone decides ack, nak, term and dead-lettering.
    """

    kind: JobKind

    def models(self) -> list[ModelInfo]:
        """The models this engine serves."""
        ...

    async def start(self) -> None:
        """Load models (showing progress); called once before any job."""
        ...

    def run(self, job: JobT, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        """Run one job."""
        ...

    async def rpc(self, model: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Answer a request/reply operation (tokenize, props ...) for a model."""
        ...

    async def close(self) -> None:
        """Release models and threads."""
        ...


TextEngine = Engine[TextJob]
ImageEngine = Engine[ImageJob]
