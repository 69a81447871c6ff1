"""A small NATS client for the contract: submit a job, read its events, cancel it.

The edge uses it, and so can any Python program that talks to NATS directly::

    nc = await nats.connect("nats://127.0.0.1:4222", user="alice", password=...,
                            inbox_prefix="_INBOX.alice")
    client = JobClient(nc, user="alice")  # replies on results.alice.<job id>
    async with await client.submit(job) as stream:
        async for received in stream:
            print(received.event)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from schemas.codec import decode_event, encode
from schemas.errors import DeadlineExceeded, QueueFull, Unavailable
from schemas.events import Done, Error
from schemas.jobs import AnyJob
from schemas.subjects import (
    JOBS_STREAM,
    RESULTS_STREAM,
    Header,
    cancel_subject,
    job_subject,
    queue_kind,
    results_subject,
)

log = logging.getLogger(__name__)

# How long a gap in a job's events may wait to be filled from RESULTS before the stream fails.
FILL_TIMEOUT_S = 20.0

# JetStream error codes that mean "the stream is at a limit and discard=new refused it".
_LIMIT_ERR_CODES = {10077, 10047, 10028, 10054}


class Position(NamedTuple):
    """Where an event sits in a job's history: attempts restart their sequence at 1."""

    attempt: int
    seq: int

    def event_id(self) -> str:
        """The SSE ``id:`` of the event at this position."""
        return f"{self.attempt}-{self.seq}"

    @classmethod
    def parse(cls, event_id: str) -> Position:
        """Read an SSE ``Last-Event-ID`` back; raises ValueError when malformed."""
        attempt, _, seq = event_id.partition("-")
        pos = cls(int(attempt), int(seq))
        if pos.attempt < 1 or pos.seq < 1:
            raise ValueError(event_id)
        return pos


START = Position(0, 0)


@dataclass(frozen=True, slots=True)
class Received:
    """One result event with where it sits in the job's history."""

    pos: Position
    event: Any  # one of schemas.events' classes
    owner: str | None = None  # the submitting key's id, echoed by the worker

    @property
    def final(self) -> bool:
        """True for ``done`` and ``error``: nothing follows them in this attempt."""
        return isinstance(self.event, Done | Error)


def parse_result(msg: Msg) -> Received:
    """Decode a message from a reply subject or the RESULTS stream."""
    return received_from(msg.headers, msg.data)


def received_from(headers: dict[str, str] | None, data: bytes | None) -> Received:
    """Decode one result event from its headers and payload; ValueError when malformed."""
    h = headers or {}
    pos = Position(int(h.get(Header.ATTEMPT, 1)), int(h.get(Header.SEQ, 0)))
    return Received(pos, decode_event(data or b""), h.get(Header.OWNER))


class JobClient:
    """Submits jobs to JetStream and reads their result events.

    Call ``recover()`` after the connection comes back (``schemas.connection.connect``'s
    ``on_reconnect``): every followed job then gets what the live path missed from RESULTS,
    a job the broker lost before any worker took it is published again, and one lost
    while it ran fails its stream with ``Unavailable`` after ``silence_s`` without events,
    instead of waiting for its deadline.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        publish_attempts: int = 6,
        publish_timeout_s: float = 2.0,
        backoff_s: float = 0.05,
        silence_s: float = 10.0,
        user: str | None = None,
    ) -> None:
        self.nc = nc
        # A native client's NATS user: its jobs reply on results.<user>.<job id>, the only
        # results its permissions let it read (schemas/permissions.py). None: results.<job id>.
        self.user = user
        self.js = nc.jetstream(timeout=publish_timeout_s)
        self.publish_attempts = publish_attempts
        self.backoff_s = backoff_s
        self.silence_s = silence_s
        self.open: set[JobStream] = set()  # followed now: recovered after a reconnect
        self._recovering: set[asyncio.Task[None]] = set()

    async def submit(
        self,
        job: AnyJob,
        *,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> JobStream:
        """Subscribe to the job's reply subject, then publish the job; returns its event stream."""
        reply = reply or results_subject(job.id, self.user)
        stream = await self.watch(job.id, reply=reply, deadline_ms=job.deadline_ms)
        try:
            ack = await self.publish(job, reply=reply, headers=headers)
        except BaseException:
            await stream.close()
            raise
        stream.placed = Placed(job, reply, headers or {}, ack.seq)
        return stream

    async def watch(
        self,
        job_id: str,
        *,
        reply: str | None = None,
        deadline_ms: int | None = None,
        after: Position = START,
        replay: bool = False,
    ) -> JobStream:
        """Follow a job's events live; with ``replay`` (or ``after``) stored ones come first from RESULTS."""
        queue: asyncio.Queue[Received | Lost] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            try:
                queue.put_nowait(parse_result(msg))
            except ValueError:
                log.warning("job %s: dropped a malformed result event", job_id)

        sub = await self.nc.subscribe(reply or results_subject(job_id, self.user), cb=deliver)
        # Interest must reach the server before the job can produce anything.
        try:
            await self.nc.flush()
        except (nats.errors.Error, TimeoutError) as e:  # between two servers (a reconnect)
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            raise Unavailable("NATS did not confirm the subscription in time; retry") from e
        stream = JobStream(self, job_id, sub, queue, deadline_ms)
        self.open.add(stream)
        if replay or after != START:
            await stream.replay_after(after)
        return stream

    async def publish(
        self,
        job: AnyJob,
        *,
        reply: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        """Publish a job idempotently (``Nats-Msg-Id``), retrying while JetStream is unreachable."""
        hdrs = {
            **(headers or {}),
            Header.MSG_ID: job.id,
            Header.REPLY: reply or results_subject(job.id, self.user),
        }
        if job.deadline_ms is not None:
            hdrs[Header.DEADLINE] = str(job.deadline_ms)
        subject = job_subject(queue_kind(job.kind), job.model)
        payload = encode(job)
        delay = self.backoff_s
        for attempt in range(1, self.publish_attempts + 1):
            try:
                return await self.js.publish(subject, payload, stream=JOBS_STREAM, headers=hdrs)
            except nats.js.errors.APIError as e:
                if e.err_code in _LIMIT_ERR_CODES:
                    raise QueueFull(f"the job queue is full ({e.description})") from e
                raise Unavailable(f"JetStream refused the job ({e.description})") from e
            except (
                nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError,  # nats-py's name for no responders
                nats.errors.TimeoutError,
            ) as e:
                # Safe to repeat: the duplicate window drops a copy that did land. No responders
                # also means a clustered stream between leaders, for the second or so of an
                # election.
                if attempt == self.publish_attempts:
                    raise Unavailable("JetStream did not accept the job in time") from e
                log.debug("publish of job %s failed (%s), retrying", job.id, type(e).__name__)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def cancel(self, job_id: str) -> None:
        """Ask whichever worker holds (or will fetch) the job to stop it."""
        await self.nc.publish(cancel_subject(job_id), b"")
        await self.nc.flush()

    async def history(self, job_id: str, *, timeout_s: float = 2.0) -> list[Received]:
        """Every event of the job still held by the RESULTS stream, oldest first."""
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        try:
            psub = await self.js.pull_subscribe(
                results_subject(job_id, self.user), stream=RESULTS_STREAM, config=config
            )
        except nats.js.errors.NotFoundError:
            return []  # RESULTS is gone (a server that lost its state) or not back yet
        except (
            nats.js.errors.ServiceUnavailableError,
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
        ):
            # A consumer needs the cluster's meta leader, elected for seconds after a node
            # dies; any replica of RESULTS answers a direct get meanwhile (allow_direct). Not
            # for a native client: a direct get cannot be narrowed to its own results, so its
            # permissions leave it out.
            if self.user is not None:
                raise
            return await self._direct_history(job_id)
        out: list[Received] = []
        try:
            while True:
                try:
                    msgs = await psub.fetch(256, timeout=timeout_s)
                except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
                    break
                out.extend(parse_result(m) for m in msgs)
                if msgs[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await psub.unsubscribe()
        return out

    async def _direct_history(self, job_id: str, limit: int = 10_000) -> list[Received]:
        """The job's events by direct gets, one message at a time (no consumer needed)."""
        out: list[Received] = []
        seq = 1
        while len(out) < limit:
            try:
                msg = await self.js.get_msg(
                    RESULTS_STREAM, seq, subject=results_subject(job_id), direct=True, next=True
                )
            except (nats.js.errors.NotFoundError, nats.errors.Error):
                break  # no more (or nothing answers at all: what we have is all there is)
            with contextlib.suppress(ValueError):  # a malformed event is skipped, as live
                out.append(received_from(msg.headers, msg.data))
            seq = (msg.seq or seq) + 1
        return out

    async def recover(self) -> None:
        """After a reconnect: each followed job catches up from RESULTS (in the background)."""
        for stream in list(self.open):
            if not stream.finished:
                task = asyncio.create_task(_logged(stream.recover(), stream.job_id))
                self._recovering.add(task)
                task.add_done_callback(self._recovering.discard)

    async def queued(self, job_id: str, seq: int) -> bool:
        """True while the job's message is still in JOBS (waiting, or held by a worker)."""
        try:
            msg = await self.js.get_msg(JOBS_STREAM, seq)
        except nats.js.errors.NotFoundError:
            return False
        return (msg.headers or {}).get(Header.MSG_ID) == job_id


async def _logged(recovery: Coroutine[Any, Any, None], job_id: str) -> None:
    """Run a stream's recovery; a failure is logged (the stream's deadline still holds)."""
    try:
        await recovery
    except (nats.errors.Error, TimeoutError) as e:
        log.warning("job %s: catching up after a reconnect failed (%s)", job_id, type(e).__name__)


@dataclass(frozen=True, slots=True)
class Placed:
    """How a job was published, so it can be published again if the broker loses it."""

    job: AnyJob
    reply: str
    headers: dict[str, str]
    seq: int  # its sequence in JOBS


class Lost:
    """Queued for a job whose results cannot be recovered: its stream raises Unavailable."""


LOST = Lost()


class JobStream:
    """The ordered events of one job: duplicates dropped, gaps filled from RESULTS."""

    def __init__(
        self,
        client: JobClient,
        job_id: str,
        sub: Subscription,
        queue: asyncio.Queue[Received | Lost],
        deadline_ms: int | None,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.deadline_ms = deadline_ms
        self.pos = START
        self.finished = False
        self.placed: Placed | None = None  # set by JobClient.submit
        self._sub = sub
        self._queue = queue
        self._ready: deque[Received] = deque()
        self._heard = 0  # events received, live or recovered (recover() watches it move)

    async def __aenter__(self) -> JobStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Received]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Received]:
        while not self.finished:
            received = await self.next()
            if received is not None:
                yield received

    async def next(self, timeout_s: float | None = None) -> Received | None:
        """The next event in order; None when ``timeout_s`` passes first.

        Raises DeadlineExceeded when the job's deadline passes while waiting.
        """
        while not self._ready:
            item = await self._get(timeout_s)
            if item is None:
                return None
            if isinstance(item, Lost):
                self.finished = True
                raise Unavailable(
                    "the broker lost this job's results (it restarted without its state); "
                    "retry the request"
                )
            self._heard += 1
            await self._accept(item)
        received = self._ready.popleft()
        self.pos = received.pos
        self.finished = received.final
        return received

    async def _get(self, timeout_s: float | None) -> Received | Lost | None:
        wait = timeout_s
        if self.deadline_ms is not None:
            left = self.deadline_ms / 1000 - time.time()
            if left <= 0:
                raise DeadlineExceeded("the job's deadline passed")
            wait = left if wait is None else min(wait, left)
        if not self._queue.empty() or wait is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout(wait):
                return await self._queue.get()
        except TimeoutError:
            if timeout_s is None or wait < timeout_s:
                raise DeadlineExceeded("the job's deadline passed") from None
            return None

    async def _accept(self, received: Received) -> None:
        last = self._ready[-1].pos if self._ready else self.pos
        if received.pos <= last:
            return  # a duplicate, or a straggler from a superseded attempt
        expected = Position(last.attempt, last.seq + 1)
        if received.pos.attempt != last.attempt:
            expected = Position(received.pos.attempt, 1)
        if received.pos != expected:
            await self._fill(last, received.pos)
        self._ready.append(received)

    async def _fill(self, after: Position, before: Position) -> None:
        """Fetch the events strictly between two positions from RESULTS (missed core messages).

        Only the attempt of ``before`` must be complete: an earlier attempt may have ended
        early (its worker died). A gap RESULTS cannot fill fails the stream: a text with a
        hole in it must not pass for a whole answer.
        """
        first = after.seq + 1 if after.attempt == before.attempt else 1
        needed = {Position(before.attempt, seq) for seq in range(first, before.seq)}
        # RESULTS stores what it captures a moment after the live delivery; and when a stream
        # leader is being elected (seconds), the worker stores the events again before its
        # final one (workers.emitter): worth waiting for, up to FILL_TIMEOUT_S.
        deadline = time.monotonic() + FILL_TIMEOUT_S
        delay = 0.02
        while True:
            history = await self.client.history(self.job_id)
            found = {r.pos: r for r in history if after < r.pos < before}  # copies: once
            if needed <= found.keys():
                self._ready.extend(found[pos] for pos in sorted(found))
                return
            if time.monotonic() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        log.warning("job %s: events between %s and %s are lost", self.job_id, after, before)
        raise Unavailable("some of this job's results were lost; retry the request")

    async def recover(self) -> None:
        """Catch up from RESULTS after a reconnect; a job the broker lost is published again
        (no worker took it) or fails its stream (it ran, and its results are gone)."""
        history = await self.client.history(self.job_id)
        for received in history:
            self._queue.put_nowait(received)  # what was already seen is dropped as a duplicate
        placed = self.placed
        if self.finished or placed is None or any(r.final for r in history):
            return
        if self.client.user is not None:
            # A native client may not read JOBS (every job's prompt is there): it cannot tell
            # a lost job from a queued one, and its deadline bounds the wait instead.
            return
        if await self.client.queued(self.job_id, placed.seq):
            return  # waiting for a worker, or running: its events will come
        heard = self._heard
        if not history and heard == 0 and self._queue.empty():
            log.warning(
                "job %s: the broker lost it before it ran; publishing it again", self.job_id
            )
            ack = await self.client.publish(placed.job, reply=placed.reply, headers=placed.headers)
            self.placed = Placed(placed.job, placed.reply, placed.headers, ack.seq)
            return
        # It ran, and the broker no longer holds it: a worker may still be finishing it (its
        # results flow live), so give it a while before calling it lost.
        while True:
            await asyncio.sleep(self.client.silence_s)
            if self.finished:
                return
            if self._heard == heard and self._queue.empty():
                log.warning("job %s: its results were lost with the broker's state", self.job_id)
                self._queue.put_nowait(LOST)
                return
            heard = self._heard

    async def replay_after(self, after: Position) -> None:
        """Queue every stored event after ``after``, for a client resuming a stream."""
        self.pos = after
        # By position, once each: a worker that reconnected publishes its events again.
        stored = {r.pos: r for r in await self.client.history(self.job_id)}
        for pos in sorted(stored):
            if pos > after:
                self._ready.append(stored[pos])
                if stored[pos].final:
                    break
        # Live events arriving meanwhile are dropped by _accept when already queued here.

    async def cancel(self) -> None:
        """Cancel the job this stream follows."""
        await self.client.cancel(self.job_id)

    async def close(self) -> None:
        """Stop following the job (it keeps running unless cancelled)."""
        self.client.open.discard(self)
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()
