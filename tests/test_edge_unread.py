"""Clients that stop reading, through the real edge: bounded buffers, cancelled jobs, deadlines.

Each client is a raw socket with a small receive buffer that sends one request and reads
nothing, as a stalled or malicious client would.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import time
from typing import Any

import aiohttp
import orjson
import pytest
from nats.js import JetStreamContext

from edge.settings import EdgeSettings
from schemas.client import JobClient
from schemas.events import Done, Error
from tests.conftest import API_KEY, finished_history, running
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

CHAT = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]


@pytest.fixture
def edge_settings(edge_settings: EdgeSettings, request: pytest.FixtureRequest) -> EdgeSettings:
    """The shared edge settings with this test's per-stream buffer cap."""
    cap = getattr(request, "param", 64 * 1024)
    return edge_settings.model_copy(update={"stream_buffer_bytes": cap})


def unread(edge: str, body: dict[str, Any], timeout_s: float) -> socket.socket:
    """Send a streamed chat completion over a raw socket that will not read its answer."""
    port = int(edge.rsplit(":", 1)[1])
    data = orjson.dumps(body)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Timeout: {timeout_s}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, set first
    sock.connect(("127.0.0.1", port))
    sock.sendall(head + data)
    return sock


async def edge_metrics(edge: str) -> dict[str, float]:
    """Open streams and cancels by reason, from the edge's /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{edge}/metrics") as r:
        text = await r.text()
    found = {"open": 0.0}
    for line in text.splitlines():
        if line.startswith("headrace_edge_open_streams "):
            found["open"] = float(line.split()[-1])
        elif m := re.match(r'headrace_edge_cancels_total\{reason="(\w+)"\} (\S+)', line):
            found[m.group(1)] = float(m.group(2))
    return found


async def released_after(edge: str, started: float, within_s: float) -> float:
    """Seconds from ``started`` until the edge holds no stream (once it opened one)."""
    opened = False
    while time.monotonic() - started < within_s:
        m = await edge_metrics(edge)
        opened = opened or m["open"] > 0
        if opened and m["open"] == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"the edge still holds the stream after {within_s} s")


async def read_to_end(sock: socket.socket) -> bytes:
    """Everything the edge had sent before it let go; the socket must end (EOF or reset)."""

    def drain() -> bytes:
        sock.settimeout(10)
        out = bytearray()
        try:
            while chunk := sock.recv(1 << 20):
                out += chunk
        except ConnectionResetError:
            pass
        return bytes(out)

    try:
        return await asyncio.to_thread(drain)
    finally:
        sock.close()


def job_ids(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    (ids,) = re.findall(r"(?im)^x-headrace-job-ids: (\S+)\r?$", head)
    return str(ids).split(",")


async def test_a_client_that_stops_reading_is_dropped_and_its_jobs_cancelled(
    edge: str, worker_settings: WorkerSettings, client: JobClient, js: JetStreamContext
) -> None:
    """n=8 long streams nobody reads: past the 64 KiB cap the edge lets go, long before the
    deadline, and every job is cancelled (their outputs would be 8 x 32 768 tokens)."""
    body = {"model": "echo", "messages": CHAT, "n": 8, "max_tokens": 32768, "stream": True}
    engine = EchoEngine(token_delay_s=0.001)  # 8 x 1000 tokens/s: still running when dropped
    async with running(worker_settings.model_copy(update={"slots": 8}), engine):
        started = time.monotonic()
        sock = unread(edge, body, timeout_s=60)
        assert await released_after(edge, started, within_s=30) < 30
        assert (await edge_metrics(edge)).get("slow_client") == 8
        raw = await read_to_end(sock)
        assert b"data: [DONE]" not in raw  # cut off, not finished
        for job_id in job_ids(raw):
            *_, last = await finished_history(client, job_id, timeout_s=10)
            assert isinstance(last.event, Done)
            assert last.event.finish_reason == "cancelled"


@pytest.mark.parametrize("edge_settings", [64 * 1024 * 1024], indirect=True)
async def test_the_deadline_holds_for_a_client_that_stops_reading(
    edge: str, worker_settings: WorkerSettings, client: JobClient, js: JetStreamContext
) -> None:
    """With a cap too large to reach, the request's deadline still ends the stream: its job is
    cancelled and its connection dropped at the deadline, whatever is still waiting for it."""
    body = {"model": "echo", "messages": CHAT, "max_tokens": 32768, "stream": True}
    engine = EchoEngine(token_delay_s=0.0002)  # over 6 s of output, several MB by 3 s
    async with running(worker_settings, engine):
        started = time.monotonic()
        sock = unread(edge, body, timeout_s=3)
        released = await released_after(edge, started, within_s=10)
        assert 2.5 < released < 4.5
        raw = await read_to_end(sock)
        (job_id,) = job_ids(raw)
        *_, last = await finished_history(client, job_id, timeout_s=10)
        assert isinstance(last.event, Done | Error)
        if isinstance(last.event, Done):
            assert last.event.finish_reason == "cancelled"
    assert (await edge_metrics(edge)).get("deadline") == 1


def read_whole_stream(edge: str, body: dict[str, Any]) -> bytes:
    """A client in its own thread that reads as fast as it can (http.client, blocking)."""
    host, port = edge.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", body=orjson.dumps(body), headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "edge_settings", [64 * 1024, EdgeSettings().stream_buffer_bytes], indirect=True
)
async def test_a_client_that_reads_gets_every_chunk(
    edge: str, worker_settings: WorkerSettings
) -> None:
    """The cap bounds a backlog, not a stream: 8 x 4000 tokens (several MB, from a worker with
    no token delay) through the smallest cap and the default one."""
    body = {"model": "echo", "messages": CHAT, "n": 8, "max_tokens": 4000, "stream": True}
    async with running(worker_settings.model_copy(update={"slots": 8})):
        raw = await asyncio.to_thread(read_whole_stream, edge, body)
    chunks = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    finishes = [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]
    ]
    assert finishes == ["length"] * 8
    assert raw.endswith(b"data: [DONE]\n\n")
