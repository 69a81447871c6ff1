"""The worker's Prometheus metrics, on an injected registry (tests use a fresh one)."""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from schemas.events import Done

# Buckets that fit LLM serving: a 1-token echo job in milliseconds up to minutes-long generations.
# A diffusion step: milliseconds for a tiny model on a GPU up to tens of seconds on a CPU.
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Outcome = Literal[
    "done",  # finished and acked
    "cancelled",  # cancelled while queued or running (or stopped at its deadline while running)
    "expired",  # its deadline passed in the queue: not run
    "failed",  # a permanent error: an error event, then term
    "retried",  # this attempt failed and was nak'ed for another
    "dead_lettered",  # failed on its last attempt, or poison: copied to the DLQ
    "redelivered",  # started with attempt > 1 (counted when it starts, not when it ends)
    "handed_over",  # stopped (SIGTERM) and published as a continuation for another worker
    "superseded",  # another worker's continuation took it over: terminated, its output dropped
]


class WorkerMetrics:
    """Every metric a worker exports, prefixed ``headrace_worker_``. No per-job labels."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "headrace_worker_jobs",
            "jobs by model and outcome (done, cancelled, expired, failed, retried, "
            "dead_lettered, redelivered)",
            ["model", "outcome"],
            registry=r,
        )
        self.busy_slots = Gauge("headrace_worker_busy_slots", "slots running a job", registry=r)
        self.slots = Gauge("headrace_worker_slots", "slots of this worker", registry=r)
        self.tokens = Counter(
            "headrace_worker_tokens", "completion tokens generated", ["model"], registry=r
        )
        self.job_seconds = Histogram(
            "headrace_worker_job_seconds", "one attempt, from started to its outcome", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "headrace_worker_queue_seconds", "job created to started (Started.queue_ms)", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.images = Counter("headrace_worker_images", "images generated", ["model"], registry=r)
        self.steps = Counter(
            "headrace_worker_steps",
            "diffusion steps run (rate() of it is steps per second)",
            ["model"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "headrace_worker_step_seconds", "mean time of one diffusion step, per image job",
            ["model"], buckets=_STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.gpu_memory_bytes = Gauge(
            "headrace_worker_gpu_memory_bytes",
            "GPU memory the engine holds (0 without CUDA)",
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "headrace_worker_model_load_seconds",
            "time the engine took to load its models at start-up",
            ["model"],
            registry=r,
        )

    def started(self, model: str, attempt: int, queue_ms: float) -> None:
        """A job's attempt started running."""
        if attempt > 1:
            self.jobs.labels(model, "redelivered").inc()
        self.queue_seconds.labels(model).observe(queue_ms / 1000)

    def ended(self, model: str, outcome: Outcome, tokens: int, ran_s: float | None) -> None:
        """A job's attempt reached an outcome (``ran_s`` is None when the engine never ran it)."""
        self.jobs.labels(model, outcome).inc()
        if tokens:
            self.tokens.labels(model).inc(tokens)
        if ran_s is not None:
            self.job_seconds.labels(model).observe(ran_s)

    def imaged(self, model: str, done: Done) -> None:
        """An image job ended: count its images and steps, and the mean time of a step."""
        t = done.timings
        self.images.labels(model).inc(len(done.images))
        if t.predicted_n:
            self.steps.labels(model).inc(t.predicted_n)
            self.step_seconds.labels(model).observe(t.predicted_ms / 1000 / t.predicted_n)


async def serve(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """``GET /metrics`` on the worker's own port; ``await runner.cleanup()`` stops it."""

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
