"""Optional engine abilities: the runtime finds them once and uses what it found."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator

import nats.errors
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from schemas.events import EngineEvent
from schemas.fleet import ModelInfo
from schemas.jobs import TextJob
from schemas.subjects import JobKind, rpc_subject
from tests.conftest import running
from workers.engines.abilities import AnswersRpc, ReportsGpuMemory
from workers.engines.echo import EchoEngine
from workers.metrics import WorkerMetrics
from workers.runtime import Runtime
from workers.settings import WorkerSettings


class NoRpcEngine:
    """A text engine with the core Engine shape only: the echo engine without its rpc."""

    kind: JobKind = "llm"

    def __init__(self) -> None:
        self.echo = EchoEngine()

    def models(self) -> list[ModelInfo]:
        return self.echo.models()

    async def start(self) -> None:
        await self.echo.start()

    def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        return self.echo.run(job, cancel)

    async def close(self) -> None:
        await self.echo.close()


class GpuEchoEngine(EchoEngine):
    """The echo engine, holding as much GPU memory as the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.held: int | None = None
        self.reads = 0

    def gpu_memory_bytes(self) -> int | None:
        self.reads += 1
        return self.held


def test_abilities_are_found_by_shape() -> None:
    assert isinstance(EchoEngine(), AnswersRpc)
    assert not isinstance(EchoEngine(), ReportsGpuMemory)
    assert not isinstance(NoRpcEngine(), AnswersRpc)
    assert isinstance(GpuEchoEngine(), ReportsGpuMemory)


def test_gpu_memory_is_read_from_an_engine_that_reports_it() -> None:
    engine = GpuEchoEngine()
    registry = CollectorRegistry()
    Runtime(WorkerSettings(worker_id="w"), engine, WorkerMetrics(registry))
    engine.held = 3 * 2**30
    assert registry.get_sample_value("headrace_worker_gpu_memory_bytes") == 3 * 2**30
    engine.held = None  # off CUDA: the gauge reads 0
    assert registry.get_sample_value("headrace_worker_gpu_memory_bytes") == 0
    assert engine.reads == 2  # read when scraped, not copied once


def test_an_engine_without_gpu_memory_leaves_the_gauge_at_zero() -> None:
    registry = CollectorRegistry()
    Runtime(WorkerSettings(worker_id="w"), EchoEngine(), WorkerMetrics(registry))
    assert registry.get_sample_value("headrace_worker_gpu_memory_bytes") == 0


async def test_rpc_is_served_only_by_an_engine_that_answers_it(
    nc: NATS, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    props = rpc_subject("echo", "props")
    async with running(worker_settings, EchoEngine()):
        reply = orjson.loads((await nc.request(props, b"{}", timeout=5)).data)
    assert reply == {"result": {"model": "echo", "n_ctx": 4096}}
    async with running(worker_settings, NoRpcEngine()):
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(props, b"{}", timeout=5)
