"""``headrace status``: who is alive, how deep each queue is, what was dead-lettered."""

from __future__ import annotations

import asyncio
import time

import nats
import nats.js.errors
from nats.js import JetStreamContext

from schemas.codec import decode_worker
from schemas.connection import connect
from schemas.fleet import WorkerInfo
from schemas.settings import CommonSettings
from schemas.subjects import DLQ_STREAM, JOBS_STREAM, WORKERS_BUCKET


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


async def render(js: JetStreamContext) -> str:
    """The status tables as text."""
    now_ms = time.time() * 1000
    lines = [f"{'REGION':10} {'WORKER':32} {'MODELS':24} {'BUSY':>9} {'BEAT':>7}"]
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
