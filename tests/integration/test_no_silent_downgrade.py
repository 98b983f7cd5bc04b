"""Plaintext is never chosen silently: served beyond loopback it is warned about, and a
client told to use TLS does not fall back to it unless allowed to."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import sigwire
from tests.conftest import TIMEOUT
from tests.integration.helpers import dead_socket, make_certs
from tests.servers import LOCAL, MakeServer


def _plaintext_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "sigwire.server"
        and record.levelno == logging.WARNING
        and "plaintext" in record.getMessage()
    ]


async def test_plaintext_beyond_loopback_is_warned_about(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Each plaintext listener on a non-loopback address logs a WARNING naming it."""
    caplog.set_level(logging.WARNING, logger="sigwire.server")
    server = await make_server(grpc="0.0.0.0:0", ws="0.0.0.0:0")
    warnings = _plaintext_warnings(caplog)
    assert len(warnings) == 2
    for url, warning in zip(server.urls, warnings, strict=True):
        assert warning.startswith(f"{url} serves plaintext beyond this host")
        assert "TLS" in warning


async def test_loopback_and_tls_listeners_are_not_warned_about(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Plaintext on 127.0.0.1 and TLS on 0.0.0.0 log no plaintext warning."""
    caplog.set_level(logging.WARNING, logger="sigwire.server")
    certs = make_certs(tmp_path)
    await make_server(grpc=LOCAL, ws="[::1]:0")
    await make_server(
        grpc="0.0.0.0:0",
        tls=sigwire.TlsServerConfig(cert_file=certs.server_cert, key_file=certs.server_key),
    )
    assert _plaintext_warnings(caplog) == []


@pytest.mark.parametrize("fallback", ["ws://127.0.0.1:8765/sigwire/v1", "grpc://127.0.0.1:50051"])
def test_a_plaintext_fallback_after_tls_is_refused(fallback: str) -> None:
    """connect([grpcs://..., plaintext]) refuses at once, naming both URLs and the opt-in."""
    secure = "grpcs://agent.example.com"
    with pytest.raises(sigwire.InvalidTargetError) as caught:
        sigwire.connect([secure, "wss://agent.example.com", fallback])
    message = str(caught.value)
    assert fallback in message
    assert secure in message
    assert "allow_insecure_fallback=True" in message


def test_plaintext_before_tls_and_local_sockets_are_not_downgrades() -> None:
    """Plaintext listed first, and unix:// or memory:// after TLS, are accepted as given."""
    sigwire.connect(["grpc://127.0.0.1:50051", "grpcs://agent.example.com"])
    sigwire.connect(["grpcs://agent.example.com", "unix:///run/agent.sock", "memory://agent"])


async def test_an_allowed_plaintext_fallback_is_used(make_server: MakeServer) -> None:
    """With allow_insecure_fallback=True, a dead grpcs:// falls back to a live ws://."""
    server = await make_server(grpc=None, ws=LOCAL)
    [ws_url] = server.urls
    with dead_socket() as dead:
        secure = f"grpcs://127.0.0.1:{dead.getsockname()[1]}"
        async with asyncio.timeout(TIMEOUT):
            async with sigwire.connect(
                [secure, ws_url], allow_insecure_fallback=True, connect_timeout=1
            ) as peer:
                reply = await peer.request("echo", b"in clear, as allowed")
    assert reply.data == b"in clear, as allowed"
    assert peer.url == ws_url


@pytest.mark.parametrize("allowed", [False, True])
async def test_a_card_learned_over_tls_adds_no_plaintext_endpoint(
    make_server: MakeServer, tmp_path: Path, allowed: bool
) -> None:
    """Over grpcs://, a card's ws:// endpoint is learned only if plaintext fallback is allowed."""
    certs = make_certs(tmp_path)
    server = await make_server(
        tls=sigwire.TlsServerConfig(cert_file=certs.server_cert, key_file=certs.server_key)
    )
    [url] = server.urls
    server.advertise = (url, "ws://127.0.0.1:8765/sigwire/v1")
    tls = sigwire.TlsClientConfig(ca_file=certs.ca)
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, tls=tls, allow_insecure_fallback=allowed) as peer:
            assert peer._learning is not None
            await peer._learning
    learned = [target.url for target in peer.targets]
    assert learned == ([url, "ws://127.0.0.1:8765/sigwire/v1"] if allowed else [url])
