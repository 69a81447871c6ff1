"""The soak, 60 s of it: locust load while workers are SIGKILLed and nats-server restarted.

This is ``make soak`` shortened (``loadtests/soak.py --duration-s 60``: three worker kills and
one broker restart), not a unit test. It fails on any lost job (a request answered 200 whose
client never got its whole answer, or one that never ended), any 5xx other than the 503/504 a
client can act on, and any seeded answer whose text differs from the others of its seed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

SOAK = Path(__file__).resolve().parents[1] / "loadtests" / "soak.py"
pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(300)]


def test_soak_60s_loses_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SOAK), "--duration-s", "60", "--users", "6",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert (tmp_path / "soak.json").exists(), run.stdout + run.stderr
    result = orjson.loads((tmp_path / "soak.json").read_bytes())
    summary = (tmp_path / "soak.md").read_text()
    # The chaos happened: the figures below are about a disturbed run.
    assert len(result["worker_kills"]) >= 3, summary
    assert len(result["broker_restarts"]) >= 1, summary
    assert result["ok"] >= 100, summary
    assert result["lost"] == 0, (summary, result["lost_jobs"])
    assert result["hung"] == 0, summary
    assert result["disallowed_5xx"] == 0, (summary, result["errors"])
    assert result["wrong_text"] == 0, summary
    assert result["rss_mb"]
    assert result["ttft_s"] is not None
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith("PASS"), run.stdout
