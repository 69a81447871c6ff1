"""A short locust smoke against the real edge and an echo worker; the thresholds can fail it."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import API_KEY, running
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

# Part of `make test` (and alone: `make loadtest-smoke`). Once, under load, locust did not stop
# at its run time; loadtests/run.py now kills it 20 s later and judges the statistics it wrote.
pytestmark = [pytest.mark.slow, pytest.mark.loadtest]


async def loadtest(edge: str, out: Path, *thresholds: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "loadtests/run.py", "--host", edge, "--users", "4", "--spawn-rate", "4",
        "--run-time", "3s", "--out", str(out), *thresholds,
        env={**os.environ, "HEADRACE_API_KEY": API_KEY, "HEADRACE_LOADTEST_MAX_TOKENS": "8",
             "HEADRACE_LOADTEST_IMAGES": "0"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, output.decode()


async def test_locust_smoke_passes_and_thresholds_bite(
    edge: str, worker_settings: WorkerSettings, tmp_path: Path
) -> None:
    async with running(
        worker_settings.model_copy(update={"slots": 4}), EchoEngine(token_delay_s=0.002)
    ):
        status, output = await loadtest(edge, tmp_path / "ok", "--max-p95-ttft-ms", "5000")
        assert status == 0, output
        assert "PASS" in output
        status, output = await loadtest(edge, tmp_path / "strict", "--max-p95-ttft-ms", "0.001")
    assert status == 1
    assert "FAIL: p95 TTFT" in output
