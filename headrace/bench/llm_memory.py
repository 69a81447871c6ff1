"""Resident memory of a text worker's engine at 1, 4 and 16 slots, one child process each.

    python -m headrace.bench.llm_memory [--n-ctx N] [--slots 1,4,16] [--model PATH]

Each child loads the model as ``headrace worker llm --slots N`` does (``LlamaEngine``: one
context per model with room for N sequences), runs one short job, and reports its RSS
(``VmRSS``), its proportional set size (``Pss``: file pages mapped by several mappings
counted once) and its peak (``VmHWM``). For comparison it also loads the model the way the
engine did before batching, one ``llama_cpp.Llama`` (weights and context) per slot.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import orjson


def _memory() -> dict[str, float]:
    """This process's RSS, PSS and peak RSS in MiB."""
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            out["Pss"] = int(value.split()[0]) / 1024
    return out


def _child(mode: str, slots: int, n_ctx: int, model: str) -> dict[str, float]:
    from schemas.events import Done
    from schemas.jobs import ChatMessage, TextJob, TextParams
    from schemas.subjects import new_job_id
    from workers.engines.gguf import ModelConfig, route_native_logs

    route_native_logs()  # llama.cpp's own lines to a logger nobody prints
    from workers.settings import WorkerSettings

    config = ModelConfig(
        id="m", path=Path(model), n_ctx=n_ctx, contexts=slots, n_threads=1,
        kv_unified=WorkerSettings().llm_kv_unified,  # HEADRACE_LLM_KV_UNIFIED, as a worker
    )  # fmt: skip
    if mode == "per-slot":
        from headrace.bench.llm_inprocess import load_llama

        contexts = [load_llama(config) for _ in range(slots)]
        contexts[0].create_completion("Hello", max_tokens=4)
        return _memory()

    from workers.engines.llama import LlamaEngine

    async def run() -> dict[str, float]:
        engine = LlamaEngine([config])
        await engine.start()
        params = TextParams(
            messages=[ChatMessage(role="user", content="Hello")], max_tokens=4, seed=1
        )
        job = TextJob(id=new_job_id(), model="m", created_ms=0, params=params)
        async for event in engine.run(job, threading.Event()):
            assert not isinstance(event, Done) or event.usage.completion_tokens > 0
        memory = _memory()
        await engine.close()
        return memory

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    """Print a table of memory per slot count."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-ctx", type=int, default=2048, help="tokens per slot (default 2048)")
    p.add_argument("--slots", default="1,4,16", help="slot counts (default 1,4,16)")
    p.add_argument("--model", help="a GGUF (default: the bundled SmolLM2)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model is None:
        from workers.engines.gguf import bundled_gguf

        args.model = str(bundled_gguf())
    if args.child:
        mode, slots = args.child[0], int(args.child[1])
        sys.stdout.write(orjson.dumps(_child(mode, slots, args.n_ctx, args.model)).decode())
        return 0
    print(f"model {Path(args.model).name}, n_ctx {args.n_ctx} per slot", file=sys.stderr)
    print("| engine | slots | RSS MiB | PSS MiB | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for mode, label in (("batched", "one context, N sequences (now)"),
                        ("per-slot", "one Llama per slot (before)")):  # fmt: skip
        for slots in (int(s) for s in args.slots.split(",")):
            print(f"measuring {mode} at {slots} slot(s) ...", file=sys.stderr)
            argv = [sys.executable, "-m", "headrace.bench.llm_memory", "--n-ctx", str(args.n_ctx)]
            argv += ["--model", args.model, "--child", mode, str(slots)]
            done = subprocess.run(argv, capture_output=True, check=True, timeout=600)
            m = orjson.loads(done.stdout)
            print(f"| {label} | {slots} | {m['VmRSS']:.0f} | {m['Pss']:.0f} | {m['VmHWM']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
