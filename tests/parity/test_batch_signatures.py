"""Batch signatures on the wire: who signs in batches, and what every message still proves alone.

A sigwire client batch-signs what one frame carries; a server batch-signs the
replies of a stream only when that stream's hello says
``sigwire.batch-signatures: 1`` (docs/signing.md 4.5). Handlers wait on a gate
until every request has started, so that the replies leave together and the
writer has a batch to sign: deterministic, not timing-dependent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

import pytest

import sigwire
from sigwire.dispatch import BATCH_SIGNATURES_KEY
from tests.conftest import TIMEOUT
from tests.parity.conftest import Probe
from tests.parity.raw_stream import RAW_TRANSPORTS, RawStream, open_raw

PIPELINED = 64
RAW_BATCH = 40


@dataclasses.dataclass
class Held:
    """Envelopes as the ``hold`` handler received them, and a count of those started."""

    envelopes: dict[str, sigwire.Envelope] = dataclasses.field(default_factory=dict)
    started: asyncio.Queue[str] = dataclasses.field(default_factory=asyncio.Queue)


def install_hold(server: sigwire.Server, probe: Probe) -> Held:
    """A ``hold`` kind: records its envelope, waits for the probe's gate, echoes the payload."""
    held = Held()

    @server.on("hold")
    async def hold(msg: sigwire.Message) -> bytes:
        held.envelopes[msg.id] = msg.envelope
        held.started.put_nowait(msg.id)
        await probe.gate.wait()
        return msg.payload

    return held


async def release_after(held: Held, probe: Probe, count: int) -> None:
    """Open the gate once ``count`` handlers have started (so all replies leave together)."""
    for _ in range(count):
        await held.started.get()
    probe.gate.set()


def check_frame_batches(frames: list[list[sigwire.Reply]], *, batched: bool) -> int:
    """Check how each reply frame is signed; the number of batch-signed replies.

    With batches on, a frame of k >= 2 replies carries one value and proofs
    0..k-1 of size k; otherwise no reply carries a proof.
    """
    count = 0
    for replies in frames:
        proofs = [r.signature.batch if r.signature else None for r in replies]
        if not batched or len(replies) == 1:
            assert proofs == [None] * len(replies)
            continue
        assert len({r.signature.value for r in replies if r.signature}) == 1
        assert [(p.index, p.size) if p else None for p in proofs] == [
            (i, len(replies)) for i in range(len(replies))
        ]
        count += len(replies)
    return count


# --- a sigwire client ----------------------------------------------------------------


async def test_pipelined_requests_and_replies_are_batch_signed(
    server: sigwire.Server, url: str, probe: Probe, client_identity: sigwire.Identity
) -> None:
    """64 concurrent requests all answered; requests and replies went batch-signed; all verify."""
    held = install_hold(server, probe)
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(
            url, identity=client_identity, expect_did=server.identity.did, learn_endpoints=False
        ) as peer,
    ):
        releasing = asyncio.create_task(release_after(held, probe, PIPELINED))
        replies = await asyncio.gather(*(peer.request("hold", b"%d" % i) for i in range(PIPELINED)))
        await releasing
    assert [r.data for r in replies] == [b"%d" % i for i in range(PIPELINED)]
    requests = held.envelopes
    assert len(requests) == PIPELINED
    # Requests: signed by the client's writer, frame by frame, in batches.
    batched_requests = [e for e in requests.values() if e.signature and e.signature.batch]
    assert len(batched_requests) >= 2
    for envelope in requests.values():
        sigwire.Verifier.check_signature(
            envelope.signature, envelope.sender, envelope.signing_input()
        )
    # Replies: batch-signed by the server (the client's hello asked for it), each bound
    # to exactly its own request, verified here again from scratch.
    batched_replies = [r for r in replies if r.signature and r.signature.batch]
    assert len(batched_replies) >= 2
    verifier = sigwire.Verifier()
    for reply in replies:
        verifier.verify_reply(
            reply, requests[reply.request_id], expected_responder=server.identity.did
        )
    ids = {r.request_id for r in replies}
    for reply in batched_replies:
        for other in list(ids - {reply.request_id})[:3]:
            with pytest.raises(sigwire.InvalidSignatureError):
                verifier.verify_reply(reply, requests[other])


async def test_pipelined_streams_are_batch_signed(
    server: sigwire.Server, url: str, client_identity: sigwire.Identity
) -> None:
    """16 concurrent streamed requests: every part arrives in order and verifies alone."""
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(url, identity=client_identity, learn_endpoints=False) as peer,
    ):

        async def collect(n: int) -> list[sigwire.Reply]:
            return [part async for part in peer.stream("count", str(n))]

        streams = await asyncio.gather(*(collect(3 + i % 4) for i in range(16)))
    for i, parts in enumerate(streams):
        assert [p.data for p in parts] == [f"part {k}".encode() for k in range(3 + i % 4)]
        for part in parts:
            assert part.signature is not None
            sigwire.Verifier.check_signature(part.signature, part.responder, part.signing_input())


async def test_replies_to_pushes_are_batch_signed_by_the_client(
    server: sigwire.Server, url: str, client_identity: sigwire.Identity
) -> None:
    """20 concurrent pushes: the client answers them in batches; the server verifies each."""
    gate = asyncio.Event()
    started = 0
    pushes: dict[str, sigwire.Envelope] = {}

    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(url, identity=client_identity, learn_endpoints=False) as peer,
    ):

        @peer.on("ask")
        async def ask(msg: sigwire.Message) -> bytes:
            nonlocal started
            pushes[msg.id] = msg.envelope
            started += 1
            if started == 20:
                gate.set()
            await gate.wait()
            return b"answer " + msg.payload

        replies = await asyncio.gather(
            *(
                server.push(client_identity.did, "ask", b"%d" % i, timeout=TIMEOUT)
                for i in range(20)
            )
        )
    assert [r.data for r in replies] == [b"answer %d" % i for i in range(20)]
    assert len([r for r in replies if r.signature and r.signature.batch]) >= 2
    for reply in replies:
        sigwire.Verifier().verify_reply(
            reply, pushes[reply.request_id], expected_responder=client_identity.did
        )


# --- raw clients: batch replies only for those that asked ---------------------------


HELLOS = {
    "no-metadata": None,
    "value-0": {BATCH_SIGNATURES_KEY: "0"},
    "value-true": {BATCH_SIGNATURES_KEY: "true"},
    "key-on-requests-only": None,
}


async def _pipeline(
    stream: RawStream, held: Held, probe: Probe, envelopes: list[sigwire.Envelope]
) -> dict[str, sigwire.Reply]:
    """Send ``envelopes`` in one frame, release them together, read every final reply."""
    await stream.send_envelopes(*envelopes)
    await release_after(held, probe, len(envelopes))
    return await stream.final_replies({e.id for e in envelopes})


@pytest.mark.parametrize("hello", HELLOS.keys())
@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_client_that_did_not_ask_never_gets_a_batch_proof(
    server: sigwire.Server,
    probe: Probe,
    client_identity: sigwire.Identity,
    transport: str,
    hello: str,
) -> None:
    """40 envelopes pipelined in one frame, hello without the key: every reply signed alone."""
    held = install_hold(server, probe)
    metadata = {BATCH_SIGNATURES_KEY: "1"} if hello == "key-on-requests-only" else None
    envelopes = [
        client_identity.sign_envelope(
            sigwire.Envelope.new("hold", b"%d" % i, sender=client_identity.did, metadata=metadata)
        )
        for i in range(RAW_BATCH)
    ]
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(client_identity, server.identity.did, HELLOS[hello])
        replies = await _pipeline(stream, held, probe, envelopes)
    assert check_frame_batches(stream.reply_frames(), batched=False) == 0
    assert max(len(frame) for frame in stream.reply_frames()) >= 2, "no frame held two replies"
    for envelope in envelopes:
        reply = replies[envelope.id]
        assert reply.data == envelope.payload
        sigwire.Verifier().verify_reply(reply, envelope, expected_responder=server.identity.did)


@pytest.mark.parametrize("requests_batched", [True, False], ids=["batch-requests", "single"])
@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_client_that_asked_gets_batch_proofs(
    server: sigwire.Server,
    probe: Probe,
    client_identity: sigwire.Identity,
    transport: str,
    requests_batched: bool,
) -> None:
    """Hello with the key: frames of several replies come batch-signed; each verifies alone."""
    held = install_hold(server, probe)
    unsigned = [
        sigwire.Envelope.new("hold", b"%d" % i, sender=client_identity.did)
        for i in range(RAW_BATCH)
    ]
    envelopes = (
        client_identity.sign_batch(unsigned)
        if requests_batched
        else [client_identity.sign_envelope(e) for e in unsigned]
    )
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(client_identity, server.identity.did, {BATCH_SIGNATURES_KEY: "1"})
        replies = await _pipeline(stream, held, probe, envelopes)
    assert check_frame_batches(stream.reply_frames(), batched=True) >= 2
    values = collections.Counter(
        r.signature.value for r in replies.values() if r.signature and r.signature.batch
    )
    assert values, "no reply carried a batch proof"
    verifier = sigwire.Verifier()
    for envelope in envelopes:
        reply = replies[envelope.id]
        assert reply.success, reply.error
        assert reply.data == envelope.payload
        verifier.verify_reply(reply, envelope, expected_responder=server.identity.did)
        assert held.envelopes[envelope.id] == envelope
    assert len(held.envelopes) == RAW_BATCH
