"""The submitting client: ordering, duplicates, gap filling from RESULTS, and resuming."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from schemas.client import JobClient, Position
from schemas.codec import encode
from schemas.events import Delta, Done, Started
from schemas.subjects import Header, new_job_id, results_subject
from tests.conftest import collect


async def emit(nc: NATS, job_id: str, attempt: int, seq: int, event: object) -> None:
    """Publish an event as a worker would (core NATS; the RESULTS stream captures it)."""
    headers = {Header.ATTEMPT: str(attempt), Header.SEQ: str(seq), Header.JOB: job_id}
    await nc.publish(results_subject(job_id), encode(event), headers=headers)  # type: ignore[arg-type]
    await nc.flush()


def started(attempt: int = 1) -> Started:
    return Started(worker="w", region="r", attempt=attempt, queue_ms=0)


def delta(text: str) -> Delta:
    return Delta(text=text, tokens=1)


async def test_missed_events_are_filled_from_the_results_stream(
    client: JobClient, nc: NATS
) -> None:
    job_id = new_job_id()
    await emit(nc, job_id, 1, 1, started())
    await emit(nc, job_id, 1, 2, delta("a"))  # nobody is listening yet: only RESULTS has these
    stream = await client.watch(job_id)
    await emit(nc, job_id, 1, 3, delta("b"))
    await emit(nc, job_id, 1, 3, delta("b"))  # a duplicate
    await emit(nc, job_id, 1, 4, Done(finish_reason="stop"))
    events = await collect(stream)
    assert [r.pos for r in events] == [Position(1, s) for s in (1, 2, 3, 4)]


async def test_new_attempt_supersedes_stragglers(client: JobClient, nc: NATS) -> None:
    job_id = new_job_id()
    stream = await client.watch(job_id)
    await emit(nc, job_id, 1, 1, started(1))
    await emit(nc, job_id, 1, 2, delta("a"))
    await emit(nc, job_id, 2, 1, started(2))
    await emit(nc, job_id, 1, 3, delta("late"))  # from the dead attempt: dropped
    await emit(nc, job_id, 2, 2, delta("a"))
    await emit(nc, job_id, 2, 3, Done(finish_reason="stop"))
    events = await collect(stream)
    # Attempt 2 repeats the text "a" that attempt 1 delivered: checked, and not passed on again.
    assert [r.pos for r in events] == [(1, 1), (1, 2), (2, 1), (2, 3)]
    assert "".join(getattr(r.event, "text", "") for r in events) == "a"


async def test_resume_after_an_event_id_returns_exactly_the_rest(
    client: JobClient, nc: NATS
) -> None:
    job_id = new_job_id()
    for seq, event in enumerate([started(), delta("a"), delta("b"), delta("c")], start=1):
        await emit(nc, job_id, 1, seq, event)
    stream = await client.watch(job_id, after=Position.parse("1-2"))
    await emit(nc, job_id, 1, 5, Done(finish_reason="stop"))
    events = await collect(stream)
    assert [r.pos.event_id() for r in events] == ["1-3", "1-4", "1-5"]
    assert [getattr(r.event, "text", None) for r in events] == ["b", "c", None]
