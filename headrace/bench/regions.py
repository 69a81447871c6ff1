"""``headrace bench regions``: what serving a job in another region costs.

Two regions (single-node clusters) joined by gateways, an edge in region ``a`` and an echo
worker either in ``a`` (the job is served where it arrived) or only in ``b`` (it spills).
Each case streams chat completions through the edge and measures, at the client, the time
to the first token and the tokens per second after it. The same four cases run on plain
loopback and with a simulated round trip between the regions: a delaying TCP proxy
(``headrace.netproxy``, ``rtt/2`` each way) on every gateway connection, since this kernel
has no ``netem``. Only the regions' link is delayed: the client, the edge and its region
stay on loopback, as a client near its edge would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from headrace.bench.common import percentile, progress, pyplot, write_outputs
from headrace.credentials import Credentials, gateway_password
from headrace.netproxy import DelayProxy
from headrace.servers import SuperCluster, free_port
from schemas.permissions import ADMIN
from schemas.subjects import inbox_prefix
from schemas.topology import Limits, provision

REGIONS = ("a", "b")
KEY = "bench-regions-key"


@contextlib.contextmanager
def _super_cluster(root: Path, rtt_s: float) -> Any:
    """Two regions; with ``rtt_s`` every gateway link passes a proxy delaying rtt/2 each way."""
    creds = Credentials.ensure(root / "auth", {}, cost=4, regions=REGIONS)
    proxies: dict[str, DelayProxy] = {}
    urls: dict[tuple[str, str], str] = {}
    advertise: dict[str, str] = {}
    if rtt_s:
        for r in REGIONS:
            proxies[r] = DelayProxy("127.0.0.1:1", rtt_s / 2)  # its target is set below
            advertise[r] = proxies[r].address
        urls = {(x, y): proxies[y].address for x in REGIONS for y in REGIONS if x != y}
    sc = SuperCluster(
        root / "sc",
        REGIONS,
        gateway_password=gateway_password(creds.directory),
        log_dir=root / "logs",
        extra_conf=creds.authorization(),
        gateway_urls=urls,
        advertise=advertise,
    )
    for r, proxy in proxies.items():
        (node,) = sc.cluster(r).nodes
        proxy.target = ("127.0.0.1", sc.gateway_ports[node.server_name])
        proxy.start()
    try:
        sc.start(timeout_s=60)
        yield sc, creds
    finally:
        sc.stop()
        for proxy in proxies.values():
            proxy.stop()


async def _provision(sc: SuperCluster, creds: Credentials) -> None:
    import nats

    nc = await nats.connect(
        sc.url("a"),
        user=ADMIN,
        password=creds.password(ADMIN).get_secret_value(),
        inbox_prefix=inbox_prefix(ADMIN),
    )
    try:
        for r in REGIONS:
            await provision(
                nc.jetstream(timeout=10), Limits(), [("llm", "echo")], region=r, home="a"
            )
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _worker(
    sc: SuperCluster, creds: Credentials, region: str, delay_s: float
) -> AsyncIterator[None]:
    from workers.engines.echo import EchoEngine
    from workers.runtime import Runtime
    from workers.settings import WorkerSettings

    settings = WorkerSettings(
        nats_url=sc.url(region),
        nats_user="worker",
        nats_password=creds.password("worker"),
        region=region,
        regions=",".join(REGIONS),
        worker_id=f"bench-{region}",
        heartbeat_s=0.5,
        fetch_timeout_s=1.0,
    )
    runtime = Runtime(settings, EchoEngine(token_delay_s=delay_s))
    task = asyncio.create_task(runtime.run())
    try:
        yield
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def _edge(sc: SuperCluster, creds: Credentials) -> AsyncIterator[str]:
    from edge.app import start
    from edge.settings import EdgeSettings

    settings = EdgeSettings(
        nats_url=sc.url("a"),
        nats_user="edge",
        nats_password=creds.password("edge"),
        region="a",
        regions=",".join(REGIONS),
        port=free_port(),
        api_keys=KEY,
        worker_stale_s=3.0,
        region_poll_s=0.5,
    )
    runner = await start(settings, CollectorRegistry())
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        await runner.cleanup()


async def _ready(
    http: aiohttp.ClientSession, base: str, region: str, timeout_s: float = 30
) -> None:
    """Until a chat is served in ``region`` (the fleet and the placement see its worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        served, *_ = await _chat(http, base, 2)
        if served == region:
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"no job was served in region {region}")


async def _chat(
    http: aiohttp.ClientSession, base: str, tokens: int
) -> tuple[str, float, float, float]:
    """One streamed chat: (region that served it, time to first token s, tokens/s after it,
    request start to the end of the answer s)."""
    body = {
        "model": "echo",
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}],
    }
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with http.post(
        f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        region = r.headers.get("x-headrace-region", "?")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            delta = orjson.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1
    if first is None or last is None:
        raise RuntimeError("a streamed answer carried no text")
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return region, first - t0, rate, time.perf_counter() - t0


async def _case(
    sc: SuperCluster,
    creds: Credentials,
    served_in: str,
    samples: int,
    tokens: int,
    delay_s: float,
    label: str,
) -> dict[str, Any]:
    ttft: list[float] = []
    rates: list[float] = []
    totals: list[float] = []
    async with (
        _edge(sc, creds) as base,
        _worker(sc, creds, served_in, delay_s),
        aiohttp.ClientSession() as http,
    ):
        await _ready(http, base, served_in)
        for i in range(samples):
            region, t, rate, total = await _chat(http, base, tokens)
            if region != served_in:
                raise RuntimeError(f"expected region {served_in}, served in {region}")
            ttft.append(t)
            rates.append(rate)
            totals.append(total)
            progress(label, i + 1, samples)
    return {
        "served_in": served_in,
        "samples": samples,
        "ttft_ms_p50": round(percentile(ttft, 50) * 1000, 1),
        "ttft_ms_p95": round(percentile(ttft, 95) * 1000, 1),
        "tokens_per_s_p50": round(percentile(rates, 50), 1),
        "e2e_ms_p50": round(percentile(totals, 50) * 1000, 1),
    }


async def _measure(
    samples: int, tokens: int, delay_s: float, rtts_ms: list[float]
) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    for rtt_ms in rtts_ms:
        with (
            tempfile.TemporaryDirectory(prefix="headrace-regions-") as tmp,
            _super_cluster(Path(tmp), rtt_ms / 1000) as (sc, creds),
        ):
            await _provision(sc, creds)
            for served_in, what in (("a", "own region"), ("b", "spilled")):
                label = f"{what}, {rtt_ms:g} ms RTT"
                case = await _case(sc, creds, served_in, samples, tokens, delay_s, label)
                cases.append({"rtt_ms": rtt_ms, "case": what, **case})
    return {
        "what": "streamed chat via an edge in region a; echo worker in a (own) or only in b (spilled)",
        "tokens": tokens,
        "token_delay_s": delay_s,
        "cases": cases,
    }


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"Regions: streamed chat completions of {result['tokens']} tokens "
        f"(echo worker, {result['token_delay_s'] * 1000:g} ms per token), edge in region a",
        "",
        "| link between regions | served | TTFT p50 (ms) | TTFT p95 (ms) | tokens/s p50 | "
        "whole answer p50 (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        link = "loopback" if not c["rtt_ms"] else f"{c['rtt_ms']:g} ms RTT (proxy)"
        lines.append(
            f"| {link} | {c['case']} (in {c['served_in']}) | {c['ttft_ms_p50']} | "
            f"{c['ttft_ms_p95']} | {c['tokens_per_s_p50']} | {c['e2e_ms_p50']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [
        f"{'loopback' if not c['rtt_ms'] else str(int(c['rtt_ms'])) + ' ms'}\n{c['case']}"
        for c in result["cases"]
    ]
    ax.bar(labels, [c["ttft_ms_p50"] for c in result["cases"]], color="#4a7ab7")
    ax.set_ylabel("time to first token, p50 (ms)")
    ax.set_title("Own region vs spilled, by round trip between regions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(
    samples: int = 20,
    tokens: int = 32,
    token_delay_s: float = 0.01,
    rtts_ms: tuple[float, ...] = (0.0, 40.0),
    out: Path = Path("bench-results"),
) -> int:
    """Measure, print JSON and a markdown table, write them and a plot under ``out``."""
    result = asyncio.run(_measure(samples, tokens, token_delay_s, list(rtts_ms)))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    write_outputs(out, "regions", result, _table(result), _plot)
    return 0
