"""What every job of a request carries: its deadline, seeds, headers, and the deployment's bounds."""

from __future__ import annotations

import math
import random
import time

from aiohttp import web

from edge.context import REQUEST_ID, caller, ctx
from edge.dedup import fingerprint
from schemas.errors import InvalidRequest
from schemas.jobs import SEED_MAX
from schemas.subjects import Header

# Timeouts a client may send, in seconds: a plain header and the one OpenAI's Node SDK sends.
# That SDK truncates to whole seconds (``Math.trunc(timeout / 1000)``), so its "0" means
# "under a second", not "no time at all": it is read as 1 s (the client hangs up before then).
_TIMEOUT_HEADERS = ("Timeout", "X-Stainless-Timeout")
_WHOLE_SECONDS = "X-Stainless-Timeout"


def deadline_ms(request: web.Request) -> int:
    """Now plus the configured deadline, or the client's timeout when it is shorter.

    A timeout header that is not a finite, positive number of seconds is a 400 naming it:
    ``nan``, ``inf``, ``1e400`` or ``-5`` would otherwise be ignored, or worse, obeyed.
    """
    budget = ctx(request).settings.deadline_s
    for name in _TIMEOUT_HEADERS:
        raw = request.headers.get(name)
        if raw is None:
            continue
        try:
            asked = float(raw)
        except ValueError:
            asked = math.nan
        if name == _WHOLE_SECONDS and asked == 0:
            asked = 1.0
        if not (math.isfinite(asked) and asked > 0):
            raise InvalidRequest(
                f"the {name} header must be a positive number of seconds, not {raw[:32]!r}",
                param=name,
            )
        budget = min(budget, asked)
    return int((time.time() + budget) * 1000)


def seeds(seed: int | None, n: int) -> list[int]:
    """The request's seed (or a random one), then consecutive seeds for further choices."""
    first = random.randint(0, SEED_MAX) if seed is None else seed
    return [(first + i) % (SEED_MAX + 1) for i in range(n)]


def check_bounds(
    request: web.Request, *, n: int, max_tokens: int | None, prompt_chars: int
) -> None:
    """Limits that depend on this deployment's settings (the request models hold the fixed ones)."""
    s = ctx(request).settings
    if n > s.max_n:
        raise InvalidRequest(f"n must be at most {s.max_n}", param="n")
    if max_tokens is not None and max_tokens > s.max_tokens:
        raise InvalidRequest(f"max_tokens must be at most {s.max_tokens}", param="max_tokens")
    if prompt_chars > s.max_prompt_chars:
        raise InvalidRequest(
            f"the prompt is {prompt_chars} characters; at most {s.max_prompt_chars} are accepted",
            param="messages",
        )


def fingerprint_of(request: web.Request, body: bytes | None) -> str | None:
    """Which earlier request this one repeats: by Idempotency-Key, or by ``body`` when given."""
    key_id = caller(request).id
    if (idem := request.headers.get("Idempotency-Key")) is not None:
        return fingerprint(key_id, "idempotency-key", idem)
    return None if body is None else fingerprint(key_id, request.path, body)


def job_headers(request: web.Request) -> dict[str, str]:
    """Headers of every job a request publishes: its request id, owner and W3C trace context."""
    headers: dict[str, str] = {
        Header.REQUEST_ID: request[REQUEST_ID],
        Header.OWNER: caller(request).id,
    }
    if (traceparent := request.headers.get("traceparent")) is not None:
        headers[Header.TRACEPARENT] = traceparent[:128]
    return headers
