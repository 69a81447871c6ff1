"""One log line per request at the edge and one per job at the worker, joined by ids, never text."""

from __future__ import annotations

import logging

import aiohttp
import orjson
import pytest

from headrace.logs import JsonFormatter
from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

PROMPT = "zebrafinch quokka marmalade"  # distinctive: must appear in no log record


async def test_edge_and_worker_lines_share_ids_and_carry_no_text(
    edge: str, worker_settings: WorkerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "X-Request-ID": "trace-logs-1",
        "traceparent": f"00-{trace}-00f067aa0ba902b7-01",  # W3C trace context, passed through
    }
    url = f"{edge}/v1/chat/completions"
    async with (
        aiohttp.ClientSession() as http,
        running(worker_settings),
        http.post(url, json=body, headers=headers) as r,
    ):
        assert r.status == 200
        answer = (await r.json())["choices"][0]["message"]["content"]
        job_id = r.headers["x-headrace-job-ids"]
    records = caplog.records
    edge_lines = [
        rec for rec in records if rec.name == "edge.middlewares" and "job_ids" in vars(rec)
    ]
    assert [rec.__dict__["request_id"] for rec in edge_lines] == ["trace-logs-1"]
    assert edge_lines[0].__dict__["job_ids"] == [job_id]
    assert edge_lines[0].__dict__["trace_id"] == trace
    worker_lines = [rec for rec in records if "outcome" in vars(rec)]
    assert len(worker_lines) == 1
    fields = vars(worker_lines[0])
    assert worker_lines[0].levelno == logging.INFO
    assert fields["request_id"] == "trace-logs-1"
    assert fields["job_id"] == job_id
    assert fields["trace_id"] == trace
    assert (fields["model"], fields["attempt"], fields["outcome"]) == ("echo", 1, "done")
    assert fields["tokens"] == 3
    assert fields["duration_ms"] >= 0
    formatter = JsonFormatter()
    for rec in records:
        line = formatter.format(rec)
        assert isinstance(orjson.loads(line), dict)  # valid JSON, one object per line
        assert "\n" not in line
        for text in (PROMPT, *PROMPT.split(), answer):
            assert text not in line
            assert text not in repr(vars(rec))
    assert orjson.loads(formatter.format(worker_lines[0]))["job_id"] == job_id
