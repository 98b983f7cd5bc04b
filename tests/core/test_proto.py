"""Conversion between sigwire values and protobuf messages, and decoding hostile bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigwire._proto import (
    MAX_DETAIL_ENTRIES,
    MAX_FRAME_MESSAGES,
    UNWALKED_SIZE,
    card_from_pb,
    card_to_pb,
    check_envelope,
    check_frame,
    check_json_frame,
    check_reply,
    decode_card,
    decode_envelope,
    decode_reply,
    envelope_from_pb,
    envelope_to_pb,
    frame_from_json,
    frame_to_json,
    pb,
    reply_from_pb,
    reply_to_pb,
)
from sigwire.batch import MAX_PATH_LENGTH
from sigwire.envelope import MAX_METADATA_ENTRIES, AgentCard, Envelope, Reply, ReplyError
from sigwire.errors import EnvelopeError, OverloadedError
from sigwire.signing import Identity, Verifier
from tests.wire import varint

from .conftest import T0

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "envelope": decode_envelope,
    "reply": decode_reply,
    "card": decode_card,
}


@pytest.fixture
def full_envelope(alice: Identity, bob: Identity) -> Envelope:
    """A signed envelope with every field set to a non-default value."""
    return alice.sign_envelope(
        Envelope(
            id="env-\u00fc",
            kind="task.create",
            sender=alice.did,
            payload=bytes(range(256)),
            recipient=bob.did,
            context_id="ctx",
            task_id="task",
            role="user",
            content_type="application/json",
            metadata={"\u00e9": "nfc", "e\u0301": "nfd", "": "", "\U0001f600": "\u202e"},
            created_at_ms=T0,
            nonce=bytes(range(24)),
        )
    )


@pytest.fixture
def full_reply(bob: Identity, full_envelope: Envelope) -> Reply:
    """A signed error reply with every field set to a non-default value."""
    return bob.sign_reply(
        Reply(
            request_id=full_envelope.id,
            request_digest=full_envelope.digest(),
            responder=bob.did,
            success=False,
            data=b"\x00\x01partial",
            content_type="text/plain",
            error=ReplyError(reason="KIND_UNKNOWN", message="no handler", details={"k": "v"}),
            created_at_ms=T0 + 1,
            sequence=2**64 - 1,
            final=False,
        )
    )


@pytest.fixture
def full_card(bob: Identity) -> AgentCard:
    """A signed card with every field set to a non-default value."""
    return bob.sign_card(
        AgentCard(
            did=bob.did,
            name="b\u00f6b",
            endpoints=("grpc://127.0.0.1:50051", "ws://127.0.0.1:8765/sigwire/v1"),
            kinds=("echo", "count"),
            max_message_size=4 * 1024 * 1024,
            protocol_version="sigwire/1",
            created_at_ms=T0,
        )
    )


def test_envelope_round_trip(full_envelope: Envelope) -> None:
    """An envelope survives to protobuf, bytes and back with every field and a valid signature."""
    data = envelope_to_pb(full_envelope).SerializeToString()
    again = decode_envelope(data)
    assert again == full_envelope
    assert envelope_from_pb(envelope_to_pb(full_envelope)) == full_envelope
    again.validate()
    Verifier().verify_envelope(again)


def test_unsigned_envelope_round_trip(full_envelope: Envelope) -> None:
    """An unsigned envelope decodes with signature None, not an empty signature."""
    unsigned = Envelope(id="1", kind="k", sender=full_envelope.sender, nonce=bytes(16))
    again = decode_envelope(envelope_to_pb(unsigned).SerializeToString())
    assert again == unsigned
    assert again.signature is None


def test_envelope_protobuf_fields(full_envelope: Envelope) -> None:
    """envelope_to_pb puts each value in the protobuf field of the same name."""
    msg = envelope_to_pb(full_envelope)
    assert isinstance(msg, pb.Envelope)
    assert msg.sender == full_envelope.sender
    assert msg.payload == full_envelope.payload
    assert dict(msg.metadata) == dict(full_envelope.metadata)
    assert msg.nonce == full_envelope.nonce
    assert full_envelope.signature is not None
    assert msg.signature.value == full_envelope.signature.value


def test_reply_round_trip(full_reply: Reply, full_envelope: Envelope) -> None:
    """A reply survives to protobuf, bytes and back with every field and a valid signature."""
    again = decode_reply(reply_to_pb(full_reply).SerializeToString())
    assert again == full_reply
    assert reply_from_pb(reply_to_pb(full_reply)) == full_reply
    Verifier().verify_reply(again, full_envelope)


def test_success_reply_round_trip(bob: Identity, full_envelope: Envelope) -> None:
    """A successful reply without error decodes with error None and success True."""
    ok = bob.sign_reply(
        Reply(
            request_id=full_envelope.id,
            request_digest=full_envelope.digest(),
            responder=bob.did,
            data=b"done",
        )
    )
    again = decode_reply(reply_to_pb(ok).SerializeToString())
    assert again == ok
    assert again.error is None
    assert again.success is True
    Verifier().verify_reply(again, full_envelope)


def test_card_round_trip(full_card: AgentCard) -> None:
    """A card survives to protobuf, bytes and back with every field and a valid signature."""
    again = decode_card(card_to_pb(full_card).SerializeToString())
    assert again == full_card
    assert card_from_pb(card_to_pb(full_card)) == full_card
    Verifier().verify_card(again)


@pytest.mark.parametrize("decode", DECODERS.values(), ids=DECODERS.keys())
def test_empty_bytes_decode_to_defaults(decode: Callable[[bytes], Any]) -> None:
    """Empty bytes are a valid, empty message (validation and verification refuse it later)."""
    value = decode(b"")
    assert value.signature is None


def test_empty_envelope_fails_validation() -> None:
    """An envelope decoded from empty bytes fails validate() with EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode_envelope(b"").validate()


GARBAGE = {
    "truncated varint": b"\x08",
    "truncated length": b"\x0a\x05abc",
    "all ones": b"\xff" * 16,
    "invalid wire type": b"\x0f\x00",
    "field number zero": b"\x00\x00",
    "overlong varint": b"\x08" + b"\xff" * 11,
    "length beyond end": b"\x42\xff\xff\xff\xff\x0f",
    "json": b'{"id": "x"}',
    "group start without end": b"\x0b",
}


@pytest.mark.parametrize("decode", DECODERS.values(), ids=DECODERS.keys())
@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_raises_envelope_error(decode: Callable[[bytes], Any], data: bytes) -> None:
    """Bytes that are not a protobuf message raise EnvelopeError."""
    with pytest.raises(EnvelopeError, match="undecodable"):
        decode(data)


@pytest.mark.parametrize("decode", DECODERS.values(), ids=DECODERS.keys())
def test_truncated_message_raises_envelope_error(
    decode: Callable[[bytes], Any], full_envelope: Envelope
) -> None:
    """A valid serialized envelope cut short raises EnvelopeError for every decoder."""
    data = envelope_to_pb(full_envelope).SerializeToString()
    with pytest.raises(EnvelopeError):
        decode(data[:-1])


# Field 1 is a string in Envelope (id), Reply (request_id) and AgentCard (did).
BAD_UTF8_STRING_FIELD_1 = b"\x0a\x02\xff\xfe"


@pytest.mark.parametrize("decode", DECODERS.values(), ids=DECODERS.keys())
def test_invalid_utf8_in_string_field(decode: Callable[[bytes], Any]) -> None:
    """Invalid UTF-8 in a string field raises EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode(BAD_UTF8_STRING_FIELD_1)


def test_invalid_utf8_in_nested_string_fields() -> None:
    """Invalid UTF-8 in a metadata key, metadata value or signature signer raises EnvelopeError."""
    bad_key = b"\x52\x06" + b"\x0a\x02\xff\xfe\x12\x00"  # metadata entry {b"\xff\xfe": ""}
    bad_value = b"\x52\x06" + b"\x0a\x00\x12\x02\xc3\x28"  # metadata entry {"": b"\xc3\x28"}
    bad_signer = b"\x7a\x04" + b"\x0a\x02\xed\xa0"  # signature.signer, a UTF-16 surrogate
    for data in (bad_key, bad_value, bad_signer):
        with pytest.raises(EnvelopeError):
            decode_envelope(data)


def test_invalid_utf8_in_reply_error() -> None:
    """Invalid UTF-8 in a reply's error reason raises EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode_reply(b"\x2a\x04" + b"\x0a\x02\xff\xfe")


def test_unknown_fields_are_ignored(full_envelope: Envelope) -> None:
    """Unknown fields from a newer peer are skipped and the signature still verifies."""
    data = envelope_to_pb(full_envelope).SerializeToString() + b"\xa0\x06\x01"  # field 100 = 1
    again = decode_envelope(data)
    assert again == full_envelope
    Verifier().verify_envelope(again)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_decode_or_raise_envelope_error(data: bytes) -> None:
    """Random bytes either decode or raise EnvelopeError, for every decoder."""
    for decode in DECODERS.values():
        try:
            decode(data)
        except EnvelopeError:
            pass


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_corrupted_envelope_decodes_or_raises_envelope_error(position: int, value: int) -> None:
    """A serialized envelope with one byte replaced decodes or raises EnvelopeError."""
    alice = Identity.from_seed(bytes(range(32)))
    envelope = alice.sign_envelope(
        Envelope(
            id="e",
            kind="k",
            sender=alice.did,
            metadata={"a": "b"},
            created_at_ms=T0,
            nonce=bytes(16),
        )
    )
    data = bytearray(envelope_to_pb(envelope).SerializeToString())
    data[position % len(data)] = value
    for decode in DECODERS.values():
        try:
            decode(bytes(data))
        except EnvelopeError:
            pass


def test_metadata_flood_is_refused_before_it_is_built() -> None:
    """A decoded Envelope with more metadata entries than allowed is an EnvelopeError."""
    from sigwire._proto import decode_envelope, pb
    from sigwire.envelope import MAX_METADATA_ENTRIES

    flood = pb.Envelope(id="x", metadata={f"k{i}": "" for i in range(MAX_METADATA_ENTRIES + 1)})
    with pytest.raises(EnvelopeError, match="metadata"):
        decode_envelope(flood.SerializeToString())


# -- limits read from the wire before parsing -----------------------------------


def _padded(frame: pb.Frame) -> bytes:
    # Past UNWALKED_SIZE with an unknown field, so that the walk runs.
    data = frame.SerializeToString()
    padding = max(0, UNWALKED_SIZE + 1 - len(data))
    return data + b"\xa2\x06" + varint(padding) + b"\x00" * padding


def _envelopes(alice: Identity, count: int, metadata: int) -> list[Envelope]:
    unsigned = [
        Envelope(
            id=f"e{i}",
            kind="echo",
            sender=alice.did,
            payload=b"p" * 1024,
            metadata={f"k{j}": "v" for j in range(metadata)},
            created_at_ms=T0,
            nonce=bytes(16),
        )
        for i in range(count)
    ]
    return alice.sign_batch(unsigned)


def test_a_frame_at_every_limit_passes_the_wire_check(alice: Identity, bob: Identity) -> None:
    """A frame of MAX_FRAME_MESSAGES batch-signed envelopes with full metadata is not refused."""
    envelopes = _envelopes(alice, MAX_FRAME_MESSAGES, MAX_METADATA_ENTRIES)
    frame = pb.Frame(
        sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[envelope_to_pb(e) for e in envelopes])
    )
    data = frame.SerializeToString()
    assert len(data) > UNWALKED_SIZE
    check_frame(data, MAX_FRAME_MESSAGES)
    check_envelope(envelope_to_pb(envelopes[0]).SerializeToString())
    replies = bob.sign_batch(
        [
            Reply(
                request_id=e.id,
                request_digest=e.digest(),
                responder=bob.did,
                data=b"d" * 1024,
                error=ReplyError("R", "m", {f"k{j}": "v" for j in range(MAX_DETAIL_ENTRIES)}),
                created_at_ms=T0,
            )
            for e in envelopes
        ]
    )
    frame = pb.Frame(sequence=2, replies=pb.ReplyBatch(replies=[reply_to_pb(r) for r in replies]))
    check_frame(_padded(frame), MAX_FRAME_MESSAGES)
    check_reply(reply_to_pb(replies[0]).SerializeToString() + b"\xa2\x06\x03abc")


def test_each_limit_is_read_from_the_wire(alice: Identity) -> None:
    """One entry past any limit refuses a large frame without parsing it."""
    empty = pb.Envelope()
    over = pb.Frame(envelopes=pb.EnvelopeBatch(envelopes=[empty] * (MAX_FRAME_MESSAGES + 1)))
    with pytest.raises(OverloadedError, match="more than 128 messages"):
        check_frame(_padded(over), MAX_FRAME_MESSAGES)
    # A batch met twice is merged by the parser: its entries add up.
    half = pb.Frame(envelopes=pb.EnvelopeBatch(envelopes=[empty] * 65)).SerializeToString()
    with pytest.raises(OverloadedError):
        check_frame(
            half + _padded(pb.Frame(envelopes=pb.EnvelopeBatch(envelopes=[empty] * 64))), 128
        )
    metadata = pb.Envelope(metadata={f"k{i}": "" for i in range(MAX_METADATA_ENTRIES + 1)})
    with pytest.raises(EnvelopeError, match="metadata"):
        check_frame(_padded(pb.Frame(envelopes=pb.EnvelopeBatch(envelopes=[metadata]))), 128)
    path = pb.Envelope(
        signature=pb.Signature(batch=pb.BatchProof(path=[b""] * (MAX_PATH_LENGTH + 1)))
    )
    with pytest.raises(EnvelopeError, match="batch proof"):
        check_frame(_padded(pb.Frame(envelopes=pb.EnvelopeBatch(envelopes=[path]))), 128)
    details = pb.Reply(error=pb.Error(details={f"k{i}": "" for i in range(MAX_DETAIL_ENTRIES + 1)}))
    with pytest.raises(EnvelopeError, match="details"):
        check_frame(_padded(pb.Frame(replies=pb.ReplyBatch(replies=[details]))), 128)
    # Millions of scalar fields build nothing, but would hold a walk: it has a budget.
    with pytest.raises(EnvelopeError, match="more fields"):
        check_frame(b"\x08\x01" * 1_000_000, 128)
    with pytest.raises(EnvelopeError, match="more fields"):
        check_envelope(b"\x0a\x00" * 100_000)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_the_wire_check_refuses_only_with_sigwire_errors(data: bytes) -> None:
    """Any bytes past UNWALKED_SIZE pass the wire check or raise EnvelopeError/OverloadedError."""
    try:
        check_frame(data + b"\xa2\x06" + varint(UNWALKED_SIZE) + bytes(UNWALKED_SIZE), 128)
    except (EnvelopeError, OverloadedError):
        pass
    try:
        check_frame(bytes(UNWALKED_SIZE) + data, 128)
    except (EnvelopeError, OverloadedError):
        pass


def test_a_json_frame_at_every_limit_converts(alice: Identity) -> None:
    """The JSON form of a frame at every limit passes the value count and converts back."""
    envelopes = _envelopes(alice, MAX_FRAME_MESSAGES, MAX_METADATA_ENTRIES)
    frame = pb.Frame(
        sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[envelope_to_pb(e) for e in envelopes])
    )
    data = frame.SerializeToString()
    assert pb.Frame.FromString(frame_from_json(frame_to_json(data))) == frame


def test_a_json_frame_of_too_many_values_is_refused_before_parsing() -> None:
    """A JSON frame with more values than any frame within its limits is MALFORMED, unparsed."""
    text = '{"envelopes": {"envelopes": [' + ",".join(["{}"] * 50_000) + "]}}"
    with pytest.raises(EnvelopeError, match="JSON frame of more than"):
        check_json_frame(text)
    with pytest.raises(EnvelopeError, match="JSON frame of more than"):
        frame_from_json("[" * 50_000)


@pytest.mark.parametrize("text", [",", "{[,", '\\",{[', "a,b\\\\"])
def test_a_json_frame_whose_strings_hold_separators_converts_as_its_binary_form_does(
    alice: Identity, text: str
) -> None:
    """Commas, braces and escaped quotes inside strings are not values: such a frame converts."""
    value = text * (50_000 // len(text))
    [envelope] = alice.sign_batch(
        [
            Envelope(
                id="e1",
                kind="echo",
                sender=alice.did,
                metadata={"note": value},
                created_at_ms=T0,
                nonce=bytes(16),
            )
        ]
    )
    frame = pb.Frame(sequence=1, envelopes=pb.EnvelopeBatch(envelopes=[envelope_to_pb(envelope)]))
    data = frame.SerializeToString()
    check_frame(data, MAX_FRAME_MESSAGES)
    assert pb.Frame.FromString(frame_from_json(frame_to_json(data))) == frame


@pytest.mark.parametrize(
    "text",
    [
        "[" + '"",' * 200_000 + '""]',  # strings are values too
        '["a\\"b",' + ",".join(["{}"] * 50_000) + "]",  # an escaped quote does not end a string
        '["x",' + ",".join(["{}"] * 50_000) + "]",  # values between strings still count
    ],
)
def test_a_json_frame_of_too_many_values_outside_its_strings_is_refused(text: str) -> None:
    """Values outside strings, or strings themselves, past the budget are MALFORMED, unparsed."""
    with pytest.raises(EnvelopeError, match="JSON frame of more than"):
        check_json_frame(text)
