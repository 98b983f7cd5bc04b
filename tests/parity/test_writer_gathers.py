"""The writer gathers what callers queue in the same pass of the loop into one frame.

When the writer wakes with fewer messages than a frame holds, it lets the
loop run once before taking them, so callers woken in the same pass as its
own wake-up (typically the callers of the replies in a frame just read) join
the same frame. Without that, a pipelined stream settled into a cycle of a
frame of one request and a frame of 31, and each frame of one cost a whole
Ed25519 signature and verification, on each side, for one message.
"""

from __future__ import annotations

import asyncio

import pytest

import sigwire
import sigwire.session
from sigwire.envelope import Envelope
from sigwire.session import _BATCH_MESSAGES, Session
from tests.conftest import TIMEOUT
from tests.parity.conftest import Probe

LATE = _BATCH_MESSAGES - 1


async def test_requests_queued_in_one_pass_of_the_loop_share_a_frame(
    url: str,
    probe: Probe,
    client_identity: sigwire.Identity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One request queued, 31 callers woken just after it: one frame of 32, not 1 then 31."""
    frames: list[list[bytes]] = []
    flush = Session._flush

    async def recording(self: Session, batch: list[object]) -> bool:
        if self.name.startswith("client"):
            payloads = [m.payload for m in batch if isinstance(m, Envelope)]
            if payloads:
                frames.append(payloads)
        return await flush(self, batch)

    # No standalone ack while the test runs: the held request stays
    # unacknowledged, so the next request queues for the writer instead of
    # being written at once, as it does on a stream with requests in flight.
    monkeypatch.setattr(sigwire.session, "_ACK_DELAY", TIMEOUT * 2)
    async with (
        asyncio.timeout(TIMEOUT),
        sigwire.connect(url, identity=client_identity, learn_endpoints=False) as peer,
    ):
        await peer.request("echo", b"warm-up")
        monkeypatch.setattr(Session, "_flush", recording)
        held = asyncio.create_task(peer.request("block", b"held"))
        assert await probe.entered.get() == b"held"
        loop = asyncio.get_running_loop()
        gates = [loop.create_future() for _ in range(LATE)]

        async def late(i: int) -> sigwire.Reply:
            await gates[i]
            return await peer.request("echo", b"late %d" % i)

        waiting = [asyncio.create_task(late(i)) for i in range(LATE)]
        await asyncio.sleep(0)  # every late caller waits at its gate
        # The next pass of the loop runs the queued request, which wakes the
        # writer, then opens the gates: the late callers run in the pass
        # after, behind the writer's wake-up, as callers woken by a frame of
        # replies do.
        queued = asyncio.create_task(peer.request("echo", b"queued"))
        loop.call_soon(lambda: [gate.set_result(None) for gate in gates])
        replies = await asyncio.gather(queued, *waiting)
        probe.gate.set()
        assert (await held).data == b"released held"
        monkeypatch.undo()
        assert peer.reconnects == 0
    assert [r.data for r in replies] == [b"queued"] + [b"late %d" % i for i in range(LATE)]
    assert frames == [[b"held"], [b"queued"] + [b"late %d" % i for i in range(LATE)]], [
        len(f) for f in frames
    ]
