"""``headrace bench restarts``: nats-server restarted again and again under load.

Each round puts ``in_flight`` chat requests (half streamed) through a real edge to an echo
worker, then stops nats-server with SIGTERM or SIGKILL (alternately) and starts it again on
the same port and store. Every request must end with its whole text, or with a clear error
in the API's shape: none may hang (the requests' own deadline is 10 minutes; a round waits
at most ``hang_s``) and none may be a 500 or an answer cut short. The text of every answer is
compared with the same request (same seed) answered before any restart.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from headrace.bench.common import child, percentile, progress, pyplot, write_outputs
from headrace.servers import NatsServer, free_port, wait_for_port

TOKENS = 40
PROMPT = "a river runs over stones and under bridges to the sea"


async def ask(http: aiohttp.ClientSession, base: str, i: int, *, stream: bool) -> tuple[str, str]:
    """One chat request: ("ok", text), ("error", code) for an error event inside a stream,
    ("cut", text) for a stream without its end, ("http <n>", code), or ("dropped", why)."""
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": TOKENS,
        "seed": 1000 + i,
        "stream": stream,
    }
    try:
        async with http.post(f"{base}/v1/chat/completions", json=body) as r:
            raw = await r.read()
    except aiohttp.ClientError as e:
        return "dropped", type(e).__name__
    if r.status != 200:
        return f"http {r.status}", orjson.loads(raw)["error"]["code"] or ""
    if not stream:
        return "ok", orjson.loads(raw)["choices"][0]["message"]["content"]
    text, done = "", False
    for line in raw.decode().splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                return "error", chunk["error"]["code"] or ""
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
    return ("ok" if done else "cut"), text


async def _round(
    http: aiohttp.ClientSession,
    base: str,
    server: NatsServer,
    signal_name: str,
    expected: dict[int, str],
    in_flight: int,
    hang_s: float,
) -> dict[str, Any]:
    asks = [asyncio.create_task(ask(http, base, i, stream=i % 2 == 0)) for i in range(in_flight)]
    await asyncio.sleep(0.6)  # accepted and generating
    down = time.monotonic()
    if signal_name == "SIGKILL":
        server.kill()
    else:
        server.stop()
    server.start()
    back = time.monotonic()
    done, hung = await asyncio.wait(asks, timeout=hang_s)
    for task in hung:
        task.cancel()
    outcomes = [t.result() for t in asks if t in done]
    wrong = sum(1 for i, t in enumerate(asks) if t in done and t.result()[0] == "ok"
                and t.result()[1] != expected[i])  # fmt: skip
    counts: dict[str, int] = {}
    for kind, what in outcomes:
        key = kind if kind == "ok" else f"{kind} {what}".strip()
        counts[key] = counts.get(key, 0) + 1
    return {
        "signal": signal_name,
        "down_s": back - down,
        "answered_s": time.monotonic() - back,  # the broker's return to the last answer
        "outcomes": counts,
        "hung": len(hung),
        "wrong_text": wrong,
    }


async def _measure(
    base: str, key: str, server: NatsServer, restarts: int, in_flight: int, hang_s: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as http:
        for _ in range(300):  # the worker registers, the edge sees it
            if (await ask(http, base, 0, stream=False))[0] == "ok":
                break
            await asyncio.sleep(0.1)
        expected = {}
        for i in range(in_flight):
            kind, text = await ask(http, base, i, stream=False)
            assert kind == "ok", f"the undisturbed run failed: {kind} {text}"
            expected[i] = text
        rounds = []
        for n in range(restarts):
            signal_name = "SIGTERM" if n % 2 == 0 else "SIGKILL"
            rounds.append(
                await _round(http, base, server, signal_name, expected, in_flight, hang_s)
            )
            progress("broker restarts", n + 1, restarts)
    return {"in_flight": in_flight, "tokens": TOKENS, "rounds": rounds}


def _count(rounds: list[dict[str, Any]], *prefixes: str) -> int:
    """Answers over ``rounds`` whose outcome starts with one of ``prefixes``."""
    return sum(v for r in rounds for k, v in r["outcomes"].items() if k.startswith(prefixes))


def _table(result: dict[str, Any]) -> str:
    rows = ["| signal | restarts | answered whole | clear errors | hung | HTTP 500 | cut short | "
            "wrong text | broker back to last answer p50 / max |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for sig in ("SIGTERM", "SIGKILL"):
        rs = [r for r in result["rounds"] if r["signal"] == sig]
        if not rs:
            continue
        times = [r["answered_s"] for r in rs]
        rows.append(
            f"| {sig} | {len(rs)} | {_count(rs, 'ok')}/{len(rs) * result['in_flight']} | "
            f"{_count(rs, 'error', 'http 4', 'http 503', 'http 504')} | "
            f"{sum(r['hung'] for r in rs)} | {_count(rs, 'http 500')} | "
            f"{_count(rs, 'cut', 'dropped')} | {sum(r['wrong_text'] for r in rs)} | "
            f"{percentile(times, 50):.2f} / {max(times):.2f} s |"
        )
    return "\n".join(rows) + "\n"


def _plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rounds = result["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for sig, color in (("SIGTERM", "#3b7dd8"), ("SIGKILL", "#d8573b")):
        xs = [i + 1 for i, r in enumerate(rounds) if r["signal"] == sig]
        ys = [r["answered_s"] for r in rounds if r["signal"] == sig]
        ax.bar(xs, ys, color=color, label=sig)
    ax.set_xlabel("restart")
    ax.set_ylabel("broker back to last answer (s)")
    ax.set_title(f"nats-server restarted with {result['in_flight']} requests in flight")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(restarts: int, in_flight: int, out: Path, hang_s: float = 60.0) -> int:
    """Run the restart benchmark and write ``restarts.{json,md,png}``; 1 when anything was
    lost, hung, cut short or a 500."""
    print(
        f"headrace bench restarts: {restarts} nats-server restarts, {in_flight} requests in "
        "flight each, echo worker (50 ms a token), one edge",
        file=sys.stderr,
    )
    key, port = f"bench-{secrets.token_hex(8)}", free_port()
    with tempfile.TemporaryDirectory(prefix="headrace-restarts-") as tmp:
        server = NatsServer(Path(tmp) / "nats", log_path=Path(tmp) / "nats.log")
        server.start()
        env = {"HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
        worker = ["worker", "echo", "--worker-id", "bench", "--slots", "64",
                  "--echo-token-delay-s", "0.05"]  # fmt: skip
        edge_env = {**env, "HEADRACE_API_KEYS": key, "HEADRACE_PORT": str(port)}
        try:
            with child(worker, env), child(["edge"], edge_env):
                wait_for_port(port, 30)
                result = asyncio.run(
                    _measure(f"http://127.0.0.1:{port}", key, server, restarts, in_flight, hang_s)
                )
        finally:
            server.stop()
    write_outputs(out, "restarts", result, _table(result), _plot)
    rounds = result["rounds"]
    bad = sum(r["hung"] + r["wrong_text"] for r in rounds)
    bad += _count(rounds, "http 500", "cut", "dropped")
    return 1 if bad else 0
