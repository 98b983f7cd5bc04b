"""What a store keeps across a real restart: answers bound to what was asked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sigwire
from tests.conftest import TIMEOUT
from tests.integration.conftest import Probe
from tests.parity.raw_stream import open_raw
from tests.servers import MakeServer


def _request(identity: sigwire.Identity, payload: bytes, id: str = "") -> sigwire.Envelope:
    return identity.sign_envelope(
        sigwire.Envelope.new("counted", payload, sender=identity.did, id=id or None)
    )


async def _ask(server: sigwire.Server, envelope: sigwire.Envelope) -> sigwire.Reply:
    """The verified final reply of ``server`` to ``envelope``, sent on a raw gRPC stream."""
    async with open_raw(server, "grpc") as stream:
        await stream.send_envelopes(envelope)
        reply = (await stream.final_replies({envelope.id}))[envelope.id]
    sigwire.Verifier().verify_reply(reply, envelope, expected_responder=server.identity.did)
    return reply


async def test_a_restored_answer_is_refused_to_another_request_under_its_id(
    make_server: MakeServer, client_identity: sigwire.Identity, probe: Probe, tmp_path: Path
) -> None:
    """After a restart, the same (sender, id) asking for something else is REPLAY."""
    path = tmp_path / "agent.db"
    original = _request(client_identity, b"pay 10")
    first = await make_server(store=path)
    async with asyncio.timeout(TIMEOUT):
        assert (await _ask(first, original)).data == b"run 1"
        await first.stop(grace=0)
        second = await make_server(store=path)
        other = _request(client_identity, b"pay 99999", id=original.id)
        refused = await _ask(second, other)
        retry = client_identity.sign_envelope(original.renewed())  # same request, new nonce
        answered = await _ask(second, retry)
    assert refused.error is not None
    assert refused.error.reason == "REPLAY", refused
    assert answered.success
    assert answered.data == b"run 1"
    assert probe.calls["counted"] == 1


async def test_an_answer_evicted_from_memory_is_refused_to_another_request_under_its_id(
    make_server: MakeServer, client_identity: sigwire.Identity, probe: Probe, tmp_path: Path
) -> None:
    """Gone from the memory cache but kept in the store, an answer still serves only its request."""
    server = await make_server(
        store=tmp_path / "agent.db", limits=sigwire.Limits(reply_cache_size=1)
    )
    original = _request(client_identity, b"pay 10")
    async with asyncio.timeout(TIMEOUT):
        assert (await _ask(server, original)).data == b"run 1"
        assert (await _ask(server, _request(client_identity, b"evicts it"))).data == b"run 2"
        assert (client_identity.did, original.id) not in server.dispatcher.cache._entries
        other = _request(client_identity, b"pay 99999", id=original.id)
        refused = await _ask(server, other)
    assert refused.error is not None
    assert refused.error.reason == "REPLAY", refused
    assert probe.calls["counted"] == 2
