"""Batch signatures on envelopes and replies (docs/signing.md 4.5, 5, 6.1 step 6, 6.4, 8)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from sigwire import _proto, signing
from sigwire.batch import (
    MAX_PATH_LENGTH,
    BatchProof,
    batch_signing_input,
    leaf_hash,
    merkle_tree,
)
from sigwire.envelope import (
    ED25519,
    AgentCard,
    Envelope,
    Reply,
    ReplyError,
    Signature,
    signature_digest,
)
from sigwire.errors import (
    EnvelopeError,
    InvalidDidError,
    InvalidSignatureError,
    ReplayError,
    SignatureMissingError,
    UnsupportedAlgorithmError,
)
from sigwire.signing import Identity, ReplayGuard, Verifier

from .conftest import T0

SIZES = [2, 3, 5, 8, 17, 32]


def _envelopes(sender: Identity, count: int, tag: str = "e") -> list[Envelope]:
    """``count`` distinct unsigned envelopes from ``sender``, fixed timestamps and nonces."""
    return [
        Envelope(
            id=f"{tag}-{i}",
            kind="echo",
            sender=sender.did,
            payload=b"payload %d" % i,
            metadata={"i": str(i)},
            created_at_ms=T0 + i,
            nonce=hashlib.sha256(f"{tag}-{i}".encode()).digest()[:16],
        )
        for i in range(count)
    ]


def _replies(responder: Identity, requests: list[Envelope]) -> list[Reply]:
    """One unsigned reply from ``responder`` to each request."""
    return [
        Reply(
            request_id=request.id,
            request_digest=request.digest(),
            responder=responder.did,
            data=b"answer " + request.payload,
            created_at_ms=T0 + 100 + i,
            sequence=0,
        )
        for i, request in enumerate(requests)
    ]


def _check(message: Envelope | Reply) -> None:
    """Verifier.check_signature on the message's own author and signing input."""
    author = message.sender if isinstance(message, Envelope) else message.responder
    Verifier.check_signature(message.signature, author, message.signing_input())


def _item(message: Envelope | Reply) -> tuple[Signature | None, str, bytes]:
    author = message.sender if isinstance(message, Envelope) else message.responder
    return (message.signature, author, message.signing_input())


def _with_proof(message: Any, proof: BatchProof | None) -> Any:
    return dataclasses.replace(
        message, signature=dataclasses.replace(message.signature, batch=proof)
    )


# --- signing --------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_batch_of_envelopes_each_verifies_alone(alice: Identity, n: int) -> None:
    """Every envelope of a batch carries one shared value, its own proof, and verifies alone."""
    unsigned = _envelopes(alice, n)
    signed = alice.sign_batch(unsigned)
    assert len(signed) == n
    values = {e.signature.value for e in signed if e.signature is not None}
    assert len(values) == 1
    for i, (before, after) in enumerate(zip(unsigned, signed, strict=True)):
        assert after.signature is not None
        assert after.signature.signer == alice.did
        assert after.signature.algorithm == ED25519
        assert len(after.signature.value) == 64
        assert after.signature.batch is not None
        assert (after.signature.batch.index, after.signature.batch.size) == (i, n)
        assert dataclasses.replace(after, signature=None) == before
        _check(after)
        Verifier().verify_envelope(after)


@pytest.mark.parametrize("n", SIZES)
def test_batch_value_signs_the_documented_batch_input(alice: Identity, n: int) -> None:
    """The shared value is the Ed25519 signature of the batch signing input over the tree root."""
    signed = alice.sign_batch(_envelopes(alice, n))
    leaves = [leaf_hash(dataclasses.replace(e, signature=None).signing_input()) for e in signed]
    root, paths = merkle_tree(leaves)
    first = signed[0].signature
    assert first is not None
    assert first.value == alice.sign(batch_signing_input(n, root, ED25519, alice.did))
    assert [e.signature.batch.path for e in signed if e.signature and e.signature.batch] == paths


@pytest.mark.parametrize("n", SIZES)
def test_batch_of_replies_each_verifies_alone(alice: Identity, bob: Identity, n: int) -> None:
    """Every reply of a batch verifies alone and is bound to its own request."""
    requests = alice.sign_batch(_envelopes(alice, n))
    signed = bob.sign_batch(_replies(bob, requests))
    assert len({r.signature.value for r in signed if r.signature is not None}) == 1
    for i, (reply, request) in enumerate(zip(signed, requests, strict=True)):
        assert reply.signature is not None
        assert reply.signature.batch is not None
        assert reply.signature.batch.index == i
        _check(reply)
        Verifier().verify_reply(reply, request, expected_responder=bob.did)


def test_batch_of_one_is_signed_singly(alice: Identity, bob: Identity) -> None:
    """sign_batch of one message gives exactly the single signature, with no proof."""
    [envelope] = _envelopes(alice, 1)
    assert alice.sign_batch([envelope]) == [alice.sign_envelope(envelope)]
    [reply] = _replies(bob, [alice.sign_envelope(envelope)])
    assert bob.sign_batch([reply]) == [bob.sign_reply(reply)]


def test_mixed_author_batch_is_refused(alice: Identity, bob: Identity) -> None:
    """sign_batch refuses a batch with any message authored by another DID."""
    mixed = [*_envelopes(alice, 3), *_envelopes(bob, 1, tag="b")]
    with pytest.raises(InvalidSignatureError):
        alice.sign_batch(mixed)
    with pytest.raises(InvalidSignatureError):
        alice.sign_batch(_envelopes(bob, 1, tag="b"))
    requests = alice.sign_batch(_envelopes(alice, 2))
    replies = [*_replies(bob, requests), *_replies(alice, requests)]
    with pytest.raises(InvalidSignatureError):
        bob.sign_batch(replies)


# --- one verification per batch -------------------------------------------------------


def test_signatures_valid_verifies_each_batch_once(
    alice: Identity, bob: Identity, verifications: list[bytes]
) -> None:
    """Two batches and two single signatures cost exactly four Ed25519 verifications."""
    envelopes = alice.sign_batch(_envelopes(alice, 8))
    requests = [alice.sign_envelope(e) for e in _envelopes(alice, 2, tag="single")]
    replies = bob.sign_batch(_replies(bob, envelopes[:5]))
    messages: list[Envelope | Reply] = [*envelopes, *replies, *requests]
    assert Verifier.signatures_valid([_item(m) for m in messages]) == [True] * 15
    assert len(verifications) == 4
    assert len(set(verifications)) == 4


def test_signatures_valid_interleaved_batches_still_once_each(
    alice: Identity, verifications: list[bytes]
) -> None:
    """Messages of two batches interleaved (and repeated) still cost one check per batch."""
    one = alice.sign_batch(_envelopes(alice, 4, tag="one"))
    two = alice.sign_batch(_envelopes(alice, 4, tag="two"))
    mixed = [m for pair in zip(one, two, strict=True) for m in pair] + one
    assert Verifier.signatures_valid([_item(m) for m in mixed]) == [True] * 12
    assert len(verifications) == 2


@pytest.mark.parametrize("n", SIZES)
def test_a_whole_batch_rebuilds_its_tree_instead_of_each_root(
    alice: Identity, n: int, verifications: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame that is one whole batch, in order, costs one tree and one Ed25519 check."""
    roots: list[BatchProof] = []
    real = signing.root_from_proof

    def counting(leaf: bytes, proof: BatchProof) -> bytes:
        roots.append(proof)
        return real(leaf, proof)

    monkeypatch.setattr(signing, "root_from_proof", counting)
    signed = alice.sign_batch(_envelopes(alice, n))
    assert Verifier.signatures_valid([_item(e) for e in signed]) == [True] * n
    assert roots == []
    assert len(verifications) == 1


def _agrees(items: list[Envelope]) -> None:
    expected = []
    for message in items:
        try:
            _check(message)
        except Exception:
            expected.append(False)
        else:
            expected.append(True)
    assert Verifier.signatures_valid([_item(m) for m in items]) == expected


def _proof(message: Envelope) -> BatchProof:
    assert message.signature is not None
    assert message.signature.batch is not None
    return message.signature.batch


WHOLE_BATCH_MUTATIONS: dict[str, Callable[[list[Envelope], int], Envelope]] = {
    "content": lambda b, i: dataclasses.replace(b[i], payload=b"forged"),
    "path hash": lambda b, i: _with_proof(
        b[i], dataclasses.replace(_proof(b[i]), path=(bytes(32), *_proof(b[i]).path[1:]))
    ),
    "path of a sibling": lambda b, i: _with_proof(
        b[i], dataclasses.replace(_proof(b[i]), path=_proof(b[i - 1]).path)
    ),
    "shorter path": lambda b, i: _with_proof(
        b[i], dataclasses.replace(_proof(b[i]), path=_proof(b[i]).path[:-1])
    ),
    "index": lambda b, i: _with_proof(
        b[i], dataclasses.replace(_proof(b[i]), index=(i + 1) % len(b))
    ),
    "size": lambda b, i: _with_proof(b[i], dataclasses.replace(_proof(b[i]), size=len(b) + 1)),
    "no proof": lambda b, i: _with_proof(b[i], None),
    "value": lambda b, i: dataclasses.replace(
        b[i], signature=dataclasses.replace(b[i].signature, value=bytes(64))
    ),
    "algorithm": lambda b, i: dataclasses.replace(
        b[i], signature=dataclasses.replace(b[i].signature, algorithm="rsa")
    ),
    "unsigned": lambda b, i: dataclasses.replace(b[i], signature=None),
    "swapped with a sibling": lambda b, i: b[i - 1],
}


@pytest.mark.parametrize("mutation", WHOLE_BATCH_MUTATIONS.values(), ids=WHOLE_BATCH_MUTATIONS)
@pytest.mark.parametrize("at", [0, 4, 7])
def test_a_changed_message_in_a_whole_batch_gets_the_per_message_answer(
    alice: Identity, mutation: Callable[[list[Envelope], int], Envelope], at: int
) -> None:
    """Whatever one message of a whole batch has changed, each gets check_signature's answer."""
    batch = alice.sign_batch(_envelopes(alice, 8))
    items = list(batch)
    items[at] = mutation(batch, at)
    _agrees(items)


def test_part_of_a_batch_or_a_batch_and_more_get_the_per_message_answer(
    alice: Identity, bob: Identity
) -> None:
    """A frame holding part of a batch, or a batch between other messages, agrees too."""
    one = alice.sign_batch(_envelopes(alice, 8, tag="one"))
    two = alice.sign_batch(_envelopes(alice, 3, tag="two"))
    single = alice.sign_envelope(_envelopes(alice, 1, tag="single")[0])
    forged = dataclasses.replace(two[0], sender=bob.did)
    _agrees(one[:5])
    _agrees(one[3:])
    _agrees([single, *two, *one, single])
    _agrees([*one[:4], *two, *one[4:]])
    _agrees([forged, *two[1:], *one])


ENVELOPE_TAMPERING: dict[str, Callable[[Envelope], Envelope]] = {
    "payload": lambda e: dataclasses.replace(e, payload=e.payload + b"!"),
    "kind": lambda e: dataclasses.replace(e, kind="other"),
    "id": lambda e: dataclasses.replace(e, id=e.id + "x"),
    "metadata": lambda e: dataclasses.replace(e, metadata={**e.metadata, "x": "y"}),
    "nonce": lambda e: dataclasses.replace(e, nonce=bytes(16)),
    "created_at_ms": lambda e: dataclasses.replace(e, created_at_ms=e.created_at_ms + 1),
    "recipient": lambda e: dataclasses.replace(e, recipient="did:key:z6Mkother"),
    "role": lambda e: dataclasses.replace(e, role="admin"),
}


@pytest.mark.parametrize("change", ENVELOPE_TAMPERING.values(), ids=ENVELOPE_TAMPERING.keys())
def test_tampered_envelope_fails_alone(
    alice: Identity, change: Callable[[Envelope], Envelope], verifications: list[bytes]
) -> None:
    """One tampered field fails that envelope only; its siblings still pass."""
    signed = alice.sign_batch(_envelopes(alice, 6))
    signed[3] = change(signed[3])
    assert (
        Verifier.signatures_valid([_item(e) for e in signed]) == [True] * 3 + [False] + [True] * 2
    )
    # The genuine root once, and the root the tampered leaf leads to once.
    assert len(verifications) == 2
    with pytest.raises(InvalidSignatureError):
        _check(signed[3])
    for i in (0, 1, 2, 4, 5):
        _check(signed[i])


REPLY_TAMPERING: dict[str, Callable[[Reply], Reply]] = {
    "data": lambda r: dataclasses.replace(r, data=b"forged"),
    "success": lambda r: dataclasses.replace(r, success=False),
    "request_id": lambda r: dataclasses.replace(r, request_id="other"),
    "request_digest": lambda r: dataclasses.replace(r, request_digest=bytes(32)),
    "sequence": lambda r: dataclasses.replace(r, sequence=1),
    "final": lambda r: dataclasses.replace(r, final=False),
    "error": lambda r: dataclasses.replace(r, error=ReplyError("X")),
}


@pytest.mark.parametrize("change", REPLY_TAMPERING.values(), ids=REPLY_TAMPERING.keys())
def test_tampered_reply_fails_alone(
    alice: Identity, bob: Identity, change: Callable[[Reply], Reply]
) -> None:
    """One tampered reply field fails that reply only."""
    signed = bob.sign_batch(_replies(bob, alice.sign_batch(_envelopes(alice, 5))))
    signed[0] = change(signed[0])
    assert Verifier.signatures_valid([_item(r) for r in signed]) == [False] + [True] * 4
    with pytest.raises(InvalidSignatureError):
        _check(signed[0])


def test_signatures_valid_agrees_with_check_signature(alice: Identity, bob: Identity) -> None:
    """signatures_valid is True exactly where check_signature passes, over mixed failures."""
    good = alice.sign_batch(_envelopes(alice, 5))
    items = [
        *good,
        dataclasses.replace(good[0], payload=b"x"),
        _with_proof(good[1], None),
        _with_proof(good[1], good[2].signature.batch if good[2].signature else None),
        dataclasses.replace(good[2], signature=None),
        dataclasses.replace(good[3], sender=bob.did),
        alice.sign_envelope(_envelopes(alice, 1, tag="s")[0]),
    ]
    expected = []
    for message in items:
        try:
            _check(message)
        except Exception:
            expected.append(False)
        else:
            expected.append(True)
    assert expected == [True] * 5 + [False] * 5 + [True]
    assert Verifier.signatures_valid([_item(m) for m in items]) == expected


# --- moved and altered proofs ----------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_moving_a_proof_to_another_message_fails(alice: Identity, n: int) -> None:
    """A message carrying a sibling's proof (same value, other index and path) is refused."""
    signed = alice.sign_batch(_envelopes(alice, n))
    proofs = [e.signature.batch for e in signed if e.signature is not None]
    assert len(proofs) == n
    for i in range(n):
        j = (i + 1) % n
        mine, theirs = proofs[i], proofs[j]
        assert mine is not None
        assert theirs is not None
        moved = dataclasses.replace(signed[i], signature=signed[j].signature)
        sibling_path = _with_proof(signed[i], dataclasses.replace(mine, path=theirs.path))
        sibling_index = _with_proof(signed[i], dataclasses.replace(mine, index=theirs.index))
        for changed in (moved, sibling_path, sibling_index):
            with pytest.raises(InvalidSignatureError):
                _check(changed)


@pytest.mark.parametrize("n", SIZES)
def test_changing_the_size_fails(alice: Identity, n: int) -> None:
    """A proof whose size is changed fails, even where the path still leads to the same root."""
    signed = alice.sign_batch(_envelopes(alice, n))
    for message in signed:
        proof = message.signature.batch if message.signature else None
        assert proof is not None
        for size in {n - 1, n + 1, 2 * n}:
            with pytest.raises(InvalidSignatureError):
                _check(_with_proof(message, dataclasses.replace(proof, size=size)))


def test_size_change_with_unchanged_root_fails_on_the_signature(alice: Identity) -> None:
    """Leaf 0 of 5 under size 6 rebuilds the same root: the signed size is what refuses it."""
    signed = alice.sign_batch(_envelopes(alice, 5))
    proof = signed[0].signature.batch if signed[0].signature else None
    assert proof is not None
    moved = _with_proof(signed[0], dataclasses.replace(proof, size=6))
    with pytest.raises(InvalidSignatureError, match="does not verify"):
        _check(moved)


def test_batch_signature_relabelled_as_single_fails(alice: Identity) -> None:
    """Removing the proof from a batch-signed message leaves a signature over nothing it signed."""
    for message in alice.sign_batch(_envelopes(alice, 4)):
        with pytest.raises(InvalidSignatureError):
            _check(_with_proof(message, None))


def test_single_signature_relabelled_as_batch_fails(alice: Identity) -> None:
    """A single signature given a (well-formed) batch-of-one proof is refused, and vice versa."""
    single = alice.sign_envelope(_envelopes(alice, 1)[0])
    with pytest.raises(InvalidSignatureError):
        _check(_with_proof(single, BatchProof(0, 1, ())))
    batched = alice.sign_batch(_envelopes(alice, 2))[0]
    with pytest.raises(InvalidSignatureError):
        _check(_with_proof(batched, BatchProof(0, 1, ())))


def test_batch_of_one_built_by_hand_verifies(alice: Identity) -> None:
    """A batch of one (root = leaf, empty path) is a valid batch signature (spec 4.5)."""
    envelope = _envelopes(alice, 1)[0]
    root = leaf_hash(envelope.signing_input())
    value = alice.sign(batch_signing_input(1, root, ED25519, alice.did))
    signed = dataclasses.replace(
        envelope, signature=Signature(alice.did, ED25519, value, BatchProof(0, 1, ()))
    )
    _check(signed)


def test_card_with_a_batch_proof_is_refused(bob: Identity) -> None:
    """verify_card refuses a batch proof, even one whose signature checks out."""
    card = AgentCard(did=bob.did, name="bob", endpoints=("grpc://x",), created_at_ms=T0)
    root = leaf_hash(card.signing_input())
    value = bob.sign(batch_signing_input(1, root, ED25519, bob.did))
    batched = dataclasses.replace(
        card, signature=Signature(bob.did, ED25519, value, BatchProof(0, 1, ()))
    )
    # The generic check alone would accept it: the refusal is the card rule (6.4 step 2).
    Verifier.check_signature(batched.signature, batched.did, batched.signing_input())
    with pytest.raises(InvalidSignatureError, match="batch"):
        Verifier().verify_card(batched)
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_card(_with_proof(bob.sign_card(card), BatchProof(0, 1, ())))
    Verifier().verify_card(bob.sign_card(card))


BAD_PROOF = BatchProof(9, 2, ())
"""A proof that step 6 of docs/signing.md 6.1 refuses (index beyond the size)."""

EARLIER_FAILURES: dict[str, tuple[Callable[[Signature], Signature], type[Exception]]] = {
    "no-value": (lambda s: dataclasses.replace(s, value=b""), SignatureMissingError),
    "algorithm": (lambda s: dataclasses.replace(s, algorithm="ed25519"), UnsupportedAlgorithmError),
    "signer": (lambda s: dataclasses.replace(s, signer="did:key:z6Mkother"), InvalidSignatureError),
    "length": (lambda s: dataclasses.replace(s, value=s.value[:63]), InvalidSignatureError),
}


@pytest.mark.parametrize(
    ("change", "error"), EARLIER_FAILURES.values(), ids=EARLIER_FAILURES.keys()
)
def test_proof_is_checked_after_the_earlier_steps(
    alice: Identity, change: Callable[[Signature], Signature], error: type[Exception]
) -> None:
    """With a bad proof AND an earlier failure, the earlier step decides (6.1 order)."""
    message = alice.sign_batch(_envelopes(alice, 2))[0]
    assert message.signature is not None
    broken = dataclasses.replace(message, signature=change(message.signature))
    with pytest.raises(error):
        _check(_with_proof(broken, BAD_PROOF))


def test_bad_proof_of_an_invalid_did_is_did_invalid(alice: Identity) -> None:
    """An author that is no did:key fails at step 5, before the proof is looked at."""
    message = _with_proof(alice.sign_batch(_envelopes(alice, 2))[0], BAD_PROOF)
    assert message.signature is not None
    relabelled = dataclasses.replace(message.signature, signer="did:key:zBAD")
    with pytest.raises(InvalidDidError):
        Verifier.check_signature(relabelled, "did:key:zBAD", message.signing_input())


def test_bad_proof_is_signature_invalid(alice: Identity) -> None:
    """A proof that step 6 refuses is SIGNATURE_INVALID, saying it is the batch proof."""
    message = _with_proof(alice.sign_batch(_envelopes(alice, 2))[0], BAD_PROOF)
    with pytest.raises(InvalidSignatureError, match="batch proof") as caught:
        _check(message)
    assert caught.value.reason == "SIGNATURE_INVALID"


# --- binding replies --------------------------------------------------------------------


def test_batch_request_digest_covers_its_own_leaf(alice: Identity) -> None:
    """request_digest = SHA-256(value || leaf) for batch-signed requests; each is distinct."""
    signed = alice.sign_batch(_envelopes(alice, 6))
    digests = []
    for envelope in signed:
        assert envelope.signature is not None
        leaf = leaf_hash(envelope.signing_input())
        expected = hashlib.sha256(envelope.signature.value + leaf).digest()
        assert envelope.digest() == expected
        assert signature_digest(envelope.signature, envelope.signing_input()) == expected
        assert envelope.digest() != hashlib.sha256(envelope.signature.value).digest()
        digests.append(envelope.digest())
    assert len(set(digests)) == 6


def test_single_request_digest_is_unchanged(alice: Identity) -> None:
    """A singly signed request keeps request_digest = SHA-256(value)."""
    single = alice.sign_envelope(_envelopes(alice, 1)[0])
    assert single.signature is not None
    assert single.digest() == hashlib.sha256(single.signature.value).digest()


def test_reply_is_bound_to_exactly_its_batch_signed_request(alice: Identity, bob: Identity) -> None:
    """A reply verifies against its own request of the batch and is refused for a sibling."""
    requests = alice.sign_batch(_envelopes(alice, 4))
    replies = bob.sign_batch(_replies(bob, requests))
    for i, reply in enumerate(replies):
        Verifier().verify_reply(reply, requests[i])
        for j, sibling in enumerate(requests):
            if j == i:
                continue
            with pytest.raises(InvalidSignatureError, match="different request"):
                Verifier().verify_reply(reply, sibling)
            # Same id as the sibling but this request's digest: still refused.
            renamed = dataclasses.replace(requests[i], id=sibling.id)
            with pytest.raises(InvalidSignatureError):
                Verifier().verify_reply(reply, renamed)


def test_reply_bound_to_the_shared_value_only_is_refused(alice: Identity, bob: Identity) -> None:
    """A reply whose digest is SHA-256(value) alone (the single rule) matches no batch request."""
    requests = alice.sign_batch(_envelopes(alice, 3))
    assert requests[0].signature is not None
    loose = bob.sign_reply(
        dataclasses.replace(
            _replies(bob, requests)[0],
            request_digest=hashlib.sha256(requests[0].signature.value).digest(),
        )
    )
    with pytest.raises(InvalidSignatureError, match="different request"):
        Verifier().verify_reply(loose, requests[0])


def test_verify_reply_with_signature_checked_still_binds(alice: Identity, bob: Identity) -> None:
    """signature_checked skips only the signature: a sibling's request is still refused."""
    requests = alice.sign_batch(_envelopes(alice, 2))
    replies = bob.sign_batch(_replies(bob, requests))
    Verifier().verify_reply(replies[0], requests[0], signature_checked=True)
    with pytest.raises(InvalidSignatureError):
        Verifier().verify_reply(replies[0], requests[1], signature_checked=True)


# --- replay guard -------------------------------------------------------------------------


def test_exact_resend_of_a_batch_signed_envelope_is_a_duplicate(alice: Identity) -> None:
    """The same batch-signed envelope twice: fresh, then a duplicate (False), not a replay."""
    guard = ReplayGuard()
    signed = alice.sign_batch(_envelopes(alice, 3))
    assert [guard.check_and_mark(e, now=T0) for e in signed] == [True] * 3
    assert [guard.check_and_mark(e, now=T0) for e in signed] == [False] * 3
    # Re-decoded from the wire, still the same envelope.
    again = _proto.decode_envelope(_proto.envelope_to_pb(signed[1]).SerializeToString())
    assert guard.check_and_mark(again, now=T0) is False


def test_same_nonce_under_another_batch_signature_is_a_replay(alice: Identity) -> None:
    """The same envelope re-signed in another batch (new value) reuses its nonce: REPLAY."""
    guard = ReplayGuard()
    envelopes = _envelopes(alice, 3)
    first = alice.sign_batch(envelopes[:2])
    other = alice.sign_batch([envelopes[0], envelopes[2]])
    assert first[0].signature != other[0].signature
    assert guard.check_and_mark(first[0], now=T0) is True
    with pytest.raises(ReplayError):
        guard.check_and_mark(other[0], now=T0)
    with pytest.raises(ReplayError):
        guard.check_and_mark(alice.sign_envelope(envelopes[0]), now=T0)


def test_same_nonce_single_then_batch_is_a_replay(alice: Identity) -> None:
    """A nonce first seen singly signed is REPLAY when it comes back batch-signed."""
    guard = ReplayGuard()
    envelopes = _envelopes(alice, 2)
    assert guard.check_and_mark(alice.sign_envelope(envelopes[0]), now=T0) is True
    with pytest.raises(ReplayError):
        guard.check_and_mark(alice.sign_batch(envelopes)[0], now=T0)


def test_release_forgets_a_batch_signed_envelope(alice: Identity) -> None:
    """release() of a batch-signed envelope lets the very same envelope in again."""
    guard = ReplayGuard()
    signed = alice.sign_batch(_envelopes(alice, 2))
    assert guard.check_and_mark(signed[0], now=T0) is True
    guard.release(signed[1])  # another envelope's release forgets nothing
    assert guard.check_and_mark(signed[0], now=T0) is False
    guard.release(signed[0])
    assert guard.check_and_mark(signed[0], now=T0) is True


# --- protobuf and JSON ----------------------------------------------------------------------


def test_protobuf_round_trip_keeps_the_proof(alice: Identity, bob: Identity) -> None:
    """Envelopes and replies through sigwire._proto keep index, size and path, and verify."""
    requests = alice.sign_batch(_envelopes(alice, 5))
    replies = bob.sign_batch(_replies(bob, requests))
    for envelope in requests:
        back = _proto.decode_envelope(_proto.envelope_to_pb(envelope).SerializeToString())
        assert back == envelope
        assert back.signature is not None
        assert back.signature.batch == (envelope.signature.batch if envelope.signature else None)
        _check(back)
    for reply in replies:
        back_reply = _proto.decode_reply(_proto.reply_to_pb(reply).SerializeToString())
        assert back_reply == reply
        _check(back_reply)


def test_single_signature_round_trips_without_a_proof(alice: Identity) -> None:
    """A single signature decodes with batch None (field absent, not an empty proof)."""
    single = alice.sign_envelope(_envelopes(alice, 1)[0])
    msg = _proto.envelope_to_pb(single)
    assert not msg.signature.HasField("batch")
    back = _proto.decode_envelope(msg.SerializeToString())
    assert back.signature is not None
    assert back.signature.batch is None


def test_an_empty_batch_proof_on_the_wire_is_a_proof_of_size_0(alice: Identity) -> None:
    """A present but empty BatchProof decodes as a proof (size 0), and fails verification."""
    single = alice.sign_envelope(_envelopes(alice, 1)[0])
    msg = _proto.envelope_to_pb(single)
    msg.signature.batch.SetInParent()
    back = _proto.decode_envelope(msg.SerializeToString())
    assert back.signature is not None
    assert back.signature.batch == BatchProof(0, 0, ())
    with pytest.raises(InvalidSignatureError):
        _check(back)


def _long_path(message: Any, length: int) -> Any:
    proof = message.signature.batch
    return _with_proof(message, dataclasses.replace(proof, path=(b"\x00" * 32,) * length))


@pytest.mark.parametrize("length", [MAX_PATH_LENGTH + 1, 10_000])
def test_overlong_path_is_malformed_at_decode(alice: Identity, bob: Identity, length: int) -> None:
    """A Signature with more than MAX_PATH_LENGTH hashes is refused when decoded: MALFORMED."""
    envelope = _long_path(alice.sign_batch(_envelopes(alice, 2))[0], length)
    reply = _long_path(bob.sign_batch(_replies(bob, _envelopes(alice, 2)))[0], length)
    card_pb = _proto.card_to_pb(AgentCard(did=bob.did, created_at_ms=T0))
    card_pb.signature.batch.path.extend([b"\x00" * 32] * length)
    decoders: list[Callable[[], object]] = [
        lambda: _proto.decode_envelope(_proto.envelope_to_pb(envelope).SerializeToString()),
        lambda: _proto.envelope_from_pb(_proto.envelope_to_pb(envelope)),
        lambda: _proto.decode_reply(_proto.reply_to_pb(reply).SerializeToString()),
        lambda: _proto.reply_from_pb(_proto.reply_to_pb(reply)),
        lambda: _proto.decode_card(card_pb.SerializeToString()),
    ]
    for decode in decoders:
        with pytest.raises(EnvelopeError) as caught:
            decode()
        assert caught.value.reason == "MALFORMED"


def test_path_of_exactly_max_length_decodes(alice: Identity) -> None:
    """MAX_PATH_LENGTH hashes pass decoding (verification then judges them)."""
    envelope = _long_path(alice.sign_batch(_envelopes(alice, 2))[0], MAX_PATH_LENGTH)
    back = _proto.decode_envelope(_proto.envelope_to_pb(envelope).SerializeToString())
    assert back == envelope
    with pytest.raises(InvalidSignatureError):
        _check(back)


def test_json_frame_round_trip_keeps_the_proof(alice: Identity, bob: Identity) -> None:
    """A Frame of batch-signed envelopes (and one of replies) survives the JSON mapping."""
    requests = alice.sign_batch(_envelopes(alice, 3))
    replies = bob.sign_batch(_replies(bob, requests))
    pb = _proto.pb
    frames = [
        pb.Frame(
            sequence=3,
            acked=7,
            envelopes=pb.EnvelopeBatch(envelopes=[_proto.envelope_to_pb(e) for e in requests]),
        ),
        pb.Frame(
            sequence=6, replies=pb.ReplyBatch(replies=[_proto.reply_to_pb(r) for r in replies])
        ),
    ]
    for frame in frames:
        text = _proto.frame_to_json(frame.SerializeToString())
        body = json.loads(text)
        kind = "envelopes" if "envelopes" in body else "replies"
        for item in body[kind][kind]:
            proof = item["signature"]["batch"]
            assert set(proof) >= {"size", "path"}
        back = pb.Frame.FromString(_proto.frame_from_json(text))
        assert back == frame
    decoded = pb.Frame.FromString(
        _proto.frame_from_json(_proto.frame_to_json(frames[0].SerializeToString()))
    )
    assert decoded.acked == 7
    for msg, original in zip(decoded.envelopes.envelopes, requests, strict=True):
        envelope = _proto.envelope_from_pb(msg)
        assert envelope == original
        _check(envelope)
    decoded_replies = pb.Frame.FromString(
        _proto.frame_from_json(_proto.frame_to_json(frames[1].SerializeToString()))
    )
    for reply_pb, request in zip(decoded_replies.replies.replies, requests, strict=True):
        Verifier().verify_reply(_proto.reply_from_pb(reply_pb), request)
