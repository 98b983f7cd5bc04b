"""A pinned DID that is not the agent's is reported as such, on every transport."""

from __future__ import annotations

import asyncio

import pytest

import sigwire
from tests.conftest import TIMEOUT


async def test_connecting_to_another_agent_names_both_dids(
    server: sigwire.Server, url: str
) -> None:
    """connect(expect_did=A) to agent B says "expected A, the agent is B", not NO_TRANSPORT."""
    other = sigwire.Identity.generate().did
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect(url, expect_did=other)
    [(_, error)] = caught.value.attempts
    assert isinstance(error, sigwire.UnknownSignerError)
    assert str(error) == f"expected {other}, the agent is {server.identity.did} [SIGNER_UNKNOWN]"
    assert (error.did, error.expected, error.remote) == (server.identity.did, other, False)


async def test_a_wrong_pin_among_dead_urls_is_still_named(
    server: sigwire.Server, url: str, dead_port: int
) -> None:
    """When other URLs are down, the wrong agent's URL still says who answered."""
    other = sigwire.Identity.generate().did
    dead = f"grpc://127.0.0.1:{dead_port}"
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect([dead, url], expect_did=other, connect_timeout=1)
    assert f"expected {other}, the agent is {server.identity.did}" in str(caught.value)


def test_a_pin_that_is_not_a_did_is_refused_at_once() -> None:
    """connect(expect_did="notadid") raises InvalidDidError before connecting anywhere."""
    with pytest.raises(sigwire.InvalidDidError, match="notadid"):
        sigwire.connect("grpc://127.0.0.1:50051", expect_did="notadid")


async def test_describe_names_both_dids_on_a_card_from_another_agent(
    server: sigwire.Server, url: str
) -> None:
    """A card verified against another DID fails with the same message."""
    other = sigwire.Identity.generate().did
    verifier = sigwire.Verifier()
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, learn_endpoints=False) as peer:
            card = await peer.describe()
    with pytest.raises(sigwire.UnknownSignerError) as caught:
        verifier.verify_card(card, expected_did=other)
    assert str(caught.value) == (
        f"expected {other}, the agent is {server.identity.did} [SIGNER_UNKNOWN]"
    )
