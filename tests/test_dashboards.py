"""deploy/: every metric the dashboard queries is one the edge or a worker exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from edge.metrics import EdgeMetrics
from workers.metrics import WorkerMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def exported() -> set[str]:
    """Every sample name the two containers can export (labelled metrics have none until used)."""
    names = set()
    for registry in (EdgeMetrics(CollectorRegistry()).registry, WorkerMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def expressions(node: Any) -> list[str]:
    """Every ``expr`` in a Grafana dashboard, however deeply nested."""
    if isinstance(node, dict):
        own = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return own + [e for v in node.values() for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return []


def test_every_dashboard_metric_is_exported() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "headrace.json").read_text())
    exprs = expressions(dashboard)
    used = {name for e in exprs for name in re.findall(r"\bheadrace_[a-z0-9_]+", e)}
    assert len(exprs) >= 12
    assert used - exported() == set()
    # Each asked-for view is there: both processes, and both latency histograms.
    for name in (
        "headrace_edge_requests_total",
        "headrace_edge_time_to_first_token_seconds_bucket",
        "headrace_edge_request_seconds_bucket",
        "headrace_worker_busy_slots",
        "headrace_worker_jobs_total",
        "headrace_edge_ratelimit_decisions_total",
    ):
        assert name in used


def test_prometheus_scrapes_edges_and_workers_and_grafana_provisions_both() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {c["job_name"]: c for c in prometheus["scrape_configs"]}
    assert set(jobs) == {"headrace-edge", "headrace-worker"}
    assert jobs["headrace-worker"]["dns_sd_configs"][0]["port"] == 9100
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    dashboard = json.loads((DEPLOY / "grafana" / "headrace.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}
    provider = yaml.safe_load((provisioning / "dashboards" / "headrace.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
