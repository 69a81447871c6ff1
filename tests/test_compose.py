"""compose.yaml and docker/Dockerfile, read statically (no Docker engine is needed)."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from headrace.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
NATS_NODES = ("nats-1", "nats-2", "nats-3")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def dockerfile() -> list[list[str]]:
    """Instructions as word lists, continuation lines joined, comments dropped."""
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [line.split() for line in lines if line and not line.startswith("#")]


def test_compose_runs_nats_valkey_edge_and_a_worker_from_official_images() -> None:
    services = compose()["services"]
    assert {*NATS_NODES, "valkey", "provision", "edge", "worker"} <= set(services)
    assert all(services[n]["image"].startswith("nats:") for n in NATS_NODES)
    assert services["valkey"]["image"].startswith(("valkey/valkey:", "redis:"))
    for name in ("provision", "edge", "worker"):
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name


def node_config(service: dict[str, Any]) -> str:
    """The nats-server config file a compose service mounts and starts with."""
    (mount,) = [v for v in service["volumes"] if v.split(":")[1] in service["command"]]
    source, target, _ = mount.split(":")
    assert target in service["command"]
    return (ROOT / source).read_text()


def test_nats_has_jetstream_and_listens_beyond_localhost() -> None:
    for name in NATS_NODES:
        conf = node_config(compose()["services"][name])
        assert "jetstream" in conf
        assert "listen: 0.0.0.0:4222" in conf
        assert "http: 127.0.0.1:8222" in conf  # monitoring only inside the container


def test_three_nats_services_form_one_cluster_each_with_its_own_store() -> None:
    services = compose()["services"]
    names, stores = set(), set()
    for name in NATS_NODES:
        service = services[name]
        conf = node_config(service)
        # Each node is named after its service (the routes reach it by that name) ...
        assert "server_name: $SERVER_NAME" in conf
        names.add(service["environment"]["SERVER_NAME"])
        stores |= {v.split(":")[0] for v in service["volumes"] if v.endswith(":/data")}
        # ... in one named cluster, with a route to every node.
        cluster = re.search(r"^cluster \{(.*?)^\}", conf, re.S | re.M)
        assert cluster is not None
        assert re.search(r"^\s*name: headrace$", cluster.group(1), re.M)
        assert "listen: 0.0.0.0:6222" in cluster.group(1)
        routes = set(re.findall(r"nats-route://([\w-]+):6222", cluster.group(1)))
        assert routes == set(NATS_NODES)
        assert "healthz" in " ".join(service["healthcheck"]["test"])
        assert "js-enabled-only" not in " ".join(service["healthcheck"]["test"])
    assert names == set(NATS_NODES)
    assert len(stores) == 3
    assert stores <= set(compose()["volumes"])
    # Provisioning waits for all three, at R3.
    provision = services["provision"]
    assert {n: provision["depends_on"][n]["condition"] for n in NATS_NODES} == dict.fromkeys(
        NATS_NODES, "service_healthy"
    )
    assert provision["environment"]["HEADRACE_REPLICAS"] == "3"


def test_nats_refuses_anonymous_clients_and_keeps_monitoring_inside() -> None:
    services = compose()["services"]
    conf = (ROOT / "nats" / "cluster" / "node.conf").read_text()
    assert "http: 127.0.0.1:8222" in conf
    assert "no_auth_user" not in conf
    (include,) = [line.split()[1] for line in conf.splitlines() if line.startswith("include ")]
    for name in NATS_NODES:
        mounts = dict(v.split(":")[:2] for v in services[name]["volumes"] if v.startswith("./"))
        # nats-server resolves an include next to the including file.
        assert mounts["./nats-auth/nats-users.conf"] == f"/etc/nats/{Path(include).name}"
        healthcheck = " ".join(services[name]["healthcheck"]["test"])
        assert "http://127.0.0.1:8222/" in healthcheck
    roles = {"provision": "admin", "edge": "edge", "worker": "worker", "sd-worker": "worker"}
    for name, role in roles.items():
        assert services[name]["env_file"] == f"nats-auth/{role}.env", name
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "nats-auth" in ignored  # passwords never enter an image


def test_node_conf_and_the_generated_users_are_valid_for_nats_server(tmp_path: Path) -> None:
    from headrace.credentials import SERVER_CONF, Credentials
    from headrace.servers import nats_server_binary

    creds = Credentials.ensure(tmp_path / "nats-auth", {"unity": ["SmolLM2-135M-Instruct"]}, cost=4)
    (tmp_path / "node.conf").write_text((ROOT / "nats" / "cluster" / "node.conf").read_text())
    (tmp_path / SERVER_CONF).write_text((creds.directory / SERVER_CONF).read_text())
    out = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "node.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        env={"SERVER_NAME": "nats-1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr


def test_the_edge_is_wired_to_nats_and_valkey() -> None:
    services = compose()["services"]
    env = services["edge"]["environment"]
    redis = urlsplit(env["HEADRACE_REDIS_URL"])
    assert redis.scheme == "redis"
    assert redis.hostname == "valkey"
    assert redis.port == 6379
    for name in ("edge", "worker", "sd-worker", "provision"):
        urls = services[name]["environment"]["HEADRACE_NATS_URL"].split(",")
        assert [(urlsplit(u).hostname, urlsplit(u).port) for u in urls] == [
            (n, 4222) for n in NATS_NODES
        ]
    assert env["HEADRACE_KEYS_FILE"] == "/run/secrets/keys.toml"
    assert services["edge"]["secrets"][0]["target"] == "keys.toml"
    assert "service_healthy" in str(services["edge"]["depends_on"]["valkey"])


def test_every_headrace_command_in_compose_parses() -> None:
    parser = build_parser()
    for name, service in compose()["services"].items():
        if "build" in service:
            args = parser.parse_args(service["command"])
            assert callable(args.func), name


def test_the_dockerfile_builds_every_package_and_runs_headrace() -> None:
    steps = dockerfile()
    froms = [s[1] for s in steps if s[0] == "FROM"]
    args = {
        s[1].split("=")[0]: s[1].split("=", 1)[1] for s in steps if s[0] == "ARG" and "=" in s[1]
    }
    assert args["PYTHON"].startswith("python:3.")
    assert all(f == "${PYTHON}" for f in froms)
    copied = {s[1] for s in steps if s[0] == "COPY" and not s[1].startswith("--from")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert set(packages) | {"nats", "pyproject.toml"} <= copied
    assert all((ROOT / c).exists() for c in copied)
    (entrypoint,) = [s for s in steps if s[0] == "ENTRYPOINT"]
    assert " ".join(entrypoint[1:]) == '["headrace"]'
    (cmd,) = [s for s in steps if s[0] == "CMD"]
    build_parser().parse_args(shlex.split(" ".join(cmd[1:]).strip("[]").replace(",", " ")))
    assert [s for s in steps if s[0] == "USER"][-1][1] != "root"


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".headrace", "keys.toml"} <= set(ignored)
