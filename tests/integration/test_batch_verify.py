"""Frames verified in one batch still judge each message on its own."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import grpc.aio
import pytest

import sigwire
from sigwire import _proto
from sigwire._proto import pb
from tests.conftest import TIMEOUT
from tests.integration.conftest import OpenChannel


async def _replies(
    call: grpc.aio.StreamStreamCall[bytes, bytes], ids: set[str]
) -> dict[str, pb.Reply]:
    found: dict[str, pb.Reply] = {}
    while not ids <= set(found):
        frame = pb.Frame.FromString(await call.read())
        for reply in frame.replies.replies:
            found[reply.request_id] = reply
    return found


async def test_one_forged_envelope_in_a_batch_fails_alone(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    verifications: list[bytes],
) -> None:
    """In a frame of envelopes verified together, only the forged one is refused.

    Each signature is verified once: the forged one is refused on the frame's
    verdict, not verified again on the event loop.
    """
    call = open_channel(server.urls[0]).stream_stream("/sigwire.v1.AgentTransport/Connect")()

    def sign(kind: str, payload: bytes = b"") -> sigwire.Envelope:
        return client_identity.sign_envelope(
            sigwire.Envelope.new(
                kind, payload, sender=client_identity.did, recipient=server.identity.did
            )
        )

    hello = sign("sigwire.hello")
    good = [sign("echo", b"%d" % i) for i in range(3)]
    forged = dataclasses.replace(sign("echo", b"genuine"), payload=b"forged")
    batch = [good[0], forged, good[1], good[2]]
    async with asyncio.timeout(TIMEOUT):
        await call.write(
            pb.Frame(
                sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(hello)])
            ).SerializeToString()
        )
        hello_reply = (await _replies(call, {hello.id}))[hello.id]
        assert hello_reply.success, hello_reply.error
        await call.write(
            pb.Frame(
                sequence=5,
                envelopes=pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(e) for e in batch]),
            ).SerializeToString()
        )
        replies = await _replies(call, {e.id for e in batch})
        call.cancel()
    assert [replies[e.id].data for e in good] == [b"0", b"1", b"2"]
    assert all(replies[e.id].success for e in good)
    assert not replies[forged.id].success
    assert replies[forged.id].error.reason == "SIGNATURE_INVALID"
    assert sorted(verifications) == sorted(e.signing_input() for e in [hello, *batch])


async def test_a_forged_reply_among_genuine_ones_fails_its_call_alone(
    server: sigwire.Server,
) -> None:
    """A forged reply fails only the call it names; the genuine replies still arrive."""
    async with asyncio.timeout(TIMEOUT), sigwire.connect(server.urls[0]) as peer:
        requests = [peer.request("echo", b"%d" % i) for i in range(4)]
        tasks = [asyncio.ensure_future(r) for r in requests]
        await asyncio.sleep(0)
        pending = peer.correlator.pending()
        victim = pending[1].envelope
        # Forge a reply for one pending call, as if it arrived on the stream.
        forged = server.identity.sign_reply(
            sigwire.Reply(
                request_id=victim.id,
                request_digest=victim.digest(),
                responder=server.identity.did,
                data=b"forged",
                created_at_ms=sigwire.envelope.now_ms(),
            )
        )
        peer._on_reply(dataclasses.replace(forged, data=b"tampered"), False)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], sigwire.InvalidSignatureError)
    assert [r.data for i, r in enumerate(results) if i != 1] == [b"0", b"2", b"3"]


async def test_batch_signed_frames_are_checked_on_the_loop_others_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, client_identity: sigwire.Identity
) -> None:
    """Up to two Ed25519 checks per frame stay on the loop; more go to a worker thread.

    Every way gives the same per-message verdicts, and what decides is the
    checks a frame needs, not how many signatures it shows: messages that all
    carry one (forged) signature still need one check each.
    """
    from sigwire import session, signing

    ran: list[tuple[bool, int]] = []
    real = signing.SignatureChecks.run
    loop_thread = threading.get_ident()

    def spy(self: signing.SignatureChecks) -> list[bool | None]:
        ran.append((threading.get_ident() == loop_thread, self.count))
        return real(self)

    monkeypatch.setattr(signing.SignatureChecks, "run", spy)

    def unsigned(i: int, sender: sigwire.Identity = client_identity) -> sigwire.Envelope:
        return sigwire.Envelope.new("echo", b"%d" % i, sender=sender.did)

    async def check(envelopes: list[sigwire.Envelope]) -> list[bool | None]:
        return await session._check_batch(
            [(e.signature, e.sender, e.signing_input()) for e in envelopes]
        )

    batched = client_identity.sign_batch([unsigned(i) for i in range(8)])
    assert await check(batched) == [True] * 8
    assert ran.pop() == (True, 1)

    # A forged message breaks the whole batch: each is checked on its own
    # proof, which leads to two roots (the genuine one and the forged one's).
    broken = list(batched)
    broken[3] = dataclasses.replace(broken[3], payload=b"forged")
    assert await check(broken) == [True, True, True, False, True, True, True, True]
    assert ran.pop() == (True, 2)

    three = [client_identity.sign_envelope(unsigned(i)) for i in range(3)]
    assert await check(three) == [True] * 3
    assert ran.pop() == (False, 3)

    single = [client_identity.sign_envelope(unsigned(i)) for i in range(8)]
    single[5] = dataclasses.replace(single[5], payload=b"forged")
    single[6] = dataclasses.replace(single[6], signature=None)  # no Ed25519 check: None
    assert await check(single) == [True] * 5 + [False, None, True]
    assert ran.pop() == (False, 7)

    # One signature value on every message, each claiming position 0 of the
    # same batch: no whole batch, so one Ed25519 check per message.
    shared = [dataclasses.replace(unsigned(i), signature=batched[0].signature) for i in range(8)]
    assert await check(shared) == [False] * 8
    assert ran.pop() == (False, 8)

    # Many authors in one frame: parsing their keys is work too, so all of it
    # goes to the worker thread, even when no Ed25519 check is left (these
    # DIDs do not parse, and the full check says so: None).
    bad = [f"did:key:z{'1' * (40 + i)}" for i in range(3)]
    strangers = [
        dataclasses.replace(
            unsigned(i), sender=did, signature=sigwire.Signature(did, "Ed25519", bytes(64))
        )
        for i, did in enumerate(bad)
    ]
    assert await check(strangers) == [None] * 3
    assert ran.pop() == (False, 0)
    others = [sigwire.Identity.generate() for _ in range(3)]
    mixed = [other.sign_envelope(unsigned(i, other)) for i, other in enumerate(others)]
    assert await check(mixed) == [True] * 3
    assert ran.pop() == (False, 3)
