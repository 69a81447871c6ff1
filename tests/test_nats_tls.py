"""TLS to NATS with a certificate the test makes: the CA verifies the server, mTLS the client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from headrace.credentials import Credentials
from schemas.connection import NatsRefused, connect
from schemas.settings import CommonSettings
from tests.conftest import AuthNatsServer


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_block(ca: trustme.CA, where: Path, *, verify_clients: bool) -> str:
    """nats-server's ``tls`` block with a certificate for 127.0.0.1 issued by ``ca``."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(where / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(where / "server.pem"))
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    lines = [f'cert_file: "{where / "server.pem"}"', f'key_file: "{where / "server.key"}"']
    if verify_clients:
        lines += [f'ca_file: "{where / "ca.pem"}"', "verify: true"]
    return "tls {\n  " + "\n  ".join(lines) + "\n}\n"


def start(tmp_path: Path, creds: Credentials, tls: str) -> AuthNatsServer:
    server = AuthNatsServer(tmp_path / "nats", creds, log_path=tmp_path / "nats.log")
    server.extra_conf = (server.extra_conf or "") + tls
    server.start()
    return server


@pytest.fixture
def tls_server(
    tmp_path: Path, ca: trustme.CA, nats_credentials: Credentials
) -> Iterator[AuthNatsServer]:
    server = start(tmp_path, nats_credentials, tls_block(ca, tmp_path, verify_clients=False))
    yield server
    server.stop()


async def test_a_client_with_the_ca_connects_and_one_without_it_is_refused(
    tls_server: AuthNatsServer, tmp_path: Path
) -> None:
    login = tls_server.login("edge")
    trusted = CommonSettings(nats_url=tls_server.url, nats_tls_ca=tmp_path / "ca.pem", **login)
    nc = await connect(trusted, "t")
    try:
        assert nc.connected_url is not None
        await nc.publish("cancel.x", b"")  # a permitted publish round-trips over TLS
        await nc.flush()
    finally:
        await nc.close()
    # The system's CAs do not know this one: the handshake fails, and it is not retried.
    untrusted = CommonSettings(nats_url=tls_server.url, **login)
    with pytest.raises(NatsRefused, match="TLS failed"):
        await connect(untrusted, "t", wait=True)


async def test_mutual_tls_needs_the_client_certificate(
    tmp_path: Path, ca: trustme.CA, nats_credentials: Credentials
) -> None:
    server = start(tmp_path, nats_credentials, tls_block(ca, tmp_path, verify_clients=True))
    try:
        client = ca.issue_cert("worker@headrace")
        client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
        client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
        login = {
            "nats_url": server.url,
            "nats_tls_ca": tmp_path / "ca.pem",
            **server.login("worker"),
        }
        with_cert = CommonSettings(
            nats_tls_cert=tmp_path / "client.pem", nats_tls_key=tmp_path / "client.key", **login
        )
        nc = await connect(with_cert, "t")
        await nc.close()
        with pytest.raises((NatsRefused, OSError)):
            await connect(CommonSettings(**login), "t", connect_timeout_s=1)
    finally:
        server.stop()
