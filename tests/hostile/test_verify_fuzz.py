"""Property-based verification of tampered messages: refused unless unchanged, never a crash.

Mutations are applied to the protobuf form and the bytes decoded again, so
every mutated value is one that can really arrive on the wire. Any change to
any field, the signature included, must make verification fail with a
:class:`sigwire.SigningError` (or the validation rules with
:class:`sigwire.EnvelopeError`); only the untouched message verifies.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import base58
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sigwire
from sigwire import _proto
from sigwire.dispatch import Dispatcher, Handlers
from sigwire.envelope import now_ms
from tests.hostile.conftest import outcome

pb = _proto.pb
FUZZ = settings(max_examples=150, deadline=None)

ALICE = sigwire.Identity.from_seed(bytes(range(32)))
BOB = sigwire.Identity.from_seed(bytes(range(32, 64)))
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"

ORIGINAL = ALICE.sign_envelope(
    sigwire.Envelope(
        id="env-1",
        kind="echo",
        sender=ALICE.did,
        payload=b"pay 10",
        recipient=BOB.did,
        context_id="ctx",
        task_id="task",
        role="user",
        content_type="text/plain",
        metadata={"amount": "10", "\u00e9": "x"},
        created_at_ms=now_ms(),
        nonce=bytes(range(16)),
    )
)
ORIGINAL_REPLY = BOB.sign_reply(
    sigwire.Reply(
        request_id=ORIGINAL.id,
        request_digest=ORIGINAL.digest(),
        responder=BOB.did,
        data=b"done",
        content_type="text/plain",
        created_at_ms=ORIGINAL.created_at_ms + 1,
        sequence=0,
        final=True,
    )
)
ORIGINAL_CARD = BOB.sign_card(
    sigwire.AgentCard(
        did=BOB.did,
        name="bob",
        endpoints=("grpc://127.0.0.1:1", "ws://127.0.0.1:2/sigwire/v1"),
        kinds=("echo", "count"),
        max_message_size=1024,
        created_at_ms=ORIGINAL.created_at_ms,
    )
)

TEXT = st.text(max_size=40)
DIDS = st.one_of(
    TEXT,
    st.sampled_from([ALICE.did, BOB.did, ALICE.did + " ", ALICE.did[:-1], "did:web:example.com"]),
    st.text(alphabet=B58, max_size=60).map(lambda s: "did:key:z" + s),
    st.binary(min_size=30, max_size=36).map(
        lambda raw: "did:key:z" + base58.b58encode(b"\xed\x01" + raw).decode()
    ),
)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
SIGNATURE_VALUES = st.one_of(
    st.binary(max_size=80),
    st.just(bytes(64)),
    st.just(b"\x01" + bytes(63)),  # R = the neutral element, S = 0
)
ALGORITHMS = st.one_of(TEXT, st.sampled_from(["Ed25519", "ed25519", "EdDSA", "Ed25519 ", ""]))

ENVELOPE_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "id": TEXT,
    "kind": TEXT,
    "sender": DIDS,
    "recipient": DIDS,
    "context_id": TEXT,
    "task_id": TEXT,
    "role": TEXT,
    "payload": st.binary(max_size=64),
    "content_type": TEXT,
    "metadata": st.dictionaries(TEXT, TEXT, max_size=4),
    "created_at_ms": INT64,
    "nonce": st.binary(max_size=80),
    "signature.signer": DIDS,
    "signature.algorithm": ALGORITHMS,
    "signature.value": SIGNATURE_VALUES,
    "signature": st.none(),
}


@st.composite
def envelope_mutations(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """One to three (field, new value) pairs for a signed envelope."""
    fields = draw(st.lists(st.sampled_from(sorted(ENVELOPE_MUTATIONS)), min_size=1, max_size=3))
    return [(name, draw(ENVELOPE_MUTATIONS[name])) for name in fields]


def _apply(msg: Any, mutations: list[tuple[str, Any]]) -> None:
    for name, value in mutations:
        if name == "signature":
            msg.ClearField("signature")
        elif name.startswith("signature."):
            setattr(msg.signature, name.removeprefix("signature."), value)
        elif isinstance(value, dict):
            target = getattr(msg, name)
            target.clear()
            target.update(value)
        elif isinstance(value, tuple):
            del getattr(msg, name)[:]
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)


def _tampered_envelope(mutations: list[tuple[str, Any]]) -> sigwire.Envelope:
    msg = _proto.envelope_to_pb(ORIGINAL)
    _apply(msg, mutations)
    return _proto.decode_envelope(msg.SerializeToString())


@FUZZ
@given(mutations=envelope_mutations())
def test_tampered_envelope_never_verifies(mutations: list[tuple[str, Any]]) -> None:
    """Any change to a signed envelope's fields or signature fails verification."""
    envelope = _tampered_envelope(mutations)
    try:
        sigwire.Verifier().verify_envelope(envelope)
    except sigwire.SigningError:
        assert envelope != ORIGINAL
    else:
        assert envelope == ORIGINAL


@FUZZ
@given(mutations=envelope_mutations(), require=st.booleans())
def test_tampered_envelope_fails_the_inbound_checks_cleanly(
    mutations: list[tuple[str, Any]], require: bool
) -> None:
    """Validation, signature and trust checks on a tampered envelope raise only SigwireErrors."""
    envelope = _tampered_envelope(mutations)
    verifier = sigwire.Verifier(sigwire.AllowList([ALICE.did]), require_signatures=require)
    try:
        envelope.validate()
        verifier.verify_envelope(envelope)
    except (sigwire.EnvelopeError, sigwire.SigningError):
        assert envelope != ORIGINAL
        return
    # Only the original, or (verification off) an unsigned envelope, gets through.
    assert envelope == ORIGINAL or (not require and envelope.signature is None)


@FUZZ
@given(mutations=envelope_mutations())
def test_tampered_envelope_is_refused_by_the_dispatcher(mutations: list[tuple[str, Any]]) -> None:
    """The receiver's whole admission pipeline refuses a tampered envelope with a SigwireError."""
    envelope = _tampered_envelope(mutations)
    result = outcome(Dispatcher(BOB, Handlers()).admit, envelope)
    if isinstance(result, sigwire.SigwireError):
        assert envelope != ORIGINAL
        assert result.reason in {
            "MALFORMED",
            "PAYLOAD_TOO_LARGE",
            "RECIPIENT_MISMATCH",
            "SIGNATURE_MISSING",
            "SIGNATURE_INVALID",
            "ALGORITHM_UNSUPPORTED",
            "DID_INVALID",
            "TIMESTAMP_OUT_OF_WINDOW",
        }
    else:
        assert envelope == ORIGINAL


REPLY_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": TEXT,
    "request_digest": st.one_of(st.binary(max_size=40), st.just(hashlib.sha256(b"").digest())),
    "responder": DIDS,
    "success": st.booleans(),
    "data": st.binary(max_size=64),
    "content_type": TEXT,
    "error.reason": TEXT,
    "error.message": TEXT,
    "created_at_ms": INT64,
    "sequence": UINT64,
    "final": st.booleans(),
    "signature.signer": DIDS,
    "signature.algorithm": ALGORITHMS,
    "signature.value": SIGNATURE_VALUES,
    "signature": st.none(),
}


@FUZZ
@given(
    fields=st.lists(st.sampled_from(sorted(REPLY_MUTATIONS)), min_size=1, max_size=3),
    data=st.data(),
)
def test_tampered_reply_never_verifies(fields: list[str], data: st.DataObject) -> None:
    """Any change to a signed reply fails verify_reply; the untouched one verifies."""
    msg = _proto.reply_to_pb(ORIGINAL_REPLY)
    for name in fields:
        value = data.draw(REPLY_MUTATIONS[name], label=name)
        if name.startswith("error."):
            setattr(msg.error, name.removeprefix("error."), value)
        else:
            _apply(msg, [(name, value)])
    reply = _proto.decode_reply(msg.SerializeToString())
    if reply.error == sigwire.ReplyError(reason=""):
        # Documented (signing.md 4.2): an empty error signs exactly like no error.
        reply = dataclasses.replace(reply, error=None)
    try:
        sigwire.Verifier().verify_reply(reply, ORIGINAL, expected_responder=BOB.did)
    except sigwire.SigningError:
        assert reply != ORIGINAL_REPLY
    else:
        assert reply == ORIGINAL_REPLY


CARD_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "did": DIDS,
    "name": TEXT,
    "endpoints": st.lists(TEXT, max_size=3).map(tuple),
    "kinds": st.lists(TEXT, max_size=3).map(tuple),
    "max_message_size": UINT64,
    "protocol_version": TEXT,
    "created_at_ms": INT64,
    "signature.signer": DIDS,
    "signature.algorithm": ALGORITHMS,
    "signature.value": SIGNATURE_VALUES,
    "signature": st.none(),
}


@FUZZ
@given(
    fields=st.lists(st.sampled_from(sorted(CARD_MUTATIONS)), min_size=1, max_size=3),
    data=st.data(),
    pinned=st.booleans(),
)
def test_tampered_card_never_verifies(fields: list[str], data: st.DataObject, pinned: bool) -> None:
    """Any change to a signed agent card fails verify_card; the untouched one verifies."""
    msg = _proto.card_to_pb(ORIGINAL_CARD)
    _apply(msg, [(name, data.draw(CARD_MUTATIONS[name], label=name)) for name in fields])
    card = _proto.decode_card(msg.SerializeToString())
    try:
        sigwire.Verifier().verify_card(card, expected_did=BOB.did if pinned else None)
    except sigwire.SigningError:
        assert card != ORIGINAL_CARD
    else:
        assert card == ORIGINAL_CARD


@FUZZ
@given(
    author=DIDS,
    other=st.one_of(st.none(), DIDS),
    algorithm=ALGORITHMS,
    value=SIGNATURE_VALUES,
    signing_input=st.binary(max_size=64),
)
def test_check_signature_raises_only_sigwire_errors(
    author: str, other: str | None, algorithm: str, value: bytes, signing_input: bytes
) -> None:
    """check_signature on arbitrary DIDs, algorithms and values only raises SigningError."""
    signer = author if other is None else other
    signature = sigwire.Signature(signer=signer, algorithm=algorithm, value=value)
    try:
        sigwire.Verifier.check_signature(signature, author, signing_input)
    except sigwire.SigningError:
        return
    raise AssertionError(f"{signature} verified for {author!r}")  # no key signs random input


@FUZZ
@given(did=DIDS)
def test_did_resolution_raises_only_invalid_did(did: str) -> None:
    """Resolving an arbitrary string as a did:key gives 32 bytes or raises InvalidDidError."""
    key = outcome(sigwire.public_key_from_did, did)
    if isinstance(key, sigwire.SigwireError):
        assert isinstance(key, sigwire.InvalidDidError)
        assert key.reason == "DID_INVALID"
        assert len(key.details["did"]) <= 120
        return
    assert len(key) == 32
    assert sigwire.did_from_public_key(key) == did


@FUZZ
@given(created_at_ms=INT64, nonce=st.binary(min_size=16, max_size=64))
def test_replay_guard_raises_only_sigwire_errors(created_at_ms: int, nonce: bytes) -> None:
    """The replay guard on any timestamp and nonce is fresh, a duplicate, or a ReplayError."""
    guard = sigwire.ReplayGuard()
    envelope = dataclasses.replace(ORIGINAL, created_at_ms=created_at_ms, nonce=nonce)
    first = outcome(guard.check_and_mark, envelope)
    if isinstance(first, sigwire.SigwireError):
        assert isinstance(first, sigwire.StaleMessageError)
        assert first.skew_ms != 0
        assert first.reason == "TIMESTAMP_OUT_OF_WINDOW"
        return
    assert first is True
    assert guard.check_and_mark(envelope) is False
    # Same nonce, other content, validly signed: the replay the guard exists for.
    with_other_content = ALICE.sign_envelope(
        dataclasses.replace(envelope, payload=b"pay 1000", signature=None)
    )
    with pytest.raises(sigwire.ReplayError) as caught:
        guard.check_and_mark(with_other_content)
    assert caught.value.reason == "REPLAY"
