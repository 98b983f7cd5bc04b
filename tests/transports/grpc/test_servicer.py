"""Unit tests of the AgentTransport servicer through grpcio-testing: no sockets, no grpc.aio server.

grpc_testing drives servicers synchronously, hands them protobuf messages and
gives them a sync ServicerContext; ``_Servicer`` is grpc.aio code taking raw
bytes. :class:`SyncServicer` bridges the two: it serializes the request, runs
the coroutine on an event loop in a background thread, and parses the answer.

grpc_testing's ``ServicerContext.abort(code, details)`` ends the RPC with empty
trailing metadata (anything set by ``set_trailing_metadata`` is dropped), so it
cannot carry the ``google.rpc.Status`` under test. The bridge's ``abort``
therefore does what grpc.aio does: it records code, details and trailers on the
RPC and raises to unwind the servicer, and the bridge ends the RPC normally.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import grpc_testing  # type: ignore[import-untyped]
import pytest
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

import sigwire
from sigwire import _proto
from sigwire.transports.grpc.server import _Servicer
from sigwire_pb.v1 import messages_pb2, transport_pb2
from tests.conftest import TIMEOUT

SERVICE = transport_pb2.DESCRIPTOR.services_by_name["AgentTransport"]
SEND = SERVICE.methods_by_name["Send"]
SEND_STREAM = SERVICE.methods_by_name["SendStream"]
DESCRIBE = SERVICE.methods_by_name["Describe"]
DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "sigwire.dev"
# Undecodable as an Envelope: a varint longer than ten bytes.
GARBAGE = b"\xff" * 11

_T = TypeVar("_T")
Metadata = tuple[tuple[str, str | bytes], ...]


class _Aborted(Exception):
    """Unwinds a servicer coroutine after ``abort``, like grpc.aio's AbortError."""


class AsyncContext:
    """The grpc.aio ServicerContext methods ``_Servicer`` calls, over grpc_testing's sync one."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Metadata = (),
    ) -> None:
        # Not context.abort(): grpc_testing would drop trailing_metadata (see module docstring).
        self._context.set_trailing_metadata(trailing_metadata)
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted(code, details)

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        # grpc_testing raises NotImplementedError here; only Connect asks.
        return self._context.peer()


@dataclasses.dataclass(frozen=True, slots=True)
class Raw:
    """A request the bridge passes to the servicer as is (grpc_testing never serializes)."""

    data: bytes


async def _next(replies: AsyncIterator[bytes]) -> bytes | None:
    return await anext(replies, None)


async def _aclose(replies: AsyncIterator[bytes]) -> None:
    await replies.aclose()  # type: ignore[attr-defined]


class SyncServicer:
    """``_Servicer`` as grpc_testing calls it: sync methods taking and returning messages."""

    def __init__(self, servicer: _Servicer, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(TIMEOUT)

    @staticmethod
    def _bytes(request: Message | Raw) -> bytes:
        return request.data if isinstance(request, Raw) else request.SerializeToString()

    def Send(
        self, request: Message | Raw, context: grpc.ServicerContext
    ) -> messages_pb2.Reply | None:
        try:
            data = self._run(self._servicer.Send(self._bytes(request), AsyncContext(context)))  # type: ignore[arg-type]
        except _Aborted:
            return None
        return messages_pb2.Reply.FromString(data)

    def SendStream(
        self, request: Message | Raw, context: grpc.ServicerContext
    ) -> Iterator[messages_pb2.Reply]:
        replies = self._servicer.SendStream(self._bytes(request), AsyncContext(context))  # type: ignore[arg-type]
        try:
            while (data := self._run(_next(replies))) is not None:
                yield messages_pb2.Reply.FromString(data)
        except _Aborted:
            return
        finally:
            self._run(_aclose(replies))

    def Describe(
        self, request: Message | Raw, context: grpc.ServicerContext
    ) -> messages_pb2.AgentCard:
        data = self._run(self._servicer.Describe(self._bytes(request), AsyncContext(context)))  # type: ignore[arg-type]
        return messages_pb2.AgentCard.FromString(data)


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """The google.rpc.Status of a failed RPC and its sigwire ErrorInfo."""

    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo


def failure(trailing_metadata: Metadata) -> Failure:
    """Parse the ``grpc-status-details-bin`` trailer; fails the test if it is missing."""
    blobs = [value for key, value in trailing_metadata if key == DETAILS_KEY]
    assert len(blobs) == 1, f"no single {DETAILS_KEY} trailer in {trailing_metadata!r}"
    assert isinstance(blobs[0], bytes)
    status = status_pb2.Status.FromString(blobs[0])
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, f"no single ErrorInfo in {status!r}"
    assert infos[0].domain == DOMAIN
    return Failure(status, infos[0])


def assert_failed(termination: tuple[Any, ...], code: grpc.StatusCode, reason: str) -> Failure:
    """Check a unary termination's code and reason; returns the parsed details."""
    response, trailing_metadata, actual_code, details = termination
    assert actual_code == code, details
    assert response is None
    found = failure(trailing_metadata)
    assert found.info.reason == reason
    assert found.status.code == code.value[0]
    assert found.status.message == details
    return found


@pytest.fixture
def background_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread; stopped and closed after the test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="servicer-loop", daemon=True)
    thread.start()
    yield loop

    async def finish() -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_asyncgens()

    try:
        asyncio.run_coroutine_threadsafe(finish(), loop).result(TIMEOUT)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the servicer loop did not stop"
        loop.close()


@pytest.fixture
def client() -> sigwire.Identity:
    """The identity signing the test's envelopes."""
    return sigwire.Identity.from_seed(bytes(range(32)))


@pytest.fixture
def server() -> sigwire.Server:
    """A sigwire server with test handlers, constructed but never started (no sockets)."""
    server = sigwire.Server(
        sigwire.Identity.from_seed(bytes(range(32, 64))), grpc="127.0.0.1:0", name="unit"
    )

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        return msg.payload

    @server.on("count")
    async def count(msg: sigwire.Message) -> AsyncIterator[str]:
        for i in range(int(msg.payload)):
            yield f"part {i}"

    @server.on("crash")
    async def crash(msg: sigwire.Message) -> bytes:
        raise ValueError("secret internal detail")

    return server


@pytest.fixture
def rpc_server(
    server: sigwire.Server, background_loop: asyncio.AbstractEventLoop
) -> grpc_testing.Server:
    """A grpc_testing server in front of the servicer of ``server``."""
    bridge = SyncServicer(_Servicer(server), background_loop)
    return grpc_testing.server_from_dictionary({SERVICE: bridge}, grpc_testing.strict_real_time())


def signed(identity: sigwire.Identity, kind: str, payload: bytes = b"") -> sigwire.Envelope:
    """A fresh envelope from ``identity``, signed."""
    return identity.sign_envelope(sigwire.Envelope.new(kind, payload, sender=identity.did))


def send(rpc_server: grpc_testing.Server, request: Message | Raw) -> tuple[Any, ...]:
    """Invoke Send; returns ``(response, trailing_metadata, code, details)``."""
    rpc = rpc_server.invoke_unary_unary(SEND, {}, request, TIMEOUT)
    return rpc.termination()  # type: ignore[no-any-return]


def test_send_echo_returns_signed_reply(
    rpc_server: grpc_testing.Server, server: sigwire.Server, client: sigwire.Identity
) -> None:
    """Send answers OK with a Reply signed by the server and bound to the envelope."""
    envelope = signed(client, "echo", b"hello")
    response, trailing_metadata, code, details = send(rpc_server, _proto.envelope_to_pb(envelope))
    assert code == grpc.StatusCode.OK, details
    assert isinstance(response, messages_pb2.Reply)
    assert DETAILS_KEY not in dict(trailing_metadata)
    reply = _proto.reply_from_pb(response)
    sigwire.Verifier().verify_reply(reply, envelope, expected_responder=server.identity.did)
    assert (reply.success, reply.data, reply.sequence, reply.final) == (True, b"hello", 0, True)


def test_send_garbage_is_malformed(rpc_server: grpc_testing.Server) -> None:
    """Undecodable request bytes get INVALID_ARGUMENT with reason MALFORMED."""
    with pytest.raises(DecodeError):
        messages_pb2.Envelope.FromString(GARBAGE)
    found = assert_failed(
        send(rpc_server, Raw(GARBAGE)), grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED"
    )
    assert found.status.message.startswith("undecodable Envelope")


def test_send_unsigned_is_unauthenticated(
    rpc_server: grpc_testing.Server, client: sigwire.Identity
) -> None:
    """An unsigned envelope gets UNAUTHENTICATED with reason SIGNATURE_MISSING."""
    envelope = sigwire.Envelope.new("echo", b"hello", sender=client.did)
    assert_failed(
        send(rpc_server, _proto.envelope_to_pb(envelope)),
        grpc.StatusCode.UNAUTHENTICATED,
        "SIGNATURE_MISSING",
    )


def test_send_unknown_kind_is_unimplemented(
    rpc_server: grpc_testing.Server, client: sigwire.Identity
) -> None:
    """A kind without a handler gets UNIMPLEMENTED with reason KIND_UNKNOWN and the kind."""
    envelope = signed(client, "no.such.kind")
    found = assert_failed(
        send(rpc_server, _proto.envelope_to_pb(envelope)),
        grpc.StatusCode.UNIMPLEMENTED,
        "KIND_UNKNOWN",
    )
    assert dict(found.info.metadata) == {"kind": "no.such.kind"}


def test_send_to_streaming_kind_is_failed_precondition(
    rpc_server: grpc_testing.Server, server: sigwire.Server, client: sigwire.Identity
) -> None:
    """Send refuses a streaming kind with FAILED_PRECONDITION / STREAMING_KIND, running nothing."""
    envelope = signed(client, "count", b"3")
    assert_failed(
        send(rpc_server, _proto.envelope_to_pb(envelope)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "STREAMING_KIND",
    )
    assert server.dispatcher.handled == 0


def test_send_to_streaming_kind_checks_the_signature_first(
    rpc_server: grpc_testing.Server, client: sigwire.Identity
) -> None:
    """An unsigned envelope for a streaming kind is SIGNATURE_MISSING: kinds leak to no one."""
    envelope = sigwire.Envelope.new("count", b"3", sender=client.did)
    assert_failed(
        send(rpc_server, _proto.envelope_to_pb(envelope)),
        grpc.StatusCode.UNAUTHENTICATED,
        "SIGNATURE_MISSING",
    )


def test_send_handler_crash_is_internal_without_traceback(
    rpc_server: grpc_testing.Server, client: sigwire.Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """A crashing handler gets INTERNAL / HANDLER_FAILED with an error_id, not its traceback."""
    envelope = signed(client, "crash")
    with caplog.at_level(logging.ERROR, logger="sigwire.server"):
        found = assert_failed(
            send(rpc_server, _proto.envelope_to_pb(envelope)),
            grpc.StatusCode.INTERNAL,
            "HANDLER_FAILED",
        )
    error_id = found.info.metadata["error_id"]
    assert error_id
    assert error_id in found.status.message
    for text in (found.status.message, found.info.SerializeToString().decode("latin-1")):
        assert "Traceback" not in text
        assert "secret internal detail" not in text
        assert "ValueError" not in text
    # The traceback goes to the server log instead, under the same id.
    logged = [r for r in caplog.records if r.name == "sigwire.server" and r.exc_info]
    assert len(logged) == 1
    assert error_id in logged[0].getMessage()


def test_send_stream_yields_parts_in_order(
    rpc_server: grpc_testing.Server, server: sigwire.Server, client: sigwire.Identity
) -> None:
    """SendStream yields signed parts numbered 0..n in order, only the last one final."""
    envelope = signed(client, "count", b"3")
    rpc = rpc_server.invoke_unary_stream(SEND_STREAM, {}, _proto.envelope_to_pb(envelope), TIMEOUT)
    replies = [_proto.reply_from_pb(rpc.take_response()) for _ in range(4)]
    trailing_metadata, code, details = rpc.termination()
    assert code == grpc.StatusCode.OK, details
    assert DETAILS_KEY not in dict(trailing_metadata)
    with pytest.raises(ValueError, match="No more responses"):
        rpc.take_response()
    verifier = sigwire.Verifier()
    for reply in replies:
        verifier.verify_reply(reply, envelope, expected_responder=server.identity.did)
        assert reply.success
    assert [r.sequence for r in replies] == [0, 1, 2, 3]
    assert [r.final for r in replies] == [False, False, False, True]
    assert [r.data for r in replies] == [b"part 0", b"part 1", b"part 2", b""]


def test_send_stream_unknown_kind_is_unimplemented(
    rpc_server: grpc_testing.Server, client: sigwire.Identity
) -> None:
    """SendStream refuses an unknown kind with UNIMPLEMENTED / KIND_UNKNOWN and no replies."""
    envelope = signed(client, "no.such.kind")
    rpc = rpc_server.invoke_unary_stream(SEND_STREAM, {}, _proto.envelope_to_pb(envelope), TIMEOUT)
    trailing_metadata, code, details = rpc.termination()
    assert code == grpc.StatusCode.UNIMPLEMENTED, details
    assert failure(trailing_metadata).info.reason == "KIND_UNKNOWN"
    with pytest.raises(ValueError, match="No more responses"):
        rpc.take_response()


def test_describe_returns_signed_card(
    rpc_server: grpc_testing.Server, server: sigwire.Server
) -> None:
    """Describe answers with the server's self-signed card listing its kinds."""
    rpc = rpc_server.invoke_unary_unary(DESCRIBE, {}, transport_pb2.DescribeRequest(), TIMEOUT)
    response, _, code, details = rpc.termination()
    assert code == grpc.StatusCode.OK, details
    assert isinstance(response, messages_pb2.AgentCard)
    card = _proto.card_from_pb(response)
    sigwire.Verifier().verify_card(card, expected_did=server.identity.did)
    assert card.kinds == ("count", "crash", "echo")
    assert card.name == "unit"
    # Never started, so it serves on no endpoint.
    assert card.endpoints == ()
