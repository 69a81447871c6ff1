"""How long a job waited before it ran: one definition for the ``started`` event, the
worker's queue-time metric and the ``queue_ms`` of the engines' ``Done`` timings."""

from __future__ import annotations

import time

from schemas.events import Done
from schemas.jobs import JobBase


def queue_ms(job: JobBase) -> float:
    """Milliseconds from the job's creation to now; never negative, since ``created_ms`` is
    the edge's clock and may be ahead of this worker's."""
    return max(0.0, time.time() * 1000 - job.created_ms)


def with_queue_ms(done: Done, ms: float) -> Done:
    """``done`` with ``ms`` as its timings' ``queue_ms``."""
    return done.model_copy(update={"timings": done.timings.model_copy(update={"queue_ms": ms})})
