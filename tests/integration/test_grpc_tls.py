"""grpcs:// with server TLS and mutual TLS, against a throwaway PKI made per test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import sigwire
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeServer
from tests.integration.helpers import Certs, make_certs


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert, and an unrelated CA."""
    return make_certs(tmp_path)


async def test_tls_request(make_server: MakeServer, certs: Certs) -> None:
    """A client trusting the CA gets a signed reply over grpcs://."""
    server = await make_server(
        tls=sigwire.TlsServerConfig(cert_file=certs.server_cert, key_file=certs.server_key)
    )
    [url] = server.urls
    assert url.startswith("grpcs://127.0.0.1:")
    tls = sigwire.TlsClientConfig(ca_file=certs.ca)
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, tls=tls) as peer:
            reply = await peer.request("echo", b"secret")
            card = await peer.describe()
    assert reply.data == b"secret"
    assert reply.responder == server.identity.did
    assert card.endpoints == (url,)


async def test_tls_server_name_override(make_server: MakeServer, certs: Certs) -> None:
    """server_name checks the certificate against a DNS name of its SAN (localhost)."""
    server = await make_server(
        tls=sigwire.TlsServerConfig(cert_file=certs.server_cert, key_file=certs.server_key)
    )
    tls = sigwire.TlsClientConfig(ca_file=certs.ca, server_name="localhost")
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], tls=tls) as peer:
            assert (await peer.request("echo", b"named")).data == b"named"


@pytest.mark.parametrize("ca", ["system roots", "unrelated CA"])
async def test_tls_client_not_trusting_the_ca_cannot_connect(
    make_server: MakeServer, certs: Certs, ca: str
) -> None:
    """A client that does not trust the server's CA fails to connect within connect_timeout."""
    server = await make_server(
        tls=sigwire.TlsServerConfig(cert_file=certs.server_cert, key_file=certs.server_key)
    )
    tls = sigwire.TlsClientConfig(ca_file=certs.other_ca if ca == "unrelated CA" else None)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect(server.urls[0], tls=tls, connect_timeout=1)
    [(url, error)] = caught.value.attempts
    assert url == server.urls[0]
    assert isinstance(error, sigwire.ConnectError)
    assert server.connected() == []


async def test_mutual_tls_with_a_client_certificate(make_server: MakeServer, certs: Certs) -> None:
    """With client_ca_file set, a client presenting a CA-signed certificate is served."""
    server = await make_server(
        tls=sigwire.TlsServerConfig(
            cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca
        )
    )
    tls = sigwire.TlsClientConfig(
        ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key
    )
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], tls=tls) as peer:
            reply = await peer.request("echo", b"mutual")
    assert reply.data == b"mutual"


async def test_mutual_tls_without_a_client_certificate(
    make_server: MakeServer, certs: Certs
) -> None:
    """With client_ca_file set, a client presenting no certificate cannot connect."""
    server = await make_server(
        tls=sigwire.TlsServerConfig(
            cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca
        )
    )
    tls = sigwire.TlsClientConfig(ca_file=certs.ca)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect(server.urls[0], tls=tls, connect_timeout=1)
    [(_, error)] = caught.value.attempts
    assert isinstance(error, sigwire.ConnectError), repr(error)
    assert server.connected() == []
