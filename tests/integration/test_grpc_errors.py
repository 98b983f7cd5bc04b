"""Every refusal as a gRPC status with a google.rpc ErrorInfo, and as a sigwire class.

Raw tests call Send through a plain grpc.aio channel, as a client in another
language would, and read ``grpc-status-details-bin``. After each refusal the
same server must still answer a well-behaved request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import grpc
import grpc.aio
import pytest

import sigwire
from sigwire.envelope import now_ms
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeServer, OpenChannel, Probe
from tests.integration.helpers import (
    RpcFailure,
    envelope,
    raw_send,
    rpc_failure,
    stub,
    to_pb,
    verify_reply,
)

Code = grpc.StatusCode


async def refused(channel: grpc.aio.Channel, request: sigwire.Envelope | bytes) -> RpcFailure:
    """Call Send with ``request`` (an envelope, or raw bytes) and return how it failed."""
    if isinstance(request, bytes):
        call = raw_send(channel)(request)
    else:
        call = stub(channel).Send(to_pb(request))
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    return rpc_failure(caught.value)


async def still_serves(channel: grpc.aio.Channel, server: sigwire.Server) -> None:
    """The server answers a fresh, well-behaved request from a new sender."""
    request = envelope(sigwire.Identity.generate(), "echo", b"fine")
    async with asyncio.timeout(TIMEOUT):
        reply_pb = await stub(channel).Send(to_pb(request))
    assert verify_reply(reply_pb, request, server.identity.did).data == b"fine"


Build = Callable[[sigwire.Identity], sigwire.Envelope | bytes]


def _garbage(me: sigwire.Identity) -> bytes:
    return b"\x0a\xff\xff"


def _unsigned(me: sigwire.Identity) -> sigwire.Envelope:
    return envelope(me, "echo", b"x", sign=False)


def _tampered(me: sigwire.Identity) -> sigwire.Envelope:
    return dataclasses.replace(envelope(me, "echo", b"pay 10"), payload=b"pay 1000")


def _wrong_algorithm(me: sigwire.Identity) -> sigwire.Envelope:
    signed = envelope(me, "echo", b"x")
    assert signed.signature is not None
    return dataclasses.replace(
        signed, signature=dataclasses.replace(signed.signature, algorithm="ES256")
    )


def _ten_minutes_old(me: sigwire.Identity) -> sigwire.Envelope:
    return envelope(me, "echo", b"x", created_at_ms=now_ms() - 10 * 60 * 1000)


def _unknown_kind(me: sigwire.Identity) -> sigwire.Envelope:
    return envelope(me, "no.such.kind", b"x")


def _misdirected(me: sigwire.Identity) -> sigwire.Envelope:
    return envelope(me, "echo", b"x", recipient=sigwire.Identity.generate().did)


@pytest.mark.parametrize(
    ("build", "code", "reason"),
    [
        pytest.param(_garbage, Code.INVALID_ARGUMENT, "MALFORMED", id="garbage"),
        pytest.param(_unsigned, Code.UNAUTHENTICATED, "SIGNATURE_MISSING", id="unsigned"),
        pytest.param(_tampered, Code.UNAUTHENTICATED, "SIGNATURE_INVALID", id="tampered"),
        pytest.param(
            _wrong_algorithm, Code.UNAUTHENTICATED, "ALGORITHM_UNSUPPORTED", id="algorithm"
        ),
        pytest.param(_ten_minutes_old, Code.UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW", id="stale"),
        pytest.param(_unknown_kind, Code.UNIMPLEMENTED, "KIND_UNKNOWN", id="unknown-kind"),
        pytest.param(_misdirected, Code.PERMISSION_DENIED, "RECIPIENT_MISMATCH", id="recipient"),
    ],
)
async def test_refusal_status_and_reason(
    server: sigwire.Server,
    channel: grpc.aio.Channel,
    client_identity: sigwire.Identity,
    probe: Probe,
    build: Build,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    """Each refusal travels as its status code with the matching ErrorInfo reason."""
    failure = await refused(channel, build(client_identity))
    assert (failure.code, failure.info.reason) == (code, reason)
    assert failure.retry is None
    assert probe.calls["echo"] == 0
    await still_serves(channel, server)


async def test_reused_nonce_with_other_content_is_replay(
    server: sigwire.Server, channel: grpc.aio.Channel, client_identity: sigwire.Identity
) -> None:
    """A second envelope reusing a nonce with different content is UNAUTHENTICATED/REPLAY."""
    first = envelope(client_identity, "echo", b"first")
    second = envelope(client_identity, "echo", b"second", nonce=first.nonce)
    async with asyncio.timeout(TIMEOUT):
        await stub(channel).Send(to_pb(first))
    failure = await refused(channel, second)
    assert (failure.code, failure.info.reason) == (Code.UNAUTHENTICATED, "REPLAY")
    await still_serves(channel, server)


async def test_sender_outside_the_allow_list(
    make_server: MakeServer, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A correctly signed envelope from an unlisted DID is PERMISSION_DENIED/SIGNER_UNKNOWN."""
    stranger = sigwire.Identity.generate()
    server = await make_server(trust=sigwire.AllowList([client_identity.did]))
    channel = open_channel(server.urls[0])
    failure = await refused(channel, envelope(stranger, "echo", b"x"))
    assert (failure.code, failure.info.reason) == (Code.PERMISSION_DENIED, "SIGNER_UNKNOWN")
    assert failure.info.metadata["signer"] == stranger.did
    request = envelope(client_identity, "echo", b"listed")
    async with asyncio.timeout(TIMEOUT):
        reply_pb = await stub(channel).Send(to_pb(request))
    assert verify_reply(reply_pb, request, server.identity.did).data == b"listed"


async def test_payload_over_the_limit(
    make_server: MakeServer, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """A payload over max_message_size is RESOURCE_EXHAUSTED/PAYLOAD_TOO_LARGE with the sizes."""
    server = await make_server(limits=sigwire.Limits(max_message_size=1024))
    channel = open_channel(server.urls[0])
    failure = await refused(channel, envelope(client_identity, "echo", b"x" * 2000))
    assert (failure.code, failure.info.reason) == (Code.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE")
    assert dict(failure.info.metadata) == {"size": "2000", "limit": "1024"}
    await still_serves(channel, server)


async def test_rate_limit_carries_retry_info(
    make_server: MakeServer, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """The request over the burst is RATE_LIMITED with retry_after_ms and a RetryInfo."""
    server = await make_server(limits=sigwire.Limits(rate=1, burst=2))
    channel = open_channel(server.urls[0])
    async with asyncio.timeout(TIMEOUT):
        for i in range(2):
            await stub(channel).Send(to_pb(envelope(client_identity, "echo", b"%d" % i)))
    failure = await refused(channel, envelope(client_identity, "echo", b"third"))
    assert (failure.code, failure.info.reason) == (Code.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    retry_after_ms = int(failure.info.metadata["retry_after_ms"])
    assert 0 < retry_after_ms <= 1000
    assert failure.retry is not None
    assert failure.retry.retry_delay.ToMilliseconds() == retry_after_ms
    # The limit is per sender: others are still served.
    await still_serves(channel, server)


async def test_handler_crash_is_internal_with_logged_error_id(
    server: sigwire.Server,
    channel: grpc.aio.Channel,
    client_identity: sigwire.Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A crashing handler is INTERNAL/HANDLER_FAILED; its error_id is logged, not its traceback."""
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        failure = await refused(channel, envelope(client_identity, "crash"))
    assert (failure.code, failure.info.reason) == (Code.INTERNAL, "HANDLER_FAILED")
    error_id = failure.info.metadata["error_id"]
    assert error_id
    assert error_id in failure.message
    for text in ("Traceback", "ValueError", "secret internal detail"):
        assert text not in failure.message
        assert text not in failure.status.message
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[0] is ValueError
    await still_serves(channel, server)


async def test_application_error_keeps_its_reason(
    server: sigwire.Server, channel: grpc.aio.Channel, client_identity: sigwire.Identity
) -> None:
    """A handler's ApplicationError is FAILED_PRECONDITION with the handler's own reason."""
    failure = await refused(channel, envelope(client_identity, "refuse"))
    assert (failure.code, failure.info.reason) == (Code.FAILED_PRECONDITION, "TASK_NOT_FOUND")
    assert failure.message == "nope"
    await still_serves(channel, server)


async def test_stream_failing_after_a_part(
    server: sigwire.Server, channel: grpc.aio.Channel, client_identity: sigwire.Identity
) -> None:
    """SendStream delivers the parts made before a failure, then the failure's status."""
    request = envelope(client_identity, "partial")
    received: list[sigwire.Reply] = []

    async def read_all() -> None:
        async for reply_pb in stub(channel).SendStream(to_pb(request)):
            received.append(verify_reply(reply_pb, request, server.identity.did))

    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all()
    assert [(r.sequence, r.data) for r in received] == [(0, b"part 0")]
    failure = rpc_failure(caught.value)
    assert (failure.code, failure.info.reason) == (Code.FAILED_PRECONDITION, "QUOTA_EXCEEDED")
    await still_serves(channel, server)


# -- the same refusals through sigwire.connect -------------------------------------


async def test_unknown_kind_through_connect(server: sigwire.Server) -> None:
    """An unknown kind surfaces as a remote KindUnknownError; the peer keeps working."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            with pytest.raises(sigwire.KindUnknownError) as caught:
                await peer.request("no.such.kind", b"x")
            assert (await peer.request("echo", b"ok")).data == b"ok"
    assert caught.value.remote
    assert caught.value.reason == "KIND_UNKNOWN"


async def test_rate_limit_through_connect(make_server: MakeServer) -> None:
    """The request over the burst surfaces as RateLimitedError with retry_after."""
    # The hello spends a token too (so hellos cannot flood the nonce cache).
    server = await make_server(limits=sigwire.Limits(rate=1, burst=3))
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            await peer.request("echo", b"1")
            await peer.request("echo", b"2")
            with pytest.raises(sigwire.RateLimitedError) as caught:
                await peer.request("echo", b"3")
    assert caught.value.remote
    assert 0 < caught.value.retry_after <= 1.0


async def test_handler_crash_through_connect(
    server: sigwire.Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler crash surfaces as HandlerError whose error_id the server logged."""
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        async with asyncio.timeout(TIMEOUT):
            async with sigwire.connect(server.urls[0]) as peer:
                with pytest.raises(sigwire.HandlerError) as caught:
                    await peer.request("crash")
                assert (await peer.request("echo", b"ok")).data == b"ok"
    assert caught.value.remote
    assert caught.value.error_id
    assert "secret internal detail" not in str(caught.value)
    assert any(caught.value.error_id in r.getMessage() for r in caplog.records)


async def test_application_error_through_connect(server: sigwire.Server) -> None:
    """A handler's own reason survives the trip: a remote RemoteError with that reason."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            with pytest.raises(sigwire.RemoteError) as caught:
                await peer.request("refuse")
    assert caught.value.remote
    assert caught.value.reason == "TASK_NOT_FOUND"
    assert caught.value.message == "nope"


async def test_payload_too_large_through_connect(make_server: MakeServer) -> None:
    """A payload over the server's limit surfaces as MessageTooLargeError with the sizes."""
    server = await make_server(limits=sigwire.Limits(max_message_size=1024))
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            with pytest.raises(sigwire.MessageTooLargeError) as caught:
                await peer.request("echo", b"x" * 2000)
            assert (await peer.request("echo", b"small")).data == b"small"
    assert (caught.value.size, caught.value.limit) == (2000, 1024)


async def test_unlisted_client_cannot_connect(
    make_server: MakeServer, client_identity: sigwire.Identity
) -> None:
    """A client outside the server's AllowList is refused at the hello as SIGNER_UNKNOWN."""
    server = await make_server(trust=sigwire.AllowList([sigwire.Identity.generate().did]))
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect(server.urls[0], identity=client_identity)
    [(_, error)] = caught.value.attempts
    assert isinstance(error, sigwire.UnknownSignerError)
    assert error.remote
    assert error.did == client_identity.did


async def test_stream_failing_after_a_part_through_connect(server: sigwire.Server) -> None:
    """peer.stream yields the parts made before a failure, then raises it with its reason."""
    received: list[bytes] = []

    async def read_all(peer: sigwire.Peer) -> None:
        async for part in peer.stream("partial"):
            received.append(part.data)

    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            with pytest.raises(sigwire.RemoteError) as caught:
                await read_all(peer)
    assert received == [b"part 0"]
    assert caught.value.remote
    assert caught.value.reason == "QUOTA_EXCEEDED"
