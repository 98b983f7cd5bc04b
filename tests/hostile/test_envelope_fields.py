"""Each envelope field corrupted in turn, invalid DIDs and wrong algorithms, on gRPC and WebSocket.

Over gRPC ``Send`` a refusal is a status code with a ``google.rpc.ErrorInfo``;
over a WebSocket Connect stream it is a signed error reply bound to the very
envelope that was refused, and the stream goes on. Both must carry the reason
docs/signing.md documents, and no handler may run.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import base58
import pytest
from websockets.asyncio.client import connect as ws_connect

import sigwire
from sigwire.dispatch import Dispatcher, Handlers
from sigwire.envelope import now_ms
from tests.conftest import TIMEOUT
from tests.hostile.conftest import (
    DOCUMENTED_STATUS,
    PROTO,
    OpenChannel,
    Probe,
    assert_still_serves,
    envelope_bytes,
    frame_bytes,
    send_refused,
    signed,
    verified_error,
    ws_reply,
)

Build = Callable[[sigwire.Identity, str], sigwire.Envelope]
"""Builds a hostile envelope from the attacker's identity and the server's DID."""

L = 2**252 + 27742317777372353535851937790883648493
"""The order of the Ed25519 base point."""

DETAILS = {
    "RECIPIENT_MISMATCH": {"recipient"},
    "ALGORITHM_UNSUPPORTED": {"algorithm"},
    "DID_INVALID": {"did"},
    "TIMESTAMP_OUT_OF_WINDOW": {"skew_ms"},
}
"""Detail keys each reason must carry (docs/signing.md section 10)."""


def _sig(env: sigwire.Envelope) -> sigwire.Signature:
    assert env.signature is not None
    return env.signature


def _resign_field(**fields: object) -> Build:
    """A signed envelope with ``fields`` changed AFTER signing (the signature no longer fits)."""

    def build(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
        return dataclasses.replace(signed(me, "echo", b"pay 10", metadata={"a": "1"}), **fields)

    return build


def _signature(**fields: object) -> Build:
    """A signed envelope whose Signature has ``fields`` replaced."""

    def build(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
        env = signed(me, "echo", b"x")
        return dataclasses.replace(env, signature=dataclasses.replace(_sig(env), **fields))

    return build


def _valid_then(**fields: object) -> Build:
    """An envelope with ``fields`` set BEFORE signing (validly signed, but breaking a rule)."""

    def build(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
        env = sigwire.Envelope.new("echo", b"x", sender=me.did)
        return me.sign_envelope(dataclasses.replace(env, **fields))

    return build


def _flip_signature_bit(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    env = signed(me, "echo", b"x")
    value = bytearray(_sig(env).value)
    value[10] ^= 0x01
    return dataclasses.replace(env, signature=dataclasses.replace(_sig(env), value=bytes(value)))


def _malleated_signature(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    # S + L is the same scalar mod L: a lenient verifier would accept a second signature.
    env = signed(me, "echo", b"x")
    r, s = _sig(env).value[:32], int.from_bytes(_sig(env).value[32:], "little")
    value = r + (s + L).to_bytes(32, "little")
    return dataclasses.replace(env, signature=dataclasses.replace(_sig(env), value=value))


def _other_signer_signature(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    # Mallory signs my envelope with her key and says so: signer != sender.
    mallory = sigwire.Identity.generate()
    env = sigwire.Envelope.new("echo", b"x", sender=me.did)
    value = mallory.sign(env.signing_input(signer=mallory.did))
    return dataclasses.replace(env, signature=sigwire.Signature(mallory.did, "Ed25519", value))


def _impersonation(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    # Claims to come from a victim (sender and signer), signed with my own key.
    victim = sigwire.Identity.generate().did
    env = sigwire.Envelope.new("echo", b"x", sender=victim)
    value = me.sign(env.signing_input(signer=victim))
    return dataclasses.replace(env, signature=sigwire.Signature(victim, "Ed25519", value))


def _signature_from_another_envelope(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    donor = signed(me, "echo", b"the signed one")
    return dataclasses.replace(signed(me, "echo", b"the sent one"), signature=donor.signature)


def _signature_from_a_reply(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    # Cross-type: a signature over a Reply signing input (another domain string).
    env = signed(me, "echo", b"x")
    reply = me.sign_reply(
        sigwire.Reply(request_id=env.id, request_digest=env.digest(), responder=me.did)
    )
    return dataclasses.replace(env, signature=reply.signature)


def _sender_changed_signer_kept(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    return dataclasses.replace(signed(me, "echo", b"x"), sender=sigwire.Identity.generate().did)


def _recipient_added_after_signing(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    return dataclasses.replace(signed(me, "echo", b"x"), recipient=server_did)


def _recipient_other(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    return signed(me, "echo", b"x", recipient=sigwire.Identity.generate().did)


def _kind_swapped(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    return dataclasses.replace(signed(me, "echo", b"3"), kind="count")


def _payload_bit_flipped(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    return dataclasses.replace(signed(me, "echo", b"pay 10"), payload=b"pay 11")


def _timestamp_nudged(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    env = signed(me, "echo", b"x")
    return dataclasses.replace(env, created_at_ms=env.created_at_ms + 1)


def _nonce_swapped(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
    return dataclasses.replace(signed(me, "echo", b"x"), nonce=b"\x01" * 16)


FIELD_CASES: dict[str, tuple[Build, str]] = {
    # validation rules (docs/signing.md section 7): MALFORMED before any signature check
    "id-empty": (_valid_then(id=""), "MALFORMED"),
    "id-257-chars": (_valid_then(id="i" * 257), "MALFORMED"),
    "id-257-astral-chars": (_valid_then(id="\U0001f600" * 257), "MALFORMED"),
    "kind-empty": (_valid_then(kind=""), "MALFORMED"),
    "kind-257-chars": (_valid_then(kind="k" * 257), "MALFORMED"),
    "sender-empty": (_resign_field(sender=""), "MALFORMED"),
    "nonce-empty": (_valid_then(nonce=b""), "MALFORMED"),
    "nonce-15-bytes": (_valid_then(nonce=b"\x00" * 15), "MALFORMED"),
    "nonce-65-bytes": (_valid_then(nonce=b"\x00" * 65), "MALFORMED"),
    "created-at-zero": (_valid_then(created_at_ms=0), "MALFORMED"),
    "created-at-negative": (_valid_then(created_at_ms=-now_ms()), "MALFORMED"),
    "created-at-int64-min": (_valid_then(created_at_ms=-(2**63)), "MALFORMED"),
    # addressing
    "recipient-other-did": (_recipient_other, "RECIPIENT_MISMATCH"),
    "recipient-garbage": (_valid_then(recipient="not a did"), "RECIPIENT_MISMATCH"),
    "recipient-added-after-signing": (_recipient_added_after_signing, "SIGNATURE_INVALID"),
    # the signature itself
    "signature-missing": (_resign_field(signature=None), "SIGNATURE_MISSING"),
    "signature-empty-value": (_signature(value=b""), "SIGNATURE_MISSING"),
    "signature-63-bytes": (_signature(value=b"\x01" * 63), "SIGNATURE_INVALID"),
    "signature-65-bytes": (_signature(value=b"\x01" * 65), "SIGNATURE_INVALID"),
    "signature-zeros": (_signature(value=bytes(64)), "SIGNATURE_INVALID"),
    "signature-bit-flipped": (_flip_signature_bit, "SIGNATURE_INVALID"),
    "signature-s-plus-l": (_malleated_signature, "SIGNATURE_INVALID"),
    "signature-of-another-envelope": (_signature_from_another_envelope, "SIGNATURE_INVALID"),
    "signature-of-a-reply": (_signature_from_a_reply, "SIGNATURE_INVALID"),
    "algorithm-es256": (_signature(algorithm="ES256"), "ALGORITHM_UNSUPPORTED"),
    "signer-other-did": (
        _signature(signer="did:key:z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"),
        "SIGNATURE_INVALID",
    ),
    "signer-empty": (_signature(signer=""), "SIGNATURE_INVALID"),
    "signed-by-someone-else": (_other_signer_signature, "SIGNATURE_INVALID"),
    "impersonation": (_impersonation, "SIGNATURE_INVALID"),
    "sender-changed-signer-kept": (_sender_changed_signer_kept, "SIGNATURE_INVALID"),
    "sender-garbage-signer-kept": (_resign_field(sender="garbage"), "SIGNATURE_INVALID"),
    # every other signed field, changed after signing
    "id-changed": (_resign_field(id="other-id"), "SIGNATURE_INVALID"),
    "kind-swapped": (_kind_swapped, "SIGNATURE_INVALID"),
    "payload-changed": (_payload_bit_flipped, "SIGNATURE_INVALID"),
    "payload-emptied": (_resign_field(payload=b""), "SIGNATURE_INVALID"),
    "metadata-value-changed": (_resign_field(metadata={"a": "2"}), "SIGNATURE_INVALID"),
    "metadata-key-added": (_resign_field(metadata={"a": "1", "b": "2"}), "SIGNATURE_INVALID"),
    "metadata-removed": (_resign_field(metadata={}), "SIGNATURE_INVALID"),
    "context-id-changed": (_resign_field(context_id="ctx"), "SIGNATURE_INVALID"),
    "task-id-changed": (_resign_field(task_id="task"), "SIGNATURE_INVALID"),
    "role-changed": (_resign_field(role="admin"), "SIGNATURE_INVALID"),
    "content-type-changed": (_resign_field(content_type="text/html"), "SIGNATURE_INVALID"),
    "created-at-nudged": (_timestamp_nudged, "SIGNATURE_INVALID"),
    "nonce-swapped": (_nonce_swapped, "SIGNATURE_INVALID"),
    "metadata-flood": (
        _resign_field(metadata={f"k{i}": "v" * 8 for i in range(20_000)}),
        "MALFORMED",  # over MAX_METADATA_ENTRIES: refused before anything else
    ),
}


def _did_of(raw: bytes) -> str:
    return "did:key:z" + base58.b58encode(raw).decode()


_VALID_DID = "did:key:z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"
_SMALL_ORDER = {
    "neutral-element": "01" + "00" * 31,
    "order-2": "ec" + "ff" * 30 + "7f",
    "order-4": "00" * 32,
    "order-4-other-sign": "00" * 31 + "80",
    "order-8": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "order-8-other": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
}
INVALID_DIDS: dict[str, str] = {
    "did-web": "did:web:example.com",
    "did-key-empty": "did:key:",
    "did-key-z-only": "did:key:z",
    "not-a-did": "alice",
    "upper-case-method": "DID:KEY:" + _VALID_DID.removeprefix("did:key:"),
    "base64url-multibase": "did:key:u7QGgdGVzdA",
    "non-base58-chars": "did:key:z6Mk0OIl" + "1" * 40,
    "non-ascii": "did:key:z6Mk\u00e9" + "1" * 40,
    "trailing-space": _VALID_DID + " ",
    "trailing-newline": _VALID_DID + "\n",
    "extra-char": _VALID_DID + "1",
    "leading-zero-byte": "did:key:z1" + _VALID_DID.removeprefix("did:key:z"),
    "too-long": "did:key:z" + "6Mk" * 40,
    "31-byte-key": _did_of(b"\xed\x01" + b"\x07" * 31),
    "33-byte-key": _did_of(b"\xed\x01" + b"\x07" * 33),
    "secp256k1-multicodec": _did_of(b"\xe7\x01\x02" + b"\x07" * 32),
    "x25519-multicodec": _did_of(b"\xec\x01" + b"\x07" * 32),
    "y-not-canonical": _did_of(b"\xed\x01" + bytes.fromhex("ed" + "ff" * 30 + "7f")),
    "not-on-curve": _did_of(b"\xed\x01" + (2).to_bytes(32, "little")),
    **{
        f"small-order-{name}": _did_of(b"\xed\x01" + bytes.fromhex(point))
        for name, point in _SMALL_ORDER.items()
    },
}


def _as_sender(did: str) -> Build:
    """An envelope from ``did`` (sender and signer agree) with a 64-byte signature.

    For the small-order keys the value is the universal forgery R = neutral
    element, S = 0, which OpenSSL accepts for the neutral-element key over any
    message: only the DID check stands between it and a forged sender.
    """

    def build(me: sigwire.Identity, server_did: str) -> sigwire.Envelope:
        env = sigwire.Envelope.new("echo", b"x", sender=did)
        value = bytes.fromhex(_SMALL_ORDER["neutral-element"]) + bytes(32)
        return dataclasses.replace(env, signature=sigwire.Signature(did, "Ed25519", value))

    return build


WRONG_ALGORITHMS = [
    "ES256",
    "EdDSA",
    "ed25519",
    "ED25519",
    "Ed448",
    "RS256",
    "none",
    "",
    "Ed25519 ",
    " Ed25519",
    "Ed25519\x00",
    "\uff25d25519",
    "Ed25519/SHA-512",
]

ALL_CASES: dict[str, tuple[Build, str]] = {
    **FIELD_CASES,
    **{f"did-{name}": (_as_sender(did), "DID_INVALID") for name, did in INVALID_DIDS.items()},
    **{
        f"algorithm-{i}": (_signature(algorithm=alg), "ALGORITHM_UNSUPPORTED")
        for i, alg in enumerate(WRONG_ALGORITHMS)
    },
}


def _check_details(reason: str, details: dict[str, str], request: sigwire.Envelope) -> None:
    assert DETAILS.get(reason, set()) <= set(details)
    if reason == "DID_INVALID":
        shown = details["did"]
        assert len(shown) <= 120
        assert request.sender.startswith(shown.removesuffix("..."))
    if reason == "ALGORITHM_UNSUPPORTED":
        assert details["algorithm"] == _sig(request).algorithm


@pytest.mark.parametrize(("build", "reason"), ALL_CASES.values(), ids=ALL_CASES.keys())
async def test_corrupt_envelope_over_grpc_send(
    server: sigwire.Server,
    open_channel: OpenChannel,
    client_identity: sigwire.Identity,
    probe: Probe,
    build: Build,
    reason: str,
) -> None:
    """A corrupted envelope on Send fails with its documented status code and reason."""
    request = build(client_identity, server.identity.did)
    failure = await send_refused(open_channel(server), envelope_bytes(request))
    assert failure.info.reason == reason
    assert failure.code == DOCUMENTED_STATUS[reason]
    _check_details(reason, dict(failure.info.metadata), request)
    assert sum(probe.calls.values()) == 0
    await assert_still_serves(server)


# On a stream, an envelope with more metadata entries than any valid one is
# refused before it is built, which ends the stream (see the test below).
STREAM_CASES = {name: case for name, case in ALL_CASES.items() if name != "metadata-flood"}


async def test_metadata_flood_on_a_stream_closes_it_malformed(
    server: sigwire.Server, client_identity: sigwire.Identity
) -> None:
    """Too many metadata entries on a WebSocket stream close it 1007 MALFORMED, unbuilt."""
    build, _ = ALL_CASES["metadata-flood"]
    request = build(client_identity, server.identity.did)
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(frame_bytes(1, request))
            await ws.wait_closed()
    assert ws.close_code == 1007
    assert (ws.close_reason or "").startswith("MALFORMED")
    await assert_still_serves(server)


@pytest.mark.parametrize(("build", "reason"), STREAM_CASES.values(), ids=STREAM_CASES.keys())
async def test_corrupt_envelope_over_websocket(
    server: sigwire.Server,
    client_identity: sigwire.Identity,
    probe: Probe,
    build: Build,
    reason: str,
) -> None:
    """On a WebSocket stream it gets a signed error reply with that reason; the stream goes on."""
    request = build(client_identity, server.identity.did)
    after = signed(client_identity, "echo", b"same stream")
    async with asyncio.timeout(TIMEOUT):
        async with ws_connect(server.urls[1], subprotocols=[PROTO]) as ws:
            await ws.send(frame_bytes(1, request))
            error = verified_error(await ws_reply(ws, request.id), request, server)
            await ws.send(frame_bytes(2, after))
            assert (await ws_reply(ws, after.id)).data == b"same stream"
    assert error.reason == reason
    _check_details(reason, dict(error.details), request)
    assert probe.calls == {"echo": 1}
    await assert_still_serves(server)


def test_case_lists_are_hostile() -> None:
    """No case is accidentally valid: each one fails the receiver's checks locally."""
    me = sigwire.Identity.generate()
    dispatcher = Dispatcher(sigwire.Identity.generate(), Handlers())
    for build, reason in ALL_CASES.values():
        envelope = build(me, dispatcher.identity.did)
        with pytest.raises(sigwire.SigwireError) as caught:
            dispatcher.admit(envelope)
        assert caught.value.reason == reason
