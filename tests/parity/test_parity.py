"""One set of test bodies over both transports: what works on gRPC works the same on ws://."""

from __future__ import annotations

import asyncio
import logging

import pytest

import sigwire
from tests.conftest import TIMEOUT
from tests.parity.conftest import FAST_BACKOFF, TRANSPORTS, MakeServer, Probe, port_of


async def test_request_reply_is_signed_by_the_server(
    server: sigwire.Server, url: str, client_identity: sigwire.Identity
) -> None:
    """A request gets its echo back from the server's DID, under a valid signature."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, identity=client_identity) as peer:
            reply = await peer.request("echo", b"hello")
            assert peer.url == url
    assert reply.data == b"hello"
    assert reply.responder == server.identity.did
    assert peer.server_did == server.identity.did
    assert reply.signature is not None
    sigwire.Verifier.check_signature(reply.signature, server.identity.did, reply.signing_input())


async def test_stream_replies_arrive_in_order(server: sigwire.Server, url: str) -> None:
    """A streaming handler's items arrive in order, with sequence numbers from 0."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, expect_did=server.identity.did) as peer:
            parts = [part async for part in peer.stream("count", b"5")]
    assert [p.data for p in parts] == [f"part {i}".encode() for i in range(5)]
    assert [p.sequence for p in parts] == list(range(5))
    assert all(p.responder == server.identity.did for p in parts)


async def test_concurrent_requests_are_correlated(url: str, probe: Probe) -> None:
    """100 concurrent requests on one peer each get the reply to their own payload."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url) as peer:
            replies = await asyncio.gather(
                *(peer.request("echo", f"payload {i}") for i in range(100))
            )
    assert [r.data for r in replies] == [f"payload {i}".encode() for i in range(100)]
    assert probe.calls["echo"] == 100


async def test_push_is_answered_by_the_client_handler(
    server: sigwire.Server, url: str, client_identity: sigwire.Identity
) -> None:
    """The server pushes to a connected client's DID; the client's handler answers, signed."""
    seen: list[tuple[str, bytes]] = []
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, identity=client_identity) as peer:

            @peer.on("ask")
            async def ask(msg: sigwire.Message) -> bytes:
                seen.append((msg.sender, msg.payload))
                return b"answer to " + msg.payload

            assert server.connected() == [client_identity.did]
            reply = await server.push(client_identity.did, "ask", b"q", timeout=TIMEOUT)
    assert reply.data == b"answer to q"
    assert reply.responder == client_identity.did
    assert seen == [(server.identity.did, b"q")]


async def test_unknown_kind_is_kind_unknown_error(url: str) -> None:
    """A kind with no handler surfaces as a remote KindUnknownError."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url) as peer:
            with pytest.raises(sigwire.KindUnknownError) as caught:
                await peer.request("nope", b"")
    assert caught.value.remote
    assert caught.value.reason == "KIND_UNKNOWN"


async def test_handler_crash_is_handler_error_with_logged_id(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A crashing handler surfaces as HandlerError whose error_id names the server's log entry."""
    caplog.set_level(logging.ERROR, logger="sigwire.server")
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url) as peer:
            with pytest.raises(sigwire.HandlerError) as caught:
                await peer.request("crash", b"")
    error = caught.value
    assert error.remote
    assert error.reason == "HANDLER_FAILED"
    assert len(error.error_id) >= 8
    assert "secret internal detail" not in str(error)
    logged = [r for r in caplog.records if r.name == "sigwire.server" and r.exc_info]
    assert any(error.error_id in r.getMessage() for r in logged)


async def test_application_error_keeps_its_reason(url: str) -> None:
    """A handler's ApplicationError reaches the client with its own reason and message."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url) as peer:
            with pytest.raises(sigwire.SigwireError) as caught:
                await peer.request("refuse", b"")
    assert caught.value.reason == "TASK_NOT_FOUND"
    assert caught.value.remote
    assert caught.value.message == "no such task"


async def test_remote_errors_have_the_same_class_on_both_transports(
    server: sigwire.Server,
) -> None:
    """Each remote error has the same class, reason and message over gRPC and ws://."""
    outcomes: dict[str, list[tuple[type[sigwire.SigwireError], str, str, bool]]] = {}
    async with asyncio.timeout(TIMEOUT):
        for name, url in zip(TRANSPORTS, server.urls, strict=True):
            async with sigwire.connect(url) as peer:
                seen = outcomes[name] = []
                for kind in ("nope", "crash", "refuse"):
                    with pytest.raises(sigwire.SigwireError) as caught:
                        await peer.request(kind, b"")
                    err = caught.value
                    message = "" if kind == "crash" else err.message  # crash ids differ
                    seen.append((type(err), err.reason, message, err.remote))
    assert outcomes["grpc"] == outcomes["ws"]
    assert [reason for _, reason, _, _ in outcomes["grpc"]] == [
        "KIND_UNKNOWN",
        "HANDLER_FAILED",
        "TASK_NOT_FOUND",
    ]


async def test_describe_returns_the_verified_card(server: sigwire.Server, url: str) -> None:
    """describe() returns the server's self-signed card listing both endpoints in order."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, expect_did=server.identity.did) as peer:
            card = await peer.describe()
    assert card.did == server.identity.did
    assert card.endpoints == tuple(server.urls)
    assert card.endpoints[0].startswith("grpc://")
    assert card.endpoints[1].startswith("ws://")
    assert {"echo", "count", "crash", "refuse"} <= set(card.kinds)
    sigwire.Verifier().verify_card(card, expected_did=server.identity.did)


async def test_health_is_serving(url: str) -> None:
    """health() reports SERVING with a measured round trip."""
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url) as peer:
            health = await peer.health()
    assert health.status == "SERVING"
    assert health.latency > 0


async def test_resent_envelope_runs_the_handler_once(
    server: sigwire.Server, url: str, probe: Probe, client_identity: sigwire.Identity
) -> None:
    """The same signed envelope sent twice, then re-signed, is answered from the reply cache."""
    did = server.identity.did
    # The very request peer.request builds (role "agent"), so that the retry below
    # asks the same thing under a new nonce and signature.
    envelope = client_identity.sign_envelope(
        sigwire.Envelope.new("counted", sender=client_identity.did, recipient=did, role="agent")
    )
    replies: list[sigwire.Reply] = []
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(url, identity=client_identity, expect_did=did) as peer:
            session = peer._session
            assert session is not None
            for _ in range(2):
                call = peer.correlator.add(envelope, expected_responder=did)
                try:
                    await session.send_envelope(envelope)
                    replies.append(await call.next())
                finally:
                    peer.correlator.discard(call)
            # Same id, new nonce and signature: a client retry after the window.
            retried = await peer.request("counted", id=envelope.id)
    assert [r.data for r in replies] == [b"run 1", b"run 1"]
    assert retried.data == b"run 1"
    assert probe.calls["counted"] == 1


async def test_request_during_outage_completes_after_restart(
    make_server: MakeServer, transport: str, client_identity: sigwire.Identity
) -> None:
    """A request issued while the server is down completes once it is back on the same ports."""
    first = await make_server()
    url = first.urls[TRANSPORTS.index(transport)]
    grpc_port, ws_port = (port_of(u) for u in first.urls[:2])
    memory_name = first.urls[2].removeprefix("memory://")
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            url,
            identity=client_identity,
            backoff=FAST_BACKOFF,
            connect_timeout=2,
            # Reconnect over the transport under test only, not the card's other endpoint.
            learn_endpoints=False,
        ) as peer:
            assert (await peer.request("echo", b"before")).data == b"before"
            await first.stop(grace=0)
            during = asyncio.create_task(peer.request("echo", b"during", timeout=TIMEOUT))
            second = await make_server(
                grpc=f"127.0.0.1:{grpc_port}", ws=f"127.0.0.1:{ws_port}", memory=memory_name
            )
            assert second.urls == first.urls
            reply = await during
            after = await peer.request("echo", b"after")
    assert reply.data == b"during"
    assert reply.responder == first.identity.did
    assert after.data == b"after"
    assert peer.reconnects >= 1
    assert peer.url == url


async def test_stop_with_clients_on_both_transports_completes(
    server: sigwire.Server, probe: Probe
) -> None:
    """Stopping a server with a blocked request on each transport finishes and fails both."""
    backoff = sigwire.Backoff(initial=0.05, maximum=0.05, attempts=1)
    async with asyncio.timeout(TIMEOUT):
        async with (
            sigwire.connect(server.urls[0], backoff=backoff, connect_timeout=1) as grpc_peer,
            sigwire.connect(server.urls[1], backoff=backoff, connect_timeout=1) as ws_peer,
        ):
            pending = [
                asyncio.create_task(grpc_peer.request("block", b"grpc")),
                asyncio.create_task(ws_peer.request("block", b"ws")),
            ]
            entered = {await probe.entered.get(), await probe.entered.get()}
            assert entered == {b"grpc", b"ws"}
            await server.stop(grace=0.1)
            assert server.connected() == []
            for task in pending:
                with pytest.raises(sigwire.ConnectionClosedError):
                    await task
