"""llama-cpp-python called in-process vs the same model through headrace, at concurrency 1.

    .venv/bin/python loadtests/bench_llama_inprocess.py [--runs 10] [--max-tokens 128]

Three ways of generating the same text (same prompt, seed, sampling values,
max_tokens) with SmolLM2-135M-Instruct on the same number of threads:

1. llama-cpp-python's ``create_chat_completion(stream=True)`` in a process of
   its own (``reset()`` before each run, so the prompt is evaluated every time,
   as headrace does for every job);
2. headrace's ``LlamaEngine.run`` in a process of its own (the engine, no NATS);
3. headrace end to end: nats-server, a ``headrace worker llm`` process, and
   ``JobClient`` in this process (subscribe, publish to JetStream, read events).

Each path has its own process: llama.cpp's CPU backend uses OpenMP, and once a
second thread has driven its compute in a process, decoding there slows down
by half on 2 cores. The runs are interleaved (1, 2, 3, 1, 2, 3 ...) so that
background load falls on every path alike; one warm-up round is dropped.

Time to first token (TTFT) is from the request to the first text; decode
tokens/s is (tokens - 1) / (last token - first token); end-to-end tokens/s is
tokens / (last token - request). Figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import nats

from headrace.servers import NatsServer
from schemas.client import JobClient
from schemas.events import Delta, Done
from schemas.jobs import ChatMessage, TextJob, TextParams
from schemas.subjects import new_job_id
from schemas.topology import Limits, provision
from tests.conftest import wait_registered
from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

PROMPT = "Write a long story about a lighthouse keeper who talks to the sea."
SAMPLING: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
}
PATHS = (
    "llama-cpp-python in-process",
    "headrace LlamaEngine in-process (no NATS)",
    "headrace end to end (worker process + NATS + JobClient)",
)


@dataclass
class Run:
    """One generation: when its tokens arrived."""

    start: float
    first: float
    last: float
    tokens: int
    text: str

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.start) * 1000

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 else 0.0

    @property
    def e2e_tps(self) -> float:
        return self.tokens / (self.last - self.start)


class Timer:
    """Collects the arrival of text during one run."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first = 0.0
        self.tokens = 0
        self.parts: list[str] = []

    def text(self, text: str, tokens: int = 1) -> None:
        self.first = self.first or time.perf_counter()
        self.tokens += tokens
        self.parts.append(text)

    def done(self) -> Run:
        return Run(self.start, self.first, time.perf_counter(), self.tokens, "".join(self.parts))


def job(args: argparse.Namespace) -> TextJob:
    """The benchmark's job (a fresh id each time)."""
    return TextJob(
        id=new_job_id(),
        model=DEFAULT_MODEL_ID,
        created_ms=int(time.time() * 1000),
        params=TextParams(
            messages=[ChatMessage(role="user", content=PROMPT)],
            max_tokens=args.max_tokens,
            seed=args.seed,
            **SAMPLING,
        ),
    )


def serve_llama_cpp_python(args: argparse.Namespace) -> None:
    """Child process: one run of llama-cpp-python's streaming chat completion per stdin line."""
    llm = llama_cpp.Llama(
        model_path=str(bundled_gguf()),
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        seed=args.seed,
        verbose=False,
    )
    print("ready", flush=True)
    for _ in sys.stdin:
        llm.reset()  # no prompt-prefix reuse: headrace evaluates every prompt in full
        timer = Timer()
        chunks = llm.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=args.max_tokens,
            seed=args.seed,
            stream=True,
            **SAMPLING,
        )
        for chunk in chunks:
            content = chunk["choices"][0]["delta"].get("content")
            if content:
                timer.text(content)  # one chunk per token here (no stop strings)
        print(json.dumps(asdict(timer.done())), flush=True)


async def serve_engine(args: argparse.Namespace) -> None:
    """Child process: one run of headrace's LlamaEngine per stdin line."""
    config = ModelConfig(
        id=DEFAULT_MODEL_ID, path=bundled_gguf(), n_ctx=args.n_ctx, n_threads=args.threads
    )
    engine = LlamaEngine([config])
    await engine.start()
    print("ready", flush=True)
    try:
        while await asyncio.to_thread(sys.stdin.readline):
            timer = Timer()
            async for event in engine.run(job(args), threading.Event()):
                if isinstance(event, Delta):
                    timer.text(event.text, event.tokens)
            print(json.dumps(asdict(timer.done())), flush=True)
    finally:
        await engine.close()


class Child:
    """A measuring child process driven over its stdin and stdout."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        argv = [sys.executable, __file__, "--serve", mode, "--max-tokens", str(args.max_tokens)]
        argv += ["--seed", str(args.seed), "--n-ctx", str(args.n_ctx)]
        argv += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        if self.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {mode} child did not start")

    def run(self) -> Run:
        self.stdin.write("run\n")
        self.stdin.flush()
        return Run(**json.loads(self.stdout.readline()))

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(30)


async def client_run(client: JobClient, args: argparse.Namespace) -> Run:
    """One job through JetStream and the worker process."""
    timer = Timer()
    async with await client.submit(job(args)) as stream:
        async for received in stream:
            event = received.event
            if isinstance(event, Delta):
                timer.text(event.text, event.tokens)
            elif isinstance(event, Done):
                break
            elif event.type == "error":
                raise RuntimeError(f"the job failed: {event.code}")
    return timer.done()


async def measure(url: str, children: list[Child], args: argparse.Namespace) -> list[list[Run]]:
    """Interleaved rounds over the three paths; the first round is a warm-up."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await provision(js, Limits(), [("llm", DEFAULT_MODEL_ID)])
        await wait_registered(js, "bench-llm", timeout_s=60)
        client = JobClient(nc)
        runs: list[list[Run]] = [[] for _ in PATHS]
        for round_ in range(args.runs + 1):
            for i, child in enumerate(children):
                runs[i].append(await asyncio.to_thread(child.run))
            runs[2].append(await client_run(client, args))
            if round_ == 0:
                runs = [[] for _ in PATHS]
        return runs
    finally:
        await nc.close()


def bench(args: argparse.Namespace) -> list[list[Run]]:
    """Start the two children, nats-server and a worker; measure; stop everything."""
    children = [Child("llama-cpp-python", args), Child("engine", args)]
    try:
        with tempfile.TemporaryDirectory(prefix="headrace-llm-bench-") as tmp:
            server = NatsServer(Path(tmp) / "nats")
            server.start()
            env = dict(os.environ, HEADRACE_NATS_URL=server.url, HEADRACE_LOG_LEVEL="WARNING")
            argv = [sys.executable, "-m", "headrace", "worker", "llm", "--worker-id", "bench-llm"]
            argv += ["--n-ctx", str(args.n_ctx), "--threads", str(args.worker_threads)]
            argv += ["--threads-batch", str(args.threads)]
            worker = subprocess.Popen(argv, env=env)
            try:
                return asyncio.run(measure(server.url, children, args))
            finally:
                worker.terminate()
                worker.wait(30)
                server.stop()
    finally:
        for child in children:
            child.close()


def report(runs: list[list[Run]]) -> None:
    """Print the medians as a table, with the ratio to llama-cpp-python."""
    rows = [
        {
            "name": name,
            "tokens": statistics.median(r.tokens for r in path),
            "ttft_ms": statistics.median(r.ttft_ms for r in path),
            "decode_tps": statistics.median(r.decode_tps for r in path),
            "e2e_tps": statistics.median(r.e2e_tps for r in path),
        }
        for name, path in zip(PATHS, runs, strict=True)
    ]
    base = rows[0]
    print("| path | tokens | TTFT ms | decode tok/s | end-to-end tok/s | ratio (e2e tok/s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['tokens']:.0f} | {r['ttft_ms']:.1f} | {r['decode_tps']:.1f} "
            f"| {r['e2e_tps']:.1f} | {r['e2e_tps'] / base['e2e_tps']:.3f} |"
        )
    texts = {r.text for path in runs for r in path}
    print(f"\nsame text on every run of every path: {len(texts) == 1}")


def main() -> int:
    """Measure the three paths (or, with --serve, be one of the measuring children)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--worker-threads",
        type=int,
        help="generation threads of the headrace worker (default: --threads)",
    )
    parser.add_argument("--serve", choices=["llama-cpp-python", "engine"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "llama-cpp-python":
        serve_llama_cpp_python(args)
        return 0
    if args.serve == "engine":
        asyncio.run(serve_engine(args))
        return 0
    args.worker_threads = args.worker_threads or args.threads
    print(
        f"SmolLM2-135M-Instruct Q4_1, {args.threads} thread(s) "
        f"({args.worker_threads} in the worker), max_tokens {args.max_tokens}, "
        f"seed {args.seed}: medians of {args.runs} interleaved runs, concurrency 1",
        file=sys.stderr,
    )
    report(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
