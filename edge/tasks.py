"""Image tasks in flight on this edge, per API key: what A1111's progress and interrupt act on.

AUTOMATIC1111 keeps one global "current job", so one user's interrupt stops another's
generation. Here a task belongs to the key that submitted it: ``/sdapi/v1/progress``
reports the caller's own most recent task, and ``/sdapi/v1/interrupt`` stops only the
caller's tasks, on every edge (edges tell each other over ``interrupt.<key id>``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.client import JobClient
from schemas.events import Progress
from schemas.subjects import INTERRUPT_ALL, interrupt_subject

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One image request: its job, and how far it has come."""

    id: str  # the client's force_task_id, else the job id
    key_id: str
    job_id: str
    started: float = field(default_factory=time.time)
    step: int = 0
    total: int = 1
    eta_s: float | None = None
    preview: str | None = None
    queued: bool = True
    interrupted: bool = False
    skipped: bool = False

    def advance(self, p: Progress) -> None:
        """Take a progress event (the worker reports steps over every image of the job)."""
        self.queued = False
        self.step, self.total, self.eta_s = p.step, p.total, p.eta_s
        if p.preview is not None:
            self.preview = p.preview

    @property
    def fraction(self) -> float:
        """Progress between 0 and 1."""
        return min(1.0, self.step / self.total) if self.total else 0.0


class TaskBook:
    """Tasks of every key on this edge, and the interrupt subject they listen to."""

    def __init__(self) -> None:
        self._tasks: dict[str, list[Task]] = {}  # key id -> tasks, oldest first
        self._jobs: JobClient | None = None
        self._sub: Subscription | None = None

    async def start(self, jobs: JobClient) -> None:
        """Listen for interrupts sent to other edges."""
        self._jobs = jobs
        self._sub = await jobs.nc.subscribe(INTERRUPT_ALL, cb=self._on_interrupt)

    async def stop(self) -> None:
        """Stop listening."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    def open(self, task: Task) -> None:
        """A task started."""
        self._tasks.setdefault(task.key_id, []).append(task)

    def close(self, task: Task) -> None:
        """A task ended (finished, failed or abandoned)."""
        tasks = self._tasks.get(task.key_id, [])
        with contextlib.suppress(ValueError):
            tasks.remove(task)
        if not tasks:
            self._tasks.pop(task.key_id, None)

    def current(self, key_id: str) -> Task | None:
        """The key's most recent task still running here."""
        tasks = self._tasks.get(key_id)
        return tasks[-1] if tasks else None

    def find(self, key_id: str, task_id: str) -> Task | None:
        """The key's task called ``task_id`` (its force_task_id or job id), if running here."""
        return next((t for t in self._tasks.get(key_id, []) if task_id in (t.id, t.job_id)), None)

    async def interrupt(self, key_id: str) -> int:
        """Stop the key's tasks here and ask the other edges to stop theirs; returns how many here."""
        stopped = await self._cancel_local(key_id)
        if self._jobs is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._jobs.nc.publish(interrupt_subject(key_id), b"")
        return stopped

    async def skip(self, key_id: str) -> Task | None:
        """Stop the key's current task (the one progress reports) and no other; returns it.

        A1111's skip ends the image being made and goes on with the next of its batch; a
        headrace task is one job for the whole batch, so a skip ends it as an interrupt does,
        but only the most recent task of the key, and only on this edge.
        """
        task = self.current(key_id)
        if task is None or task.interrupted:
            return None
        task.skipped = task.interrupted = True
        if self._jobs is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._jobs.cancel(task.job_id)
        log.info("skipped task %s of %s", task.id, key_id)
        return task

    async def _on_interrupt(self, msg: Msg) -> None:
        await self._cancel_local(msg.subject.rpartition(".")[2])

    async def _cancel_local(self, key_id: str) -> int:
        tasks = [t for t in self._tasks.get(key_id, []) if not t.interrupted]
        for task in tasks:
            task.interrupted = True
            if self._jobs is not None:
                with contextlib.suppress(nats.errors.Error):
                    await self._jobs.cancel(task.job_id)
        if tasks:
            log.info("interrupted %d task(s) of %s", len(tasks), key_id)
        return len(tasks)
