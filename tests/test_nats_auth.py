"""Least-privilege NATS: each role is refused what it must not do, and can do its own work.

Every test server runs the users ``headrace up`` generates (see conftest): ``admin``,
``edge``, ``worker``, ``observer`` and the native clients ``alice`` (model echo) and
``bob`` (echo, other).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats.errors
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from pydantic import SecretStr

from headrace import status
from headrace.credentials import Credentials
from schemas.client import JobClient
from schemas.codec import encode
from schemas.connection import NatsRefused, connect, credentials
from schemas.events import Done
from schemas.settings import CommonSettings
from schemas.subjects import (
    DLQ_STREAM,
    JOBS_STREAM,
    RESULTS_STREAM,
    Header,
    is_reply_subject,
    job_subject,
    new_job_id,
    results_subject,
)
from tests.conftest import AuthNatsServer, collect, running, text_job
from workers.settings import WorkerSettings


class Probe:
    """A connection as one user, recording the permission violations the server reports."""

    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors
        self.js = nc.jetstream(timeout=0.5)

    async def refused(self, subject: str, timeout_s: float = 3.0) -> bool:
        """True once the server has reported a violation on ``subject``."""
        await self.nc.flush()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(f'"{subject.lower()}"' in e for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture
async def login(nats_server: AuthNatsServer) -> AsyncIterator[Callable[..., Any]]:
    """``await login(user)``: a Probe connected as ``user`` the way ``connect()`` connects."""
    conns: list[NATS] = []

    async def _login(user: str) -> Probe:
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e).lower())

        settings = CommonSettings(nats_url=nats_server.url, **nats_server.login(user))
        nc = await nats.connect(
            nats_server.url, error_cb=on_error, allow_reconnect=False, **credentials(settings)
        )
        conns.append(nc)
        return Probe(nc, errors)

    yield _login
    for nc in conns:
        await nc.close()


def settings_of(server: AuthNatsServer, user: str, password: str | None = None) -> CommonSettings:
    login = server.login(user)
    if password is not None:
        login["nats_password"] = SecretStr(password)
    return CommonSettings(nats_url=server.url, **login)


async def test_anonymous_and_wrong_passwords_are_refused_at_once(
    nats_server: AuthNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    anonymous = CommonSettings(nats_url=nats_server.url)
    with pytest.raises(NatsRefused, match=f"{nats_server.url} refused an anonymous connection"):
        await connect(anonymous, "t", wait=True)  # wait: even a worker does not retry this
    with pytest.raises(NatsRefused, match=f"{nats_server.url} refused user 'edge'"):
        await connect(settings_of(nats_server, "edge", "not-the-password"), "t", wait=True)
    assert "refused user 'edge': authorization violation" in caplog.text
    assert "not-the-password" not in caplog.text
    nc = await connect(settings_of(nats_server, "edge"), "t")
    await nc.close()


@pytest.mark.slow
@pytest.mark.parametrize("process", [["worker", "echo"], ["edge"], ["status"]])
def test_a_process_with_a_wrong_password_exits_with_one_clear_line(
    nats_server: AuthNatsServer, process: list[str]
) -> None:
    env = dict(
        os.environ,
        HEADRACE_NATS_URL=nats_server.url,
        HEADRACE_NATS_USER="worker",
        HEADRACE_NATS_PASSWORD="wrong",
        HEADRACE_API_KEYS="sk-x",
    )
    out = subprocess.run(
        [sys.executable, "-m", "headrace", *process],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"{nats_server.url} refused user 'worker'" in out.stderr
    assert "wrong" not in out.stderr.replace("wrong or missing", "")


async def test_a_worker_cannot_read_results_nor_do_the_edges_work(
    login: Callable[..., Any], js: JetStreamContext
) -> None:
    worker = await login("worker")
    await worker.nc.subscribe("results.>")
    assert await worker.refused("results.>")
    one = results_subject(new_job_id())
    await worker.nc.subscribe(one)
    assert await worker.refused(one)
    with pytest.raises(nats.errors.TimeoutError):  # no consumer on RESULTS to read them back
        await worker.js.add_consumer(
            RESULTS_STREAM, ConsumerConfig(name="peek", filter_subject="results.x")
        )
    # It cannot submit jobs or change the topology either.
    await worker.nc.publish(job_subject("llm", "echo"), b"{}")
    assert await worker.refused("jobs.llm.echo")
    with pytest.raises(nats.errors.TimeoutError):
        await worker.js.delete_stream(JOBS_STREAM)
    assert (await js.stream_info(JOBS_STREAM)).config.name == JOBS_STREAM


async def test_the_edge_identity_cannot_do_a_workers_work(
    login: Callable[..., Any], js: JetStreamContext, client: JobClient
) -> None:
    job = text_job()
    await client.publish(job)
    edge = await login("edge")
    psub = await edge.js.pull_subscribe_bind(durable="llm-echo", stream=JOBS_STREAM)
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(1, timeout=1)
    assert await edge.refused(f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.llm-echo")
    assert (await js.consumer_info(JOBS_STREAM, "llm-echo")).num_pending == 1  # still queued
    # Nor forge results, heartbeats or dead letters, nor read a native client's results.
    for subject in (results_subject(job.id), "$KV.workers.fake", "dlq.jobs.llm.echo"):
        await edge.nc.publish(subject, b"{}")
        assert await edge.refused(subject)
    await edge.nc.subscribe("results.alice.>")
    assert await edge.refused("results.alice.>")


async def test_native_clients_read_only_their_own_results_and_models(
    login: Callable[..., Any], js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    alice, bob = await login("alice"), await login("bob")
    mine = JobClient(alice.nc, user="alice")
    async with running(worker_settings):
        job = text_job(max_tokens=3)
        stream = await mine.submit(job)
        events = await collect(stream)
        assert isinstance(events[-1].event, Done)
        assert [r.pos for r in await mine.history(job.id)] == [r.pos for r in events]
    # The worker replied on alice's prefix; RESULTS holds it under that subject.
    subjects = (await js.stream_info(RESULTS_STREAM, subjects_filter=">")).state.subjects or {}
    assert results_subject(job.id, "alice") in subjects

    # bob can neither subscribe to alice's results nor read them back from RESULTS.
    for pattern in ("results.alice.>", results_subject(job.id, "alice"), "results.>"):
        await bob.nc.subscribe(pattern)
        assert await bob.refused(pattern)
    with pytest.raises(nats.errors.TimeoutError):
        await JobClient(bob.nc, user="alice").history(job.id, timeout_s=0.5)
    for filter_subject in ("results.alice.>", "results.>", "results.*.*", "results.*"):
        with pytest.raises(nats.errors.TimeoutError):
            await bob.js.add_consumer(
                RESULTS_STREAM, ConsumerConfig(name="peek", filter_subject=filter_subject)
            )
    # alice may submit for echo only; bob for "other" too.
    await alice.nc.publish(job_subject("llm", "other"), encode(text_job(model="other")))
    assert await alice.refused("jobs.llm.other")
    await bob.nc.publish(job_subject("llm", "other"), b"{}")
    assert not await bob.refused("jobs.llm.other", timeout_s=0.3)


async def test_a_job_whose_reply_is_not_its_results_subject_is_dead_lettered(
    client: JobClient, js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    # A reply elsewhere would have the worker publish, with its permissions, where the
    # submitter chose: into another job's stream, or an API subject.
    victim = new_job_id()
    for reply in (results_subject(victim), f"$JS.API.STREAM.DELETE.{JOBS_STREAM}", "cancel.x"):
        await client.publish(text_job(), reply=reply)
    async with running(worker_settings):
        deadline = time.monotonic() + 10
        while (await js.stream_info(DLQ_STREAM)).state.messages < 3:
            assert time.monotonic() < deadline, "the jobs were not dead-lettered"
            await asyncio.sleep(0.05)
    assert (await js.stream_info(JOBS_STREAM)).config.name == JOBS_STREAM
    assert not await client.history(victim)
    dead = await js.get_last_msg(DLQ_STREAM, "dlq.jobs.llm.echo")
    assert "Headrace-Reply must be" in (dead.headers or {})[Header.REASON]


def test_reply_subjects_are_bound_to_the_job_id() -> None:
    job_id = new_job_id()
    assert is_reply_subject(results_subject(job_id), job_id)
    assert is_reply_subject(results_subject(job_id, "alice"), job_id)
    assert not is_reply_subject(results_subject(new_job_id(), "alice"), job_id)
    assert not is_reply_subject(f"results.a.b.{job_id}", job_id)
    assert not is_reply_subject(f"cancel.{job_id}", job_id)
    with pytest.raises(ValueError, match="NATS user"):
        results_subject(job_id, "Not.One.Token")


async def test_the_observer_reads_status_and_changes_nothing(
    login: Callable[..., Any], js: JetStreamContext, worker_settings: WorkerSettings
) -> None:
    observer = await login("observer")
    async with running(worker_settings):
        text = await status.render(observer.js)
    assert "w1" in text
    assert "llm-echo" in text
    for subject in (job_subject("llm", "echo"), "$KV.workers.w1", "results.x", "cancel.x"):
        await observer.nc.publish(subject, b"{}")
        assert await observer.refused(subject)
    with pytest.raises(nats.errors.TimeoutError):
        await observer.js.purge_stream(JOBS_STREAM)


async def test_inboxes_are_per_user(login: Callable[..., Any]) -> None:
    edge = await login("edge")
    await edge.nc.subscribe("_INBOX.worker.>")
    assert await edge.refused("_INBOX.worker.>")
    await edge.nc.subscribe("_INBOX.>")
    assert await edge.refused("_INBOX.>")


def test_credentials_are_made_once_kept_and_rotated(tmp_path: Path) -> None:
    first = Credentials.ensure(tmp_path / "auth", {"carol": ["echo"]}, cost=4)
    again = Credentials.ensure(tmp_path / "auth", cost=4)
    assert {u: again.users[u].password for u in first.users} == {
        u: first.users[u].password for u in first.users
    }
    assert again.users["carol"].models == ("echo",)  # a client stays until removed
    rotated = Credentials.ensure(tmp_path / "auth", rotate=["edge"], cost=4)
    assert rotated.users["edge"].password != first.users["edge"].password
    assert rotated.users["worker"].password == first.users["worker"].password
    files = sorted(p.name for p in (tmp_path / "auth").iterdir())
    assert files == sorted(
        ["users.json", "nats-users.conf"]
        + [f"{u}.env" for u in ("admin", "edge", "worker", "observer", "carol")]
    )
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "auth").iterdir()} == {0o600}
    conf = (tmp_path / "auth" / "nats-users.conf").read_text()
    assert rotated.users["edge"].password not in conf  # bcrypt hashes only
    assert rotated.users["edge"].hashed in conf
    users = orjson.loads((tmp_path / "auth" / "users.json").read_bytes())["users"]
    assert set(users) == set(rotated.users)
    with pytest.raises(ValueError, match="no such NATS user"):
        Credentials.ensure(tmp_path / "auth", rotate=["nobody"], cost=4)
    with pytest.raises(ValueError, match="cannot name a native client"):
        Credentials.ensure(tmp_path / "auth", {"edge": ["echo"]}, cost=4)


def test_the_monitoring_port_listens_on_loopback_only(
    tmp_path: Path, nats_credentials: Credentials
) -> None:
    from headrace.servers import free_port

    server = AuthNatsServer(
        tmp_path / "mon", nats_credentials, http_port=free_port(), log_path=tmp_path / "m.log"
    )
    server.start()
    try:
        log = (tmp_path / "m.log").read_text()
    finally:
        server.stop()
    assert f"Starting http monitor on 127.0.0.1:{server.http_port}" in log


def test_the_auth_command_adds_clients_and_rotates_without_printing_passwords(
    tmp_path: Path,
) -> None:
    def auth(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "headrace", "auth", str(tmp_path / "a"), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)

    first = auth("--client", "carol=echo,tiny-sd")
    assert "carol" in first.stdout
    assert "echo,tiny-sd" in first.stdout
    old = Credentials.ensure(tmp_path / "a").users
    rotated = auth("--rotate", "carol")
    assert "carol" in rotated.stdout
    assert "(new password)" in rotated.stdout
    new = Credentials.ensure(tmp_path / "a").users
    assert new["carol"].password != old["carol"].password
    assert new["edge"].password == old["edge"].password
    for out in (first, rotated):
        for user in new.values():
            assert user.password not in out.stdout + out.stderr
        assert old["carol"].password not in out.stdout + out.stderr
