"""The edge's Prometheus metrics, on an injected registry (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets that fit LLM serving: sub-10 ms pipeline overhead up to minutes-long generations.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EdgeMetrics:
    """Every metric the edge exports, prefixed ``headrace_edge_``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "headrace_edge_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "headrace_edge_in_flight_requests", "requests being served", registry=r
        )
        self.open_streams = Gauge(
            "headrace_edge_open_streams", "SSE/NDJSON streams open", registry=r
        )
        self.ttft = Histogram(
            "headrace_edge_time_to_first_token_seconds", "request start to first text", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "headrace_edge_request_seconds", "request start to last byte", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "headrace_edge_tokens",
            "tokens by direction (prompt, completion)",
            ["model", "direction"],
            registry=r,
        )
        self.cancels = Counter(
            "headrace_edge_cancels", "jobs cancelled by the edge, by reason", ["reason"], registry=r
        )
