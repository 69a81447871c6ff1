"""Failover with the real engines: llama.cpp (SmolLM2) and diffusers (the tiny pipeline).

Worker processes are killed with SIGKILL mid-job while another worker of the model is
alive: a text job at temperature 0 continues with text identical to an uninterrupted run
(the continuation evaluates the delivered tokens and goes on from them); an image job
starts again with the same seed, its progress never going backwards for the client.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from schemas.client import JobClient, Received
from schemas.events import Delta, Done, Progress, Started
from schemas.jobs import ImageJob, ImageParams
from schemas.subjects import epoch_of, new_job_id
from tests.conftest import AuthNatsServer, collect, spawn_worker, text_job, wait_registered
from tests.test_failover import attempts, text_of, until_serving, workers, workers_of
from workers.engines.gguf import DEFAULT_MODEL_ID

# Worker processes load a model each (llama.cpp, torch): longer than the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def llm_worker(server: AuthNatsServer, worker_id: str, tmp_path: Path, n_ctx: int = 512) -> Any:
    env = {"HEADRACE_LLM_THREADS": "1", "HEADRACE_LLM_N_CTX": str(n_ctx)}
    return spawn_worker(server, worker_id, log=tmp_path / f"{worker_id}.log", engine="llm", env=env)


async def test_a_killed_llama_worker_continues_identically_at_temperature_0(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    procs = {w: llm_worker(nats_server, w, tmp_path) for w in ("a", "b")}
    params: dict[str, Any] = {"model": DEFAULT_MODEL_ID, "max_tokens": 40, "temperature": 0.0}
    prompt = "Write a short story about a lighthouse keeper and a storm."
    with workers(*procs.values()):
        for w in procs:
            await wait_registered(js, w, timeout_s=60)
        expected = text_of(await collect(await client.submit(text_job(prompt, **params)), 60))
        stream = await client.submit(text_job(prompt, **params))
        events: list[Received] = []
        doomed = await until_serving(events, stream, 8)
        procs[doomed].send_signal(signal.SIGKILL)
        events += await collect(stream, timeout_s=60)
    assert text_of(events) == expected
    assert workers_of(events)[-1] != doomed
    assert [epoch_of(a) for a in attempts(events)] == [0, 1]
    done = events[-1].event
    assert isinstance(done, Done)
    assert done.usage.completion_tokens == 40


async def test_a_long_prompt_is_not_taken_for_a_lost_worker(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path
) -> None:
    worker = llm_worker(nats_server, "busy", tmp_path, n_ctx=2048)
    prompt = " ".join(f"item {i} is a {['red', 'green', 'blue'][i % 3]} box;" for i in range(60))
    with workers(worker) as started:
        await wait_registered(js, "busy", timeout_s=60)
        job = text_job(prompt, model=DEFAULT_MODEL_ID, max_tokens=3, deadline_in_s=120)
        stream = await client.submit(job)
        events: list[Received] = []
        while not any(isinstance(r.event, Started) for r in events):
            received = await asyncio.wait_for(stream.next(), 60)
            assert received is not None
            events.append(received)
        began = time.monotonic()
        started.append(llm_worker(nats_server, "spare", tmp_path))  # could take it over
        while not any(isinstance(r.event, Delta) for r in events):
            received = await asyncio.wait_for(stream.next(), 120)
            assert received is not None
            events.append(received)
        first = workers_of(events)[-1]
        prompt_s = time.monotonic() - began
        events += await collect(stream, timeout_s=120)
    beats_s = 4 * 0.2  # what followers wait (schemas.failover.MISSED_BEATS x job_beat_s)
    print(f"the prompt took {prompt_s:.1f} s, without a beat missed")
    if prompt_s < beats_s:
        pytest.skip(f"the prompt took {prompt_s:.2f} s here: too fast to test a false alarm")
    assert first == "busy"
    assert stream.handovers == 0
    assert workers_of(events) == ["busy"]
    assert attempts(events) == [1]


async def test_a_killed_image_worker_restarts_with_the_seed_and_progress_never_goes_back(
    client: JobClient, js: JetStreamContext, nats_server: AuthNatsServer, tmp_path: Path,
    tiny_sd: Path,
) -> None:  # fmt: skip
    env = {
        "HEADRACE_SD_MODELS": f"tiny-sd={tiny_sd}",
        "HEADRACE_SD_DEVICE": "cpu",
        "HEADRACE_SD_THREADS": "1",
    }
    procs = {
        w: spawn_worker(nats_server, w, log=tmp_path / f"{w}.log", engine="sd", env=env)
        for w in ("a", "b")
    }

    def job() -> ImageJob:
        now_ms = int(time.time() * 1000)
        params = ImageParams(prompt="a lighthouse", width=64, height=64, steps=40, seed=77)
        return ImageJob(
            id=new_job_id(), model="tiny-sd", created_ms=now_ms, deadline_ms=now_ms + 120_000,
            params=params,
        )  # fmt: skip

    with workers(*procs.values()):
        for w in procs:
            await wait_registered(js, w, timeout_s=120)
        expected = (await collect(await client.submit(job()), 120))[-1].event
        stream = await client.submit(job())
        events: list[Received] = []
        while sum(isinstance(r.event, Progress) for r in events) < 5:
            received = await asyncio.wait_for(stream.next(), 60)
            assert received is not None
            events.append(received)
        doomed = workers_of(events)[-1]
        procs[doomed].send_signal(signal.SIGKILL)
        events += await collect(stream, timeout_s=120)
    steps = [r.event.step for r in events if isinstance(r.event, Progress)]
    assert steps == sorted(set(steps))
    assert steps[-1] == 40
    assert [epoch_of(a) for a in attempts(events)] == [0, 1]
    assert workers_of(events)[-1] != doomed
    done = events[-1].event
    assert isinstance(done, Done)
    assert isinstance(expected, Done)
    assert done.images[0].b64_png == expected.images[0].b64_png  # the same seed, the same image
