"""Connecting a headrace process to NATS: one place for servers, credentials, TLS, reconnects.

Every process (edge, worker, ``headrace status``/``provision``) connects through
``connect``, so what a connection needs (several server URLs, credentials, TLS)
is added once. ``on_reconnect`` runs after each reconnection: a restarted or
replaced server may lack the topology the process relies on, and the process
checks it then (``schemas.topology.ensure_present``).

A refused credential or a TLS failure is not transient: the first connection raises
``NatsRefused`` after one error line naming the user and the server, instead of
retrying (a worker waits for an unreachable server, never for a wrong password).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from schemas.settings import CommonSettings
from schemas.subjects import inbox_prefix

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]


class NatsRefused(Exception):
    """The server refused this process's credentials or TLS: retrying cannot help."""


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
    start before NATS); without it an unreachable NATS raises at once. Raises
    ``NatsRefused`` when a server refuses the credentials or the TLS handshake fails.
    """
    delay = 0.1
    while True:
        nc = NATS()
        watch = _Refusals(nc, settings.nats_user)
        try:
            options: dict[str, Any] = {
                "reconnect_time_wait": 0.5,  # nats-py types these int; it takes seconds as float
                "connect_timeout": connect_timeout_s,
                **credentials(settings),
            }
            await nc.connect(
                servers=settings.nats_servers(),
                name=name,
                max_reconnect_attempts=-1,
                error_cb=watch.error,
                reconnected_cb=_logged("reconnected", watch.reset, on_reconnect),
                disconnected_cb=_logged("disconnected", None, on_disconnect),
                **options,
            )
            watch.connected = True
            return nc
        except NatsRefused:
            await _close_quietly(nc)
            raise
        except (nats.errors.NoServersError, OSError, TimeoutError) as e:
            await _close_quietly(nc)
            if not wait:
                raise
            log.warning("NATS not reachable (%s); retrying in %.1f s", type(e).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def credentials(settings: CommonSettings) -> dict[str, Any]:
    """The ``nats.connect`` options that authenticate and encrypt, from the settings."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        # A user's permissions allow only its own inboxes (schemas/permissions.py).
        options["inbox_prefix"] = inbox_prefix(settings.nats_user)
    if settings.nats_password is not None:
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_tls_ca or settings.nats_tls_cert:
        tls = ssl.create_default_context(
            cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None
        )
        if settings.nats_tls_cert and settings.nats_tls_key:
            tls.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
        options["tls"] = tls
    return options


class _Refusals:
    """The error callback: tells refusals (credentials, TLS) from transient failures."""

    def __init__(self, nc: NATS, user: str | None) -> None:
        self.nc = nc
        self.user = user
        self.connected = False
        self._logged = False

    def _server(self) -> str:
        # nats-py names the server it is trying only in this private attribute.
        current = getattr(self.nc, "_current_server", None)
        uri = getattr(current, "uri", None)
        return uri.geturl() if uri is not None else "the NATS server"

    async def error(self, e: Exception) -> None:
        refusal = _refusal(e)
        if refusal is None:
            log.warning("NATS: %s", type(e).__name__)
            return
        who = f"user {self.user!r}" if self.user else "an anonymous connection"
        if not self.connected:
            log.error("%s refused %s: %s", self._server(), who, refusal)
            raise NatsRefused(f"{self._server()} refused {who}: {refusal}")
        if not self._logged:  # reconnecting: say it once, not every half second
            log.error("%s refuses %s while reconnecting: %s", self._server(), who, refusal)
            self._logged = True

    async def reset(self) -> None:
        self._logged = False


def _refusal(e: Exception) -> str | None:
    """Why the server refused us, when it did (None for a transient failure)."""
    if isinstance(e, ssl.SSLError):
        return f"TLS failed ({e.reason or type(e).__name__})"
    text = str(e).lower()
    if isinstance(e, nats.errors.AuthorizationError) or "authorization violation" in text:
        return "authorization violation (wrong or missing user or password)"
    if "tls" in text and "required" in text:
        return "the server requires TLS (set nats_tls_ca)"
    return None


async def _close_quietly(nc: NATS) -> None:
    try:
        # Bounded: after a failed TLS handshake nats-py's close waits for a transport that
        # never reports closed.
        async with asyncio.timeout(1.0):
            await nc.close()
    except Exception as e:  # a half-open client may fail to close; nothing is left to save
        log.debug("closing a failed NATS connection: %s", type(e).__name__)


def _logged(what: str, first: Callback | None, then: Callback | None) -> Callback:
    async def callback() -> None:
        log.info("NATS %s", what)
        if first is not None:
            await first()
        if then is not None:
            try:
                await then()
            except Exception as e:  # a callback must not take the client's reconnect loop down
                log.warning("after NATS %s: %s", what, type(e).__name__)

    return callback
