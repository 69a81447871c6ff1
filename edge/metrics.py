"""The edge's Prometheus metrics, on an injected registry (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets that fit LLM serving: sub-10 ms pipeline overhead up to minutes-long generations.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time per output token: a fast small model on a GPU (~1 ms) to a large one on a CPU (~1 s).
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
# A local Redis answers in tens to hundreds of microseconds; the limiter's timeout is ~0.2 s.
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


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
        self.tpot = Histogram(
            "headrace_edge_time_per_output_token_seconds",
            "inter-token latency of one choice: (last text - first text) / (tokens - 1)",
            ["model"], buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "headrace_edge_queue_seconds", "job created to a worker starting it", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "headrace_edge_tokens",
            "tokens by direction (prompt, completion)",
            ["model", "direction"],
            registry=r,
        )
        self.queued = Gauge(
            "headrace_edge_queue_depth",
            "jobs waiting in JOBS, by model consumer",
            ["consumer"],
            registry=r,
        )
        self.running = Gauge(
            "headrace_edge_jobs_running",
            "jobs held by workers, by model consumer",
            ["consumer"],
            registry=r,
        )
        # Regions (a super-cluster): where jobs were queued and served, and what spilled.
        self.region_placed = Counter(
            "headrace_edge_region_jobs_placed",
            "jobs this edge placed in a region's queue",
            ["region"],
            registry=r,
        )
        self.region_served = Counter(
            "headrace_edge_region_jobs_served",
            "jobs of this edge a worker of the region started (its started event's region)",
            ["region"],
            registry=r,
        )
        self.region_spills = Counter(
            "headrace_edge_region_spills",
            "jobs placed outside this edge's own region (source: the edge's, target: the queue's)",
            ["source", "target"],
            registry=r,
        )
        self.region_replaced = Counter(
            "headrace_edge_region_jobs_replaced",
            "open jobs placed again because their region was lost",
            ["source", "target"],
            registry=r,
        )
        self.region_queue_depth = Gauge(
            "headrace_edge_region_queue_depth",
            "jobs waiting in a region's queue, by model consumer",
            ["region", "consumer"],
            registry=r,
        )
        self.cancels = Counter(
            "headrace_edge_cancels", "jobs cancelled by the edge, by reason", ["reason"], registry=r
        )
        self.ratelimit = Counter(
            "headrace_edge_ratelimit_decisions",
            "rate-limit decisions by outcome (admitted, limited, fail_open, fail_closed) and the "
            "limit that refused (requests, tokens, images, parallel_requests; none otherwise)",
            ["outcome", "limit"],
            registry=r,
        )
        self.redis_failures = Counter(
            "headrace_edge_ratelimit_redis_failures",
            "rate-limiter Redis calls that failed, by reason (timeout, connection, error)",
            ["reason"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "headrace_edge_ratelimit_breaker_open",
            "1 while the rate limiter skips an unreachable Redis",
            registry=r,
        )
        self.redis_seconds = Histogram(
            "headrace_edge_ratelimit_redis_seconds", "rate-limiter Redis calls by script", ["script"],
            buckets=_REDIS_BUCKETS, registry=r,
        )  # fmt: skip
