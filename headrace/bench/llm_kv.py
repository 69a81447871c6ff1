"""A decode step's time by KV-cache layout: a stream per slot against one unified buffer.

    python -m headrace.bench.llm_kv [--sequences 4,8,16] [--cells 130] [--steps 60]
                                    [--threads N] [--model PATH] [--out DIR]

For each number of running sequences, four contexts of the same weights hold that many
sequences of ``--cells`` cells each (about a chat turn of the LLM bench: prompt and 64
tokens) and decode one token for each, step after step; the steps go round the contexts in
turn, so the VM's drift (10-20 % here) falls on all of them alike, and each figure is the
median over the steps, with its median ratio, step by step, to the unified row:

- unified: one buffer for every sequence (``--kv-unified``); a token's attention walks all
  the cells up to the highest one in use, other sequences' masked out;
- unified + cached: as many finished sequences again kept in cells beside the running ones
  (the prefix cache's default: one per slot);
- split: a stream per sequence (the engine's default, llama-server's with ``-np``), the
  running ones at consecutive ids, as the scheduler keeps them: one micro-batch a step;
- split, one gap: the same with a free stream between the running ones, which llama.cpp
  cuts the step at (two micro-batches: the weights are read twice).

Writes ``llm-kv.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from headrace.bench.common import progress, pyplot, write_outputs


@dataclass(frozen=True)
class Layout:
    key: str
    label: str
    unified: bool
    cached: bool = False  # as many finished sequences again beside the running ones
    gap: bool = False  # a free stream in the middle of the running ids


LAYOUTS = (
    Layout("unified", "unified", True),
    Layout("unified-cached", "unified + as many cached", True, cached=True),
    Layout("split", "split (the default)", False),
    Layout("split-gap", "split, one gap in the ids", False, gap=True),
)


def measure(
    model_path: Path, sequences: int, cells: int, steps: int, threads: int
) -> dict[str, dict[str, float]]:
    """Median step ms of every layout at ``sequences`` running, and its ratio to unified's."""
    import llama_cpp

    from workers.engines.gguf import ModelConfig, load_model, new_context

    n_ctx = cells + steps + 8
    base = ModelConfig(
        id="m", path=model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        contexts=sequences, cache_seqs=sequences, embeddings=False,
    )  # fmt: skip
    weights = load_model(base)
    batch = llama_cpp.llama_batch_init(max(512, cells), 0, 1)
    contexts = []

    def decode(ctx: Any, items: list[tuple[int, int, int]]) -> None:
        for n, (seq, pos, token) in enumerate(items):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = True
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        running: list[list[int]] = []
        for layout in LAYOUTS:
            # The gap takes one more stream; cached sequences hold the low ids (as finished
            # jobs do), the running ones above them.
            config = replace(
                base,
                kv_unified=layout.unified,
                contexts=sequences + layout.gap,
                cache_seqs=sequences if layout.cached else 0,
            )
            ctx = new_context(weights, config, n_ctx * (2 if layout.cached else 1))
            contexts.append(ctx)
            ids = list(range(sequences + layout.gap))
            if layout.gap:
                ids.remove(sequences // 2)
            filled = ids + [sequences + s for s in range(sequences if layout.cached else 0)]
            for seq in filled:
                for start in range(0, cells, 512):
                    decode(
                        ctx, [(seq, p, 100 + p % 50) for p in range(start, min(cells, start + 512))]
                    )
            running.append(ids)
        times: list[list[float]] = [[] for _ in LAYOUTS]
        for k in range(steps):
            for i, ctx in enumerate(contexts):
                started = time.perf_counter()
                decode(ctx, [(seq, cells + k, 200) for seq in running[i]])
                times[i].append((time.perf_counter() - started) * 1000)
            progress(f"{sequences} sequences", k + 1, steps)
    finally:
        for ctx in contexts:
            ctx.close()
        llama_cpp.llama_batch_free(batch)
        weights.close()
    return {
        layout.key: {
            "ms": statistics.median(times[i]),
            "ratio": statistics.median(a / b for a, b in zip(times[i], times[0], strict=True)),
        }
        for i, layout in enumerate(LAYOUTS)
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| running sequences | "
        + " | ".join(f"{x.label}: ms/step (ratio)" for x in LAYOUTS)
        + " |",
        "|---" * (len(LAYOUTS) + 1) + "|",
    ]
    for n, row in result["rows"].items():
        cells = [f"{row[x.key]['ms']:.1f} ({row[x.key]['ratio']:.2f})" for x in LAYOUTS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    counts = list(result["rows"])
    width = 0.8 / len(LAYOUTS)
    for i, layout in enumerate(LAYOUTS):
        xs = [c + (i - (len(LAYOUTS) - 1) / 2) * width for c in range(len(counts))]
        ax.bar(xs, [result["rows"][n][layout.key]["ms"] for n in counts], width, label=layout.label)
    ax.set_xticks(range(len(counts)), [f"{n} sequences" for n in counts])
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(f"one token per sequence, {result['cells']} cells each")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", default="4,8,16", help="running sequences (default 4,8,16)")
    p.add_argument("--cells", type=int, default=130, help="cells per sequence (default 130)")
    p.add_argument("--steps", type=int, default=60, help="steps per layout (default 60)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: CPUs)")
    p.add_argument("--model", type=Path, help="a GGUF (default: the bundled SmolLM2)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    if args.cells < 1 or args.steps < 1:
        p.error("--cells and --steps must be at least 1")
    from workers.engines.gguf import bundled_gguf, cpu_count, route_native_logs

    route_native_logs()
    model = args.model or bundled_gguf()
    threads = args.threads or cpu_count()
    counts = [int(n) for n in args.sequences.split(",")]
    print(
        f"llm-kv: {model.name}, {args.cells} cells a sequence, {threads} thread(s)", file=sys.stderr
    )
    rows = {str(n): measure(model, n, args.cells, args.steps, threads) for n in counts}
    result = {"model": model.name, "cells": args.cells, "threads": threads, "rows": rows}
    write_outputs(args.out, "llm-kv", result, table(result), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
