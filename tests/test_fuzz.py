"""schemathesis against ``/openapi.json``: every operation, authenticated, a bounded fuzz.

A real stack in child processes: nats-server, one echo worker and the edge (CORS on for any
origin, so preflights are answered; ``max_tokens`` and ``n`` capped low so that every
generated request finishes in milliseconds). No image worker runs: the image routes are fuzzed
for what they check before a job exists (bodies, sizes, bounds), and a valid request for an
image answers 404/503 at once, which the document says it may. For each operation, schemathesis
generates valid and invalid requests (``MAX_EXAMPLES`` of each kind, seeded and derandomized:
the same cases every run) and checks every answer: no status >= 500, the status documented,
the content type documented, the body matching its schema, invalid input refused with a 4xx,
an undocumented method answered 405, and a request without the key refused.

It also checks the document covers the app: a route registered without an entry in
``edge.routes.openapi.OPERATIONS`` fails here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from schemathesis.config import SchemathesisConfig

from edge.app import build_app
from edge.routes.openapi import OPERATIONS, document
from edge.settings import EdgeSettings
from headrace.servers import NatsServer, free_port, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.fuzz]

KEY = "sk-fuzz-only"
PORT = free_port()
# Generated requests per operation; a deeper run: HEADRACE_FUZZ_EXAMPLES=100 pytest tests/test_fuzz.py
MAX_EXAMPLES = int(os.environ.get("HEADRACE_FUZZ_EXAMPLES", "10"))
SEED = int(os.environ.get("HEADRACE_FUZZ_SEED", "20261201"))  # other cases: another seed

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "base-url": f"http://127.0.0.1:{PORT}",
        "headers": {"Authorization": f"Bearer {KEY}"},
        "request-timeout": 30,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        # A schema-valid request may rightly be refused: the request models hold rules JSON Schema
        # does not state (a deployment's max_tokens and prompt bounds, token ids in range, a
        # model that must be live, a base64 string that must decode to an image), and
        # embeddings/detokenize answer 400 while no model does them. Every other check runs.
        # An OPTIONS without Access-Control-Request-Method is no preflight but a plain OPTIONS,
        # which no route has: 405 is its right answer.
        "checks": {
            "positive_data_acceptance": {"enabled": False},
            # An invalid body may also be too large (413, as documented) before it is read.
            "negative_data_rejection": {
                "expected-statuses": [
                    "400",
                    "401",
                    "403",
                    "404",
                    "405",
                    "406",
                    "409",
                    "413",
                    "415",
                    "422",
                    "428",
                    "429",
                    "5xx",
                ]
            },
            "missing_required_header": {"expected-statuses": [400, 401, 403, 405, 406, 415, 422]},
        },
    }
)
schema = schemathesis.openapi.from_dict(document(), config=CONFIG)


@pytest.fixture(scope="module")
def stack(tiny_sd: Path) -> Iterator[str]:
    """nats-server, an echo worker, the tiny-sd image worker and the edge on ``PORT``."""
    with tempfile.TemporaryDirectory(prefix="headrace-fuzz-") as tmp, contextlib.ExitStack() as es:
        server = NatsServer(Path(tmp) / "nats", log_path=Path(tmp) / "nats.log")
        server.start()
        es.callback(server.stop)
        env = {**os.environ, "HEADRACE_NATS_URL": server.url, "HEADRACE_LOG_LEVEL": "WARNING"}
        edge_env = {
            **env, "HEADRACE_API_KEYS": KEY, "HEADRACE_PORT": str(PORT),
            "HEADRACE_CORS_ORIGINS": "*", "HEADRACE_MAX_TOKENS": "64", "HEADRACE_MAX_N": "2",
            "HEADRACE_NO_WORKER_WAIT_S": "0.2", "HEADRACE_DEADLINE_S": "20",
            # Images of 64x64, 2 steps at most: the random-weight tiny-sd answers in a blink.
            "HEADRACE_IMAGE_MAX_SIDE": "64", "HEADRACE_IMAGE_MAX_STEPS": "2",
            "HEADRACE_IMAGE_MAX_COUNT": "1", "HEADRACE_OPENAI_IMAGE_STEPS": "2",
        }  # fmt: skip
        sd_env = {**env, "HEADRACE_SD_DEMO_DIR": str(tiny_sd), "HF_HUB_OFFLINE": "1"}
        log = es.enter_context((Path(tmp) / "children.log").open("ab"))
        for argv, child_env in (
            (["worker", "echo", "--worker-id", "fuzz", "--slots", "8"], env),
            (["worker", "sd", "--worker-id", "fuzz-sd"], sd_env),
            (["edge"], edge_env),
        ):
            proc = subprocess.Popen(
                [sys.executable, "-m", "headrace", *argv], env=child_env, stdout=log, stderr=log
            )
            es.callback(_stop, proc)
        wait_for_port(PORT, 30)
        _wait_worker(f"http://127.0.0.1:{PORT}")
        yield f"http://127.0.0.1:{PORT}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_worker(base: str) -> None:
    """Until both workers registered (the image worker loads torch: seconds)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(1200):
        models = requests.get(f"{base}/v1/models", headers=headers, timeout=5)
        images = requests.get(f"{base}/sdapi/v1/sd-models", headers=headers, timeout=5)
        if (
            models.status_code == images.status_code == 200
            and models.json()["data"]
            and images.json()
        ):
            return
        time.sleep(0.1)
    raise TimeoutError("the workers did not register")


@schema.parametrize()
def test_api(case: schemathesis.Case, stack: str) -> None:
    case.call_and_validate()


def test_every_route_is_described() -> None:
    app = build_app(EdgeSettings(api_keys=KEY))
    routed = set()
    for route in app.router.routes():
        if route.resource is None:
            continue
        routed.add((route.method, route.resource.canonical))
    described = {(op.method, op.openapi_path) for op in OPERATIONS}
    assert routed - described == set(), "routes missing from edge/routes/openapi.py OPERATIONS"
    assert described - routed == set(), "OPERATIONS describes routes the app does not have"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        # A token limit past the job's own bound was a 500 (a ValidationError of TextParams).
        ("POST", "/api/generate", {"model": "echo", "prompt": "x",
                                   "options": {"num_predict": 604_278_089_086}}, 400),
        ("POST", "/api/chat", {"model": "echo", "messages": [{"role": "user", "content": "x"}],
                               "options": {"num_predict": 6_469_693_229}}, 400),
        # Booleans where numbers are expected were read as 0 and 1.
        ("POST", "/completion", {"model": "echo", "prompt": "x", "n_probs": False}, 400),
        ("POST", "/completion", {"model": "echo", "prompt": [False]}, 400),
        ("POST", "/v1/completions", {"model": "echo", "prompt": [True]}, 400),
        # /template took every method.
        ("PUT", "/template", None, 405),
    ],
)  # fmt: skip
def test_what_the_fuzzer_found(
    stack: str, method: str, path: str, body: dict[str, object] | None, status: int
) -> None:
    r = requests.request(method, f"{stack}{path}", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error if path.startswith("/api/") else error["message"]


def test_a_preflight_names_only_the_methods_a_route_has(stack: str) -> None:
    headers = {"Origin": "https://game.example"}
    ok = requests.options(f"{stack}/template", timeout=10,
                          headers={**headers, "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert ok.status_code == 204
    refused = requests.options(f"{stack}/template", timeout=10,
                               headers={**headers, "Access-Control-Request-Method": "DELETE"})  # fmt: skip
    # No preflight for DELETE: passed on as a request, which carries no key.
    assert refused.status_code == 401
    assert "Access-Control-Allow-Methods" not in refused.headers
