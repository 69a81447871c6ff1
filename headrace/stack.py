"""``headrace up``: the whole local stack as child processes, with no Docker.

nats-server and valkey come from their wheels; workers (and the edge) are
``headrace`` subprocesses. Ctrl-C or SIGTERM stops them all, in order, and a
child whose parent dies gets SIGTERM from the kernel, so nothing is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import nats.js.errors

from headrace import provision
from headrace.credentials import Credentials, gateway_password
from headrace.servers import (
    ChildServer,
    NatsCluster,
    NatsServer,
    SuperCluster,
    ValkeyServer,
    child_setup,
    terminate,
    wait_for_port,
)
from headrace.settings import StackSettings
from schemas.connection import connect
from schemas.permissions import ADMIN, ALL_MODELS, EDGE, OBSERVER, WORKER
from schemas.subjects import WORKERS_BUCKET, worker_key, workers_bucket

# The NATS-native client user `headrace up` makes, allowed every model (README, Operations).
NATIVE_CLIENT = "native"


def say(text: str) -> None:
    """Progress for the person who ran ``headrace up``."""
    print(text, flush=True)


@dataclass
class Child:
    """A headrace subprocess (worker or edge) of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it with stdout and stderr going to its log file."""
        with self.log_path.open("ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=out, preexec_fn=child_setup
            )

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        return None if self.proc is None else terminate(self.proc, timeout_s)


class Stack:
    """Starts and stops the local stack."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.servers: list[ChildServer] = []
        self.children: list[Child] = []
        self.cluster: NatsCluster | None = None
        self.super_cluster: SuperCluster | None = None
        self._gone: set[ChildServer] = set()  # cluster nodes that exited, reported once
        self._stop = False

    def _server(self, server: ChildServer) -> ChildServer:
        t0 = time.perf_counter()
        say(f"  starting {server.name} on 127.0.0.1:{server.port} ...")
        server.start()
        say(f"  {server.name} ready in {(time.perf_counter() - t0) * 1000:.0f} ms")
        self.servers.append(server)
        return server

    def _child_env(self, nats_url: str, redis_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HEADRACE_NATS_URL=nats_url,
            HEADRACE_REDIS_URL=redis_url,
            HEADRACE_REGION=self.settings.region,
            PYTHONUNBUFFERED="1",
        )
        replicas = self.settings.stream_replicas()
        if replicas is not None:  # for a process that re-creates topology it finds missing
            env["HEADRACE_REPLICAS"] = str(replicas)
        return env

    def _nats(self, authorization: str) -> str:
        """Start one nats-server, or a cluster of ``nats_nodes``, with the generated users;
        returns the client URL(s)."""
        s = self.settings
        if s.nats_nodes == 1:
            nats = NatsServer(
                self.data_dir / "nats",
                s.nats_port,
                s.nats_http_port or None,
                log_path=self.logs / "nats.log",
                extra_conf=authorization,
            )
            self._server(nats)
            return nats.url
        # Its own store: a standalone server's JetStream state does not carry into a cluster.
        # Monitoring is always on (free loopback ports when nats_http_port is 0): /healthz says
        # when the cluster has formed.
        cluster = NatsCluster(
            self.data_dir / "nats-cluster",
            s.nats_nodes,
            port=s.nats_port,
            cluster_port=s.nats_cluster_port,
            http_port=s.nats_http_port,
            log_dir=self.logs,
            extra_conf=authorization,
        )
        self.cluster = cluster
        for node in cluster.nodes:
            self._server(node)
        t0 = time.perf_counter()
        cluster.wait_healthy(timeout_s=60)
        say(
            f"  cluster {cluster.cluster_name} of {s.nats_nodes} formed in "
            f"{(time.perf_counter() - t0) * 1000:.0f} ms; streams at R{s.stream_replicas()}"
        )
        return cluster.url

    def start(self) -> None:
        """Start servers, provision, then the headrace processes."""
        s = self.settings
        self.logs.mkdir(parents=True, exist_ok=True)
        say(f"headrace up: data in {self.data_dir}, logs in {self.logs}")
        if regions := s.region_list():
            self._start_regions(regions)
            return
        creds = Credentials.ensure(self.data_dir / "auth", {NATIVE_CLIENT: [ALL_MODELS]})
        say(f"  NATS users and passwords in {creds.directory} (made once, kept)")
        nats_url = self._nats(creds.authorization())
        valkey = ValkeyServer(
            self.data_dir / "valkey", s.valkey_port, log_path=self.logs / "valkey.log"
        )
        self._server(valkey)
        say("  provisioning streams, buckets and consumers ...")
        settings = s.model_copy(
            update={"nats_url": nats_url, "replicas": s.stream_replicas(), **creds.login(ADMIN)}
        )
        changes = asyncio.run(provision.run(settings, [("llm", "echo")]))
        say("  " + ", ".join(f"{k}: {v}" for k, v in changes.items()))
        env = self._child_env(nats_url, valkey.url)
        env.setdefault("HEADRACE_SD_DEMO_DIR", str(self.data_dir / "tiny-sd"))
        worker_env = dict(env, **creds.env(WORKER))
        counts = (
            ("echo", s.echo_workers),
            ("llm", self._optional("llm", s.llm_workers, "llama_cpp")),
            ("sd", self._optional("sd", s.sd_workers, "diffusers")),
        )
        worker_ids = self._spawn_workers(counts, worker_env, s.region, "")
        say("  waiting for workers to load their models and register ...")
        observer = s.model_copy(update={"nats_url": nats_url, **creds.login(OBSERVER)})
        asyncio.run(self._wait_ready(observer, worker_ids))
        key = s.api_keys.split(",")[0].strip() or self._dev_key()
        edge_env = dict(env, HEADRACE_PORT=str(s.port), HEADRACE_API_KEYS=s.api_keys or key)
        edge_env.update(creds.env(EDGE))
        model = "echo"
        if any(w.startswith(f"{s.region}-llm-") for w in worker_ids):
            from workers.engines.gguf import DEFAULT_MODEL_ID

            model = DEFAULT_MODEL_ID  # what clients that name no model (LLMUnity) get
            edge_env.setdefault("HEADRACE_DEFAULT_MODEL", model)
        self._spawn("edge", ["edge"], edge_env)
        wait_for_port(s.port, 30)
        base = f"http://127.0.0.1:{s.port}"
        say(f"\nheadrace is up: {base}   (NATS {nats_url}, Valkey {valkey.url})")
        say(f"API key: {key}")
        say(
            f"NATS: headrace status --nats-creds {creds.directory / f'{OBSERVER}.env'}; a "
            f"NATS-native client logs in as in {creds.directory / f'{NATIVE_CLIENT}.env'}"
        )
        say(
            f"Try:  curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            f"""-d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "hello"}}]}}'"""
        )
        if any(w.startswith(f"{s.region}-sd-") for w in worker_ids):
            say(
                f"Image: curl {base}/sdapi/v1/txt2img -H 'Authorization: Bearer {key}' "
                """-d '{"prompt": "a lighthouse", "steps": 4, "width": 64, "height": 64}'"""
                "   (tiny-sd has random weights: its images are noise)"
            )
        say("Press Ctrl-C to stop.")

    def _start_regions(self, regions: tuple[str, ...]) -> None:
        """A super-cluster: one cluster per region joined by gateways, its streams provisioned
        per region, echo workers and an edge in every region (llama.cpp and diffusers
        workers in the first, the home region, to spare the CPU)."""
        s = self.settings
        names = ",".join(regions)
        creds = Credentials.ensure(
            self.data_dir / "auth", {NATIVE_CLIENT: [ALL_MODELS]}, regions=regions
        )
        say(f"  NATS users and passwords in {creds.directory} (made once, kept)")
        sc = SuperCluster(
            self.data_dir / "nats-regions",
            regions,
            s.nats_nodes,
            gateway_password=gateway_password(creds.directory),
            log_dir=self.logs,
            extra_conf=creds.authorization(),
            leafnodes=True,
        )
        self.super_cluster = sc
        t0 = time.perf_counter()
        say(f"  starting {len(regions)} regions ({names}) of {s.nats_nodes} node(s) each ...")
        try:
            sc.start(timeout_s=60)
        finally:
            self.servers.extend(sc.nodes)
        say(f"  super-cluster formed in {(time.perf_counter() - t0) * 1000:.0f} ms")
        valkey = ValkeyServer(
            self.data_dir / "valkey", s.valkey_port, log_path=self.logs / "valkey.log"
        )
        self._server(valkey)
        replicas = min(3, s.nats_nodes) if s.replicas is None and s.nats_nodes > 1 else s.replicas
        for region in regions:
            settings = s.model_copy(
                update={"nats_url": sc.url(region), "replicas": replicas, **creds.login(ADMIN)}
            )
            changes = asyncio.run(
                provision.run(settings, [("llm", "echo")], region=region, home=regions[0])
            )
            say(f"  provisioned {region}: " + ", ".join(f"{k}: {v}" for k, v in changes.items()))
        key = s.api_keys.split(",")[0].strip() or self._dev_key()
        worker_ids: dict[str, list[str]] = {}
        for n, region in enumerate(regions):
            env = self._child_env(sc.url(region), valkey.url)
            env.update(HEADRACE_REGION=region, HEADRACE_REGIONS=names)
            if replicas is not None:
                env["HEADRACE_REPLICAS"] = str(replicas)
            env.setdefault("HEADRACE_SD_DEMO_DIR", str(self.data_dir / "tiny-sd"))
            worker_env = dict(env, **creds.env(WORKER))
            counts = [("echo", s.echo_workers)]
            if n == 0:
                counts += [
                    ("llm", self._optional("llm", s.llm_workers, "llama_cpp")),
                    ("sd", self._optional("sd", s.sd_workers, "diffusers")),
                ]
            if ids := self._spawn_workers(counts, worker_env, region, f"{region}-"):
                worker_ids[region] = ids
            edge_env = dict(env, HEADRACE_PORT=str(s.port + n), HEADRACE_API_KEYS=s.api_keys or key)
            edge_env.update(creds.env(EDGE))
            self._spawn(f"edge-{region}", ["edge"], edge_env)
        say("  waiting for workers to load their models and register ...")
        for region, ids in worker_ids.items():
            observer = s.model_copy(update={"nats_url": sc.url(region), **creds.login(OBSERVER)})
            asyncio.run(self._wait_ready(observer, ids, bucket=workers_bucket(region)))
        for n, _ in enumerate(regions):
            wait_for_port(s.port + n, 30)
        say(f"\nheadrace is up: {len(regions)} regions in one super-cluster (Valkey {valkey.url})")
        for n, region in enumerate(regions):
            say(f"  region {region}: edge http://127.0.0.1:{s.port + n}   NATS {sc.url(region)}   "
                f"leaf nodes dial {sc.leaf_url(region)}")  # fmt: skip
        say(f"API key: {key}")
        say(
            f"NATS: headrace status --regions {names} --nats-url {sc.url(regions[0])} "
            f"--nats-creds {creds.directory / f'{OBSERVER}.env'} --edges "
            + ",".join(f"http://127.0.0.1:{s.port + n}" for n in range(len(regions)))
        )
        say(
            f"Try:  curl -si http://127.0.0.1:{s.port}/v1/chat/completions -H 'Authorization: "
            f"Bearer {key}' -H 'Content-Type: application/json' "
            """-d '{"model": "echo", "messages": [{"role": "user", "content": "hello"}]}'"""
            "   (x-headrace-region: the region that served it)"
        )
        say("Press Ctrl-C to stop.")

    def _optional(self, extra: str, count: int, module: str) -> int:
        """Workers of an optional engine to start: none when its extra is not installed."""
        if count and importlib.util.find_spec(module) is None:
            say(f"  {module} is not installed (make install-{extra}): starting no {extra} worker")
            return 0
        return count

    def _dev_key(self) -> str:
        """A development key, generated once per data directory (the edge never runs open)."""
        path = self.data_dir / "dev-api-key"
        if path.exists():
            return path.read_text().strip()
        key = f"hr-dev-{secrets.token_urlsafe(24)}"
        path.touch(mode=0o600)
        path.write_text(key + "\n")
        say(f"  generated a development API key in {path}")
        return key

    def _spawn_workers(
        self, counts: Sequence[tuple[str, int]], env: dict[str, str], region: str, tag: str
    ) -> list[str]:
        """Start ``count`` workers of each engine (children ``worker-<tag><engine>-<i>``);
        their registry ids, ``<region>-<engine>-<i>``."""
        ids = []
        for engine, count in counts:
            for i in range(1, count + 1):
                worker_id = f"{region}-{engine}-{i}"
                self._spawn(
                    f"worker-{tag}{engine}-{i}", ["worker", engine, "--worker-id", worker_id], env
                )
                ids.append(worker_id)
        return ids

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        child = Child(
            name, [sys.executable, "-m", "headrace", *args], env, self.logs / f"{name}.log"
        )
        child.start()
        self.children.append(child)
        say(f"  started {name} (pid {child.proc.pid if child.proc else '?'}), log {child.log_path}")

    async def _wait_ready(
        self,
        settings: StackSettings,
        worker_ids: list[str],
        timeout_s: float = 600,
        bucket: str = WORKERS_BUCKET,
    ) -> None:
        """Until every worker has registered (workers register only once their models are loaded)."""
        nc = await connect(settings, "headrace-up")
        try:
            kv = await nc.jetstream().key_value(bucket)
            waiting, t0 = set(worker_ids), time.monotonic()
            while waiting:
                for worker_id in sorted(waiting):
                    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                        if (await kv.get(worker_key(worker_id))).value:
                            waiting.discard(worker_id)
                            say(f"  {worker_id} ready ({time.monotonic() - t0:.1f} s)")
                self._check_children()
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(
                        f"workers not ready after {timeout_s:.0f} s: {sorted(waiting)}"
                    )
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def _check_children(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with status {child.proc.returncode}; see {child.log_path}"
                )

    def wait(self) -> int:
        """Block until a signal, or until a child dies unexpectedly (exit status 1)."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not self._stop:
            try:
                self._check_children()
            except RuntimeError as e:
                say(str(e))
                return 1
            if not self._servers_fine():
                return 1
            time.sleep(0.2)
        return 0

    def _servers_fine(self) -> bool:
        """False once a server has exited, except a cluster node while a majority still runs
        (JetStream goes on with a quorum: that is what the cluster is for)."""
        cluster = self.cluster
        for server in self.servers:
            if server.proc is None or server.proc.poll() is None or server in self._gone:
                continue
            say(f"{server.name} exited with status {server.proc.returncode}")
            sc = self.super_cluster
            if sc is not None and server in sc.nodes:
                # A lost region: the others serve its work (edge.placement); it rejoins when
                # started again on its store.
                say("  the other regions go on without it")
                self._gone.add(server)
                continue
            quorum = cluster is not None and len(cluster.running()) > len(cluster.nodes) // 2
            if cluster is None or server not in cluster.nodes or not quorum:
                return False
            say(
                f"  the cluster goes on with {len(cluster.running())} of {len(cluster.nodes)} nodes"
            )
            self._gone.add(server)
        return True

    def stop(self) -> None:
        """Workers and edge first (they finish or nak held jobs), then valkey and nats."""
        say("\nstopping ...")
        for child in reversed(self.children):
            status = child.stop(timeout_s=30)
            say(f"  {child.name} stopped (status {status})")
        for server in reversed(self.servers):
            server.stop()
            say(f"  {server.name} stopped")
        say("headrace is down.")


def up(settings: StackSettings) -> int:
    """Run the stack until Ctrl-C or SIGTERM."""
    stack = Stack(settings)
    try:
        stack.start()
        return stack.wait()
    finally:
        stack.stop()
