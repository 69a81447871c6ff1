"""The in-process paths of ``headrace bench llm``, each run in a child process of its own.

    python -m headrace.bench.llm_inprocess {llama-cpp-python|engine [SLOTS]} < workload.json

reads the workload on stdin, shows progress on stderr and prints the levels as
JSON on stdout. A child of its own, because llama.cpp's CPU backend uses OpenMP:
its threads keep spinning after a generation, and once a second OS thread has
driven llama.cpp in a process, decoding there slows down by half on 2 cores. So
every call into llama.cpp here happens on one thread for the child's whole life.

* ``llama-cpp-python``: ``Llama.create_chat_completion(stream=True)``, the
  ceiling. One context serves the clients in turn; ``reset()`` before each
  request, so every prompt is evaluated in full, as headrace does.
* ``engine``: headrace's ``LlamaEngine`` (its own sampler chain, continuous batching,
  prefix cache, streaming and coalescing, with the worker's stream interval) with
  ``SLOTS`` slots (default 1), without NATS, a worker or the edge.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import orjson

from headrace.bench.llm_workload import SAMPLING, Level, Sample, Workload, run_levels
from schemas.events import Delta, Done
from schemas.jobs import ChatMessage, TextJob, TextParams
from schemas.subjects import new_job_id
from workers.engines.gguf import ModelConfig
from workers.engines.llama import LlamaEngine
from workers.settings import WorkerSettings


def load_llama(config: ModelConfig) -> llama_cpp.Llama:
    """The GGUF with one llama-cpp-python context, as the engine's settings have it (flash
    attention on unless the config turns it off: llama.cpp's "auto" turns it on for the CPU,
    and ``Llama`` takes only on or off)."""
    return llama_cpp.Llama(
        model_path=str(config.path),
        n_ctx=config.n_ctx,
        n_batch=config.n_batch,
        n_threads=config.threads(),
        n_threads_batch=config.threads_batch(),
        n_gpu_layers=config.n_gpu_layers,
        flash_attn=config.flash_attn is not False,
        logits_all=False,
        verbose=False,
    )


async def llama_cpp_python(workload: Workload) -> list[Level]:
    """llama-cpp-python's streaming chat completion on one context and one thread."""
    config = _config(workload)
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
    loop = asyncio.get_running_loop()
    llm = await loop.run_in_executor(thread, load_llama, config)

    def generate(sample: Sample, k: int, t0: float) -> Sample:
        llm.reset()  # no prompt-prefix reuse between requests
        chunks: Iterator[dict[str, Any]] = llm.create_chat_completion(  # type: ignore[assignment]
            messages=workload.messages(k),  # type: ignore[arg-type]
            max_tokens=workload.max_tokens,
            seed=workload.seed_of(k),
            stream=True,
            **SAMPLING,
        )
        for chunk in chunks:
            choice = chunk["choices"][0]
            sample.piece(choice["delta"].get("content") or "", time.perf_counter() - t0)
            sample.finish = choice["finish_reason"] or sample.finish
        return sample.close()

    async def one(k: int, t0: float) -> Sample:
        sample = Sample(request=k, prompt=workload.prompt_of(k), start_s=time.perf_counter() - t0)
        return await loop.run_in_executor(thread, generate, sample, k, t0)

    try:
        return await run_levels(workload, one, "in-process")
    finally:
        await loop.run_in_executor(thread, llm.close)
        thread.shutdown()


async def engine(workload: Workload, slots: int = 1) -> list[Level]:
    """headrace's LlamaEngine with ``slots`` slots, called directly."""
    llama = LlamaEngine([_config(workload, slots)])
    await llama.start()

    async def one(k: int, t0: float) -> Sample:
        sample = Sample(request=k, prompt=workload.prompt_of(k), start_s=time.perf_counter() - t0)
        params = TextParams(
            messages=[ChatMessage(role="user", content=m["content"]) for m in workload.messages(k)],
            max_tokens=workload.max_tokens,
            seed=workload.seed_of(k),
            **SAMPLING,
        )
        job = TextJob(
            id=new_job_id(),
            model=workload.model_id,
            created_ms=int(time.time() * 1000),
            params=params,
        )
        async for event in llama.run(job, threading.Event()):
            if isinstance(event, Delta):
                sample.piece(event.text, time.perf_counter() - t0)
            elif isinstance(event, Done):
                sample.finish = event.finish_reason
        return sample.close()

    try:
        return await run_levels(workload, one, f"engine ({slots} slot{'s' if slots > 1 else ''})")
    finally:
        await llama.close()


def _config(workload: Workload, slots: int = 1) -> ModelConfig:
    worker = WorkerSettings()  # the worker's defaults (and HEADRACE_* overrides)
    return ModelConfig(
        id=workload.model_id,
        path=Path(workload.model_path),
        n_ctx=workload.n_ctx,
        n_threads=workload.threads,
        n_threads_batch=workload.threads,
        contexts=slots,
        stream_interval_s=worker.llm_stream_interval_ms / 1000,
        cache_ram_mib=worker.llm_cache_ram_mib,
        kv_unified=worker.llm_kv_unified,
    )


def main(mode: str, *args: str) -> int:
    """Run one in-process path on the workload read from stdin; print its levels."""
    workload = Workload.from_json(orjson.loads(sys.stdin.buffer.read()))
    if mode == "engine":
        levels = asyncio.run(engine(workload, int(args[0]) if args else 1))
    else:
        levels = asyncio.run(llama_cpp_python(workload))
    sys.stdout.buffer.write(orjson.dumps([level.to_json() for level in levels]))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
