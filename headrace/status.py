"""``headrace status``: who is alive, how deep each queue is, what was dead-lettered."""

from __future__ import annotations

import asyncio
import time

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


async def live_workers(js: JetStreamContext) -> list[WorkerInfo]:
    """Every record in the ``workers`` bucket (expired ones are gone by TTL)."""
    kv = await js.key_value(WORKERS_BUCKET)
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


async def run(settings: CommonSettings, watch_s: float | None = None) -> int:
    """Print the status once, or every ``watch_s`` seconds until interrupted."""
    nc = await connect(settings, "headrace-status", connect_timeout_s=5)
    try:
        js = nc.jetstream()
        while True:
            text = await render(js)
            if watch_s:
                print("\033[2J\033[H" + time.strftime("%H:%M:%S"), flush=True)
            print(text, flush=True)
            if not watch_s:
                return 0
            await asyncio.sleep(watch_s)
    finally:
        await nc.close()
