"""A message on an idle stream is written at once; what follows it keeps its order and batches.

The writer task is skipped only when nothing is queued, in flight or being
written. These tests pin what must not change because of it: a caller's
cancellation never reaches the transport's write, messages never overtake one
another, and requests sent together still travel in one batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import sigwire
from tests.conftest import TIMEOUT
from tests.servers import LOCAL

TRANSPORTS = ("grpc", "ws", "memory")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def agent(server_identity: sigwire.Identity) -> AsyncIterator[tuple[sigwire.Server, list]]:
    """A server whose ``note`` handler records the order in which requests reach it."""
    server = sigwire.Server(
        server_identity, grpc=LOCAL, ws=LOCAL, memory=f"at-once-{id(server_identity)}"
    )
    seen: list[bytes] = []

    @server.on("note")
    async def note(msg: sigwire.Message) -> bytes:
        seen.append(msg.payload)
        return msg.payload

    async with asyncio.timeout(TIMEOUT):
        await server.start()
    yield server, seen
    async with asyncio.timeout(TIMEOUT):
        await server.stop(grace=0)


def _connect(server: sigwire.Server, transport: str, identity: sigwire.Identity) -> Any:
    url = server.urls[TRANSPORTS.index(transport)]
    return sigwire.connect(url, identity=identity, learn_endpoints=False)


async def test_a_caller_cancelled_during_its_write_leaves_the_stream_up(
    agent: tuple[sigwire.Server, list], client_identity: sigwire.Identity, transport: str
) -> None:
    """Cancelling a request whose frame is being written neither breaks nor reopens the stream."""
    server, seen = agent
    async with (
        asyncio.timeout(TIMEOUT),
        _connect(server, transport, client_identity) as peer,
    ):
        for i in range(20):
            task = asyncio.create_task(peer.request("note", b"cancelled %d" % i))
            await asyncio.sleep(0)  # the request is written now, and its reply awaited
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            reply = await peer.request("note", b"after %d" % i)
            assert reply.data == b"after %d" % i
        assert peer.reconnects == 0
    assert [p for p in seen if p.startswith(b"after")] == [b"after %d" % i for i in range(20)]


async def test_requests_sent_together_arrive_in_order_and_batched(
    agent: tuple[sigwire.Server, list], client_identity: sigwire.Identity, transport: str
) -> None:
    """The first of a burst goes out at once; the rest follow it in order, batch-signed."""
    server, seen = agent
    payloads = [b"%d" % i for i in range(40)]
    async with (
        asyncio.timeout(TIMEOUT),
        _connect(server, transport, client_identity) as peer,
    ):
        await peer.request("note", b"warm-up")
        seen.clear()
        signed: list[sigwire.Envelope] = []
        admit = server.dispatcher.admit

        def recording(envelope: sigwire.Envelope, **checks: bool) -> bool:
            signed.append(envelope)
            return admit(envelope, **checks)

        server.dispatcher.admit = recording  # type: ignore[method-assign]
        replies = await asyncio.gather(*(peer.request("note", p) for p in payloads))
    assert [r.data for r in replies] == payloads
    assert seen == payloads
    batched = [e for e in signed if e.signature is not None and e.signature.batch is not None]
    assert len(batched) >= len(payloads) // 2, f"only {len(batched)} of {len(payloads)} batched"


async def test_one_request_at_a_time_costs_one_frame_each_way(
    agent: tuple[sigwire.Server, list],
    client_identity: sigwire.Identity,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sequential requests: a frame per request and per reply, acks riding on them."""
    server, _ = agent
    written: list[tuple[str, bytes]] = []
    send = sigwire.session.Session._flush

    async def counting(self: sigwire.session.Session, batch: list[object]) -> bool:
        written.append((self.name, b""))
        return await send(self, batch)

    async with (
        asyncio.timeout(TIMEOUT),
        _connect(server, transport, client_identity) as peer,
    ):
        await peer.request("note", b"warm-up")
        monkeypatch.setattr(sigwire.session.Session, "_flush", counting)
        for i in range(10):
            await peer.request("note", b"%d" % i)
        monkeypatch.undo()
    client_flushes = [name for name, _ in written if name.startswith("client")]
    server_flushes = [name for name, _ in written if not name.startswith("client")]
    assert len(client_flushes) == 10
    assert len(server_flushes) == 10
