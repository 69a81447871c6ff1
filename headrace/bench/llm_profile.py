"""Where a single stream's time goes in the llama.cpp engine, with flash attention off and on.

    python -m headrace.bench.llm_profile [--threads N] [--tokens N] [--runs N]

One child process per setting (llama.cpp's OpenMP threads: one driving thread per
process). Each runs ``--runs`` greedy jobs of ``--tokens`` tokens, one at a time, through
``LlamaEngine`` (no NATS, no edge), timing on the scheduler thread what ``llama_decode``
takes, what sampling takes (``Generation.sample``: the sampler chain, the token's text,
the stop holdback and the hand-off of the piece to the event loop) and the rest of the
step; and, as the reference, llama-cpp-python's own loop on one ``Llama`` (``eval`` and
``sample``, no streaming). Figures are ms per generated token and tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

PROMPT = "Write a short poem about the sea."


def _engine(threads: int, tokens: int, runs: int, flash: bool, model: str) -> dict[str, Any]:
    import llama_cpp

    from schemas.events import Done
    from schemas.jobs import ChatMessage, TextJob, TextParams
    from schemas.subjects import new_job_id
    from workers.engines import batch, decode
    from workers.engines.gguf import ModelConfig
    from workers.engines.llama import LlamaEngine

    spent = {"decode": 0.0, "sample": 0.0, "step": 0.0}
    prompt_step = [False]  # the step evaluating a prompt is not a generated token's

    def timed(fn: Any, key: str) -> Any:
        def wrapper(*a: Any) -> Any:
            if key == "decode":
                prompt_step[0] = a[1].n_tokens > 1
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                if not prompt_step[0]:
                    spent[key] += time.perf_counter() - t

        return wrapper

    # batch.py and decode.py call these through their modules and classes.
    llama_cpp.llama_decode = timed(llama_cpp.llama_decode, "decode")
    decode.Generation.sample = timed(decode.Generation.sample, "sample")  # type: ignore[method-assign]
    batch.Batcher._step = timed(batch.Batcher._step, "step")  # type: ignore[method-assign]
    config = ModelConfig(
        id="m", path=Path(model), n_threads=threads, flash_attn=flash, cache_seqs=0
    )

    async def run() -> dict[str, Any]:
        engine = LlamaEngine([config])
        await engine.start()
        wall = predicted_ms = 0.0
        n = 0
        for i in range(runs + 1):  # the first is a warm-up
            if i == 1:
                for k in spent:
                    spent[k] = 0.0
            params = TextParams(
                messages=[ChatMessage(role="user", content=PROMPT)],
                max_tokens=tokens,
                temperature=0,
                ignore_eos=True,
                seed=1,
            )
            job = TextJob(id=new_job_id(), model="m", created_ms=0, params=params)
            t = time.perf_counter()
            async for event in engine.run(job, threading.Event()):
                if isinstance(event, Done) and i:
                    predicted_ms += event.timings.predicted_ms
                    n += event.timings.predicted_n
            if i:
                wall += time.perf_counter() - t
        await engine.close()
        # predicted_ms runs from the first sample (in the prompt's step) to the last: n - 1
        # decode steps, and the waits between steps.
        steps = {k: 1000 * v / (n - runs) for k, v in spent.items()}
        return {
            "tokens/s": 1000 * n / predicted_ms,
            "decode": steps["decode"],
            "sample": steps["sample"],
            "rest of step": steps["step"] - steps["decode"] - steps["sample"],
            "between steps": (predicted_ms - 1000 * spent["step"]) / (n - runs),
        }

    return asyncio.run(run())


def _reference(threads: int, tokens: int, runs: int, flash: bool, model: str) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
        flash_attn=flash, verbose=False,
    )  # fmt: skip
    prompt = llm.tokenize(
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True
    )
    decode = sample = 0.0
    n = 0
    for i in range(runs + 1):
        llm.reset()
        llm.eval(prompt)
        for _ in range(tokens):
            t = time.perf_counter()
            token = llm.sample(temp=0)
            t1 = time.perf_counter()
            llm.eval([token])
            t2 = time.perf_counter()
            if i:
                sample += t1 - t
                decode += t2 - t1
                n += 1
    return {
        "tokens/s": n / (decode + sample),
        "decode": 1000 * decode / n,
        "sample": 1000 * sample / n,
        "rest of step": 0.0,
        "between steps": 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the breakdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", help="a GGUF (default: the bundled SmolLM2)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model is None:
        from workers.engines.gguf import bundled_gguf

        args.model = str(bundled_gguf())
    if args.child:
        what, flash = args.child[0], args.child[1] == "on"
        fn = _engine if what == "engine" else _reference
        result = fn(args.threads, args.tokens, args.runs, flash, args.model)
        sys.stdout.write(orjson.dumps(result).decode())
        return 0
    print(f"{args.runs} x {args.tokens} greedy tokens, {args.threads} thread(s)", file=sys.stderr)
    print("| path | flash attention | tokens/s | ms/token: llama_decode | sampling + hand-off "
          "| rest of the step | between steps |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for flash in ("off", "on"):
        for what in ("reference", "engine"):
            print(f"measuring {what}, flash attention {flash} ...", file=sys.stderr)
            argv = [sys.executable, "-m", "headrace.bench.llm_profile", "--model", args.model]
            argv += ["--threads", str(args.threads), "--tokens", str(args.tokens)]
            argv += ["--runs", str(args.runs), "--child", what, flash]
            done = subprocess.run(argv, capture_output=True, check=True, timeout=900)
            r = orjson.loads(done.stdout)
            label = "llama-cpp-python loop" if what == "reference" else "LlamaEngine"
            print(
                f"| {label} | {flash} | {r['tokens/s']:.1f} | {r['decode']:.2f} | "
                f"{r['sample']:.2f} | {r['rest of step']:.2f} | {r['between steps']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
