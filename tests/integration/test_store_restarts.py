"""What a store keeps across a real restart: answers bound to what was asked, hellos valid once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sigwire
from sigwire.dispatch import HELLO_KIND
from sigwire.envelope import now_ms
from tests.conftest import TIMEOUT
from tests.integration.conftest import Probe
from tests.parity.raw_stream import RawStream, open_raw
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


async def _say_hello(stream: RawStream, hello: sigwire.Envelope) -> sigwire.Reply:
    await stream.send_envelopes(hello)
    return (await stream.final_replies({hello.id}))[hello.id]


async def test_a_hello_captured_before_a_restart_is_refused_after_it_with_a_store(
    make_server: MakeServer, client_identity: sigwire.Identity, tmp_path: Path
) -> None:
    """Replayed to the restarted agent, a captured hello is REPLAY and takes no stored push."""
    path = tmp_path / "agent.db"
    first = await make_server(store=path)
    hello = client_identity.sign_envelope(
        sigwire.Envelope.new(HELLO_KIND, sender=client_identity.did, recipient=first.identity.did)
    )
    async with asyncio.timeout(TIMEOUT):
        async with open_raw(first, "grpc") as agent:
            assert (await _say_hello(agent, hello)).success
        pushing = asyncio.create_task(first.push(client_identity.did, "ask", b"for the agent"))
        await asyncio.sleep(0)  # the push enters the outbox (and the store)
        await first.stop(grace=0)
        await asyncio.gather(pushing, return_exceptions=True)

        second = await make_server(store=path)
        assert client_identity.did in second._outboxes  # restored from the store
        async with open_raw(second, "grpc") as thief:
            refused = await _say_hello(thief, hello)
            # Frames are answered in order: once this is answered, no push rode before it.
            stranger = sigwire.Identity.generate()
            echo = stranger.sign_envelope(sigwire.Envelope.new("echo", sender=stranger.did))
            await thief.send_envelopes(echo)
            await thief.final_replies({echo.id})
            assert second.connected() == []
        pushed = [f for f in thief.frames if f.WhichOneof("body") == "envelopes"]
    sigwire.Verifier().verify_reply(refused, hello, expected_responder=second.identity.did)
    assert refused.error is not None
    assert refused.error.reason == "REPLAY", refused
    assert pushed == []
    assert client_identity.did in second._outboxes  # still waiting for its agent


async def test_a_hello_created_before_a_restart_is_refused_after_it_without_a_store(
    make_server: MakeServer, client_identity: sigwire.Identity
) -> None:
    """Without a store, a hello from before the agent started is TIMESTAMP_OUT_OF_WINDOW."""
    first = await make_server()
    hello = client_identity.sign_envelope(
        sigwire.Envelope.new(HELLO_KIND, sender=client_identity.did, recipient=first.identity.did)
    )
    async with asyncio.timeout(TIMEOUT):
        async with open_raw(first, "grpc") as agent:
            assert (await _say_hello(agent, hello)).success
        await first.stop(grace=0)
        assert now_ms() > hello.created_at_ms  # the next agent starts after it was made
        second = await make_server()
        async with open_raw(second, "grpc") as thief:
            refused = await _say_hello(thief, hello)
            assert second.connected() == []
        async with sigwire.connect(
            second.urls[0], identity=client_identity, learn_endpoints=False
        ) as peer:
            assert (await peer.request("echo", b"a new hello is welcome")).success
    sigwire.Verifier().verify_reply(refused, hello, expected_responder=second.identity.did)
    assert refused.error is not None
    assert refused.error.reason == "TIMESTAMP_OUT_OF_WINDOW", refused
    assert int(refused.error.details["floor_ms"]) >= hello.created_at_ms


async def test_hellos_after_the_first_on_a_stream_are_not_recorded(
    make_server: MakeServer, client_identity: sigwire.Identity, tmp_path: Path
) -> None:
    """A stream is bound by its first hello: later ones, from any DID, leave the store as it was."""
    server = await make_server(store=tmp_path / "agent.db")
    assert server.store is not None

    def hello(identity: sigwire.Identity) -> sigwire.Envelope:
        return identity.sign_envelope(
            sigwire.Envelope.new(HELLO_KIND, sender=identity.did, recipient=server.identity.did)
        )

    async with asyncio.timeout(TIMEOUT), open_raw(server, "grpc") as stream:
        assert (await _say_hello(stream, hello(client_identity))).success
        recorded = server.store._hellos
        minted = [hello(sigwire.Identity.generate()) for _ in range(20)]
        await stream.send_envelopes(*minted)
        replies = await stream.final_replies({h.id for h in minted})
        assert server.connected() == [client_identity.did]
    assert all(reply.success for reply in replies.values())
    assert server.store._hellos == recorded == 1
