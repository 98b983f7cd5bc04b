"""The gRPC transport end to end: the four RPCs, health, reflection, pushes, pinning."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import sigwire
from sigwire import _proto
from sigwire_pb.v1 import transport_pb2
from tests.conftest import TIMEOUT
from tests.integration.conftest import MakeServer, Probe
from tests.integration.helpers import envelope, stub, to_pb, verify_reply

SERVICE = "sigwire.v1.AgentTransport"


async def test_request_reply_is_signed_by_the_server(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """A request gets its echo back, from the server's DID, under a valid signature."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], identity=client_identity) as peer:
            reply = await peer.request("echo", b"hello")
    assert reply.data == b"hello"
    assert reply.responder == server.identity.did
    assert peer.server_did == server.identity.did
    assert reply.signature is not None
    sigwire.Verifier.check_signature(reply.signature, server.identity.did, reply.signing_input())


async def test_stream_replies_arrive_in_order(server: sigwire.Server) -> None:
    """A streaming handler's items arrive in order with increasing sequence numbers."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            parts = [part async for part in peer.stream("count", b"5")]
    assert [p.data for p in parts] == [f"part {i}".encode() for i in range(5)]
    assert [p.sequence for p in parts] == list(range(5))
    assert all(p.responder == server.identity.did for p in parts)


async def test_raw_send_with_generated_stub(
    server: sigwire.Server, channel: grpc.aio.Channel, client_identity: sigwire.Identity
) -> None:
    """A plain gRPC client calling Send with a signed Envelope gets a reply that verifies."""
    request = envelope(client_identity, "echo", b"raw", recipient=server.identity.did)
    async with asyncio.timeout(TIMEOUT):
        reply_pb = await stub(channel).Send(to_pb(request))
    reply = verify_reply(reply_pb, request, server.identity.did)
    assert (reply.success, reply.final, reply.data) == (True, True, b"raw")


async def test_raw_send_stream_with_generated_stub(
    server: sigwire.Server, channel: grpc.aio.Channel, client_identity: sigwire.Identity
) -> None:
    """SendStream yields every part, then an empty final reply, each verifying."""
    request = envelope(client_identity, "count", b"3")
    async with asyncio.timeout(TIMEOUT):
        replies = [r async for r in stub(channel).SendStream(to_pb(request))]
    parts = [verify_reply(r, request, server.identity.did) for r in replies]
    assert [(p.sequence, p.final, p.data) for p in parts] == [
        (0, False, b"part 0"),
        (1, False, b"part 1"),
        (2, False, b"part 2"),
        (3, True, b""),
    ]


async def test_describe_returns_the_signed_card(
    server: sigwire.Server, channel: grpc.aio.Channel
) -> None:
    """Describe returns the agent card, self-signed by the server's DID, listing its kinds."""
    async with asyncio.timeout(TIMEOUT):
        card_pb = await stub(channel).Describe(transport_pb2.DescribeRequest())
        async with sigwire.connect(server.urls[0]) as peer:
            described = await peer.describe()
    card = _proto.card_from_pb(card_pb)
    sigwire.Verifier().verify_card(card, expected_did=server.identity.did)
    assert card.endpoints == tuple(server.urls)
    assert {"echo", "count", "crash"} <= set(card.kinds)
    assert card.protocol_version == "sigwire/1"
    assert described == card


async def test_health_check_is_serving(server: sigwire.Server, channel: grpc.aio.Channel) -> None:
    """grpc.health.v1 Check says SERVING for the server and for AgentTransport."""
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(TIMEOUT):
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        transport = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        async with sigwire.connect(server.urls[0]) as peer:
            probed = await peer.health()
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert transport.status == health_pb2.HealthCheckResponse.SERVING
    assert probed.status == "SERVING"


async def test_reflection_lists_agent_transport(channel: grpc.aio.Channel) -> None:
    """Server reflection lists sigwire.v1.AgentTransport and the health service."""
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async with asyncio.timeout(TIMEOUT):
        responses = [r async for r in reflect.ServerReflectionInfo(iter([request]))]
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_unix_socket_listener(make_server: MakeServer, tmp_path: Path) -> None:
    """A server on unix:PATH serves requests, health and its card at unix://PATH."""
    server = await make_server(grpc=f"unix:{tmp_path}/agent.sock")
    assert server.urls == [f"unix://{tmp_path}/agent.sock"]
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            reply = await peer.request("echo", b"local")
            health = await peer.health()
            card = await peer.describe()
    assert reply.data == b"local"
    assert health.status == "SERVING"
    assert card.endpoints == tuple(server.urls)


async def test_concurrent_requests_are_correlated(server: sigwire.Server, probe: Probe) -> None:
    """100 concurrent requests on one peer each get the reply to their own payload."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0]) as peer:
            replies = await asyncio.gather(
                *(peer.request("echo", f"payload {i}") for i in range(100))
            )
    assert [r.data for r in replies] == [f"payload {i}".encode() for i in range(100)]
    assert probe.calls["echo"] == 100


async def test_push_is_answered_by_the_client_handler(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """The server pushes to a connected client DID; the client's handler answers, signed."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], identity=client_identity) as peer:
            seen: list[tuple[str, bytes]] = []

            @peer.on("ask")
            async def ask(msg: sigwire.Message) -> bytes:
                seen.append((msg.sender, msg.payload))
                return b"answer to " + msg.payload

            assert server.connected() == [client_identity.did]
            reply = await server.push(client_identity.did, "ask", b"q", timeout=TIMEOUT)
    assert reply.data == b"answer to q"
    assert reply.responder == client_identity.did
    assert seen == [(server.identity.did, b"q")]


async def test_push_to_an_agent_that_never_connects_expires(server: sigwire.Server) -> None:
    """A push to an agent that never connects waits its timeout, then is withdrawn."""
    stranger = sigwire.Identity.generate().did
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.PushExpiredError) as caught:
            await server.push(stranger, "ask", b"q", timeout=0.2)
    assert caught.value.details["did"] == stranger
    assert server._outboxes == {}


async def test_push_to_a_crashing_client_handler_is_handler_error(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """A client handler that crashes on a push gives the server a HandlerError with an id."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], identity=client_identity) as peer:

            @peer.on("ask")
            async def ask(msg: sigwire.Message) -> bytes:
                raise RuntimeError("client bug")

            with pytest.raises(sigwire.HandlerError) as caught:
                await server.push(client_identity.did, "ask", b"q", timeout=TIMEOUT)
            # The stream survives the crash.
            assert (await peer.request("echo", b"still here")).data == b"still here"
    assert caught.value.remote
    assert caught.value.reason == "HANDLER_FAILED"
    assert len(caught.value.error_id) >= 8
    assert "client bug" not in str(caught.value)


async def test_dead_target_is_refused_and_the_next_url_is_used(
    server: sigwire.Server, dead_url: str
) -> None:
    """A refused URL fails with ConnectError at once; given a list, the next URL is used."""
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            # Refusal is an answer: waiting out connect_timeout would trip TIMEOUT.
            await sigwire.connect(dead_url, connect_timeout=2 * TIMEOUT)
        async with sigwire.connect([dead_url, server.urls[0]], connect_timeout=2 * TIMEOUT) as peer:
            reply = await peer.request("echo", b"fallback")
    [(url, error)] = caught.value.attempts
    assert url == dead_url
    assert isinstance(error, sigwire.ConnectError)
    assert reply.data == b"fallback"
    assert peer.url == server.urls[0]


async def test_pinned_did_mismatch_refuses_the_connection(server: sigwire.Server) -> None:
    """Connecting with expect_did of another agent fails: the hello is refused."""
    other = sigwire.Identity.generate().did
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(sigwire.NoTransportAvailableError) as caught:
            await sigwire.connect(server.urls[0], expect_did=other, connect_timeout=2)
    [(url, error)] = caught.value.attempts
    assert url == server.urls[0]
    # The server refuses the hello (RECIPIENT_MISMATCH), but its refusal is signed
    # by a DID other than the pinned one, so the client cannot trust it and reports
    # who actually answered.
    assert isinstance(error, sigwire.UnknownSignerError)
    assert error.did == server.identity.did
    assert server.connected() == []


async def test_pinned_did_match_connects(server: sigwire.Server) -> None:
    """Connecting with expect_did of the server works and keeps the pin."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(server.urls[0], expect_did=server.identity.did) as peer:
            reply = await peer.request("echo", b"pinned")
    assert reply.data == b"pinned"
    assert peer.server_did == server.identity.did
