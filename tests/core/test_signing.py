"""Signing and verification of envelopes, replies and agent cards; trust policy."""

from __future__ import annotations

import dataclasses
import hashlib
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest

from sigwire.envelope import (
    ED25519,
    MAX_ID_LENGTH,
    MAX_NONCE_LENGTH,
    MIN_NONCE_LENGTH,
    AgentCard,
    Envelope,
    Reply,
    ReplyError,
    Signature,
)
from sigwire.errors import (
    EnvelopeError,
    InvalidDidError,
    InvalidSignatureError,
    KeyFileError,
    SignatureMissingError,
    SigningError,
    UnknownSignerError,
    UnsupportedAlgorithmError,
)
from sigwire.signing import AllowList, Identity, OpenTrust, Verifier

from .conftest import T0

PAYLOAD = b'{"title":"write the report"}'
NONCE = bytes(range(16))
METADATA = {"trace": "abc123", "priority": "high", "empty": ""}


def _replace(obj: Any, **changes: Any) -> Any:
    return dataclasses.replace(obj, **changes)


def _flip(data: bytes, index: int) -> bytes:
    flipped = bytearray(data)
    flipped[index] ^= 0x01
    return bytes(flipped)


def _with_value(message: Any, value: bytes) -> Any:
    return _replace(message, signature=_replace(message.signature, value=value))


@pytest.fixture
def request_envelope(alice: Identity, bob: Identity) -> Envelope:
    """An unsigned envelope from alice to bob with every field set."""
    return Envelope(
        id="env-1",
        kind="task.create",
        sender=alice.did,
        payload=PAYLOAD,
        recipient=bob.did,
        context_id="ctx-1",
        task_id="task-1",
        role="user",
        content_type="application/json",
        metadata=dict(METADATA),
        created_at_ms=T0,
        nonce=NONCE,
    )


@pytest.fixture
def signed(alice: Identity, request_envelope: Envelope) -> Envelope:
    """``request_envelope`` signed by alice."""
    return alice.sign_envelope(request_envelope)


@pytest.fixture
def reply(bob: Identity, signed: Envelope) -> Reply:
    """An unsigned error reply from bob to ``signed`` with every field set."""
    return Reply(
        request_id=signed.id,
        request_digest=signed.digest(),
        responder=bob.did,
        success=False,
        data=b"partial result",
        content_type="text/plain",
        error=ReplyError(
            reason="KIND_UNKNOWN",
            message="no handler for 'task.create'",
            details={"kind": "task.create", "hint": "try echo"},
        ),
        created_at_ms=T0 + 5,
        sequence=3,
        final=False,
    )


@pytest.fixture
def card(bob: Identity) -> AgentCard:
    """An unsigned card of bob with every field set."""
    return AgentCard(
        did=bob.did,
        name="bob",
        endpoints=("grpc://127.0.0.1:50051", "ws://127.0.0.1:8765/sigwire/v1"),
        kinds=("count", "echo"),
        max_message_size=4 * 1024 * 1024,
        created_at_ms=T0,
    )


# --- round trips -----------------------------------------------------------------------


def test_signed_envelope_verifies(alice: Identity, signed: Envelope) -> None:
    """An envelope signed by its sender verifies and carries a 64-byte Ed25519 signature."""
    assert signed.signature is not None
    assert signed.signature.signer == alice.did
    assert signed.signature.algorithm == ED25519
    assert len(signed.signature.value) == 64
    Verifier().verify_envelope(signed)


def test_signing_is_deterministic(alice: Identity, request_envelope: Envelope) -> None:
    """Signing the same envelope twice gives the same signature (Ed25519 is deterministic)."""
    assert alice.sign_envelope(request_envelope) == alice.sign_envelope(request_envelope)


def test_resigning_replaces_the_old_signature(
    alice: Identity, signed: Envelope, request_envelope: Envelope
) -> None:
    """Signing an already signed envelope yields the same signature, not one over the old one."""
    assert alice.sign_envelope(signed) == signed
    changed = alice.sign_envelope(_replace(signed, kind="other"))
    Verifier().verify_envelope(changed)
    assert changed.signature != signed.signature


def test_new_envelope_is_valid_and_verifies(alice: Identity) -> None:
    """Envelope.new fills id, nonce and timestamp so that the signed result validates."""
    first = Envelope.new("echo", b"hi", sender=alice.did)
    second = Envelope.new("echo", b"hi", sender=alice.did)
    first.validate()
    assert first.id != second.id
    assert first.nonce != second.nonce
    assert len(first.nonce) == MIN_NONCE_LENGTH
    Verifier().verify_envelope(alice.sign_envelope(first))


def test_signed_reply_verifies(bob: Identity, reply: Reply, signed: Envelope) -> None:
    """A reply signed by its responder verifies against the request it answers."""
    Verifier().verify_reply(bob.sign_reply(reply), signed)


def test_signed_success_reply_verifies(bob: Identity, signed: Envelope) -> None:
    """A successful reply with no error verifies."""
    ok = Reply(
        request_id=signed.id,
        request_digest=signed.digest(),
        responder=bob.did,
        data=b"done",
        created_at_ms=T0,
    )
    Verifier().verify_reply(bob.sign_reply(ok), signed, expected_responder=bob.did)


def test_signed_card_verifies(bob: Identity, card: AgentCard) -> None:
    """A card signed by its own DID verifies, also when its DID is expected."""
    signed_card = bob.sign_card(card)
    Verifier().verify_card(signed_card)
    Verifier().verify_card(signed_card, expected_did=bob.did)


def test_card_of_another_agent_is_refused(bob: Identity, alice: Identity, card: AgentCard) -> None:
    """verify_card with another expected DID raises UnknownSignerError."""
    with pytest.raises(UnknownSignerError):
        Verifier().verify_card(bob.sign_card(card), expected_did=alice.did)


def test_identity_refuses_to_sign_for_someone_else(
    bob: Identity, request_envelope: Envelope, reply: Reply, card: AgentCard, alice: Identity
) -> None:
    """An identity refuses to sign an envelope, reply or card whose author is another DID."""
    with pytest.raises(InvalidSignatureError):
        bob.sign_envelope(request_envelope)
    with pytest.raises(InvalidSignatureError):
        alice.sign_reply(reply)
    with pytest.raises(InvalidSignatureError):
        alice.sign_card(card)


# --- tampering with envelopes ------------------------------------------------------------

EnvelopeChange = Callable[[Envelope, Identity], Envelope]

ENVELOPE_TAMPERING: dict[str, EnvelopeChange] = {
    "id": lambda e, other: _replace(e, id="env-2"),
    "id emptied": lambda e, other: _replace(e, id=""),
    "kind": lambda e, other: _replace(e, kind="task.delete"),
    "sender": lambda e, other: _replace(e, sender=other.did),
    "sender and signer": lambda e, other: _replace(
        e, sender=other.did, signature=_replace(e.signature, signer=other.did)
    ),
    "signer": lambda e, other: _replace(e, signature=_replace(e.signature, signer=other.did)),
    "recipient": lambda e, other: _replace(e, recipient=other.did),
    "recipient emptied": lambda e, other: _replace(e, recipient=""),
    "context_id": lambda e, other: _replace(e, context_id="ctx-2"),
    "task_id": lambda e, other: _replace(e, task_id="task-2"),
    "role": lambda e, other: _replace(e, role="agent"),
    "content_type": lambda e, other: _replace(e, content_type="text/plain"),
    "payload appended": lambda e, other: _replace(e, payload=e.payload + b"\x00"),
    "payload truncated": lambda e, other: _replace(e, payload=e.payload[:-1]),
    "payload emptied": lambda e, other: _replace(e, payload=b""),
    "nonce appended": lambda e, other: _replace(e, nonce=e.nonce + b"\x00"),
    "nonce truncated": lambda e, other: _replace(e, nonce=e.nonce[:-1]),
    "created_at_ms +1": lambda e, other: _replace(e, created_at_ms=e.created_at_ms + 1),
    "created_at_ms -1": lambda e, other: _replace(e, created_at_ms=e.created_at_ms - 1),
    "created_at_ms negated": lambda e, other: _replace(e, created_at_ms=-e.created_at_ms),
    "metadata key added": lambda e, other: _replace(e, metadata={**e.metadata, "new": "x"}),
    "metadata emptied": lambda e, other: _replace(e, metadata={}),
    "id/kind boundary": lambda e, other: _replace(e, id=e.id + e.kind[0], kind=e.kind[1:]),
    "context/task boundary": lambda e, other: _replace(
        e, context_id=e.context_id + e.task_id[:2], task_id=e.task_id[2:]
    ),
}
for _i in range(len(PAYLOAD)):
    ENVELOPE_TAMPERING[f"payload byte {_i}"] = lambda e, other, i=_i: _replace(
        e, payload=_flip(e.payload, i)
    )
for _i in range(len(NONCE)):
    ENVELOPE_TAMPERING[f"nonce byte {_i}"] = lambda e, other, i=_i: _replace(
        e, nonce=_flip(e.nonce, i)
    )
for _key in METADATA:
    ENVELOPE_TAMPERING[f"metadata key {_key!r} renamed"] = lambda e, other, k=_key: _replace(
        e, metadata={(k + "x" if key == k else key): v for key, v in e.metadata.items()}
    )
    ENVELOPE_TAMPERING[f"metadata value of {_key!r}"] = lambda e, other, k=_key: _replace(
        e, metadata={**e.metadata, k: e.metadata[k] + "x"}
    )
    ENVELOPE_TAMPERING[f"metadata key {_key!r} removed"] = lambda e, other, k=_key: _replace(
        e, metadata={key: v for key, v in e.metadata.items() if key != k}
    )
    ENVELOPE_TAMPERING[f"metadata value of {_key!r} moved to key"] = lambda e, other, k=_key: (
        _replace(
            e, metadata={**{key: v for key, v in e.metadata.items() if key != k}, k + "\x00": ""}
        )
    )


@pytest.mark.parametrize("change", ENVELOPE_TAMPERING.values(), ids=list(ENVELOPE_TAMPERING.keys()))
def test_tampered_envelope_is_refused(
    signed: Envelope, mallory: Identity, change: EnvelopeChange
) -> None:
    """Changing any field of a signed envelope makes verification fail."""
    verifier = Verifier()
    verifier.verify_envelope(signed)
    tampered = change(signed, mallory)
    assert tampered != signed
    with pytest.raises(InvalidSignatureError):
        verifier.verify_envelope(tampered)


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_tampered_envelope_signature_is_refused(signed: Envelope, index: int) -> None:
    """Flipping a bit of the signature value makes verification fail."""
    assert signed.signature is not None
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_envelope(_with_value(signed, _flip(signed.signature.value, index)))


def test_tampered_fields_change_the_signing_input(signed: Envelope, mallory: Identity) -> None:
    """Every tampering changes the signing input (the signature covers every field)."""
    inputs = {change(signed, mallory).signing_input() for change in ENVELOPE_TAMPERING.values()}
    assert signed.signing_input() not in inputs
    assert len(inputs) == len(ENVELOPE_TAMPERING)


@pytest.mark.parametrize("algorithm", ["EdDSA", "ed25519", "ED25519", "Ed448", "", "none"])
def test_swapped_algorithm_is_unsupported(signed: Envelope, algorithm: str) -> None:
    """A signature claiming another algorithm raises UnsupportedAlgorithmError."""
    assert signed.signature is not None
    swapped = _replace(signed, signature=_replace(signed.signature, algorithm=algorithm))
    with pytest.raises(UnsupportedAlgorithmError) as info:
        Verifier().verify_envelope(swapped)
    assert info.value.algorithm == algorithm


@pytest.mark.parametrize("length", [63, 65, 32, 128])
def test_signature_of_wrong_length_is_invalid(signed: Envelope, length: int) -> None:
    """A signature value that is not 64 bytes raises InvalidSignatureError naming the length."""
    assert signed.signature is not None
    value = (signed.signature.value * 2)[:length]
    with pytest.raises(InvalidSignatureError, match=f"not {length}"):
        Verifier().verify_envelope(_with_value(signed, value))


def test_empty_signature_value_is_missing(signed: Envelope) -> None:
    """A signature with an empty value raises SignatureMissingError."""
    with pytest.raises(SignatureMissingError):
        Verifier().verify_envelope(_with_value(signed, b""))


def test_signature_by_another_key_is_refused(
    bob: Identity, request_envelope: Envelope, alice: Identity
) -> None:
    """An envelope from alice signed with bob's key, naming bob, raises InvalidSignatureError."""
    value = bob.sign(request_envelope.signing_input(signer=bob.did))
    forged = _replace(
        request_envelope, signature=Signature(signer=bob.did, algorithm=ED25519, value=value)
    )
    assert forged.sender == alice.did
    with pytest.raises(InvalidSignatureError, match="signer"):
        Verifier().verify_envelope(forged)


def test_signature_by_another_key_naming_the_sender_is_refused(
    bob: Identity, alice: Identity, request_envelope: Envelope
) -> None:
    """A signature by bob's key that claims alice as signer does not verify."""
    value = bob.sign(request_envelope.signing_input())
    forged = _replace(
        request_envelope, signature=Signature(signer=alice.did, algorithm=ED25519, value=value)
    )
    with pytest.raises(InvalidSignatureError, match="does not verify"):
        Verifier().verify_envelope(forged)


def test_invalid_sender_did_is_refused(request_envelope: Envelope) -> None:
    """An envelope whose sender and signer are not a valid did:key raises InvalidDidError."""
    bad = "did:key:z6MkNOTVALID"
    forged = _replace(
        request_envelope,
        sender=bad,
        signature=Signature(signer=bad, algorithm=ED25519, value=bytes(64)),
    )
    with pytest.raises(InvalidDidError):
        Verifier().verify_envelope(forged)


# --- missing signatures ------------------------------------------------------------------


def test_unsigned_envelope_is_refused(request_envelope: Envelope) -> None:
    """An unsigned envelope raises SignatureMissingError by default."""
    with pytest.raises(SignatureMissingError):
        Verifier().verify_envelope(request_envelope)


def test_unsigned_envelope_passes_when_signatures_are_optional(
    request_envelope: Envelope,
) -> None:
    """Verifier(require_signatures=False) admits an unsigned envelope, even with an allow list."""
    verifier = Verifier(AllowList([]), require_signatures=False)
    verifier.verify_envelope(request_envelope)


def test_present_signature_is_checked_when_signatures_are_optional(signed: Envelope) -> None:
    """Verifier(require_signatures=False) still refuses a bad signature that is present."""
    verifier = Verifier(require_signatures=False)
    verifier.verify_envelope(signed)
    with pytest.raises(InvalidSignatureError):
        verifier.verify_envelope(_replace(signed, kind="other"))


def test_signed_envelope_meets_trust_policy_when_signatures_are_optional(
    signed: Envelope, bob: Identity
) -> None:
    """With optional signatures a signed envelope is still subject to the trust policy."""
    with pytest.raises(UnknownSignerError):
        Verifier(AllowList([bob.did]), require_signatures=False).verify_envelope(signed)


def test_unsigned_reply_and_card_are_refused(
    reply: Reply, signed: Envelope, card: AgentCard
) -> None:
    """An unsigned reply or card raises SignatureMissingError, even with optional signatures."""
    verifier = Verifier(require_signatures=False)
    with pytest.raises(SignatureMissingError):
        verifier.verify_reply(reply, signed)
    with pytest.raises(SignatureMissingError):
        verifier.verify_card(card)


# --- replies -----------------------------------------------------------------------------

ReplyChange = Callable[[Reply, Identity], Reply]


def _error(reply: Reply, **changes: Any) -> Reply:
    assert reply.error is not None
    return _replace(reply, error=_replace(reply.error, **changes))


def _details(reply: Reply) -> dict[str, str]:
    assert reply.error is not None
    return dict(reply.error.details)


REPLY_TAMPERING: dict[str, ReplyChange] = {
    "request_id": lambda r, other: _replace(r, request_id="env-2"),
    "request_digest byte 0": lambda r, other: _replace(
        r, request_digest=_flip(r.request_digest, 0)
    ),
    "request_digest byte 31": lambda r, other: _replace(
        r, request_digest=_flip(r.request_digest, 31)
    ),
    "request_digest emptied": lambda r, other: _replace(r, request_digest=b""),
    "responder": lambda r, other: _replace(r, responder=other.did),
    "responder and signer": lambda r, other: _replace(
        r, responder=other.did, signature=_replace(r.signature, signer=other.did)
    ),
    "success": lambda r, other: _replace(r, success=not r.success),
    "data": lambda r, other: _replace(r, data=_flip(r.data, 0)),
    "data emptied": lambda r, other: _replace(r, data=b""),
    "content_type": lambda r, other: _replace(r, content_type="application/json"),
    "error removed": lambda r, other: _replace(r, error=None),
    "error reason": lambda r, other: _error(r, reason="HANDLER_FAILED"),
    "error message": lambda r, other: _error(r, message="something else"),
    "error details key added": lambda r, other: _error(r, details={**_details(r), "x": "y"}),
    "error details emptied": lambda r, other: _error(r, details={}),
    "error details value": lambda r, other: _error(
        r,
        details={**_details(r), "kind": "echo"},
    ),
    "error details key renamed": lambda r, other: _error(
        r, details={"kind2": "task.create", "hint": "try echo"}
    ),
    "created_at_ms": lambda r, other: _replace(r, created_at_ms=r.created_at_ms + 1),
    "sequence +1": lambda r, other: _replace(r, sequence=r.sequence + 1),
    "sequence 0": lambda r, other: _replace(r, sequence=0),
    "final": lambda r, other: _replace(r, final=not r.final),
}


@pytest.mark.parametrize("change", REPLY_TAMPERING.values(), ids=list(REPLY_TAMPERING.keys()))
def test_tampered_reply_is_refused(
    bob: Identity, reply: Reply, signed: Envelope, alice: Identity, change: ReplyChange
) -> None:
    """Changing any field of a signed reply makes its signature check fail."""
    good = bob.sign_reply(reply)
    Verifier.check_signature(good.signature, good.responder, good.signing_input())
    tampered = change(good, alice)
    assert tampered != good
    with pytest.raises(InvalidSignatureError):
        Verifier.check_signature(tampered.signature, tampered.responder, tampered.signing_input())
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_reply(tampered, signed)


def test_reply_with_swapped_algorithm_is_unsupported(
    bob: Identity, reply: Reply, signed: Envelope
) -> None:
    """A reply signature claiming another algorithm raises UnsupportedAlgorithmError."""
    good = bob.sign_reply(reply)
    assert good.signature is not None
    swapped = _replace(good, signature=_replace(good.signature, algorithm="RS256"))
    with pytest.raises(UnsupportedAlgorithmError):
        Verifier().verify_reply(swapped, signed)


@pytest.mark.parametrize(
    ("length", "error"),
    [(0, SignatureMissingError), (63, InvalidSignatureError), (65, InvalidSignatureError)],
)
def test_reply_signature_of_wrong_length(
    bob: Identity, reply: Reply, signed: Envelope, length: int, error: type[SigningError]
) -> None:
    """A reply signature of the wrong length raises the specific SigningError."""
    good = bob.sign_reply(reply)
    assert good.signature is not None
    with pytest.raises(error):
        Verifier().verify_reply(_with_value(good, (good.signature.value * 2)[:length]), signed)


def test_reply_to_another_request_id_is_refused(
    alice: Identity, bob: Identity, reply: Reply, signed: Envelope
) -> None:
    """A validly signed reply presented for a request with another id is refused."""
    good = bob.sign_reply(reply)
    other = alice.sign_envelope(_replace(signed, id="env-2", signature=None))
    with pytest.raises(InvalidSignatureError, match="different request"):
        Verifier().verify_reply(good, other)


def test_reply_to_same_id_other_digest_is_refused(
    alice: Identity, bob: Identity, reply: Reply, signed: Envelope
) -> None:
    """A reply is refused for a request with the same id but another signature (digest)."""
    good = bob.sign_reply(reply)
    other = alice.sign_envelope(_replace(signed, nonce=b"\xff" * 16, signature=None))
    assert other.id == signed.id
    assert other.digest() != signed.digest()
    with pytest.raises(InvalidSignatureError, match="different request"):
        Verifier().verify_reply(good, other)


def test_reply_digest_is_sha256_of_request_signature(signed: Envelope) -> None:
    """Envelope.digest() is the SHA-256 of the signature value."""
    assert signed.signature is not None
    assert signed.digest() == hashlib.sha256(signed.signature.value).digest()


def test_reply_pinning_expected_responder(
    bob: Identity, mallory: Identity, reply: Reply, signed: Envelope
) -> None:
    """verify_reply admits the pinned responder and refuses any other with UnknownSignerError."""
    good = bob.sign_reply(reply)
    Verifier().verify_reply(good, signed, expected_responder=bob.did)
    with pytest.raises(UnknownSignerError) as info:
        Verifier().verify_reply(good, signed, expected_responder=mallory.did)
    assert info.value.did == bob.did


def test_reply_by_impostor_responder_is_refused(
    mallory: Identity, reply: Reply, signed: Envelope, bob: Identity
) -> None:
    """A reply signed by mallory for bob's pinned conversation is refused."""
    impostor = mallory.sign_reply(_replace(reply, responder=mallory.did))
    Verifier().verify_reply(impostor, signed)  # a valid reply, just not from bob
    with pytest.raises(UnknownSignerError):
        Verifier().verify_reply(impostor, signed, expected_responder=bob.did)


# --- agent cards -------------------------------------------------------------------------

CardChange = Callable[[AgentCard, Identity], AgentCard]

CARD_TAMPERING: dict[str, CardChange] = {
    "did": lambda c, other: _replace(c, did=other.did),
    "did and signer": lambda c, other: _replace(
        c, did=other.did, signature=_replace(c.signature, signer=other.did)
    ),
    "name": lambda c, other: _replace(c, name="eve"),
    "endpoints reordered": lambda c, other: _replace(c, endpoints=c.endpoints[::-1]),
    "endpoint added": lambda c, other: _replace(c, endpoints=(*c.endpoints, "grpc://evil:1")),
    "endpoint removed": lambda c, other: _replace(c, endpoints=c.endpoints[:1]),
    "endpoint edited": lambda c, other: _replace(
        c, endpoints=("grpc://evil.example:50051", *c.endpoints[1:])
    ),
    "endpoints joined": lambda c, other: _replace(c, endpoints=("".join(c.endpoints),)),
    "endpoint moved to kinds": lambda c, other: _replace(
        c, endpoints=c.endpoints[:1], kinds=(c.endpoints[1], *c.kinds)
    ),
    "kinds reordered": lambda c, other: _replace(c, kinds=c.kinds[::-1]),
    "kind added": lambda c, other: _replace(c, kinds=(*c.kinds, "admin")),
    "kinds emptied": lambda c, other: _replace(c, kinds=()),
    "max_message_size": lambda c, other: _replace(c, max_message_size=c.max_message_size + 1),
    "protocol_version": lambda c, other: _replace(c, protocol_version="sigwire/2"),
    "created_at_ms": lambda c, other: _replace(c, created_at_ms=c.created_at_ms + 1),
}


@pytest.mark.parametrize("change", CARD_TAMPERING.values(), ids=list(CARD_TAMPERING.keys()))
def test_tampered_card_is_refused(
    bob: Identity, alice: Identity, card: AgentCard, change: CardChange
) -> None:
    """Changing any field of a signed agent card makes verification fail."""
    good = bob.sign_card(card)
    Verifier().verify_card(good)
    tampered = change(good, alice)
    assert tampered != good
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_card(tampered)


@pytest.mark.parametrize(
    ("length", "error"),
    [(0, SignatureMissingError), (63, InvalidSignatureError), (65, InvalidSignatureError)],
)
def test_card_signature_of_wrong_length(
    bob: Identity, card: AgentCard, length: int, error: type[SigningError]
) -> None:
    """A card signature of the wrong length raises the specific SigningError."""
    good = bob.sign_card(card)
    assert good.signature is not None
    with pytest.raises(error):
        Verifier().verify_card(_with_value(good, (good.signature.value * 2)[:length]))


def test_card_with_swapped_algorithm_is_unsupported(bob: Identity, card: AgentCard) -> None:
    """A card signature claiming another algorithm raises UnsupportedAlgorithmError."""
    good = bob.sign_card(card)
    assert good.signature is not None
    with pytest.raises(UnsupportedAlgorithmError):
        Verifier().verify_card(_replace(good, signature=_replace(good.signature, algorithm="x")))


# --- trust policy ------------------------------------------------------------------------


def test_allow_list_admits_listed_and_refuses_others(
    alice: Identity, bob: Identity, mallory: Identity
) -> None:
    """AllowList admits listed signers and refuses others with UnknownSignerError."""
    verifier = Verifier(AllowList([alice.did, bob.did]))
    verifier.verify_envelope(alice.sign_envelope(Envelope.new("echo", sender=alice.did)))
    verifier.verify_envelope(bob.sign_envelope(Envelope.new("echo", sender=bob.did)))
    with pytest.raises(UnknownSignerError) as info:
        verifier.verify_envelope(mallory.sign_envelope(Envelope.new("echo", sender=mallory.did)))
    assert info.value.did == mallory.did
    assert info.value.reason == "SIGNER_UNKNOWN"


def test_allow_list_checks_authentication_before_trust(alice: Identity, signed: Envelope) -> None:
    """A listed sender's tampered envelope is refused as InvalidSignatureError."""
    with pytest.raises(InvalidSignatureError):
        Verifier(AllowList([alice.did])).verify_envelope(_replace(signed, payload=b"x"))


def test_open_trust_admits_anyone(mallory: Identity) -> None:
    """OpenTrust (the default) admits any signer whose signature verifies."""
    verifier = Verifier()
    assert isinstance(verifier.trust, OpenTrust)
    verifier.verify_envelope(mallory.sign_envelope(Envelope.new("echo", sender=mallory.did)))


def test_allow_list_refuses_malformed_entries() -> None:
    """AllowList rejects a malformed DID at construction with InvalidDidError."""
    with pytest.raises(InvalidDidError):
        AllowList(["did:web:example.com"])


def test_allow_list_from_text_skips_comments(alice: Identity, bob: Identity) -> None:
    """AllowList.from_text ignores blank lines, whole-line and trailing # comments."""
    text = f"# trusted agents\n\n{alice.did}  # alice\n   \n\t{bob.did}\n# {'x' * 10}\n"
    allow = AllowList.from_text(text)
    assert allow.dids == {alice.did, bob.did}
    allow.check(alice.did)
    with pytest.raises(UnknownSignerError):
        allow.check("did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp")


def test_allow_list_from_text_names_the_bad_line(alice: Identity) -> None:
    """AllowList.from_text reports the source and line number of a bad entry."""
    text = f"# header\n{alice.did}\n\nnot-a-did  # oops\n"
    with pytest.raises(InvalidDidError, match=r"trust\.txt:4:") as info:
        AllowList.from_text(text, source="trust.txt")
    assert info.value.did == "not-a-did"


def test_allow_list_repr_counts_dids(alice: Identity, bob: Identity) -> None:
    """AllowList's repr gives the number of DIDs."""
    assert repr(AllowList([alice.did, bob.did, alice.did])) == "AllowList(2 DIDs)"


# --- unicode, empty and large values -------------------------------------------------------

NFC_E = "\u00e9"
NFD_E = "e\u0301"

UNICODE_METADATA = {
    "nfc and nfd keys": {NFC_E: "composed", NFD_E: "decomposed"},
    "emoji": {"\U0001f600": "\U0001f44d\U0001f3fd", "flag": "\U0001f1eb\U0001f1f7"},
    "empty key and value": {"": "", "k": ""},
    "rtl": {"\u05e9\u05dc\u05d5\u05dd": "\u0645\u0631\u062d\u0628\u0627", "rlo": "\u202eabc"},
    "cjk": {"\u65e5\u672c": "\u8a9e"},
    "control and nul": {"a\x00b": "\x00", "tab\t": "\n"},
    "astral plane vs bmp order": {"\uffff": "bmp", "\U00010000": "astral"},
}


@pytest.mark.parametrize("metadata", UNICODE_METADATA.values(), ids=UNICODE_METADATA.keys())
def test_unicode_metadata_signs_and_verifies(
    alice: Identity, request_envelope: Envelope, metadata: dict[str, str]
) -> None:
    """Metadata with unusual Unicode signs and verifies, and every entry is covered."""
    signed_env = alice.sign_envelope(_replace(request_envelope, metadata=metadata))
    Verifier().verify_envelope(signed_env)
    for key in metadata:
        changed = {**metadata, key: metadata[key] + "!"}
        with pytest.raises(InvalidSignatureError):
            Verifier().verify_envelope(_replace(signed_env, metadata=changed))


def test_nfc_and_nfd_keys_are_distinct(alice: Identity, request_envelope: Envelope) -> None:
    """NFC and NFD spellings of a key are distinct keys and give distinct signing inputs."""
    assert unicodedata.normalize("NFC", NFD_E) == NFC_E
    nfc = _replace(request_envelope, metadata={NFC_E: "v"})
    nfd = _replace(request_envelope, metadata={NFD_E: "v"})
    assert nfc.signing_input() != nfd.signing_input()
    signed_nfc = alice.sign_envelope(nfc)
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_envelope(_replace(signed_nfc, metadata={NFD_E: "v"}))


def test_nfc_and_nfd_values_are_distinct(request_envelope: Envelope) -> None:
    """NFC and NFD spellings of a value give distinct signing inputs."""
    nfc = _replace(request_envelope, metadata={"k": "caf" + NFC_E})
    nfd = _replace(request_envelope, metadata={"k": "caf" + NFD_E})
    assert nfc.signing_input() != nfd.signing_input()


def test_metadata_order_does_not_matter(request_envelope: Envelope) -> None:
    """The signing input sorts metadata, so insertion order does not change it."""
    forward = dict(UNICODE_METADATA["rtl"] | UNICODE_METADATA["emoji"] | METADATA)
    backward = dict(reversed(list(forward.items())))
    assert list(forward) != list(backward)
    assert (
        _replace(request_envelope, metadata=forward).signing_input()
        == _replace(request_envelope, metadata=backward).signing_input()
    )


def test_non_ascii_fields_sign_and_verify(alice: Identity, request_envelope: Envelope) -> None:
    """Non-ASCII ids, kinds and roles sign and verify."""
    env = _replace(request_envelope, id="id-\u00fc-\U0001f600", kind="t\u00e2che", role="\u05e9")
    Verifier().verify_envelope(alice.sign_envelope(env))


def test_empty_payload_signs_and_verifies(alice: Identity, request_envelope: Envelope) -> None:
    """An empty payload signs and verifies, and differs from a single zero byte."""
    signed_env = alice.sign_envelope(_replace(request_envelope, payload=b""))
    Verifier().verify_envelope(signed_env)
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_envelope(_replace(signed_env, payload=b"\x00"))


def test_minimal_envelope_signs_and_verifies(alice: Identity) -> None:
    """An envelope with only the required fields signs and verifies."""
    env = Envelope(id="1", kind="k", sender=alice.did, created_at_ms=1, nonce=bytes(16))
    env.validate()
    Verifier().verify_envelope(alice.sign_envelope(env))


def test_four_mib_payload_signs_and_verifies(alice: Identity, request_envelope: Envelope) -> None:
    """A 4 MiB payload signs and verifies, and a change to its last byte is detected."""
    payload = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    assert len(payload) == 4 * 1024 * 1024
    signed_env = alice.sign_envelope(_replace(request_envelope, payload=payload))
    Verifier().verify_envelope(signed_env)
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_envelope(_replace(signed_env, payload=_flip(payload, len(payload) - 1)))


def test_signing_input_covers_payload_by_hash(request_envelope: Envelope) -> None:
    """The signing input holds the payload's SHA-256, not the payload, so it stays small."""
    big = _replace(request_envelope, payload=b"\x00" * 1_000_000)
    assert hashlib.sha256(big.payload).digest() in big.signing_input()
    assert len(big.signing_input()) == len(request_envelope.signing_input())


# --- validation --------------------------------------------------------------------------

INVALID_ENVELOPES: dict[str, dict[str, Any]] = {
    "id empty": {"id": ""},
    "id too long": {"id": "i" * (MAX_ID_LENGTH + 1)},
    "kind empty": {"kind": ""},
    "kind too long": {"kind": "k" * (MAX_ID_LENGTH + 1)},
    "sender empty": {"sender": ""},
    "nonce empty": {"nonce": b""},
    "nonce too short": {"nonce": bytes(MIN_NONCE_LENGTH - 1)},
    "nonce too long": {"nonce": bytes(MAX_NONCE_LENGTH + 1)},
    "created_at_ms zero": {"created_at_ms": 0},
    "created_at_ms negative": {"created_at_ms": -1},
}


@pytest.mark.parametrize("changes", INVALID_ENVELOPES.values(), ids=INVALID_ENVELOPES.keys())
def test_validate_rejects_bad_fields(request_envelope: Envelope, changes: dict[str, Any]) -> None:
    """Envelope.validate raises EnvelopeError for each missing or out-of-range field."""
    request_envelope.validate()
    with pytest.raises(EnvelopeError) as info:
        _replace(request_envelope, **changes).validate()
    assert info.value.reason == "MALFORMED"


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "i" * MAX_ID_LENGTH},
        {"kind": "k" * MAX_ID_LENGTH},
        {"nonce": bytes(MIN_NONCE_LENGTH)},
        {"nonce": bytes(MAX_NONCE_LENGTH)},
        {"created_at_ms": 1},
        {"recipient": "", "payload": b"", "metadata": {}},
    ],
    ids=["id at limit", "kind at limit", "shortest nonce", "longest nonce", "epoch+1", "optional"],
)
def test_validate_accepts_boundaries(request_envelope: Envelope, changes: dict[str, Any]) -> None:
    """Envelope.validate accepts values exactly at the limits and empty optional fields."""
    _replace(request_envelope, **changes).validate()


# --- identities --------------------------------------------------------------------------


def test_identity_repr_hides_the_private_key() -> None:
    """Identity's repr and str show the DID and never the private key."""
    seed = bytes(range(100, 132))
    identity = Identity.from_seed(seed)
    pem_body = b"".join(identity.to_pem().splitlines()[1:-1]).decode()
    for text in (repr(identity), str(identity), f"{identity!r:>200}"):
        assert identity.did in text
        assert seed.hex() not in text
        assert seed.hex().upper() not in text
        assert pem_body not in text
        assert "PRIVATE" not in text


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_identity_from_seed_refuses_wrong_length(length: int) -> None:
    """Identity.from_seed with a seed that is not 32 bytes raises KeyFileError."""
    with pytest.raises(KeyFileError, match=f"not {length}"):
        Identity.from_seed(b"\x01" * length)


def test_identity_pem_round_trip() -> None:
    """An identity survives to_pem/from_pem with the same DID and seed."""
    identity = Identity.generate()
    again = Identity.from_pem(identity.to_pem())
    assert again.did == identity.did
    assert again.to_seed_hex() == identity.to_seed_hex()


def test_identity_signature_verifies_under_its_did(alice: Identity) -> None:
    """Identity.sign produces a signature that check_signature accepts for its DID."""
    signature = Signature(signer=alice.did, algorithm=ED25519, value=alice.sign(b"data"))
    Verifier.check_signature(signature, alice.did, b"data")
    with pytest.raises(InvalidSignatureError):
        Verifier.check_signature(signature, alice.did, b"date")


def test_metadata_limits_are_enforced_by_validate(alice: Identity) -> None:
    """Too many metadata entries, or too many metadata bytes, are MALFORMED."""
    from sigwire.envelope import MAX_METADATA_BYTES, MAX_METADATA_ENTRIES

    many = Envelope.new(
        "k", sender=alice.did, metadata={f"k{i}": "" for i in range(MAX_METADATA_ENTRIES + 1)}
    )
    with pytest.raises(EnvelopeError, match="entries"):
        many.validate()
    big = Envelope.new("k", sender=alice.did, metadata={"k": "v" * MAX_METADATA_BYTES})
    with pytest.raises(EnvelopeError, match="bytes"):
        big.validate()
    Envelope.new(
        "k", sender=alice.did, metadata={f"k{i}": "" for i in range(MAX_METADATA_ENTRIES)}
    ).validate()
