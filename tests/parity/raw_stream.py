"""A Connect stream driven frame by frame, as a client in another language would drive it.

One small interface over three wire forms: gRPC ``Connect`` (plain grpc.aio, no
serializers), WebSocket ``sigwire.v1.proto`` (binary Frames) and WebSocket
``sigwire.v1.json`` (Frames in protobuf's JSON mapping). Nothing here goes
through sigwire's own transports or sessions: what the server writes is
exactly what the test reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import grpc
import grpc.aio
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

import sigwire
from sigwire import _proto
from sigwire.dispatch import HELLO_KIND

pb = _proto.pb

RAW_TRANSPORTS = ("grpc", "ws", "ws-json")
"""The wire forms :func:`open_raw` speaks."""

CONNECT = "/sigwire.v1.AgentTransport/Connect"
PROTO = Subprotocol("sigwire.v1.proto")
JSON = Subprotocol("sigwire.v1.json")


class RawStream:
    """One raw Connect stream: write Frames, read Frames, keep every Frame read.

    Attributes:
        frames: Every Frame received so far, in order.
    """

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None,
        ws: ClientConnection | None = None,
        *,
        json: bool = False,
    ) -> None:
        self._call = call
        self._ws = ws
        self._json = json
        self._sent = 0
        self.frames: list[pb.Frame] = []

    async def send(self, frame: pb.Frame) -> None:
        """Write one Frame as this wire form carries it."""
        data = frame.SerializeToString()
        if self._call is not None:
            await self._call.write(data)
        else:
            assert self._ws is not None
            await self._ws.send(_proto.frame_to_json(data) if self._json else data)

    async def send_envelopes(self, *envelopes: sigwire.Envelope, acked: int = 0) -> None:
        """Write ``envelopes`` in ONE frame, with the right sequence number (and an ack)."""
        self._sent += len(envelopes)
        batch = pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(e) for e in envelopes])
        await self.send(pb.Frame(sequence=self._sent, envelopes=batch, acked=acked))

    async def send_replies(self, *replies: sigwire.Reply, acked: int = 0) -> None:
        """Write ``replies`` in ONE frame, with the right sequence number (and an ack)."""
        self._sent += len(replies)
        batch = pb.ReplyBatch(replies=[_proto.reply_to_pb(r) for r in replies])
        await self.send(pb.Frame(sequence=self._sent, replies=batch, acked=acked))

    async def recv(self) -> pb.Frame | None:
        """The next Frame, or None once the server ended the stream cleanly."""
        if self._call is not None:
            data = await self._call.read()
            if data is grpc.aio.EOF:
                return None
            assert isinstance(data, bytes)
        else:
            assert self._ws is not None
            try:
                message = await self._ws.recv()
            except websockets.ConnectionClosedOK:
                return None
            if self._json:
                assert isinstance(message, str), "binary message on sigwire.v1.json"
                data = _proto.frame_from_json(message)
            else:
                assert isinstance(message, bytes), "text message on sigwire.v1.proto"
                data = message
        frame = pb.Frame.FromString(data)
        self.frames.append(frame)
        return frame

    async def final_replies(self, ids: set[str]) -> dict[str, sigwire.Reply]:
        """Read until every id in ``ids`` has its final reply; those replies by request id."""
        found: dict[str, sigwire.Reply] = {}
        while not ids <= set(found):
            frame = await self.recv()
            assert frame is not None, f"the stream ended before replies to {ids - set(found)}"
            for msg in frame.replies.replies:
                reply = _proto.reply_from_pb(msg)
                if reply.final and reply.request_id in ids:
                    found[reply.request_id] = reply
        return found

    async def hello(
        self,
        identity: sigwire.Identity,
        server_did: str,
        metadata: Mapping[str, str] | None = None,
    ) -> sigwire.Reply:
        """Open the stream with a signed hello to ``server_did``; its verified reply."""
        hello = identity.sign_envelope(
            sigwire.Envelope.new(
                HELLO_KIND, sender=identity.did, recipient=server_did, metadata=metadata
            )
        )
        await self.send_envelopes(hello)
        reply = (await self.final_replies({hello.id}))[hello.id]
        sigwire.Verifier().verify_reply(reply, hello, expected_responder=server_did)
        assert reply.success, reply.error
        return reply

    def reply_frames(self) -> list[list[sigwire.Reply]]:
        """The replies of every reply frame received so far, frame by frame."""
        return [
            [_proto.reply_from_pb(msg) for msg in frame.replies.replies]
            for frame in self.frames
            if frame.WhichOneof("body") == "replies"
        ]


def grpc_authority(server: sigwire.Server) -> str:
    """``HOST:PORT`` of the server's gRPC listener (its first URL)."""
    url = next(u for u in server.urls if u.startswith("grpc://"))
    return url.removeprefix("grpc://")


def ws_url(server: sigwire.Server) -> str:
    """The server's ws:// URL."""
    return next(u for u in server.urls if u.startswith("ws://"))


@contextlib.asynccontextmanager
async def open_raw(server: sigwire.Server, transport: str) -> AsyncIterator[RawStream]:
    """A raw Connect stream to ``server`` over ``transport`` (one of RAW_TRANSPORTS)."""
    if transport == "grpc":
        channel = grpc.aio.insecure_channel(
            grpc_authority(server), options=[("grpc.max_send_message_length", -1)]
        )
        call = channel.stream_stream(CONNECT)()
        try:
            yield RawStream(call)
        finally:
            call.cancel()
            await channel.close(grace=None)
    else:
        subprotocol = JSON if transport == "ws-json" else PROTO
        async with ws_connect(ws_url(server), subprotocols=[subprotocol], max_size=None) as ws:
            yield RawStream(ws=ws, json=transport == "ws-json")
