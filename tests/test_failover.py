"""A worker lost mid-job: the job goes on elsewhere from what was delivered (schemas.failover).

Real nats-server, real worker processes killed with SIGKILL, paused with SIGSTOP or
stopped with SIGTERM, real followers (``JobClient``, the edge through the OpenAI SDK).
Every stream is compared with an uninterrupted run of the same seeded job: the same
text, nothing repeated, nothing missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from schemas.client import JobClient, Received
from schemas.errors import Unavailable
from schemas.events import Delta, Done, Started
from schemas.subjects import JOBS_STREAM, epoch_of
from tests.conftest import (
    TEST_LOGIN,
    AuthNatsServer,
    collect,
    spawn_worker,
    text_job,
    wait_registered,
)

pytestmark = pytest.mark.slow

PROMPT = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
DELAY = ("--echo-token-delay-s", "0.05")


def pair(
    nats_server: AuthNatsServer, tmp_path: Path, delay: tuple[str, str] = DELAY
) -> dict[str, subprocess.Popen[bytes]]:
    """Two echo workers, ``a`` and ``b``, at ``delay`` a token."""
    return {w: spawn_worker(nats_server, w, *delay, log=tmp_path / f"{w}.log") for w in ("a", "b")}


async def registered(js: JetStreamContext, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Until every worker of ``pair`` is in the registry."""
    for w in procs:
        await wait_registered(js, w)


@contextlib.contextmanager
def workers(*procs: subprocess.Popen[bytes]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Whatever happens, every worker process started here is gone afterwards."""
    started = list(procs)
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in started:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def text_of(events: list[Received]) -> str:
    return "".join(r.event.text for r in events if isinstance(r.event, Delta))


def workers_of(events: list[Received]) -> list[str]:
    return [r.event.worker for r in events if isinstance(r.event, Started)]


async def until_serving(events: list[Received], stream: Any, deltas: int) -> str:
    """Read until ``deltas`` deltas came; returns the worker serving the job."""
    while sum(isinstance(r.event, Delta) for r in events) < deltas:
        received = await asyncio.wait_for(stream.next(), 20)
        assert received is not None
        events.append(received)
    return workers_of(events)[-1]


async def uninterrupted(client: JobClient, **params: Any) -> str:
    """The text of the same job run without trouble."""
    return text_of(await collect(await client.submit(text_job(PROMPT, **params))))


async def next_delta(events: list[Received], stream: Any) -> float:
    """Read up to the next delta; returns when it came."""
    while True:
        received = await asyncio.wait_for(stream.next(), 20)
        assert received is not None
        events.append(received)
        if isinstance(received.event, Delta):
            return time.monotonic()


async def collect_until_started(stream: Any) -> Received:
    while True:
        received = await asyncio.wait_for(stream.next(), 20)
        if received is not None and isinstance(received.event, Started):
            return received


def attempts(events: list[Received]) -> list[int]:
    return [r.event.attempt for r in events if isinstance(r.event, Started)]


async def test_a_killed_workers_stream_goes_on_from_the_next_token(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    procs = pair(nats_server, tmp_path)
    with workers(*procs.values()):
        await registered(js, procs)
        expected = await uninterrupted(client, max_tokens=40, seed=7)
        stream = await client.submit(text_job(PROMPT, max_tokens=40, seed=7))
        events: list[Received] = []
        doomed = await until_serving(events, stream, 10)
        procs[doomed].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        stalled_s = await next_delta(events, stream) - killed_at
        events += await collect(stream)
    assert text_of(events) == expected  # nothing repeated, nothing missing
    done = events[-1].event
    assert isinstance(done, Done)
    assert done.usage.completion_tokens == 40
    rescuer = workers_of(events)[-1]
    assert rescuer != doomed
    # Handed over by the follower (epoch 1), not redelivered after ack_wait (the stall is
    # the bench's to measure: headrace bench failover).
    assert stream.handovers == 1
    assert [epoch_of(a) for a in attempts(events)] == [0, 1]
    print(f"stall from the kill to the next token: {stalled_s:.2f} s")


async def test_the_lost_delivery_never_runs_again(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    procs = pair(nats_server, tmp_path)
    with workers(*procs.values()) as started:
        await registered(js, procs)
        expected = await uninterrupted(client, max_tokens=30, seed=3)
        job = text_job(PROMPT, max_tokens=30, seed=3)
        stream = await client.submit(job)
        events: list[Received] = []
        procs[await until_serving(events, stream, 5)].send_signal(signal.SIGKILL)
        events += await collect(stream)
        # The killed worker's message comes back after ack_wait (2 s here) to whoever is
        # free, a worker started now included: its fence has it terminated, not run.
        started.append(spawn_worker(nats_server, "c", *DELAY, log=tmp_path / "c.log"))
        await wait_registered(js, "c")
        await asyncio.sleep(3.0)
        history = await client.history(job.id)
        info = await js.consumer_info(JOBS_STREAM, "llm-echo")
    assert text_of(events) == expected
    assert [epoch_of(a) for a in attempts([r for r in history])] == [0, 1]
    assert (info.num_pending, info.num_ack_pending) == (0, 0)  # nothing left to run
    # A client resuming from an event before the hand-over (Last-Event-ID) gets the rest.
    upto = [r for r in events if isinstance(r.event, Delta)][2]
    resumed = await collect(await client.watch(job.id, after=upto.pos))
    head = text_of(events[: events.index(upto) + 1])
    assert head + text_of(resumed) == expected


async def test_two_followers_start_one_continuation(
    nc: Any, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    other = await nats.connect(nats_server.url, **TEST_LOGIN)
    first, second = JobClient(nc), JobClient(other)
    procs = pair(nats_server, tmp_path)
    try:
        with workers(*procs.values()):
            await registered(js, procs)
            expected = await uninterrupted(first, max_tokens=40, seed=11)
            job = text_job(PROMPT, max_tokens=40, seed=11)
            published_before = (await js.stream_info(JOBS_STREAM)).state.last_seq
            mine = await first.submit(job)
            theirs = await second.watch(job.id)  # knows only the id: reads the job from JOBS
            events: list[Received] = []
            doomed = await until_serving(events, mine, 8)
            procs[doomed].send_signal(signal.SIGKILL)
            rest, seen = await asyncio.gather(collect(mine), collect(theirs))
            published = (await js.stream_info(JOBS_STREAM)).state.last_seq - published_before
    finally:
        await other.close()
    assert text_of(events + rest) == expected
    assert text_of(seen) == expected  # the watcher joined from the start: the whole text
    # Both saw the worker go and may have published; JOBS kept one continuation.
    assert mine.handovers + theirs.handovers >= 1
    assert published == 2  # the job and its one continuation


async def test_a_paused_worker_resumed_after_the_hand_over_gets_nothing_through(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    procs = pair(nats_server, tmp_path)
    with workers(*procs.values()):
        await registered(js, procs)
        expected = await uninterrupted(client, max_tokens=60, seed=5)
        job = text_job(PROMPT, max_tokens=60, seed=5)
        stream = await client.submit(job)
        events: list[Received] = []
        paused = procs[await until_serving(events, stream, 6)]
        paused.send_signal(signal.SIGSTOP)
        await next_delta(events, stream)  # the continuation is streaming
        paused.send_signal(signal.SIGCONT)  # the paused worker goes on where it was
        events += await collect(stream)
        history = await client.history(job.id)
        again = await client.watch(job.id, replay=True)  # a late reader, from RESULTS
        replayed = await collect(again)
    assert text_of(events) == expected
    assert text_of(replayed) == expected
    # The resumed worker found itself superseded (its fence) and stopped; whatever it sent
    # meanwhile was dropped by the followers.
    assert [epoch_of(a) for a in attempts(history)] == [0, 1]
    assert "taken over elsewhere" in (tmp_path / f"{workers_of(events)[0]}.log").read_text()


async def test_a_slow_worker_is_not_taken_for_a_lost_one(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    # Each token takes 1.5 s, twice what followers wait for a beat: the beats go on.
    slow = spawn_worker(nats_server, "slow", "--echo-token-delay-s", "1.5", log=tmp_path / "s.log")
    with workers(slow) as started:
        await wait_registered(js, "slow")
        stream = await client.submit(text_job(PROMPT, max_tokens=3, seed=1))
        events = [await collect_until_started(stream)]
        # A worker that could take the job over, were it handed over.
        started.append(spawn_worker(nats_server, "spare", log=tmp_path / "spare.log"))
        events += await collect(stream, timeout_s=30)
    assert stream.handovers == 0
    assert workers_of(events) == ["slow"]
    assert attempts(events) == [1]


async def test_sigterm_hands_a_long_job_over_at_once(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    procs = pair(nats_server, tmp_path, ("--echo-token-delay-s", "0.1"))
    with workers(*procs.values()):
        await registered(js, procs)
        expected = await uninterrupted(client, max_tokens=80, seed=2)  # 8 s of tokens
        began = time.monotonic()
        stream = await client.submit(text_job(PROMPT, max_tokens=80, seed=2))
        events: list[Received] = []
        leaving = procs[await until_serving(events, stream, 10)]
        leaving.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        exit_code = await asyncio.to_thread(leaving.wait, 30)
        left_s = time.monotonic() - stopped
        events += await collect(stream, timeout_s=30)
        took_s = time.monotonic() - began
    assert exit_code == 0
    assert text_of(events) == expected
    # The worker's last beat said it was leaving: the follower continued the job at once.
    assert stream.handovers == 1
    assert [epoch_of(a) for a in attempts(events)] == [0, 1]
    # It left long before the 7 s of tokens it still had (not after them, nor after a grace).
    assert left_s < 5.0, left_s
    print(f"SIGTERM: job took {took_s:.1f} s (8 s of tokens), worker left in {left_s:.1f} s")


async def test_the_openai_sdk_stream_goes_on_when_its_worker_is_killed(
    edge: str,
    js: JetStreamContext,
    nats_server: AuthNatsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import openai

    caplog.set_level(logging.INFO, logger="schemas.client")
    from tests.conftest import API_KEY

    chat = [{"role": "user", "content": PROMPT}]
    doomed = spawn_worker(nats_server, "doomed", *DELAY, log=tmp_path / "doomed.log")
    with workers(doomed) as started:
        await wait_registered(js, "doomed")
        async with openai.AsyncOpenAI(base_url=f"{edge}/v1", api_key=API_KEY, max_retries=0) as oai:
            stream = await oai.chat.completions.create(
                model="echo", messages=chat, max_tokens=150, seed=9, stream=True
            )
            chunks = [await stream.__anext__() for _ in range(6)]  # the role chunk, 5 tokens
            # Only "doomed" could take the job; the rescuer is alive before the kill.
            started.append(spawn_worker(nats_server, "rescuer", *DELAY, log=tmp_path / "r.log"))
            await wait_registered(js, "rescuer")
            doomed.send_signal(signal.SIGKILL)
            chunks += [c async for c in stream]
            whole = await oai.chat.completions.create(
                model="echo", messages=chat, max_tokens=150, seed=9
            )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # nothing lost, nothing repeated
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "attempt 1 went silent; continued in epoch 1" in caplog.text  # by the edge


async def test_a_native_client_continues_with_its_own_permissions(
    js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    from schemas.connection import credentials
    from schemas.settings import CommonSettings

    violations: list[str] = []

    async def on_error(e: Exception) -> None:
        violations.append(str(e))

    settings = CommonSettings(nats_url=nats_server.url, **nats_server.login("alice"))
    alice = await nats.connect(nats_server.url, error_cb=on_error, **credentials(settings))
    client = JobClient(alice, user="alice")  # results.alice.<id>, alive.alice.<id>
    procs = pair(nats_server, tmp_path)
    try:
        with workers(*procs.values()):
            await registered(js, procs)
            expected = await uninterrupted(client, max_tokens=30, seed=4)
            stream = await client.submit(text_job(PROMPT, max_tokens=30, seed=4))
            events: list[Received] = []
            procs[await until_serving(events, stream, 6)].send_signal(signal.SIGKILL)
            events += await collect(stream)
    finally:
        await alice.close()
    assert text_of(events) == expected
    assert stream.handovers == 1
    assert violations == []  # beats, the fence and the continuation are all its own to use


async def test_a_finished_job_whose_ack_was_lost_does_not_run_again(
    client: JobClient,
    js: JetStreamContext,
    worker_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from collections import Counter

    from tests.conftest import running
    from tests.test_cluster import RecordingEcho
    from workers.runtime import Runtime

    lost = asyncio.Event()

    async def ack_lost(self: Runtime, msg: Any) -> None:
        """What a broker election does to an ack: the job is done, the queue never hears."""
        lost.set()

    ran: Counter[str] = Counter()
    job = text_job(PROMPT, max_tokens=5)
    async with running(worker_settings, RecordingEcho(ran)) as runtime:
        monkeypatch.setattr(Runtime, "_settle", ack_lost)
        events = await collect(await client.submit(job))
        await asyncio.wait_for(lost.wait(), 10)  # its attempt is over, the ack "sent"
        monkeypatch.undo()  # acks work again; the lost one comes back after ack_wait (2 s)
        for _ in range(100):
            info = await js.consumer_info(JOBS_STREAM, "llm-echo")
            if (info.num_pending, info.num_ack_pending) == (0, 0):
                break
            await asyncio.sleep(0.1)
        assert runtime.metrics.jobs.labels("echo", "superseded")._value.get() == 1
    assert isinstance(events[-1].event, Done)
    assert ran[job.id] == 1  # its fence had the redelivery terminated unrun
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_a_watcher_that_only_knows_the_id_continues_the_job_from_jobs(
    nc: Any, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    other = await nats.connect(nats_server.url, **TEST_LOGIN)
    submitter = JobClient(nc, hand_over=False)  # leaves it to the other follower
    watcher = JobClient(other)
    procs = pair(nats_server, tmp_path)
    try:
        with workers(*procs.values()):
            await registered(js, procs)
            expected = await uninterrupted(submitter, max_tokens=30, seed=8)
            job = text_job(PROMPT, max_tokens=30, seed=8)
            mine = await submitter.submit(job)
            theirs = await watcher.watch(job.id)
            events: list[Received] = []
            procs[await until_serving(events, mine, 5)].send_signal(signal.SIGKILL)
            rest, seen = await asyncio.gather(collect(mine), collect(theirs))
    finally:
        await other.close()
    assert (mine.handovers, theirs.handovers) == (0, 1)
    assert text_of(events + rest) == expected
    assert text_of(seen) == expected


async def test_followers_give_up_on_a_job_whose_workers_keep_dying(
    js: JetStreamContext, nc: Any, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    client = JobClient(nc, max_handovers=0)  # the default gives up after 3 hand-overs
    doomed = spawn_worker(
        nats_server, "doomed", "--echo-token-delay-s", "0.05", log=tmp_path / "d.log"
    )
    with workers(doomed):
        await wait_registered(js, "doomed")
        stream = await client.submit(text_job(PROMPT, max_tokens=30))
        await until_serving([], stream, 3)
        doomed.send_signal(signal.SIGKILL)
        with pytest.raises(Unavailable, match="lost again and again"):
            await collect(stream)
