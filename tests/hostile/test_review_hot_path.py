"""What a review of the no-task-per-envelope hot path found, pinned against real servers.

* A peer that stops reading and floods refused envelopes is cut off with
  OVERLOADED, its refusals bounded like any reply.
* Handlers run as their own task from their first line: ``asyncio.timeout``
  and ``TaskGroup`` inside one never act on the session or the RPC.
* Handlers never see another handler's contextvars.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

import sigwire
from sigwire import _proto
from tests.conftest import TIMEOUT
from tests.servers import LOCAL

pb = _proto.pb
SERVICE = "/sigwire.v1.AgentTransport/"
TRANSPORTS = ("grpc", "ws", "memory")
REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST", default="-")


@pytest.fixture
async def server(server_identity: sigwire.Identity) -> AsyncIterator[sigwire.Server]:
    server = sigwire.Server(
        server_identity, grpc=LOCAL, ws=LOCAL, memory=f"hot-path-{uuid.uuid4().hex}"
    )

    @server.on("slow")
    async def slow(msg: sigwire.Message) -> str:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(TIMEOUT)
            return "slept"
        except TimeoutError:
            return "timed out"

    @server.on("group")
    async def group(msg: sigwire.Message) -> str:
        async def fails() -> None:
            await asyncio.sleep(0)
            raise ValueError("child failed")

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(fails())
                tasks.create_task(asyncio.sleep(TIMEOUT))
        except ExceptionGroup:
            return "child error handled"
        return "no error"

    @server.on("context")
    async def context(msg: sigwire.Message) -> str:
        return msg.payload.decode()

    async with asyncio.timeout(TIMEOUT):
        await server.start()
    yield server
    async with asyncio.timeout(TIMEOUT):
        await server.stop(grace=0)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("kind", "expected"), [("slow", b"timed out"), ("group", b"child error handled")]
)
async def test_timeouts_and_task_groups_in_a_handler_act_on_the_handler(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    transport: str,
    kind: str,
    expected: bytes,
) -> None:
    """The handler's own timeout or task group ends the handler, never the stream."""
    url = server.urls[TRANSPORTS.index(transport)]
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(url, identity=client_identity, learn_endpoints=False) as peer,
    ):
        reply = await peer.request(kind, b"", timeout=TIMEOUT)
        assert reply.data == expected
        assert (await peer.request("context", b"after")).data == b"after"
        assert peer.reconnects == 0


@pytest.mark.parametrize(
    ("kind", "expected"), [("slow", b"timed out"), ("group", b"child error handled")]
)
async def test_timeouts_and_task_groups_in_a_handler_spare_the_unary_rpc(
    server: sigwire.Server, client_identity: sigwire.Identity, kind: str, expected: bytes
) -> None:
    """Over the unary Send RPC the handler's timeout cancels the handler, not the RPC."""
    envelope = client_identity.sign_envelope(
        sigwire.Envelope.new(kind, b"", sender=client_identity.did)
    )
    address = server.urls[0].removeprefix("grpc://")
    async with asyncio.timeout(TIMEOUT), grpc.aio.insecure_channel(address) as channel:
        send = channel.unary_unary(SERVICE + "Send")
        data = await send(_proto.envelope_to_pb(envelope).SerializeToString())
    assert _proto.decode_reply(data).data == expected


async def test_a_handler_never_starts_in_another_handlers_context(
    server_identity: sigwire.Identity, client_identity: sigwire.Identity
) -> None:
    """With a server window of one, each handler starts as the previous ends: in a clean context."""
    server = sigwire.Server(
        server_identity, memory=f"window-one-{uuid.uuid4().hex}", limits=sigwire.Limits(window=1)
    )
    started: list[tuple[str, str]] = []

    @server.on("context")
    async def context(msg: sigwire.Message) -> str:
        started.append((msg.payload.decode(), REQUEST.get()))
        REQUEST.set(msg.payload.decode())
        await asyncio.sleep(0.01)
        return REQUEST.get()

    async with (
        asyncio.timeout(TIMEOUT),
        server,
        sigwire.connect(server.urls[0], identity=client_identity, learn_endpoints=False) as peer,
    ):
        replies = await asyncio.gather(*(peer.request("context", p) for p in ("A", "B", "C")))
    assert [r.data for r in replies] == [b"A", b"B", b"C"]
    assert started == [("A", "-"), ("B", "-"), ("C", "-")]


async def test_a_peer_flooding_refused_envelopes_without_reading_is_cut_off(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """Refusals wait for room like any reply: the flood ends in OVERLOADED, memory bounded."""
    address = server.urls[0].removeprefix("grpc://")
    async with asyncio.timeout(TIMEOUT), grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(SERVICE + "Connect")()
        sent = await _flood_until_refused(call, client_identity)
        call.cancel()
    async with asyncio.timeout(TIMEOUT):
        while server._all_sessions:  # noqa: ASYNC110 (the server's own set of live streams)
            await asyncio.sleep(0.01)
    window = server.session_options.window
    assert sent <= 100 * window, f"{sent} refused envelopes accepted from a peer that never reads"


async def _flood_until_refused(call: object, identity: sigwire.Identity) -> int:
    """Write frames of 100 misdirected envelopes, never reading; how many went before a failure."""
    sent = 0
    for sequence in range(1, 1000):
        frame = pb.Frame(sequence=sequence)
        for _ in range(100):
            # Misdirected: refused before any signature check, no key needed.
            envelope = sigwire.Envelope.new(
                "echo", b"", sender=identity.did, recipient="did:key:zSomeoneElse"
            )
            _proto.add_envelope(frame.envelopes.envelopes, envelope)
        try:
            await asyncio.wait_for(call.write(frame.SerializeToString()), TIMEOUT)  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError:
            return sent
        sent += 100
    raise AssertionError(f"the server took {sent} refused envelopes and never cut the peer off")
