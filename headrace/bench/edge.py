"""``headrace bench edge``: what the HTTP edge adds, measured with the echo engine.

It starts a nats-server, one echo worker (32 slots) and one edge process, then
measures from this process: (1) time to the first token through the edge
(streamed chat, 1 token) against a direct NATS submit, (2) SSE chunks per second
one edge relays, and (3) requests per second of 1-token non-streamed
completions at 32 concurrent clients.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats

from headrace.bench.common import (
    child,
    percentile,
    private_nats,
    progress,
    pyplot,
    wait_worker,
    write_outputs,
)
from headrace.servers import free_port, wait_for_port
from schemas.client import JobClient
from schemas.events import Delta
from schemas.jobs import ChatMessage, TextJob, TextParams
from schemas.subjects import new_job_id

CHAT = [{"role": "user", "content": "one two three four five six seven eight"}]


async def _first_chunk(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    async with http.post(url, json=body) as resp:
        async for line in resp.content:
            if (
                line.startswith(b'data: {"id"')
                and b'"content":"' in line
                and b'"content":""' not in line
            ):
                first = time.perf_counter() - t0
                await resp.read()
                return first
    raise RuntimeError("the stream ended without content")


async def _direct_first(client: JobClient) -> float:
    job = TextJob(
        id=new_job_id(), model="echo", created_ms=int(time.time() * 1000),
        params=TextParams(messages=[ChatMessage(role="user", content=CHAT[0]["content"])], max_tokens=1, seed=1),
    )  # fmt: skip
    t0 = time.perf_counter()
    async with await client.submit(job) as stream:
        first = None
        async for received in stream:
            if first is None and isinstance(received.event, Delta):
                first = time.perf_counter() - t0
    assert first is not None
    return first


async def _ttft(
    http: aiohttp.ClientSession, base: str, client: JobClient, samples: int
) -> dict[str, Any]:
    body = {"model": "echo", "messages": CHAT, "max_tokens": 1, "stream": True}
    edge_ms, direct_ms = [], []
    for i in range(samples):
        edge_ms.append(await _first_chunk(http, f"{base}/v1/chat/completions", body) * 1000)
        direct_ms.append(await _direct_first(client) * 1000)
        if (i + 1) % max(1, samples // 50) == 0:
            progress("time to first token", i + 1, samples)
    return {
        "samples": samples,
        "edge_ms": edge_ms,
        "direct_ms": direct_ms,
        **{f"edge_p{q}_ms": percentile(edge_ms, q) for q in (50, 99)},
        **{f"direct_p{q}_ms": percentile(direct_ms, q) for q in (50, 99)},
    }


async def _relay_rate(
    http: aiohttp.ClientSession, base: str, streams: int, tokens: int
) -> dict[str, float]:
    body = {"model": "echo", "messages": CHAT, "max_tokens": tokens, "stream": True}
    counted = 0

    async def one() -> int:
        nonlocal counted
        n = 0
        async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    n += 1
                    counted += 1
                    if counted % (streams * tokens // 50) == 0:
                        progress("SSE relay", counted, streams * tokens)
        return n

    t0 = time.perf_counter()
    chunks = sum(await asyncio.gather(*(one() for _ in range(streams))))
    elapsed = time.perf_counter() - t0
    return {"streams": streams, "tokens_per_stream": tokens, "chunks": chunks, "seconds": elapsed,
            "chunks_per_s": chunks / elapsed}  # fmt: skip


async def _rps(
    http: aiohttp.ClientSession, base: str, concurrency: int, requests: int
) -> dict[str, Any]:
    body = {"model": "echo", "messages": CHAT, "max_tokens": 1}
    latencies: list[float] = []
    errors = 0
    remaining = requests

    async def client() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                await resp.read()
                errors += resp.status != 200
            latencies.append((time.perf_counter() - t0) * 1000)
            if len(latencies) % max(1, requests // 50) == 0:
                progress(f"1-token requests x{concurrency}", len(latencies), requests)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": elapsed,
            "rps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99)}  # fmt: skip


async def _measure(
    nats_url: str, base: str, key: str, samples: int, requests: int
) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=64)
    try:
        await wait_worker(nc, "bench")
        async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
            client = JobClient(nc)
            await _ttft(http, base, client, 10)  # warm-up, not reported
            ttft = await _ttft(http, base, client, samples)
            relay = await _relay_rate(http, base, streams=4, tokens=5000)
            rps = await _rps(http, base, concurrency=32, requests=requests)
    finally:
        await nc.close()
    return {"ttft": ttft, "relay": relay, "rps": rps}


def _plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    ttft = result["ttft"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values, color in (("through the edge (SSE)", ttft["edge_ms"], "#d8573b"),
                                 ("direct NATS submit", ttft["direct_ms"], "#3b7dd8")):  # fmt: skip
        xs = sorted(values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label, color=color)
    ax.set_xlabel("time to first token, 1-token echo job (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("What the edge adds to the first token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(samples: int, requests: int, out: Path) -> int:
    """Run the edge benchmark and write ``edge.{json,md,png}`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    print(
        "headrace bench edge: echo engine, nats-server, one worker (32 slots), one edge",
        file=sys.stderr,
    )
    key, port = f"bench-{secrets.token_hex(8)}", free_port()
    with private_nats() as server:
        env = {"HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
        edge_env = {
            **env,
            "HEADRACE_API_KEYS": key,
            "HEADRACE_PORT": str(port),
            "HEADRACE_KEEPALIVE_S": "15",
        }
        with (
            child(["worker", "echo", "--worker-id", "bench", "--slots", "32"], env),
            child(["edge"], edge_env),
        ):
            wait_for_port(port, 30)
            result = asyncio.run(
                _measure(server.url, f"http://127.0.0.1:{port}", key, samples, requests)
            )
    t, r, q = result["ttft"], result["relay"], result["rps"]
    table = (
        "| measure | value |\n|---|---|\n"
        f"| time to first token through the edge, p50 / p99 | {t['edge_p50_ms']:.2f} / {t['edge_p99_ms']:.2f} ms |\n"
        f"| the same by direct NATS submit, p50 / p99 | {t['direct_p50_ms']:.2f} / {t['direct_p99_ms']:.2f} ms |\n"
        f"| edge overhead on the first token (difference of p50s / p99s) | {t['edge_p50_ms'] - t['direct_p50_ms']:.2f} / "
        f"{t['edge_p99_ms'] - t['direct_p99_ms']:.2f} ms |\n"
        f"| SSE chunks relayed per second ({r['streams']} streams) | {r['chunks_per_s']:.0f} |\n"
        f"| 1-token non-streamed requests/s at {q['concurrency']} clients | {q['rps']:.0f} "
        f"(p50 {q['p50_ms']:.1f} ms, p99 {q['p99_ms']:.1f} ms, {q['errors']} errors) |\n"
    )
    write_outputs(out, "edge", result, table, _plot)
    return 0
