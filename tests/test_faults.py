"""Fault injection with real processes: SIGKILL and SIGTERM of workers, a nats-server restart."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from schemas.client import JobClient
from schemas.events import Started
from schemas.subjects import JOBS_STREAM
from tests.conftest import (
    AuthNatsServer,
    collect,
    running,
    spawn_worker,
    text_job,
    wait_registered,
)
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

pytestmark = pytest.mark.slow


async def test_killed_worker_job_goes_on_on_a_worker_started_later(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    first = spawn_worker(
        nats_server, "doomed", "--echo-token-delay-s", "0.05", log=tmp_path / "w1.log"
    )
    try:
        await wait_registered(js, "doomed")
        stream = await client.submit(text_job(max_tokens=40))
        seen = [await stream.next(), await stream.next(), await stream.next()]
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = spawn_worker(
            nats_server, "rescuer", "--echo-token-delay-s", "0.01", log=tmp_path / "w2.log"
        )
        try:
            rest = await collect(stream, timeout_s=30)
            whole = await collect(await client.submit(text_job(max_tokens=40)))
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    started = [r.event for r in seen + rest if r is not None and isinstance(r.event, Started)]
    # The follower handed the job over (a continuation, epoch 1) while no worker was there:
    # it waited in JOBS for the rescuer; the killed delivery did not run again.
    assert [(s.worker, s.attempt) for s in started] == [("doomed", 1), ("rescuer", 1001)]
    done = rest[-1].event
    assert done.type == "done"
    assert done.usage.completion_tokens == 40  # the whole job, both attempts
    text = "".join(r.event.text for r in seen + rest if r is not None and r.event.type == "delta")
    assert text == "".join(r.event.text for r in whole if r.event.type == "delta")


async def test_sigterm_finishes_held_job_and_loses_nothing(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    worker = spawn_worker(
        nats_server, "leaving", "--echo-token-delay-s", "0.03", log=tmp_path / "w.log"
    )
    await wait_registered(js, "leaving")
    held = await client.submit(text_job(max_tokens=30))
    queued = await client.submit(text_job(max_tokens=3))
    for _ in range(4):  # started, and 3 tokens: it ends within a second, so it finishes here
        await held.next()
    worker.send_signal(signal.SIGTERM)
    events = await collect(held)
    assert await asyncio.to_thread(worker.wait, 20) == 0
    assert events[-1].event.type == "done"
    assert events[-1].event.usage.completion_tokens == 30
    # The queued job was never fetched (or was nak'ed): it is still there for the next worker.
    info = await js.consumer_info(JOBS_STREAM, "llm-echo")
    assert (info.num_pending or 0) + (info.num_ack_pending or 0) == 1
    settings = WorkerSettings(
        nats_url=nats_server.url,
        worker_id="next",
        fetch_timeout_s=0.5,
        **nats_server.login("worker"),
    )
    async with running(settings):
        rest = await collect(queued)
    assert rest[-1].event.type == "done"


async def test_worker_survives_nats_server_restart(
    client: JobClient, nats_server: AuthNatsServer, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings, EchoEngine()):
        before = await collect(await client.submit(text_job(max_tokens=2)))
        nats_server.stop()
        await asyncio.sleep(1.0)
        nats_server.start()  # same port, same store: streams and the consumer are still there
        await client.nc.flush(timeout=10)  # our own client reconnects too
        after = await collect(await client.submit(text_job(max_tokens=2)), timeout_s=30)
    assert before[-1].event.type == "done"
    assert after[-1].event.type == "done"


async def test_stream_continues_without_repeats_when_its_worker_dies(
    edge: str, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    import openai

    from tests.conftest import API_KEY

    chat = [{"role": "user", "content": "alpha beta gamma delta epsilon zeta eta theta"}]
    doomed = spawn_worker(
        nats_server, "doomed", "--echo-token-delay-s", "0.05", log=tmp_path / "w1.log"
    )
    rescuer = None
    try:
        await wait_registered(js, "doomed")
        async with openai.AsyncOpenAI(base_url=f"{edge}/v1", api_key=API_KEY, max_retries=0) as oai:
            stream = await oai.chat.completions.create(
                model="echo", messages=chat, max_tokens=30, seed=9, stream=True
            )
            chunks = [await stream.__anext__() for _ in range(6)]  # the role chunk and 5 tokens
            doomed.send_signal(signal.SIGKILL)
            rescuer = spawn_worker(nats_server, "rescuer", log=tmp_path / "w2.log")
            chunks += [c async for c in stream]
            whole = await oai.chat.completions.create(
                model="echo", messages=chat, max_tokens=30, seed=9
            )
    finally:
        for proc in (doomed, rescuer):
            if proc is not None and proc.poll() is None:
                proc.terminate()
            if proc is not None:
                proc.wait(20)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # nothing lost, nothing repeated
    assert chunks[-1].choices[0].finish_reason == "length"
