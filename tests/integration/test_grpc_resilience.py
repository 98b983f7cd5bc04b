"""Idempotency, reconnection, deadlines, draining, heartbeats and flow control over gRPC.

Broken connections are real: a TCP proxy between client and server is cut,
black-holed or paused, or the server itself stops and a new one takes its port.
Clients behind the proxy do not learn the server's own endpoints from its card
(``learn_endpoints=False``), so the proxy stays their only route.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import sigwire
from sigwire._proto import pb
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeProxy, MakeServer, OpenChannel, Probe
from tests.integration.helpers import (
    FAST_BACKOFF,
    envelope,
    port_of,
    rpc_failure,
    stub,
    to_pb,
    verify_reply,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- idempotency -------------------------------------------------------------------


async def test_same_envelope_sent_twice_runs_the_handler_once(
    server: sigwire.Server,
    channel: grpc.aio.Channel,
    client_identity: sigwire.Identity,
    probe: Probe,
) -> None:
    """Sending one signed envelope twice runs its handler once and answers twice, identically."""
    request = envelope(client_identity, "counted", b"")
    async with asyncio.timeout(TIMEOUT):
        first = await stub(channel).Send(to_pb(request))
        second = await stub(channel).Send(to_pb(request))
    assert probe.calls["counted"] == 1
    assert first == second
    assert verify_reply(first, request, server.identity.did).data == b"run 1"


async def test_same_envelope_sent_concurrently_runs_the_handler_once(
    server: sigwire.Server,
    channel: grpc.aio.Channel,
    client_identity: sigwire.Identity,
    probe: Probe,
) -> None:
    """Two concurrent sends of one envelope share a single handler run and its answer."""
    request = envelope(client_identity, "counted", b"")
    async with asyncio.timeout(TIMEOUT):
        first, second = await asyncio.gather(
            stub(channel).Send(to_pb(request)), stub(channel).Send(to_pb(request))
        )
    assert probe.calls["counted"] == 1
    assert first == second
    assert verify_reply(second, request, server.identity.did).data == b"run 1"


# -- reconnection ------------------------------------------------------------------


async def test_request_issued_while_down_completes_after_restart(
    make_server: MakeServer, probe: Probe
) -> None:
    """A request made while the server is down is sent, and answered, once a new one is up."""
    server = await make_server()
    port = port_of(server.urls[0])
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], backoff=FAST_BACKOFF) as peer:
            assert (await peer.request("echo", b"before")).data == b"before"
            await server.stop(grace=0)
            pending = asyncio.create_task(peer.request("counted", b"", timeout=TIMEOUT))
            restarted = await make_server(grpc=f"127.0.0.1:{port}")
            assert restarted.urls == server.urls
            reply = await pending
    assert reply.data == b"run 1"
    assert reply.responder == restarted.identity.did
    assert probe.calls["counted"] == 1
    assert peer.reconnects == 1


async def test_request_refused_while_draining_completes_on_the_restarted_server(
    make_server: MakeServer, probe: Probe
) -> None:
    """A request refused with SHUTTING_DOWN is re-sent to the server that replaces it."""
    server = await make_server()
    port = port_of(server.urls[0])
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], backoff=FAST_BACKOFF) as peer:
            blocked = asyncio.create_task(peer.request("block", b"job", timeout=TIMEOUT))
            await probe.entered.wait()
            stopping = asyncio.create_task(server.stop(grace=TIMEOUT))
            await asyncio.sleep(0)  # stop() runs up to its first await: draining
            assert not server.dispatcher.accepting
            refused = asyncio.create_task(peer.request("counted", b"", timeout=TIMEOUT))
            # Give a wrong answer time to arrive (a pass never depends on this).
            await asyncio.sleep(0.05)
            assert not refused.done()
            probe.gate.set()
            assert (await blocked).data == b"released job"
            await stopping
            restarted = await make_server(grpc=f"127.0.0.1:{port}")
            reply = await refused
    assert reply.data == b"run 1"
    assert reply.responder == restarted.identity.did
    assert probe.calls["counted"] == 1


async def test_in_flight_request_is_resent_and_runs_once(
    server: sigwire.Server, make_proxy: MakeProxy, probe: Probe
) -> None:
    """A request whose handler is running when the link is cut is re-sent; the handler runs once."""
    proxy = await make_proxy(server.urls[0])
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(proxy.url, backoff=FAST_BACKOFF, learn_endpoints=False) as peer:
            blocked = asyncio.create_task(peer.request("block", b"job", timeout=TIMEOUT))
            await probe.entered.wait()
            proxy.cut()
            # Answered only once the peer has reconnected and re-sent what was
            # pending, in order: by then the re-sent "block" is on the server too.
            assert (await peer.request("echo", b"after")).data == b"after"
            assert peer.reconnects == 1
            assert not blocked.done()
            probe.gate.set()
            reply = await blocked
    assert reply.data == b"released job"
    assert probe.calls["block"] == 1
    assert proxy.accepted == 2


async def test_streamed_answer_resumes_after_a_cut_without_duplicates(
    server: sigwire.Server, make_proxy: MakeProxy, probe: Probe
) -> None:
    """A stream cut after its first part resumes on the new stream; each part arrives once."""
    proxy = await make_proxy(server.urls[0])
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(proxy.url, backoff=FAST_BACKOFF, learn_endpoints=False) as peer:
            parts = peer.stream("count_block", b"", timeout=TIMEOUT)
            first = await anext(parts)
            await probe.entered.wait()
            proxy.cut()
            assert (await peer.request("echo", b"after")).data == b"after"
            probe.gate.set()
            rest = [part async for part in parts]
    assert [p.data for p in (first, *rest)] == [b"part 0", b"part 1"]
    assert [p.sequence for p in (first, *rest)] == [0, 1]
    assert probe.calls["count_block"] == 1
    assert peer.reconnects == 1


async def test_reconnection_gives_up_and_fails_calls(
    server: sigwire.Server, make_proxy: MakeProxy, probe: Probe
) -> None:
    """Once reconnecting is given up, pending and new requests fail with ConnectionClosedError."""
    proxy = await make_proxy(server.urls[0])
    backoff = sigwire.Backoff(initial=0.05, maximum=0.2, attempts=2)
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            proxy.url, backoff=backoff, connect_timeout=0.5, learn_endpoints=False
        ) as peer:
            blocked = asyncio.create_task(peer.request("block", b"job", timeout=TIMEOUT))
            await probe.entered.wait()
            await proxy.pause()
            with pytest.raises(sigwire.ConnectionClosedError) as pending_error:
                await blocked
            # Not a DeadlineExceededError: the call fails at once, without waiting.
            with pytest.raises(sigwire.ConnectionClosedError) as new_error:
                await peer.request("echo", b"late", timeout=TIMEOUT)
    assert "gave up" in str(pending_error.value)
    assert "gave up" in str(new_error.value)
    assert peer.reconnects == 0
    assert proxy.accepted == 1


async def test_closing_the_peer_fails_pending_requests(
    server: sigwire.Server, probe: Probe
) -> None:
    """Closing a peer fails its pending requests at once with ConnectionClosedError."""
    async with asyncio.timeout(TIMEOUT):
        peer = await sigwire.connect(server.urls[0])
        try:
            blocked = asyncio.create_task(peer.request("block", b"job", timeout=TIMEOUT))
            await probe.entered.wait()
        finally:
            await peer.close()
        with pytest.raises(sigwire.ConnectionClosedError):
            await blocked
        with pytest.raises(sigwire.ConnectionClosedError):
            await peer.request("echo", b"late", timeout=TIMEOUT)


async def test_closing_the_peer_closes_its_connection(
    server: sigwire.Server, make_proxy: MakeProxy
) -> None:
    """After ``close()`` the TCP connection is gone, with the peer still referenced.

    grpc.aio keeps a connection open while a call made on it is referenced;
    a closed peer must not hold one until the garbage collector runs.
    """
    proxy = await make_proxy(server.urls[0])
    gc.disable()
    try:
        async with asyncio.timeout(TIMEOUT):
            peer = await sigwire.connect(proxy.url, learn_endpoints=False)
            await peer.request("echo", b"one", timeout=TIMEOUT)
            assert proxy.open_connections == 1
            await peer.close()
            while proxy.open_connections:  # noqa: ASYNC110 (a count the proxy keeps)
                await asyncio.sleep(0.01)
        assert peer.reconnects == 0  # still referenced here
    finally:
        gc.enable()


async def test_push_expires_when_the_client_goes_away_for_good(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """A push whose client goes away before answering, and never returns, expires."""
    entered = asyncio.Event()
    async with asyncio.timeout(TIMEOUT):
        peer = await sigwire.connect(server.urls[0], identity=client_identity)
        try:

            @peer.on("ask")
            async def ask(msg: sigwire.Message) -> bytes:
                entered.set()
                await asyncio.get_running_loop().create_future()
                raise AssertionError("unreachable")

            pushing = asyncio.create_task(server.push(client_identity.did, "ask", b"q", timeout=1))
            await entered.wait()
        finally:
            await peer.close()
        with pytest.raises(sigwire.PushExpiredError):
            await pushing
    assert server._outboxes == {}


# -- deadlines and stopping ---------------------------------------------------------


async def test_request_deadline(server: sigwire.Server) -> None:
    """A handler that never returns makes the request fail with DeadlineExceededError."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            started = loop.time()
            with pytest.raises(sigwire.DeadlineExceededError):
                await peer.request("hang", b"", timeout=0.3)
            assert loop.time() - started >= 0.3
            # The stream is still usable.
            assert (await peer.request("echo", b"next")).data == b"next"


async def test_stop_with_many_streams_and_a_blocked_handler(
    server: sigwire.Server, probe: Probe
) -> None:
    """stop(grace=0.5) returns promptly with 20 Connect streams open and a handler blocked."""
    backoff = sigwire.Backoff(initial=0.05, maximum=0.2, attempts=1)
    async with contextlib.AsyncExitStack() as stack, asyncio.timeout(TIMEOUT):
        peers = [
            await stack.enter_async_context(
                sigwire.connect(server.urls[0], backoff=backoff, connect_timeout=0.5)
            )
            for _ in range(20)
        ]
        assert len(server.connected()) == 20
        blocked = asyncio.create_task(peers[0].request("block", b"job", timeout=TIMEOUT))
        await probe.entered.wait()
        await server.stop(grace=0.5)
        assert server.connected() == []
        with pytest.raises(sigwire.ConnectionClosedError):
            await blocked
    assert probe.calls["block"] == 1


async def test_draining_server_refuses_new_work_and_finishes_old(
    server: sigwire.Server, open_channel: OpenChannel, probe: Probe
) -> None:
    """During stop(): health NOT_SERVING, new requests refused (SHUTTING_DOWN), old ones finish."""
    channel = open_channel(server.urls[0])
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], backoff=FAST_BACKOFF) as peer:
            blocked = asyncio.create_task(peer.request("block", b"job", timeout=TIMEOUT))
            await probe.entered.wait()
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            stopping = asyncio.create_task(server.stop(grace=TIMEOUT))
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()

            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub(channel).Send(to_pb(envelope(sigwire.Identity.generate(), "echo")))
            failure = rpc_failure(caught.value)
            assert (failure.code, failure.info.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "SHUTTING_DOWN",
            )

            # A client arriving now is let in, but its request is refused with
            # SHUTTING_DOWN, which the client keeps to re-send to a server that
            # takes it (a rolling restart): here none comes, so its deadline ends it.
            async with sigwire.connect(server.urls[0]) as late:
                with pytest.raises(sigwire.DeadlineExceededError):
                    await late.request("echo", b"too late", timeout=0.3)

            assert not stopping.done()
            probe.gate.set()
            reply = await blocked
            await stopping
    assert reply.data == b"released job"
    assert probe.calls["echo"] == 0


# -- heartbeats and flow control ----------------------------------------------------


async def test_heartbeat_detects_a_black_hole_and_reconnects(
    server: sigwire.Server, make_proxy: MakeProxy
) -> None:
    """A link that silently drops everything is declared dead by heartbeats; the peer comes back."""
    proxy = await make_proxy(server.urls[0])
    options = sigwire.SessionOptions(heartbeat=0.1, heartbeat_timeout=0.3)
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            proxy.url,
            session=options,
            backoff=FAST_BACKOFF,
            connect_timeout=0.5,
            learn_endpoints=False,
        ) as peer:
            assert (await peer.request("echo", b"before")).data == b"before"
            session = peer._session
            assert session is not None
            proxy.black_hole()
            await session.closed.wait()
            assert isinstance(session.error, sigwire.ConnectionClosedError)
            assert session.error.reason == "HEARTBEAT_TIMEOUT"
            proxy.resume()
            assert (await peer.request("echo", b"after")).data == b"after"
    assert peer.reconnects == 1


async def test_window_bounds_concurrent_handlers(make_server: MakeServer, probe: Probe) -> None:
    """With window=4, 50 concurrent requests all complete and at most 4 handlers run at once."""
    server = await make_server(limits=sigwire.Limits(window=4))
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            server.urls[0], session=sigwire.SessionOptions(window=4)
        ) as peer:
            replies = await asyncio.gather(*(peer.request("slow", f"{i}") for i in range(50)))
    assert [r.data for r in replies] == [f"{i}".encode() for i in range(50)]
    assert probe.calls["slow"] == 50
    assert probe.peak == 4


async def test_handlers_calling_back_their_client_with_a_full_window(
    make_server: MakeServer, client_identity: sigwire.Identity
) -> None:
    """Handlers that push to their caller complete even when they fill the window."""
    server = await make_server(limits=sigwire.Limits(window=2))

    @server.on("relay")
    async def relay(msg: sigwire.Message) -> bytes:
        answer = await server.push(msg.sender, "ask", msg.payload, timeout=1.0)
        return answer.data

    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], identity=client_identity) as peer:

            @peer.on("ask")
            async def ask(msg: sigwire.Message) -> bytes:
                return b"answer " + msg.payload

            replies = await asyncio.gather(*(peer.request("relay", f"{i}") for i in range(3)))
    assert [r.data for r in replies] == [f"answer {i}".encode() for i in range(3)]


async def test_batches_of_small_envelopes_fit_a_small_limit(make_server: MakeServer) -> None:
    """Envelopes each within a small max_message_size are accepted however they are batched."""
    server = await make_server(limits=sigwire.Limits(max_message_size=1024))
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], learn_endpoints=False) as peer:
            # Sent at once, they leave in one frame of about 100 KB.
            replies = await asyncio.gather(
                *(peer.request("echo", b"%04d" % i + b"x" * 996) for i in range(100))
            )
    assert [r.data[:4] for r in replies] == [b"%04d" % i for i in range(100)]
    assert peer.reconnects == 0


async def test_oversized_envelope_fails_alone(make_server: MakeServer) -> None:
    """An envelope far over the server's limit fails by itself; the stream survives."""
    server = await make_server(limits=sigwire.Limits(max_message_size=1024))
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], backoff=FAST_BACKOFF) as peer:
            with pytest.raises(sigwire.MessageTooLargeError):
                await peer.request("echo", b"x" * 1_000_000, timeout=2)
            assert (await peer.request("echo", b"small")).data == b"small"
    assert peer.reconnects == 0


async def test_oversized_reply_becomes_an_error_reply(make_server: MakeServer) -> None:
    """A handler answer over the limit is refused as PAYLOAD_TOO_LARGE; the stream survives."""
    server = await make_server(limits=sigwire.Limits(max_message_size=1024))

    @server.on("big")
    async def big(msg: sigwire.Message) -> bytes:
        return b"x" * 2048

    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], backoff=FAST_BACKOFF) as peer:
            with pytest.raises(sigwire.MessageTooLargeError) as caught:
                await peer.request("big")
            assert caught.value.remote
            assert (await peer.request("echo", b"small")).data == b"small"
    assert peer.reconnects == 0


async def test_peer_ignoring_its_window_is_closed_as_overloaded(
    make_server: MakeServer, open_channel: OpenChannel
) -> None:
    """A raw client that sends far more envelopes than its window gets OVERLOADED, not memory."""
    server = await make_server(
        limits=sigwire.Limits(window=2), session=sigwire.SessionOptions(window=2)
    )
    channel = open_channel(server.urls[0])
    call = channel.stream_stream("/sigwire.v1.AgentTransport/Connect")()
    flood = pb.Frame(
        sequence=50,
        envelopes=pb.EnvelopeBatch(envelopes=[pb.Envelope(id=str(i)) for i in range(50)]),
    )
    async with asyncio.timeout(TIMEOUT):
        await call.write(flood.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read_until_error(call)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "beyond the window" in (caught.value.details() or "")
    assert (await _echo_once(server)) == b"still here"


async def _read_until_error(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> None:
    while True:
        await call.read()


async def _echo_once(server: sigwire.Server) -> bytes:
    async with sigwire.connect(server.urls[0]) as peer:
        return (await peer.request("echo", b"still here")).data


async def test_connect_beyond_the_stream_limit_fails_instead_of_hanging(
    make_server: MakeServer,
) -> None:
    """A peer whose Connect stream never gets an HTTP/2 slot fails its connect in bounded time."""
    server = await make_server(limits=sigwire.Limits(max_concurrent_streams=1))
    registry = sigwire.default_registry()  # one pooled channel: one HTTP/2 connection
    # Pinned, so that no Describe call (which also needs a stream slot) comes first.
    pinned = {"expect_did": server.identity.did, "learn_endpoints": False}
    options = {"registry": registry, **pinned}
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], **options) as first:
            assert (await first.request("echo", b"one")).data == b"one"
            with pytest.raises(sigwire.NoTransportAvailableError):
                await sigwire.connect(server.urls[0], connect_timeout=0.5, **options)
            # Peers with registries of their own get connections of their own.
            async with sigwire.connect(server.urls[0], **pinned) as other:
                assert (await other.request("echo", b"two")).data == b"two"
    await registry.aclose()
