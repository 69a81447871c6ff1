"""Which jobs were asked to stop: running ones get their token set, queued ones are remembered."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class CancelBook:
    """Cancel tokens of running jobs, and a bounded memory of cancels for jobs not yet fetched.

    ``cancel.<id>`` is core NATS: every worker hears every cancel, so a job
    cancelled while it waits in the queue is skipped by whichever worker fetches it.
    """

    def __init__(self, memory_s: float = 600.0, max_remembered: int = 100_000) -> None:
        self.memory_s = memory_s
        self.max_remembered = max_remembered
        self._running: dict[str, threading.Event] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()

    def cancel(self, job_id: str) -> bool:
        """Record a cancel; returns True when the job runs here (and is now told to stop)."""
        now = time.monotonic()
        self._cancelled[job_id] = now
        self._cancelled.move_to_end(job_id)
        while self._cancelled and (
            len(self._cancelled) > self.max_remembered
            or next(iter(self._cancelled.values())) < now - self.memory_s
        ):
            self._cancelled.popitem(last=False)
        token = self._running.get(job_id)
        if token is None:
            return False
        token.set()
        return True

    def was_cancelled(self, job_id: str) -> bool:
        """True when a cancel for this job arrived within the memory window."""
        at = self._cancelled.get(job_id)
        return at is not None and at >= time.monotonic() - self.memory_s

    def track(self, job_id: str) -> threading.Event:
        """A fresh token for a job starting here."""
        token = threading.Event()
        self._running[job_id] = token
        return token

    def forget(self, job_id: str) -> None:
        """The job no longer runs here."""
        self._running.pop(job_id, None)
