"""A client given only a gRPC URL learns the agent's endpoints and falls back midway."""

from __future__ import annotations

import asyncio

import sigwire
from tests.conftest import TIMEOUT


async def test_session_that_loses_grpc_midway_reconnects_over_websocket() -> None:
    """After gRPC goes away, the next request completes over the card's ws:// endpoint."""
    server = sigwire.Server(sigwire.Identity.generate(), grpc="127.0.0.1:0", ws="127.0.0.1:0")

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        return msg.payload

    async with server:
        grpc_url, ws_url = server.urls
        async with sigwire.connect(
            grpc_url, connect_timeout=1, backoff=sigwire.Backoff(initial=0.05, maximum=0.2)
        ) as peer:
            assert peer._learning is not None
            async with asyncio.timeout(TIMEOUT):
                await peer._learning
            assert [t.url for t in peer.targets] == [grpc_url, ws_url]
            assert (await peer.request("echo", b"before", timeout=TIMEOUT)).data == b"before"
            assert peer.url == grpc_url

            await server._listeners[0].stop(0)  # gRPC becomes unreachable

            reply = await peer.request("echo", b"after", timeout=TIMEOUT)
            assert reply.data == b"after"
            assert peer.url == ws_url
            assert peer.reconnects == 1


async def test_card_endpoints_are_not_learned_when_switched_off() -> None:
    """learn_endpoints=False keeps exactly the URLs the caller gave."""
    server = sigwire.Server(sigwire.Identity.generate(), grpc="127.0.0.1:0", ws="127.0.0.1:0")
    async with (
        server,
        sigwire.connect(server.urls[0], learn_endpoints=False) as peer,
    ):
        assert peer._learning is None
        assert [t.url for t in peer.targets] == [server.urls[0]]
