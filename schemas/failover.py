"""Handing a job over when its worker is lost or stops: beats, continuations, fences, stitching.

How it fits together (README, "When a worker dies or is stopped"):

* **Beats.** While a worker holds a job it publishes an empty core message on
  ``alive.[<user>.]<job id>`` every ``job_beat_s`` (from its event loop: the engines
  compute in threads of their own, so a long prompt or a slow diffusion step does not
  hold the beats back). ``Started.beat_ms`` tells followers the period.
* **Loss.** A follower (``schemas.client.JobStream``: the edge, or a NATS-native client)
  that hears neither an event nor a beat of the running attempt for ``MISSED_BEATS``
  periods checks its own connection (a flush) and RESULTS (events it missed), then hands
  the job over.
* **Continuation.** It writes the job's fence (below), then publishes the job again with
  ``resume``: the tokens and text already delivered, the same parameters, the next epoch
  (``Headrace-Epoch``) and ``Nats-Msg-Id`` ``<job id>.<epoch>``: JOBS keeps one however
  many followers publish it. Any live worker of the model takes it; the engines replay
  the delivered tokens and send only what follows. Image jobs start again with the same
  seed. A worker stopped by SIGTERM hands its long jobs over the same way, at once.
* **Fencing.** Attempt numbers rank epochs (``schemas.subjects.attempt_number``):
  followers drop events of an attempt older than the one they follow, so the lost
  worker (were it only paused) can never get output through. Its message comes back
  after ``ack_wait``: the fence, ``results.[<user>.]<job id>.fence``, whose last message
  names the lowest epoch still allowed to run, has the worker that receives it terminate
  it unrun. A finished job's worker raises the fence too, so a job whose ack was lost
  (a broker election) is not run twice either.
* **Stitching.** ``Stitcher`` turns the attempts' events into one sequence: a
  continuation's text is placed after what its ``Started`` says it resumed, text that
  was delivered already (a restart with the same seed, a follower that saw more) is
  dropped once it is checked to be the same, and diffusion steps never go backwards.
"""

from __future__ import annotations

import contextlib
import logging
from array import array
from collections.abc import Iterable

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck

from schemas.codec import encode
from schemas.errors import Unavailable
from schemas.events import Delta, Progress, Started
from schemas.jobs import AnyJob, Resume, TextJob
from schemas.subjects import (
    RESULTS_STREAM,
    Header,
    continuation_msg_id,
    fence_subject,
    job_subject,
    jobs_stream,
    queue_kind,
)

log = logging.getLogger(__name__)

# Beats a follower may miss before it checks whether the worker is lost (4 of 200 ms: at
# most 0.8 s from a worker's death to the hand-over).
MISSED_BEATS = 4
# Hand-overs of one job before its followers give up (a job that kills every worker it
# reaches is not handed on forever).
MAX_HANDOVERS = 3


def continuation(job: AnyJob, resume: Resume | None) -> AnyJob:
    """The job to publish again: the same parameters, ``resume`` for a text job."""
    if isinstance(job, TextJob):
        return job.model_copy(update={"resume": resume})
    return job


def continuation_headers(
    job: AnyJob, reply: str, headers: dict[str, str], epoch: int, after: str
) -> dict[str, str]:
    """A continuation's message headers: the job's own (request id, trace, owner), its
    reply and deadline, the new epoch and the event it goes on from."""
    out = {
        k: v
        for k, v in headers.items()
        if not k.startswith("Nats-") and k not in (Header.EPOCH, Header.RESUMED_AFTER)
    }
    out[Header.MSG_ID] = continuation_msg_id(job.id, epoch)
    out[Header.REPLY] = reply
    out[Header.EPOCH] = str(epoch)
    out[Header.RESUMED_AFTER] = after
    if job.deadline_ms is not None:
        out[Header.DEADLINE] = str(job.deadline_ms)
    return out


async def write_fence(js: JetStreamContext, reply: str, epoch: int) -> None:
    """Let no delivery of an epoch below ``epoch`` start any more (stored before returning)."""
    headers: dict[str, str] = {Header.EPOCH: str(epoch), Header.MSG_ID: f"{reply}.fence.{epoch}"}
    await js.publish(fence_subject(reply), b"", headers=headers)


async def read_fence(js: JetStreamContext, reply: str, stream: str = RESULTS_STREAM) -> int:
    """The lowest epoch of the job still allowed to run (0 when there is no fence, or when
    RESULTS cannot say now: the followers still drop what a superseded attempt sends).

    ``stream``: the RESULTS stream that captures ``reply`` (in a super-cluster the
    submitter's region's, ``schemas.subjects.reply_results_stream``)."""
    try:
        msg = await js.get_last_msg(stream, fence_subject(reply), direct=True)
    except nats.js.errors.NotFoundError:
        return 0
    except (nats.errors.Error, TimeoutError) as e:
        log.debug("the fence could not be read (%s)", type(e).__name__)
        return 0
    raw = (msg.headers or {}).get(Header.EPOCH, "0")
    return int(raw) if raw.isdigit() else 0


async def hand_over(
    js: JetStreamContext,
    job: AnyJob,
    reply: str,
    headers: dict[str, str],
    *,
    epoch: int,
    after: str,
    resume: Resume | None,
    region: str | None = None,
) -> PubAck:
    """Fence the job's earlier epochs, then publish its continuation in ``epoch`` (once:
    a copy another follower publishes is dropped by JOBS as a duplicate).

    ``region``: in a super-cluster, the region whose queue (``JOBS_<region>``) takes it; the
    fence goes where ``reply`` is captured, the submitter's region's RESULTS, whichever
    region ran the job before."""
    await write_fence(js, reply, epoch)
    hdrs = continuation_headers(job, reply, headers, epoch, after)
    payload = encode(continuation(job, resume))
    subject = job_subject(queue_kind(job.kind), job.model, region)
    return await js.publish(subject, payload, stream=jobs_stream(region), headers=hdrs)


class Diverged(Unavailable):
    """A continuation's text does not match what was already delivered."""


class Stitcher:
    """The events of a job's attempts made into one sequence, and what was delivered.

    Events come in position order (``JobStream`` orders them and fills gaps). Each
    attempt's text is placed where its ``Started`` says it resumed (0 for a plain
    redelivery, which starts again); only text after what was delivered passes.
    """

    _JOIN_EVERY = 256

    def __init__(self) -> None:
        self.attempt = 0
        self.chars = 0  # delivered characters
        self.tokens = 0  # delivered tokens
        self.ids: array[int] = array("q")  # their ids, while every delta carried them
        self.exact = True  # ids match tokens
        self.last: tuple[int, int] = (0, 0)  # the last event taken (attempt, seq)
        self.step = 0  # the furthest diffusion step delivered
        self._parts: list[str] = []
        self._at_chars = 0  # where the current attempt's next text goes
        self._at_tokens = 0

    @property
    def text(self) -> str:
        """Every delivered character."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def resume(self) -> Resume | None:
        """What a continuation goes on from; None when nothing (or nothing exact) was delivered."""
        if not self.tokens or not self.exact or len(self.ids) != self.tokens:
            return None
        return Resume(token_ids=self.ids.tolist(), text=self.text)

    def take(self, attempt: int, seq: int, event: object) -> object | None:
        """The event as the client should see it, or None when it brings nothing new."""
        if attempt != self.attempt:
            self.attempt, self._at_chars, self._at_tokens = attempt, 0, 0
        if isinstance(event, Started):
            if event.resumed_after is not None:
                self._at_chars, self._at_tokens = event.resumed_chars, event.resumed_tokens
            if self._at_chars > self.chars:
                raise Unavailable("a continuation went on from text this follower lacks")
        elif isinstance(event, Delta):
            event = self._delta(event)
        elif isinstance(event, Progress):
            if event.step <= self.step:
                return None  # a restarted image job repeating a step
            self.step = event.step
        if event is not None:
            self.last = (attempt, seq)
        return event

    def _delta(self, delta: Delta) -> Delta | None:
        start, t_start = self._at_chars, self._at_tokens
        self._at_chars += len(delta.text)
        self._at_tokens += delta.tokens
        overlap = self.chars - start
        if overlap < 0:
            raise Unavailable("a continuation skipped text that was never delivered")
        if overlap:
            seen = self.text[start : start + min(overlap, len(delta.text))]
            if not delta.text.startswith(seen):
                raise Diverged("the job's continuation does not match the text delivered")
            if overlap >= len(delta.text):
                return None
            delta = _trimmed(delta, overlap, self.tokens - t_start)
        self._deliver(delta)
        return delta

    def _deliver(self, delta: Delta) -> None:
        self.chars += len(delta.text)
        self.tokens += delta.tokens
        if delta.token_ids is not None and len(delta.token_ids) == delta.tokens:
            self.ids.extend(delta.token_ids)
        elif delta.tokens:
            self.exact = False
        self._parts.append(delta.text)
        if len(self._parts) >= self._JOIN_EVERY:
            self._parts[:] = ["".join(self._parts)]


def _trimmed(delta: Delta, chars: int, tokens: int) -> Delta:
    """``delta`` without its first ``chars`` characters (``tokens`` tokens, when known)."""
    ids = delta.token_ids
    n = delta.tokens
    if 0 <= tokens <= n:
        ids = ids[tokens:] if ids is not None else None
        n -= tokens
    else:
        ids = None  # the tokens cannot be told apart: the ids are dropped, ``exact`` goes
    logprobs = delta.logprobs[tokens:] if delta.logprobs and tokens >= 0 else delta.logprobs
    return delta.model_copy(
        update={"text": delta.text[chars:], "tokens": n, "token_ids": ids, "logprobs": logprobs}
    )


def chain(events: Iterable[tuple[int, int, object]]) -> set[tuple[int, int]]:
    """Positions to leave out of a job's stored history: events a superseded attempt sent
    after the point its continuation went on from (its worker was only paused)."""
    events = list(events)
    cuts: dict[int, int] = {}
    for _, _, event in events:
        if isinstance(event, Started) and event.resumed_after:
            with contextlib.suppress(ValueError):
                a, _, s = event.resumed_after.partition("-")
                cuts[int(a)] = min(cuts.get(int(a), int(s)), int(s))
    return {(a, s) for a, s, _ in events if a in cuts and s > cuts[a]}
