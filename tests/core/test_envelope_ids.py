"""Envelope.new draws RFC 4122 version 4 ids and fresh nonces."""

from __future__ import annotations

import uuid

from sigwire.envelope import MIN_NONCE_LENGTH, Envelope


def test_ids_are_random_version_4_uuids_in_canonical_form() -> None:
    """Every id parses as a version 4, RFC 4122 variant UUID and prints back the same."""
    ids = [Envelope.new("k", sender="did:key:z").id for _ in range(2000)]
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    assert len(set(ids)) == len(ids)
    # Every hex digit outside the fixed version and variant bits varies.
    for position in range(36):
        if position in (8, 13, 14, 18, 23):  # dashes and the version digit
            continue
        assert len({text[position] for text in ids}) > 1, position


def test_nonces_are_fresh_and_independent_of_the_id() -> None:
    """Each envelope gets its own nonce of the minimum length, not a copy of id bytes."""
    envelopes = [Envelope.new("k", sender="did:key:z") for _ in range(500)]
    nonces = [e.nonce for e in envelopes]
    assert all(len(n) == MIN_NONCE_LENGTH for n in nonces)
    assert len(set(nonces)) == len(nonces)
    assert all(e.nonce.hex() not in e.id.replace("-", "") for e in envelopes)
