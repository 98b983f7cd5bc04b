"""grpcs:// with server TLS and mutual TLS, against a throwaway PKI made per test."""

from __future__ import annotations

import asyncio
import subprocess
import sys
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


def _tls_cases(certs: Certs) -> dict[str, tuple[sigwire.TlsClientConfig, str]]:
    """Client TLS settings that fail against an mTLS server, and what the error must say."""
    return {
        "unrelated CA": (
            sigwire.TlsClientConfig(
                ca_file=certs.other_ca, cert_file=certs.client_cert, key_file=certs.client_key
            ),
            "the server's certificate is not trusted (unable to get local issuer certificate)",
        ),
        "another name": (
            sigwire.TlsClientConfig(
                ca_file=certs.ca,
                cert_file=certs.client_cert,
                key_file=certs.client_key,
                server_name="example.com",
            ),
            "the server's certificate is not trusted (Hostname mismatch",
        ),
        "no client certificate": (
            sigwire.TlsClientConfig(ca_file=certs.ca),
            "the server requires a client certificate",
        ),
        "a server certificate as client certificate": (
            sigwire.TlsClientConfig(
                ca_file=certs.ca, cert_file=certs.server_cert, key_file=certs.server_key
            ),
            f"the server refused the client certificate {certs.server_cert}",
        ),
        "a key of another certificate": (
            sigwire.TlsClientConfig(
                ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.server_key
            ),
            f"client certificate {certs.client_cert} with key {certs.server_key}: "
            "the key does not match the certificate",
        ),
        "a CA file without a certificate": (
            sigwire.TlsClientConfig(ca_file=certs.server_key),
            f"CA file {certs.server_key}: no PEM certificate in it",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unrelated CA",
        "another name",
        "no client certificate",
        "a server certificate as client certificate",
        "a key of another certificate",
        "a CA file without a certificate",
    ],
)
async def test_grpcs_failures_say_what_failed(
    make_server: MakeServer, certs: Certs, case: str
) -> None:
    """A failed grpcs:// connection names the TLS problem and what to give, as wss:// does."""
    server = await make_server(
        tls=sigwire.TlsServerConfig(
            cert_file=certs.server_cert, key_file=certs.server_key, client_ca_file=certs.ca
        )
    )
    tls, expected = _tls_cases(certs)[case]
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect(server.urls[0], tls=tls, connect_timeout=TIMEOUT / 2)
    [(url, error)] = caught.value.attempts
    assert isinstance(error, sigwire.ConnectError), repr(error)
    assert str(error).startswith(f"{url}: {expected}"), str(error)
    assert server.connected() == []


async def test_grpcs_to_a_plaintext_port_says_so(make_server: MakeServer, certs: Certs) -> None:
    """grpcs:// to a plaintext gRPC port says the server does not speak TLS there."""
    server = await make_server()
    url = server.urls[0].replace("grpc://", "grpcs://")
    tls = sigwire.TlsClientConfig(ca_file=certs.ca)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect(url, tls=tls, connect_timeout=TIMEOUT / 2)
    assert "the server does not speak TLS on this port" in str(caught.value)


def test_a_client_certificate_without_its_key_is_refused_not_aborted(
    certs: Certs, tmp_path: Path
) -> None:
    """cert_file without key_file is a ConnectError; grpc itself would abort the process."""
    # In a child process: without the check, grpc's failed CHECK kills it (SIGABRT).
    script = tmp_path / "client.py"
    script.write_text(
        "import asyncio, sys, sigwire\n"
        "tls = sigwire.TlsClientConfig(ca_file=sys.argv[1], cert_file=sys.argv[2])\n"
        "async def main():\n"
        "    try:\n"
        "        await sigwire.connect('grpcs://127.0.0.1:1', tls=tls, connect_timeout=1)\n"
        "    except sigwire.NoTransportAvailableError as exc:\n"
        "        print(exc)\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, str(script), certs.ca, certs.client_cert],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a client certificate needs its key" in result.stdout
