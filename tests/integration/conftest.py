"""Fixtures of the gRPC integration tests: real servers on 127.0.0.1:0, raw channels, a proxy.

Everything is function-scoped: grpc.aio objects belong to the event loop that
created them, and pytest-asyncio gives every test its own loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc.aio
import pytest

import sigwire
from tests import servers
from tests.integration.helpers import TcpProxy, authority, dead_socket, port_of
from tests.servers import MakeServer


class Probe(servers.Probe):
    """What the standard handlers did, and a gate the test opens.

    Attributes:
        calls: Invocations per kind.
        active: Handler invocations of ``slow`` running right now.
        peak: Most ``slow`` invocations seen running at once.
        entered: Set when a ``block`` invocation has started (``count_block``:
            once its first part is out).
        gate: ``block`` and ``count_block`` invocations wait for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.peak = 0
        self.entered = asyncio.Event()


def install_handlers(server: sigwire.Server, probe: Probe) -> None:
    """Register the kinds every integration test server serves."""
    servers.install_shared_handlers(
        server,
        probe,
        block_entered=lambda _: probe.entered.set(),
        refuse_message="nope",
        serve_counted=True,
    )

    @server.on("count_block")
    async def count_block(msg: sigwire.Message) -> AsyncIterator[str]:
        probe.calls["count_block"] += 1
        yield "part 0"
        probe.entered.set()
        await probe.gate.wait()
        yield "part 1"

    @server.on("partial")
    async def partial(msg: sigwire.Message) -> AsyncIterator[str]:
        probe.calls["partial"] += 1
        yield "part 0"
        raise sigwire.ApplicationError("quota used up", reason="QUOTA_EXCEEDED")

    @server.on("hang")
    async def hang(msg: sigwire.Message) -> bytes:
        probe.calls["hang"] += 1
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    @server.on("slow")
    async def slow(msg: sigwire.Message) -> bytes:
        probe.calls["slow"] += 1
        probe.active += 1
        probe.peak = max(probe.peak, probe.active)
        try:
            # Simulated work, long enough for requests to pile up; not a wait for state.
            await asyncio.sleep(0.02)
        finally:
            probe.active -= 1
        return msg.payload


@pytest.fixture
def probe() -> Probe:
    """Observations of the standard handlers, shared by every server of a test."""
    return Probe()


@pytest.fixture
async def make_server(server_identity: sigwire.Identity, probe: Probe) -> AsyncIterator[MakeServer]:
    """Start servers with the standard handlers; ``grpc=`` defaults to 127.0.0.1:0."""
    async with servers.serving(
        server_identity,
        probe,
        install_handlers,
        lambda: {"grpc": servers.LOCAL},
        stop_timeout=None,
        check_sessions_ended=True,
    ) as make:
        yield make


@pytest.fixture
async def server(make_server: MakeServer) -> sigwire.Server:
    """A plaintext server with the standard handlers and default limits."""
    return await make_server()


OpenChannel = Callable[[str], grpc.aio.Channel]


@pytest.fixture
async def open_channel() -> AsyncIterator[OpenChannel]:
    """Plain grpc.aio channels to a ``grpc://`` URL, closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def open_(url: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(authority(url))
        channels.append(channel)
        return channel

    yield open_
    for channel in channels:
        await channel.close(grace=None)


@pytest.fixture
async def channel(server: sigwire.Server, open_channel: OpenChannel) -> grpc.aio.Channel:
    """A plain grpc.aio channel to ``server``."""
    return open_channel(server.urls[0])


MakeProxy = Callable[[str], Awaitable[TcpProxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    """Listening TCP proxies to a ``grpc://`` URL, closed after the test."""
    proxies: list[TcpProxy] = []

    async def make(url: str) -> TcpProxy:
        proxy = TcpProxy(port_of(url))
        proxies.append(proxy)
        await proxy.listen()
        return proxy

    yield make
    for proxy in proxies:
        await proxy.aclose()


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A grpc:// URL of a socket bound to 127.0.0.1:0 that never listens: refused at once."""
    with dead_socket() as sock:
        yield f"grpc://127.0.0.1:{sock.getsockname()[1]}"
