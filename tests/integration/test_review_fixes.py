"""Behaviours a review of the stream and client code asked for."""

from __future__ import annotations

import asyncio

import grpc.aio
import pytest

import sigwire
from sigwire import _proto
from sigwire._proto import pb
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeServer


async def test_an_id_reused_for_another_request_is_a_replay(server: sigwire.Server) -> None:
    """A re-signed envelope that keeps an id but asks something else is refused, not answered."""
    me = sigwire.Identity.generate()
    first = me.sign_envelope(sigwire.Envelope.new("echo", b"first", sender=me.did))
    other = me.sign_envelope(sigwire.Envelope.new("echo", b"other", sender=me.did, id=first.id))
    async with asyncio.timeout(TIMEOUT):
        assert [r.data async for r in server.dispatcher.dispatch(first)] == [b"first"]
        with pytest.raises(sigwire.ReplayError, match="different request"):
            _ = [r async for r in server.dispatcher.dispatch(other)]


async def test_a_ping_flood_from_a_peer_that_never_reads_queues_one_pong(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """However many pings arrive unread, at most one pong waits to be written."""
    # No BDP probing: the unread flow-control window stays small, so the server's
    # writer really blocks, as with any peer that has stopped reading.
    channel = grpc.aio.insecure_channel(
        server.urls[0].removeprefix("grpc://"), options=[("grpc.http2.bdp_probe", 0)]
    )
    call = channel.stream_stream("/sigwire.v1.AgentTransport/Connect")()
    hello = client_identity.sign_envelope(
        sigwire.Envelope.new(
            "sigwire.hello", sender=client_identity.did, recipient=server.identity.did
        )
    )
    async with asyncio.timeout(TIMEOUT):
        await call.write(
            pb.Frame(
                sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(hello)])
            ).SerializeToString()
        )
        await call.read()
        [session] = server._all_sessions
        for token in range(20_000):  # enough pongs to fill the unread flow-control window
            await call.write(pb.Frame(ping=pb.Ping(token=token)).SerializeToString())
        await asyncio.sleep(0.05)  # let the server read what it can
        assert session._queue.qsize() <= 2
        call.cancel()
    await channel.close()


async def test_a_request_that_timed_out_waiting_for_credit_never_runs(
    make_server: MakeServer,
) -> None:
    """A request whose deadline passed before it could be sent is not sent later."""
    server = await make_server(limits=sigwire.Limits(window=1))
    gate, ran = asyncio.Event(), []

    @server.on("slow")
    async def slow(msg: sigwire.Message) -> bytes:
        ran.append(msg.payload)
        await gate.wait()
        return msg.payload

    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            server.urls[0],
            session=sigwire.SessionOptions(window=1),
            backoff=sigwire.Backoff(initial=0.05, maximum=0.2),
            learn_endpoints=False,
        ) as peer:
            first = asyncio.create_task(peer.request("slow", b"1"))
            second = asyncio.create_task(peer.request("slow", b"2"))
            # Wait (observation only) until "2" sits unacknowledged in the server's
            # backlog: the client's one credit is then spent, and "3" must wait.
            [session] = server._all_sessions
            while not session._backlog:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            with pytest.raises(sigwire.DeadlineExceededError):
                await peer.request("slow", b"3", timeout=0.3)
            # A dropped stream makes the client re-send whatever is still pending.
            assert peer._session is not None
            await peer._session.stream.close()
            gate.set()
            assert [(await first).data, (await second).data] == [b"1", b"2"]
            await peer.request("slow", b"after")
            assert peer.reconnects >= 1
    assert b"3" not in ran
