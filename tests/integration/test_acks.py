"""Cumulative acks on a raw Connect stream, as another-language client sees them."""

from __future__ import annotations

import asyncio

import grpc.aio

import sigwire
from sigwire import _proto
from sigwire._proto import pb
from tests.conftest import TIMEOUT
from tests.integration.conftest import OpenChannel


async def _next_ack(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> int:
    while True:
        frame = pb.Frame()
        frame.ParseFromString(await call.read())
        # Standalone, or riding on a data frame (Frame.acked).
        if frame.WhichOneof("body") == "ack":
            return frame.ack.sequence
        if frame.acked:
            return frame.acked


async def test_a_frame_of_replies_alone_is_acknowledged(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """The server acks a replies-only frame (taken in charge on arrival) without waiting."""
    call = open_channel(server.urls[0]).stream_stream("/sigwire.v1.AgentTransport/Connect")()
    hello = client_identity.sign_envelope(
        sigwire.Envelope.new("sigwire.hello", sender=client_identity.did)
    )
    stray = client_identity.sign_reply(
        sigwire.Reply(
            request_id="nothing-asked",
            request_digest=bytes(32),
            responder=client_identity.did,
            created_at_ms=sigwire.envelope.now_ms(),
        )
    )
    async with asyncio.timeout(TIMEOUT):
        await call.write(
            pb.Frame(
                sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(hello)])
            ).SerializeToString()
        )
        assert await _next_ack(call) == 1
        await call.write(
            pb.Frame(
                sequence=2, replies=pb.ReplyBatch(replies=[_proto.reply_to_pb(stray)])
            ).SerializeToString()
        )
        assert await _next_ack(call) == 2
        call.cancel()


async def test_a_hello_must_name_this_server(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A hello naming no recipient, or another agent (a relayed hello), binds nothing."""
    call = open_channel(server.urls[0]).stream_stream("/sigwire.v1.AgentTransport/Connect")()
    elsewhere = sigwire.Identity.generate().did
    async with asyncio.timeout(TIMEOUT):
        for sequence, recipient in enumerate(("", elsewhere), start=1):
            hello = client_identity.sign_envelope(
                sigwire.Envelope.new(
                    "sigwire.hello", sender=client_identity.did, recipient=recipient
                )
            )
            await call.write(
                pb.Frame(
                    sequence=sequence,
                    envelopes=pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(hello)]),
                ).SerializeToString()
            )
            while True:
                frame = pb.Frame.FromString(await call.read())
                if frame.WhichOneof("body") == "replies":
                    break
            [reply] = frame.replies.replies
            assert not reply.success
            assert reply.error.reason == "RECIPIENT_MISMATCH"
        call.cancel()
    assert server.connected() == []
