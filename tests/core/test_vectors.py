"""The published signing vectors (tests/vectors/signing.json) against the library."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from sigwire.envelope import ED25519, AgentCard, Envelope, Reply, ReplyError, Signature
from sigwire.signing import Identity, Verifier

HERE = Path(__file__).resolve().parent
VECTORS_PATH = HERE.parent / "vectors" / "signing.json"
GEN_VECTORS = HERE.parent.parent / "scripts" / "gen-vectors"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


def _ids(kind: str) -> list[str]:
    return [vector["name"] for vector in VECTORS[kind]]


def _envelope(fields: dict[str, Any]) -> Envelope:
    return Envelope(
        id=fields["id"],
        kind=fields["kind"],
        sender=fields["sender"],
        payload=bytes.fromhex(fields["payload_hex"]),
        recipient=fields["recipient"],
        context_id=fields["context_id"],
        task_id=fields["task_id"],
        role=fields["role"],
        content_type=fields["content_type"],
        metadata=fields["metadata"],
        created_at_ms=fields["created_at_ms"],
        nonce=bytes.fromhex(fields["nonce_hex"]),
    )


def _reply(fields: dict[str, Any]) -> Reply:
    error = fields["error"]
    return Reply(
        request_id=fields["request_id"],
        request_digest=bytes.fromhex(fields["request_digest_hex"]),
        responder=fields["responder"],
        success=fields["success"],
        data=bytes.fromhex(fields["data_hex"]),
        content_type=fields["content_type"],
        error=None if error is None else ReplyError(**error),
        created_at_ms=fields["created_at_ms"],
        sequence=fields["sequence"],
        final=fields["final"],
    )


def _card(fields: dict[str, Any]) -> AgentCard:
    return AgentCard(
        did=fields["did"],
        name=fields["name"],
        endpoints=tuple(fields["endpoints"]),
        kinds=tuple(fields["kinds"]),
        max_message_size=fields["max_message_size"],
        protocol_version=fields["protocol_version"],
        created_at_ms=fields["created_at_ms"],
    )


def _signed_requests() -> dict[str, Envelope]:
    """The envelope vectors, signed as published, by id."""
    requests = {}
    for vector in VECTORS["envelopes"]:
        envelope = _envelope(vector["envelope"])
        signature = Signature(vector["signer_did"], ED25519, bytes.fromhex(vector["signature_hex"]))
        requests[envelope.id] = dataclasses.replace(envelope, signature=signature)
    return requests


def test_enough_vectors() -> None:
    """The file holds at least 3 envelope, 2 reply and 1 card vectors."""
    assert len(VECTORS["envelopes"]) >= 3
    assert len(VECTORS["replies"]) >= 2
    assert len(VECTORS["cards"]) >= 1


@pytest.mark.parametrize("vector", VECTORS["envelopes"], ids=_ids("envelopes"))
def test_envelope_vector(vector: dict[str, Any]) -> None:
    """Each envelope vector's signing input, signer DID and signature are reproduced exactly."""
    fields = vector["envelope"]
    assert fields["algorithm"] == ED25519
    envelope = _envelope(fields)
    assert hashlib.sha256(envelope.payload).hexdigest() == vector["payload_sha256_hex"]
    assert envelope.signing_input().hex() == vector["signing_input_hex"]
    signer = Identity.from_seed(bytes.fromhex(vector["signer_seed_hex"]))
    assert signer.did == vector["signer_did"] == envelope.sender
    signed = signer.sign_envelope(envelope)
    assert signed.signature is not None
    assert signed.signature.value.hex() == vector["signature_hex"]
    assert signed.signing_input().hex() == vector["signing_input_hex"]
    Verifier().verify_envelope(signed)


@pytest.mark.parametrize("vector", VECTORS["replies"], ids=_ids("replies"))
def test_reply_vector(vector: dict[str, Any]) -> None:
    """Each reply vector's signing input, signer DID and signature are reproduced exactly."""
    fields = vector["reply"]
    assert fields["algorithm"] == ED25519
    reply = _reply(fields)
    assert reply.signing_input().hex() == vector["signing_input_hex"]
    signer = Identity.from_seed(bytes.fromhex(vector["signer_seed_hex"]))
    assert signer.did == vector["signer_did"] == reply.responder
    signed = signer.sign_reply(reply)
    assert signed.signature is not None
    assert signed.signature.value.hex() == vector["signature_hex"]

    request = _signed_requests()[vector["request"]["id"]]
    assert request.signature is not None
    assert request.signature.value.hex() == vector["request"]["signature_hex"]
    assert reply.request_digest == hashlib.sha256(request.signature.value).digest()
    Verifier().verify_reply(signed, request, expected_responder=vector["signer_did"])


@pytest.mark.parametrize("vector", VECTORS["cards"], ids=_ids("cards"))
def test_card_vector(vector: dict[str, Any]) -> None:
    """Each card vector's signing input, signer DID and signature are reproduced exactly."""
    fields = vector["card"]
    assert fields["algorithm"] == ED25519
    card = _card(fields)
    assert card.signing_input().hex() == vector["signing_input_hex"]
    signer = Identity.from_seed(bytes.fromhex(vector["signer_seed_hex"]))
    assert signer.did == vector["signer_did"] == card.did
    signed = signer.sign_card(card)
    assert signed.signature is not None
    assert signed.signature.value.hex() == vector["signature_hex"]
    Verifier().verify_card(signed, expected_did=vector["signer_did"])


@pytest.mark.parametrize("vector", VECTORS["envelopes"], ids=_ids("envelopes"))
def test_published_envelope_signature_verifies(vector: dict[str, Any]) -> None:
    """The published signature verifies on the rebuilt envelope without re-signing."""
    envelope = _signed_requests()[vector["envelope"]["id"]]
    Verifier().verify_envelope(envelope)


def test_vectors_file_matches_generator() -> None:
    """scripts/gen-vectors rebuilds exactly the committed vectors file."""
    loader = importlib.machinery.SourceFileLoader("sigwire_gen_vectors", str(GEN_VECTORS))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    assert module.build() == VECTORS
