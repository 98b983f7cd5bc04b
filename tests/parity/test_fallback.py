"""Choosing a transport: fallback from a broken gRPC endpoint to ws://, bad URLs, forged cards."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

import sigwire
from sigwire import _proto
from tests.conftest import TIMEOUT
from tests.parity.conftest import dead_socket, http_get, port_of

WELL_KNOWN = "/.well-known/sigwire-agent.json"
SUPPORTED = ("grpc", "grpcs", "ws", "wss", "unix")


class FakeEndpoint:
    """A 127.0.0.1 TCP server that is not a sigwire agent.

    Args:
        answer: Bytes written after the client's first bytes, then the
            connection is closed; None holds every connection open and silent.
    """

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self._writers.append(writer)
        try:
            if self.answer is not None:
                with contextlib.suppress(OSError):
                    await reader.read(4096)
                    writer.write(self.answer)
                    await writer.drain()
                writer.close()
        finally:
            self._tasks.discard(task)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def fake_endpoint(answer: bytes | None) -> AsyncIterator[FakeEndpoint]:
    """A listening :class:`FakeEndpoint`, closed on exit."""
    endpoint = FakeEndpoint(answer)
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.aclose()


async def connect_and_time(urls: list[str], connect_timeout: float) -> tuple[str, float]:
    """Connect to ``urls``, echo once, and return the URL used and the seconds connecting took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with sigwire.connect(urls, connect_timeout=connect_timeout) as peer:
        elapsed = loop.time() - started
        assert (await peer.request("echo", b"fell back")).data == b"fell back"
        return peer.url, elapsed


async def test_refused_grpc_falls_back_to_ws(server: sigwire.Server, dead_port: int) -> None:
    """A refused gRPC port is skipped for ws:// within connect_timeout."""
    ws_url = server.urls[1]
    async with asyncio.timeout(TIMEOUT):
        used, elapsed = await connect_and_time([f"grpc://127.0.0.1:{dead_port}", ws_url], 1.0)
    assert used == ws_url
    assert elapsed < 1.0 + 1.5


async def test_refused_grpc_fails_fast(server: sigwire.Server, dead_port: int) -> None:
    """A refused gRPC port is given up at once, not after the whole connect_timeout."""
    ws_url = server.urls[1]
    async with asyncio.timeout(TIMEOUT):
        used, elapsed = await connect_and_time([f"grpc://127.0.0.1:{dead_port}", ws_url], 3.0)
    assert used == ws_url
    assert elapsed < 1.5


async def test_silent_grpc_port_falls_back_to_ws(server: sigwire.Server) -> None:
    """A gRPC port that accepts TCP but never answers is abandoned for ws:// in time."""
    ws_url = server.urls[1]
    async with asyncio.timeout(TIMEOUT), fake_endpoint(None) as silent:
        used, elapsed = await connect_and_time([f"grpc://127.0.0.1:{silent.port}", ws_url], 1.0)
    assert silent.accepted >= 1
    assert used == ws_url
    assert elapsed < 1.0 + 1.5


async def test_http1_only_grpc_port_falls_back_to_ws(server: sigwire.Server) -> None:
    """A gRPC port that answers HTTP/1.1 400 and hangs up is abandoned for ws:// in time."""
    ws_url = server.urls[1]
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    async with asyncio.timeout(TIMEOUT), fake_endpoint(answer) as http1:
        used, elapsed = await connect_and_time([f"grpc://127.0.0.1:{http1.port}", ws_url], 1.0)
    assert http1.accepted >= 1
    assert used == ws_url
    assert elapsed < 1.0 + 1.5


async def test_all_candidates_dead_lists_every_url() -> None:
    """With every candidate refused, NoTransportAvailableError names each URL and why."""
    with dead_socket() as grpc_port, dead_socket() as ws_port:
        urls = [f"grpc://127.0.0.1:{grpc_port}", f"ws://127.0.0.1:{ws_port}/sigwire/v1"]
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(sigwire.NoTransportAvailableError) as caught:
                await sigwire.connect(urls, connect_timeout=1)
    error = caught.value
    assert [url for url, _ in error.attempts] == urls
    for _, reason in error.attempts:
        assert isinstance(reason, sigwire.ConnectError)
        assert str(reason)
    assert all(url in str(error) for url in urls)
    assert error.reason == "NO_TRANSPORT"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:50051",
        "grpc://",
        "grpc://127.0.0.1:0",
        "grpc://127.0.0.1:99999",
        "grpc://127.0.0.1:port",
        "grpc://127.0.0.1:50051/a/path",
        "ws://127.0.0.1:8765/sigwire/v1?x=1",
        "ws://user:secret@127.0.0.1:8765/sigwire/v1",
    ],
)
async def test_malformed_url_is_invalid_target(url: str) -> None:
    """A malformed URL is refused with InvalidTargetError, before any connection attempt."""
    with pytest.raises(sigwire.InvalidTargetError) as caught:
        async with asyncio.timeout(TIMEOUT), sigwire.connect(url):
            pass
    assert type(caught.value) is sigwire.InvalidTargetError
    assert caught.value.reason == "TARGET_INVALID"


@pytest.mark.parametrize("url", ["http://127.0.0.1:80", "tcp://127.0.0.1:5000", "h2c://x:1"])
async def test_unknown_scheme_lists_the_supported_ones(url: str) -> None:
    """An unknown scheme raises UnsupportedSchemeError naming every supported scheme."""
    with pytest.raises(sigwire.UnsupportedSchemeError) as caught:
        async with asyncio.timeout(TIMEOUT), sigwire.connect(url):
            pass
    error = caught.value
    assert error.scheme == url.split("://", 1)[0]
    assert set(SUPPORTED) <= set(error.supported)
    assert all(f"{scheme}://" in str(error) for scheme in SUPPORTED)
    assert error.reason == "SCHEME_UNSUPPORTED"


async def fetch_card_json(server: sigwire.Server) -> dict[str, object]:
    """The card the WebSocket port serves over plain HTTP, as parsed JSON."""
    status, headers, body = await http_get(port_of(server.urls[1]), WELL_KNOWN)
    assert status == 200
    assert headers["content-type"] == "application/json"
    card: dict[str, object] = json.loads(body)
    return card


async def test_served_card_verifies(server: sigwire.Server) -> None:
    """The card from /.well-known verifies against the server's DID and lists its endpoints."""
    card = _proto.card_from_json(json.dumps(await fetch_card_json(server)))
    sigwire.Verifier().verify_card(card, expected_did=server.identity.did)
    assert card.endpoints == tuple(server.urls)


async def test_card_with_tampered_endpoint_is_refused(server: sigwire.Server) -> None:
    """Changing one endpoint in the served card JSON breaks its signature."""
    raw = await fetch_card_json(server)
    endpoints = raw["endpoints"]
    assert isinstance(endpoints, list)
    endpoints[0] = "grpc://evil.example:50051"
    card = _proto.card_from_json(json.dumps(raw))
    with pytest.raises(sigwire.InvalidSignatureError):
        sigwire.Verifier().verify_card(card, expected_did=server.identity.did)


@pytest.mark.parametrize("signer", ["server", "forger"])
async def test_card_signed_by_another_identity_is_refused(
    server: sigwire.Server, signer: str
) -> None:
    """A card claiming the server's DID but signed with another key does not verify."""
    forger = sigwire.Identity.generate()
    genuine = _proto.card_from_json(json.dumps(await fetch_card_json(server)))
    claimed = server.identity.did if signer == "server" else forger.did
    unsigned = dataclasses.replace(
        genuine, endpoints=("grpc://evil.example:50051",), signature=None
    )
    value = forger.sign(unsigned.signing_input(signer=claimed))
    forged = dataclasses.replace(
        unsigned, signature=sigwire.Signature(signer=claimed, algorithm="Ed25519", value=value)
    )
    with pytest.raises(sigwire.InvalidSignatureError):
        sigwire.Verifier().verify_card(forged, expected_did=server.identity.did)


async def test_valid_card_of_another_agent_is_refused(server: sigwire.Server) -> None:
    """A correctly self-signed card of another DID is refused when the server's DID is expected."""
    other = sigwire.Identity.generate()
    card = other.sign_card(sigwire.AgentCard(did=other.did, endpoints=("grpc://evil:1",)))
    sigwire.Verifier().verify_card(card)
    with pytest.raises(sigwire.UnknownSignerError):
        sigwire.Verifier().verify_card(card, expected_did=server.identity.did)


async def test_describe_refuses_a_forged_card(server: sigwire.Server) -> None:
    """Peer.describe() over ws:// refuses a card that claims the pinned DID but is forged."""
    raw = await fetch_card_json(server)
    raw["endpoints"] = ["grpc://evil.example:50051"]
    body = json.dumps(raw).encode()
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    async with asyncio.timeout(TIMEOUT), fake_endpoint(answer) as impostor:
        peer = sigwire.Peer(
            [f"ws://127.0.0.1:{impostor.port}/sigwire/v1"], expect_did=server.identity.did
        )
        try:
            with pytest.raises(sigwire.InvalidSignatureError):
                await peer.describe()
        finally:
            await peer.close()
    assert impostor.accepted == 1
