"""Headless load test with pass/fail thresholds: ``make loadtest`` (against ``headrace up``).

Runs locust on ``loadtests/locustfile.py`` for a fixed time, reads its CSV statistics and
fails (exit status 1) when the error rate or the p95 time to first token is over its
threshold::

    .venv/bin/python loadtests/run.py --host http://127.0.0.1:8000 --users 16 --run-time 30s
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="http://127.0.0.1:8000", help="the edge's base URL")
    p.add_argument("--users", type=int, default=16, help="concurrent locust users")
    p.add_argument("--spawn-rate", type=float, default=4, help="users started per second")
    p.add_argument("--run-time", default="30s", help="how long to load, e.g. 30s or 2m")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="failed / all requests")
    p.add_argument("--max-p95-ttft-ms", type=float, default=1000, help="p95 time to first token")
    p.add_argument("--out", type=Path, default=Path("bench-results/loadtest"), help="CSV prefix")
    return p.parse_args(argv)


def run_locust(args: argparse.Namespace) -> None:
    """Locust, headless, writing ``<out>_stats.csv``."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", args.host, "-u", str(args.users), "-r", str(args.spawn_rate),
        "-t", args.run_time, "--csv", str(args.out),
    ]  # fmt: skip
    print(f"loadtest: {args.users} users for {args.run_time} against {args.host} ...", flush=True)
    # locust's own exit status is 1 whenever any request failed; the thresholds decide here.
    # The timeout bounds a locust that does not stop at its run time (seen once in the test
    # suite under load): it is killed, and the statistics it wrote every second still count.
    try:
        subprocess.run(cmd, check=False, timeout=_seconds(args.run_time) + 20)
    except subprocess.TimeoutExpired:
        print("locust did not stop within 20 s of its run time: killed it", flush=True)


def _seconds(run_time: str) -> float:
    """``30s``, ``2m``, ``1h`` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    if run_time[-1:] in units:
        return float(run_time[:-1]) * units[run_time[-1]]
    return float(run_time)


def verdict(stats_csv: Path, max_error_rate: float, max_p95_ttft_ms: float) -> list[str]:
    """The thresholds that were broken (empty when the run passes)."""
    rows = {row["Name"]: row for row in csv.DictReader(stats_csv.open())}
    total = rows.get("Aggregated")
    ttft = rows.get("TTFT")
    if total is None or ttft is None or int(total["Request Count"]) == 0:
        return ["no requests (or no streamed first token) were recorded"]
    broken = []
    error_rate = int(total["Failure Count"]) / int(total["Request Count"])
    p95 = float(ttft["95%"])
    print(f"requests {total['Request Count']}, error rate {error_rate:.4f}, p95 TTFT {p95:.0f} ms")
    if error_rate > max_error_rate:
        broken.append(f"error rate {error_rate:.4f} > {max_error_rate}")
    if p95 > max_p95_ttft_ms:
        broken.append(f"p95 TTFT {p95:.0f} ms > {max_p95_ttft_ms:.0f} ms")
    return broken


def main(argv: list[str] | None = None) -> int:
    """Run, judge, print PASS or FAIL."""
    args = parse_args(argv)
    run_locust(args)
    broken = verdict(Path(f"{args.out}_stats.csv"), args.max_error_rate, args.max_p95_ttft_ms)
    print("FAIL: " + "; ".join(broken) if broken else "PASS", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
