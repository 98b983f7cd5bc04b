"""The WebSocket binding seen by a raw ``websockets`` client: subprotocols, close codes, HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import pytest
import websockets
from google.protobuf import json_format
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

import sigwire
from sigwire import _proto
from sigwire.session import max_frame_size
from tests.conftest import TIMEOUT
from tests.parity.conftest import MakeServer, Probe, http_get, port_of

PROTO = Subprotocol("sigwire.v1.proto")
JSON = Subprotocol("sigwire.v1.json")
WELL_KNOWN = "/.well-known/sigwire-agent.json"
pb = _proto.pb


def signed(identity: sigwire.Identity, kind: str, payload: bytes = b"") -> sigwire.Envelope:
    """A fresh envelope from ``identity``, signed."""
    return identity.sign_envelope(sigwire.Envelope.new(kind, payload, sender=identity.did))


def json_frame(sequence: int, envelope: sigwire.Envelope) -> str:
    """A Frame carrying ``envelope``, written by hand in protobuf's JSON mapping."""
    body = json_format.MessageToDict(_proto.envelope_to_pb(envelope))
    return json.dumps({"sequence": str(sequence), "envelopes": {"envelopes": [body]}})


def binary_frame(sequence: int, envelope: sigwire.Envelope) -> bytes:
    """A serialized protobuf Frame carrying ``envelope``."""
    batch = pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(envelope)])
    return pb.Frame(sequence=sequence, envelopes=batch).SerializeToString()


async def next_frame(ws: ClientConnection) -> pb.Frame:
    """The next binary Frame from the server."""
    message = await ws.recv()
    assert isinstance(message, bytes)
    frame = pb.Frame()
    frame.ParseFromString(message)
    return frame


async def frames_until_closed(ws: ClientConnection) -> list[pb.Frame]:
    """Every Frame the server sends until it closes the connection."""
    frames = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            frames.append(await next_frame(ws))
    return frames


def replies_in(frames: list[pb.Frame]) -> dict[str, sigwire.Reply]:
    """The replies carried by ``frames``, by request id."""
    return {
        reply.request_id: _proto.reply_from_pb(reply)
        for frame in frames
        if frame.WhichOneof("body") == "replies"
        for reply in frame.replies.replies
    }


async def assert_still_serves(server: sigwire.Server) -> None:
    """A well-behaved sigwire client still gets an answer over ws://."""
    async with sigwire.connect(server.urls[1], expect_did=server.identity.did) as peer:
        assert (await peer.request("echo", b"still serving")).data == b"still serving"


@pytest.fixture
async def small_server(make_server: MakeServer) -> sigwire.Server:
    """A server accepting envelopes of at most 1 KiB (frames of at most 2 KiB + 64 KiB)."""
    return await make_server(limits=sigwire.Limits(max_message_size=1024))


async def test_raw_json_client_gets_a_verifiable_reply(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """A hand-written JSON Frame on sigwire.v1.json gets a signed reply that verifies."""
    request = signed(client_identity, "echo", b"raw json")
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[JSON]) as ws:
            assert ws.subprotocol == JSON
            await ws.send(json_frame(1, request))
            while True:
                message = await ws.recv()
                assert isinstance(message, str)
                frame = json.loads(message)
                if "replies" in frame:
                    break
    [body] = frame["replies"]["replies"]
    assert base64.b64decode(body["data"]) == b"raw json"
    reply = _proto.reply_from_pb(json_format.ParseDict(body, pb.Reply()))
    sigwire.Verifier().verify_reply(reply, request, expected_responder=server.identity.did)
    assert (reply.success, reply.final, reply.data) == (True, True, b"raw json")


@pytest.mark.parametrize(
    ("subprotocol", "message", "code", "reason"),
    [
        pytest.param(PROTO, "a text message", 1003, "UNSUPPORTED_DATA", id="text-on-proto"),
        pytest.param(JSON, b"\x08\x01", 1003, "UNSUPPORTED_DATA", id="binary-on-json"),
        pytest.param(JSON, "{not json", 1007, "MALFORMED", id="invalid-json"),
        pytest.param(JSON, '{"noSuchField": 1}', 1007, "MALFORMED", id="json-not-a-frame"),
        pytest.param(PROTO, b"\xff\xff\xff\xff", 1007, "MALFORMED", id="undecodable-proto"),
        pytest.param(PROTO, b"\x00" * (max_frame_size(1024) + 1), 1009, "", id="oversized"),
    ],
)
async def test_bad_message_closes_with_its_code(
    small_server: sigwire.Server,
    subprotocol: Subprotocol,
    message: str | bytes,
    code: int,
    reason: str,
) -> None:
    """A message the subprotocol forbids closes that connection with its code; others go on."""
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(
            small_server.urls[1],
            subprotocols=[subprotocol],
        ) as ws:
            assert ws.subprotocol == subprotocol
            # The server may close before the whole oversized message is written.
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(message)
            await ws.wait_closed()
        assert ws.close_code == code
        assert (ws.close_reason or "").startswith(reason)
        await assert_still_serves(small_server)


@pytest.mark.parametrize("offered", [None, [Subprotocol("chat")]], ids=["none", "unknown"])
async def test_missing_subprotocol_closes_with_1002(
    server: sigwire.Server, offered: list[Subprotocol] | None
) -> None:
    """A client offering no sigwire subprotocol is closed with 1002 PROTOCOL."""
    async with asyncio.timeout(TIMEOUT):
        try:
            async with ws_connect(server.urls[1], subprotocols=offered) as ws:
                await ws.wait_closed()
            assert ws.close_code == 1002
            assert (ws.close_reason or "").startswith("PROTOCOL")
        finally:
            await assert_still_serves(server)


async def test_stop_sends_goaway_before_closing(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """On server stop, a raw client gets a SHUTTING_DOWN GoAway, then close code 1001."""
    request = signed(client_identity, "echo", b"before stop")
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(binary_frame(1, request))
            while request.id not in replies_in([await next_frame(ws)]):
                pass
            stopping = asyncio.create_task(server.stop(grace=1))
            frames = await frames_until_closed(ws)
            await stopping
    goaways = [f.goaway for f in frames if f.WhichOneof("body") == "goaway"]
    assert [g.reason for g in goaways] == ["SHUTTING_DOWN"]
    assert ws.close_code == 1001
    assert (ws.close_reason or "").startswith("SHUTTING_DOWN")


async def test_envelope_after_goaway_gets_shutting_down_reply(
    server: sigwire.Server, probe: Probe, client_identity: sigwire.Identity
) -> None:
    """An envelope sent while the server drains is answered with a signed SHUTTING_DOWN error."""
    blocked = signed(client_identity, "block", b"held")
    late = signed(client_identity, "echo", b"late")
    frames: list[pb.Frame] = []
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(binary_frame(1, blocked))
            assert await probe.entered.get() == b"held"
            # The blocked handler keeps the server draining (grace) until the gate opens.
            stopping = asyncio.create_task(server.stop(grace=TIMEOUT))
            while not any(f.WhichOneof("body") == "goaway" for f in frames):
                frames.append(await next_frame(ws))
            await ws.send(binary_frame(2, late))
            while not any(
                max(f.acked, f.ack.sequence if f.WhichOneof("body") == "ack" else 0) >= 2
                for f in frames
            ):
                frames.append(await next_frame(ws))
            probe.gate.set()
            frames += await frames_until_closed(ws)
            await stopping
    replies = replies_in(frames)
    assert replies[blocked.id].data == b"released held"
    assert late.id in replies, "no reply to the envelope sent during the drain"
    refused = replies[late.id]
    sigwire.Verifier().verify_reply(refused, late, expected_responder=server.identity.did)
    assert refused.error is not None
    assert (refused.success, refused.error.reason) == (False, "SHUTTING_DOWN")
    assert probe.calls["echo"] == 0


async def test_handler_cancelled_at_stop_gets_a_handler_cancelled_reply(
    server: sigwire.Server, probe: Probe, client_identity: sigwire.Identity
) -> None:
    """A request whose handler is cancelled when the grace ends is told so (HANDLER_CANCELLED)."""
    blocked = signed(client_identity, "block", b"held")
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(binary_frame(1, blocked))
            assert await probe.entered.get() == b"held"
            stopping = asyncio.create_task(server.stop(grace=0))
            frames = await frames_until_closed(ws)
            await stopping
    replies = replies_in(frames)
    assert blocked.id in replies, "no reply to the request whose handler was cancelled"
    refused = replies[blocked.id]
    sigwire.Verifier().verify_reply(refused, blocked, expected_responder=server.identity.did)
    assert refused.error is not None
    # Not SHUTTING_DOWN: the handler had started, so clients must not re-send it blindly.
    assert (refused.success, refused.error.reason) == (False, "HANDLER_CANCELLED")


async def test_well_known_card_is_served_as_json(server: sigwire.Server) -> None:
    """GET /.well-known/sigwire-agent.json answers 200 with the signed card as JSON."""
    status, headers, body = await http_get(port_of(server.urls[1]), WELL_KNOWN)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["did"] == server.identity.did
    card = _proto.card_from_json(body)
    sigwire.Verifier().verify_card(card, expected_did=server.identity.did)


async def test_other_path_is_not_found(server: sigwire.Server) -> None:
    """GET on any other path answers 404, and the server keeps serving."""
    status, _, _ = await http_get(port_of(server.urls[1]), "/other")
    assert status == 404
    async with asyncio.timeout(TIMEOUT):
        await assert_still_serves(server)


async def test_compression_is_off_unless_asked_for() -> None:
    """The WebSocket listener negotiates permessage-deflate only with ws_compression=True."""
    for asked, expected in ((False, None), (True, "permessage-deflate")):
        server = sigwire.Server(sigwire.Identity.generate(), ws="127.0.0.1:0", ws_compression=asked)
        async with server, asyncio.timeout(TIMEOUT):
            async with ws_connect(server.urls[0], subprotocols=[PROTO]) as ws:
                offered = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert (offered.split(";")[0] if offered else None) == expected
