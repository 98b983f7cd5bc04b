"""Raw garbage sent to every gRPC method, and to the gRPC port itself.

Methods are called through a generic grpc.aio channel with no serializers, so
the bytes reach the server exactly as written. Send and SendStream refuse
undecodable input with INVALID_ARGUMENT/MALFORMED; Connect ends the stream
with the same status; Describe ignores its (empty) request message and answers
the signed card whatever bytes it carries.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import grpc.aio
import pytest

import sigwire
from sigwire import _proto
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    ENVELOPE_ONLY,
    INVALID,
    UNDECODABLE,
    OpenChannel,
    assert_still_serves,
    raw_connect,
    raw_unary,
    send_refused,
    send_stream_refused,
    write_then_read_until_error,
)
from tests.integration.helpers import rpc_failure

pb = _proto.pb
Code = grpc.StatusCode

SEND_GARBAGE = {**UNDECODABLE, **ENVELOPE_ONLY, **INVALID}


def test_garbage_lists_are_what_they_claim() -> None:
    """Every UNDECODABLE case fails both parsers; ENVELOPE_ONLY fails the Envelope parser."""
    for data in UNDECODABLE.values():
        with pytest.raises(sigwire.EnvelopeError):
            _proto.decode_envelope(data)
        with pytest.raises(sigwire.EnvelopeError):
            _proto.frame_to_json(data)
    for data in ENVELOPE_ONLY.values():
        with pytest.raises(sigwire.EnvelopeError):
            _proto.decode_envelope(data)
    for data in INVALID.values():
        with pytest.raises(sigwire.EnvelopeError):
            _proto.decode_envelope(data).validate()


@pytest.mark.parametrize("data", SEND_GARBAGE.values(), ids=SEND_GARBAGE.keys())
async def test_send_refuses_garbage_as_malformed(
    server: sigwire.Server, open_channel: OpenChannel, data: bytes
) -> None:
    """Send answers garbage bytes with INVALID_ARGUMENT and a MALFORMED ErrorInfo."""
    failure = await send_refused(open_channel(server), data)
    assert (failure.code, failure.info.reason) == (Code.INVALID_ARGUMENT, "MALFORMED")
    assert "Traceback" not in failure.message
    await assert_still_serves(server)


@pytest.mark.parametrize("data", SEND_GARBAGE.values(), ids=SEND_GARBAGE.keys())
async def test_send_stream_refuses_garbage_as_malformed(
    server: sigwire.Server, open_channel: OpenChannel, data: bytes
) -> None:
    """SendStream ends at once with INVALID_ARGUMENT and a MALFORMED ErrorInfo."""
    failure = await send_stream_refused(open_channel(server), data)
    assert (failure.code, failure.info.reason) == (Code.INVALID_ARGUMENT, "MALFORMED")
    await assert_still_serves(server)


@pytest.mark.parametrize("data", UNDECODABLE.values(), ids=UNDECODABLE.keys())
@pytest.mark.parametrize("first", [True, False], ids=["first-frame", "after-a-ping"])
async def test_connect_garbage_frame_ends_the_stream_as_malformed(
    server: sigwire.Server, open_channel: OpenChannel, data: bytes, first: bool
) -> None:
    """A garbage frame on Connect ends that stream with INVALID_ARGUMENT/MALFORMED."""
    call = raw_connect(open_channel(server))
    async with asyncio.timeout(TIMEOUT):
        if not first:
            await call.write(pb.Frame(ping=pb.Ping(token=7)).SerializeToString())
            pong = pb.Frame.FromString(await call.read())
            assert pong.pong.token == 7
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write_then_read_until_error(call, data)
    failure = rpc_failure(caught.value)
    assert (failure.code, failure.info.reason) == (Code.INVALID_ARGUMENT, "MALFORMED")
    await assert_still_serves(server)


DESCRIBE_REQUESTS = {**UNDECODABLE, **ENVELOPE_ONLY, "empty": b"", "big-64k": b"\xff" * 65536}


@pytest.mark.parametrize("data", DESCRIBE_REQUESTS.values(), ids=DESCRIBE_REQUESTS.keys())
async def test_describe_ignores_its_request_and_answers_the_card(
    server: sigwire.Server, open_channel: OpenChannel, data: bytes
) -> None:
    """Describe never parses its request: any bytes get the signed card, which verifies."""
    async with asyncio.timeout(TIMEOUT):
        answer = await raw_unary(open_channel(server), "Describe")(data)
    card = _proto.decode_card(answer)
    sigwire.Verifier().verify_card(card, expected_did=server.identity.did)
    assert card.endpoints == tuple(server.urls)
    await assert_still_serves(server)


UNKNOWN_METHODS = [
    "/sigwire.v1.AgentTransport/Nope",
    "/sigwire.v1.AgentTransport/send",
    "/sigwire.v2.AgentTransport/Send",
    "/sigwire.v1.AgentTransport/Send/extra",
    "/",
    "/" + "A" * 4096,
]


@pytest.mark.parametrize("method", UNKNOWN_METHODS, ids=range(len(UNKNOWN_METHODS)))
async def test_unknown_method_is_unimplemented(
    server: sigwire.Server, open_channel: OpenChannel, method: str
) -> None:
    """A call to a method the server does not serve fails with UNIMPLEMENTED."""
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await open_channel(server).unary_unary(method)(b"\x0a\x01x")
    assert caught.value.code() == Code.UNIMPLEMENTED
    await assert_still_serves(server)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RAW_TCP = {
    "http1-get": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "random-bytes": random.Random(2).randbytes(4096),
    "preface-then-garbage": HTTP2_PREFACE + random.Random(3).randbytes(512),
    "preface-then-huge-frame-header": HTTP2_PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",
    "tls-client-hello": bytes.fromhex("160301002e010000") + bytes(46),
}


@pytest.mark.parametrize("data", RAW_TCP.values(), ids=RAW_TCP.keys())
async def test_non_grpc_bytes_on_the_port_are_dropped(server: sigwire.Server, data: bytes) -> None:
    """Bytes that are not HTTP/2 get the connection closed; the listener keeps serving."""
    host, port = server.urls[0].removeprefix("grpc://").rsplit(":", 1)
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(data)
            await writer.drain()
            # The server answers (a GOAWAY, or nothing) and closes: read to EOF.
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass
        finally:
            writer.close()
    await assert_still_serves(server)
