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

import grpc.aio
import pytest

import sigwire
from sigwire import _proto
from sigwire.dispatch import Dispatcher, Handlers
from sigwire.session import Session, SessionOptions
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


class _NeverRead:
    """A FrameStream to a peer that sends frames but never reads: every write blocks."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().create_future()

    async def recv(self) -> bytes | None:
        return await self.inbox.get()

    async def close(self, reason: str = "", message: str = "") -> None:
        self.inbox.put_nowait(None)


async def test_a_peer_flooding_refused_envelopes_without_reading_is_cut_off(
    server_identity: sigwire.Identity, client_identity: sigwire.Identity
) -> None:
    """Refusals wait for room like any reply: the flood ends in OVERLOADED, the queue bounded."""
    window = 8
    dispatcher = Dispatcher(server_identity, Handlers(), limits=sigwire.Limits(rate=None))
    stream = _NeverRead()
    session = Session(
        stream, dispatcher, on_reply=lambda reply, ok: None, options=SessionOptions(window=window)
    )
    running = asyncio.create_task(session.run())
    sent = 0
    async with asyncio.timeout(TIMEOUT):
        for sequence in range(1, 200):
            frame = pb.Frame(sequence=sequence)
            for _ in range(16):
                # Misdirected: refused before any signature check, no key needed.
                envelope = sigwire.Envelope.new(
                    "echo", b"", sender=client_identity.did, recipient="did:key:zSomeoneElse"
                )
                _proto.add_envelope(frame.envelopes.envelopes, envelope)
            stream.inbox.put_nowait(frame.SerializeToString())
            sent += 16
            for _ in range(5):
                await asyncio.sleep(0)
            if session.error is not None:
                break
        assert session.error is not None, f"{sent} refused envelopes and the peer is still on"
        assert session.error.reason == "OVERLOADED"
        assert session._queue.qsize() <= 4 * window + 2
        # What the server read before it stopped reading (frames still queued
        # here were never taken): a few windows' worth, not the whole flood.
        taken = sent - 16 * stream.inbox.qsize()
        assert taken <= 16 * window, f"cut off only after reading {taken} envelopes"
        await running
