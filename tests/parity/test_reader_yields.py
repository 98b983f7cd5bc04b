"""A stream's reader lets the loop run between frames, over every transport.

Every envelope's handler runs as its own task; one that answers without
waiting is done after its first step, but its task object lives until the
loop next runs it. A reader that took frame after frame without letting the
loop run (websockets and the in-memory pipe hand over queued frames without
suspending) kept every one of those tasks alive at once: hundreds of them, all
of which the garbage collector's young generation had to walk, again and again
(4x as many young collections as over gRPC, whose reads always suspend). Now
the reader yields once per frame, so a handler never sees more pending tasks
than its own frame started, whatever the transport.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

import sigwire
from sigwire.session import _BATCH_MESSAGES
from tests.conftest import TIMEOUT
from tests.servers import LOCAL

TRANSPORTS = ("grpc", "ws", "memory")
REQUESTS = 3000
IN_FLIGHT = 256


class _Pending:
    def __init__(self) -> None:
        self.counts: list[int] = []


@pytest.fixture
async def server(
    server_identity: sigwire.Identity,
) -> AsyncIterator[tuple[sigwire.Server, _Pending]]:
    pending = _Pending()
    server = sigwire.Server(
        server_identity,
        grpc=LOCAL,
        ws=LOCAL,
        memory=f"reader-yields-{uuid.uuid4().hex}",
        limits=sigwire.Limits(rate=None),
    )

    @server.on("count")
    async def count(msg: sigwire.Message) -> bytes:
        pending.counts.append(len(asyncio.all_tasks()))
        return msg.payload

    async with asyncio.timeout(TIMEOUT):
        await server.start()
    yield server, pending
    async with asyncio.timeout(TIMEOUT):
        await server.stop(grace=0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_handler_sees_no_more_pending_tasks_than_its_frame_started(
    server: tuple[sigwire.Server, _Pending], client_identity: sigwire.Identity, transport: str
) -> None:
    """3,000 requests, 256 in flight: pending tasks stay within one frame's worth."""
    agent, pending = server
    url = agent.urls[TRANSPORTS.index(transport)]
    async with (
        asyncio.timeout(TIMEOUT * 4),
        sigwire.connect(url, identity=client_identity, learn_endpoints=False) as peer,
    ):
        baseline = len(asyncio.all_tasks())
        queue = iter(range(REQUESTS))

        async def worker() -> None:
            for i in queue:
                reply = await peer.request("count", b"%d" % i)
                assert reply.data == b"%d" % i

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        assert peer.reconnects == 0
    assert len(pending.counts) == REQUESTS
    # The client and server share this loop (and its tasks): the workers, the
    # client's own tasks and the server's sessions, plus the handlers of the
    # frame being read. Without the yield, memory and ws reached 400-900 here.
    limit = baseline + IN_FLIGHT + 2 * _BATCH_MESSAGES
    assert max(pending.counts) <= limit, (max(pending.counts), limit)
