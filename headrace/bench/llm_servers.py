"""The servers ``headrace bench llm`` measures: llama.cpp's own ``llama-server`` (the peer),
llama_cpp.server, any OpenAI-compatible command, and headrace (nats-server, worker, edge).

``make llama-server`` builds ``llama-server`` from the llama.cpp that llama-cpp-python's
source distribution vendors (the version headrace's engine runs, with the engine's cmake
flags) into ``.cache/llama-server/bin``; ``find_llama_server`` looks there unless
``--peer`` or ``HEADRACE_LLAMA_SERVER`` names another binary.

``served`` starts any OpenAI-compatible server from its command line on a free port and
waits until ``GET /v1/models`` lists the model, so the same runner drives llama-server,
llama_cpp.server (the test's stand-in where llama-server is not built) or anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from headrace.bench.common import child, private_nats
from headrace.bench.llm_http import wait_model
from headrace.servers import free_port, wait_for_port

# Where `make llama-server` puts the binary, relative to the repository root (and the cwd).
BUILT = Path(".cache/llama-server/bin/llama-server")
REPO_ROOT = Path(__file__).resolve().parents[2]


def find_llama_server(explicit: str | None = None) -> Path | None:
    """The llama-server to run: ``explicit``, else ``$HEADRACE_LLAMA_SERVER``, else the built one.

    None when none is there (the peer rows are then left out). A path that was named but
    does not exist is an error, not a silent omission.
    """
    named = explicit or os.environ.get("HEADRACE_LLAMA_SERVER")
    if named:
        path = Path(named)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"llama-server {path} is not an executable file")
        return path
    for path in (REPO_ROOT / BUILT, Path.cwd() / BUILT):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


@dataclass(frozen=True, kw_only=True)
class Serving:
    """What every served system gets: the same GGUF, context per sequence and threads."""

    model_id: str
    model_path: str
    n_ctx: int
    threads: int
    n_batch: int = 512  # headrace's ModelConfig.n_batch (and llama-cpp-python's n_ubatch)


def llama_server_argv(
    binary: Path, serving: Serving, port: int, parallel: int, extra: Sequence[str] = ()
) -> list[str]:
    """llama-server's command line: ``parallel`` slots of ``n_ctx`` each, the engine's batch.

    ``-c`` is the whole KV cache, split between the slots (without ``--kv-unified``), so
    each slot gets ``n_ctx`` as a headrace slot does. Flash attention stays at
    llama-server's default (``auto``); ``extra`` (``--peer-args``) can say ``-fa off``.
    """
    threads = str(serving.threads)
    return [
        str(binary), "--model", serving.model_path, "--alias", serving.model_id,
        "--host", "127.0.0.1", "--port", str(port),
        "--ctx-size", str(serving.n_ctx * parallel), "--parallel", str(parallel),
        "--threads", threads, "--threads-batch", threads,
        "--batch-size", str(serving.n_batch), "--ubatch-size", str(serving.n_batch),
        "--no-ui", *extra,
    ]  # fmt: skip


def llama_cpp_server_argv(
    serving: Serving, port: int, extra: Sequence[str] = ("--interrupt_requests", "False")
) -> list[str]:
    """llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``)."""
    threads = str(serving.threads)
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", serving.model_path,
        "--model_alias", serving.model_id, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(serving.n_ctx), "--n_threads", threads, "--n_threads_batch", threads,
        "--n_batch", str(serving.n_batch), "--verbose", "False", *extra,
    ]  # fmt: skip


Command = Callable[[int], list[str]]  # the server's command line for a given port


@contextlib.contextmanager
def served(command: Command, model_id: str, log: Path, timeout_s: float = 180) -> Iterator[str]:
    """Start ``command(port)`` on a free port; yield its base URL once it lists ``model_id``.

    Its output goes to ``log``; the last of it is printed when the server does not come up.
    """
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(command(port), stdout=out, stderr=out, preexec_fn=_die_with_parent)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            asyncio.run(_ready(proc, base, model_id, timeout_s))
        except (RuntimeError, TimeoutError):
            sys.stderr.write(log.read_text(errors="replace")[-3000:])
            raise
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """In the server's process before exec: on Linux, SIGTERM it when the bench dies.

    A bench killed outright (SIGKILL, a test's timeout) runs no cleanup; without this its
    llama-server would keep running, bound to a port, with nobody to stop it.
    """
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def _ready(proc: subprocess.Popen[bytes], base: str, model_id: str, timeout_s: float) -> None:
    waiting = asyncio.ensure_future(wait_model(base, model_id, {}, timeout_s))
    while not waiting.done():
        if proc.poll() is not None:
            waiting.cancel()
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        await asyncio.sleep(0.1)
    await waiting


@contextlib.contextmanager
def headrace_served(
    serving: Serving, slots: int, threads: int
) -> Iterator[tuple[str, dict[str, str]]]:
    """nats-server, one ``headrace worker llm`` with ``slots`` slots and the edge.

    Yields the edge's base URL and the headers with its API key, once the model is listed.
    """
    key, port = f"bench-{secrets.token_hex(8)}", free_port()
    worker = ["worker", "llm", "--worker-id", "bench-llm", "--slots", str(slots)]
    worker += ["--model", f"{serving.model_id}={serving.model_path}"]
    worker += ["--n-ctx", str(serving.n_ctx), "--threads", str(threads)]
    worker += ["--threads-batch", str(threads)]
    with private_nats() as server:
        env = {"HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
        edge_env = {**env, "HEADRACE_API_KEYS": key, "HEADRACE_PORT": str(port)}
        with child(worker, env), child(["edge"], edge_env) as edge:
            wait_for_port(port, 60, edge)
            base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
            asyncio.run(wait_model(base, serving.model_id, headers, timeout_s=120))
            yield base, headers


def engine_splits_threads() -> bool:
    """Whether the text engine gives each slot a llama.cpp context (and threads) of its own.

    Asked of the engine's own default: a per-slot engine shares the CPUs out among its
    contexts, a batching engine drives all of them from one context. The bench then gives
    each slot of an N-slot worker threads / N, or every slot all the threads.
    """
    from workers.engines.gguf import ModelConfig, cpu_count

    probe = ModelConfig(id="probe", path=Path("probe"), contexts=2)
    return probe.threads() < cpu_count()
