"""Batch-signed requests across a cut connection, over gRPC and WebSocket.

A client's writer signs the requests of one frame with one batch signature.
When the stream is cut, the client re-sends exactly those signed envelopes
(same nonce, same value, same proof) on the next stream: the server must see
exact duplicates, run every handler once, and answer with replies bound to the
batch-signed envelopes. The server's ``admit`` is wrapped (in this test only)
to record what it judged fresh and what a duplicate.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

import sigwire
from tests.chaos.conftest import TRANSPORTS
from tests.conftest import TIMEOUT
from tests.integration.helpers import FAST_BACKOFF, TcpProxy

REQUESTS = 24


class Agent:
    """A server whose ``work`` handler records each run and waits for a gate."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = sigwire.Server(
            sigwire.Identity.generate(), grpc="127.0.0.1:0", ws="127.0.0.1:0"
        )
        self.runs: collections.Counter[bytes] = collections.Counter()
        self.handled: dict[bytes, sigwire.Envelope] = {}
        self.started: asyncio.Queue[bytes] = asyncio.Queue()
        self.gate = asyncio.Event()
        # Every envelope the dispatcher admitted, and whether it was fresh.
        self.admitted: list[tuple[sigwire.Envelope, bool]] = []
        self.duplicates: asyncio.Queue[str] = asyncio.Queue()

        @self.server.on("work")
        async def work(msg: sigwire.Message) -> bytes:
            self.runs[msg.payload] += 1
            self.handled[msg.payload] = msg.envelope
            self.started.put_nowait(msg.payload)
            await self.gate.wait()
            return b"done " + msg.payload

        dispatcher = self.server.dispatcher
        admit = dispatcher.admit

        def recording(envelope: sigwire.Envelope, **checks: bool) -> bool:
            fresh = admit(envelope, **checks)
            self.admitted.append((envelope, fresh))
            if not fresh:
                self.duplicates.put_nowait(envelope.id)
            return fresh

        monkeypatch.setattr(dispatcher, "admit", recording)

    def url(self, transport: str) -> str:
        return self.server.urls[TRANSPORTS.index(transport)]


@pytest.fixture
async def agent(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Agent]:
    agent = Agent(monkeypatch)
    await agent.server.start()
    yield agent
    agent.gate.set()
    async with asyncio.timeout(TIMEOUT):
        await agent.server.stop(grace=0)


def _connect(proxy: TcpProxy, transport: str, identity: sigwire.Identity) -> Any:
    url = proxy.url if transport == "grpc" else proxy.ws_url
    return sigwire.connect(url, identity=identity, backoff=FAST_BACKOFF, learn_endpoints=False)


async def _wait(queue: asyncio.Queue[Any], count: int) -> None:
    for _ in range(count):
        await queue.get()


def _check(agent: Agent, replies: list[sigwire.Reply]) -> None:
    """Handlers ran once; re-sends were exact duplicates; replies bind the first envelopes."""
    payloads = [b"%d" % i for i in range(REQUESTS)]
    assert [r.data for r in replies] == [b"done " + p for p in payloads]
    assert agent.runs == dict.fromkeys(payloads, 1)
    first = {p: agent.handled[p] for p in payloads}
    batched = [e for e in first.values() if e.signature and e.signature.batch]
    assert len(batched) >= 2, "the writer signed no batch"
    by_id: dict[str, list[tuple[sigwire.Envelope, bool]]] = collections.defaultdict(list)
    for envelope, fresh in agent.admitted:
        by_id[envelope.id].append((envelope, fresh))
    for envelope in first.values():
        seen = by_id[envelope.id]
        # Fresh once, then at least one duplicate that is the very same envelope.
        assert [fresh for _, fresh in seen] == [True] + [False] * (len(seen) - 1)
        assert len(seen) >= 2
        assert all(again == envelope for again, _ in seen)
    verifier = sigwire.Verifier()
    for reply, payload in zip(replies, payloads, strict=True):
        verifier.verify_reply(reply, first[payload], expected_responder=reply.responder)


async def test_batch_signed_requests_resent_after_a_cut_run_once(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """Cut while every handler runs: batch-signed re-sends are duplicates, answered from cache."""
    client = sigwire.Identity.generate()
    async with asyncio.timeout(TIMEOUT), _connect(proxy, transport, client) as peer:
        pending = [
            asyncio.create_task(peer.request("work", b"%d" % i, timeout=TIMEOUT))
            for i in range(REQUESTS)
        ]
        await _wait(agent.started, REQUESTS)
        proxy.cut()
        agent.gate.set()
        replies = await asyncio.gather(*pending)
        assert peer.reconnects >= 1
        assert replies[0].responder == agent.server.identity.did
    _check(agent, replies)


async def test_batch_signed_resends_follow_handlers_still_running(
    agent: Agent, proxy: TcpProxy, transport: str
) -> None:
    """Re-sends that arrive while the handlers still run follow them; replies bind the originals."""
    client = sigwire.Identity.generate()
    async with asyncio.timeout(TIMEOUT), _connect(proxy, transport, client) as peer:
        pending = [
            asyncio.create_task(peer.request("work", b"%d" % i, timeout=TIMEOUT))
            for i in range(REQUESTS)
        ]
        await _wait(agent.started, REQUESTS)
        proxy.cut()
        # Every request re-sent on the new stream and judged a duplicate, before any answer.
        await _wait(agent.duplicates, REQUESTS)
        agent.gate.set()
        replies = await asyncio.gather(*pending)
        assert peer.reconnects >= 1
    _check(agent, replies)
    # The replies came on the second stream, batch-signed there (the hello asked for it).
    assert len([r for r in replies if r.signature and r.signature.batch]) >= 2
