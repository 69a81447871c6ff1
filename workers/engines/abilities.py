"""What an engine may do beyond running jobs: small Protocols the runtime checks once.

The core ``Engine`` (``base.py``) is what every engine must have. An ability
here is optional: an engine has it by having its method, and the runtime looks
for each one once, when it is built, rather than asking the engine at every
call. A new ability (``Embeds`` was the last) is one more Protocol here and one
more check in ``Runtime.__init__``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator
from typing import Any, Protocol, runtime_checkable

from schemas.events import EngineEvent
from schemas.jobs import EmbedJob


@runtime_checkable
class AnswersRpc(Protocol):
    """Answers request/reply operations (``rpc.llm.<model>.<op>``: tokenize, props ...)."""

    async def rpc(self, model: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Answer one operation for a model; bad input raises a ``HeadraceError``."""
        ...


@runtime_checkable
class ReportsGpuMemory(Protocol):
    """Tells how much GPU memory it holds (engines on torch), for the worker's metrics."""

    def gpu_memory_bytes(self) -> int | None:
        """Bytes of GPU memory held; None when it runs on no GPU."""
        ...


@runtime_checkable
class Embeds(Protocol):
    """Computes embedding jobs (``EmbedJob``, on the text queue ``jobs.llm.<model>``).

    ``embed`` yields ``Embeddings`` events (the vectors, by input index) and ends with one
    ``Done`` whose usage counts the prompt tokens; cancel and errors as ``Engine.run``.
    """

    def embed(self, job: EmbedJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        """Compute one job's vectors."""
        ...
