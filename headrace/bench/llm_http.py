"""Streaming OpenAI chat completions over HTTP, as ``headrace bench llm`` sends them to a server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from headrace.bench.llm_workload import Level, Sample, Workload, run_levels


async def stream_chat(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], sample: Sample, t0: float
) -> Sample:
    """Send one streaming chat completion and record its content chunks into ``sample``."""
    try:
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return sample.close()
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue  # blank lines, ": ping" and ": keep-alive" comments
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                _chunk(orjson.loads(data), sample, time.perf_counter() - t0)
                if sample.error:
                    break
    except (TimeoutError, aiohttp.ClientError) as e:
        sample.error = f"{type(e).__name__}: {e}"[:200]
    return sample.close()


def _chunk(chunk: dict[str, Any], sample: Sample, now_s: float) -> None:
    if "error" in chunk:
        sample.error = str(chunk["error"])[:200]
        return
    for choice in chunk.get("choices") or []:
        sample.piece(choice.get("delta", {}).get("content") or "", now_s)
        sample.finish = choice.get("finish_reason") or sample.finish


def client(headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """The benchmark's HTTP client: no overall timeout, a new connection for every request.

    llama.cpp's llama-server closes a keep-alive connection after a request or a few, and
    a request sent on a pooled connection it has just closed fails ("Can not write request
    body"); every system gets the same fresh loopback connection instead (well under a
    millisecond next to a generation).
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)


async def measure(
    workload: Workload, base_url: str, name: str, headers: dict[str, str] | None = None
) -> list[Level]:
    """Warm up, then every concurrency level against one OpenAI-compatible server."""
    url = f"{base_url}/v1/chat/completions"
    async with client(headers) as http:

        async def one(k: int, t0: float) -> Sample:
            sample = Sample(
                request=k, prompt=workload.prompt_of(k), start_s=time.perf_counter() - t0
            )
            return await stream_chat(http, url, workload.chat_body(k), sample, t0)

        return await run_levels(workload, one, name)


async def wait_model(
    base_url: str, model_id: str, headers: dict[str, str], timeout_s: float
) -> None:
    """Until ``GET /v1/models`` lists the model (its worker has loaded it and registered)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(headers=headers) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{base_url}/v1/models") as resp:
                    if resp.status == 200:
                        listed = (await resp.json())["data"]
                        if any(m["id"] == model_id for m in listed):
                            return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{model_id} was not served at {base_url} within {timeout_s} s")
