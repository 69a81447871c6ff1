"""What batching buys embeddings, and what the embedding context costs in memory.

    .venv/bin/python loadtests/bench_embeddings.py [--inputs 64] [--rounds 3] [--threads 2]

1. Time: the llama.cpp engine in this process (no broker, no edge) on the bundled SmolLM2
   embeds ``--inputs`` short sentences as one job (packed into as few ``llama_decode``
   calls as fit, as a request's inputs are) and as one job per input (what a client that
   sends them one by one costs), rounds alternating so drift on a shared machine hits both.
2. Memory: the resident set of a process that loaded the model with its embedding context
   and of one that loaded it without (each in a fresh process).

Prints a table and writes ``bench-results/embeddings.json`` and ``embeddings.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from schemas.jobs import EmbedJob, EmbedParams
from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

OUT = Path("bench-results")
WORDS = [
    "the",
    "keeper",
    "of",
    "the",
    "lighthouse",
    "counted",
    "ships",
    "while",
    "rain",
    "fell",
    "on",
    "the",
    "harbour",
]


def sentences(n: int) -> list[str]:
    """``n`` different sentences of 6 to 12 words."""
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(6 + i % 7)) for i in range(n)]


def config(threads: int, embeddings: bool = True) -> ModelConfig:
    return ModelConfig(
        id=DEFAULT_MODEL_ID,
        path=bundled_gguf(),
        n_ctx=2048,
        n_threads=threads,
        embeddings=embeddings,
    )


async def embed(engine: LlamaEngine, inputs: list[str]) -> None:
    job = EmbedJob(
        id="bench-embeddings-job", model=DEFAULT_MODEL_ID, created_ms=0,
        params=EmbedParams(inputs=inputs),
    )  # fmt: skip
    async for _ in engine.embed(job, threading.Event()):
        pass


async def timings(n: int, rounds: int, threads: int) -> dict[str, list[float]]:
    engine = LlamaEngine([config(threads)])
    await engine.start()
    texts = sentences(n)
    out: dict[str, list[float]] = {"one job": [], "one job per input": []}
    try:
        await embed(engine, texts[:2])  # warm up
        for r in range(rounds):
            print(f"round {r + 1}/{rounds} ...", file=sys.stderr)
            started = time.perf_counter()
            await embed(engine, texts)
            out["one job"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for t in texts:
                await embed(engine, [t])
            out["one job per input"].append(time.perf_counter() - started)
    finally:
        await engine.close()
    return out


def rss_mb(embeddings: bool, threads: int) -> float:
    """The resident set of a fresh process once the model (and maybe its embedding context)
    is loaded."""
    code = (
        "import asyncio, sys\n"
        "from loadtests.bench_embeddings import config\n"
        "from workers.engines.llama import LlamaEngine\n"
        f"e = LlamaEngine([config({threads}, {embeddings})])\n"
        "asyncio.run(e.start())\n"
        "rss = next(l for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
        "print(int(rss.split()[1]) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def plot(times: dict[str, list[float]], n: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(times)
    ax.barh(names, [n / statistics.median(times[k]) for k in names])
    ax.set_xlabel("inputs embedded per second (median of rounds)")
    ax.set_title(f"SmolLM2-135M, {n} inputs")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    times = asyncio.run(timings(a.inputs, a.rounds, a.threads))
    print("measuring memory in fresh processes ...", file=sys.stderr)
    memory = {"with": rss_mb(True, a.threads), "without": rss_mb(False, a.threads)}
    print(f"\n{a.inputs} inputs, {a.threads} thread(s), {a.rounds} alternating rounds")
    print("| how | seconds (median, range) | inputs/s |\n|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(
            f"| {name} | {med:.2f} ({min(values):.2f}-{max(values):.2f}) | {a.inputs / med:.0f} |"
        )
    print(f"\nRSS with the embedding context (n_ctx 2048): {memory['with']:.0f} MB; "
          f"without: {memory['without']:.0f} MB")  # fmt: skip
    OUT.mkdir(exist_ok=True)
    result = {"inputs": a.inputs, "threads": a.threads, "seconds": times, "rss_mb": memory}
    (OUT / "embeddings.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(times, a.inputs, OUT / "embeddings.png")


if __name__ == "__main__":
    main()
