"""What clients that stop reading cost the edge: its memory, and how long it holds them.

    .venv/bin/python loadtests/unread_streams.py [--streams 20] [--n 8] [--max-tokens 32768]
        [--timeout-s 60] [--token-delay-s 0] [--waves 1] [--out bench-results]

A nats-server, one echo worker (a slot per job, by default no token delay: output as fast
as it can go) and one edge process. Each client is a raw socket with a small receive buffer
that sends one streamed chat completion (``n`` choices, ``max_tokens`` each, a ``Timeout``
header) and never reads a byte. The edge's RSS is sampled throughout; the edge's own metrics
say when it has let go of every stream (``headrace_edge_open_streams``) and how many of
their jobs it cancelled, and why (``headrace_edge_cancels_total``). With ``--waves`` the
streams are opened again each time the edge let go of the last ones: a peak that does not
climb wave after wave is memory reused, not leaked. Writes ``unread_streams.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import psutil

from headrace.bench.common import child, private_nats, pyplot, wait_worker, write_outputs
from headrace.servers import free_port, wait_for_port

CHAT = [{"role": "user", "content": "one two three four five six seven eight"}]
MB = 1024 * 1024


def unread_stream(port: int, key: str, n: int, max_tokens: int, timeout_s: float) -> socket.socket:
    """A connection that asks for a long stream and never reads its answer."""
    body = orjson.dumps(
        {"model": "echo", "messages": CHAT, "n": n, "max_tokens": max_tokens, "stream": True}
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Timeout: {timeout_s}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect(("127.0.0.1", port))
    sock.sendall(head.encode() + body)
    return sock


async def edge_metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The edge's open streams and its cancels by reason."""
    async with http.get(f"{base}/metrics") as r:
        text = await r.text()
    out = {"open_streams": 0.0}
    for line in text.splitlines():
        if line.startswith("headrace_edge_open_streams "):
            out["open_streams"] = float(line.split()[-1])
        elif m := re.match(r'headrace_edge_cancels_total\{reason="(\w+)"\} (\S+)', line):
            out[f"cancelled_{m.group(1)}"] = float(m.group(2))
    return out


async def measure(port: int, key: str, edge_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """Open the streams ``args.waves`` times, each wave once the edge let go of the last."""
    edge = psutil.Process(edge_pid)
    base = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, float, float]] = []  # (s since the first wave, RSS MB, open)
    waves: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        await asyncio.sleep(1.0)  # the edge settles after its worker registered
        before = edge.memory_info().rss / MB
        t0 = time.perf_counter()
        for _ in range(args.waves):
            waves.append(await _wave(http, base, port, key, edge, args, t0, samples))
            print(f"  wave {len(waves)}: {waves[-1]}", file=sys.stderr)
        await asyncio.sleep(1.0)
        after = edge.memory_info().rss / MB
        final = await edge_metrics(http, base)
    released = [w["released_s"] for w in waves]
    return {
        "streams": args.streams,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "timeout_s": args.timeout_s,
        "token_delay_s": args.token_delay_s,
        "rss_before_mb": before,
        "rss_peak_mb": max(w["rss_peak_mb"] for w in waves),
        "rss_after_mb": after,
        "released_s": None if None in released else max(released),
        "waves": waves,
        "jobs": args.streams * args.n * args.waves,
        "metrics": final,
        "samples": samples,
    }


async def _wave(
    http: aiohttp.ClientSession,
    base: str,
    port: int,
    key: str,
    edge: psutil.Process,
    args: argparse.Namespace,
    t0: float,
    samples: list[tuple[float, float, float]],
) -> dict[str, Any]:
    """One wave of unread streams, until the edge holds none of them (or the run's end)."""
    started = time.perf_counter()
    opts = (args.n, args.max_tokens, args.timeout_s)
    socks = [unread_stream(port, key, *opts) for _ in range(args.streams)]
    opened, released_s, peak = False, None, 0.0
    while time.perf_counter() - started < args.timeout_s + 10:
        m = await edge_metrics(http, base)
        rss = edge.memory_info().rss / MB
        peak = max(peak, rss)
        samples.append((time.perf_counter() - t0, rss, m["open_streams"]))
        opened = opened or m["open_streams"] > 0
        if opened and m["open_streams"] == 0:
            released_s = time.perf_counter() - started
            break
        await asyncio.sleep(0.25)
    for sock in socks:
        sock.close()
    return {"rss_peak_mb": peak, "released_s": released_s}


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    xs = [s[0] for s in result["samples"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [s[1] for s in result["samples"]], color="#d8573b", label="edge RSS (MB)")
    ax.set_xlabel("seconds since the streams opened")
    ax.set_ylabel("edge RSS (MB)")
    ax2 = ax.twinx()
    ax2.plot(xs, [s[2] for s in result["samples"]], color="#3b7dd8", label="open streams")
    ax2.set_ylabel("open streams")
    ax.set_title(f"waves of {result['streams']} streams (n={result['n']}) that never read")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def table(r: dict[str, Any]) -> str:
    released = "not within the run" if r["released_s"] is None else f"{r['released_s']:.1f} s"
    m = r["metrics"]
    waves = " / ".join(f"{w['rss_peak_mb']:.0f}" for w in r["waves"])
    cancels = ", ".join(
        f"{k.removeprefix('cancelled_')} {v:.0f}"
        for k, v in m.items()
        if k.startswith("cancelled_")
    )
    return (
        "| measure | value |\n|---|---|\n"
        f"| unread streams | {r['streams']} x n={r['n']}, max_tokens {r['max_tokens']}, Timeout {r['timeout_s']:.0f} s, "
        f"{len(r['waves'])} wave(s) |\n"
        f"| edge RSS before / peak / after | {r['rss_before_mb']:.0f} / {r['rss_peak_mb']:.0f} / {r['rss_after_mb']:.0f} MB |\n"
        f"| peak of each wave | {waves} MB |\n"
        f"| peak growth per stream | {(r['rss_peak_mb'] - r['rss_before_mb']) * 1024 / r['streams']:.0f} KB |\n"
        f"| every stream of a wave let go after (the slowest wave) | {released} |\n"
        f"| jobs cancelled by the edge, by reason (of {r['jobs']}) | {cancels or 'none'} |\n"
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--n", type=int, default=8, help="choices per stream")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="each request's Timeout")
    parser.add_argument(
        "--token-delay-s", type=float, default=0.0, help="the echo worker's delay per token"
    )
    parser.add_argument("--waves", type=int, default=1, help="open the streams this many times")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    key, port = f"bench-{secrets.token_hex(8)}", free_port()
    slots = str(args.streams * args.n)
    print(
        f"unread streams: {args.streams} x n={args.n}, echo worker ({slots} slots), one edge",
        file=sys.stderr,
    )
    with private_nats() as server:
        env = {"HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
        edge_env = {**env, "HEADRACE_API_KEYS": key, "HEADRACE_PORT": str(port)}
        worker_env = {**env, "HEADRACE_ECHO_TOKEN_DELAY_S": str(args.token_delay_s)}
        with (
            child(["worker", "echo", "--worker-id", "bench", "--slots", slots], worker_env),
            child(["edge"], edge_env) as edge,
        ):
            wait_for_port(port, 30)
            asyncio.run(_registered(server.url))
            result = asyncio.run(measure(port, key, edge.pid, args))
    write_outputs(args.out, "unread_streams", result, table(result), plot)
    return 0


async def _registered(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await wait_worker(nc, "bench")
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(main())
