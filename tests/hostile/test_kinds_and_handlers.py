"""Unknown and reserved kinds, and handlers that crash on what they are sent.

A crash is HANDLER_FAILED with an ``error_id`` the server logged the traceback
under; the peer never sees the traceback, the exception type or its message.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from websockets.asyncio.client import connect as ws_connect

import sigwire
from sigwire import _proto
from sigwire.dispatch import HELLO_KIND
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    PROTO,
    SECRET,
    OpenChannel,
    Probe,
    assert_still_serves,
    envelope_bytes,
    frame_bytes,
    raw_unary_stream,
    send_refused,
    send_stream_refused,
    signed,
    verified_error,
    ws_reply,
)

Code = grpc.StatusCode

UNKNOWN_KINDS = [
    "no.such.kind",
    "ECHO",
    "echo ",
    " echo",
    "echo\x00",
    "echo\n",
    "\u202eohce",
    "\u0435cho",  # Cyrillic e
    "sigwire.reserved",
    "sigwire.hello2",
    "sigwire.",
    "k" * 256,
    "\U0001f600" * 256,
    "../echo",
    "echo;count",
]


@pytest.mark.parametrize("kind", UNKNOWN_KINDS, ids=range(len(UNKNOWN_KINDS)))
async def test_unknown_kind_over_grpc(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    kind: str,
) -> None:
    """An authenticated envelope of a kind nobody handles is UNIMPLEMENTED/KIND_UNKNOWN."""
    failure = await send_refused(
        open_channel(server), envelope_bytes(signed(client_identity, kind))
    )
    assert (failure.code, failure.info.reason) == (Code.UNIMPLEMENTED, "KIND_UNKNOWN")
    assert sum(probe.calls.values()) == 0
    await assert_still_serves(server)


@pytest.mark.parametrize("kind", UNKNOWN_KINDS, ids=range(len(UNKNOWN_KINDS)))
async def test_unknown_kind_over_websocket(
    server: sigwire.Server, client_identity: sigwire.Identity, probe: Probe, kind: str
) -> None:
    """On a stream it is a signed KIND_UNKNOWN reply, and the stream goes on."""
    request = signed(client_identity, kind)
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(frame_bytes(1, request))
            error = verified_error(await ws_reply(ws, request.id), request, server)
    assert error.reason == "KIND_UNKNOWN"
    assert sum(probe.calls.values()) == 0
    await assert_still_serves(server)


async def test_hello_over_send_is_refused_and_binds_nothing(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """sigwire.hello on unary Send is refused (it opens streams only) and registers no agent."""
    hello = signed(client_identity, HELLO_KIND, recipient=server.identity.did)
    async with asyncio.timeout(TIMEOUT):
        failure = await send_refused(open_channel(server), envelope_bytes(hello))
    assert failure.info.reason == "KIND_UNKNOWN"
    assert server.connected() == []
    await assert_still_serves(server)


HANDLER_FAILURES = {
    "raises": ("crash", "HANDLER_FAILED"),
    "returns-an-int": ("wrong_type", "HANDLER_FAILED"),
    "answer-too-big": ("too_big", "PAYLOAD_TOO_LARGE"),
}
STREAM_FAILURES = {
    **HANDLER_FAILURES,
    "stream-raises-after-a-part": ("crash_stream", "HANDLER_FAILED"),
}


def _assert_hygiene(reason: str, message: str, details: dict[str, str], logs: str) -> None:
    """The error says what happened and where it was logged, and nothing of the exception."""
    for text in ("Traceback", "ValueError", "RuntimeError", "TypeError", SECRET, 'File "'):
        assert text not in message
        assert all(text not in value for value in details.values())
    if reason == "HANDLER_FAILED":
        error_id = details["error_id"]
        assert error_id in message
        assert error_id in logs
        assert SECRET in logs or "int" in logs


@pytest.mark.parametrize(("kind", "reason"), HANDLER_FAILURES.values(), ids=HANDLER_FAILURES.keys())
async def test_handler_failure_over_send(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    reason: str,
) -> None:
    """A handler failure on Send is its status and reason, with an error_id and no traceback."""
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        failure = await send_refused(
            open_channel(server), envelope_bytes(signed(client_identity, kind))
        )
    assert failure.info.reason == reason
    assert failure.code == (
        Code.INTERNAL if reason == "HANDLER_FAILED" else Code.RESOURCE_EXHAUSTED
    )
    _assert_hygiene(
        reason, failure.message + failure.status.message, dict(failure.info.metadata), caplog.text
    )
    await assert_still_serves(server)


@pytest.mark.parametrize(("kind", "reason"), STREAM_FAILURES.values(), ids=STREAM_FAILURES.keys())
async def test_handler_failure_over_send_stream(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    reason: str,
) -> None:
    """On SendStream the parts made before the failure arrive, then the failure's status."""
    request = envelope_bytes(signed(client_identity, kind))
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        failure = await send_stream_refused(open_channel(server), request)
    assert failure.info.reason == reason
    _assert_hygiene(
        reason, failure.message + failure.status.message, dict(failure.info.metadata), caplog.text
    )
    await assert_still_serves(server)


@pytest.mark.parametrize(("kind", "reason"), STREAM_FAILURES.values(), ids=STREAM_FAILURES.keys())
async def test_handler_failure_over_websocket(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    reason: str,
) -> None:
    """On a stream the failure is a signed final reply, and the stream goes on."""
    request = signed(client_identity, kind)
    after = signed(client_identity, "echo", b"next")
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        async with asyncio.timeout(TIMEOUT):
            async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
                await ws.send(frame_bytes(1, request))
                error = verified_error(await ws_reply(ws, request.id), request, server)
                await ws.send(frame_bytes(2, after))
                assert (await ws_reply(ws, after.id)).data == b"next"
    assert error.reason == reason
    _assert_hygiene(reason, error.message, dict(error.details), caplog.text)
    await assert_still_serves(server)


async def test_streaming_kind_on_send_is_refused_after_every_check(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A streaming kind on unary Send is FAILED_PRECONDITION/STREAMING_KIND; nothing runs."""
    failure = await send_refused(
        open_channel(server), envelope_bytes(signed(client_identity, "count", b"3"))
    )
    assert (failure.code, failure.info.reason) == (Code.FAILED_PRECONDITION, "STREAMING_KIND")
    parts = [
        _proto.decode_reply(data)
        async for data in raw_unary_stream(open_channel(server), "SendStream")(
            envelope_bytes(signed(client_identity, "count", b"2"))
        )
    ]
    assert [p.data for p in parts] == [b"part 0", b"part 1", b""]
    await assert_still_serves(server)
