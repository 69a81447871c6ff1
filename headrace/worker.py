"""``headrace worker KIND``: build the engine, run the runtime, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import uvloop

from workers.engines.base import Engine
from workers.engines.echo import EchoEngine
from workers.runtime import Runtime
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


def echo_engine(settings: WorkerSettings, model: str = "echo") -> EchoEngine:
    """The echo engine configured from worker settings."""
    return EchoEngine(
        model, token_delay_s=settings.echo_token_delay_s, default_tokens=settings.echo_tokens
    )


async def serve(settings: WorkerSettings, engine: Engine[Any]) -> None:
    """Run a worker until SIGTERM or SIGINT, then finish or nak what it holds."""
    runtime = Runtime(settings, engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.stop)
    await runtime.run()
    log.info("worker %s stopped after %d job(s)", settings.worker_id, runtime.jobs_done)


def run(settings: WorkerSettings, engine: Engine[Any]) -> None:
    """Blocking entry point of a worker process."""
    uvloop.run(serve(settings, engine))
