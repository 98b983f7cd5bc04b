"""Oversized messages, floods that ignore the window, and peers that never read.

Servers here accept payloads of at most 1 KiB (``Limits(max_message_size=1024)``),
so frames are capped at ``max_frame_size(1024)`` bytes by grpc and websockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from typing import Any

import grpc
import grpc.aio
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

import sigwire
from sigwire import _proto
from sigwire.dispatch import HELLO_KIND
from sigwire.session import max_frame_size
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    JSON,
    PROTO,
    MakeServer,
    OpenChannel,
    Probe,
    assert_still_serves,
    envelope_bytes,
    frame_bytes,
    grpc_reply,
    raw_connect,
    raw_unary,
    raw_unary_stream,
    send_refused,
    send_stream_refused,
    signed,
    verified_error,
    write_then_read_until_error,
    ws_frames_until_closed,
    ws_reply,
)
from tests.integration.helpers import rpc_failure

pb = _proto.pb
Code = grpc.StatusCode
LIMIT = 1024
FRAME_LIMIT = max_frame_size(LIMIT)


def _padded(me: sigwire.Identity, size: int) -> sigwire.Envelope:
    """A signed envelope with a small payload, grown to about ``size`` bytes by metadata."""
    return signed(me, "echo", b"x", metadata={"pad": "p" * size})


OVERSIZED: dict[str, tuple[Any, int]] = {
    "payload-limit-plus-1": (lambda me: signed(me, "echo", b"x" * (LIMIT + 1)), LIMIT + 1),
    "payload-64k": (lambda me: signed(me, "echo", b"x" * 65536), 65536),
    "payload-just-under-frame": (lambda me: signed(me, "echo", b"x" * 300_000), 300_000),
}


@pytest.mark.parametrize(("build", "size"), OVERSIZED.values(), ids=OVERSIZED.keys())
@pytest.mark.parametrize("method", ["Send", "SendStream"])
async def test_payload_over_the_limit_is_payload_too_large(
    small_server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    build: Any,
    size: int,
    method: str,
) -> None:
    """A payload over max_message_size is RESOURCE_EXHAUSTED/PAYLOAD_TOO_LARGE with the sizes."""
    request = envelope_bytes(build(client_identity))
    refuse = send_refused if method == "Send" else send_stream_refused
    failure = await refuse(open_channel(small_server), request)
    assert (failure.code, failure.info.reason) == (Code.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")
    assert failure.info.metadata["limit"] == str(LIMIT)
    assert int(failure.info.metadata["size"]) >= size
    assert probe.calls["echo"] == 0
    await assert_still_serves(small_server)


@pytest.mark.parametrize("method", ["Send", "SendStream"])
async def test_request_over_the_limit_by_its_other_fields(
    small_server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    method: str,
) -> None:
    """A small payload with 100 KB of metadata is refused as PAYLOAD_TOO_LARGE by its size."""
    request = envelope_bytes(_padded(client_identity, 100_000))
    assert len(request) < FRAME_LIMIT
    refuse = send_refused if method == "Send" else send_stream_refused
    failure = await refuse(open_channel(small_server), request)
    assert (failure.code, failure.info.reason) == (Code.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")
    assert failure.info.metadata["size"] == str(len(request))
    await assert_still_serves(small_server)


OVER_GRPC_LIMIT = {
    "one-byte-over": b"\x00" * (FRAME_LIMIT + 1),
    "1-MiB": b"\xff" * (1 << 20),
}


@pytest.mark.parametrize("data", OVER_GRPC_LIMIT.values(), ids=OVER_GRPC_LIMIT.keys())
@pytest.mark.parametrize("method", ["Send", "SendStream", "Connect"])
async def test_message_over_the_grpc_receive_limit_is_resource_exhausted(
    small_server: sigwire.Server, open_channel: OpenChannel, data: bytes, method: str
) -> None:
    """A message over grpc's receive limit (the frame limit) fails with RESOURCE_EXHAUSTED."""
    channel = open_channel(small_server)

    async def call() -> None:
        if method == "Send":
            await raw_unary(channel, "Send")(data)
        elif method == "SendStream":
            async for _ in raw_unary_stream(channel, "SendStream")(data):
                pass
        else:
            await write_then_read_until_error(raw_connect(channel), data)

    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
    # grpc refuses it before sigwire sees it: no ErrorInfo, only the status code.
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED
    await assert_still_serves(small_server)


@pytest.mark.parametrize(("build", "size"), OVERSIZED.values(), ids=OVERSIZED.keys())
async def test_payload_over_the_limit_on_a_stream_is_a_signed_error_reply(
    small_server: sigwire.Server,
    client_identity: sigwire.Identity,
    probe: Probe,
    build: Any,
    size: int,
) -> None:
    """On a WebSocket stream an oversized payload gets a PAYLOAD_TOO_LARGE reply; it goes on."""
    request = build(client_identity)
    after = signed(client_identity, "echo", b"small")
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(small_server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(frame_bytes(1, request))
            error = verified_error(await ws_reply(ws, request.id), request, small_server)
            await ws.send(frame_bytes(2, after))
            assert (await ws_reply(ws, after.id)).data == b"small"
    assert error.reason == "PAYLOAD_TOO_LARGE"
    assert dict(error.details) == {"size": str(size), "limit": str(LIMIT)}
    assert probe.calls["echo"] == 1
    await assert_still_serves(small_server)


OVERSIZED_WS = {
    "proto-binary": (PROTO, b"\x00" * (FRAME_LIMIT + 1)),
    "json-text": (JSON, '{"sequence": "1", "pad": "' + "x" * FRAME_LIMIT + '"}'),
    "proto-10-MiB": (PROTO, b"\x00" * (10 << 20)),
}


@pytest.mark.parametrize(("subprotocol", "message"), OVERSIZED_WS.values(), ids=OVERSIZED_WS.keys())
async def test_websocket_message_over_the_frame_limit_closes_1009(
    small_server: sigwire.Server, subprotocol: Any, message: bytes | str
) -> None:
    """A WebSocket message over max_frame_size(limit) closes that connection with 1009."""
    async with asyncio.timeout(TIMEOUT):
        ws = await ws_connect(small_server.urls[1], subprotocols=[subprotocol])
        try:
            # The server may close before the whole message is written.
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(message)
            await ws.wait_closed()
        finally:
            # Not close(): websockets' client crashes closing a transport the server
            # already dropped in the middle of a 10 MiB write.
            if ws.close_code is None:
                await ws.close()
    assert ws.close_code == 1009
    await assert_still_serves(small_server)


async def test_reply_over_the_limit_is_payload_too_large(
    small_server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A handler answer over the limit is refused as PAYLOAD_TOO_LARGE, never sent."""
    failure = await send_refused(
        open_channel(small_server), envelope_bytes(signed(client_identity, "too_big"))
    )
    assert (failure.code, failure.info.reason) == (Code.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")
    assert failure.info.metadata["size"] == str(LIMIT + 1)
    await assert_still_serves(small_server)


async def test_one_sender_flooding_is_rate_limited(
    make_server: MakeServer, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A sender over its token bucket gets RATE_LIMITED with RetryInfo; others are served."""
    server = await make_server(limits=sigwire.Limits(rate=1, burst=5))
    channel = open_channel(server)
    send = raw_unary(channel, "Send")
    results = []
    async with asyncio.timeout(TIMEOUT):
        for i in range(20):
            try:
                await send(envelope_bytes(signed(client_identity, "echo", b"%d" % i)))
                results.append("ok")
            except grpc.aio.AioRpcError as exc:
                results.append(rpc_failure(exc).info.reason)
    assert results[:5] == ["ok"] * 5
    assert set(results[5:]) == {"RATE_LIMITED"}, results
    await assert_still_serves(server)


# -- ignoring the window -------------------------------------------------------------


def _flood_small_window(me: sigwire.Identity) -> tuple[sigwire.Limits, list[bytes]]:
    envelopes = [pb.Envelope(id=str(i)) for i in range(50)]
    frame = pb.Frame(sequence=50, envelopes=pb.EnvelopeBatch(envelopes=envelopes))
    return sigwire.Limits(window=2), [frame.SerializeToString()]


def _flood_default_window(me: sigwire.Identity) -> tuple[sigwire.Limits, list[bytes]]:
    # 8 frames of 100 signed envelopes whose handler blocks: 256 run, the rest wait,
    # and past 2 x 256 waiting the peer has plainly ignored its window.
    frames = []
    for f in range(8):
        batch = [signed(me, "block", b"%d" % (f * 100 + i)) for i in range(100)]
        frames.append(frame_bytes((f + 1) * 100, *batch))
    return sigwire.Limits(), frames


FLOODS = {"50-in-one-frame-window-2": _flood_small_window, "800-blocked": _flood_default_window}


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
async def test_connect_peer_ignoring_its_window_ends_overloaded(
    make_server: MakeServer,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    flood: Any,
) -> None:
    """A Connect client flooding past its window gets RESOURCE_EXHAUSTED/OVERLOADED."""
    limits, frames = flood(client_identity)
    server = await make_server(limits=limits)
    call = raw_connect(open_channel(server))
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write_then_read_until_error(call, *frames)
    failure = rpc_failure(caught.value)
    assert (failure.code, failure.info.reason) == (Code.RESOURCE_EXHAUSTED, "OVERLOADED")
    assert "beyond the window" in failure.message
    await assert_still_serves(server)


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
async def test_websocket_peer_ignoring_its_window_closes_1013(
    make_server: MakeServer, client_identity: sigwire.Identity, flood: Any
) -> None:
    """A WebSocket client flooding past its window is closed with 1013 OVERLOADED."""
    limits, frames = flood(client_identity)
    server = await make_server(limits=limits)
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                for frame in frames:
                    await ws.send(frame)
            await ws_frames_until_closed(ws)
    assert ws.close_code == 1013
    assert (ws.close_reason or "").startswith("OVERLOADED")
    await assert_still_serves(server)


def _empty_envelopes_frame(count: int) -> bytes:
    # Each empty Envelope costs 2 bytes on the wire (tag, zero length).
    inner = b"\x0a\x00" * count
    batch = pb.EnvelopeBatch.FromString(inner)
    assert len(batch.envelopes) == count
    return pb.Frame(sequence=count, envelopes=batch).SerializeToString()


async def test_window_flood_is_refused_before_its_envelopes_are_decoded(
    small_server: sigwire.Server, open_channel: OpenChannel
) -> None:
    """A frame of 20,000 empty envelopes is refused without building 20,000 Envelope objects."""
    frame = _empty_envelopes_frame(20_000)
    call = raw_connect(open_channel(small_server))
    tracemalloc.start()
    try:
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await write_then_read_until_error(call, frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rpc_failure(caught.value).info.reason == "OVERLOADED"
    await assert_still_serves(small_server)
    # 40 KB in must not become megabytes of Python objects (it is ~150x today).
    assert peak < 40 * len(frame), f"peak {peak} bytes for a {len(frame)}-byte frame"


async def test_peer_that_never_reads_is_cut_off(
    make_server: MakeServer, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A Connect client that sends but never reads is cut off OVERLOADED, its replies bounded."""
    window, count = 8, 300
    server = await make_server(limits=sigwire.Limits(window=window, rate=None))

    @server.on("sink")
    async def sink(msg: sigwire.Message) -> bytes:
        return msg.payload

    call = raw_connect(open_channel(server))
    hello = signed(client_identity, HELLO_KIND)

    async def flood() -> None:
        # Never reads: gRPC flow control soon blocks these writes, which is the point.
        for i in range(count):
            await call.write(frame_bytes(i + 2, signed(client_identity, "sink", b"r" * 65536)))

    async with asyncio.timeout(TIMEOUT):
        await call.write(frame_bytes(1, hello))
        await grpc_reply(call, hello.id)
        [session] = server._all_sessions
        flooding = asyncio.create_task(flood())
        await session.closed.wait()
        # A peer that reads nothing cannot be sent a status either (grpc queues it
        # behind the blocked write); what matters is that the server stopped
        # reading and holds a bounded number of replies for it.
        assert session.error is not None
        assert session.error.reason == "OVERLOADED"
        assert session._queue.qsize() <= 4 * window + 2
        assert server.connected() == []
        flooding.cancel()
        call.cancel()
        await asyncio.gather(flooding, return_exceptions=True)
    await assert_still_serves(server)
