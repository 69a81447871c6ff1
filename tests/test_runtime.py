"""The worker runtime against a real nats-server, with the echo engine and fault-injecting engines."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from headrace.servers import NatsServer
from schemas.client import JobClient, Received
from schemas.codec import encode
from schemas.errors import ErrorCode, InvalidRequest, QueueFull, Retry
from schemas.events import Delta, Done, EngineEvent, Error, Started
from schemas.jobs import TextJob
from schemas.subjects import DLQ_STREAM, JOBS_STREAM, WORKERS_BUCKET, Header, worker_key
from schemas.topology import Limits, provision
from tests.conftest import TEST_LIMITS, collect, running, text_job
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings


def kinds(events: list[Received]) -> list[str]:
    return [r.event.type for r in events]


async def test_job_streams_started_deltas_done(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings):
        events = await collect(await client.submit(text_job(max_tokens=5)))
    assert kinds(events) == ["started"] + ["delta"] * 5 + ["done"]
    assert [r.pos.seq for r in events] == list(range(1, 8))
    assert {r.pos.attempt for r in events} == {1}
    started, done = events[0].event, events[-1].event
    assert isinstance(started, Started)
    assert started.worker == "w1"
    assert started.attempt == 1
    assert isinstance(done, Done)
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 5
    assert "".join(r.event.text for r in events[1:-1]) != ""


async def test_same_job_id_published_twice_runs_once(
    client: JobClient, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    job = text_job(max_tokens=3)
    stream = await client.submit(job)
    second = await client.publish(job)
    assert second.duplicate
    async with running(worker_settings):
        events = await collect(stream)
        await asyncio.sleep(0.5)
    history = await client.history(job.id)
    assert [r.event.type for r in history].count("started") == 1
    assert kinds(events)[-1] == "done"
    assert (await js.stream_info(JOBS_STREAM)).state.messages == 0


async def test_full_queue_refuses_the_next_job(client: JobClient, js: JetStreamContext) -> None:
    await provision(js, Limits(jobs_max_msgs=3))
    for _ in range(3):
        await client.publish(text_job())
    with pytest.raises(QueueFull, match="queue is full"):
        await client.publish(text_job())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not JSON"),
        (b'{"id": "short", "kind": "llm"}', "schema"),
        # a misspelt parameter: job parameters forbid unknown fields, so not a silent default
        (encode(text_job()).replace(b'"params":{', b'"params":{"max_token":3,'), "max_token"),
    ],
)
async def test_poison_is_dead_lettered_and_worker_goes_on(
    client: JobClient,
    js: JetStreamContext,
    worker_settings: WorkerSettings,
    payload: bytes,
    reason: str,
) -> None:
    reply = "results.poison-test-0000000001"
    sub = await client.nc.subscribe(reply)
    await client.nc.flush()
    async with running(worker_settings):
        await js.publish("jobs.llm.echo", payload, headers={Header.REPLY: reply})
        msg = await sub.next_msg(timeout=10)
        events = await collect(await client.submit(text_job(max_tokens=2)))
    error = Error.model_validate_json(msg.data)
    assert error.code == ErrorCode.INVALID_JOB
    assert reason in error.message
    dead = await js.get_last_msg(DLQ_STREAM, "dlq.jobs.llm.echo")
    assert dead.data == payload
    assert dead.headers is not None
    assert reason in dead.headers[Header.REASON]
    assert kinds(events)[-1] == "done"


async def test_expired_job_is_not_run(client: JobClient, worker_settings: WorkerSettings) -> None:
    job = text_job(deadline_in_s=-1)
    stream = await client.watch(job.id)  # no deadline of its own: it reads what comes
    await client.publish(job)  # submit() would give up waiting: the deadline already passed
    async with running(worker_settings):
        received = await stream.next(10)
    assert received is not None
    assert isinstance(received.event, Error)
    assert received.event.code == ErrorCode.DEADLINE_EXCEEDED
    assert [r.event.type for r in await client.history(job.id)] == ["error"]


async def test_cancel_running_job_stops_within_one_token(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    engine = EchoEngine(token_delay_s=0.05)
    async with running(worker_settings, engine):
        stream = await client.submit(text_job(max_tokens=400))
        events = []
        async for received in stream:
            events.append(received)
            if kinds(events).count("delta") == 3:
                await stream.cancel()
                cancelled_after = 3
    done = events[-1].event
    assert isinstance(done, Done)
    assert done.finish_reason == "cancelled"
    # The cancel may cross one token already being generated, never more.
    assert cancelled_after <= done.usage.completion_tokens <= cancelled_after + 1
    assert kinds(events).count("delta") == done.usage.completion_tokens


async def test_cancel_queued_job_is_not_run(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    engine = EchoEngine(token_delay_s=0.05)
    async with running(worker_settings, engine):
        first = await client.submit(text_job(max_tokens=30))
        queued = await client.submit(text_job(max_tokens=30))
        await first.next()  # the only slot is busy with the first job
        await queued.cancel()
        events = await collect(queued)
        await first.cancel()
    assert kinds(events) == ["done"]
    assert events[0].event.finish_reason == "cancelled"


class FlakyEngine(EchoEngine):
    """Fault injection: fails the first ``failures`` attempts with Retry (or a permanent error)."""

    def __init__(self, failures: int, permanent: bool = False) -> None:
        super().__init__()
        self.failures = failures
        self.permanent = permanent
        self.calls = 0

    async def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        self.calls += 1
        yield Delta(text="partial ", tokens=1)
        if self.permanent:
            raise InvalidRequest("this job can never work")
        if self.calls <= self.failures:
            raise Retry("transient failure", delay_s=0.1)
        async for event in super().run(job, cancel):
            yield event


async def test_retryable_failure_is_redelivered(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings, FlakyEngine(failures=1)):
        events = await collect(await client.submit(text_job(max_tokens=2)))
    attempts = [r.event.attempt for r in events if isinstance(r.event, Started)]
    assert attempts == [1, 2]
    assert kinds(events)[-1] == "done"


async def test_failing_every_attempt_dead_letters(
    client: JobClient, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    engine = FlakyEngine(failures=99)
    async with running(worker_settings, engine):
        events = await collect(await client.submit(text_job()))
    assert engine.calls == TEST_LIMITS.max_deliver
    error = events[-1].event
    assert isinstance(error, Error)
    assert error.code == ErrorCode.DEAD_LETTERED
    dead = await js.get_last_msg(DLQ_STREAM, "dlq.jobs.llm.echo")
    assert dead.headers is not None
    assert "transient failure" in dead.headers[Header.REASON]
    assert dead.headers[Header.ATTEMPT] == str(TEST_LIMITS.max_deliver)


async def test_permanent_error_is_not_retried(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    engine = FlakyEngine(failures=0, permanent=True)
    async with running(worker_settings, engine):
        events = await collect(await client.submit(text_job()))
    assert engine.calls == 1
    assert isinstance(events[-1].event, Error)
    assert events[-1].event.code == ErrorCode.INVALID_REQUEST


async def test_long_job_is_kept_alive_past_ack_wait(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    # 60 tokens x 50 ms = 3 s, longer than the 2 s ack_wait: +WPI must prevent a redelivery.
    async with running(worker_settings, EchoEngine(token_delay_s=0.05)):
        events = await collect(await client.submit(text_job(max_tokens=60)))
    assert [r.event.attempt for r in events if isinstance(r.event, Started)] == [1]
    assert events[-1].event.usage.completion_tokens == 60


async def test_two_workers_share_one_consumer(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    other = worker_settings.model_copy(update={"worker_id": "w2"})
    engine = EchoEngine(token_delay_s=0.02)
    async with running(worker_settings, engine), running(other, EchoEngine(token_delay_s=0.02)):
        streams = [await client.submit(text_job(max_tokens=5)) for _ in range(12)]
        results = await asyncio.gather(*(collect(s) for s in streams))
    workers = [r[0].event.worker for r in results]
    assert set(workers) == {"w1", "w2"}
    assert all(r[-1].event.type == "done" for r in results)


async def test_heartbeat_registers_and_clean_exit_deregisters(
    js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    kv = await js.key_value(WORKERS_BUCKET)
    async with running(worker_settings):
        record = (await kv.get(worker_key("w1"))).value
        assert record is not None
    from schemas.codec import decode_worker

    info = decode_worker(record)
    assert info.models[0].id == "echo"
    assert info.slots == 1
    assert info.region == "local"
    entry = None
    try:
        entry = await kv.get(worker_key("w1"))
    except Exception:  # KeyDeletedError / KeyNotFoundError: gone, as intended
        entry = None
    assert entry is None or not entry.value


async def test_published_event_bytes_decode_as_the_contract(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    job = text_job(max_tokens=1)
    async with running(worker_settings):
        events = await collect(await client.submit(job))
    for r in events:
        assert encode(r.event)  # round-trips through the contract models


async def test_a_worker_on_an_empty_server_creates_what_it_relies_on(
    nats_server: NatsServer, worker_settings: WorkerSettings, nc: NATS
) -> None:
    # Nothing provisioned (a new server, or one replaced with an empty store): the worker
    # creates the streams, buckets and its consumer itself, registers and serves.
    async with running(worker_settings):
        js = nc.jetstream()
        for name in ("JOBS", "RESULTS", "DLQ", "KV_workers", "KV_options", "OBJ_images"):
            assert (await js.stream_info(name)).config.name == name
        assert (await js.consumer_info("JOBS", "llm-echo")).config.durable_name == "llm-echo"
        events = await collect(await JobClient(nc).submit(text_job(max_tokens=2)))
        assert events[-1].event.type == "done"


async def test_a_worker_never_changes_what_an_operator_provisioned(
    js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    await provision(js, Limits(jobs_max_msgs=7, ack_wait_s=3.0), [("llm", "echo")])
    async with running(worker_settings):
        assert (await js.stream_info("JOBS")).config.max_msgs == 7
        assert (await js.consumer_info("JOBS", "llm-echo")).config.ack_wait == 3.0
