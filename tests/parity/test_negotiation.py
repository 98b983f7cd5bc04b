"""Capability negotiation, signed forms of cached replies, and rate limits on re-sends.

A client says in its hello metadata what it understands (``sigwire.batch-signatures``,
``sigwire.acked``); an agent says it in its hello reply's content type
(``features=acked,batch-signatures``). Each side batch-signs and piggybacks acks
only for a peer that said it understands them. A cached reply keeps its signed
forms, so an exact re-send costs no signature, and only a batch peer ever gets
the batch form; an exact duplicate answered from the cache takes no rate-limit
token (anyone who saw the envelope can replay it), a re-signed retry does.
Everything runs on real loopback servers with real keys; nothing waits
on time (the ack timer is pushed out of reach where it would race a flush).
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

import sigwire
import sigwire.dispatch
import sigwire.session
from sigwire import _proto
from sigwire.dispatch import (
    ACKED,
    ACKED_KEY,
    BATCH_SIGNATURES,
    BATCH_SIGNATURES_KEY,
    HELLO_CONTENT_TYPE,
    HELLO_KIND,
    hello_features,
)
from tests.conftest import TIMEOUT
from tests.integration.helpers import rpc_failure, stub, to_pb
from tests.parity.conftest import MakeServer, Probe
from tests.parity.raw_stream import RAW_TRANSPORTS, RawStream, grpc_authority, open_raw
from tests.parity.test_batch_signatures import check_frame_batches, install_hold, release_after

pb = _proto.pb

PIPELINED = 64
WINDOW = 8
BATCH = 40
BOTH = frozenset({ACKED, BATCH_SIGNATURES})

# --- parsing the agent's features ------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "features"),
    [
        (HELLO_CONTENT_TYPE, BOTH),
        ("text/plain; charset=utf-8; features=acked,batch-signatures", BOTH),
        ('text/plain; charset=utf-8; features="acked,batch-signatures"', BOTH),
        ('text/plain; features=" acked , batch-signatures "', BOTH),
        ("text/plain ;  features = acked ,  batch-signatures  ; q=1", BOTH),
        ("text/plain; FEATURES=acked", frozenset({ACKED})),
        ("text/plain; Features=batch-signatures", frozenset({BATCH_SIGNATURES})),
        ("text/plain; features=acked,acked,", frozenset({ACKED})),
        ("text/plain; features=", frozenset()),
        ('text/plain; features=""', frozenset()),
        ("text/plain; charset=utf-8", frozenset()),
        ("text/plain; myfeatures=acked", frozenset()),
        ("features=acked", frozenset()),  # the media type, not a parameter
        ("text/plain", frozenset()),
        ("", frozenset()),
    ],
)
def test_hello_features(content_type: str, features: frozenset[str]) -> None:
    """The ``features`` parameter, whatever its quoting, spacing and name case; else nothing."""
    assert hello_features(content_type) == features


def test_the_agent_announces_both_features() -> None:
    assert hello_features(HELLO_CONTENT_TYPE) == BOTH


# --- a sigwire client facing an agent that announces nothing --------------------------


def _record_admitted(
    server: sigwire.Server, monkeypatch: pytest.MonkeyPatch
) -> list[sigwire.Envelope]:
    """Every envelope the server's dispatcher admits, in order (wraps ``admit``)."""
    admitted: list[sigwire.Envelope] = []
    dispatcher = server.dispatcher
    admit = dispatcher.admit

    def recording(envelope: sigwire.Envelope, **checks: bool) -> bool:
        fresh = admit(envelope, **checks)
        admitted.append(envelope)
        return fresh

    monkeypatch.setattr(dispatcher, "admit", recording)
    return admitted


@pytest.mark.parametrize("announced", [False, True], ids=["agent-announces-nothing", "features"])
@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_client_batch_signs_only_for_an_agent_that_announced_it(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    announced: bool,
) -> None:
    """64 pipelined requests through a window of 8: all answered; batches only if announced."""
    if not announced:
        # An agent on the earlier protocol: its hello reply names no feature.
        monkeypatch.setattr(sigwire.dispatch, "HELLO_CONTENT_TYPE", "text/plain; charset=utf-8")
    admitted = _record_admitted(server, monkeypatch)
    url = server.urls[("grpc", "ws").index(transport)]
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(
            url,
            identity=client_identity,
            expect_did=server.identity.did,
            learn_endpoints=False,
            # A window of 8: requests 9..64 go out only as acks come back.
            session=sigwire.SessionOptions(window=WINDOW),
        ) as peer,
    ):
        replies = await asyncio.gather(*(peer.request("echo", b"%d" % i) for i in range(PIPELINED)))
    assert [r.data for r in replies] == [b"%d" % i for i in range(PIPELINED)]
    requests = [e for e in admitted if e.kind != HELLO_KIND]
    assert len(requests) == PIPELINED
    assert all(e.signature is not None for e in admitted)
    batched = [e for e in admitted if e.signature and e.signature.batch is not None]
    if announced:
        assert len(batched) >= 2, "the client signed no batch for an agent that accepts them"
    else:
        assert batched == [], f"{len(batched)} batch-signed envelopes to an agent that never said"


# --- raw clients: acks in Frame.acked only for those that declared it -----------------


@pytest.mark.parametrize("declared", ["batch-only", "acked"])
@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_acks_ride_on_frames_only_for_a_client_that_declared_it(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    declared: str,
) -> None:
    """Sequential requests: Ack frames for a batch-only client, Frame.acked for an acked one."""
    # Out of reach: every ack then goes out with the flush of the reply it follows,
    # never on its own timer (which would make the frames depend on timing).
    monkeypatch.setattr(sigwire.session, "_ACK_DELAY", 30.0)
    metadata = {BATCH_SIGNATURES_KEY: "1"}
    if declared == "acked":
        metadata[ACKED_KEY] = "1"
    requests = 8
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(client_identity, server.identity.did, metadata)
        reply_acks: list[int] = []
        for i in range(requests):
            envelope = client_identity.sign_envelope(
                sigwire.Envelope.new("echo", b"%d" % i, sender=client_identity.did)
            )
            await stream.send_envelopes(envelope)
            sequence = stream._sent
            while True:
                frame = await stream.recv()
                assert frame is not None, "the stream ended"
                if any(r.request_id == envelope.id and r.final for r in frame.replies.replies):
                    reply_acks.append(frame.acked)
                    assert frame.acked in (0, sequence), (frame.acked, sequence)
                    break
        await _barrier(stream, 1)
    ack_frames = [f.ack.sequence for f in stream.frames if f.WhichOneof("body") == "ack"]
    # The hello is sequence 1, the requests 2..9: each acked exactly once, in order.
    everything = list(range(1, requests + 2))
    if declared == "acked":
        assert ack_frames == []
        assert [f.acked for f in stream.frames if f.acked] == everything
        assert reply_acks == everything[1:]
    else:
        assert [f.acked for f in stream.frames if f.acked] == [], (
            "Frame.acked to a peer that never said"
        )
        assert ack_frames == everything


async def _barrier(stream: RawStream, token: int) -> None:
    """Read until the Pong of ``token``: every frame the server wrote before is read."""
    await stream.send(pb.Frame(ping=pb.Ping(token=token)))
    while True:
        frame = await stream.recv()
        assert frame is not None, "the stream ended"
        if frame.WhichOneof("body") == "pong" and frame.pong.token == token:
            return


# --- (b) signed forms of cached replies ------------------------------------------------


async def _answered_batch_signed(
    server: sigwire.Server, probe: Probe, identity: sigwire.Identity
) -> tuple[list[sigwire.Envelope], dict[str, sigwire.Reply]]:
    """BATCH ``hold`` requests answered on a stream that declared batches; some batch-signed."""
    held = install_hold(server, probe)
    envelopes = [
        identity.sign_envelope(sigwire.Envelope.new("hold", b"%d" % i, sender=identity.did))
        for i in range(BATCH)
    ]
    async with open_raw(server, "ws") as stream:
        await stream.hello(identity, server.identity.did, {BATCH_SIGNATURES_KEY: "1"})
        await stream.send_envelopes(*envelopes)
        await release_after(held, probe, BATCH)
        replies = await stream.final_replies({e.id for e in envelopes})
    assert check_frame_batches(stream.reply_frames(), batched=True) >= 2
    assert len(held.envelopes) == BATCH
    return envelopes, replies


@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_batch_answer_resent_to_a_single_signature_stream_is_signed_alone(
    server: sigwire.Server, probe: Probe, client_identity: sigwire.Identity, transport: str
) -> None:
    """Exact re-sends on a stream that did not declare batches: no reply carries a proof."""
    async with asyncio.timeout(TIMEOUT):
        envelopes, first = await _answered_batch_signed(server, probe, client_identity)
        async with open_raw(server, transport) as stream:
            await stream.hello(client_identity, server.identity.did)  # no batches
            await stream.send_envelopes(*envelopes)  # the very same signed envelopes
            replies = await stream.final_replies({e.id for e in envelopes})
    assert check_frame_batches(stream.reply_frames(), batched=False) == 0
    verifier = sigwire.Verifier()
    for envelope in envelopes:
        reply = replies[envelope.id]
        assert reply.success, reply.error
        assert reply.data == first[envelope.id].data == envelope.payload
        assert reply.signature is not None
        assert reply.signature.batch is None
        verifier.verify_reply(reply, envelope, expected_responder=server.identity.did)


async def test_batch_answer_resent_by_unary_send_is_signed_alone(
    server: sigwire.Server, probe: Probe, client_identity: sigwire.Identity
) -> None:
    """An exact re-send through ``Send`` of a request answered batch-signed on a stream."""
    async with asyncio.timeout(TIMEOUT):
        envelopes, first = await _answered_batch_signed(server, probe, client_identity)
        batched = [e for e in envelopes if (s := first[e.id].signature) and s.batch is not None]
        assert batched
        channel = grpc.aio.insecure_channel(grpc_authority(server))
        try:
            answers = [await stub(channel).Send(to_pb(e)) for e in batched[:3]]
        finally:
            await channel.close(grace=None)
    for envelope, answer in zip(batched, answers, strict=False):
        reply = _proto.reply_from_pb(answer)
        assert reply.success, reply.error
        assert reply.data == envelope.payload
        assert reply.signature is not None
        assert reply.signature.batch is None
        sigwire.Verifier().verify_reply(reply, envelope, expected_responder=server.identity.did)


@pytest.mark.parametrize("batches", [False, True], ids=["single", "batch-signatures"])
@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_duplicates_of_a_streamed_request_cost_no_signature(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    batches: bool,
) -> None:
    """Three exact re-sends of a 50-part answer on its own stream: zero new signatures."""
    parts = 50
    signatures = 0
    sign = sigwire.Identity.sign

    def counting(self: sigwire.Identity, data: bytes) -> bytes:
        nonlocal signatures
        if self.did == server.identity.did:
            signatures += 1
        return sign(self, data)

    monkeypatch.setattr(sigwire.Identity, "sign", counting)
    envelope = client_identity.sign_envelope(
        sigwire.Envelope.new("count", b"%d" % parts, sender=client_identity.did)
    )
    metadata = {BATCH_SIGNATURES_KEY: "1"} if batches else None
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(client_identity, server.identity.did, metadata)
        await stream.send_envelopes(envelope)
        await stream.final_replies({envelope.id})
        before = signatures
        assert before >= 2  # the hello reply, and at least one for the parts
        for _ in range(3):
            await stream.send_envelopes(envelope)  # exact duplicate: answered from the cache
        answers: list[sigwire.Reply] = []
        while sum(1 for r in answers if r.final) < 3:
            frame = await stream.recv()
            assert frame is not None, "the stream ended"
            answers += [
                _proto.reply_from_pb(r)
                for r in frame.replies.replies
                if r.request_id == envelope.id
            ]
    assert signatures == before, f"{signatures - before} new signatures for 3 exact duplicates"
    assert len(answers) == 3 * (parts + 1)
    verifier = sigwire.Verifier()
    for reply in answers:
        assert reply.signature is not None
        if not batches:
            assert reply.signature.batch is None
        verifier.verify_reply(reply, envelope, expected_responder=server.identity.did)


# --- (c) re-signed retries are rated, replayed duplicates are not ----------------------

# One token per 1000 s: nothing refills within a test, so the counts are exact.
RATED = sigwire.Limits(rate=0.001, burst=3)


async def _send_each(server: sigwire.Server, envelopes: list[sigwire.Envelope]) -> list[str]:
    """Each envelope over ``Send`` in turn: the verified answer, or the refusal's reason."""
    results: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        channel = grpc.aio.insecure_channel(grpc_authority(server))
        try:
            for envelope in envelopes:
                try:
                    answer = await stub(channel).Send(to_pb(envelope))
                except grpc.aio.AioRpcError as exc:
                    results.append(rpc_failure(exc).info.reason)
                else:
                    reply = _proto.reply_from_pb(answer)
                    sigwire.Verifier().verify_reply(
                        reply, envelope, expected_responder=server.identity.did
                    )
                    results.append(reply.data.decode())
        finally:
            await channel.close(grace=None)
    return results


async def test_replayed_duplicates_over_send_do_not_drain_the_senders_bucket(
    make_server: MakeServer, probe: Probe, client_identity: sigwire.Identity
) -> None:
    """Burst 3 over ``Send``: 5 replays of a request are answered, and its sender keeps 2 tokens."""
    server = await make_server(limits=RATED)

    def echo(payload: bytes) -> sigwire.Envelope:
        return client_identity.sign_envelope(
            sigwire.Envelope.new("echo", payload, sender=client_identity.did)
        )

    envelope = echo(b"once")
    replayed = await _send_each(server, [envelope] * 6)
    assert replayed == ["once"] * 6
    assert probe.calls["echo"] == 1
    own = await _send_each(server, [echo(b"two"), echo(b"three"), echo(b"four")])
    assert own == ["two", "three", "RATE_LIMITED"]  # the bucket still holds its sender


@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_replayed_duplicates_on_a_stream_do_not_drain_the_senders_bucket(
    make_server: MakeServer, probe: Probe, client_identity: sigwire.Identity, transport: str
) -> None:
    """Burst 3 on a stream: the hello, the request and 5 of its duplicates leave a token."""
    server = await make_server(limits=RATED)

    def counted() -> sigwire.Envelope:
        return client_identity.sign_envelope(
            sigwire.Envelope.new("counted", b"", sender=client_identity.did)
        )

    envelope = counted()
    results: list[str] = []
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(client_identity, server.identity.did)
        for request in [envelope] * 6 + [counted(), counted()]:
            await stream.send_envelopes(request)
            reply = (await stream.final_replies({request.id}))[request.id]
            sigwire.Verifier().verify_reply(reply, request, expected_responder=server.identity.did)
            results.append(reply.error.reason if reply.error else reply.data.decode())
        await _barrier(stream, 1)  # still served after the refusal
    assert results == ["run 1"] * 6 + ["run 2", "RATE_LIMITED"]
    assert probe.calls["counted"] == 2


async def test_a_refused_resigned_retry_releases_its_nonce(
    make_server: MakeServer, probe: Probe, client_identity: sigwire.Identity
) -> None:
    """Burst 2 over ``Send``: the request, one re-signed retry, then a retry RATE_LIMITED.

    The refused retry ran nothing and was answered nothing: its nonce is free
    again, so the identical envelope may come back once a token is.
    """
    server = await make_server(limits=sigwire.Limits(rate=0.001, burst=2))
    first = sigwire.Envelope.new("echo", b"again", sender=client_identity.did)
    retries = [client_identity.sign_envelope(first.renewed()) for _ in range(2)]
    results = await _send_each(server, [client_identity.sign_envelope(first), *retries])
    assert results == ["again", "again", "RATE_LIMITED"]
    assert probe.calls["echo"] == 1
    guard = server.dispatcher.guard
    assert guard.check_and_mark(retries[1]) is True  # released: fresh once more
    assert guard.check_and_mark(retries[0]) is False  # answered: still a duplicate
