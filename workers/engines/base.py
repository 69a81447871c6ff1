"""What an engine is: the runtime drives any object with this shape."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Protocol, TypeVar

from schemas.errors import ModelNotFound
from schemas.events import EngineEvent
from schemas.fleet import ModelInfo
from schemas.jobs import ImageJob, TextJob
from schemas.subjects import JobKind, model_slug

JobT = TypeVar("JobT", TextJob, ImageJob, contravariant=True)


class _Named(Protocol):
    @property
    def id(self) -> str: ...


C = TypeVar("C", bound=_Named)
M = TypeVar("M")


class Engine(Protocol[JobT]):
    """Runs jobs of one kind for the models it has loaded.

    ``run`` yields ``Delta``/``Progress`` events and ends with exactly one ``Done``.
    It checks ``cancel`` between tokens or steps and, once set, ends with
    ``Done(finish_reason="cancelled")``. It raises ``Retry`` for failures another
    attempt may get past and another ``HeadraceError`` for permanent ones; the
    runtime alone decides ack, nak, term and dead-lettering.

    Anything more (request/reply operations, GPU memory) is an optional ability
    in ``abilities``, which the runtime checks for once.
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

    async def close(self) -> None:
        """Release models and threads."""
        ...


TextEngine = Engine[TextJob]
ImageEngine = Engine[ImageJob]


def by_id(configs: Sequence[C], engine: str) -> dict[str, C]:
    """An engine's model configs by id: at least one, ids unique."""
    if not configs:
        raise ValueError(f"the {engine} engine needs at least one model")
    out = {c.id: c for c in configs}
    if len(out) != len(configs):
        raise ValueError("model ids must be unique")
    return out


def loaded_model(models: Mapping[str, M], model_id: str) -> tuple[str, M]:
    """The loaded model a job or request names, by id or by the id's subject slug (jobs
    arrive on ``jobs.<kind>.<slug>``); ModelNotFound when this engine does not serve it."""
    if model_id not in models:
        with contextlib.suppress(ValueError):  # no subject-safe character: no slug either
            slug = model_slug(model_id)
            model_id = next((m for m in models if model_slug(m) == slug), model_id)
    model = models.get(model_id)
    if model is None:
        raise ModelNotFound(
            f"model {model_id[:256]!r} is not served here (serving {', '.join(models)})"
        )
    return model_id, model
