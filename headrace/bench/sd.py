"""``headrace bench sd``: seconds per diffusion step in-process versus through headrace, and
what the ``images`` object store adds for a large result.

* ``in-process``: the demo pipeline called with diffusers directly, in this process (the
  ceiling);
* ``headrace``: nats-server, a ``headrace worker sd`` process and the edge, one
  ``/sdapi/v1/txt2img`` request at a time over HTTP, timed from send to the decoded body;
* ``object store``: a 2 MB PNG put into and fetched back from the ``images`` bucket with the
  same ``ImageStore`` the worker and the edge use (what a result too large to travel inline
  costs).

Both generation paths use the same pipeline directory, size, sampler, seed, steps and torch
threads, are warmed up first, and take turns request by request. Seconds per step is the
median request time divided by the steps, so the headrace figure includes everything a
client waits for.
"""

from __future__ import annotations

import asyncio
import io
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats

from headrace.bench.common import child, private_nats, progress, pyplot, wait_worker, write_outputs
from headrace.servers import free_port, wait_for_port
from headrace.tiny_sd import build_tiny_sd
from schemas.image_store import ImageStore

SIZE = 64
PROMPT = "a lighthouse on a cliff at dusk"
STORE_BYTES = 2 * 1024 * 1024


Timer = Callable[[int], Awaitable[float]]


def _in_process(pipeline_dir: Path, threads: int) -> Timer:
    """A timer of one request to diffusers called directly, in this process."""
    import torch
    from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # this module prints its own progress
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()  # accelerate's absence is no news here
    torch.set_num_threads(threads)
    pipe = AutoPipelineForText2Image.from_pretrained(
        str(pipeline_dir), dtype=torch.float32, low_cpu_mem_usage=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    async def once(n: int) -> float:
        t0 = time.perf_counter()
        image = pipe(
            PROMPT, num_inference_steps=n, guidance_scale=7.0, width=SIZE, height=SIZE,
            generator=torch.Generator("cpu").manual_seed(1),
        ).images[0]  # fmt: skip
        image.save(io.BytesIO(), format="PNG")  # the worker encodes a PNG too
        return time.perf_counter() - t0

    return once


def _through_edge(http: aiohttp.ClientSession) -> Timer:
    """A timer of one ``/sdapi/v1/txt2img`` request, send to decoded body."""
    body = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "seed": 1, "sampler_name": "Euler"}

    async def once(n: int) -> float:
        t0 = time.perf_counter()
        async with http.post("/sdapi/v1/txt2img", json={**body, "steps": n}) as r:
            payload = await r.json()
            if r.status != 200:
                raise RuntimeError(f"txt2img failed: {payload}")
        return time.perf_counter() - t0

    return once


async def _side_by_side(
    direct: Timer, headrace: Timer, steps: list[int], repeats: int
) -> dict[str, dict[int, float]]:
    """Median seconds per request of each path. The paths alternate request by request, so
    both see the same machine (on a shared VM, speed drifts by 20 % from minute to minute)."""
    for timer in (direct, headrace):
        await timer(2)  # warm-up
    times: dict[str, dict[int, list[float]]] = {"direct": {}, "headrace": {}}
    for n in steps:
        for i in range(repeats):
            times["direct"].setdefault(n, []).append(await direct(n))
            times["headrace"].setdefault(n, []).append(await headrace(n))
            progress(f"{n} steps, both paths in turn", i + 1, repeats)
    return {
        path: {n: statistics.median(ts) for n, ts in by_steps.items()}
        for path, by_steps in times.items()
    }


async def _object_store(url: str, repeats: int) -> dict[str, float]:
    """Median milliseconds to put and to get a 2 MB result."""
    data = os.urandom(STORE_BYTES)  # incompressible, like a large PNG
    nc = await nats.connect(url)
    try:
        store = ImageStore(nc.jetstream())
        puts, gets = [], []
        for i in range(repeats):
            name = f"bench/{i}.png"
            t0 = time.perf_counter()
            await store.put(name, data)
            t1 = time.perf_counter()
            back = await store.get(name)
            t2 = time.perf_counter()
            if back != data:
                raise RuntimeError("the object store returned different bytes")
            puts.append((t1 - t0) * 1000)
            gets.append((t2 - t1) * 1000)
            progress("object store, 2 MB", i + 1, repeats)
    finally:
        await nc.close()
    return {"put_ms": statistics.median(puts), "get_ms": statistics.median(gets)}


def run(*, quick: bool, out: Path, threads: int | None) -> int:
    """Measure, then write sd.json, sd.md and sd.png under ``out``."""
    steps = [4, 10] if quick else [4, 20, 50]
    repeats = 2 if quick else 9
    threads = threads or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headrace-bench-sd-") as tmp:
        pipeline_dir = build_tiny_sd(Path(tmp) / "tiny-sd")
        print(f"tiny-sd at {SIZE}x{SIZE}, Euler, torch threads {threads}", flush=True)
        direct = _in_process(pipeline_dir, threads)
        with private_nats() as server:
            key = f"bench-{secrets.token_hex(8)}"
            port = free_port()
            env = {"HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
            worker = ["worker", "sd", "--worker-id", "bench-sd", "--model", f"tiny-sd={pipeline_dir}",
                      "--torch-threads", str(threads)]  # fmt: skip
            edge_env = {**env, "HEADRACE_API_KEYS": key, "HEADRACE_PORT": str(port)}
            with child(worker, env), child(["edge"], edge_env) as edge:
                wait_for_port(port, 60, edge)
                medians = asyncio.run(_measure(server.url, port, key, direct, steps, repeats))
            store = asyncio.run(_object_store(server.url, 5 if quick else 20))
    result = _result(steps, medians["direct"], medians["headrace"], store, threads)
    write_outputs(out, "sd", result, table(result), plot)
    return 0


async def _measure(
    url: str, port: int, key: str, direct: Timer, steps: list[int], repeats: int
) -> dict[str, dict[int, float]]:
    nc = await nats.connect(url)
    try:
        await wait_worker(nc, "bench-sd")
    finally:
        await nc.close()
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers=headers) as http:
        return await _side_by_side(direct, _through_edge(http), steps, repeats)


def _result(
    steps: list[int], direct: dict[int, float], headrace: dict[int, float],
    store: dict[str, float], threads: int,
) -> dict[str, Any]:  # fmt: skip
    rows = [
        {
            "steps": n,
            "in_process_s": direct[n],
            "headrace_s": headrace[n],
            "in_process_s_per_step": direct[n] / n,
            "headrace_s_per_step": headrace[n] / n,
            "ratio": headrace[n] / direct[n],
            "overhead_ms": (headrace[n] - direct[n]) * 1000,
        }
        for n in steps
    ]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": threads,
        },
        "size": SIZE,
        "rows": rows,
        "object_store": {"bytes": STORE_BYTES, **store},
    }


def table(result: dict[str, Any]) -> str:
    """The markdown table."""
    lines = [
        "| steps | in-process s/step | headrace s/step | headrace / in-process "
        "| headrace - in-process per request |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['steps']} | {r['in_process_s_per_step']:.4f} | {r['headrace_s_per_step']:.4f} "
            f"| {r['ratio']:.3f} | {r['overhead_ms']:+.1f} ms |"
        )
    s = result["object_store"]
    lines.append("")
    lines.append(
        f"Object store, {s['bytes'] / 1e6:.1f} MB result: put {s['put_ms']:.1f} ms, "
        f"get {s['get_ms']:.1f} ms, {s['put_ms'] + s['get_ms']:.1f} ms in all (median)."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Seconds per step by step count, both paths (False without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    xs = [str(r["steps"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    positions = range(len(xs))
    ax.bar([p - width / 2 for p in positions], [r["in_process_s_per_step"] for r in rows], width,
           label="diffusers in-process")  # fmt: skip
    ax.bar([p + width / 2 for p in positions], [r["headrace_s_per_step"] for r in rows], width,
           label="headrace (HTTP, NATS, worker)")  # fmt: skip
    ax.set_xticks(list(positions), xs)
    ax.set_xlabel("steps per request")
    ax.set_ylabel("seconds per step (median request / steps)")
    ax.set_title(f"tiny-sd {result['size']}x{result['size']} on {result['machine']['cpus']} CPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
