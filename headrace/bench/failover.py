"""``headrace bench failover``: workers killed mid-stream, and one stopped with a long job.

Two worker processes serve one model on a private nats-server. Each round submits a
seeded streamed job through ``schemas.client.JobClient``, waits for a few tokens, then
SIGKILLs the worker serving it (and starts a replacement for the next round). It
measures the stall, from the kill to the next token the follower receives, and checks
the text:

* echo (the default): the text must be identical to the same job run without trouble;
* ``--engine llama`` (SmolLM2 on llama.cpp, one thread): at temperature 0 identical to
  an uninterrupted run; at temperature 0.8 one uninterrupted sequence: the streamed
  text is exactly what the streamed token ids detokenize to (nothing repeated, nothing
  missing) and the job has its ``max_tokens``.

The SIGTERM case (echo) runs a job of about ``sigterm_job_s`` once undisturbed and once
with its worker stopped a sixth of the way in: the total time of each, and whether the
text is the same. A lost job (an error, a hang past its deadline) counts in ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS

from headrace.bench.common import percentile, progress, pyplot, wait_worker, write_outputs
from headrace.servers import NatsServer
from schemas.client import JobClient, JobStream
from schemas.errors import HeadraceError
from schemas.events import Delta, Done, Started
from schemas.jobs import ChatMessage, TextJob, TextParams
from schemas.subjects import new_job_id, rpc_subject
from schemas.topology import Limits, provision
from workers.engines.gguf import DEFAULT_MODEL_ID

PROMPT = "a river runs over stones and under bridges to the sea and back again as rain"
ECHO_DELAY_S = 0.05
ECHO_TOKENS = 60
LLAMA_PROMPT = "Tell me about rivers, bridges and the sea."
LLAMA_TOKENS = 48


@dataclass
class Fleet:
    """The worker processes of one model, replaced as they are killed."""

    engine: str
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: int = 0

    def spawn(self, extra: tuple[str, ...] = ()) -> str:
        self.started += 1
        worker_id = f"{self.engine}-{self.started}"
        argv = [sys.executable, "-m", "headrace", "worker", self.engine, "--worker-id", worker_id]
        if self.engine == "echo":
            argv += ["--echo-token-delay-s", str(ECHO_DELAY_S)]
        with (self.logs / f"{worker_id}.log").open("ab") as out:
            self.procs[worker_id] = subprocess.Popen(
                [*argv, *extra], env={**os.environ, **self.env}, stdout=out, stderr=out
            )
        return worker_id

    def kill(self, worker_id: str, sig: signal.Signals = signal.SIGKILL) -> None:
        self.procs[worker_id].send_signal(sig)

    def reap(self, worker_id: str) -> None:
        self.procs.pop(worker_id).wait(30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def _job(model: str, seed: int, max_tokens: int, temperature: float, prompt: str) -> TextJob:
    now_ms = int(time.time() * 1000)
    return TextJob(
        id=new_job_id(),
        model=model,
        created_ms=now_ms,
        deadline_ms=now_ms + 300_000,
        params=TextParams(
            messages=[ChatMessage(role="user", content=prompt)],
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
        ),
    )


@dataclass
class Followed:
    """What a follower saw of one job."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    tokens_at: list[float] = field(default_factory=list)
    done: Done | None = None
    error: str | None = None

    def take(self, event: Any) -> None:
        if isinstance(event, Delta):
            self.text += event.text
            self.ids += event.token_ids or []
            self.tokens_at.append(time.monotonic())
        elif isinstance(event, Started):
            self.workers.append(event.worker)
        elif isinstance(event, Done):
            self.done = event


async def _follow(stream: JobStream, seen: Followed, until_tokens: int | None = None) -> None:
    """Read the stream into ``seen`` (until ``until_tokens`` deltas, or its end)."""
    try:
        async with asyncio.timeout(300):
            while not stream.finished:
                received = await stream.next()
                if received is None:
                    continue
                seen.take(received.event)
                if until_tokens is not None and len(seen.tokens_at) >= until_tokens:
                    return
    except (HeadraceError, TimeoutError) as e:
        seen.error = type(e).__name__


async def _uninterrupted(client: JobClient, job: TextJob) -> Followed:
    seen = Followed()
    async with await client.submit(job) as stream:
        await _follow(stream, seen)
    return seen


async def _detokenize(nc: NATS, model: str, ids: list[int]) -> str:
    reply = await nc.request(
        rpc_subject(model, "detokenize"), orjson.dumps({"tokens": ids}), timeout=30
    )
    content: str = orjson.loads(reply.data)["result"]["content"]
    return content


async def _kill_round(
    client: JobClient, fleet: Fleet, job: TextJob, after_tokens: int
) -> tuple[Followed, float | None, str]:
    """One job, its worker SIGKILLed after ``after_tokens`` tokens: (what was seen, the
    stall in seconds, the killed worker)."""
    seen = Followed()
    async with await client.submit(job) as stream:
        await _follow(stream, seen, after_tokens)
        victim = seen.workers[-1] if seen.workers else ""
        killed_at = time.monotonic()
        if victim:
            fleet.kill(victim)
        before = len(seen.tokens_at)
        await _follow(stream, seen)
    stall = seen.tokens_at[before] - killed_at if len(seen.tokens_at) > before else None
    return seen, stall, victim


async def _kills(
    nc: NATS, fleet: Fleet, model: str, kills: int, temperature: float, label: str
) -> dict[str, Any]:
    client = JobClient(nc)
    llama = fleet.engine == "llm"
    tokens = LLAMA_TOKENS if llama else ECHO_TOKENS
    prompt = LLAMA_PROMPT if llama else PROMPT
    seeds = [1000 + i % 10 for i in range(kills)]
    expected: dict[int, str] = {}
    if temperature == 0 or not llama:
        for seed in sorted(set(seeds)):
            expected[seed] = (await _uninterrupted(client, _job(model, seed, tokens, temperature,
                                                               prompt))).text  # fmt: skip
    stalls: list[float] = []
    lost = wrong = continuous = 0
    for n, seed in enumerate(seeds):
        after = 4 + (n * 7) % (tokens // 2)  # anywhere in the first half
        seen, stall, victim = await _kill_round(
            client, fleet, _job(model, seed, tokens, temperature, prompt), after
        )
        if seen.error or seen.done is None:
            lost += 1
        elif seed in expected:
            wrong += seen.text != expected[seed]
        else:  # sampled: one sequence, exactly what its token ids say, and all of them
            whole = await _detokenize(nc, model, seen.ids)
            ok = whole == seen.text and seen.done.usage.completion_tokens == len(seen.ids)
            continuous += ok
            wrong += not ok
        if stall is not None:
            stalls.append(stall)
        if victim:
            fleet.reap(victim)
            await wait_worker(nc, fleet.spawn())
        progress(f"{label} kills", n + 1, kills)
    return {
        "engine": "llama.cpp" if llama else "echo",
        "temperature": temperature,
        "kills": kills,
        "tokens": tokens,
        "stalls_s": stalls,
        "lost": lost,
        "wrong_text": wrong,
        "check": "identical to an uninterrupted run" if expected else "one continuous sequence",
        "continuous": continuous if not expected else None,
        "handovers": client.handovers,
    }


async def _sigterm(nc: NATS, fleet: Fleet, job_s: float) -> dict[str, Any]:
    client = JobClient(nc)
    tokens = max(10, round(job_s / ECHO_DELAY_S))
    began = time.monotonic()
    whole = await _uninterrupted(client, _job("echo", 7, tokens, 1.0, PROMPT))
    undisturbed_s = time.monotonic() - began
    progress("sigterm: undisturbed run", 1, 2)
    seen = Followed()
    began = time.monotonic()
    async with await client.submit(_job("echo", 7, tokens, 1.0, PROMPT)) as stream:
        await _follow(stream, seen, tokens // 6)
        victim = seen.workers[-1]
        fleet.kill(victim, signal.SIGTERM)
        stopped = time.monotonic()
        exited = asyncio.create_task(_exit_s(fleet.procs[victim], stopped))
        await _follow(stream, seen)
    total_s = time.monotonic() - began
    exit_s = await exited
    fleet.reap(victim)
    progress("sigterm: stopped mid-job", 2, 2)
    return {
        "job_tokens": tokens,
        "undisturbed_s": undisturbed_s,
        "with_sigterm_s": total_s,
        "worker_exit_s": exit_s,
        "same_text": seen.text == whole.text and seen.done is not None,
        "workers": seen.workers,
    }


async def _exit_s(proc: subprocess.Popen[bytes], since: float) -> float:
    """Seconds from ``since`` until the process exits."""
    await asyncio.to_thread(proc.wait, 60)
    return time.monotonic() - since


def _summary(case: dict[str, Any]) -> dict[str, Any]:
    stalls = case["stalls_s"]
    if not stalls:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": percentile(stalls, 50), "p99": percentile(stalls, 99), "max": max(stalls)}


def _table(result: dict[str, Any]) -> str:
    rows = ["| engine | temperature | kills | stall p50 / p99 / max | lost | text | wrong |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for case in result["kills"]:
        s = case["summary"]
        stall = "-" if s["p50"] is None else f"{s['p50']:.2f} / {s['p99']:.2f} / {s['max']:.2f} s"
        ok = case["kills"] - case["lost"] - case["wrong_text"]
        rows.append(
            f"| {case['engine']} | {case['temperature']} | {case['kills']} | {stall} | "
            f"{case['lost']} | {ok}/{case['kills']} {case['check']} | {case['wrong_text']} |"
        )
    out = "\n".join(rows) + "\n"
    if (t := result.get("sigterm")) is not None:
        out += (
            "\n| SIGTERM case | job | undisturbed | with SIGTERM | worker gone after | text |\n"
            "|---|---|---|---|---|---|\n"
            f"| echo, stopped 1/6 in | {t['job_tokens']} tokens | {t['undisturbed_s']:.1f} s | "
            f"{t['with_sigterm_s']:.1f} s | {t['worker_exit_s']:.1f} s | "
            f"{'same' if t['same_text'] else 'DIFFERENT'} |\n"
        )
    return out


def _plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None or not any(c["stalls_s"] for c in result["kills"]):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for case in result["kills"]:
        if case["stalls_s"]:
            label = f"{case['engine']} T={case['temperature']} (n={len(case['stalls_s'])})"
            ax.hist(case["stalls_s"], bins=30, alpha=0.6, label=label)
    ax.set_xlabel("stall: SIGKILL to the next token (s)")
    ax.set_ylabel("kills")
    ax.set_title("A worker killed mid-stream: the stream goes on elsewhere")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


async def _measure(url: str, engine: str, kills: int, sigterm_job_s: float | None,
                   logs: Path) -> dict[str, Any]:  # fmt: skip
    nc = await nats.connect(url)
    llama = engine == "llama"
    model = DEFAULT_MODEL_ID if llama else "echo"
    kind_engine = "llm" if llama else "echo"
    env = {"HEADRACE_NATS_URL": url, "HEADRACE_LOG_LEVEL": "WARNING", "HEADRACE_LLM_THREADS": "1",
           "HEADRACE_LLM_N_CTX": "512"}  # fmt: skip
    fleet = Fleet(kind_engine, env, logs)
    result: dict[str, Any] = {"kills": []}
    try:
        await provision(nc.jetstream(), Limits(), [("llm", model)])
        for _ in range(2):
            await wait_worker(nc, fleet.spawn())
        for temperature in (0.0, 0.8) if llama else (1.0,):
            if kills:
                case = await _kills(
                    nc, fleet, model, kills, temperature, f"{engine} T={temperature}"
                )
                case["summary"] = _summary(case)
                result["kills"].append(case)
        if sigterm_job_s and not llama:
            result["sigterm"] = await _sigterm(nc, fleet, sigterm_job_s)
    finally:
        fleet.stop_all()
        with contextlib.suppress(Exception):
            await nc.close()
    return result


def run(kills: int, out: Path, engine: str = "echo", sigterm_job_s: float | None = 30.0) -> int:
    """Run the failover benchmark and write ``failover.{json,md,png}``; 1 when a job was lost
    or its text was wrong."""
    what = "SmolLM2 on llama.cpp, temperature 0 and 0.8" if engine == "llama" else (
        f"echo, {ECHO_TOKENS} tokens at {ECHO_DELAY_S * 1000:.0f} ms")  # fmt: skip
    print(
        f"headrace bench failover: {kills} SIGKILLs mid-stream ({what}), two workers"
        + (
            f"; SIGTERM with a {sigterm_job_s:.0f} s job"
            if sigterm_job_s and engine == "echo"
            else ""
        ),
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="headrace-failover-") as tmp:
        server = NatsServer(Path(tmp) / "nats", log_path=Path(tmp) / "nats.log")
        server.start()
        try:
            result = asyncio.run(_measure(server.url, engine, kills, sigterm_job_s, Path(tmp)))
        finally:
            server.stop()
    name = "failover" if engine == "echo" else f"failover-{engine}"
    write_outputs(out, name, result, _table(result), _plot)
    bad = sum(c["lost"] + c["wrong_text"] for c in result["kills"])
    if (t := result.get("sigterm")) is not None and not t["same_text"]:
        bad += 1
    return 1 if bad else 0
