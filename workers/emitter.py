"""Publishes one job attempt's result events with their sequence headers."""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from schemas.codec import encode
from schemas.events import Done, Error
from schemas.subjects import RESULTS_PREFIX, Header

log = logging.getLogger(__name__)

# How long a final event may wait for the broker (a restart, a leader election) before the
# attempt gives up; the job is then not acked and comes back after ack_wait.
STORE_TIMEOUT_S = 30.0


class Emitter:
    """Sends events of one attempt to the job's reply subject, numbered 1, 2, 3 ...

    Deltas and progress go out on core NATS (the RESULTS stream captures them). The final
    ``done`` or ``error`` is published through JetStream and waits for RESULTS to store
    it: the runtime acks the job only after that, so a job is never acked while its
    results could still be lost. On one connection the server handles messages in order,
    so the stored final event also means every event before it reached the server.

    Until then the attempt's events are kept: a core message written just before the
    server went down can be lost, so after a reconnection ``resend`` publishes them all
    again, and followers (``schemas.client.JobStream``) drop the copies they already have.
    """

    def __init__(
        self, nc: NATS, job_id: str, reply: str, attempt: int, owner: str | None = None
    ) -> None:
        self.nc = nc
        self.reply = reply
        self.seq = 0
        self._sent: list[tuple[bytes, dict[str, str]]] = []  # until the final one is stored
        self._headers: dict[str, str] = {Header.JOB: job_id, Header.ATTEMPT: str(attempt)}
        if owner:
            # Echoed so that any edge can check who may replay the job's events.
            self._headers[Header.OWNER] = owner

    async def emit(self, event: BaseModel) -> None:
        """Publish one event; a final one is confirmed stored before this returns."""
        self.seq += 1
        headers = {**self._headers, Header.SEQ: str(self.seq)}
        data = encode(event)
        if isinstance(event, Done | Error):
            await self._store(data, headers)
            self._sent.clear()
        else:
            self._sent.append((data, headers))
            await self.nc.publish(self.reply, data, headers=headers)

    async def resend(self) -> None:
        """Publish every event of the attempt so far again (after a reconnection)."""
        for data, headers in list(self._sent):
            await self.nc.publish(self.reply, data, headers=headers)

    async def _store(self, data: bytes, headers: dict[str, str]) -> None:
        if not self.reply.startswith(f"{RESULTS_PREFIX}."):
            # A client's own reply subject, which no stream captures: delivered, not stored.
            await self.nc.publish(self.reply, data, headers=headers)
            await self.nc.flush()
            return
        js = self.nc.jetstream(timeout=2.0)
        deadline = time.monotonic() + STORE_TIMEOUT_S
        delay = 0.1
        while True:
            try:
                await js.publish(self.reply, data, headers=headers)
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.debug("the final event is not stored yet (%s); retrying", type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
