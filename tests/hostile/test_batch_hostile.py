"""Forged batch signatures on Connect streams and unary RPCs.

A frame of batch-signed envelopes is verified with one Ed25519 check per batch
(docs/signing.md 4.5); a message whose proof was tampered with must still be
judged alone: it gets a signed SIGNATURE_INVALID reply, its siblings in the
same frame are served, and the server keeps serving everyone. A proof too long
to be genuine is refused before anything is hashed, without hanging.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import grpc
import grpc.aio
import pytest
import websockets

import sigwire
from sigwire import _proto
from sigwire.batch import MAX_PATH_LENGTH, BatchProof, leaf_hash, merkle_tree
from sigwire.dispatch import BATCH_SIGNATURES_KEY
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    OpenChannel,
    Probe,
    assert_still_serves,
    envelope_bytes,
    raw_unary,
    send_refused,
    verified_error,
)
from tests.integration.helpers import rpc_failure
from tests.parity.raw_stream import RAW_TRANSPORTS, RawStream, open_raw

BATCH = 6
VICTIM = 3

Forge = Callable[[list[sigwire.Envelope], int, sigwire.Identity], sigwire.Envelope]
"""Turns message ``i`` of a genuine batch into a forgery (the batch and signer are given)."""


def _sig(env: sigwire.Envelope) -> sigwire.Signature:
    assert env.signature is not None
    return env.signature


def _proof(env: sigwire.Envelope) -> BatchProof:
    assert env.signature is not None
    assert env.signature.batch is not None
    return env.signature.batch


def _set_proof(env: sigwire.Envelope, proof: BatchProof | None) -> sigwire.Envelope:
    assert env.signature is not None
    return dataclasses.replace(env, signature=dataclasses.replace(env.signature, batch=proof))


def _wrong_index(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    return _set_proof(batch[i], dataclasses.replace(_proof(batch[i]), index=(i + 1) % len(batch)))


def _sibling_path(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    sibling = _proof(batch[i - 1])
    return _set_proof(batch[i], dataclasses.replace(_proof(batch[i]), path=sibling.path))


def _sibling_proof(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    return _set_proof(batch[i], _proof(batch[i - 1]))


def _forged_root(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    # Another payload, with a proof that is perfectly consistent, but for a tree
    # (and root) the signer never signed: the shared value is kept.
    forged = dataclasses.replace(batch[i], payload=b"forged")
    leaves = [leaf_hash(m.signing_input()) for m in [*batch[:i], forged, *batch[i + 1 :]]]
    paths = merkle_tree(leaves)[1]
    return _set_proof(forged, BatchProof(i, len(batch), paths[i]))


def _size(delta: int) -> Forge:
    def forge(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
        proof = _proof(batch[i])
        return _set_proof(batch[i], dataclasses.replace(proof, size=proof.size + delta))

    return forge


def _size_same_root(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    # Leaf 0 of 6 takes the same steps in a tree of 7: the root is unchanged,
    # only the signed size can refuse it.
    assert _proof(batch[0]).size == 6
    return _set_proof(batch[0], dataclasses.replace(_proof(batch[0]), size=7))


def _tampered(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    return dataclasses.replace(batch[i], payload=b"tampered")


def _proof_removed(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    return _set_proof(batch[i], None)


def _proof_of_one(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    return _set_proof(batch[i], BatchProof(0, 1, ()))


def _short_hash(batch: list[sigwire.Envelope], i: int, _: sigwire.Identity) -> sigwire.Envelope:
    proof = _proof(batch[i])
    return _set_proof(
        batch[i], dataclasses.replace(proof, path=(proof.path[0][:31], *proof.path[1:]))
    )


def _other_batch_value(
    batch: list[sigwire.Envelope], i: int, me: sigwire.Identity
) -> sigwire.Envelope:
    other = me.sign_batch(
        [sigwire.Envelope.new("echo", b"other %d" % k, sender=me.did) for k in range(len(batch))]
    )
    value = _sig(other[i]).value
    return dataclasses.replace(batch[i], signature=dataclasses.replace(_sig(batch[i]), value=value))


FORGERIES: dict[str, Forge] = {
    "wrong-index": _wrong_index,
    "sibling-path": _sibling_path,
    "sibling-proof": _sibling_proof,
    "forged-root": _forged_root,
    "size-plus-1": _size(+1),
    "size-minus-1": _size(-1),
    "size-same-root": _size_same_root,
    "tampered-payload": _tampered,
    "proof-removed": _proof_removed,
    "proof-of-one": _proof_of_one,
    "hash-31-bytes": _short_hash,
    "other-batch-value": _other_batch_value,
}


def _genuine_batch(me: sigwire.Identity) -> list[sigwire.Envelope]:
    return me.sign_batch(
        [sigwire.Envelope.new("echo", b"%d" % k, sender=me.did) for k in range(BATCH)]
    )


def _victim_index(name: str) -> int:
    return 0 if name == "size-same-root" else VICTIM


async def _one_forged_in_a_frame(
    server: sigwire.Server,
    stream: RawStream,
    me: sigwire.Identity,
    forge: Forge,
    victim: int,
) -> tuple[sigwire.Envelope, list[sigwire.Envelope], dict[str, sigwire.Reply]]:
    batch = _genuine_batch(me)
    forged = forge(batch, victim, me)
    frame = [*batch[:victim], forged, *batch[victim + 1 :]]
    await stream.hello(me, server.identity.did, {BATCH_SIGNATURES_KEY: "1"})
    await stream.send_envelopes(*frame)
    replies = await stream.final_replies({e.id for e in frame})
    return forged, [e for k, e in enumerate(batch) if k != victim], replies


@pytest.mark.parametrize("forgery", FORGERIES)
@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_one_forged_batch_message_is_refused_alone(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    probe: Probe,
    transport: str,
    forgery: str,
) -> None:
    """The forged message gets SIGNATURE_INVALID; its five siblings are served; the server lives."""
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        forged, siblings, replies = await _one_forged_in_a_frame(
            server, stream, client_identity, FORGERIES[forgery], _victim_index(forgery)
        )
        # The same stream goes on serving.
        after = client_identity.sign_envelope(
            sigwire.Envelope.new("echo", b"after", sender=client_identity.did)
        )
        await stream.send_envelopes(after)
        assert (await stream.final_replies({after.id}))[after.id].data == b"after"
    error = verified_error(replies[forged.id], forged, server)
    assert error.reason == "SIGNATURE_INVALID"
    for sibling in siblings:
        reply = replies[sibling.id]
        sigwire.Verifier().verify_reply(reply, sibling, expected_responder=server.identity.did)
        assert reply.success
        assert reply.data == sibling.payload
    assert probe.calls == {"echo": BATCH}  # five siblings and the one after, never the forgery
    await assert_still_serves(server)


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_forged_batch_message_alone_in_its_frame_is_refused(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    probe: Probe,
    forgery: str,
) -> None:
    """Alone in a frame (verified inline, not in a batch) the forgery is refused just the same."""
    batch = _genuine_batch(client_identity)
    forged = FORGERIES[forgery](batch, _victim_index(forgery), client_identity)
    async with asyncio.timeout(TIMEOUT), open_raw(server, "grpc") as stream:
        await stream.hello(client_identity, server.identity.did)
        await stream.send_envelopes(forged)
        reply = (await stream.final_replies({forged.id}))[forged.id]
    assert verified_error(reply, forged, server).reason == "SIGNATURE_INVALID"
    assert probe.calls == {}
    await assert_still_serves(server)


@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_several_batches_interleaved_in_one_frame_are_all_served(
    server: sigwire.Server, client_identity: sigwire.Identity, probe: Probe, transport: str
) -> None:
    """Two batches interleaved with single signatures in one frame: every envelope served."""
    one = _genuine_batch(client_identity)
    two = _genuine_batch(client_identity)
    single = [
        client_identity.sign_envelope(
            sigwire.Envelope.new("echo", b"single %d" % k, sender=client_identity.did)
        )
        for k in range(3)
    ]
    frame = [m for k in range(BATCH) for m in (one[k], two[k], *single[k : k + 1])]
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(client_identity, server.identity.did)
        await stream.send_envelopes(*frame)
        replies = await stream.final_replies({e.id for e in frame})
    for envelope in frame:
        reply = replies[envelope.id]
        assert reply.success, reply.error
        sigwire.Verifier().verify_reply(reply, envelope, expected_responder=server.identity.did)
    assert probe.calls == {"echo": len(frame)}


async def test_stolen_batch_message_resent_by_another_sender_is_refused(
    server: sigwire.Server, client_identity: sigwire.Identity, probe: Probe
) -> None:
    """A batch message re-labelled as another sender's (same value and proof) is refused."""
    mallory = sigwire.Identity.generate()
    batch = _genuine_batch(client_identity)
    stolen = dataclasses.replace(
        batch[1],
        sender=mallory.did,
        signature=dataclasses.replace(_sig(batch[1]), signer=mallory.did),
    )
    own = mallory.sign_envelope(sigwire.Envelope.new("echo", b"own", sender=mallory.did))
    async with asyncio.timeout(TIMEOUT), open_raw(server, "ws") as stream:
        await stream.hello(mallory, server.identity.did)
        await stream.send_envelopes(own, stolen)
        replies = await stream.final_replies({own.id, stolen.id})
    assert verified_error(replies[stolen.id], stolen, server).reason == "SIGNATURE_INVALID"
    assert replies[own.id].data == b"own"
    assert probe.calls == {"echo": 1}
    await assert_still_serves(server)


# --- proofs too long to be genuine ------------------------------------------------------


def _overlong(me: sigwire.Identity, length: int) -> tuple[list[sigwire.Envelope], sigwire.Envelope]:
    batch = _genuine_batch(me)
    bad = _set_proof(
        batch[VICTIM],
        dataclasses.replace(_proof(batch[VICTIM]), path=(b"\x07" * 32,) * length),
    )
    return batch, bad


@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_10000_hash_proof_in_a_frame_is_refused_without_hanging(
    server: sigwire.Server, client_identity: sigwire.Identity, probe: Probe, transport: str
) -> None:
    """A 10,000-hash proof among valid envelopes ends in MALFORMED, promptly; the server lives."""
    batch, bad = _overlong(client_identity, 10_000)
    frame = [*batch[:VICTIM], bad, *batch[VICTIM + 1 :]]
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(client_identity, server.identity.did)
        await stream.send_envelopes(*frame)
        outcome: dict[str, sigwire.Reply] | Exception
        try:
            outcome = await stream.final_replies({bad.id})
        except (grpc.aio.AioRpcError, websockets.ConnectionClosedError) as exc:
            outcome = exc
    if isinstance(outcome, grpc.aio.AioRpcError):
        # The frame is refused before any envelope is built: the stream ends.
        failure = rpc_failure(outcome)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.info.reason == "MALFORMED"
    elif isinstance(outcome, websockets.ConnectionClosedError):
        assert outcome.rcvd is not None
        assert outcome.rcvd.code == 1007
        assert outcome.rcvd.reason.startswith("MALFORMED")
    else:
        # Or, should a receiver judge the message alone: a signed refusal of it.
        assert isinstance(outcome, dict)
        error = verified_error(outcome[bad.id], bad, server)
        assert error.reason in {"MALFORMED", "SIGNATURE_INVALID"}
    assert probe.calls["echo"] <= BATCH - 1
    await assert_still_serves(server)


@pytest.mark.parametrize("length", [MAX_PATH_LENGTH + 1, 10_000])
async def test_overlong_proof_on_send_is_malformed(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    length: int,
) -> None:
    """Send with a proof over MAX_PATH_LENGTH hashes: INVALID_ARGUMENT / MALFORMED, no handler."""
    _, bad = _overlong(client_identity, length)
    failure = await send_refused(open_channel(server), envelope_bytes(bad))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.info.reason == "MALFORMED"
    assert probe.calls == {}
    await assert_still_serves(server)


async def test_max_length_bogus_proof_on_send_is_signature_invalid(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """MAX_PATH_LENGTH bogus hashes decode, then fail the proof check: SIGNATURE_INVALID."""
    _, bad = _overlong(client_identity, MAX_PATH_LENGTH)
    failure = await send_refused(open_channel(server), envelope_bytes(bad))
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED
    assert failure.info.reason == "SIGNATURE_INVALID"


async def test_batch_signed_envelope_on_send_is_answered_singly(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A batch-signed envelope verifies alone on Send; its reply is bound to it and signed alone."""
    batch = _genuine_batch(client_identity)
    channel = open_channel(server)
    async with asyncio.timeout(TIMEOUT):
        data = await raw_unary(channel, "Send")(envelope_bytes(batch[2]))
    reply = _proto.decode_reply(data)
    sigwire.Verifier().verify_reply(reply, batch[2], expected_responder=server.identity.did)
    assert reply.data == b"2"
    assert reply.signature is not None
    assert reply.signature.batch is None
    with pytest.raises(sigwire.InvalidSignatureError):
        sigwire.Verifier().verify_reply(reply, batch[3])
