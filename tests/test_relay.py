"""``edge.relay`` over real result streams: attempts, duplicates, idle ticks, usage, n > 1."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS

from edge.relay import Failed, Finished, Idle, Out, Relay, Stepped, Text
from schemas.client import JobClient
from schemas.events import Delta, Done, Error, Progress, Started, Usage
from schemas.subjects import new_job_id, results_subject
from workers.emitter import Emitter


def _started(attempt: int) -> Started:
    return Started(worker="w", region="r", attempt=attempt, queue_ms=12.0)


async def _drain(relay: Relay, limit: int = 50) -> list[Out]:
    out: list[Out] = []
    async with asyncio.timeout(5):
        async for item in relay:
            out.append(item)
            if len(out) >= limit:
                break
    return out


async def test_a_redelivered_attempt_does_not_repeat_text(nc: NATS, client: JobClient) -> None:
    job_id = new_job_id()
    stream = await client.watch(job_id)
    first = Emitter(nc, job_id, results_subject(job_id), 1)
    for event in (_started(1), Delta(text="Hello ", tokens=1), Delta(text="wor", tokens=1)):
        await first.emit(event)
    second = Emitter(nc, job_id, results_subject(job_id), 2)  # the worker died; same seed again
    for event in (
        _started(2),
        Delta(text="Hello wo", tokens=2),
        Delta(text="rld", tokens=1),
        Done(finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=3)),
    ):
        await second.emit(event)
    relay = Relay([stream], first_tick_s=1.0, tick_s=1.0)
    out = await _drain(relay)
    texts = [o.text for o in out if isinstance(o, Text)]
    assert "".join(texts) == "Hello world"
    assert texts == ["Hello ", "wor", "ld"]  # the overlap of attempt 2 was dropped
    assert isinstance(out[-1], Finished)
    assert relay.finished
    assert relay.choices[0].queue_ms == 12.0
    assert relay.tokens_used(prompt_estimate=99) == 5 + 3  # the reported usage wins
    assert await relay.close() == []


async def test_idle_ticks_and_usage_of_a_job_that_never_finished(
    nc: NATS, client: JobClient
) -> None:
    job_id = new_job_id()
    stream = await client.watch(job_id)
    emitter = Emitter(nc, job_id, results_subject(job_id), 1)
    await emitter.emit(_started(1))
    await emitter.emit(Delta(text="a", tokens=2))
    relay = Relay([stream], first_tick_s=0.05, tick_s=0.05)
    out = await _drain(relay, limit=3)
    assert isinstance(out[0], Text)
    assert all(isinstance(o, Idle) for o in out[1:])
    # Unfinished: charged the prompt estimate (a worker took it) plus the tokens it sent.
    assert relay.tokens_used(prompt_estimate=7) == 7 + 2
    late = {0: Done(finish_reason="cancelled", usage=Usage(prompt_tokens=4, completion_tokens=3))}
    assert relay.tokens_used(prompt_estimate=7, late=late) == 4 + 3
    assert await relay.close() == [job_id]  # the caller cancels it


async def test_choices_interleave_and_failures_and_steps_come_through(
    nc: NATS, client: JobClient
) -> None:
    ids = [new_job_id(), new_job_id()]
    streams = [await client.watch(i) for i in ids]
    relay = Relay(streams, first_tick_s=1.0, tick_s=1.0)
    a = Emitter(nc, ids[0], results_subject(ids[0]), 1)
    b = Emitter(nc, ids[1], results_subject(ids[1]), 1)
    await a.emit(Progress(step=1, total=2))
    await b.emit(Error(code="context_length_exceeded", message="too long", param="messages"))
    await a.emit(Done(finish_reason="stop"))
    out = await _drain(relay)
    assert {type(o) for o in out} == {Stepped, Failed, Finished}
    failed = next(o for o in out if isinstance(o, Failed))
    assert failed.index == 1
    error = failed.error.exception()
    assert (error.code, error.param, error.message) == (
        "context_length_exceeded",
        "messages",
        "too long",
    )
    assert await relay.close() == []
