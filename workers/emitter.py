"""Publishes one job attempt's result events with their sequence headers."""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import PubAck
from pydantic import BaseModel

from schemas.codec import encode
from schemas.events import Delta, Done, Error
from schemas.subjects import RESULTS_PREFIX, Header

log = logging.getLogger(__name__)

# How long a final event may wait for the broker (a restart, a leader election) before the
# attempt gives up; the job is then not acked and comes back after ack_wait.
STORE_TIMEOUT_S = 30.0
# How long the events before the final one may take to be confirmed before they are sent again.
CONFIRM_WAIT_S = 2.0

_NOT_STORED = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,  # nats-py's word for no responders on a publish
    nats.js.errors.ServiceUnavailableError,
)

Sent = tuple[bytes, dict[str, str], "asyncio.Future[PubAck] | None"]


class Emitter:
    """Sends events of one attempt to the job's reply subject, numbered 1, 2, 3 ...

    Every event goes out at once (followers get it live) and RESULTS confirms storing it
    in the background (a pipelined JetStream publish). Before the final ``done`` or
    ``error``, the events not confirmed (a node died, a stream leader was being elected)
    are published again until stored, then the final one is stored: the runtime acks the
    job only after that, so a job is never acked while any of its results could be lost.

    The attempt's events are also published again after a reconnection (``resend``), so
    followers that missed them live get them without waiting for RESULTS; followers
    (``schemas.client.JobStream``) drop the copies they already have.
    """

    def __init__(
        self, nc: NATS, job_id: str, reply: str, attempt: int, owner: str | None = None
    ) -> None:
        self.nc = nc
        self.reply = reply
        self.seq = 0
        self.js = nc.jetstream(timeout=2.0)
        self._stored = reply.startswith(f"{RESULTS_PREFIX}.")  # a client's own subject is not
        self._sent: list[Sent] = []  # until the final event is stored
        self.tokens = 0  # delivered by this attempt
        self._headers: dict[str, str] = {Header.JOB: job_id, Header.ATTEMPT: str(attempt)}
        if owner:
            # Echoed so that any edge can check who may replay the job's events.
            self._headers[Header.OWNER] = owner

    async def emit(self, event: BaseModel) -> None:
        """Publish one event; a final one returns once it and all before it are stored."""
        self.seq += 1
        headers = {**self._headers, Header.SEQ: str(self.seq)}
        data = encode(event)
        if isinstance(event, Delta):
            self.tokens += event.tokens
        if not isinstance(event, Done | Error):
            ack = None
            if self._stored:
                ack = await self.js.publish_async(self.reply, data, headers=headers)
            else:
                await self.nc.publish(self.reply, data, headers=headers)
            self._sent.append((data, headers, ack))
            return
        if not self._stored:  # delivered, not stored: flush so it leaves before the ack
            await self.nc.publish(self.reply, data, headers=headers)
            await self.nc.flush()
            return
        await self._confirm_sent()
        await self._store(data, headers)
        self._sent.clear()

    async def confirm(self) -> None:
        """Return once every event sent so far is stored (before a hand-over)."""
        if self._stored:
            await self._confirm_sent()

    def close(self) -> None:
        """Stop waiting for confirmations (the attempt is over): an unanswered one would hold
        one of the connection's pending-publish permits for good."""
        for _, _, ack in self._sent:
            if ack is not None and not ack.done():
                ack.cancel()
        self._sent.clear()

    async def resend(self) -> None:
        """Publish every event of the attempt so far again (after a reconnection)."""
        for data, headers, _ in list(self._sent):
            await self.nc.publish(self.reply, data, headers=headers)

    async def _confirm_sent(self) -> None:
        """Wait for the stores of the events sent so far; store again those not confirmed."""
        acks = [ack for _, _, ack in self._sent if ack is not None]
        if acks:
            await asyncio.wait(acks, timeout=CONFIRM_WAIT_S)
        for data, headers, ack in self._sent:
            if ack is None:
                continue
            if not ack.done():
                ack.cancel()
            if ack.cancelled() or ack.exception() is not None:
                await self._store(data, headers)

    async def _store(self, data: bytes, headers: dict[str, str]) -> None:
        """Publish through JetStream until RESULTS confirms it (bounded by STORE_TIMEOUT_S)."""
        deadline = time.monotonic() + STORE_TIMEOUT_S
        delay = 0.1
        while True:
            try:
                await self.js.publish(self.reply, data, headers=headers)
                return
            except _NOT_STORED as e:
                if time.monotonic() + delay > deadline:
                    raise nats.errors.TimeoutError from e
                log.debug("a result event is not stored yet (%s); retrying", type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
