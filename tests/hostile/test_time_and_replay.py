"""Stale and future timestamps, replayed nonces, re-sent envelopes, and who fills the nonce cache.

The receiver's window is 5 minutes back and 30 seconds ahead (ReplayGuard
defaults); a nonce reused with other content is REPLAY, while an exact re-send
is a duplicate answered from the reply cache without running the handler again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import grpc
import pytest
from websockets.asyncio.client import connect as ws_connect

import sigwire
from sigwire import _proto
from sigwire.envelope import now_ms
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    DOCUMENTED_STATUS,
    PROTO,
    MakeServer,
    OpenChannel,
    Probe,
    assert_still_serves,
    envelope_bytes,
    frame_bytes,
    raw_unary,
    send_refused,
    signed,
    verified_error,
    ws_reply,
)

Code = grpc.StatusCode
MINUTE = 60_000

# created_at_ms as a function of the receiver's clock now.
TIMESTAMPS: dict[str, Callable[[int], int]] = {
    "10-minutes-old": lambda now: now - 10 * MINUTE,
    "5-minutes-ahead": lambda now: now + 5 * MINUTE,
    "5-minutes-and-10-s-old": lambda now: now - 5 * MINUTE - 10_000,
    "40-s-ahead": lambda now: now + 40_000,
    "a-day-old": lambda now: now - 24 * 60 * MINUTE,
    "year-3000": lambda now: 32_503_680_000_000,
    "1-ms-after-the-epoch": lambda now: 1,
    "int64-max": lambda now: 2**63 - 1,
}


@pytest.mark.parametrize("created_at", TIMESTAMPS.values(), ids=TIMESTAMPS.keys())
async def test_timestamp_outside_the_window_over_grpc(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    created_at: Callable[[int], int],
) -> None:
    """A validly signed envelope outside the window is TIMESTAMP_OUT_OF_WINDOW with its skew."""
    now = now_ms()
    request = signed(client_identity, "echo", b"x", created_at_ms=created_at(now))
    failure = await send_refused(open_channel(server), envelope_bytes(request))
    assert failure.info.reason == "TIMESTAMP_OUT_OF_WINDOW"
    assert failure.code == Code.UNAUTHENTICATED
    skew = int(failure.info.metadata["skew_ms"])
    assert (skew < 0) == (request.created_at_ms < now)
    assert abs(skew - (request.created_at_ms - now)) < TIMEOUT * 1000
    assert probe.calls["echo"] == 0
    await assert_still_serves(server)


@pytest.mark.parametrize("created_at", TIMESTAMPS.values(), ids=TIMESTAMPS.keys())
async def test_timestamp_outside_the_window_over_websocket(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    probe: Probe,
    created_at: Callable[[int], int],
) -> None:
    """On a stream it is a signed TIMESTAMP_OUT_OF_WINDOW reply; the stream goes on."""
    request = signed(client_identity, "echo", b"x", created_at_ms=created_at(now_ms()))
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(frame_bytes(1, request))
            error = verified_error(await ws_reply(ws, request.id), request, server)
    assert error.reason == "TIMESTAMP_OUT_OF_WINDOW"
    assert "skew_ms" in error.details
    assert probe.calls["echo"] == 0
    await assert_still_serves(server)


# The second envelope reuses the first one's nonce, validly signed, with other content.
REPLAYS: dict[str, dict[str, object]] = {
    "other-payload": {"payload": b"pay 1000"},
    "other-kind": {"kind": "count", "payload": b"3"},
    "other-id": {"id": "another-id"},
    "other-metadata": {"metadata": {"to": "mallory"}},
    "other-recipient": {"recipient": ""},
    "other-timestamp": {"created_at_ms": now_ms() - 1000},
    "other-context": {"context_id": "ctx-2"},
}


@pytest.mark.parametrize("changes", REPLAYS.values(), ids=REPLAYS.keys())
@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_nonce_reused_with_other_content_is_replay(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    changes: dict[str, object],
    transport: str,
) -> None:
    """A nonce reused by the same sender for different content is refused as REPLAY."""
    first = signed(client_identity, "echo", b"pay 10", recipient=server.identity.did)
    second = client_identity.sign_envelope(
        dataclasses.replace(first, signature=None, **changes)  # type: ignore[arg-type]
    )
    assert second.nonce == first.nonce
    if transport == "grpc":
        channel = open_channel(server)
        async with asyncio.timeout(TIMEOUT):
            await raw_unary(channel, "Send")(envelope_bytes(first))
        failure = await send_refused(channel, envelope_bytes(second))
        assert (failure.code, failure.info.reason) == (DOCUMENTED_STATUS["REPLAY"], "REPLAY")
    else:
        async with asyncio.timeout(TIMEOUT):
            async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
                await ws.send(frame_bytes(1, first))
                assert (await ws_reply(ws, first.id)).success
                await ws.send(frame_bytes(2, second))
                reply = await ws_reply(ws, second.id)
        assert verified_error(reply, second, server).reason == "REPLAY"
    assert probe.calls == {"echo": 1}
    await assert_still_serves(server)


async def test_replayed_envelope_runs_its_handler_once_across_transports(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
) -> None:
    """An envelope captured on WebSocket and replayed on gRPC gets the cached answer only."""
    request = signed(client_identity, "echo", b"once")
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(frame_bytes(1, request))
            original = await ws_reply(ws, request.id)
        replayed = await raw_unary(open_channel(server), "Send")(envelope_bytes(request))
    assert _proto.decode_reply(replayed) == original
    assert probe.calls == {"echo": 1}
    await assert_still_serves(server)


async def test_same_nonce_from_another_sender_is_not_a_replay(
    server: sigwire.Server, open_channel: OpenChannel, client_identity: sigwire.Identity
) -> None:
    """Nonces are per sender: another DID may use the same nonce bytes."""
    other = sigwire.Identity.generate()
    first = signed(client_identity, "echo", b"a")
    second = signed(other, "echo", b"b", nonce=first.nonce)
    send = raw_unary(open_channel(server), "Send")
    async with asyncio.timeout(TIMEOUT):
        await send(envelope_bytes(first))
        await send(envelope_bytes(second))
    await assert_still_serves(server)


def _untrusted(me: sigwire.Identity) -> bytes:
    return envelope_bytes(signed(sigwire.Identity.generate(), "echo"))


def _bad_signature(me: sigwire.Identity) -> bytes:
    return envelope_bytes(dataclasses.replace(signed(me, "echo"), payload=b"changed"))


def _bad_did(me: sigwire.Identity) -> bytes:
    env = dataclasses.replace(signed(me, "echo"), sender="did:key:z6Mk")
    assert env.signature is not None
    return envelope_bytes(
        dataclasses.replace(env, signature=dataclasses.replace(env.signature, signer=env.sender))
    )


def _unknown_kind(me: sigwire.Identity) -> bytes:
    return envelope_bytes(signed(me, "no.such.kind"))


def _stale(me: sigwire.Identity) -> bytes:
    return envelope_bytes(signed(me, "echo", created_at_ms=now_ms() - 10 * MINUTE))


REFUSALS = {
    "signer-unknown": (_untrusted, "SIGNER_UNKNOWN"),
    "signature-invalid": (_bad_signature, "SIGNATURE_INVALID"),
    "did-invalid": (_bad_did, "DID_INVALID"),
    "stale": (_stale, "TIMESTAMP_OUT_OF_WINDOW"),
    "kind-unknown": (_unknown_kind, "KIND_UNKNOWN"),
}


@pytest.mark.parametrize(("build", "reason"), REFUSALS.values(), ids=REFUSALS.keys())
async def test_refused_envelopes_leave_no_nonce_behind(
    make_server: MakeServer,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    build: Callable[[sigwire.Identity], bytes],
    reason: str,
) -> None:
    """Fifty refused envelopes add nothing to the nonce cache: refused senders cannot fill it."""
    server = await make_server(trust=sigwire.AllowList([client_identity.did]))
    channel = open_channel(server)
    for _ in range(50):
        failure = await send_refused(channel, build(client_identity))
        assert failure.info.reason == reason
    assert len(server.dispatcher.guard) == 0
    request = signed(client_identity, "echo", b"listed")
    async with asyncio.timeout(TIMEOUT):
        await raw_unary(channel, "Send")(envelope_bytes(request))
    assert len(server.dispatcher.guard) == 1
    await assert_still_serves(server, identity=client_identity)


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_full_nonce_cache_keeps_serving_and_refuses_what_it_forgot(
    make_server: MakeServer,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    transport: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Six times more envelopes than the nonce cache holds are all answered, each handler
    run once. A new envelope dated no later than one it forgot is refused as stale, with
    the floor; the forgotten one itself, answered and cached, gets its answer again. The
    operator is told once, in the log."""
    # future_ms=0: entries may be forgotten as soon as they are in the past (by
    # default, only once 30 s old, which a test should not wait for).
    guard = sigwire.ReplayGuard(capacity=100, future_ms=0)
    server = await make_server(replay_guard=guard)
    channel = open_channel(server)
    first = signed(client_identity, "echo", b"first", recipient=server.identity.did)
    async with asyncio.timeout(TIMEOUT):
        original = _proto.decode_reply(await raw_unary(channel, "Send")(envelope_bytes(first)))
    await asyncio.sleep(0.002)  # later envelopes are dated after it
    url = server.urls[0 if transport == "grpc" else 1]
    async with asyncio.timeout(TIMEOUT):
        async with sigwire.connect(
            url, identity=client_identity, expect_did=server.identity.did, learn_endpoints=False
        ) as peer:
            for burst in range(30):  # 20 in flight: frames of several envelopes
                payloads = [f"{burst}.{n}".encode() for n in range(20)]
                replies = await asyncio.gather(
                    *(peer.request("echo", p, timeout=TIMEOUT) for p in payloads)
                )
                assert [r.data for r in replies] == payloads
                # A few ms apart: no burst shares a millisecond with envelopes the guard
                # forgets while it is in flight (the floor would refuse it).
                await asyncio.sleep(0.002)
    assert probe.calls["echo"] == 1 + 600
    assert len(guard) == guard.capacity
    assert guard.forgotten > 500
    assert guard.floor_ms is not None
    assert guard.floor_ms >= first.created_at_ms

    # New, but dated like the forgotten one: it could be it, so it is refused.
    twin = signed(
        client_identity, "echo", b"twin", created_at_ms=first.created_at_ms, nonce=b"t" * 16
    )
    failure = await send_refused(channel, envelope_bytes(twin))
    assert failure.info.reason == "TIMESTAMP_OUT_OF_WINDOW"
    assert failure.code == Code.UNAUTHENTICATED
    assert int(failure.info.metadata["floor_ms"]) == guard.floor_ms
    assert int(failure.info.metadata["skew_ms"]) <= 0
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(frame_bytes(1, twin))
            error = verified_error(await ws_reply(ws, twin.id), twin, server)
        # The forgotten one again: answered from the reply cache, not run again.
        again = _proto.decode_reply(await raw_unary(channel, "Send")(envelope_bytes(first)))
    assert error.reason == "TIMESTAMP_OUT_OF_WINDOW"
    assert error.details["floor_ms"] == str(guard.floor_ms)
    assert again == original
    assert probe.calls["echo"] == 1 + 600
    await assert_still_serves(server)
    told = [r for r in caplog.records if "replay guard is full" in r.getMessage()]
    assert len(told) == 1
    assert told[0].levelname == "WARNING"
    assert "--replay-capacity" in told[0].getMessage()


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_replay_of_an_answer_long_since_packed_gets_it_unchanged(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    transport: str,
) -> None:
    """Two thousand answers later (the first one packed in the reply cache), replaying the
    first envelope, or a re-signed retry of it, gets its answer without a second run."""
    request = signed(client_identity, "echo", b"the first", recipient=server.identity.did)
    send = raw_unary(open_channel(server), "Send")
    async with asyncio.timeout(TIMEOUT):
        original = _proto.decode_reply(await send(envelope_bytes(request)))
        async with sigwire.connect(
            server.urls[0 if transport == "grpc" else 1],
            identity=client_identity,
            expect_did=server.identity.did,
            learn_endpoints=False,
        ) as peer:
            for _ in range(20):
                await asyncio.gather(
                    *(peer.request("echo", b"%d" % n, timeout=TIMEOUT) for n in range(100))
                )
    assert isinstance(server.dispatcher.cache._entries[(client_identity.did, request.id)], tuple)
    async with asyncio.timeout(TIMEOUT):
        if transport == "grpc":
            again = _proto.decode_reply(await send(envelope_bytes(request)))
        else:
            async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
                await ws.send(frame_bytes(1, request))
                again = await ws_reply(ws, request.id)
        retry = client_identity.sign_envelope(request.renewed())
        resigned = _proto.decode_reply(await send(envelope_bytes(retry)))
    assert again == original
    assert resigned.data == original.data == b"the first"
    sigwire.Verifier().verify_reply(resigned, retry, expected_responder=server.identity.did)
    assert probe.calls["echo"] == 1 + 2000
