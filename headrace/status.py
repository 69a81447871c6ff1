"""``headrace status``: who is alive, how deep each queue is, what was dead-lettered."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Mapping, Sequence

import nats
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PeerInfo

from schemas.codec import decode_worker
from schemas.connection import connect
from schemas.fleet import WorkerInfo
from schemas.settings import CommonSettings
from schemas.subjects import (
    DLQ_STREAM,
    IMAGES_BUCKET,
    JOBS_STREAM,
    OPTIONS_BUCKET,
    RESULTS_STREAM,
    WORKERS_BUCKET,
    jobs_stream,
    workers_bucket,
)

# Every stream headrace provisions; KV buckets and object stores are streams too.
_STREAMS = (
    JOBS_STREAM,
    RESULTS_STREAM,
    DLQ_STREAM,
    f"KV_{WORKERS_BUCKET}",
    f"KV_{OPTIONS_BUCKET}",
    f"OBJ_{IMAGES_BUCKET}",
)


async def live_workers(js: JetStreamContext, bucket: str = WORKERS_BUCKET) -> list[WorkerInfo]:
    """Every record in the ``workers`` bucket (expired ones are gone by TTL)."""
    kv = await js.key_value(bucket)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    out = []
    for key in keys:
        entry = await kv.get(key)
        if entry.value:
            out.append(decode_worker(entry.value))
    return sorted(out, key=lambda w: (w.region, w.id))


async def cluster_lines(js: JetStreamContext) -> list[str]:
    """Which node leads each stream and how its followers stand; nothing on a single server."""
    lines: list[str] = []
    for name in _STREAMS:
        try:
            cluster = (await js.stream_info(name)).cluster
        except nats.js.errors.NotFoundError:
            continue
        if cluster is None or not cluster.name:
            return []  # a standalone server reports no cluster name
        if not lines:
            lines = [f"CLUSTER {cluster.name}", f"{'STREAM':16} {'LEADER':20} FOLLOWERS"]
        followers = ", ".join(_peer(p) for p in cluster.replicas or []) or "-"
        lines.append(f"{name:16} {cluster.leader or '(electing)':20} {followers}")
    return [*lines, ""] if lines else []


def _peer(peer: PeerInfo) -> str:
    if peer.current and not peer.offline:
        return f"{peer.name}"
    seen_s = (peer.active or 0) / 1e9  # nanoseconds since the leader last heard from it
    state = "offline" if peer.offline else f"{peer.lag or 0} behind"
    return f"{peer.name} ({state}, seen {seen_s:.1f} s ago)"


async def render_regions(
    js: JetStreamContext, regions: Sequence[str], spills: Mapping[tuple[str, str], float] = {}
) -> str:
    """A super-cluster's status: per region its servers' reach, workers and queue depth, and
    (from the edges' metrics, when given) the jobs that spilled between regions."""
    lines = [f"{'REGION':10} {'STATE':12} {'WORKERS':>7} {'SLOTS':>9} {'QUEUED':>7} {'RUNNING':>8}"]
    detail: list[str] = []
    for region in regions:
        try:
            async with asyncio.timeout(3):
                workers = await live_workers(js, workers_bucket(region))
                consumers = await js.consumers_info(jobs_stream(region))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
            lines.append(f"{region:10} {'unreachable':12} ({type(e).__name__})")
            continue
        busy = sum(w.busy for w in workers)
        slots = sum(w.slots for w in workers)
        queued = sum(c.num_pending or 0 for c in consumers)
        running = sum(c.num_ack_pending or 0 for c in consumers)
        lines.append(
            f"{region:10} {'up':12} {len(workers):>7} {busy:>4}/{slots:<4} {queued:>7} {running:>8}"
        )
        for w in workers:
            models = ",".join(m.id for m in w.models)
            age = max(0.0, time.time() * 1000 - w.heartbeat_ms) / 1000
            detail.append(
                f"{region:10} {w.id:32} {models:24} {w.busy:>4}/{w.slots:<4} {age:>6.1f}s"
            )
        for c in consumers:
            detail.append(
                f"{region:10} {'queue ' + c.name:32} {'':24} queued {c.num_pending or 0}, "
                f"running {c.num_ack_pending or 0}, redelivered {c.num_redelivered or 0}"
            )
    lines += ["", f"{'REGION':10} {'WORKER / QUEUE':32} {'MODELS':24} {'BUSY':>9} {'BEAT':>7}"]
    lines += detail
    if spills:
        lines += ["", f"{'SPILLS (from edges)':24} {'JOBS':>8}"]
        for (source, target), count in sorted(spills.items()):
            lines.append(f"{source + ' -> ' + target:24} {count:>8.0f}")
    return "\n".join(lines)


def edge_spills(urls: Sequence[str]) -> dict[tuple[str, str], float]:
    """``headrace_edge_region_spills_total`` summed over the edges' ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for url in urls:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=3) as r:
                text = r.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "headrace_edge_region_spills_total":
                    key = (sample.labels["source"], sample.labels["target"])
                    out[key] = out.get(key, 0.0) + sample.value
    return out


async def render(js: JetStreamContext) -> str:
    """The status tables as text."""
    now_ms = time.time() * 1000
    lines = await cluster_lines(js)
    lines += [f"{'REGION':10} {'WORKER':32} {'MODELS':24} {'BUSY':>9} {'BEAT':>7}"]
    for w in await live_workers(js):
        models = ",".join(m.id for m in w.models)
        age = (now_ms - w.heartbeat_ms) / 1000
        lines.append(f"{w.region:10} {w.id:32} {models:24} {w.busy:>4}/{w.slots:<4} {age:>6.1f}s")
    lines += ["", f"{'CONSUMER':32} {'QUEUED':>8} {'RUNNING':>8} {'REDELIVERED':>12}"]
    for c in await js.consumers_info(JOBS_STREAM):
        lines.append(
            f"{c.name:32} {c.num_pending or 0:>8} {c.num_ack_pending or 0:>8} {c.num_redelivered or 0:>12}"
        )
    dlq = await js.stream_info(DLQ_STREAM, subjects_filter=">")
    lines += ["", f"{'DEAD LETTERS':41} {'COUNT':>8}"]
    for subject, count in sorted((dlq.state.subjects or {}).items()):
        lines.append(f"{subject:41} {count:>8}")
    if not dlq.state.subjects:
        lines.append(f"{'(none)':41} {0:>8}")
    return "\n".join(lines)


async def run(
    settings: CommonSettings, watch_s: float | None = None, edges: Sequence[str] = ()
) -> int:
    """Print the status once, or every ``watch_s`` seconds until interrupted."""
    nc = await connect(settings, "headrace-status", connect_timeout_s=5)
    try:
        js = nc.jetstream()
        regions = settings.region_names()
        while True:
            if regions:
                spills = await asyncio.to_thread(edge_spills, edges) if edges else {}
                text = await render_regions(js, regions, spills)
            else:
                text = await render(js)
            if watch_s:
                print("\033[2J\033[H" + time.strftime("%H:%M:%S"), flush=True)
            print(text, flush=True)
            if not watch_s:
                return 0
            await asyncio.sleep(watch_s)
    finally:
        await nc.close()
