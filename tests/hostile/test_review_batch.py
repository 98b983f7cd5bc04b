"""Review of batch signatures, piggybacked acks and signing at egress.

The first three tests pin defects found in review (they were strict xfails
until fixed); the others pin properties verified along the way.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

import sigwire
import sigwire.session
from sigwire import _proto
from sigwire.batch import BatchProof, BatchProofError, merkle_tree, root_from_proof
from tests.conftest import TIMEOUT
from tests.hostile.conftest import MakeServer
from tests.parity.raw_stream import RawStream, open_raw

pb = _proto.pb


def _acked_by_ack_frames(stream: RawStream) -> int:
    return max((f.ack.sequence for f in stream.frames if f.WhichOneof("body") == "ack"), default=0)


async def _barrier(stream: RawStream, token: int) -> None:
    # The server writes frames in order: anything it wrote before answering
    # this ping (an Ack frame included) has been read once the Pong is.
    await stream.send(pb.Frame(ping=pb.Ping(token=token)))
    while True:
        frame = await stream.recv()
        assert frame is not None, "the stream ended"
        if frame.WhichOneof("body") == "pong" and frame.pong.token == token:
            return


async def test_peer_that_reads_only_ack_frames_gets_its_window_back(
    server: sigwire.Server, client_identity: sigwire.Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential requests from a client that did not announce Frame.acked support."""
    # Only removes timing luck: with a fast handler the 20 ms timer almost never
    # finds an ack that the reply frame has not already carried.
    monkeypatch.setattr(sigwire.session, "_ACK_DELAY", 30.0)
    window = 16  # the client's own window; sigwire's default is 256
    async with asyncio.timeout(TIMEOUT), open_raw(server, "ws") as stream:
        await stream.hello(client_identity, server.identity.did)  # no capability metadata
        for i in range(2 * window):
            if stream._sent + 1 - _acked_by_ack_frames(stream) > window:
                await _barrier(stream, i + 1)
                assert stream._sent + 1 - _acked_by_ack_frames(stream) <= window, (
                    f"window exhausted after {i} requests: no Ack frame ever came"
                )
            envelope = client_identity.sign_envelope(
                sigwire.Envelope.new("echo", b"%d" % i, sender=client_identity.did)
            )
            await stream.send_envelopes(envelope)
            reply = (await stream.final_replies({envelope.id}))[envelope.id]
            assert reply.data == b"%d" % i


async def test_duplicate_of_a_streamed_request_does_not_resign_every_part(
    server: sigwire.Server, client_identity: sigwire.Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three exact re-sends of a 200-part answer: far fewer than 3 x 201 signatures."""
    parts = 200
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
    async with asyncio.timeout(TIMEOUT), open_raw(server, "ws") as stream:
        await stream.hello(client_identity, server.identity.did)  # single signatures
        await stream.send_envelopes(envelope)
        await stream.final_replies({envelope.id})
        before = signatures
        for _ in range(3):
            await stream.send_envelopes(envelope)  # exact duplicate: answered from the cache
        finals = 0
        while finals < 3:
            frame = await stream.recv()
            assert frame is not None
            finals += sum(
                1 for r in frame.replies.replies if r.request_id == envelope.id and r.final
            )
    assert signatures - before < parts + 1, f"{signatures - before} signatures for 3 duplicates"


async def test_stored_answer_of_another_key_is_never_written_unsigned(
    make_server: MakeServer, client_identity: sigwire.Identity, tmp_path: Path
) -> None:
    """Restart on the same store under a new identity; re-send a request answered before."""
    path = tmp_path / "agent.db"
    envelope = client_identity.sign_envelope(
        sigwire.Envelope.new("echo", b"stored", sender=client_identity.did)
    )
    first = await make_server(store=path, identity=sigwire.Identity.generate())
    async with asyncio.timeout(TIMEOUT):
        async with open_raw(first, "grpc") as stream:
            await stream.hello(client_identity, first.identity.did)
            await stream.send_envelopes(envelope)
            await stream.final_replies({envelope.id})
        await first.stop(grace=0)
        second = await make_server(store=path, identity=sigwire.Identity.generate())
        async with open_raw(second, "ws") as stream:
            await stream.hello(client_identity, second.identity.did)
            await stream.send_envelopes(envelope)
            reply = (await stream.final_replies({envelope.id}))[envelope.id]
    assert reply.signature is not None, f"unsigned reply on the wire, by {reply.responder}"
    sigwire.Verifier().verify_reply(reply, envelope, expected_responder=second.identity.did)


@pytest.mark.parametrize("size", [*range(1, 70), 127, 128, 129, 1000])
def test_a_genuine_path_verifies_under_its_own_index_only(size: int) -> None:
    """For a given (signed) size, no other index turns a leaf's path into the same root."""
    leaves = [hashlib.sha256(b"%d" % i).digest() for i in range(size)]
    root, paths = merkle_tree(leaves)
    indices = range(size) if size < 200 else [0, 1, 2, 511, 512, 997, 998, 999]
    for i in indices:
        assert root_from_proof(leaves[i], BatchProof(i, size, paths[i])) == root
        for j in range(size):
            if j == i:
                continue
            try:
                other = root_from_proof(leaves[i], BatchProof(j, size, paths[i]))
            except BatchProofError:
                continue
            assert other != root, (size, i, j)
