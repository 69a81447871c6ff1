"""Worker and edge metrics read back with exact values after known traffic."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from headrace.cli import build_parser
from headrace.servers import free_port
from schemas.client import JobClient
from schemas.events import Done
from tests.conftest import API_KEY, TEST_LIMITS, collect, running, text_job
from tests.test_runtime import FlakyEngine
from workers import metrics
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when it was never set."""
    return registry.get_sample_value(name, labels) or 0.0


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format as {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_worker_counts_jobs_tokens_slots_and_serves_them(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    settings = worker_settings.model_copy(update={"slots": 2})
    async with running(settings, EchoEngine(token_delay_s=0.02)) as runtime:
        r = runtime.metrics.registry
        streams = [await client.submit(text_job(max_tokens=4)) for _ in range(3)]
        finished = await asyncio.gather(*(collect(s) for s in streams))
        long = await client.submit(text_job(max_tokens=400))
        await long.next()  # started: the job holds a slot
        await long.next()  # a first delta
        for _ in range(500):  # the first three jobs may still be waiting for their acks
            if value(r, "headrace_worker_busy_slots") == 1:
                break
            await asyncio.sleep(0.01)
        assert value(r, "headrace_worker_busy_slots") == 1
        await long.cancel()
        cancelled = (await collect(long))[-1].event
        for _ in range(500):  # counted once the worker's ack is confirmed, after `done` is out
            if value(r, "headrace_worker_jobs_total", model="echo", outcome="cancelled") == 1:
                break
            await asyncio.sleep(0.01)
        server = await metrics.serve(r, "127.0.0.1", port := free_port())
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as resp,
            ):
                served = samples(await resp.text())
        finally:
            await server.cleanup()
    assert all(isinstance(f[-1].event, Done) for f in finished)
    assert isinstance(cancelled, Done)
    assert cancelled.finish_reason == "cancelled"
    echo = {"model": "echo"}
    assert value(r, "headrace_worker_jobs_total", outcome="done", **echo) == 3
    assert value(r, "headrace_worker_jobs_total", outcome="cancelled", **echo) == 1
    assert value(r, "headrace_worker_jobs_total", outcome="redelivered", **echo) == 0
    tokens = 3 * 4 + cancelled.usage.completion_tokens
    assert value(r, "headrace_worker_tokens_total", **echo) == tokens
    assert value(r, "headrace_worker_job_seconds_count", **echo) == 4
    assert value(r, "headrace_worker_queue_seconds_count", **echo) == 4
    assert value(r, "headrace_worker_slots") == 2
    assert value(r, "headrace_worker_busy_slots") == 0
    assert r.get_sample_value("headrace_worker_model_load_seconds", echo) is not None
    # The same numbers over HTTP, from the worker's own /metrics server.
    assert served[("headrace_worker_slots", frozenset())] == 2
    done_key = frozenset({("model", "echo"), ("outcome", "done")})
    assert served[("headrace_worker_jobs_total", done_key)] == 3
    assert served[("headrace_worker_tokens_total", frozenset(echo.items()))] == tokens


async def test_a_job_failing_every_attempt_counts_retries_and_one_dead_letter(
    client: JobClient, worker_settings: WorkerSettings
) -> None:
    async with running(worker_settings, FlakyEngine(failures=99)) as runtime:
        await collect(await client.submit(text_job()))
    r, attempts = runtime.metrics.registry, TEST_LIMITS.max_deliver
    jobs = "headrace_worker_jobs_total"
    assert value(r, jobs, model="echo", outcome="dead_lettered") == 1
    assert value(r, jobs, model="echo", outcome="retried") == attempts - 1
    assert value(r, jobs, model="echo", outcome="redelivered") == attempts - 1
    assert value(r, jobs, model="echo", outcome="done") == 0
    assert value(r, "headrace_worker_tokens_total", model="echo") == 0
    assert value(r, "headrace_worker_job_seconds_count", model="echo") == attempts


def test_metrics_port_from_the_flag_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["worker", "echo", "--metrics-port", "9100"])
    assert args.metrics_port == 9100
    assert WorkerSettings().metrics_port is None
    monkeypatch.setenv("HEADRACE_METRICS_PORT", "9101")
    assert WorkerSettings().metrics_port == 9101


async def test_edge_metrics_after_known_traffic(edge: str, worker_settings: WorkerSettings) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}
    async with aiohttp.ClientSession() as http, running(worker_settings):
        for _ in range(3):
            async with http.post(
                f"{edge}/v1/chat/completions", json={**chat, "max_tokens": 2}, headers=auth
            ) as r:
                assert r.status == 200
        streamed = {**chat, "max_tokens": 3, "stream": True}
        async with http.post(f"{edge}/v1/chat/completions", json=streamed, headers=auth) as r:
            assert r.status == 200
            await r.read()
        async with http.post(f"{edge}/v1/chat/completions", json=chat) as r:
            assert r.status == 401
        async with http.get(f"{edge}/metrics") as r:
            got = samples(await r.text())

    def at(name: str, **labels: str) -> float:
        return got.get((name, frozenset(labels.items())), 0.0)

    route = "/v1/chat/completions"
    assert at("headrace_edge_requests_total", route=route, status="200") == 4
    assert at("headrace_edge_requests_total", route=route, status="401") == 1
    assert at("headrace_edge_tokens_total", model="echo", direction="completion") == 3 * 2 + 3
    assert at("headrace_edge_time_to_first_token_seconds_count", model="echo") == 4
    assert at("headrace_edge_request_seconds_count", model="echo") == 4
    assert at("headrace_edge_queue_seconds_count", model="echo") == 4  # every job was started
    # Four requests of 2, 2, 2 and 3 tokens: each has a time per output token after the first.
    assert at("headrace_edge_time_per_output_token_seconds_count", model="echo") == 4
    assert at("headrace_edge_in_flight_requests") == 1  # the /metrics request itself
    assert at("headrace_edge_open_streams") == 0
