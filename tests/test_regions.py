"""Regions: NATS clusters joined by gateways into one super-cluster (one JetStream domain),
each with its own job queue, result replay and worker registry placed in its own cluster.

Real nats-server processes: single-node regions (three servers), gateways authenticated,
the users and permissions ``headrace up --regions`` generates; echo workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from headrace.cli import build_parser
from headrace.credentials import Credentials, gateway_password
from headrace.netproxy import DelayProxy
from headrace.servers import GatewayError, LeafNode, SuperCluster, free_port
from schemas import failover
from schemas.client import JobClient
from schemas.events import Done, Started
from schemas.subjects import (
    JOBS_STREAM,
    epoch_of,
    jobs_stream,
    results_stream,
    worker_key,
    workers_bucket,
)
from schemas.topology import UnknownRegion, ensure_present
from tests.conftest import (
    API_KEY,
    NATIVE_CLIENTS,
    TEST_LIMITS,
    TEST_LOGIN,
    TEST_USER,
    _test_user_hash,
    collect,
    start_up,
    text_job,
)
from workers.engines.echo import EchoEngine
from workers.runtime import Runtime
from workers.settings import WorkerSettings

REGIONS = ("a", "b", "c")


class Regions:
    """A running super-cluster with the deployment's users, and logins for the tests."""

    def __init__(self, sc: SuperCluster, creds: Credentials) -> None:
        self.sc = sc
        self.creds = creds

    def url(self, region: str) -> str:
        return self.sc.url(region)

    def login(self, user: str) -> dict[str, Any]:
        return self.creds.login(user)

    async def connect(self, region: str) -> NATS:
        """The test superuser, connected to one region's servers only."""
        return await nats.connect(
            self.sc.cluster(region).urls,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            **TEST_LOGIN,
        )

    def worker_settings(self, region: str, worker_id: str, **kw: Any) -> WorkerSettings:
        return WorkerSettings(
            nats_url=self.url(region),
            **self.login("worker"),
            region=region,
            regions=",".join(self.sc.regions),
            worker_id=worker_id,
            heartbeat_s=0.3,
            fetch_timeout_s=0.5,
            in_progress_s=0.5,
            shutdown_grace_s=5.0,
            retry_delay_s=0.1,
            **kw,
        )


def users_conf(creds: Credentials) -> str:
    return creds.authorization([{"user": TEST_USER, "password": _test_user_hash()}])


def make_super_cluster(
    tmp_path: Path, regions: tuple[str, ...] = REGIONS, **kw: Any
) -> tuple[SuperCluster, Credentials]:
    creds = Credentials.ensure(tmp_path / "auth", NATIVE_CLIENTS, cost=4, regions=regions)
    sc = SuperCluster(
        tmp_path / "sc",
        regions,
        gateway_password=gateway_password(creds.directory),
        log_dir=tmp_path / "logs",
        extra_conf=users_conf(creds),
        **kw,
    )
    return sc, creds


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[Regions]:
    sc, creds = make_super_cluster(tmp_path, leafnodes=True)
    sc.start()
    yield Regions(sc, creds)
    sc.stop()


@pytest.fixture
async def provisioned(regions: Regions) -> Regions:
    """Every region's streams, registry and echo consumer, made from region a as
    ``headrace provision --regions a,b,c`` makes them (as the admin user)."""
    from headrace import provision as provisioning
    from headrace.settings import ProvisionSettings

    settings = ProvisionSettings(
        nats_url=regions.url("a"),
        **regions.login("admin"),
        regions=",".join(REGIONS),
        **TEST_LIMITS.model_dump(exclude_none=True),
    )
    changes = await provisioning.run(settings, [("llm", "echo")])
    assert changes[f"stream {jobs_stream('c')}"] == "created"
    return regions


@contextlib.asynccontextmanager
async def worker(
    regions: Regions, region: str, worker_id: str, token_delay_s: float = 0.0, **kw: Any
) -> AsyncIterator[Runtime]:
    """An echo worker of ``region``, registered in that region's registry."""
    engine = EchoEngine(token_delay_s=token_delay_s)
    runtime = Runtime(regions.worker_settings(region, worker_id, **kw), engine)
    task = asyncio.create_task(runtime.run())
    nc = await regions.connect(region)
    try:
        await wait_registered(nc, region, worker_id)
        yield runtime
    finally:
        await nc.close()
        runtime.stop()
        await asyncio.wait_for(task, 20)


async def wait_registered(nc: NATS, region: str, worker_id: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            kv = await nc.jetstream().key_value(workers_bucket(region))
            if (await kv.get(worker_key(worker_id))).value:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"worker {worker_id} did not register in {region}")


def test_region_names_are_checked() -> None:
    with pytest.raises(ValidationError, match="not one of the regions"):
        WorkerSettings(region="x", regions="a,b,c")
    with pytest.raises(ValidationError, match="cannot name a region"):
        WorkerSettings(region="A", regions="A,b")
    with pytest.raises(ValidationError, match="repeat"):
        WorkerSettings(region="a", regions="a,a")
    assert WorkerSettings(region="b", regions="a, b").scope == "b"
    assert WorkerSettings(region="b", regions="a,b").home == "a"
    assert WorkerSettings(region="local").scope is None  # one region: the classic names


async def test_each_region_holds_its_own_queue(provisioned: Regions) -> None:
    nc = await provisioned.connect("b")
    try:
        js = nc.jetstream(timeout=5)
        for region in REGIONS:
            for stream in (
                jobs_stream(region),
                results_stream(region),
                f"KV_{workers_bucket(region)}",
            ):
                info = await js.stream_info(stream)
                assert info.cluster is not None, stream
                assert info.cluster.name == region, stream
                assert info.cluster.leader == f"{region}-1", stream
        assert (await js.consumer_info(jobs_stream("c"), "llm-echo")).config.filter_subject == (
            "jobs.llm.echo.c"
        )
        # The shared buckets live in the home region (the first).
        assert (await js.stream_info("KV_options")).cluster.name == "a"  # type: ignore[union-attr]
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(JOBS_STREAM)  # no region-less queue in a super-cluster
    finally:
        await nc.close()


async def test_a_region_that_is_no_cluster_is_an_error(provisioned: Regions) -> None:
    nc = await provisioned.connect("a")
    try:
        with pytest.raises(UnknownRegion, match="region 'x' is not a cluster"):
            await ensure_present(nc.jetstream(timeout=5), region="x", home="a", timeout_s=5)
    finally:
        await nc.close()


async def test_a_worker_of_an_unknown_region_fails_at_start(provisioned: Regions) -> None:
    # A deployment whose HEADRACE_REGIONS names a region no cluster answers to (logged in as
    # the test superuser: the generated worker user may not even look at JOBS_x).
    settings = WorkerSettings(
        nats_url=provisioned.url("a"),
        nats_user=TEST_USER,
        nats_password=TEST_LOGIN["password"],
        region="x",
        regions="a,b,c,x",
        worker_id="w-x",
    )
    runtime = Runtime(settings, EchoEngine())
    with pytest.raises(UnknownRegion, match="region 'x'"):
        await asyncio.wait_for(runtime.run(), 20)


def test_a_gateway_that_cannot_connect_is_an_error_at_start(tmp_path: Path) -> None:
    # Region c's gateway address is wrong everywhere (a firewall, a typo): it and the others
    # cannot reach each other. The super-cluster does not form, and says so at start.
    dead = f"127.0.0.1:{free_port()}"
    cut = {(x, y): dead for x, y in (("a", "c"), ("b", "c"), ("c", "a"), ("c", "b"))}
    sc, _ = make_super_cluster(tmp_path, gateway_urls=cut)
    try:
        with pytest.raises(GatewayError, match=r"region a .* no gateway to c"):
            sc.start(timeout_s=4)
    finally:
        sc.stop()


def test_a_wrong_gateway_password_is_an_error_at_start(tmp_path: Path) -> None:
    sc, creds = make_super_cluster(tmp_path, ("a", "b"))
    # Region b was configured with another deployment's gateway password.
    b = sc.cluster("b").nodes[0]
    assert b.extra_conf is not None
    password = gateway_password(creds.directory)
    b.extra_conf = b.extra_conf.replace(password, "not-the-password")
    try:
        with pytest.raises(GatewayError, match=r"(?i)authorization"):
            sc.start(timeout_s=4)
    finally:
        sc.stop()


async def test_a_job_placed_in_another_region_replies_to_the_submitter(
    provisioned: Regions,
) -> None:
    # Submitted from a (results.a.<id>, captured by RESULTS_a), served in b.
    async with worker(provisioned, "b", "w-b"):
        nc = await provisioned.connect("a")
        try:
            client = JobClient(nc, region="a")
            job = text_job(max_tokens=5)
            async with await client.submit(job, place="b") as stream:
                events = await collect(stream)
            started = events[0].event
            assert isinstance(started, Started)
            assert started.region == "b"
            assert isinstance(events[-1].event, Done)
            history = await client.history(job.id)
            assert [r.pos for r in history] == [r.pos for r in events]
            # RESULTS_a holds its events and its fence, which b's worker raised in the
            # submitter's region as it finished (a redelivery would not run again).
            # The fence lands after the done event is stored: wait for it a little.
            js = nc.jetstream()
            deadline = time.monotonic() + 5
            while True:
                stored = (await js.stream_info(results_stream("a"))).state.messages
                if stored == len(events) + 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert stored == len(events) + 1
            reply = client.reply_subject(job.id)
            assert await failover.read_fence(js, reply, results_stream("a")) == 1
        finally:
            await nc.close()


@contextlib.asynccontextmanager
async def edge_in(regions: Regions, region: str, **kw: Any) -> AsyncIterator[str]:
    """An edge of ``region`` in this event loop on a free port; yields its base URL."""
    from prometheus_client import CollectorRegistry

    from edge.app import start
    from edge.settings import EdgeSettings

    settings = EdgeSettings(
        nats_url=regions.url(region),
        **regions.login("edge"),
        region=region,
        regions=",".join(regions.sc.regions),
        port=free_port(),
        api_keys=API_KEY,
        first_event_wait_s=0.5,
        keepalive_s=0.2,
        no_worker_wait_s=2.0,
        worker_stale_s=2.0,
        region_poll_s=0.25,
        region_lost_s=1.0,
        **kw,
    )
    registry = CollectorRegistry()
    runner = await start(settings, registry)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        await runner.cleanup()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def chat(base: str, *, stream: bool = False, max_tokens: int = 8) -> tuple[str, str]:
    """One chat completion through the OpenAI SDK: (the x-headrace-region header, the text)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0) as oai:
        messages: Any = [{"role": "user", "content": "the quick brown fox jumps over the dog"}]
        if not stream:
            raw = await oai.chat.completions.with_raw_response.create(
                model="echo", messages=messages, max_tokens=max_tokens, seed=7
            )
            return raw.headers["x-headrace-region"], raw.parse().choices[0].message.content or ""
        async with oai.chat.completions.with_streaming_response.create(
            model="echo", messages=messages, max_tokens=max_tokens, seed=7, stream=True
        ) as response:
            text = ""
            async for chunk in await response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            return response.headers["x-headrace-region"], text


async def wait_live(base: str, region: str, n: int, timeout_s: float = 10) -> None:
    """Until the edge's fleet counts ``n`` live workers of ``region`` (/health/ready)."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(
                f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
            ) as r:
                await r.read()
            async with http.get(f"{base}/health/ready") as r:
                body = await r.json()
            if body["workers"] >= n:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"the edge did not see {n} worker(s)")


async def scrape(base: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
        return await r.text()


async def test_a_job_spills_to_the_region_with_a_worker_and_comes_home(
    provisioned: Regions,
) -> None:
    async with edge_in(provisioned, "a") as base, worker(provisioned, "b", "w-b"):
        await wait_live(base, "b", 1)
        # Region a has no worker of echo: its jobs are served in b, and say so.
        region, text = await chat(base)
        assert region == "b"
        assert text
        region, streamed = await chat(base, stream=True)
        assert region == "b"
        assert streamed == text  # the same seed: the same answer, wherever it ran
        metrics = await scrape(base)
        assert metric(metrics, "headrace_edge_region_spills_total", source="a", target="b") == 2
        assert metric(metrics, "headrace_edge_region_jobs_served_total", region="b") == 2
        # Once a's own worker is live, a serves its own jobs again.
        async with worker(provisioned, "a", "w-a"):
            await wait_live(base, "a", 2)
            for _ in range(3):
                region, again = await chat(base, stream=True)
                assert region == "a"
                assert again == text
        metrics = await scrape(base)
        assert metric(metrics, "headrace_edge_region_jobs_placed_total", region="a") == 3
        assert metric(metrics, "headrace_edge_region_jobs_served_total", region="a") == 3
        assert metric(metrics, "headrace_edge_region_spills_total", source="a", target="b") == 2


async def test_a_lost_region_loses_no_accepted_job_and_rejoins(provisioned: Regions) -> None:
    # Three regions with echo workers (b has the most slots, so busy a and c spill there),
    # edges in a and c; b's server is SIGKILLed while streamed requests are in flight.
    slow = {"token_delay_s": 0.05}
    async with (
        worker(provisioned, "a", "w-a", slots=2, **slow),
        worker(provisioned, "b", "w-b", slots=4, **slow),
        worker(provisioned, "c", "w-c", slots=2, **slow),
        edge_in(provisioned, "a") as edge_a,
        edge_in(provisioned, "c") as edge_c,
    ):
        for base in (edge_a, edge_c):
            await wait_live(base, "a", 3)
        _, reference = await chat(edge_a, max_tokens=30)
        assert reference
        requests = [
            asyncio.create_task(chat(base, stream=True, max_tokens=30))
            for base in (edge_a, edge_c)
            for _ in range(5)
        ]
        # Kill b once it holds some of them (accepted, a worker of b running them).
        nb = await provisioned.connect("b")
        try:
            deadline = time.monotonic() + 15
            info = await nb.jetstream().consumer_info(jobs_stream("b"), "llm-echo")
            while (info.num_ack_pending or 0) < 2:
                assert time.monotonic() < deadline, "b never held two of the jobs"
                await asyncio.sleep(0.05)
                info = await nb.jetstream().consumer_info(jobs_stream("b"), "llm-echo")
        finally:
            await nb.close()
        provisioned.sc.kill_region("b")
        killed = time.monotonic()
        async with asyncio.timeout(30):  # none waits for its deadline (600 s)
            answers = await asyncio.gather(*requests)
        took = time.monotonic() - killed
        # Every accepted job finished with its whole answer: none lost, none cut short.
        assert [text for _, text in answers] == [reference] * len(requests)
        assert took < 25, took  # on 2 shared cores; the deadline is 600 s
        texts = [await scrape(base) for base in (edge_a, edge_c)]
        replaced = sum(
            metric(t, "headrace_edge_region_jobs_replaced_total", source="b") for t in texts
        )
        assert replaced >= 2, answers  # b held them when it died: placed again elsewhere
        # New work goes to the regions that are left.
        for base in (edge_a, edge_c):
            region, text = await chat(base, stream=True, max_tokens=30)
            assert region in {"a", "c"}
            assert text == reference
        # b comes back on its store and ports, rejoins the super-cluster, and serves again:
        # its worker reconnects and registers by itself.
        provisioned.sc.restart_region("b")
        nc = await provisioned.connect("a")
        try:
            await wait_registered(nc, "b", "w-b")
            client = JobClient(nc, region="a")
            async with await client.submit(text_job(max_tokens=5), place="b") as stream:
                events = await collect(stream)
            assert isinstance(events[0].event, Started)
            assert events[0].event.region == "b"
            assert isinstance(events[-1].event, Done)
            # The copies of the jobs placed again elsewhere were deleted from b's queue.
            deadline = time.monotonic() + 10
            while (await nc.jetstream().stream_info(jobs_stream("b"))).state.messages:
                assert time.monotonic() < deadline, "stale copies stayed in b's queue"
                await asyncio.sleep(0.2)
        finally:
            await nc.close()


async def test_a_region_killed_mid_stream_goes_on_in_another_with_nothing_repeated(
    provisioned: Regions,
) -> None:
    # a's edge has no worker at home: its job spills to b (the most slots), whose servers
    # are SIGKILLed mid-stream. The job is handed over to c as a continuation of what the
    # client already has: the streamed text is the uninterrupted run's, character for
    # character, and c's worker went on from the delivered tokens rather than starting over.
    import openai

    slow = {"token_delay_s": 0.05}
    async with (
        worker(provisioned, "b", "w-b", slots=4, **slow),
        worker(provisioned, "c", "w-c", slots=1, **slow),
        edge_in(provisioned, "a") as base,
    ):
        await wait_live(base, "b", 2)
        region, reference = await chat(base, stream=True, max_tokens=40)
        assert region == "b"
        messages: Any = [{"role": "user", "content": "the quick brown fox jumps over the dog"}]
        async with (
            openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0) as oai,
            oai.chat.completions.with_streaming_response.create(
                model="echo", messages=messages, max_tokens=40, seed=7, stream=True
            ) as response,
        ):
            assert response.headers["x-headrace-region"] == "b"
            job_id = response.headers["x-headrace-job-ids"]
            text, parts = "", 0
            async with asyncio.timeout(30):
                async for chunk in await response.parse():
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                        parts += 1
                        if parts == 10:
                            provisioned.sc.kill_region("b")
        assert parts > 10
        assert text == reference  # nothing repeated, nothing missing
        metrics = await scrape(base)
        assert metric(metrics, "headrace_edge_region_jobs_replaced_total", source="b") == 1
        # b comes back: its copy of the job (held by its worker when it died) never runs
        # again (deleted from its queue, and its fence would terminate it).
        provisioned.sc.restart_region("b")
        nc = await provisioned.connect("a")
        try:
            await wait_registered(nc, "b", "w-b")
            deadline = time.monotonic() + 10
            while (await nc.jetstream().stream_info(jobs_stream("b"))).state.messages:
                assert time.monotonic() < deadline, "the old copy stayed in b's queue"
                await asyncio.sleep(0.2)
            history = await JobClient(nc, region="a").history(job_id)
        finally:
            await nc.close()
    # By position, once each: b's worker stored its events again when it reconnected.
    stored = {r.pos: r for r in history}
    started = [stored[p] for p in sorted(stored) if isinstance(stored[p].event, Started)]
    # c runs epoch 1, or a later one when the first try went to b before b counted as lost
    # (its publish fails there, and the next try takes the next epoch): never b again.
    assert [s.event.region for s in started] == ["b", "c"]
    assert epoch_of(started[0].pos.attempt) == 0 < epoch_of(started[1].pos.attempt)
    assert started[-1].event.resumed_tokens >= 10  # went on from what was delivered
    done = [stored[p].event for p in sorted(stored) if p.attempt == started[-1].pos.attempt][-1]
    assert isinstance(done, Done)
    assert done.usage.completion_tokens == 40


def leaf_of(
    regions: Regions,
    region: str,
    tmp_path: Path,
    password: str | None = None,
    via: str | None = None,
) -> LeafNode:
    """A leaf node site of ``region``: a nats-server dialling out as ``worker``."""
    return LeafNode(
        tmp_path / "leaf",
        via or regions.sc.leaf_url(region),
        "worker",
        password or regions.creds.password("worker").get_secret_value(),
        users_conf=users_conf(regions.creds),
        log_path=tmp_path / "leaf.log",
    )


def test_a_leaf_with_wrong_credentials_is_an_error_at_start(
    regions: Regions, tmp_path: Path
) -> None:
    leaf = leaf_of(regions, "a", tmp_path, password="not-the-password")
    with pytest.raises(GatewayError, match=r"(?i)did not connect.*authorization"):
        leaf.start(timeout_s=4)


async def test_a_leaf_node_worker_serves_and_a_cut_link_is_a_dead_worker(
    provisioned: Regions, tmp_path: Path
) -> None:
    # A GPU box behind NAT: its own nats-server joins region a as a leaf (outbound only,
    # through a proxy here so the test can pull the cable), and its worker talks to it.
    a = provisioned.sc.cluster("a").nodes[0]
    cable = DelayProxy(provisioned.sc.leaf_url("a").split("://")[1]).start()
    leaf = leaf_of(provisioned, "a", tmp_path, via=f"nats-leaf://{cable.address}")
    leaf.start()
    try:
        site = provisioned.worker_settings("a", "w-leaf").model_copy(update={"nats_url": leaf.url})
        runtime = Runtime(site, EchoEngine(token_delay_s=0.1))
        task = asyncio.create_task(runtime.run())
        nc = await provisioned.connect("a")
        try:
            await wait_registered(nc, "a", "w-leaf")
            client = JobClient(nc, region="a")
            async with await client.submit(text_job(max_tokens=3)) as stream:
                events = await collect(stream)
            assert events[0].event.worker == "w-leaf"
            assert isinstance(events[-1].event, Done)
            # Mid-job, the leaf's link is cut: a dead worker, whose job its follower hands
            # over to a worker of the region, going on from what was delivered.
            job = text_job(max_tokens=200)  # 20 s on the leaf
            async with await client.submit(job) as stream:
                first = await stream.next(timeout_s=10)
                assert first is not None
                assert first.event.worker == "w-leaf"
                async with worker(provisioned, "a", "w-hub"):
                    cable.cut()
                    rest = await collect(stream, timeout_s=30)
            final = [r for r in rest if isinstance(r.event, Started)][-1]
            assert final.event.worker == "w-hub"
            assert epoch_of(final.pos.attempt) == 1  # a continuation, not a restart
            assert final.event.resumed_after is not None
            assert isinstance(rest[-1].event, Done)
            assert rest[-1].event.usage.completion_tokens == 200
        finally:
            await nc.close()
            runtime.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task, 30)
    finally:
        leaf.stop()
        cable.stop()
    assert a.proc is not None


@pytest.mark.timeout(180)
def test_up_regions_runs_a_super_cluster_with_an_edge_per_region(tmp_path: Path) -> None:
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    while free_port() == port + 1:  # the second region's edge takes the next port
        pass
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "headrace", "up", "--regions", "2", "--data-dir", str(data)]
    argv += ["--port", str(port), "--valkey-port", str(free_port())]
    argv += ["--llm-workers", "0", "--sd-workers", "0", "--nats-port", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")}
    env.update(HEADRACE_LLM_THREADS="1", HEADRACE_NATS_HTTP_PORT="0")
    proc, output = start_up(argv, env, 120)
    try:
        assert "super-cluster formed" in output, output
        key = (data / "dev-api-key").read_text().strip()
        for n, region in enumerate(("r1", "r2")):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port + n}/v1/chat/completions",
                data=b'{"model": "echo", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}',
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                assert r.headers["x-headrace-region"] == region  # each region serves its own
        command = re.search(r"NATS: (headrace status .*)$", output, re.M)
        assert command is not None, output
        status = subprocess.run(
            [sys.executable, "-m", *command.group(1).split()],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert re.search(r"^r1 +up +1 ", status.stdout, re.M), status.stdout + status.stderr
        assert re.search(r"^r2 +up +1 ", status.stdout, re.M), status.stdout
        assert re.search(r"^r2 +r2-echo-1 ", status.stdout, re.M), status.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "headrace is down" in rest


def test_the_region_and_leaf_compose_configs_are_valid_for_nats_server(tmp_path: Path) -> None:
    # compose.region.yaml's node config and compose.leaf.yaml's site config, checked by
    # nats-server itself (-t) with the files `headrace auth` generates next to them.
    import subprocess

    import yaml

    from headrace.cli import main
    from headrace.servers import nats_server_binary
    from schemas.topology import NATS_DIR

    auth = tmp_path / "nats-auth"
    argv = ["auth", str(auth), "--regions", "eu,us"]
    argv += ["--gateway", "eu=eu.example.net:7222", "--gateway", "us=us.example.net:7222"]
    assert main([*argv, "--leaf-hub", "eu.example.net:7422"]) == 0
    assert (auth / "gateways.conf").stat().st_mode & 0o077 == 0
    region = tmp_path / "region"
    region.mkdir()
    for name in ("nats-users.conf", "gateways.conf"):
        (region / name).write_text((auth / name).read_text())
    (region / "node.conf").write_text((NATS_DIR / "region" / "node.conf").read_text())
    leaf = tmp_path / "leaf"
    leaf.mkdir()
    for name in ("nats-users.conf", "leaf-remote.conf"):
        (leaf / name).write_text((auth / name).read_text())
    for name in ("site.conf", "leaf.conf"):
        (leaf / name).write_text((NATS_DIR / "leaf" / name).read_text())
    env = {"REGION": "eu", "SYSTEM_PASSWORD": "x" * 24, "PATH": "/usr/bin:/bin"}
    for conf in (region / "node.conf", leaf / "site.conf"):
        out = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert out.returncode == 0, out.stderr
    # A gateway for a region --regions does not name is refused.
    assert main(["auth", str(auth), "--regions", "eu", "--gateway", "xx=h:1"]) == 2
    root = Path(__file__).resolve().parents[1]
    for file in ("compose.region.yaml", "compose.leaf.yaml"):
        services = yaml.safe_load((root / file).read_text())["services"]
        for name, service in services.items():
            if "build" in service or service.get("image") == "headrace:local":
                args = build_parser().parse_args(service["command"])
                assert callable(args.func), (file, name)
                assert service["env_file"].startswith("nats-auth/"), (file, name)
