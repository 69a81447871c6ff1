"""Turning a validated request into jobs on JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

from aiohttp import web

from edge.context import JOB_IDS, REQUEST_ID, caller, ctx
from edge.dedup import fingerprint
from edge.ratelimit.http import admit_text
from schemas.client import JobStream
from schemas.errors import InvalidRequest
from schemas.jobs import SEED_MAX, TextJob, TextParams
from schemas.registry import ModelInfo
from schemas.subjects import Header, new_job_id

# Timeouts a client may send, in seconds: a plain header and the one the OpenAI SDK sends.
_TIMEOUT_HEADERS = ("Timeout", "X-Stainless-Timeout")


@dataclass
class Submission:
    """Jobs of one request (n of them for ``n`` > 1) and their event streams."""

    model: ModelInfo
    job_ids: list[str]
    streams: list[JobStream]
    created_s: int
    started: float
    fingerprint: str | None = None  # set when retries of this request may share its jobs


def job_ids_header(sub: Submission) -> dict[str, str]:
    """``x-headrace-job-ids``: which jobs answer this request (for /v1/jobs/{id}/events)."""
    return {"x-headrace-job-ids": ",".join(sub.job_ids)}


def deadline_ms(request: web.Request) -> int:
    """Now plus the configured deadline, or the client's timeout when it is shorter."""
    budget = ctx(request).settings.deadline_s
    for name in _TIMEOUT_HEADERS:
        raw = request.headers.get(name)
        if raw is None:
            continue
        try:
            asked = float(raw)
        except ValueError:
            raise InvalidRequest(
                f"the {name} header must be a number of seconds", param=name
            ) from None
        if asked > 0:
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


async def submit_text(
    request: web.Request,
    model: str,
    params: list[TextParams],
    *,
    stream: bool,
    fingerprint: str | None = None,
) -> Submission:
    """Admit against the key's limits, wait for a worker of the model, then publish one job per
    choice; returns their streams.

    With a ``fingerprint`` that is already in flight, join those jobs instead (see edge.dedup).
    """
    c = ctx(request)
    started = time.perf_counter()
    caller(request).check(model)
    ticket = await admit_text(request, params)
    info = await c.fleet.require("llm", model, c.settings.no_worker_wait_s)
    if fingerprint is None:
        job_ids, streams, created_s = await _publish(request, model, params, stream)
        return Submission(info, job_ids, streams, created_s, started)
    entry, new = c.dedup.join(fingerprint)
    if not new:
        if ticket is not None:
            ticket.shared = True  # the request that started the job pays its tokens
        await asyncio.shield(entry.ready)
        joined = [await c.jobs.watch(job_id, replay=True) for job_id in entry.job_ids]
        request[JOB_IDS] = entry.job_ids
        return Submission(info, entry.job_ids, joined, entry.created_s, started, fingerprint)
    try:
        job_ids, streams, created_s = await _publish(request, model, params, stream)
    except BaseException as e:
        c.dedup.failed(fingerprint, entry, e)
        raise
    c.dedup.published(entry, job_ids, created_s)
    return Submission(info, job_ids, streams, created_s, started, fingerprint)


async def _publish(
    request: web.Request, model: str, params: list[TextParams], stream: bool
) -> tuple[list[str], list[JobStream], int]:
    """Publish one job per choice, all or nothing; returns their ids, streams and creation second."""
    c = ctx(request)
    now_ms = int(time.time() * 1000)
    deadline = deadline_ms(request)
    headers = job_headers(request)
    jobs = [
        TextJob(
            id=new_job_id(),
            model=model,
            created_ms=now_ms,
            deadline_ms=deadline,
            stream=stream,
            params=p,
        )
        for p in params
    ]
    streams: list[JobStream] = []
    request[JOB_IDS] = [j.id for j in jobs]
    try:
        for job in jobs:
            streams.append(await c.jobs.submit(job, headers=headers))
    except BaseException:
        for s in streams:  # all or nothing: do not leave half of an n>1 request running
            with contextlib.suppress(Exception):
                await s.cancel()
                await s.close()
        raise
    return [j.id for j in jobs], streams, now_ms // 1000
