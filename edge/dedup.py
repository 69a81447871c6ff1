"""Retried requests attach to the job already running instead of starting another.

LLMUnity retries any non-401 failure up to 10 times; a client that timed out
and retries must not queue a second generation of the same thing. Two keys:

* ``Idempotency-Key`` header, on any text route: the same key from the same API
  key means the same request.
* on llama.cpp's ``/completion``: an identical body from the same API key while
  the first is still in flight.

A request that goes away does not cancel a shared job at once: its cancel waits
``dedup_grace_s``, long enough for the retry to arrive and attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Cancel = Callable[[str], Awaitable[None]]


def fingerprint(key_id: str, *parts: bytes | str) -> str:
    """A digest naming one logical request of one API key."""
    h = hashlib.sha256(key_id.encode())
    for part in parts:
        h.update(b"\0")
        h.update(part if isinstance(part, bytes) else part.encode())
    return h.hexdigest()


@dataclass
class InFlight:
    """A job (or n of them) that requests with one fingerprint share."""

    ready: asyncio.Future[None]  # resolved once the first request's jobs are published
    job_ids: list[str] = field(default_factory=list)
    created_s: int = 0
    watchers: int = 1
    pending_cancel: asyncio.TimerHandle | None = field(default=None, repr=False)


class Dedup:
    """In-flight requests of this edge by fingerprint."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.entries: dict[str, InFlight] = {}
        self._cancelling: set[asyncio.Task[None]] = set()

    def join(self, fp: str) -> tuple[InFlight, bool]:
        """The entry for ``fp`` and whether it is new (this request must publish the jobs).

        No await happens between looking and reserving, so concurrent duplicates cannot
        both decide to publish.
        """
        entry = self.entries.get(fp)
        if entry is None:
            entry = self.entries[fp] = InFlight(asyncio.get_running_loop().create_future())
            entry.ready.add_done_callback(_retrieve)
            return entry, True
        if entry.pending_cancel is not None:
            entry.pending_cancel.cancel()
            entry.pending_cancel = None
        entry.watchers += 1
        log.info("a repeated request joined an in-flight one")
        return entry, False

    def published(self, entry: InFlight, job_ids: list[str], created_s: int) -> None:
        """The first request published its jobs: joiners may follow them now."""
        entry.job_ids, entry.created_s = job_ids, created_s
        entry.ready.set_result(None)

    def failed(self, fp: str, entry: InFlight, error: BaseException) -> None:
        """The first request could not publish: its joiners fail the same way."""
        if self.entries.get(fp) is entry:
            del self.entries[fp]
        if not entry.ready.done():
            if isinstance(error, Exception):
                entry.ready.set_exception(error)
            else:
                entry.ready.cancel()

    def release(self, fp: str, unfinished: list[str], cancel: Cancel) -> None:
        """One watcher left; the last one cancels what is unfinished, after the grace period."""
        entry = self.entries.get(fp)
        if entry is None:
            return
        entry.watchers -= 1
        if entry.watchers > 0:
            return
        if not unfinished:
            del self.entries[fp]
            return

        def expire() -> None:
            if self.entries.get(fp) is entry and entry.watchers == 0:
                del self.entries[fp]
                for job_id in unfinished:
                    task = asyncio.create_task(_quietly(cancel(job_id)))
                    self._cancelling.add(task)
                    task.add_done_callback(self._cancelling.discard)

        entry.pending_cancel = asyncio.get_running_loop().call_later(self.grace_s, expire)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a failure as seen even when no duplicate was waiting for it."""
    if not future.cancelled():
        future.exception()


async def _quietly(awaitable: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await awaitable
