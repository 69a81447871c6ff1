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
from typing import Any, NamedTuple, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from schemas import failover
from schemas.codec import decode_event, decode_job, encode
from schemas.errors import DeadlineExceeded, Poison, QueueFull, Unavailable
from schemas.events import Done, Error, Started
from schemas.jobs import AnyJob, TextJob
from schemas.subjects import (
    Header,
    alive_subject,
    cancel_subject,
    epoch_of,
    job_subject,
    jobs_stream,
    queue_kind,
    results_stream,
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

    A job whose worker is lost while it runs (``missed_beats`` of its beats missed) is
    handed over by whoever follows it: published again as a continuation of what was
    delivered, the stream going on without a repeated or a missing character
    (``schemas.failover``). ``hand_over=False`` leaves that to the others following it
    (or, with none, to JetStream's redelivery after ``ack_wait``).

    In a super-cluster a continuation goes to the queue of the region the job was in, or
    where ``placer`` (the edge's ``edge.placement``) says when that region is lost.
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
        region: str | None = None,
        missed_beats: int = failover.MISSED_BEATS,
        max_handovers: int = failover.MAX_HANDOVERS,
        hand_over: bool = True,
        placer: Placer | None = None,
    ) -> None:
        self.nc = nc
        self.missed_beats = missed_beats
        self.max_handovers = max_handovers
        self.hand_over = hand_over
        self.handovers = 0  # continuations this client published (a duplicate counts too)
        # A native client's NATS user: its jobs reply on results.<user>.<job id>, the only
        # results its permissions let it read (schemas/permissions.py). None: results.<job id>.
        self.user = user
        # In a super-cluster, the region this client submits from: its results are captured
        # by RESULTS_<region> (results.<region>...), and jobs go to its queue unless placed
        # elsewhere (``submit(place=)``). None: one region, JOBS and RESULTS.
        self.region = region
        self.results_stream = results_stream(region)
        self.placer = placer
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
        place: str | None = None,
        attempts: int | None = None,
    ) -> JobStream:
        """Subscribe to the job's reply subject, then publish the job; returns its event stream.

        ``place``: the region whose queue takes the job (a super-cluster; default this
        client's region); ``attempts``: as ``publish``'s.
        """
        reply = reply or self.reply_subject(job.id)
        stream = await self.watch(job.id, reply=reply, deadline_ms=job.deadline_ms)
        region = place or self.region
        try:
            ack = await self.publish(
                job, reply=reply, headers=headers, place=region, attempts=attempts
            )
        except BaseException:
            await stream.close()
            raise
        stream.placed = Placed(job, reply, headers or {}, ack.seq, region)
        return stream

    def reply_subject(self, job_id: str) -> str:
        """Where this client's jobs reply (``schemas.subjects.results_subject``)."""
        return results_subject(job_id, self.user, self.region)

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
        queue: asyncio.Queue[Received | Lost | Wake] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            try:
                queue.put_nowait(parse_result(msg))
            except ValueError:
                log.warning("job %s: dropped a malformed result event", job_id)

        following: list[JobStream] = []

        async def beat(msg: Msg) -> None:
            if following:
                h = msg.headers or {}
                following[0].heard(h.get(Header.ATTEMPT), leaving=Header.LEAVING in h)

        reply = reply or self.reply_subject(job_id)
        sub = await self.nc.subscribe(reply, cb=deliver)
        alive = await self.nc.subscribe(alive_subject(reply), cb=beat)
        # Interest must reach the server before the job can produce anything.
        try:
            await self.nc.flush()
        except (nats.errors.Error, TimeoutError) as e:  # between two servers (a reconnect)
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
                await alive.unsubscribe()
            raise Unavailable("NATS did not confirm the subscription in time; retry") from e
        stream = JobStream(self, job_id, sub, queue, deadline_ms, alive=alive)
        following.append(stream)
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
        place: str | None = None,
        attempts: int | None = None,
    ) -> PubAck:
        """Publish a job idempotently (``Nats-Msg-Id``), retrying while JetStream is unreachable.

        ``place``: the region whose queue takes it (default this client's); ``attempts``
        bounds the retries (default ``publish_attempts``).
        """
        hdrs = {
            **(headers or {}),
            Header.MSG_ID: job.id,
            Header.REPLY: reply or self.reply_subject(job.id),
        }
        if job.deadline_ms is not None:
            hdrs[Header.DEADLINE] = str(job.deadline_ms)
        region = place or self.region
        subject = job_subject(queue_kind(job.kind), job.model, region)
        stream = jobs_stream(region)
        payload = encode(job)
        delay = self.backoff_s
        tries = attempts or self.publish_attempts
        for attempt in range(1, tries + 1):
            try:
                return await self.js.publish(subject, payload, stream=stream, headers=hdrs)
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
                if attempt == tries:
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
                self.reply_subject(job_id), stream=self.results_stream, config=config
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
                    self.results_stream,
                    seq,
                    subject=self.reply_subject(job_id),
                    direct=True,
                    next=True,
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

    async def stored_job(
        self, seq: int, region: str | None = None
    ) -> tuple[AnyJob, dict[str, str]] | None:
        """A job message in JOBS (of ``region``, default this client's) by sequence, with its
        headers (None when gone or not a job); a native client may not read JOBS and gets None."""
        if self.user is not None:
            return None
        try:
            msg = await self.js.get_msg(jobs_stream(region or self.region), seq)
            return decode_job(msg.data or b""), dict(msg.headers or {})
        except (nats.errors.Error, Poison):
            return None

    async def queued(self, job_id: str, seq: int, region: str | None = None) -> bool:
        """True while the job's message is still in JOBS (of the region it was placed in:
        waiting, or held by a worker)."""
        try:
            msg = await self.js.get_msg(jobs_stream(region or self.region), seq)
        except nats.js.errors.NotFoundError:
            return False
        msg_id = (msg.headers or {}).get(Header.MSG_ID) or ""
        return msg_id == job_id or msg_id.startswith(f"{job_id}.")  # or a continuation


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
    region: str | None = None  # whose queue holds it (a super-cluster)


class Placer(Protocol):
    """Where a super-cluster's continuations go (``edge.placement.Placement``)."""

    def continue_in(self, job: AnyJob, region: str | None) -> str | None:
        """The region whose queue takes a continuation of ``job``, last placed in ``region``."""

    def unreachable(self, region: str) -> None:
        """A publish to ``region`` found no JetStream there."""

    def moved(self, job: AnyJob, source: Placed, target: str | None) -> None:
        """A continuation of the job went to ``target``, away from ``source`` (its old copy)."""


class Lost:
    """Queued for a job whose results cannot be recovered: its stream raises Unavailable."""


LOST = Lost()


class Wake:
    """Queued when the running attempt's worker says it is leaving: hand the job over now."""


WAKE = Wake()


class JobStream:
    """The ordered events of one job: duplicates dropped, gaps filled from RESULTS, its
    attempts stitched into one sequence, and the job handed over when its worker is lost."""

    def __init__(
        self,
        client: JobClient,
        job_id: str,
        sub: Subscription,
        queue: asyncio.Queue[Received | Lost | Wake],
        deadline_ms: int | None,
        *,
        alive: Subscription | None = None,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.reply = sub.subject
        self.deadline_ms = deadline_ms
        self.pos = START
        self.finished = False
        self.placed: Placed | None = None  # set by JobClient.submit
        self.handovers = 0  # continuations this stream published
        self._sub = sub
        self._alive = alive
        self._queue = queue
        self._ready: deque[Received] = deque()
        self._last = START  # the last event accepted (in _ready or passed on)
        self._heard = 0  # events received, live or recovered (recover() watches it move)
        self._stitch = failover.Stitcher()
        self._running: int | None = None  # the attempt that started and has not ended
        self._beat_s: float | None = None  # its worker's beat period
        self._heard_at = time.monotonic()  # its last event or beat
        self._job_seq: int | None = None  # its message in JOBS
        self._job_region: str | None = None  # whose JOBS (a super-cluster)
        self._tried = 0  # the last epoch this stream published a continuation in
        self._handing_over = asyncio.Lock()
        self._floor = 0  # events of epochs below this one are dropped: handed over
        self._leaving = False  # the running attempt's worker stopped (SIGTERM)

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

    @property
    def delivered(self) -> failover.Stitcher:
        """What the stream has passed on or queued: text, tokens and their ids."""
        return self._stitch

    def heard(self, attempt: str | None, *, leaving: bool = False) -> None:
        """A beat of the worker running ``attempt`` (from the alive subject); ``leaving``:
        its last, the worker stopped and every event it sent is stored."""
        if attempt is not None and attempt.isdigit() and int(attempt) == self._running:
            self._heard_at = time.monotonic()
            if leaving and not self._leaving:
                self._leaving = True
                self._queue.put_nowait(WAKE)

    async def next(self, timeout_s: float | None = None) -> Received | None:
        """The next event in order; None when ``timeout_s`` passes first.

        Raises DeadlineExceeded when the job's deadline passes while waiting.
        """
        until = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._ready:
            item = await self._get(until)
            if item is None or isinstance(item, Wake):
                if until is not None and time.monotonic() >= until:
                    return None
                continue  # its worker was checked on (see _check_lost)
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

    async def _get(self, until: float | None) -> Received | Lost | Wake | None:
        """The next queued item; None when ``until`` passes or the worker was checked on."""
        now = time.monotonic()
        wait = None if until is None else max(0.0, until - now)
        if self.deadline_ms is not None:
            left = self.deadline_ms / 1000 - time.time()
            if left <= 0:
                raise DeadlineExceeded("the job's deadline passed")
            wait = left if wait is None else min(wait, left)
        if not self._queue.empty():
            return self._queue.get_nowait()
        due = self._lost_in(now)
        if due is not None and due <= 0:
            await self._check_lost()
            return None
        if due is not None:
            wait = due if wait is None else min(wait, due)
        if wait is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout(wait):
                return await self._queue.get()
        except TimeoutError:
            if self.deadline_ms is not None and time.time() * 1000 >= self.deadline_ms:
                raise DeadlineExceeded("the job's deadline passed") from None
            return None

    def _lost_in(self, now: float) -> float | None:
        """Seconds until the running attempt counts as lost; None when nothing is watched."""
        if self._running is None or self._beat_s is None or not self.client.hand_over:
            return None
        if self._leaving:
            return 0.0
        return self._heard_at + self._beat_s * self.client.missed_beats - now

    async def _accept(self, received: Received) -> None:
        last = self._last
        if received.pos <= last or epoch_of(received.pos.attempt) < self._floor:
            return  # a duplicate, or a straggler from a superseded attempt
        expected = Position(last.attempt, last.seq + 1)
        if received.pos.attempt != last.attempt:
            expected = Position(received.pos.attempt, 1)
            after = _resumed_after(received.event)
            if after is not None and after.attempt == last.attempt and after > last:
                # A continuation of events this follower has not seen yet: those first.
                await self._fill(last, Position(after.attempt, after.seq + 1))
                last = self._last
        if received.pos != expected:
            await self._fill(last, received.pos)
        self._push(received)

    def _push(self, received: Received) -> None:
        """Stitch one event in order into the stream (attempts made one sequence)."""
        self._last = received.pos
        if received.pos.attempt == self._running:
            self._heard_at = time.monotonic()
        event = received.event
        if isinstance(event, Started):
            self._running, self._heard_at = received.pos.attempt, time.monotonic()
            self._leaving = False
            self._beat_s = event.beat_ms / 1000 if event.beat_ms else None
            if event.job_seq:
                self._job_seq = event.job_seq
                self._job_region = event.region if self.client.region is not None else None
        elif received.final and received.pos.attempt >= (self._running or 0):
            self._running = None
        out = self._stitch.take(received.pos.attempt, received.pos.seq, event)
        if out is None:
            return
        if out is not event:
            received = Received(received.pos, out, received.owner)
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
            history = _chained(await self.client.history(self.job_id))
            found = {r.pos: r for r in history if after < r.pos < before}  # copies: once
            if needed <= found.keys():
                for pos in sorted(found):
                    self._push(found[pos])
                return
            if time.monotonic() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        log.warning("job %s: events between %s and %s are lost", self.job_id, after, before)
        raise Unavailable("some of this job's results were lost; retry the request")

    async def _check_lost(self) -> None:
        """The running attempt went silent: unless our own connection is to blame or RESULTS
        holds events we missed, its worker is lost: hand the job over."""
        running = self._running
        try:
            await self.client.nc.flush(timeout=2)  # beats read off our socket first
        except (nats.errors.Error, TimeoutError):
            self._heard_at = time.monotonic()  # we are cut off: nobody can be judged
            return
        for _ in range(3):  # the subscriptions' callbacks run
            await asyncio.sleep(0)
        if self._running != running or (self._lost_in(time.monotonic()) or 0) > 0:
            return
        try:
            history = _chained(await self.client.history(self.job_id))
        except (nats.errors.Error, TimeoutError):
            self._heard_at = time.monotonic()
            return
        missed = [r for r in history if r.pos > self._last]
        if any(r.pos.attempt != running or r.final for r in missed):
            for r in missed:  # it ended, or went on elsewhere: nothing to hand over
                self._queue.put_nowait(r)
            return
        for r in missed:  # the last events before it went silent
            await self._accept(r)
        try:
            await self._hand_over()
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
            # JetStream did not take it now (an election): tried again after more silence.
            log.warning("job %s: handing it over failed (%s)", self.job_id, type(e).__name__)
            self._heard_at = time.monotonic()

    async def _hand_over(self) -> None:
        """Publish the job's continuation in the next epoch (once, whoever else follows it)."""
        running = self._running
        async with self._handing_over:
            if running is None or self._running != running:
                # Handed over meanwhile (a lost region's jobs, ``hand_over_from``), or left to
                # JetStream's redelivery: nothing runs here to hand over.
                return
            await self._continue(running)

    async def hand_over_from(self, region: str) -> bool:
        """In a super-cluster: continue the job elsewhere if it is still placed in ``region``
        (lost: ``edge.placement``), whether it waits there or runs. True when it was moved."""
        async with self._handing_over:
            placed = self.placed
            if self.finished or placed is None or placed.region != region:
                return False
            await self._continue(self._running, away_from=region)
            return self.placed is not None and self.placed.region != region

    async def _continue(self, running: int | None, *, away_from: str | None = None) -> None:
        if self.handovers >= self.client.max_handovers:
            self._running = None
            log.warning("job %s: its workers were lost %d times", self.job_id, self.handovers)
            raise Unavailable("the job's workers were lost again and again; retry the request")
        base = await self._base()
        if base is None:  # nothing to publish it from: JetStream redelivers it after ack_wait
            self._running = None
            return
        job, headers = base
        if isinstance(job, TextJob):
            job = job.model_copy(update={"resume": None})
        # The next epoch: after the running attempt's, and after one this stream tried to
        # publish and may have landed where it cannot run now (a lost region).
        epoch = max(epoch_of(running or self._last.attempt), self._floor, self._tried) + 1
        resume = self._stitch.resume() if isinstance(job, TextJob) else None
        placed = self.placed
        source = placed.region if placed is not None else self._job_region
        placer = self.client.placer
        region = placer.continue_in(job, source) if placer is not None else source
        if away_from is not None and region == away_from:
            return  # no live region takes it now: tried again later
        try:
            ack = await failover.hand_over(
                self.client.js,
                job,
                self.reply,
                headers,
                epoch=epoch,
                after=self._last.event_id(),
                resume=resume,
                region=region,
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            if region is not None:
                # It may have landed where it cannot run now: the next try takes the next
                # epoch (its fence stops this copy), and the placer places it elsewhere.
                self._tried = epoch
                if placer is not None:
                    placer.unreachable(region)
            raise
        self._floor = epoch  # whatever the lost attempt still sends is dropped from now on
        self.handovers += 1
        self.client.handovers += 1
        self._running = None  # until the continuation starts
        if placed is not None and (not ack.duplicate or region != placed.region):
            self.placed = Placed(placed.job, placed.reply, placed.headers, ack.seq, region)
            if placer is not None and region != placed.region:
                placer.moved(job, placed, region)
        log.info(
            "job %s: attempt %d went silent; continued in epoch %d from %d token(s)%s%s",
            self.job_id,
            running or 0,
            epoch,
            self._stitch.tokens,
            f" in region {region}" if region is not None else "",
            " (published by another follower)" if ack.duplicate else "",
        )

    async def _base(self) -> tuple[AnyJob, dict[str, str]] | None:
        """The job as published (parameters and headers): its submitter's copy, or JOBS's."""
        if self.placed is not None:
            return self.placed.job, self.placed.headers
        if self._job_seq is None:
            return None
        return await self.client.stored_job(self._job_seq, self._job_region)

    async def recover(self) -> None:
        """Catch up from RESULTS after a reconnect; a job the broker lost is published again
        (no worker took it) or fails its stream (it ran, and its results are gone)."""
        self._heard_at = time.monotonic()  # beats were missed while we were away
        history = _chained(await self.client.history(self.job_id))
        for received in history:
            self._queue.put_nowait(received)  # what was already seen is dropped as a duplicate
        placed = self.placed
        if self.finished or placed is None or any(r.final for r in history):
            return
        if self.client.user is not None:
            # A native client may not read JOBS (every job's prompt is there): it cannot tell
            # a lost job from a queued one, and its deadline bounds the wait instead.
            return
        if await self.client.queued(self.job_id, placed.seq, placed.region):
            return  # waiting for a worker, or running: its events will come
        heard = self._heard
        if not history and heard == 0 and self._queue.empty():
            log.warning(
                "job %s: the broker lost it before it ran; publishing it again", self.job_id
            )
            ack = await self.client.publish(
                placed.job, reply=placed.reply, headers=placed.headers, place=placed.region
            )
            self.placed = Placed(placed.job, placed.reply, placed.headers, ack.seq, placed.region)
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
        # By position, once each: a worker that reconnected publishes its events again.
        stored = {r.pos: r for r in _chained(await self.client.history(self.job_id))}
        for pos in sorted(stored):
            if pos <= after:  # what the client has: it places what comes next
                self._push(stored[pos])
                self._ready.clear()
                continue
            self._push(stored[pos])
            if stored[pos].final:
                break
        self.pos = after
        self._last = max(self._last, after)
        # Live events arriving meanwhile are dropped by _accept when already queued here.

    async def cancel(self) -> None:
        """Cancel the job this stream follows."""
        await self.client.cancel(self.job_id)

    async def close(self) -> None:
        """Stop following the job (it keeps running unless cancelled)."""
        self.client.open.discard(self)
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()
            if self._alive is not None:
                await self._alive.unsubscribe()


def _resumed_after(event: object) -> Position | None:
    """Where a continuation's ``started`` says it goes on from."""
    if isinstance(event, Started) and event.resumed_after:
        with contextlib.suppress(ValueError):
            return Position.parse(event.resumed_after)
    return None


def _chained(history: list[Received]) -> list[Received]:
    """A job's stored events without what superseded attempts sent after being taken over."""
    cut = failover.chain((r.pos.attempt, r.pos.seq, r.event) for r in history)
    return [r for r in history if (r.pos.attempt, r.pos.seq) not in cut] if cut else history
