"""``headrace up`` starts the local stack and stops all of it on a signal."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from headrace.servers import free_port
from tests.conftest import start_up

pytestmark = pytest.mark.slow


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_runs_the_stack_and_stops_it_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    nats_port, valkey_port, port = free_port(), free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "headrace",
        "up",
        "--data-dir",
        str(tmp_path / "data"),
        "--nats-port",
        str(nats_port),
        "--valkey-port",
        str(valkey_port),
        "--port",
        str(port),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("HEADRACE_API_KEYS", "API_TOKENS")}
    env["HEADRACE_NATS_HTTP_PORT"] = "0"
    env["HEADRACE_DEFAULT_RPM"] = "1000"  # the edge keeps it in the stack's valkey
    proc, output = start_up(argv, env, 110)
    assert "headrace is up" in output, output
    worker_pid = int(re.search(r"worker-echo-1 \(pid (\d+)\)", output).group(1))  # type: ignore[union-attr]
    assert _listening(nats_port)
    assert _listening(valkey_port)
    assert _alive(worker_pid)

    nats_url, auth = f"nats://127.0.0.1:{nats_port}", tmp_path / "data" / "auth"
    status = subprocess.run(
        [sys.executable, "-m", "headrace", "status", "--nats-url", nats_url,
         "--nats-creds", str(auth / "observer.env")],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert "local-echo-1" in status.stdout
    assert "local-llm-1" in status.stdout
    assert "SmolLM2-135M-Instruct" in status.stdout
    assert "llm-echo" in status.stdout
    assert "local-sd-1" in status.stdout
    assert "tiny-sd" in status.stdout

    # NATS refuses anonymous clients: one line names the server, the exit status is not 0.
    anonymous = subprocess.run(
        [sys.executable, "-m", "headrace", "status", "--nats-url", nats_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in env.items() if not k.startswith("HEADRACE_NATS_")},
    )
    assert anonymous.returncode == 2
    assert f"{nats_url} refused an anonymous connection" in anonymous.stderr
    # The generated credentials are readable by their owner only.
    assert auth.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in auth.iterdir()} == {0o600}
    assert "observer.env" in output

    # The printed development key works, and so does the printed curl example's request.
    key = re.search(r"API key: (\S+)", output).group(1)  # type: ignore[union-attr]
    assert (tmp_path / "data" / "dev-api-key").read_text().strip() == key
    assert f"curl -N http://127.0.0.1:{port}/v1/chat/completions" in output
    body = orjson.dumps(
        {"model": "echo", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = orjson.loads(resp.read())
        limit, remaining = (
            resp.headers[f"x-ratelimit-{h}-requests"] for h in ("limit", "remaining")
        )
    assert answer["usage"]["completion_tokens"] == 3
    assert (limit, remaining) == ("1000", "999")

    # LLMUnity names no model: /completion goes to the bundled SmolLM2 that up started.
    completion = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion",
        data=orjson.dumps({"prompt": "The sky is", "n_predict": 3}),
        headers={"Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(completion, timeout=60) as resp:
        llama = orjson.loads(resp.read())
    assert llama["model"] == "SmolLM2-135M-Instruct"
    assert llama["tokens_predicted"] == 3
    assert '"model": "SmolLM2-135M-Instruct"' in output  # the printed curl example uses it

    # The SD worker serves the demo pipeline it built in the data directory.
    assert (tmp_path / "data" / "tiny-sd" / "model_index.json").is_file()
    assert f"curl http://127.0.0.1:{port}/sdapi/v1/txt2img" in output
    txt2img = urllib.request.Request(
        f"http://127.0.0.1:{port}/sdapi/v1/txt2img",
        data=orjson.dumps({"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64}),
        headers={"Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(txt2img, timeout=60) as resp:
        (image,) = orjson.loads(resp.read())["images"]
    assert base64.b64decode(image).startswith(b"\x89PNG")

    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "worker-echo-1 stopped (status 0)" in rest
    assert "worker-sd-1 stopped (status 0)" in rest
    assert "worker-llm-1 stopped (status 0)" in rest
    assert "edge stopped (status 0)" in rest
    assert "headrace is down" in rest
    assert not _listening(nats_port)
    assert not _listening(valkey_port)
    assert not _listening(port)
    assert not _alive(worker_pid)


def _pids_with(fragment: str) -> list[int]:
    """Processes whose command line contains ``fragment``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _chat(port: int, key: str) -> tuple[int, dict[str, object]]:
    """A non-streamed echo chat request: its status and body."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=orjson.dumps(
            {"model": "echo", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        ),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


@pytest.mark.timeout(120)
def test_up_cluster_runs_three_nodes_at_r3_and_survives_one(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "headrace", "up", "--cluster", "3", "--data-dir", str(data)]
    argv += ["--port", str(port), "--valkey-port", str(free_port())]
    argv += ["--llm-workers", "0", "--sd-workers", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("HEADRACE_API_KEYS", "API_TOKENS")}
    # 0: every node's client, route and monitoring port is a free one.
    env.update(HEADRACE_NATS_PORT="0", HEADRACE_NATS_CLUSTER_PORT="0", HEADRACE_NATS_HTTP_PORT="0")
    proc, output = start_up(argv, env, 60)
    try:
        assert "cluster headrace of 3 formed" in output, output
        assert "streams at R3" in output
        urls = re.search(r"\(NATS (\S+),", output).group(1)  # type: ignore[union-attr]
        assert len(urls.split(",")) == 3
        key = (data / "dev-api-key").read_text().strip()
        code, answer = _chat(port, key)
        assert code == 200, answer
        assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "headrace",
                "status",
                "--nats-url",
                urls,
                "--nats-creds",
                str(data / "auth" / "observer.env"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "CLUSTER headrace" in status.stdout, status.stdout + status.stderr
        jobs = re.search(r"^JOBS +(\S+) +(.+)$", status.stdout, re.M)
        assert jobs is not None, status.stdout
        leader, followers = jobs.groups()
        assert len(followers.split(", ")) == 2

        # The JOBS leader dies: the stack goes on, and requests succeed again once the two
        # nodes left have elected a new one (4-9 s: the raft election timeout).
        (pid,) = _pids_with(f"--server_name {leader} ")
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        while (answer := _chat(port, key))[0] != 200:
            assert answer[0] == 503, answer  # a clear error while JOBS has no leader
            assert time.monotonic() - t0 < 30
            time.sleep(0.5)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert "the cluster goes on with 2 of 3 nodes" in rest
    assert proc.returncode == 0, rest
    assert "headrace is down" in rest
    assert _pids_with(str(data)) == []
