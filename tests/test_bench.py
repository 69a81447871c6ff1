"""``headrace bench`` runs end to end and writes its outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow


def test_bench_pipeline_writes_json_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "headrace",
            "bench",
            "--jobs",
            "100",
            "--samples",
            "20",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result = orjson.loads((out / "pipeline.json").read_bytes())
    assert result["throughput"]["jobs"] == 100
    assert result["throughput"]["jobs_per_s"] > 0
    assert len(result["latency"]["rtts_ms"]) == 20
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"]
    assert "| 1-token job round trip p50 |" in (out / "pipeline.md").read_text()
    assert (out / "pipeline.png").read_bytes().startswith(b"\x89PNG")
