"""The agent card publishes addresses clients can reach: advertised ones, never a wildcard."""

from __future__ import annotations

import asyncio

import pytest

import sigwire
from tests.conftest import TIMEOUT
from tests.servers import LOCAL, MakeServer


async def _card(url: str, did: str) -> sigwire.AgentCard:
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, expect_did=did, learn_endpoints=False) as peer:
            return await peer.describe()


def _loopback(url: str) -> str:
    """The URL of a listener bound to a wildcard address, as reached over loopback."""
    port = url.rsplit(":", 1)[1]
    return f"{url.split('://', 1)[0]}://127.0.0.1:{port}"


async def test_a_wildcard_listener_is_left_out_of_the_card(make_server: MakeServer) -> None:
    """A listener bound to 0.0.0.0 serves and is in urls, but its address is not published."""
    server = await make_server(grpc="0.0.0.0:0", ws=LOCAL)
    wildcard, ws_url = server.urls
    assert wildcard.startswith("grpc://0.0.0.0:")
    card = await _card(_loopback(wildcard), server.identity.did)
    assert card.endpoints == (ws_url,)


async def test_advertised_urls_replace_the_bound_ones(make_server: MakeServer) -> None:
    """advertise= is what the signed card lists, in the order given."""
    advertised = ["grpcs://agent.example.com", "grpc://agent.example.com:50051"]
    server = await make_server(grpc="0.0.0.0:0", advertise=advertised)
    card = await _card(_loopback(server.urls[0]), server.identity.did)
    assert card.endpoints == tuple(advertised)


@pytest.mark.parametrize("url", ["grpc://0.0.0.0:50051", "ws://[::]:8765/sigwire/v1"])
def test_an_advertised_wildcard_is_refused(url: str) -> None:
    """advertise= refuses a wildcard address: clients cannot connect to one."""
    with pytest.raises(sigwire.InvalidTargetError, match="wildcard"):
        sigwire.Server(sigwire.Identity.generate(), grpc=LOCAL, advertise=[url])


async def test_clients_ignore_wildcard_endpoints_in_a_card(make_server: MakeServer) -> None:
    """A card listing 0.0.0.0 or :: (as older agents published) adds no reconnect candidate."""
    server = await make_server()
    [url] = server.urls
    port = url.rsplit(":", 1)[1]
    # An agent of an earlier version published its listeners' wildcard addresses.
    server.advertise = (f"grpc://0.0.0.0:{port}", f"grpc://[::]:{port}", url)
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url) as peer:
            assert peer._learning is not None
            await peer._learning
            assert peer.card is not None
            assert f"grpc://0.0.0.0:{port}" in peer.card.endpoints
            assert [target.url for target in peer.targets] == [url]
