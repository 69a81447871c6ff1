"""``headrace bench`` runs end to end and writes its outputs (figures are printed, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow


def test_bench_writes_json_tables_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "headrace",
            "bench",
            "echo",
            "--jobs",
            "100",
            "--samples",
            "20",
            "--requests",
            "64",
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
    assert 0 < result["bare"]["p50_ms"] <= result["bare"]["p99_ms"]
    assert (out / "pipeline.png").read_bytes().startswith(b"\x89PNG")
    edge = orjson.loads((out / "edge.json").read_bytes())
    assert len(edge["ttft"]["edge_ms"]) == 20
    assert edge["rps"]["requests"] == 64
    assert edge["rps"]["errors"] == 0
    # every token's chunk, plus the role and finish chunks of each stream
    assert edge["relay"]["chunks"] == edge["relay"]["streams"] * (
        edge["relay"]["tokens_per_stream"] + 2
    )
    assert "SSE chunks relayed per second" in (out / "edge.md").read_text()
    assert (out / "edge.png").read_bytes().startswith(b"\x89PNG")


def test_bench_sd_quick_writes_json_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "headrace", "bench", "sd", "--quick", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-4000:]
    result = orjson.loads((out / "sd.json").read_bytes())
    assert [r["steps"] for r in result["rows"]] == [4, 10]
    for row in result["rows"]:
        assert row["in_process_s"] > 0
        assert row["headrace_s"] > 0
    assert result["object_store"]["bytes"] == 2 * 1024 * 1024
    assert result["object_store"]["put_ms"] > 0
    assert "| steps | in-process s/step |" in (out / "sd.md").read_text()
    assert (out / "sd.png").read_bytes().startswith(b"\x89PNG")


def test_bench_restarts_writes_json_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "headrace", "bench", "restarts", "--restarts", "2",
            "--in-flight", "6", "--out", str(out)]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-4000:]  # nothing lost, hung, cut short or a 500
    result = orjson.loads((out / "restarts.json").read_bytes())
    assert [r["signal"] for r in result["rounds"]] == ["SIGTERM", "SIGKILL"]
    assert all(r["hung"] == 0 and sum(r["outcomes"].values()) == 6 for r in result["rounds"])
    assert "| SIGKILL | 1 |" in (out / "restarts.md").read_text()
    assert (out / "restarts.png").read_bytes().startswith(b"\x89PNG")


def test_bench_failover_writes_json_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "headrace", "bench", "failover", "--kills", "2",
            "--sigterm-job-s", "2", "--out", str(out)]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-4000:]  # nothing lost, every text identical
    result = orjson.loads((out / "failover.json").read_bytes())
    (case,) = result["kills"]
    assert (case["kills"], case["lost"], case["wrong_text"]) == (2, 0, 0)
    assert len(case["stalls_s"]) == 2
    assert result["sigterm"]["same_text"]
    assert "| echo | 1.0 | 2 |" in (out / "failover.md").read_text()
    assert (out / "failover.png").read_bytes().startswith(b"\x89PNG")
