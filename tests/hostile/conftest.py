"""Fixtures of the hostile suite: real servers on 127.0.0.1:0 and raw clients that misbehave.

Hostile input goes in through plain grpc.aio channels (no serializers) and raw
``websockets`` connections, exactly as a peer in another language would send
it. Every test then checks, in the same body, that a well-behaved sigwire
client is still served. Everything is function-scoped: grpc.aio objects belong
to the event loop that created them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

import sigwire
from sigwire import _proto
from tests import servers
from tests.conftest import TIMEOUT
from tests.integration.helpers import RpcFailure, rpc_failure
from tests.servers import SECRET, MakeServer

pb = _proto.pb
Code = grpc.StatusCode

PROTO = Subprotocol("sigwire.v1.proto")
JSON = Subprotocol("sigwire.v1.json")
SERVICE = "/sigwire.v1.AgentTransport/"

DOCUMENTED_STATUS: dict[str, grpc.StatusCode] = {
    "MALFORMED": Code.INVALID_ARGUMENT,
    "PAYLOAD_TOO_LARGE": Code.RESOURCE_EXHAUSTED,
    "RECIPIENT_MISMATCH": Code.PERMISSION_DENIED,
    "SIGNATURE_MISSING": Code.UNAUTHENTICATED,
    "SIGNATURE_INVALID": Code.UNAUTHENTICATED,
    "ALGORITHM_UNSUPPORTED": Code.UNAUTHENTICATED,
    "DID_INVALID": Code.UNAUTHENTICATED,
    "SIGNER_UNKNOWN": Code.PERMISSION_DENIED,
    "REPLAY": Code.UNAUTHENTICATED,
    "TIMESTAMP_OUT_OF_WINDOW": Code.UNAUTHENTICATED,
    "KIND_UNKNOWN": Code.UNIMPLEMENTED,
    "RATE_LIMITED": Code.RESOURCE_EXHAUSTED,
    "OVERLOADED": Code.RESOURCE_EXHAUSTED,
    "HANDLER_FAILED": Code.INTERNAL,
    "SHUTTING_DOWN": Code.UNAVAILABLE,
}
"""Reason -> gRPC status, as the table of docs/signing.md section 10 lists them."""

# -- garbage -----------------------------------------------------------------------

# Undecodable as an Envelope AND as a Frame: valid for every method.
UNDECODABLE = {
    "truncated-tag": b"\xff",
    "overlong-varint": b"\x80" * 11,
    "length-4GiB": b"\x0a\xff\xff\xff\xff\x0f",
    "length-beyond-end": b"\x12\x05abc",
    "wire-type-6": b"\x0e",
    "wire-type-7": b"\x0f\x00",
    "stray-end-group": b"\x0c",
    "unterminated-group": b"\x0b\x08\x01",
    "groups-10000-deep": b"\x0b" * 10_000,
    "field-number-zero": b"\x00",
    "all-zero": b"\x00" * 64,
    "nested-bad-utf8": b"\x12\x06\x0a\x04\x0a\x02\xff\xfe",
    "nested-truncated": b"\x12\x10\x0a\x0e\x0a\x20",
    "http1-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "json": b'{"id": "x", "kind": "echo"}',
    "random-4k": random.Random(1).randbytes(4096),
}
# Undecodable as an Envelope only (a Frame skips field 1 of the wrong wire type).
ENVELOPE_ONLY = {
    "bad-utf8-id": b"\x0a\x02\xff\xfe",
    "bad-utf8-metadata": b"\x52\x06\x0a\x02\xc3\x28\x12\x00",
}
# Decodable, but an Envelope that breaks the validation rules (empty id, kind or nonce).
INVALID = {
    "empty": b"",
    "only-unknown-fields": b"\xa2\x06\x03abc",
    "a-reply": _proto.reply_to_pb(
        sigwire.Reply(request_id="r", request_digest=b"d" * 32, responder="did:key:z", data=b"x")
    ).SerializeToString(),
    "a-card": _proto.card_to_pb(
        sigwire.AgentCard(did="did:key:z6Mk", name="echo", endpoints=("grpc://x",))
    ).SerializeToString(),
    "a-frame": pb.Frame(sequence=1, ping=pb.Ping(token=1)).SerializeToString(),
}


class Probe(servers.Probe):
    """What the hostile-suite handlers did, and a gate the test opens.

    Attributes:
        calls: Invocations per kind.
        entered: Set when a ``block`` invocation has started.
        gate: ``block`` invocations wait for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()


def install_handlers(server: sigwire.Server, probe: Probe) -> None:
    """Register the kinds every hostile-suite server serves."""
    servers.install_shared_handlers(
        server,
        probe,
        block_entered=lambda _: probe.entered.set(),
        empty_count_is_zero=True,
    )

    @server.on("crash_stream")
    async def crash_stream(msg: sigwire.Message) -> AsyncIterator[str]:
        probe.calls["crash_stream"] += 1
        yield "part 0"
        raise RuntimeError(SECRET)

    @server.on("wrong_type")
    async def wrong_type(msg: sigwire.Message) -> bytes:
        probe.calls["wrong_type"] += 1
        return 42  # type: ignore[return-value]  # the hostile part: not bytes, str or None

    @server.on("too_big")
    async def too_big(msg: sigwire.Message) -> bytes:
        probe.calls["too_big"] += 1
        return b"x" * (server.limits.max_message_size + 1)


@pytest.fixture
def probe() -> Probe:
    """Observations of the handlers, shared by every server of a test."""
    return Probe()


@pytest.fixture
async def make_server(server_identity: sigwire.Identity, probe: Probe) -> AsyncIterator[MakeServer]:
    """Start servers with the hostile-suite handlers, on gRPC and WebSocket at 127.0.0.1:0."""
    async with servers.serving(
        server_identity,
        probe,
        install_handlers,
        lambda: {"grpc": servers.LOCAL, "ws": servers.LOCAL},
        stop_timeout=TIMEOUT,
        check_sessions_ended=True,
    ) as make:
        yield make


@pytest.fixture
async def server(make_server: MakeServer) -> sigwire.Server:
    """A plaintext gRPC + WebSocket server with default limits."""
    return await make_server()


@pytest.fixture
async def small_server(make_server: MakeServer) -> sigwire.Server:
    """A server accepting payloads of at most 1 KiB."""
    return await make_server(limits=sigwire.Limits(max_message_size=1024))


OpenChannel = Callable[[sigwire.Server], grpc.aio.Channel]


@pytest.fixture
async def open_channel() -> AsyncIterator[OpenChannel]:
    """Plain grpc.aio channels to a server's gRPC listener, closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def open_(server: sigwire.Server) -> grpc.aio.Channel:
        authority = server.urls[0].removeprefix("grpc://")
        # No send limit of our own: the server's limits are what is under test.
        channel = grpc.aio.insecure_channel(
            authority, options=[("grpc.max_send_message_length", -1)]
        )
        channels.append(channel)
        return channel

    yield open_
    for channel in channels:
        await channel.close(grace=None)


def outcome(call: Callable[..., Any], *args: Any) -> Any:
    """What ``call(*args)`` returned, or the SigwireError it raised; anything else propagates."""
    try:
        return call(*args)
    except sigwire.SigwireError as exc:
        return exc


async def outcome_async(call: Awaitable[Any]) -> Any:
    """What awaiting ``call`` returned, or the SigwireError it raised."""
    try:
        return await call
    except sigwire.SigwireError as exc:
        return exc


# -- building hostile input -------------------------------------------------------


def signed(
    identity: sigwire.Identity, kind: str = "echo", payload: bytes = b"", **fields: Any
) -> sigwire.Envelope:
    """A fresh envelope from ``identity``; ``fields`` replace envelope fields before signing."""
    env = sigwire.Envelope.new(kind, payload, sender=identity.did)
    if fields:
        env = dataclasses.replace(env, **fields)
    return identity.sign_envelope(env)


def envelope_bytes(env: sigwire.Envelope) -> bytes:
    """The serialized protobuf Envelope, as any gRPC client would send it."""
    return _proto.envelope_to_pb(env).SerializeToString()


def frame_bytes(sequence: int, *envelopes: sigwire.Envelope) -> bytes:
    """A serialized Frame carrying ``envelopes`` in one EnvelopeBatch."""
    batch = pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(e) for e in envelopes])
    return pb.Frame(sequence=sequence, envelopes=batch).SerializeToString()


def raw_unary(channel: grpc.aio.Channel, method: str) -> Any:
    """A unary-unary method taking and returning raw bytes (no serializers at all)."""
    return channel.unary_unary(SERVICE + method)


def raw_unary_stream(channel: grpc.aio.Channel, method: str) -> Any:
    """A unary-stream method taking and returning raw bytes."""
    return channel.unary_stream(SERVICE + method)


def raw_connect(channel: grpc.aio.Channel) -> Any:
    """A new raw Connect call: write and read serialized Frames."""
    return channel.stream_stream(SERVICE + "Connect")()


async def send_refused(channel: grpc.aio.Channel, request: bytes) -> RpcFailure:
    """Call Send with raw ``request`` bytes and return how it failed."""
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw_unary(channel, "Send")(request)
    return rpc_failure(caught.value)


async def send_stream_refused(channel: grpc.aio.Channel, request: bytes) -> RpcFailure:
    """Call SendStream with raw ``request`` bytes, read it to the end, return how it failed."""

    async def drain() -> None:
        async for _ in raw_unary_stream(channel, "SendStream")(request):
            pass

    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await drain()
    return rpc_failure(caught.value)


async def read_until_error(call: Any) -> list[pb.Frame]:
    """Read a raw Connect call until it fails; the frames read before that (raises the error)."""
    frames: list[pb.Frame] = []
    while True:
        data = await call.read()
        if data is grpc.aio.EOF:
            raise AssertionError(f"the stream ended without an error after {frames}")
        frames.append(pb.Frame.FromString(data))


async def write_then_read_until_error(call: Any, *frames: bytes) -> list[pb.Frame]:
    """Write ``frames`` on a raw Connect call, then read until it fails (raises the error)."""
    for frame in frames:
        await call.write(frame)
    return await read_until_error(call)


def replies_in(frames: list[pb.Frame]) -> dict[str, sigwire.Reply]:
    """The replies carried by ``frames``, by request id (the last one wins)."""
    return {
        reply.request_id: _proto.reply_from_pb(reply)
        for frame in frames
        if frame.WhichOneof("body") == "replies"
        for reply in frame.replies.replies
    }


async def grpc_reply(call: Any, request_id: str) -> sigwire.Reply:
    """Read frames from a raw Connect call until the final reply to ``request_id``."""
    while True:
        data = await call.read()
        assert data is not grpc.aio.EOF, f"the stream ended before a reply to {request_id!r}"
        frame = pb.Frame.FromString(data)
        reply = replies_in([frame]).get(request_id)
        if reply is not None and reply.final:
            return reply


async def ws_reply(ws: ClientConnection, request_id: str) -> sigwire.Reply:
    """Read binary frames from a raw WebSocket until the final reply to ``request_id``."""
    while True:
        message = await ws.recv()
        assert isinstance(message, bytes)
        reply = replies_in([pb.Frame.FromString(message)]).get(request_id)
        if reply is not None and reply.final:
            return reply


async def ws_frames_until_closed(ws: ClientConnection) -> list[pb.Frame]:
    """Every binary Frame the server sends until it closes the connection."""
    frames = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                frames.append(pb.Frame.FromString(message))
    return frames


def verified_error(
    reply: sigwire.Reply, request: sigwire.Envelope, server: sigwire.Server
) -> sigwire.ReplyError:
    """The error of a signed failure reply, after verifying it answers ``request``."""
    sigwire.Verifier().verify_reply(reply, request, expected_responder=server.identity.did)
    assert not reply.success
    assert reply.final
    assert reply.error is not None
    return reply.error


async def assert_still_serves(
    server: sigwire.Server, *, identity: sigwire.Identity | None = None
) -> None:
    """A well-behaved sigwire client still gets a verified answer over gRPC and WebSocket."""
    async with asyncio.timeout(TIMEOUT):
        for url in server.urls:
            async with sigwire.connect(
                url, identity=identity, expect_did=server.identity.did, learn_endpoints=False
            ) as peer:
                reply = await peer.request("echo", b"still serving", timeout=TIMEOUT)
                assert reply.data == b"still serving"
                assert reply.responder == server.identity.did
