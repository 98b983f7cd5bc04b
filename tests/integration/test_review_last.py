"""Review of 3d84aa3..2ab433b (negotiated features, cached signed replies, rated re-sends).

Each test pins one finding of that review (fixed since):

1. A client re-sent, after a reconnect, the batch-signed envelopes of its first
   stream unchanged, even when the new stream's hello reply announced no
   ``batch-signatures`` (an agent rolled back to, or load-balanced onto, the
   earlier protocol, which refuses batch-signed requests). docs/signing.md 4.5:
   such requests now go out as re-signed retries, signed alone.
2. Exact re-sends answered from the reply cache took a rate-limit token, so
   the re-sends a client makes on its own after a reconnect could be refused
   with RATE_LIMITED although their handlers ran (or still ran): the caller
   saw a failure for work that was done. The first re-send of an id on a
   stream is now free (docs/signing.md 8).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import sigwire
import sigwire.dispatch
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeProxy, MakeServer
from tests.integration.helpers import FAST_BACKOFF


@dataclass
class Recorder:
    """What the server admitted (and whether fresh), and a gated ``work`` handler."""

    admitted: list[tuple[sigwire.Envelope, bool]] = field(default_factory=list)
    started: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    duplicates: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    arrivals: asyncio.Queue[sigwire.Envelope] = field(default_factory=asyncio.Queue)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    runs: int = 0


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.gate.set()


def _instrument(server: sigwire.Server, rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    @server.on("work")
    async def work(msg: sigwire.Message) -> bytes:
        rec.runs += 1
        rec.started.put_nowait(msg.payload)
        await rec.gate.wait()
        return b"done " + msg.payload

    dispatcher = server.dispatcher
    admit = dispatcher.admit

    def recording(envelope: sigwire.Envelope, **checks: bool) -> bool:
        fresh = admit(envelope, **checks)
        rec.admitted.append((envelope, fresh))
        if envelope.kind == "work":
            rec.arrivals.put_nowait(envelope)
        if not fresh:
            rec.duplicates.put_nowait(envelope.id)
        return fresh

    monkeypatch.setattr(dispatcher, "admit", recording)


async def _take(queue: asyncio.Queue[Any], count: int) -> None:
    for _ in range(count):
        await queue.get()


async def test_resend_to_an_agent_without_batch_signatures_is_not_batch_signed(
    make_server: MakeServer,
    make_proxy: MakeProxy,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests = 24
    server = await make_server()
    _instrument(server, recorder, monkeypatch)
    proxy = await make_proxy(server.urls[0])
    client = sigwire.Identity.generate()
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(
            proxy.url, identity=client, backoff=FAST_BACKOFF, learn_endpoints=False
        ) as peer,
    ):
        pending = [
            asyncio.create_task(peer.request("work", b"%d" % i, timeout=TIMEOUT))
            for i in range(requests)
        ]
        await _take(recorder.started, requests)
        await _take(recorder.arrivals, requests)
        first = [e for e, fresh in recorder.admitted if fresh and e.kind == "work"]
        assert len([e for e in first if e.signature and e.signature.batch]) >= 2, (
            "precondition: the first stream carried batch-signed requests"
        )
        # The agent behind the endpoint now speaks the earlier protocol: its
        # hello reply announces no feature (as in tests/parity/test_negotiation.py).
        monkeypatch.setattr(sigwire.dispatch, "HELLO_CONTENT_TYPE", "text/plain; charset=utf-8")
        proxy.cut()
        await _take(recorder.arrivals, requests)  # every request again, on the new stream
        session = peer._session
        assert session is not None
        assert not session.batch_signatures  # negotiated: none
        recorder.gate.set()
        replies = await asyncio.gather(*pending)
    assert [r.data for r in replies] == [b"done %d" % i for i in range(requests)]
    assert recorder.runs == requests  # the re-signed retries were answered from the cache
    resent = [e for e, _ in recorder.admitted if e.kind == "work"][requests:]
    assert sorted(e.id for e in resent) == sorted(e.id for e in first)
    batched = [e.id for e in resent if e.signature and e.signature.batch is not None]
    assert batched == [], (
        f"{len(batched)} of {len(resent)} re-sent envelopes carry a batch signature to an "
        "agent whose hello reply announced no batch-signatures"
    )


async def test_automatic_resends_after_a_reconnect_are_not_refused(
    make_server: MakeServer,
    make_proxy: MakeProxy,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A burst of 10 and (for the test's duration) no refill: the client itself
    # sends a hello and 6 requests (7 tokens); the library then reconnects
    # (a hello, 8) and re-sends the 6 requests it has no answer to.
    requests = 6
    server = await make_server(limits=sigwire.Limits(rate=0.001, burst=10))
    _instrument(server, recorder, monkeypatch)
    proxy = await make_proxy(server.urls[0])
    client = sigwire.Identity.generate()
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(
            proxy.url, identity=client, backoff=FAST_BACKOFF, learn_endpoints=False
        ) as peer,
    ):
        pending = [
            asyncio.create_task(peer.request("work", b"%d" % i, timeout=TIMEOUT))
            for i in range(requests)
        ]
        await _take(recorder.started, requests)
        proxy.cut()
        await _take(recorder.duplicates, requests)
        recorder.gate.set()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert peer.reconnects >= 1
    assert recorder.runs == requests  # every handler ran, once
    refused = [r for r in results if isinstance(r, sigwire.RateLimitedError)]
    assert refused == [], (
        f"{len(refused)} of {requests} calls failed RATE_LIMITED after a reconnect, "
        "though each handler ran once and its answer is cached"
    )
    replies = [r for r in results if isinstance(r, sigwire.Reply)]
    assert [r.data for r in replies] == [b"done %d" % i for i in range(requests)]
