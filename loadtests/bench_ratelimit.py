"""What rate limiting costs: admission overhead with a local valkey, and one edge's throughput
with limits on versus off.

    .venv/bin/python loadtests/bench_ratelimit.py [--samples 5000] [--requests 3000] [--rounds 2]

1. Admission overhead, in this process against a local valkey: ``Limiter.admit`` (one EVALSHA:
   requests, tokens and a parallel lease checked and charged together) and ``Limiter.settle``
   (one EVALSHA: real usage replaces the estimate, the lease is released), one at a time.
2. End to end: a nats-server, one echo worker (32 slots) and one edge process, with a key
   limited on requests, tokens and parallel requests (limits far above the load, so nothing is
   refused) or unlimited (the edge never talks to valkey). 1-token non-streamed chat
   completions: latency one at a time, then requests per second at 32 concurrent clients.
   Rounds alternate off/on so drift on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import uvloop

from edge.auth import ApiKey, digest
from edge.metrics import EdgeMetrics
from edge.ratelimit.admission import Limiter
from edge.ratelimit.limits import Limits
from edge.settings import EdgeSettings
from headrace.servers import NatsServer, ValkeyServer, free_port, wait_for_port
from schemas.subjects import WORKERS_BUCKET, worker_key
from schemas.topology import Limits as StreamLimits
from schemas.topology import provision

CHAT = [{"role": "user", "content": "one two three four five six seven eight"}]
BIG = {"rpm": 10**9, "tpm": 10**12, "max_parallel": 10**6}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(values_ms: list[float]) -> str:
    return f"p50 {pct(values_ms, 50):.3f} ms, p99 {pct(values_ms, 99):.3f} ms"


async def admission(redis_url: str, samples: int) -> dict[str, list[float]]:
    """Time admit and settle, one at a time, for a limited key and for an unlimited one."""
    limiter = Limiter(EdgeSettings(redis_url=redis_url, api_keys="x"), EdgeMetrics())
    await limiter.start()
    d = digest("bench")
    limited = ApiKey("key-bench", "bench", d, Limits(**BIG))
    unlimited = ApiKey("key-free", "free", d)
    out: dict[str, list[float]] = {"admit": [], "settle": [], "both": [], "unlimited": []}
    try:
        for i in range(samples + 200):
            t0 = time.perf_counter()
            ticket = await limiter.admit(limited, tokens=120)
            t1 = time.perf_counter()
            await limiter.settle(ticket, 60)
            t2 = time.perf_counter()
            free = await limiter.admit(unlimited, tokens=120)
            await limiter.settle(free, 60)
            t3 = time.perf_counter()
            if not ticket.recorded or ticket.refusal is not None:
                raise RuntimeError("the limited key was not admitted")
            if i >= 200:  # warm-up
                out["admit"].append((t1 - t0) * 1000)
                out["settle"].append((t2 - t1) * 1000)
                out["both"].append((t2 - t0) * 1000)
                out["unlimited"].append((t3 - t2) * 1000)
    finally:
        await limiter.close()
    return out


@contextlib.contextmanager
def child(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "headrace", *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=out,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


async def provisioned(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await provision(nc.jetstream(), StreamLimits(jobs_max_msgs=100_000), [("llm", "echo")])
    finally:
        await nc.close()


async def wait_worker(url: str, worker_id: str) -> None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(WORKERS_BUCKET)
        for _ in range(600):
            with contextlib.suppress(Exception):
                if (await kv.get(worker_key(worker_id))).value:
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError("the echo worker did not register")
    finally:
        await nc.close()


async def drive(base: str, key: str, sequential: int, requests: int) -> dict[str, Any]:
    """Latency one at a time, then requests per second at 32 concurrent clients."""
    body = {"model": "echo", "messages": CHAT, "max_tokens": 1}
    url = f"{base}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(
        headers=headers, connector=aiohttp.TCPConnector(limit=64)
    ) as http:
        limited = False
        one_ms = []
        for i in range(sequential + 50):
            t0 = time.perf_counter()
            async with http.post(url, json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
                limited = "x-ratelimit-limit-requests" in resp.headers
            if i >= 50:
                one_ms.append((time.perf_counter() - t0) * 1000)
        left, errors = requests, 0

        async def client() -> None:
            nonlocal left, errors
            while left > 0:
                left -= 1
                async with http.post(url, json=body) as resp:
                    await resp.read()
                    errors += resp.status != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(32)))
        rps = requests / (time.perf_counter() - t0)
    return {"limited": limited, "one_ms": one_ms, "rps": rps, "errors": errors}


def end_to_end(
    nats_url: str, valkey: ValkeyServer, tmp: Path, sequential: int, requests: int, rounds: int
) -> dict[str, list[dict[str, Any]]]:
    keys = tmp / "keys.toml"
    limits = "\n".join(f"{k} = {v}" for k, v in BIG.items())
    keys.write_text(
        f'[[keys]]\nname = "limited"\nsha256 = "{hashlib.sha256(b"sk-limited").hexdigest()}"\n'
        f'{limits}\n\n[[keys]]\nname = "free"\nsha256 = "{hashlib.sha256(b"sk-free").hexdigest()}"\n'
    )
    port = free_port()
    env = {"HEADRACE_NATS_URL": nats_url, "HEADRACE_LOG_LEVEL": "WARNING"}
    edge_env = {**env, "HEADRACE_PORT": str(port), "HEADRACE_KEYS_FILE": str(keys),
                "HEADRACE_API_KEYS": "", "HEADRACE_REDIS_URL": valkey.url}  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    asyncio.run(provisioned(nats_url))
    worker = ["worker", "echo", "--worker-id", "bench", "--slots", "32"]
    with child(worker, env, tmp / "worker.log"), child(["edge"], edge_env, tmp / "edge.log"):
        wait_for_port(port, 30)
        asyncio.run(wait_worker(nats_url, "bench"))
        base = f"http://127.0.0.1:{port}"
        for r in range(rounds):
            for mode, key in (("off", "sk-free"), ("on", "sk-limited")):
                got = asyncio.run(drive(base, key, sequential, requests))
                if got["limited"] != (mode == "on"):
                    raise RuntimeError("the limits were not what the round expected")
                results[mode].append(got)
                print(
                    f"  round {r + 1}, limits {mode:3}: {got['rps']:.0f} req/s at 32 clients "
                    f"({got['errors']} errors); one at a time {summary(got['one_ms'])}",
                    file=sys.stderr,
                )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000, help="admit+settle pairs timed")
    parser.add_argument("--sequential", type=int, default=500, help="requests one at a time")
    parser.add_argument("--requests", type=int, default=3000, help="requests at 32 clients")
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="headrace-bench-rl-") as tmp_dir:
        tmp = Path(tmp_dir)
        valkey = ValkeyServer(tmp / "valkey")
        server = NatsServer(tmp / "nats")
        valkey.start()
        server.start()
        try:
            timings = uvloop.run(admission(valkey.url, args.samples))
            e2e = end_to_end(server.url, valkey, tmp, args.sequential, args.requests, args.rounds)
        finally:
            server.stop()
            valkey.stop()
    print(f"\nadmission overhead, local valkey, {args.samples} requests one at a time:")
    print(f"  admit  (1 EVALSHA)       {summary(timings['admit'])}")
    print(f"  settle (1 EVALSHA)       {summary(timings['settle'])}")
    print(f"  admit + settle           {summary(timings['both'])}")
    print(f"  unlimited key (no Redis) {summary(timings['unlimited'])}")
    print("\none edge, 1-token non-streamed chat completions, echo worker (32 slots):")
    for mode in ("off", "on"):
        runs = e2e[mode]
        rps = [r["rps"] for r in runs]
        one = [ms for r in runs for ms in r["one_ms"]]
        print(
            f"  limits {mode:3}: {statistics.median(rps):.0f} req/s at 32 clients "
            f"(rounds: {', '.join(f'{x:.0f}' for x in rps)}); one at a time {summary(one)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
