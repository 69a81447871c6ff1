"""What every benchmark shares: progress lines, percentiles, a private nats-server and children."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS

from headrace.servers import NatsServer
from schemas.subjects import WORKERS_BUCKET, worker_key
from schemas.topology import Limits, provision

T = TypeVar("T")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_outputs(
    out: Path, name: str, result: dict[str, Any], table: str,
    plot: Callable[[dict[str, Any], Path], bool],
) -> None:  # fmt: skip
    """Print the table; write ``<name>.json``, ``<name>.md`` and the plot ``<name>.png``."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out / f"{name}.md").write_text(table)
    plotted = plot(result, out / f"{name}.png")
    written = f"wrote {out}/{name}.json, {name}.md" + (f" and {name}.png" if plotted else "")
    print(written + ("" if plotted else " (install matplotlib for the plot)"), file=sys.stderr)


def progress(label: str, done: int, total: int) -> None:
    """One self-overwriting progress line on stderr."""
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\r  {label:32} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
    sys.stderr.flush()


def pass_order(items: Sequence[T], n: int) -> list[T]:
    """Pass ``n``'s order: as given on even passes, reversed on odd ones, so that a drift of
    the machine's speed over a run (10-20 % on this VM) falls on every system alike over two
    passes instead of on the last ones."""
    return list(items) if n % 2 == 0 else list(items)[::-1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@contextlib.contextmanager
def private_nats(max_msgs: int = 100_000) -> Iterator[NatsServer]:
    """A provisioned nats-server in a temporary directory, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            asyncio.run(_provision(server.url, max_msgs))
            yield server
        finally:
            server.stop()


async def _provision(url: str, max_msgs: int) -> None:
    nc = await nats.connect(url)
    try:
        await provision(nc.jetstream(), Limits(jobs_max_msgs=max_msgs), [("llm", "echo")])
    finally:
        await nc.close()


@contextlib.contextmanager
def child(
    args: list[str], env: dict[str, str], module: str = "headrace", log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m headrace ARGS`` (or another module), terminated afterwards.

    Its output goes to ``log`` when one is given, else to this process's.
    """
    argv = [sys.executable, "-m", module, *args]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("ab")) if log is not None else None
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=out)
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)


async def wait_worker(nc: NATS, worker_id: str) -> None:
    """Until the worker has registered."""
    kv = await nc.jetstream().key_value(WORKERS_BUCKET)
    for _ in range(600):
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            if (await kv.get(worker_key(worker_id))).value:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"worker {worker_id} did not start")
