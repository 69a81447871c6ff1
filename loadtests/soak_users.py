"""The soak's locust users (``loadtests/soak.py`` runs them; not meant to be run alone).

Each user sends seeded chat completions, most streamed, at a steady pace, and writes one JSON
line when a request starts and one when it ends to ``HEADRACE_SOAK_LOG``. The soak reads
them afterwards: a request with a start and no end hung; a stream that was answered 200 and
did not end with ``[DONE]`` after its last finish was cut short; every gap between two tokens
longer than ``GAP_S`` is kept with its wall-clock bounds, so the soak can tell which gaps
straddle a worker kill or a broker restart.

Settings: ``HEADRACE_API_KEY``, ``HEADRACE_SOAK_LOG``, ``HEADRACE_SOAK_UNTIL`` (a Unix time:
no request starts after it), ``HEADRACE_SOAK_MAX_TOKENS`` (default 24) and ``HEADRACE_SOAK_SEEDS`` (default 32: requests with the same seed must get the same
text, which the soak checks).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import uuid
from typing import Any

from locust import HttpUser, constant, task

MAX_TOKENS = int(os.environ.get("HEADRACE_SOAK_MAX_TOKENS", "24"))
SEEDS = int(os.environ.get("HEADRACE_SOAK_SEEDS", "32"))
UNTIL = float(os.environ.get("HEADRACE_SOAK_UNTIL", "inf"))  # no request starts past it
GAP_S = 0.2  # token gaps longer than this are recorded
# Reading stops only at the end of a stream or after this long without a byte; the edge sends
# keep-alive comments every 15 s while a job waits, so only a stream that truly hangs hits it.
READ_TIMEOUT_S = 90
MESSAGES = [{"role": "user", "content": "a mill race turns the wheel and the wheel turns stones"}]
_LOG = open(os.environ.get("HEADRACE_SOAK_LOG", os.devnull), "a", buffering=1)  # noqa: SIM115
_COUNTER = itertools.count()


def _write(record: dict[str, Any]) -> None:
    _LOG.write(json.dumps(record, separators=(",", ":")) + "\n")


class SoakUser(HttpUser):
    """Streamed chats (three in four) and whole completions, each seeded."""

    wait_time = constant(0.1)

    def on_start(self) -> None:
        """Every request carries the key."""
        self.client.headers["Authorization"] = f"Bearer {os.environ.get('HEADRACE_API_KEY', '')}"

    @task(3)
    def stream_chat(self) -> None:
        """A streamed chat completion."""
        self._request(stream=True)

    @task(1)
    def whole_chat(self) -> None:
        """A chat completion answered in one body."""
        self._request(stream=False)

    def _request(self, *, stream: bool) -> None:
        if time.time() >= UNTIL:
            time.sleep(1.0)  # the load is over; what is in flight drains (gevent's sleep)
            return
        seed = next(_COUNTER) % SEEDS
        rid = uuid.uuid4().hex
        body = {"model": "echo", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "seed": seed,
                "stream": stream}  # fmt: skip
        start = time.time()
        _write({"id": rid, "phase": "start", "t": start, "stream": stream, "seed": seed})
        end: dict[str, Any] = {"id": rid, "phase": "end", "status": None}
        name = "chat stream" if stream else "chat"
        try:
            with self.client.post(
                "/v1/chat/completions", json=body, stream=stream, catch_response=True,
                name=name, timeout=(10, READ_TIMEOUT_S),
            ) as response:  # fmt: skip
                end["status"] = response.status_code
                if response.status_code != 200:
                    end["outcome"] = f"http {response.status_code}"
                    end["code"] = _error_code(response.content)
                    response.failure(f"HTTP {response.status_code}")
                elif stream:
                    end.update(_read_stream(response.iter_lines(), start))
                else:
                    text = response.json()["choices"][0]["message"]["content"] or ""
                    end.update(outcome="ok", text=_digest(text))
                if end.get("outcome") == "ok":
                    response.success()
                elif response.status_code == 200:
                    response.failure(end["outcome"])
        except Exception as e:  # a dropped connection, a read timeout: recorded, never raised
            if end.get("outcome") != "ok":
                end["outcome"] = f"dropped {type(e).__name__}"
        end["t"] = time.time()
        if stream and end.get("ttft") is not None:
            end["ttft"] -= start
        _write(end)


def _read_stream(lines: Any, start: float) -> dict[str, Any]:
    """Outcome, digest of the text, time of the first token, and the long gaps (the wait for
    the first token counts as one)."""
    text, ttft, last, finished, done = "", None, start, False, False
    gaps: list[list[float]] = []
    for line in lines:
        if not line.startswith(b"data: "):
            continue  # ids, keep-alive comments, blank separators
        data = line[len(b"data: ") :]
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return {"outcome": "stream error", "code": chunk["error"].get("code"),
                    "gaps": gaps, "ttft": ttft}  # fmt: skip
        for choice in chunk.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece:
                now = time.time()
                if now - last > GAP_S:
                    gaps.append([last, now])
                ttft = now if ttft is None else ttft
                last = now
                text += piece
            finished = finished or choice.get("finish_reason") is not None
    outcome = "ok" if done and finished else "cut"
    return {"outcome": outcome, "text": _digest(text), "ttft": ttft, "gaps": gaps}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _error_code(content: bytes) -> str | None:
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error.get("code") if isinstance(error, dict) else str(error)
