"""``headrace up`` starts the local stack and stops all of it on a signal."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headrace.servers import free_port

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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_runs_the_stack_and_stops_it_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    nats_port, valkey_port = free_port(), free_port()
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
    ]
    env = dict(os.environ, HEADRACE_NATS_HTTP_PORT="0")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Press Ctrl-C" in line or not line:
            break
    output = "".join(lines)
    assert "headrace is up" in output, output
    worker_pid = int(re.search(r"worker-echo-1 \(pid (\d+)\)", output).group(1))  # type: ignore[union-attr]
    assert _listening(nats_port)
    assert _listening(valkey_port)
    assert _alive(worker_pid)

    status = subprocess.run(
        [sys.executable, "-m", "headrace", "status", "--nats-url", f"nats://127.0.0.1:{nats_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "local-echo-1" in status.stdout
    assert "llm-echo" in status.stdout

    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "worker-echo-1 stopped (status 0)" in rest
    assert "headrace is down" in rest
    assert not _listening(nats_port)
    assert not _listening(valkey_port)
    assert not _alive(worker_pid)
