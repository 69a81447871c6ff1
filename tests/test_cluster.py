"""A 3-node nats-server cluster: R3 topology, and no accepted job lost to a SIGKILLed stream
leader or to a rolling restart of every node."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from pydantic import ValidationError

from headrace.cli import build_parser
from headrace.credentials import SERVER_CONF, Credentials
from headrace.servers import NatsCluster, NatsServer, free_port
from headrace.settings import StackSettings
from headrace.status import render
from schemas.client import JobClient, Received
from schemas.errors import QueueFull, Unavailable
from schemas.events import Delta, Done, EngineEvent
from schemas.jobs import TextJob
from schemas.permissions import ADMIN
from schemas.subjects import (
    DLQ_STREAM,
    IMAGES_BUCKET,
    JOBS_STREAM,
    OPTIONS_BUCKET,
    RESULTS_STREAM,
    WORKERS_BUCKET,
    inbox_prefix,
)
from schemas.topology import NATS_DIR, Limits, provision, stream_definitions
from tests.conftest import TEST_LIMITS, running, text_job
from workers.engines.echo import EchoEngine
from workers.settings import WorkerSettings

R3 = TEST_LIMITS.model_copy(update={"replicas": 3})
EVERY_STREAM = (
    JOBS_STREAM,
    RESULTS_STREAM,
    DLQ_STREAM,
    f"KV_{WORKERS_BUCKET}",
    f"KV_{OPTIONS_BUCKET}",
    f"OBJ_{IMAGES_BUCKET}",
)


async def connect_all(cluster: NatsCluster, on_reconnect: Any = None) -> NATS:
    """A client given every node's URL, reconnecting forever (as the edge and workers do)."""
    return await nats.connect(
        servers=cluster.urls,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        reconnected_cb=on_reconnect,
    )


async def replicas_of(js: JetStreamContext, stream: str) -> tuple[int | None, str | None, set[str]]:
    """A stream's configured count, its leader and its followers."""
    info = await js.stream_info(stream)
    assert info.cluster is not None
    followers = {str(p.name) for p in info.cluster.replicas or []}
    return info.config.num_replicas, info.cluster.leader, followers


def test_replicas_are_the_deployments_choice() -> None:
    # No count by default, so provisioning leaves an existing stream's alone.
    assert all("num_replicas" not in d for d in stream_definitions(Limits()).values())
    assert {d["num_replicas"] for d in stream_definitions(R3).values()} == {3}


def test_up_cluster_settings() -> None:
    args = build_parser().parse_args(["up", "--cluster", "3"])
    settings = StackSettings(nats_nodes=args.nats_nodes)
    assert settings.stream_replicas() == 3
    assert StackSettings().stream_replicas() is None  # one node: the server's default, R1
    assert StackSettings(nats_nodes=5, replicas=5).stream_replicas() == 5
    with pytest.raises(ValidationError, match="cannot exceed"):
        StackSettings(replicas=3)  # a standalone server refuses R3


async def test_every_stream_and_bucket_is_r3_with_a_leader(nats_cluster: NatsCluster) -> None:
    names = {n.server_name for n in nats_cluster.nodes}
    nc = await connect_all(nats_cluster)
    try:
        js = nc.jetstream()
        changes = await provision(js, R3, [("llm", "echo")])
        assert set(changes.values()) == {"created"}
        for stream in EVERY_STREAM:
            count, leader, followers = await replicas_of(js, stream)
            assert count == 3, stream
            assert leader in names, stream
            assert followers == names - {leader}, stream
        consumer = await js.consumer_info(JOBS_STREAM, "llm-echo")
        # 0: the consumer inherits the stream's count, and has the followers to show for it.
        assert not consumer.config.num_replicas
        assert consumer.cluster is not None
        assert consumer.cluster.leader in names
        assert len(consumer.cluster.replicas or []) == 2
        again = await provision(js, R3, [("llm", "echo")])
        assert set(again.values()) == {"unchanged"}
        text = await render(js)  # headrace status
        assert "CLUSTER headrace" in text
        _, jobs_leader, _ = await replicas_of(js, JOBS_STREAM)
        assert re.search(rf"^JOBS +{jobs_leader} +headrace-\d, headrace-\d$", text, re.M), text
    finally:
        await nc.close()


async def test_provisioning_scales_a_single_copy_up(nats_cluster: NatsCluster) -> None:
    nc = await connect_all(nats_cluster)
    try:
        js = nc.jetstream()
        await provision(js, TEST_LIMITS, [("llm", "echo")])  # no count: R1
        assert (await replicas_of(js, JOBS_STREAM))[0] == 1
        changes = await provision(js, R3, [("llm", "echo")])
        assert {changes[f"stream {s}"] for s in (JOBS_STREAM, RESULTS_STREAM)} == {"updated"}
        assert {changes[f"bucket {b}"] for b in (WORKERS_BUCKET, IMAGES_BUCKET)} == {"updated"}
        for stream in EVERY_STREAM:
            assert (await replicas_of(js, stream))[0] == 3, stream
        # The new peers catch up in the background (about 10 s for JOBS, whose consumer is
        # scaled after it); the stream takes no further update until then.
    finally:
        await nc.close()


async def test_a_limit_change_keeps_the_replica_count(nats_cluster: NatsCluster) -> None:
    nc = await connect_all(nats_cluster)
    try:
        js = nc.jetstream()
        await provision(js, R3, [("llm", "echo")])
        # A provision that names no count (an operator changing a limit, a process re-creating
        # what it needs) must not scale the stream down to 1.
        changed = TEST_LIMITS.model_copy(update={"jobs_max_msgs": 77})
        assert (await provision(js, changed))[f"stream {JOBS_STREAM}"] == "updated"
        info = await js.stream_info(JOBS_STREAM)
        assert (info.config.max_msgs, info.config.num_replicas) == (77, 3)
    finally:
        await nc.close()


async def test_the_compose_node_config_forms_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # compose.yaml's nats/cluster/node.conf, run for real: only the addresses are made loopback
    # ones (there are no nats-1..3 hosts here) and each store a temporary directory.
    conf = (NATS_DIR / "cluster" / "node.conf").read_text()
    route_ports = {f"nats-{i}": free_port() for i in (1, 2, 3)}
    for host, port in route_ports.items():
        conf = conf.replace(f"nats-route://{host}:6222", f"nats-route://127.0.0.1:{port}")
    conf = conf.replace("store_dir: /data\n", "")  # NatsServer passes its own (-sd)
    # The users file compose mounts next to it (headrace auth nats-auth makes it).
    creds = Credentials.ensure(tmp_path / "nats-auth", {}, cost=4)
    (tmp_path / SERVER_CONF).write_text((creds.directory / SERVER_CONF).read_text())
    nodes = []
    try:
        for host, port in route_ports.items():
            path = tmp_path / f"{host}.conf"
            path.write_text(conf.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{port}"))
            node = NatsServer(tmp_path / host, http_port=free_port(), config=path)
            monkeypatch.setenv("SERVER_NAME", host)  # what each compose service sets
            node.start()
            nodes.append(node)
        nc = await nats.connect(
            servers=[n.url for n in nodes],
            user=ADMIN,
            password=creds.password(ADMIN).get_secret_value(),
            inbox_prefix=inbox_prefix(ADMIN),
        )
        try:
            js = nc.jetstream(timeout=1.0)
            async with asyncio.timeout(20):
                while True:  # until the meta leader is elected
                    with contextlib.suppress(nats.errors.Error, TimeoutError):
                        await provision(js, R3)
                        break
                    await asyncio.sleep(0.2)
            count, leader, followers = await replicas_of(js, JOBS_STREAM)
        finally:
            await nc.close()
    finally:
        for node in nodes:
            node.stop()
    assert count == 3
    assert {leader, *followers} == set(route_ports)


async def echo_text(job: TextJob) -> str:
    """What the echo engine writes for the job: the same on any worker, on any attempt."""
    parts = [e.text async for e in EchoEngine().run(job, threading.Event()) if isinstance(e, Delta)]
    return "".join(parts)


class RecordingEcho(EchoEngine):
    """The echo engine, noting every job id it runs: what the queue delivered, whatever became of
    the job's results afterwards."""

    def __init__(self, ran: Counter[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ran = ran

    async def run(self, job: TextJob, cancel: threading.Event) -> AsyncGenerator[EngineEvent, None]:
        """Note the job, then echo."""
        self.ran[job.id] += 1
        async for event in super().run(job, cancel):
            yield event


@dataclass
class Outcome:
    """One submitted job: accepted or not, and what its stream delivered."""

    job: TextJob
    submitted_s: float
    accepted_s: float | None = None
    finished_s: float | None = None
    events: list[Received] = field(default_factory=list)
    problem: str | None = None  # why it is lost, for an accepted job

    def final_text(self) -> str:
        """The text the stream delivered: JobStream stitches attempts into one sequence (a
        redelivered attempt's repeated text is dropped, a continuation's goes on)."""
        return "".join(r.event.text for r in self.events if isinstance(r.event, Delta))


@dataclass
class Load:
    """Streamed echo jobs submitted at a steady rate, each followed until it finishes."""

    client: JobClient
    interval_s: float
    tokens: int
    t0: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    async def run(self) -> None:
        """Submit until ``stop``."""
        while not self.stopping.is_set():
            outcome = Outcome(text_job(max_tokens=self.tokens, deadline_in_s=60), self.now())
            self.outcomes.append(outcome)
            self.tasks.append(asyncio.create_task(self._follow(outcome)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self.stopping.wait()

    async def _follow(self, outcome: Outcome) -> None:
        try:
            stream = await self.client.submit(outcome.job)
        except (Unavailable, QueueFull):
            return  # refused, never accepted: the caller was told
        outcome.accepted_s = self.now()
        try:
            async with stream, asyncio.timeout(15):
                async for received in stream:
                    outcome.events.append(received)
        except Exception as e:  # every way a stream can end is a finding here
            # Our own timeout is the builtin; nats-py's TimeoutError subclasses it.
            kind = "no final event"
            if type(e) is not TimeoutError:
                kind = f"{type(e).__module__}.{type(e).__qualname__} out of the stream"
            outcome.problem = f"{kind} after {len(outcome.events)} event(s)"
            return
        outcome.finished_s = self.now()
        done = outcome.events[-1].event
        if not isinstance(done, Done):
            outcome.problem = f"ended with {done.type}: {done}"
        elif outcome.final_text() != await echo_text(outcome.job):
            seqs = [
                r.pos.seq for r in outcome.events if r.pos.attempt == outcome.events[-1].pos.attempt
            ]
            missing = sorted(set(range(1, seqs[-1] + 1)) - set(seqs))
            outcome.problem = f"text incomplete: events {missing} missing"

    async def stop(self) -> None:
        """Stop submitting and wait for every job followed so far."""
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    def accepted(self) -> list[Outcome]:
        """Jobs JetStream confirmed."""
        return [o for o in self.outcomes if o.accepted_s is not None]


async def leader_of(js: JetStreamContext, stream: str) -> str | None:
    """The stream's leader now; None while there is none (an election) or the request fails."""
    try:
        info = await js.stream_info(stream)
    except (nats.errors.Error, TimeoutError):
        return None
    return info.cluster.leader if info.cluster is not None else None


async def wait_new_leader(js: JetStreamContext, stream: str, old: str, timeout_s: float) -> str:
    """Until another node than ``old`` leads the stream."""
    async with asyncio.timeout(timeout_s):
        while (leader := await leader_of(js, stream)) in (None, old):  # noqa: ASYNC110 - polls the server
            await asyncio.sleep(0.02)
    assert leader is not None
    return leader


async def drained(js: JetStreamContext, timeout_s: float = 15.0) -> ConsumerInfo:
    """The model consumer once nothing is queued or held, or as it stands after ``timeout_s``
    (a job nak'ed after its done runs once more: see summarize)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info: ConsumerInfo = await js.consumer_info(JOBS_STREAM, "llm-echo")
        if (info.num_pending, info.num_ack_pending) == (0, 0) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.2)


def first_after(times: list[float], t: float) -> float | None:
    """How long after ``t`` the first of ``times`` came."""
    later = [x for x in times if x >= t]
    return min(later) - t if later else None


async def chaos(cluster: NatsCluster, js: JetStreamContext, load: Load) -> dict[str, Any]:
    """SIGKILL the JOBS leader under load, bring it back, then restart every node in turn."""
    figures: dict[str, Any] = {}
    await asyncio.sleep(2.0)
    old = await leader_of(js, JOBS_STREAM)
    assert old is not None
    killed = cluster.node(old)
    figures["t_kill"] = load.now()
    killed.kill()
    new = await wait_new_leader(js, JOBS_STREAM, old, timeout_s=20)
    figures["JOBS leader"] = f"{old} killed, {new} elected"
    figures["new JOBS leader after SIGKILL (s)"] = load.now() - figures["t_kill"]
    await asyncio.sleep(2.0)  # two nodes carry the load for a while
    t_back = load.now()
    await asyncio.to_thread(cluster.restart, killed)  # already dead: starts it on its store
    figures["killed node back and healthy (s)"] = load.now() - t_back
    for node in cluster.nodes:
        t_node = load.now()
        await asyncio.to_thread(cluster.restart, node)  # SIGTERM, start, /healthz 200
        figures[f"rolling restart of {node.server_name} (s)"] = load.now() - t_node
    await asyncio.sleep(1.0)
    return figures


def summarize(load: Load, ran: Counter[str], figures: dict[str, Any]) -> list[Outcome]:
    """Add the counts and latencies to ``figures``; return the accepted jobs that were lost."""
    accepted = load.accepted()
    lost = [o for o in accepted if o.problem is not None]
    t_kill = figures.pop("t_kill")
    acceptances = sorted(o.accepted_s for o in accepted if o.accepted_s is not None)
    dones = sorted(o.finished_s for o in accepted if o.finished_s is not None)
    latencies = [o.finished_s - o.submitted_s for o in accepted if o.finished_s is not None]
    figures.update(
        {
            "submitted": len(load.outcomes),
            "accepted": len(accepted),
            "refused while JOBS had no leader": len(load.outcomes) - len(accepted),
            "accepted and run by a worker": sum(1 for o in accepted if o.job.id in ran),
            "accepted and lost on the way to the client": len(lost),
            "first job accepted after SIGKILL (s)": first_after(acceptances, t_kill),
            "first job done after SIGKILL (s)": first_after(dones, t_kill),
            "longest gap between acceptances (s)": max(
                (b - a for a, b in itertools.pairwise(acceptances)), default=0.0
            ),
            "job latency median (s)": statistics.median(latencies) if latencies else None,
            "job latency max (s)": max(latencies, default=None),
            "jobs finished on a later attempt": sum(
                1 for o in accepted if o.finished_s is not None and o.events[-1].pos.attempt > 1
            ),
            # The worker's ack_sync got no responder while the consumer elected a leader: the
            # runtime took that for an engine failure and nak'ed a job it had finished.
            "jobs run again after they were done": sum(1 for n in ran.values() if n > 1),
        }
    )
    print("\n3-node cluster, JOBS leader SIGKILL then rolling restart:")
    for what, value in figures.items():
        print(f"  {what}: {f'{value:.2f}' if isinstance(value, float) else value}")
    for o in lost:
        print(f"  lost {o.job.id} (accepted at {o.accepted_s:.2f} s): {o.problem}")
    return lost


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_no_accepted_job_lost_to_a_leader_kill_and_a_rolling_restart(
    nats_cluster: NatsCluster,
) -> None:
    clients: list[JobClient] = []

    async def recover() -> None:  # what the edge does after a reconnect (edge/app.py)
        for client in clients:
            await client.recover()

    nc = await connect_all(nats_cluster, recover)
    clients.append(JobClient(nc))
    js = nc.jetstream(timeout=1.0)
    await provision(js, R3, [("llm", "echo")])
    settings = [
        WorkerSettings(
            nats_url=nats_cluster.url,  # comma-separated, as HEADRACE_NATS_URL takes it
            worker_id=f"w{i}",
            slots=4,
            heartbeat_s=0.3,
            fetch_timeout_s=0.5,
            in_progress_s=0.5,
            shutdown_grace_s=5.0,
            retry_delay_s=0.1,
        )
        for i in (1, 2)
    ]
    ran: Counter[str] = Counter()
    try:
        async with (
            running(settings[0], RecordingEcho(ran, token_delay_s=0.02)),
            running(settings[1], RecordingEcho(ran, token_delay_s=0.02)),
        ):
            load = Load(clients[0], interval_s=0.1, tokens=30)
            producing = asyncio.create_task(load.run())
            figures = await chaos(nats_cluster, js, load)
            t_stop = load.now()
            await load.stop()
            await producing
            figures["drain after the last restart (s)"] = load.now() - t_stop
            consumer = await drained(js)
            count, leader, followers = await replicas_of(js, JOBS_STREAM)
    finally:
        await nc.close()
    lost = summarize(load, ran, figures)

    # The broker's side, which the cluster itself must guarantee: every job JetStream confirmed
    # was delivered to a worker, none is left in the queue, and JOBS is R3 again.
    assert load.accepted(), "no job was accepted at all"
    assert [o.job.id for o in load.accepted() if o.job.id not in ran] == []
    assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)
    assert count == 3
    assert leader is not None
    assert len(followers) == 2
    # The client's side: every accepted job's stream ends with done and the whole text.
    assert [(o.job.id, o.problem) for o in lost] == []
