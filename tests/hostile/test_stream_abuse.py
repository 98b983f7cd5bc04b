"""Connect streams abused with well-formed frames, stolen hellos and forged replies.

Frames that decode but make no sense must be ignored (or refused per envelope)
without ending the stream; identity-level abuse (a replayed hello, a reply
forged onto another agent's push, an agent swapped in under a reconnecting
client) must not change who the server or the client is talking to.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from websockets.asyncio.client import connect as ws_connect

import sigwire
from sigwire import _proto
from sigwire.dispatch import HELLO_KIND
from sigwire.envelope import now_ms
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    PROTO,
    MakeServer,
    OpenChannel,
    assert_still_serves,
    frame_bytes,
    grpc_reply,
    outcome_async,
    raw_connect,
    replies_in,
    signed,
    verified_error,
)

pb = _proto.pb


def _frame(**body: object) -> bytes:
    return pb.Frame(**body).SerializeToString()  # type: ignore[arg-type]


NONSENSE: dict[str, bytes] = {
    "empty-frame": b"",
    "sequence-only": _frame(sequence=12345),
    "sequence-max": _frame(sequence=2**64 - 1),
    "ack-of-nothing": _frame(ack=pb.Ack(sequence=2**64 - 1)),
    "ack-zero": _frame(ack=pb.Ack(sequence=0)),
    "unsolicited-pong": _frame(pong=pb.Pong(token=99)),
    "goaway-from-the-client": _frame(goaway=pb.GoAway(reason="X", message="y" * 1000)),
    "reply-to-nothing": _frame(
        sequence=1, replies=pb.ReplyBatch(replies=[pb.Reply(request_id="nope", final=True)])
    ),
    "reply-empty": _frame(sequence=1, replies=pb.ReplyBatch(replies=[pb.Reply()])),
    "empty-envelope-batch": _frame(sequence=1, envelopes=pb.EnvelopeBatch()),
    "unknown-fields": _frame(ping=pb.Ping(token=5)) + b"\xa2\x06\x03abc",
    "unknown-body-field": b"\x42\x02\x08\x01",
    "empty-envelope": _frame(sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[pb.Envelope()])),
    "128-empty-envelopes": _frame(
        sequence=128, envelopes=pb.EnvelopeBatch(envelopes=[pb.Envelope()] * 128)
    ),
}


async def _alive_over_grpc(channel: grpc.aio.Channel, data: bytes) -> list[pb.Frame]:
    call = raw_connect(channel)
    await call.write(data)
    await call.write(_frame(ping=pb.Ping(token=424242)))
    frames = []
    while not frames or frames[-1].pong.token != 424242:
        answer = await call.read()
        assert answer is not grpc.aio.EOF, "the stream ended"
        frames.append(pb.Frame.FromString(answer))
    return frames


async def _alive_over_websocket(url: str, data: bytes) -> list[pb.Frame]:
    async with ws_connect(url, subprotocols=[PROTO]) as ws:
        await ws.send(data)
        await ws.send(_frame(ping=pb.Ping(token=424242)))
        frames = []
        while not frames or frames[-1].pong.token != 424242:
            answer = await ws.recv()
            assert isinstance(answer, bytes)
            frames.append(pb.Frame.FromString(answer))
        return frames


@pytest.mark.parametrize("data", NONSENSE.values(), ids=NONSENSE.keys())
@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_nonsense_frame_is_ignored(
    server: sigwire.Server, open_channel: OpenChannel, data: bytes, transport: str
) -> None:
    """A well-formed frame that makes no sense is ignored (or refused per envelope); Pings work."""
    async with asyncio.timeout(TIMEOUT):
        if transport == "grpc":
            frames = await _alive_over_grpc(open_channel(server), data)
        else:
            frames = await _alive_over_websocket(server.urls[1], data)
    for reply in replies_in(frames).values():
        assert reply.error is not None
        assert (reply.success, reply.error.reason) == (False, "MALFORMED")
    assert server.connected() == []
    await assert_still_serves(server)


async def _next_envelope(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> sigwire.Envelope:
    while True:
        data = await call.read()
        assert data is not grpc.aio.EOF, "the stream ended before an envelope"
        frame = pb.Frame.FromString(data)
        if frame.WhichOneof("body") == "envelopes":
            return _proto.envelope_from_pb(frame.envelopes.envelopes[0])


async def test_replayed_hello_does_not_take_over_the_agent(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A captured hello replayed on another stream is REPLAY; pushes still reach the agent."""
    channel = open_channel(server)
    hello = signed(client_identity, HELLO_KIND, recipient=server.identity.did)
    captured = frame_bytes(1, hello)
    async with asyncio.timeout(TIMEOUT):
        agent = raw_connect(channel)
        await agent.write(captured)
        assert (await grpc_reply(agent, hello.id)).success
        thief = raw_connect(channel)
        await thief.write(captured)
        replayed = await grpc_reply(thief, hello.id)
        assert verified_error(replayed, hello, server).reason == "REPLAY"
        pushing = asyncio.create_task(
            server.push(client_identity.did, "note", b"for the agent", timeout=TIMEOUT)
        )
        push = await _next_envelope(agent)
        answer = client_identity.sign_reply(
            sigwire.Reply(
                request_id=push.id,
                request_digest=push.digest(),
                responder=client_identity.did,
                data=b"the agent answers",
                created_at_ms=now_ms(),
            )
        )
        batch = pb.ReplyBatch(replies=[_proto.reply_to_pb(answer)])
        await agent.write(pb.Frame(sequence=2, replies=batch).SerializeToString())
        assert (await pushing).data == b"the agent answers"
    await assert_still_serves(server)


async def test_forged_reply_on_another_stream_does_not_fail_a_push(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A bogus reply to a push, sent on a stranger's stream, leaves the push to its agent."""
    pushed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    gate = asyncio.Event()
    mallory = sigwire.Identity.generate()
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            server.urls[0],
            identity=client_identity,
            expect_did=server.identity.did,
            learn_endpoints=False,
        ) as agent:

            @agent.on("note")
            async def note(msg: sigwire.Message) -> bytes:
                pushed.set_result(msg.id)
                await gate.wait()
                return b"the agent answers"

            pushing = asyncio.create_task(
                server.push(client_identity.did, "note", b"x", timeout=TIMEOUT)
            )
            push_id = await pushed
            stranger = raw_connect(open_channel(server))
            hello = signed(mallory, HELLO_KIND)
            await stranger.write(frame_bytes(1, hello))
            await grpc_reply(stranger, hello.id)
            forged = pb.Reply(
                request_id=push_id,
                responder=client_identity.did,
                success=True,
                data=b"forged",
                final=True,
                signature=pb.Signature(
                    signer=client_identity.did, algorithm="Ed25519", value=bytes(64)
                ),
            )
            await stranger.write(
                pb.Frame(sequence=2, replies=pb.ReplyBatch(replies=[forged])).SerializeToString()
            )
            # Frames are taken in order: once this echo is answered, the forgery was read.
            sync = signed(mallory, "echo", b"sync")
            await stranger.write(frame_bytes(3, sync))
            await grpc_reply(stranger, sync.id)
            gate.set()
            reply = await pushing
    assert reply.data == b"the agent answers"
    await assert_still_serves(server)


async def test_unpinned_peer_does_not_switch_agents_on_reconnect(
    server: sigwire.Server, make_server: MakeServer
) -> None:
    """A peer that authenticated agent A refuses agent B answering on A's address after a drop."""
    port = server.urls[0].rsplit(":", 1)[1]
    backoff = sigwire.Backoff(initial=0.05, maximum=0.1, attempts=3)
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], backoff=backoff, learn_endpoints=False) as peer:
            assert (await peer.request("echo", b"A")).responder == server.identity.did
            await server.stop(grace=0)
            impostor = await make_server(
                identity=sigwire.Identity.generate(), grpc=f"127.0.0.1:{port}"
            )
            # Re-sent or sent during the reconnect: answered by B, bound to A's DID.
            first = await outcome_async(peer.request("echo", b"during", timeout=TIMEOUT))
            assert isinstance(first, sigwire.SigwireError)
            after = await outcome_async(peer.request("echo", b"after", timeout=TIMEOUT))
    assert isinstance(after, sigwire.SigwireError), (
        f"the peer now talks to {peer.server_did}, not {server.identity.did}"
    )
    await assert_still_serves(impostor)


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_unsolicited_replies_are_dropped_before_any_verification(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    verifications: list[bytes],
    transport: str,
) -> None:
    """A frame of signed replies to requests nobody sent costs no signature check."""
    replies = [
        client_identity.sign_reply(
            sigwire.Reply(
                request_id=f"never-sent-{i}",
                request_digest=bytes(32),
                responder=client_identity.did,
                data=b"x",
                created_at_ms=now_ms(),
            )
        )
        for i in range(64)
    ]
    frame = _frame(
        sequence=1, replies=pb.ReplyBatch(replies=[_proto.reply_to_pb(r) for r in replies])
    )
    async with asyncio.timeout(TIMEOUT):
        if transport == "grpc":
            await _alive_over_grpc(open_channel(server), frame)
        else:
            await _alive_over_websocket(server.urls[1], frame)
    assert verifications == []
    await assert_still_serves(server)
