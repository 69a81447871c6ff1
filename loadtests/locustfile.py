"""Load test of the edge with locust: streamed chat completions, non-streamed completions and
A1111 txt2img requests.

Streamed requests report time to first token (``TTFT``), time per output token after the
first (``TPOT``) and the whole stream (``stream e2e``) as request events of their own, so
locust's tables and percentiles show them next to the HTTP requests.

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 16 -r 4 -t 1m

Settings: ``HEADRACE_API_KEY`` (default: ``.headrace/dev-api-key``, as ``headrace up`` writes it),
``HEADRACE_LOADTEST_MODEL`` (default ``echo``), ``HEADRACE_LOADTEST_MAX_TOKENS`` (default 32),
``HEADRACE_LOADTEST_IMAGES`` (default 1: one image user per four chat users; 0: none, for a
stack without an image worker) and ``HEADRACE_LOADTEST_IMAGE_STEPS`` (default 4; 64x64 images).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, between, task

MODEL = os.environ.get("HEADRACE_LOADTEST_MODEL", "echo")
MAX_TOKENS = int(os.environ.get("HEADRACE_LOADTEST_MAX_TOKENS", "32"))
IMAGES = int(os.environ.get("HEADRACE_LOADTEST_IMAGES", "1"))
IMAGE_STEPS = int(os.environ.get("HEADRACE_LOADTEST_IMAGE_STEPS", "4"))
MESSAGES = [{"role": "user", "content": "Tell me a short story about a river and a mill."}]


def _api_key() -> str:
    key = os.environ.get("HEADRACE_API_KEY")
    if key:
        return key
    path = Path(".headrace/dev-api-key")
    return path.read_text().strip() if path.exists() else ""


class ChatUser(HttpUser):
    """Mostly streamed chats (what interactive clients do), some whole completions."""

    weight = 4
    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        """Every request carries the key."""
        self.client.headers["Authorization"] = f"Bearer {_api_key()}"

    @task(3)
    def stream_chat(self) -> None:
        """A streamed chat completion; reports TTFT, TPOT and the whole stream."""
        body = {
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},  # the exact token count, in the last chunk
        }
        start = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions", json=body, stream=True, catch_response=True, name="chat stream"
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            first, pieces, tokens = self._read_sse(response.iter_lines())
            end = time.perf_counter()
            if first is None:
                response.failure("no text in the stream")
                return
            response.success()
        self._report("TTFT", (first - start) * 1000)
        self._report("stream e2e", (end - start) * 1000)
        generated = tokens or pieces
        if generated > 1:
            self._report("TPOT", (end - first) * 1000 / (generated - 1))

    @task(1)
    def completion(self) -> None:
        """A non-streamed completion (the legacy endpoint, one body)."""
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS}
        with self.client.post(
            "/v1/completions", json=body, catch_response=True, name="completion"
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif not response.json()["choices"][0]["text"]:
                response.failure("empty completion")

    @staticmethod
    def _read_sse(lines: Any) -> tuple[float | None, int, int]:
        """(time of the first text, chunks with text, completion tokens from usage or 0)."""
        first: float | None = None
        pieces = tokens = 0
        for line in lines:
            if not line.startswith(b"data: "):
                continue  # ids, keep-alive comments, blank separators
            data = line[len(b"data: ") :]
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                pieces += 1
                first = first if first is not None else time.perf_counter()
        return first, pieces, tokens

    def _report(self, name: str, ms: float) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=ms,
            response_length=0,
            exception=None,
            context={},
        )


if IMAGES:

    class ImageUser(HttpUser):
        """A1111 txt2img at 64x64 (on `headrace up`'s demo pipeline: seconds, not minutes)."""

        weight = IMAGES
        wait_time = between(0.5, 1.5)

        def on_start(self) -> None:
            """Every request carries the key."""
            self.client.headers["Authorization"] = f"Bearer {_api_key()}"

        @task
        def txt2img(self) -> None:
            """One image; fails unless a decodable base64 PNG comes back."""
            body = {"prompt": "a lighthouse at dusk", "steps": IMAGE_STEPS, "width": 64,
                    "height": 64, "seed": -1}  # fmt: skip
            with self.client.post(
                "/sdapi/v1/txt2img", json=body, catch_response=True, name="txt2img"
            ) as response:
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}")
                elif not response.json()["images"][0].startswith("iVBOR"):  # PNG, base64
                    response.failure("the image is not a PNG")
