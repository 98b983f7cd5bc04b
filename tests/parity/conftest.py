"""Fixtures of the parity tests: real servers on 127.0.0.1:0 serving gRPC and WebSocket at once.

Everything is function-scoped: grpc.aio objects belong to the event loop that
created them, and pytest-asyncio gives every test its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

import sigwire
from tests import servers
from tests.conftest import TIMEOUT
from tests.servers import MakeServer

FAST_BACKOFF = sigwire.Backoff(initial=0.05, maximum=0.2, attempts=None)
"""Reconnect quickly and for ever (every wait in a test is bounded by TIMEOUT)."""

TRANSPORTS = ("grpc", "ws", "memory")
"""Index in ``server.urls`` of each transport: the card lists gRPC, WebSocket, then memory."""


class Probe(servers.Probe):
    """What the standard handlers did, and a gate the test opens.

    Attributes:
        calls: Invocations per kind.
        entered: Payload of every ``block`` invocation, as it starts.
        gate: ``block`` invocations wait for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.entered: asyncio.Queue[bytes] = asyncio.Queue()


def install_handlers(server: sigwire.Server, probe: Probe) -> None:
    """Register the kinds every parity test server serves."""
    servers.install_shared_handlers(
        server,
        probe,
        block_entered=probe.entered.put_nowait,
        refuse_message="no such task",
        serve_counted=True,
    )


def port_of(url: str) -> int:
    """The port of a ``grpc://HOST:PORT`` or ``ws://HOST:PORT/path`` URL."""
    port = urllib.parse.urlsplit(url).port
    assert port is not None, url
    return port


@pytest.fixture
def probe() -> Probe:
    """Observations of the standard handlers, shared by every server of a test."""
    return Probe()


@pytest.fixture
async def make_server(server_identity: sigwire.Identity, probe: Probe) -> AsyncIterator[MakeServer]:
    """Start servers with the standard handlers: gRPC and WebSocket on 127.0.0.1:0, and memory."""
    async with servers.serving(
        server_identity,
        probe,
        install_handlers,
        lambda: {
            "grpc": servers.LOCAL,
            "ws": servers.LOCAL,
            "memory": f"parity-{uuid.uuid4().hex}",
        },
        stop_timeout=TIMEOUT,
        check_sessions_ended=False,
    ) as make:
        yield make


@pytest.fixture
async def server(make_server: MakeServer) -> sigwire.Server:
    """A plaintext gRPC + WebSocket server with the standard handlers and default limits."""
    return await make_server()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The transport under test: ``"grpc"``, ``"ws"`` or ``"memory"``."""
    name: str = request.param
    return name


@pytest.fixture
def url(server: sigwire.Server, transport: str) -> str:
    """``server``'s URL for the transport under test."""
    return server.urls[TRANSPORTS.index(transport)]


@contextlib.contextmanager
def dead_socket() -> Iterator[int]:
    """The port of a socket bound to 127.0.0.1:0 that never listens: connecting is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A refused port, held for the whole test so that nothing else can take it."""
    with dead_socket() as port:
        yield port


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A bare HTTP/1.1 GET to 127.0.0.1:``port``: status, lower-cased headers, body."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Accept: application/json\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body
