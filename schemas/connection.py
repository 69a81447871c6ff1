"""Connecting a headrace process to NATS: one place for servers, reconnects and callbacks.

Every process (edge, worker, ``headrace status``/``provision``) connects through
``connect``, so what a connection needs (several server URLs, credentials, TLS)
is added once. ``on_reconnect`` runs after each reconnection: a restarted or
replaced server may lack the topology the process relies on, and the process
checks it then (``schemas.topology.ensure_present``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
import nats.errors
from nats.aio.client import Client as NATS

from schemas.settings import CommonSettings

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]


async def connect(
    settings: CommonSettings,
    name: str,
    *,
    wait: bool = False,
    connect_timeout_s: float = 2.0,
    on_reconnect: Callback | None = None,
    on_disconnect: Callback | None = None,
) -> NATS:
    """Connect to the configured servers and reconnect forever afterwards.

    With ``wait`` the first connection is retried until a server answers (a worker may
    start before NATS); without it an unreachable NATS raises at once.
    """
    delay = 0.1
    while True:
        try:
            return await nats.connect(
                servers=settings.nats_servers(),
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=connect_timeout_s,
                error_cb=_log_error,
                reconnected_cb=_logged("reconnected", on_reconnect),
                disconnected_cb=_logged("disconnected", on_disconnect),
            )
        except (nats.errors.NoServersError, OSError, TimeoutError) as e:
            if not wait:
                raise
            log.warning("NATS not reachable (%s); retrying in %.1f s", type(e).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _log_error(e: Exception) -> None:
    log.warning("NATS: %s", type(e).__name__)


def _logged(what: str, then: Callback | None) -> Callback:
    async def callback() -> None:
        log.info("NATS %s", what)
        if then is not None:
            try:
                await then()
            except Exception as e:  # a callback must not take the client's reconnect loop down
                log.warning("after NATS %s: %s", what, type(e).__name__)

    return callback
