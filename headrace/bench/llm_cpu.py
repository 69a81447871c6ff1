"""Where a served single stream's CPU goes: per process and thread, per output token.

    python -m headrace.bench.llm_cpu [--clients N] [--requests N] [--max-tokens N]
                                     [--threads N] [--out DIR]

Each system is started alone (``llm_servers``) and sent ``--requests`` streamed chat
completions by ``--clients`` clients (1: one after another; the bench's prompts and
sampling, ``ignore_eos``, after warm-up requests). headrace gets as many slots as clients,
llama-server as many ``-np``. Around them the CPU time of every thread of every process the bench
started is read from ``/proc`` (Linux only), and split by role: llama.cpp's threads (the
model's busiest ``--threads`` threads: they decode, sample and spin at ggml's barrier, so
their time is the step's wall time), the rest of the model's process (headrace: the worker's
event loop and helpers; llama-server: its HTTP threads), the edge and nats-server. Figures
are CPU milliseconds per output token, and tokens/s over the whole run (time to first
token included).

On a machine whose cores all run llama.cpp threads, every other millisecond of CPU takes
a core from one of them in the middle of a step, and the other waits at the barrier: the
rest of the pipeline costs the decode about as much wall time as it uses CPU. The systems:
headrace through the edge, with the worker's stream interval at 0 (a delta per token) and at
its default (40 ms), and llama.cpp's ``llama-server`` when built.
Writes ``llm-cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headrace.bench.common import pyplot, write_outputs
from headrace.bench.llm_http import client, stream_chat
from headrace.bench.llm_servers import (
    Serving,
    find_llama_server,
    headrace_served,
    llama_server_argv,
    served,
)
from headrace.bench.llm_workload import Sample, Workload

ROLES = ("llama.cpp threads", "rest of the model's process", "edge", "nats-server")
Threads = dict[tuple[int, int], tuple[str, float]]  # (pid, tid) -> (process, CPU seconds)


def _cpu_seconds(stat: str) -> float:
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
    found: list[int] = []
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found += frontier
    return found


def _process(pid: int) -> str:
    """What a process is: the model's, the edge, nats-server."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode(errors="replace") for a in argv]
    if any("nats-server" in w for w in words[:1]):
        return "nats-server"
    if "edge" in words:
        return "edge"
    return "model"


def snapshot() -> Threads:
    """CPU seconds of every thread of every process this one started."""
    threads: Threads = {}
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError):
            what = _process(pid)
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    threads[(pid, int(task.name))] = (
                        what,
                        _cpu_seconds((task / "stat").read_text()),
                    )
    return threads


def by_role(before: Threads, after: Threads, llama_threads: int) -> dict[str, float]:
    """CPU seconds spent between the two snapshots, by role."""
    spent = {
        key: (what, cpu - before.get(key, (what, 0.0))[1]) for key, (what, cpu) in after.items()
    }
    model = sorted((cpu for what, cpu in spent.values() if what == "model"), reverse=True)
    roles = dict.fromkeys(ROLES, 0.0)
    roles["llama.cpp threads"] = sum(model[:llama_threads])
    roles["rest of the model's process"] = sum(model[llama_threads:])
    for what, cpu in spent.values():
        if what in ("edge", "nats-server"):
            roles[what] += cpu
    return roles


async def _drive(
    base: str, headers: dict[str, str], workload: Workload, requests: int, clients: int
) -> dict[str, Any]:
    url = f"{base}/v1/chat/completions"
    texts: list[str] = []

    async def loop(http: Any, first: int, count: int, keep: bool) -> None:
        for k in range(first, first + count):
            body = {**workload.chat_body(k), "ignore_eos": True}
            sample = await stream_chat(http, url, body, Sample(request=k, prompt=0, start_s=0), 0)
            if sample.error:
                raise RuntimeError(sample.error)
            if keep:
                texts.append(sample.text)

    async with client(headers) as http:
        await asyncio.gather(*(loop(http, c, 2, False) for c in range(clients)))  # warm-up
        before, started = snapshot(), time.perf_counter()
        per = max(1, requests // clients)
        await asyncio.gather(*(loop(http, c * per, per, True) for c in range(clients)))
        wall_s = time.perf_counter() - started
        return {"before": before, "after": snapshot(), "wall_s": wall_s, "texts": texts}


def measure(
    name: str, serve: contextlib.AbstractContextManager[tuple[str, dict[str, str]]],
    workload: Workload, requests: int, clients: int, count: Any,
) -> dict[str, Any]:  # fmt: skip
    """One system's row."""
    print(f"measuring {name} ...", file=sys.stderr)
    with serve as (base, headers):
        run = asyncio.run(_drive(base, headers, workload, requests, clients))
    tokens = sum(count(t) for t in run["texts"])
    roles = by_role(run["before"], run["after"], workload.threads)
    return {
        "system": name,
        "tokens": tokens,
        "tokens_per_s": tokens / run["wall_s"],
        "ms_per_token": {role: 1000 * cpu / tokens for role, cpu in roles.items()},
    }


@contextlib.contextmanager
def _headrace(
    serving: Serving, slots: int, interval_ms: float
) -> Iterator[tuple[str, dict[str, str]]]:
    os.environ["HEADRACE_LLM_STREAM_INTERVAL_MS"] = str(interval_ms)  # the worker's setting
    try:
        with headrace_served(serving, slots=slots, threads=serving.threads) as served_at:
            yield served_at
    finally:
        del os.environ["HEADRACE_LLM_STREAM_INTERVAL_MS"]


@contextlib.contextmanager
def _peer(
    binary: Path, serving: Serving, parallel: int, log: Path
) -> Iterator[tuple[str, dict[str, str]]]:
    def argv(port: int) -> list[str]:
        return llama_server_argv(binary, serving, port, parallel)

    with served(argv, serving.model_id, log) as base:
        yield base, {}


def table(result: dict[str, Any]) -> str:
    """The markdown table."""
    lines = [
        "| system | tokens/s | CPU ms per output token: "
        + " | ".join(ROLES)
        + " | all but llama.cpp |",
        "|---|---|" + "---|" * (len(ROLES) + 1),
    ]
    for row in result["rows"]:
        ms = row["ms_per_token"]
        others = sum(v for k, v in ms.items() if k != "llama.cpp threads")
        cells = " | ".join(f"{ms[r]:.2f}" for r in ROLES)
        lines.append(f"| {row['system']} | {row['tokens_per_s']:.1f} | {cells} | {others:.2f} |")
    w = result["workload"]
    lines.append("")
    lines.append(
        f"{result['requests']} streamed requests of {w['max_tokens']} tokens, "
        f"{result.get('clients', 1)} client(s) at once, "
        f"{w['threads']} llama.cpp threads; llama.cpp threads: the model process's {w['threads']} "
        "busiest threads together (their CPU time includes spinning at ggml's barrier: each "
        "thread's is about the step's wall time)."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """Stacked bars of CPU ms per token by role, one bar per system: all roles, and all but
    llama.cpp's threads (what the pipeline adds, on its own scale)."""
    plt = pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    names = [r["system"].replace(", ", "\n") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, roles, title in (
        (axes[0], ROLES, "CPU ms per output token"),
        (axes[1], ROLES[1:], "the same, without llama.cpp's threads"),
    ):
        bottom = [0.0] * len(rows)
        for role in roles:
            values = [r["ms_per_token"][role] for r in rows]
            ax.bar(names, values, bottom=bottom, label=role, color=f"C{ROLES.index(role)}")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        plt.setp(ax.get_xticklabels(), fontsize=7)
    fig.suptitle("Where a served single stream's CPU goes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Measure every system; print the table; write llm-cpu.{json,md,png}."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (and slots)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (CPUs)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    if not Path("/proc/self/task").is_dir():
        print("llm_cpu reads threads' CPU time from /proc: Linux only", file=sys.stderr)
        return 2
    from headrace.bench.llm import TokenCounter
    from workers.engines.gguf import DEFAULT_MODEL_ID, bundled_gguf, cpu_count

    workload = Workload(
        model_id=DEFAULT_MODEL_ID, model_path=str(bundled_gguf()),
        threads=args.threads or cpu_count(), max_tokens=args.max_tokens,
    )  # fmt: skip
    serving = Serving(
        model_id=workload.model_id, model_path=workload.model_path,
        n_ctx=workload.n_ctx, threads=workload.threads,
    )  # fmt: skip
    count = TokenCounter(workload.model_path)
    n = args.clients
    slots = f", {n} slots" if n > 1 else ""
    rows = [
        measure(f"headrace{slots}, stream interval {ms:g} ms", _headrace(serving, n, ms),
                workload, args.requests, n, count)
        for ms in (0, 40)
    ]  # fmt: skip
    binary = find_llama_server()
    if binary is not None:
        log = args.out / "llm-cpu-llama-server.log"
        args.out.mkdir(parents=True, exist_ok=True)
        rows.append(measure(f"llama-server -np {n}", _peer(binary, serving, n, log), workload,
                            args.requests, n, count))  # fmt: skip
    result = {"workload": workload.to_json(), "requests": args.requests, "clients": n,
              "rows": rows}  # fmt: skip
    write_outputs(args.out, "llm-cpu", result, table(result), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
