"""The scheme registry: custom schemes, shared connectors, pooled channels."""

from __future__ import annotations

import asyncio

import pytest

import sigwire
from sigwire.transports.grpc.client import GrpcConnector
from tests.conftest import TIMEOUT


async def test_a_registered_custom_scheme_connects() -> None:
    """A scheme the user registers is parsed and served by the connector they chose."""
    server = sigwire.Server(sigwire.Identity.generate(), grpc="127.0.0.1:0")

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        return msg.payload

    registry = sigwire.default_registry()
    registry.register("h2c", GrpcConnector)
    async with server, asyncio.timeout(TIMEOUT):
        url = server.urls[0].replace("grpc://", "h2c://")
        async with sigwire.connect(url, registry=registry, learn_endpoints=False) as peer:
            assert (await peer.request("echo", b"custom")).data == b"custom"
    await registry.aclose()


def test_unknown_scheme_lists_the_registered_ones() -> None:
    """Before registration the scheme is refused, naming every supported scheme."""
    registry = sigwire.default_registry()
    with pytest.raises(sigwire.UnsupportedSchemeError) as caught:
        registry.parse("h2c://127.0.0.1:1")
    assert set(caught.value.supported) == {"grpc", "grpcs", "unix", "ws", "wss", "memory"}
    assert "grpc://" in str(caught.value)


async def test_peers_to_one_target_share_one_pooled_channel() -> None:
    """Two peers to the same gRPC endpoint reuse one channel, closed after the last."""
    server = sigwire.Server(sigwire.Identity.generate(), grpc="127.0.0.1:0")
    registry = sigwire.default_registry()
    async with server, asyncio.timeout(TIMEOUT):
        target = registry.parse(server.urls[0])
        connector = registry.connector(target)
        assert isinstance(connector, GrpcConnector)
        options = {"registry": registry, "learn_endpoints": False}
        async with sigwire.connect(server.urls[0], **options) as first:
            async with sigwire.connect(server.urls[0], **options) as second:
                assert first.server_did == second.server_did
                pooled = list(connector._pool.values())
                assert len(pooled) == 1
                assert pooled[0].users == 2
            assert [p.users for p in connector._pool.values()] == [1]
        assert connector._pool == {}
    await registry.aclose()
