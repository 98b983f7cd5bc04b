"""Acks riding on any frame (``Frame.acked``, docs/protocol.md 2) release the server's window.

A raw client answers the server's pushes and acknowledges them only through
``Frame.acked``: on its reply frames, or on Ping frames. With a window of 4 and
10 pushes, a server that ignored ``acked`` would stall after the fourth push.
"""

from __future__ import annotations

import asyncio

import pytest

import sigwire
from sigwire import _proto
from sigwire.envelope import now_ms
from tests.conftest import TIMEOUT
from tests.parity.conftest import MakeServer
from tests.parity.raw_stream import RAW_TRANSPORTS, RawStream, open_raw

pb = _proto.pb
WINDOW = 4
PUSHES = 10


async def _answer_pushes(stream: RawStream, me: sigwire.Identity, carrier: str) -> int:
    """Answer PUSHES pushes, acknowledging them as ``carrier`` says; the largest envelope frame."""
    answered = 0
    largest = 0
    while answered < PUSHES:
        frame = await stream.recv()
        assert frame is not None, "the stream ended"
        if frame.WhichOneof("body") != "envelopes":
            continue
        envelopes = [_proto.envelope_from_pb(m) for m in frame.envelopes.envelopes]
        largest = max(largest, len(envelopes))
        replies = []
        for envelope in envelopes:
            sigwire.Verifier().verify_envelope(envelope)
            replies.append(
                me.sign_reply(
                    sigwire.Reply(
                        request_id=envelope.id,
                        request_digest=envelope.digest(),
                        responder=me.did,
                        data=b"ok " + envelope.payload,
                        created_at_ms=now_ms(),
                    )
                )
            )
        if carrier == "reply-frame":
            await stream.send_replies(*replies, acked=frame.sequence)
        elif carrier == "ping-frame":
            await stream.send_replies(*replies)
            await stream.send(pb.Frame(ping=pb.Ping(token=frame.sequence), acked=frame.sequence))
        else:
            await stream.send_replies(*replies)
            await stream.send(pb.Frame(ack=pb.Ack(sequence=frame.sequence)))
        answered += len(envelopes)
    return largest


@pytest.mark.parametrize("carrier", ["reply-frame", "ping-frame", "ack-frame"])
@pytest.mark.parametrize("transport", RAW_TRANSPORTS)
async def test_acks_on_any_frame_release_the_window(
    make_server: MakeServer, transport: str, carrier: str
) -> None:
    """10 pushes through a window of 4 complete when acks ride on replies or pings."""
    server = await make_server(limits=sigwire.Limits(window=WINDOW))
    me = sigwire.Identity.generate()
    async with asyncio.timeout(TIMEOUT), open_raw(server, transport) as stream:
        await stream.hello(me, server.identity.did)
        pushes = [
            asyncio.create_task(server.push(me.did, "ask", b"%d" % i, timeout=TIMEOUT))
            for i in range(PUSHES)
        ]
        largest = await _answer_pushes(stream, me, carrier)
        replies = await asyncio.gather(*pushes)
    assert [r.data for r in replies] == [b"ok %d" % i for i in range(PUSHES)]
    assert largest <= WINDOW
