"""The soak: steady locust load on a private stack while workers and the broker are killed.

    .venv/bin/python loadtests/soak.py [--duration-s 1800] [--users 8] [--workers 2]
        [--kill-every-s 20] [--broker-every-s 300] [--out bench-results]   (``make soak``)

One nats-server (with its store on disk), ``--workers`` echo workers and one edge, each its
own process. Locust (``loadtests/soak_users.py``) keeps ``--users`` users busy for the whole
run with seeded chat completions, three in four streamed. Meanwhile a chaos loop SIGKILLs one
worker (round robin) every ``--kill-every-s`` and starts it again a second later, and stops
nats-server every ``--broker-every-s`` (SIGTERM and SIGKILL alternately) and starts it again
on the same store. Both periods shrink with a short run so that it still sees a broker
restart and several worker kills (a quarter and a half of the run at most).

Reported (``soak.json``, ``soak.md``, ``soak.png``): requests and their outcomes, errors by
status and code, **lost jobs** (a request answered 200 whose client never got its whole
answer: a stream cut short or ended by an error event, a dropped connection, a request that
never ended), **wrong text** (a seeded answer that differs from the other answers of the same
seed), **failover stalls** (for every stream in flight across a worker kill or a broker
restart, the gap between the last token before it and the first after it, as a histogram),
p50/p99 time to first token, and the RSS of the edge, the workers and nats-server over time.

What the design allows, and what the exit status (1) and ``tests/test_soak.py`` refuse: a
503 (``queue_full``, ``no_worker``, ``unavailable``: retryable, with ``Retry-After``) or a
504 is an answer a client can act on, so it is counted and reported but allowed; a 500, any
other 5xx, a lost job, wrong text and a hung request are never allowed.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import requests

from headrace.bench.common import percentile, pyplot, write_outputs
from headrace.servers import NatsServer, free_port, wait_for_port

USERS_FILE = Path(__file__).with_name("soak_users.py")
MB = 1024 * 1024
ALLOWED_5XX = {503, 504}  # retryable (503 with Retry-After) or a deadline: the client can act
STALL_BINS_S = [0, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 120]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=1800, help="how long locust loads")
    p.add_argument("--users", type=int, default=8, help="concurrent locust users")
    p.add_argument("--workers", type=int, default=2, help="echo workers (at least 2)")
    p.add_argument("--slots", type=int, default=16, help="jobs each worker runs at once")
    p.add_argument("--token-delay-s", type=float, default=0.02, help="echo: delay per token")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per answer")
    p.add_argument("--kill-every-s", type=float, default=20, help="SIGKILL a worker this often")
    p.add_argument("--broker-every-s", type=float, default=300, help="restart nats-server")
    p.add_argument(
        "--drain-s", type=float, default=60, help="after the run: time for open requests to end"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    args = p.parse_args(argv)
    if args.workers < 2:
        p.error("--workers must be at least 2: one is always up while another is killed")
    return args


@dataclass
class Proc:
    """A headrace child process (worker or edge) that the chaos loop may kill and restart."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        """Start it, appending to its log."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "headrace", *self.argv],
                env={**os.environ, **self.env}, stdout=out, stderr=out,
            )  # fmt: skip
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mb(self) -> float | None:
        """Resident memory now, or None while it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            return float(psutil.Process(self.proc.pid).memory_info().rss) / MB
        except psutil.Error:
            return None


class OpenRequests:
    """Requests started and not yet ended, from the users' log as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.open: set[str] = set()

    def count(self) -> int:
        """How many are open now."""
        if not self.path.exists():
            return 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        for line in complete.splitlines():
            record = orjson.loads(line)
            if record["phase"] == "start":
                self.open.add(record["id"])
            else:
                self.open.discard(record["id"])
        return len(self.open)


@dataclass
class Chaos:
    """What was done to the stack, and when (wall-clock seconds, to match the users' log)."""

    t0: float = 0.0  # when locust started
    worker_kills: list[tuple[float, str]] = field(default_factory=list)
    broker_restarts: list[tuple[float, float, str]] = field(default_factory=list)  # down, up


def _wait_ready(base: str, key: str, timeout_s: float = 60) -> None:
    """Until a completion goes through: the workers registered and the edge sees them."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=10,
                              headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the stack did not answer within {timeout_s} s")


def periods(args: argparse.Namespace) -> tuple[float, float]:
    """The worker-kill and broker-restart periods, scaled down for a short run."""
    return min(args.kill_every_s, args.duration_s / 4), min(
        args.broker_every_s, args.duration_s / 2
    )


def broker_time(n: int, kill_every: float, broker_every: float) -> float:
    """When the n-th broker restart falls (seconds into the run): the nearest point midway
    between two worker kills, so that no stall has both causes."""
    return (math.floor(n * broker_every / kill_every) + 0.5) * kill_every


def soak(args: argparse.Namespace, work: Path) -> tuple[Chaos, list[dict[str, Any]], Path]:
    """Run the stack, the load and the chaos; returns what chaos did, RSS samples, the log."""
    key, port = f"soak-{secrets.token_hex(8)}", free_port()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = NatsServer(work / "nats", log_path=logs / "nats.log")
    server.start()
    env = {"HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
    workers = [
        Proc(f"worker-{i}", ["worker", "echo", "--worker-id", f"soak-{i}", "--slots",
             str(args.slots), "--echo-token-delay-s", str(args.token_delay_s)], env,
             logs / f"worker-{i}.log")
        for i in range(1, args.workers + 1)
    ]  # fmt: skip
    edge_env = {**env, "HEADRACE_API_KEYS": key, "HEADRACE_PORT": str(port)}
    edge = Proc("edge", ["edge"], edge_env, logs / "edge.log")
    chaos, samples = Chaos(), []
    events = logs / "requests.jsonl"  # kept with the logs in the output directory
    locust: subprocess.Popen[bytes] | None = None
    try:
        for p in (*workers, edge):
            p.start()
        wait_for_port(port, 30)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, key)
        kill_every, broker_every = periods(args)
        print(
            f"soak: {args.users} users for {args.duration_s:.0f} s, {args.workers} echo workers; "
            f"a worker SIGKILLed every {kill_every:.0f} s, nats-server restarted every "
            f"{broker_every:.0f} s",
            file=sys.stderr,
        )
        # The users start no request past ``until``; locust's own run time adds the drain, so
        # that what is in flight then has ``drain_s`` to end. Locust is stopped as soon as
        # every request has ended; one still open when locust's time is up never ended: hung.
        t0 = chaos.t0 = time.time()
        until = t0 + args.duration_s
        cmd = [
            sys.executable, "-m", "locust", "-f", str(USERS_FILE), "--headless", "--only-summary",
            "--host", base, "-u", str(args.users), "-r", str(args.users),
            "-t", f"{int(args.duration_s + args.drain_s)}s", "--loglevel", "WARNING",
        ]  # fmt: skip
        locust_env = {**os.environ, "HEADRACE_API_KEY": key, "HEADRACE_SOAK_LOG": str(events),
                      "HEADRACE_SOAK_MAX_TOKENS": str(args.max_tokens),
                      "HEADRACE_SOAK_UNTIL": str(until)}  # fmt: skip
        with (logs / "locust.log").open("ab") as out:
            locust = subprocess.Popen(cmd, env=locust_env, stdout=out, stderr=out)
        open_requests = OpenRequests(events)
        next_kill, victim, broker_signal = t0 + kill_every, 0, 0
        next_broker = t0 + broker_time(1, kill_every, broker_every)
        last_progress = 0.0
        while locust.poll() is None:
            now = time.time()
            if now - t0 > args.duration_s + args.drain_s + 60:
                print("locust did not stop after its run and drain: killed it", file=sys.stderr)
                locust.kill()
                break
            in_run = now < until
            if not in_run and open_requests.count() == 0:
                locust.send_signal(signal.SIGTERM)  # every request ended: no need to drain on
                locust.wait(30)
                break
            if in_run and now >= next_kill:
                w = workers[victim % len(workers)]
                chaos.worker_kills.append((time.time(), w.name))
                w.kill()
                time.sleep(1.0)
                w.start()
                victim += 1
                next_kill += kill_every
            if in_run and now >= next_broker:
                how = "SIGTERM" if broker_signal % 2 == 0 else "SIGKILL"
                down = time.time()
                server.stop() if how == "SIGTERM" else server.kill()
                server.start()
                chaos.broker_restarts.append((down, time.time(), how))
                broker_signal += 1
                next_broker = t0 + broker_time(broker_signal + 1, kill_every, broker_every)
            sample: dict[str, Any] = {"t": now - t0, "edge": edge.rss_mb()}
            for w in workers:
                sample[w.name] = w.rss_mb()
            try:
                nats_rss = psutil.Process(server.proc.pid).memory_info().rss / MB  # type: ignore[union-attr]
            except (psutil.Error, AttributeError):
                nats_rss = None
            sample["nats-server"] = nats_rss
            samples.append(sample)
            if now - last_progress >= 10:
                done = min(now - t0, args.duration_s)
                print(
                    f"  {done:5.0f}/{args.duration_s:.0f} s  kills {len(chaos.worker_kills)}  "
                    f"broker restarts {len(chaos.broker_restarts)}  edge {sample['edge'] or 0:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
                last_progress = now
            time.sleep(1.0)
    finally:
        if locust is not None and locust.poll() is None:
            locust.kill()
            locust.wait()
        for p in (edge, *workers):
            p.stop()
        server.stop()
    return chaos, samples, events


def analyse(args: argparse.Namespace, chaos: Chaos, samples: list[dict[str, Any]],
            events: Path) -> dict[str, Any]:  # fmt: skip
    """The figures of one soak from the users' log and what chaos did."""
    starts: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    for line in events.read_bytes().splitlines():
        record = orjson.loads(line)
        (starts if record["phase"] == "start" else ends)[record["id"]] = record
    outcomes: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    lost, hung, ttfts = [], 0, []
    texts: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for rid, start in starts.items():
        end = ends.get(rid)
        if end is None:
            hung += 1
            outcomes["hung"] += 1
            lost.append({"t": start["t"], "outcome": "hung"})
            continue
        outcome = end.get("outcome", "?")
        outcomes[outcome] += 1
        if end["status"] != 200 and end["status"] is not None:
            errors[f"{end['status']} {end.get('code') or ''}".strip()] += 1
        elif outcome != "ok":
            lost.append({"t": start["t"], "outcome": outcome, "code": end.get("code")})
        if outcome == "ok":
            texts[start["seed"]][end["text"]] += 1
        if end.get("ttft") is not None:
            ttfts.append(end["ttft"])
    wrong = sum(sum(c.values()) - c.most_common(1)[0][1] for c in texts.values())
    kill_stalls, broker_stalls, other = _stalls(ends, chaos)
    disallowed = sum(n for k, n in errors.items() if int(k.split()[0]) >= 500
                     and int(k.split()[0]) not in ALLOWED_5XX)  # fmt: skip
    allowed = sum(n for k, n in errors.items() if int(k.split()[0]) in ALLOWED_5XX)
    t0 = chaos.t0
    kill_every, broker_every = periods(args)
    return {
        "settings": {
            "duration_s": args.duration_s, "users": args.users, "workers": args.workers,
            "slots": args.slots, "token_delay_s": args.token_delay_s,
            "max_tokens": args.max_tokens, "kill_every_s": kill_every,
            "broker_every_s": broker_every,
        },
        "requests": len(starts),
        "ok": outcomes["ok"],
        "outcomes": dict(outcomes),
        "errors": dict(errors),
        "allowed_5xx": allowed,
        "disallowed_5xx": disallowed,
        "lost": len(lost),
        "lost_jobs": lost[:50],
        "hung": hung,
        "wrong_text": wrong,
        "worker_kills": [[t - t0, name] for t, name in chaos.worker_kills],
        "broker_restarts": [[down - t0, up - t0, how] for down, up, how in chaos.broker_restarts],
        "kill_stalls_s": sorted(kill_stalls),
        "broker_stalls_s": sorted(broker_stalls),
        "other_gaps": other,
        "ttft_s": {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99)} if ttfts else None,
        "rss_mb": samples,
    }  # fmt: skip


def _stalls(ends: dict[str, dict[str, Any]], chaos: Chaos) -> tuple[list[float], list[float], int]:
    """Token gaps of streams across a worker kill, across a broker restart, or neither."""
    kills = [t for t, _ in chaos.worker_kills]
    broker = [(down, up) for down, up, _ in chaos.broker_restarts]
    kill_stalls, broker_stalls, other = [], [], 0
    for end in ends.values():
        for a, b in end.get("gaps") or []:
            # The cause is the first disruption after the gap began: a gap from a kill that
            # a broker restart falls into is the kill's, and the other way round.
            causes = [(k, kill_stalls) for k in kills if a <= k <= b]
            causes += [(max(a, down), broker_stalls) for down, up in broker
                       if down - 0.5 <= b and a <= up + 0.5]  # fmt: skip
            if causes:
                min(causes, key=lambda c: c[0])[1].append(b - a)
            else:
                other += 1
    return kill_stalls, broker_stalls, other


def _pcts(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f} / {max(values):.2f} s "
            f"({len(values)})")  # fmt: skip


def table(r: dict[str, Any]) -> str:
    """The markdown summary."""
    s = r["settings"]
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none"
    peak = {name: max((x[name] for x in r["rss_mb"] if x.get(name)), default=0.0)
            for name in r["rss_mb"][0] if name != "t"} if r["rss_mb"] else {}  # fmt: skip
    first = {name: next((x[name] for x in r["rss_mb"] if x.get(name)), 0.0) for name in peak}
    last = {name: next((x[name] for x in reversed(r["rss_mb"]) if x.get(name)), 0.0)
            for name in peak}  # fmt: skip
    ttft = r["ttft_s"]
    rows = [
        "| soak | |",
        "|---|---|",
        f"| run | {s['duration_s']:.0f} s, {s['users']} users, {s['workers']} echo workers "
        f"({s['token_delay_s'] * 1000:.0f} ms a token, {s['max_tokens']} tokens) |",
        f"| chaos | {len(r['worker_kills'])} worker SIGKILLs (every {s['kill_every_s']:.0f} s), "
        f"{len(r['broker_restarts'])} nats-server restarts (every {s['broker_every_s']:.0f} s) |",
        f"| requests | {r['requests']} ({r['ok']} answered whole) |",
        f"| errors | {errors} |",
        f"| 5xx allowed (503/504) / not allowed | {r['allowed_5xx']} / {r['disallowed_5xx']} |",
        f"| lost jobs (hung) | {r['lost']} ({r['hung']}) |",
        f"| wrong text | {r['wrong_text']} |",
        f"| stall across a worker kill p50 / p99 / max (streams) | {_pcts(r['kill_stalls_s'])} |",
        f"| stall across a broker restart p50 / p99 / max (streams) | "
        f"{_pcts(r['broker_stalls_s'])} |",
        f"| other token gaps > 0.2 s | {r['other_gaps']} |",
        "| TTFT p50 / p99 | "
        + (f"{ttft['p50'] * 1000:.0f} / {ttft['p99'] * 1000:.0f} ms |" if ttft else "none |"),
    ]
    for name in peak:
        rows.append(f"| RSS {name} first / last / peak | {first[name]:.0f} / {last[name]:.0f} / "
                    f"{peak[name]:.0f} MB |")  # fmt: skip
    return "\n".join(rows) + "\n"


def plot(r: dict[str, Any], path: Path) -> bool:
    """RSS over time (kills and broker restarts marked) and the histogram of stalls."""
    plt = pyplot()
    if plt is None or not r["rss_mb"]:
        return False
    fig, (rss, hist) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[3, 2])
    names = [n for n in r["rss_mb"][0] if n != "t"]
    for name in names:
        xs = [x["t"] for x in r["rss_mb"] if x.get(name)]
        rss.plot(xs, [x[name] for x in r["rss_mb"] if x.get(name)], label=name, lw=1.2)
    for i, (t, _) in enumerate(r["worker_kills"]):
        rss.axvline(t, color="#999999", lw=0.6, ls=":", label="worker SIGKILL" if i == 0 else None)
    for i, (down, _, _how) in enumerate(r["broker_restarts"]):
        rss.axvline(down, color="#d8573b", lw=1.2, ls="--",
                    label="nats-server restart" if i == 0 else None)  # fmt: skip
    rss.set_xlabel("time (s)")
    rss.set_ylabel("RSS (MB)")
    rss.set_title("memory over the soak")
    rss.grid(alpha=0.3)
    rss.legend(fontsize=7, loc="upper left")
    series = [r["kill_stalls_s"], r["broker_stalls_s"]]
    top = max([v for s in series for v in s], default=1.0)
    bins = [b for b in STALL_BINS_S if b < top] + [next((b for b in STALL_BINS_S if b >= top), top)]
    hist.hist(series, bins=bins, stacked=True, color=["#3b7dd8", "#d8573b"],
              label=["across a worker kill", "across a broker restart"])  # fmt: skip
    hist.set_xscale("symlog", linthresh=1)
    hist.set_xlabel("gap between tokens (s)")
    hist.set_ylabel("streams")
    hist.set_title("failover stalls")
    hist.grid(alpha=0.3, axis="y")
    hist.legend(fontsize=7)
    fig.suptitle(f"headrace soak: {r['requests']} requests, {r['lost']} lost, "
                 f"{r['disallowed_5xx']} disallowed 5xx")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def verdict(r: dict[str, Any]) -> list[str]:
    """What the design does not allow (empty when the soak passes)."""
    broken = []
    if r["requests"] == 0 or r["ok"] == 0:
        broken.append("no request was answered")
    if r["lost"]:
        broken.append(f"{r['lost']} lost jobs ({r['hung']} hung)")
    if r["disallowed_5xx"]:
        broken.append(f"{r['disallowed_5xx']} responses 500 or another disallowed 5xx")
    if r["wrong_text"]:
        broken.append(f"{r['wrong_text']} answers with the wrong text")
    return broken


def main(argv: list[str] | None = None) -> int:
    """Soak, analyse, write the outputs, print PASS or FAIL."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headrace-soak-") as tmp:
        chaos, samples, events = soak(args, Path(tmp))
        result = analyse(args, chaos, samples, events)
        logs = args.out / "soak-logs"
        logs.mkdir(exist_ok=True)
        for f in (Path(tmp) / "logs").iterdir():
            (logs / f.name).write_bytes(f.read_bytes())
    write_outputs(args.out, "soak", result, table(result), plot)
    broken = verdict(result)
    print("FAIL: " + "; ".join(broken) if broken else "PASS", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
