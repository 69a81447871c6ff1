"""Publishes one job attempt's result events with their sequence headers."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from pydantic import BaseModel

from schemas.codec import encode
from schemas.subjects import Header


class Emitter:
    """Sends events of one attempt to the job's reply subject, numbered 1, 2, 3 ..."""

    def __init__(
        self, nc: NATS, job_id: str, reply: str, attempt: int, owner: str | None = None
    ) -> None:
        self.nc = nc
        self.reply = reply
        self.seq = 0
        self._headers: dict[str, str] = {Header.JOB: job_id, Header.ATTEMPT: str(attempt)}
        if owner:
            # Echoed so that any edge can check who may replay the job's events.
            self._headers[Header.OWNER] = owner

    async def emit(self, event: BaseModel) -> None:
        """Publish on core NATS; the RESULTS stream captures it for replay."""
        self.seq += 1
        await self.nc.publish(
            self.reply, encode(event), headers={**self._headers, Header.SEQ: str(self.seq)}
        )
