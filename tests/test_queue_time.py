"""Queue time: one definition for the started event, the metrics and Done's timings."""

from __future__ import annotations

import time

from schemas.events import Done, Timings
from tests.conftest import text_job
from workers.queue_time import queue_ms, with_queue_ms


def test_queue_ms_is_the_time_since_the_job_was_created() -> None:
    created = int(time.time() * 1000) - 250
    waited = queue_ms(text_job().model_copy(update={"created_ms": created}))
    assert 250 <= waited < 250 + 5_000


def test_a_job_created_ahead_of_this_clock_waited_zero() -> None:
    ahead = int(time.time() * 1000) + 60_000  # the edge's clock runs a minute fast
    assert queue_ms(text_job().model_copy(update={"created_ms": ahead})) == 0.0


def test_with_queue_ms_sets_only_queue_ms() -> None:
    done = Done(finish_reason="stop", seed=1, timings=Timings(prompt_n=3, predicted_ms=12.5))
    stamped = with_queue_ms(done, 40.0)
    assert stamped.timings == Timings(queue_ms=40.0, prompt_n=3, predicted_ms=12.5)
    assert stamped.model_copy(update={"timings": done.timings}) == done
    assert done.timings.queue_ms == 0.0  # the original is left as it was
