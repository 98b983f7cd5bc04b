"""The only module that imports the generated protobuf code.

Converts between sigwire's own values (:mod:`sigwire.envelope`) and the
``sigwire.v1`` protobuf messages. Everything outside this module and the
transports sees only sigwire values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final, TypeVar

from google.protobuf import json_format
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError

from sigwire.batch import MAX_PATH_LENGTH, BatchProof
from sigwire.envelope import (
    MAX_METADATA_ENTRIES,
    AgentCard,
    Envelope,
    Reply,
    ReplyError,
    Signature,
)
from sigwire.errors import EnvelopeError, OverloadedError
from sigwire_pb.v1 import messages_pb2 as pb
from sigwire_pb.v1 import transport_pb2 as transport_pb

__all__ = [
    "MAX_DETAIL_ENTRIES",
    "MAX_FRAME_MESSAGES",
    "UNWALKED_SIZE",
    "add_envelope",
    "add_reply",
    "card_from_json",
    "card_from_pb",
    "card_to_json",
    "card_to_pb",
    "check_envelope",
    "check_frame",
    "check_json_frame",
    "check_reply",
    "decode_card",
    "decode_envelope",
    "decode_reply",
    "envelope_from_pb",
    "envelope_to_pb",
    "frame_from_json",
    "frame_to_json",
    "pb",
    "reply_from_pb",
    "reply_to_pb",
    "transport_pb",
]

MAX_FRAME_MESSAGES: Final = 128
"""Envelopes and replies one Frame may carry (a sigwire writer batches at most 32)."""

MAX_DETAIL_ENTRIES: Final = MAX_METADATA_ENTRIES
"""Entries an error reply's ``details`` may hold (sigwire's own replies carry a few)."""


# Per-message conversions are on every request's path: they pass only the
# fields that are set (upb charges for each keyword, empty or not) and build
# sigwire values positionally.


def _signature_from_pb(msg: pb.Signature) -> Signature:
    if not msg.HasField("batch"):
        return Signature(msg.signer, msg.algorithm, msg.value)
    batch = msg.batch
    if len(batch.path) > MAX_PATH_LENGTH:
        raise EnvelopeError(f"a batch proof has at most {MAX_PATH_LENGTH} hashes")
    proof = BatchProof(index=batch.index, size=batch.size, path=tuple(batch.path))
    return Signature(msg.signer, msg.algorithm, msg.value, proof)


def _set_signature(target: pb.Signature, signature: Signature) -> None:
    # Field by field on the message's own sub-message: cheaper than building a
    # Signature message and handing it over (which copies it).
    target.signer = signature.signer
    target.algorithm = signature.algorithm
    target.value = signature.value
    proof = signature.batch
    if proof is not None:
        target.batch.index = proof.index
        target.batch.size = proof.size
        target.batch.path.extend(proof.path)


def envelope_to_pb(envelope: Envelope) -> pb.Envelope:
    """The protobuf form of ``envelope``."""
    return _build_envelope(pb.Envelope, envelope)


def add_envelope(
    container: RepeatedCompositeFieldContainer[pb.Envelope], envelope: Envelope
) -> None:
    """Append ``envelope`` to a repeated Envelope field, built in place.

    (Passing a built message to a constructor or ``append`` copies it.)
    """
    _build_envelope(container.add, envelope)


def _build_envelope(make: Callable[..., pb.Envelope], envelope: Envelope) -> pb.Envelope:
    msg = make(
        id=envelope.id,
        kind=envelope.kind,
        sender=envelope.sender,
        payload=envelope.payload,
        created_at_ms=envelope.created_at_ms,
        nonce=envelope.nonce,
    )
    if envelope.signature is not None:
        _set_signature(msg.signature, envelope.signature)
    if envelope.recipient:
        msg.recipient = envelope.recipient
    if envelope.context_id:
        msg.context_id = envelope.context_id
    if envelope.task_id:
        msg.task_id = envelope.task_id
    if envelope.role:
        msg.role = envelope.role
    if envelope.content_type:
        msg.content_type = envelope.content_type
    if envelope.metadata:
        msg.metadata.update(envelope.metadata)
    return msg


def envelope_from_pb(msg: pb.Envelope) -> Envelope:
    """The sigwire value of a protobuf Envelope (not yet validated or verified).

    Raises:
        EnvelopeError: More metadata entries than any valid envelope has
            (checked before building them, which is the expensive part).
    """
    metadata = msg.metadata
    if metadata:
        if len(metadata) > MAX_METADATA_ENTRIES:
            raise EnvelopeError(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
        entries = dict(metadata)
    else:
        entries = {}
    return Envelope(
        msg.id,
        msg.kind,
        msg.sender,
        msg.payload,
        msg.recipient,
        msg.context_id,
        msg.task_id,
        msg.role,
        msg.content_type,
        entries,
        msg.created_at_ms,
        msg.nonce,
        _signature_from_pb(msg.signature) if msg.HasField("signature") else None,
    )


def reply_to_pb(reply: Reply) -> pb.Reply:
    """The protobuf form of ``reply``."""
    return _build_reply(pb.Reply, reply)


def add_reply(container: RepeatedCompositeFieldContainer[pb.Reply], reply: Reply) -> None:
    """Append ``reply`` to a repeated Reply field, built in place."""
    _build_reply(container.add, reply)


def _build_reply(make: Callable[..., pb.Reply], reply: Reply) -> pb.Reply:
    msg = make(
        request_id=reply.request_id,
        success=reply.success,
        data=reply.data,
        responder=reply.responder,
        created_at_ms=reply.created_at_ms,
        final=reply.final,
        request_digest=reply.request_digest,
    )
    if reply.content_type:
        msg.content_type = reply.content_type
    if reply.sequence:
        msg.sequence = reply.sequence
    if reply.error is not None:
        msg.error.reason = reply.error.reason
        msg.error.message = reply.error.message
        msg.error.details.update(reply.error.details)
    if reply.signature is not None:
        _set_signature(msg.signature, reply.signature)
    return msg


def reply_from_pb(msg: pb.Reply) -> Reply:
    """The sigwire value of a protobuf Reply (not yet verified)."""
    error = None
    if msg.HasField("error"):
        error = ReplyError(
            reason=msg.error.reason, message=msg.error.message, details=dict(msg.error.details)
        )
    return Reply(
        msg.request_id,
        msg.request_digest,
        msg.responder,
        msg.success,
        msg.data,
        msg.content_type,
        error,
        msg.created_at_ms,
        msg.sequence,
        msg.final,
        _signature_from_pb(msg.signature) if msg.HasField("signature") else None,
    )


def card_to_pb(card: AgentCard) -> pb.AgentCard:
    """The protobuf form of ``card``."""
    msg = pb.AgentCard(
        did=card.did,
        name=card.name,
        endpoints=card.endpoints,
        kinds=card.kinds,
        max_message_size=card.max_message_size,
        protocol_version=card.protocol_version,
        created_at_ms=card.created_at_ms,
    )
    if card.signature is not None:
        _set_signature(msg.signature, card.signature)
    return msg


def card_from_pb(msg: pb.AgentCard) -> AgentCard:
    """The sigwire value of a protobuf AgentCard (not yet verified)."""
    return AgentCard(
        did=msg.did,
        name=msg.name,
        endpoints=tuple(msg.endpoints),
        kinds=tuple(msg.kinds),
        max_message_size=msg.max_message_size,
        protocol_version=msg.protocol_version,
        created_at_ms=msg.created_at_ms,
        signature=_signature_from_pb(msg.signature) if msg.HasField("signature") else None,
    )


# -- bounds read from the wire, before anything is parsed ----------------------
#
# upb builds every message of a serialized input at once: a Frame of 8 MB holding
# millions of empty envelopes (two bytes each) costs about 1 GB and a second or
# more before any count could be checked on the parsed result. The walk below
# reads only tags and lengths, never builds a message, and stops at the first
# repeated field past its limit, so a parse that follows builds at most what the
# limits allow. Its own work is bounded too: it reads at most a budget of fields
# (a valid message's fields, its repeated entries at their limits, and room for
# fields a newer writer adds), so millions of repeated scalar fields, which upb
# parses in place, cannot hold it either. It refuses what protobuf's parser would
# also refuse (truncated or overlong varints, lengths beyond the end, field
# number 0, wire types 6 and 7) and groups (deprecated, never in a sigwire
# message), so the parse that follows never has to undo work.

UNWALKED_SIZE: Final = 64 * 1024
"""Serialized messages up to this size are parsed without a walk first.

Every field or entry takes at least two bytes, so parsing one builds at most
32,768 messages or entries (~7 MB and ~13 ms at worst, freed at once); the
parsed message's counts are checked then. A frame of a sigwire writer's batch
of small messages is this small, and a walk in Python would cost it more than
the rest of its decoding.
"""

_FIELDS_PER_MESSAGE: Final = MAX_METADATA_ENTRIES + MAX_PATH_LENGTH + 64
"""Fields (repeated entries included) one envelope or reply may hold, for the walk's budget."""

# Keys (field number << 3 | 2) of the length-delimited fields the walk follows.
_FRAME_ENVELOPES: Final = 2 << 3 | 2
_FRAME_REPLIES: Final = 3 << 3 | 2
_BATCH_ENTRY: Final = 1 << 3 | 2
_ENVELOPE_METADATA: Final = 10 << 3 | 2
_ENVELOPE_SIGNATURE: Final = 15 << 3 | 2
_REPLY_ERROR: Final = 5 << 3 | 2
_REPLY_SIGNATURE: Final = 15 << 3 | 2
_SIGNATURE_BATCH: Final = 4 << 3 | 2
_BATCH_PATH: Final = 3 << 3 | 2
_ERROR_DETAILS: Final = 3 << 3 | 2


class _Walk:
    """One bounded walk over serialized bytes: fields are read, never parsed."""

    __slots__ = ("data", "left", "what")

    def __init__(self, data: bytes, fields: int, what: str) -> None:
        self.data = data
        self.left = fields
        self.what = what

    def field(self, pos: int, end: int) -> tuple[int, int, int]:
        """The field at ``pos``: (key, start of its value, end of the field).

        For a length-delimited field (wire type 2) the value starts after its
        length; for the others the start is the end.
        """
        self.left -= 1
        if self.left < 0:
            raise EnvelopeError(f"{self.what} of more fields than any valid one")
        data = self.data
        # Keys and lengths below 128 are one byte: the common case, inline.
        key = data[pos]
        pos += 1
        if key >= 0x80:
            key, pos = self.varint(pos - 1, end)
        wire = key & 7
        if key < 8 or wire > 5 or wire in (3, 4):
            raise EnvelopeError(f"undecodable {self.what}")
        if wire == 2:
            if pos >= end:
                raise EnvelopeError(f"undecodable {self.what}")
            length = data[pos]
            pos += 1
            if length >= 0x80:
                length, pos = self.varint(pos - 1, end)
            stop = pos + length
        elif wire == 0:
            _, stop = self.varint(pos, end)
        else:
            stop = pos + (8 if wire == 1 else 4)
        if stop > end:
            raise EnvelopeError(f"undecodable {self.what}")
        return key, pos, stop

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        data = self.data
        value = shift = 0
        while pos < end and shift < 64:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7
        raise EnvelopeError(f"undecodable {self.what}")

    def count(self, pos: int, end: int, key: int, found: int, limit: int, error: str) -> int:
        """``found`` plus the occurrences of field ``key`` in [pos, end), at most ``limit``."""
        while pos < end:
            field, _, pos = self.field(pos, end)
            if field == key:
                found += 1
                if found > limit:
                    raise EnvelopeError(error)
        return found

    def signature(self, pos: int, end: int) -> None:
        # A message field met twice is merged by the parser: the entries of
        # every occurrence add up.
        hashes = 0
        while pos < end:
            key, start, pos = self.field(pos, end)
            if key == _SIGNATURE_BATCH:
                hashes = self.count(
                    start,
                    pos,
                    _BATCH_PATH,
                    hashes,
                    MAX_PATH_LENGTH,
                    f"a batch proof has at most {MAX_PATH_LENGTH} hashes",
                )

    def envelope(self, pos: int, end: int) -> None:
        entries = 0
        while pos < end:
            key, start, pos = self.field(pos, end)
            if key == _ENVELOPE_METADATA:
                entries += 1
                if entries > MAX_METADATA_ENTRIES:
                    raise EnvelopeError(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
            elif key == _ENVELOPE_SIGNATURE:
                self.signature(start, pos)

    def reply(self, pos: int, end: int) -> None:
        details = 0
        while pos < end:
            key, start, pos = self.field(pos, end)
            if key == _REPLY_ERROR:
                details = self.count(
                    start,
                    pos,
                    _ERROR_DETAILS,
                    details,
                    MAX_DETAIL_ENTRIES,
                    f"error details have more than {MAX_DETAIL_ENTRIES} entries",
                )
            elif key == _REPLY_SIGNATURE:
                self.signature(start, pos)


def check_frame(data: bytes, max_messages: int) -> None:
    """Check, without parsing it, that a serialized Frame stays within its limits.

    A Frame's envelopes and replies together (a batch met twice adds up, as
    the parser merges it) are at most ``max_messages``; each envelope's
    metadata, each reply's error details and each batch proof are within
    theirs, and the Frame has no more fields than that many valid messages.

    Frames of at most :data:`UNWALKED_SIZE` bytes are not walked: their
    counts are checked once parsed.

    Raises:
        OverloadedError: More than ``max_messages`` messages.
        EnvelopeError: Not a Frame, or past one of its other limits.
    """
    if len(data) <= UNWALKED_SIZE:
        return
    walk = _Walk(data, (max_messages + 1) * _FIELDS_PER_MESSAGE, "frame")
    field = walk.field
    end = len(data)
    pos = messages = 0
    while pos < end:
        key, start, pos = field(pos, end)
        if key == _FRAME_ENVELOPES:
            check = walk.envelope
        elif key == _FRAME_REPLIES:
            check = walk.reply
        else:
            continue
        while start < pos:
            entry, first, start = field(start, pos)
            if entry != _BATCH_ENTRY:
                continue
            messages += 1
            if messages > max_messages:
                raise OverloadedError(
                    f"a frame of more than {max_messages} messages (a sigwire writer batches fewer)"
                )
            check(first, start)


def check_envelope(data: bytes) -> None:
    """Check, without parsing it, that a serialized Envelope stays within its limits.

    Raises:
        EnvelopeError: Not an Envelope, or past a limit of its own.
    """
    if len(data) <= UNWALKED_SIZE:
        return
    _Walk(data, _FIELDS_PER_MESSAGE, "Envelope").envelope(0, len(data))


def check_reply(data: bytes) -> None:
    """Check, without parsing it, that a serialized Reply stays within its limits.

    Raises:
        EnvelopeError: Not a Reply, or past a limit of its own.
    """
    if len(data) <= UNWALKED_SIZE:
        return
    _Walk(data, _FIELDS_PER_MESSAGE, "Reply").reply(0, len(data))


_M = TypeVar("_M", pb.Envelope, pb.Reply, pb.AgentCard)


def _parse(cls: type[_M], data: bytes) -> _M:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        # ValueError: invalid UTF-8 in a string field on some runtimes.
        raise EnvelopeError(f"undecodable {cls.__name__}: {exc}") from None
    return msg


def decode_envelope(data: bytes) -> Envelope:
    """Parse serialized Envelope bytes.

    Raises:
        EnvelopeError: The bytes are not an Envelope, or one past its limits.
    """
    check_envelope(data)
    return envelope_from_pb(_parse(pb.Envelope, data))


def decode_reply(data: bytes) -> Reply:
    """Parse serialized Reply bytes.

    Raises:
        EnvelopeError: The bytes are not a Reply, or one past its limits.
    """
    check_reply(data)
    return reply_from_pb(_parse(pb.Reply, data))


def decode_card(data: bytes) -> AgentCard:
    """Parse serialized AgentCard bytes.

    Raises:
        EnvelopeError: The bytes are not an AgentCard.
    """
    return card_from_pb(_parse(pb.AgentCard, data))


# JSON values (objects, arrays, and members counted by their separators) one
# message of a JSON Frame may hold: its fields and nested messages, its metadata
# or error details, its batch proof, and room for commas inside its strings.
_JSON_VALUES_PER_MESSAGE: Final = MAX_METADATA_ENTRIES + MAX_PATH_LENGTH + 64
_JSON_VALUES_PER_FRAME: Final = 64


def check_json_frame(text: str, max_messages: int = MAX_FRAME_MESSAGES) -> None:
    """Check, without parsing it, that a JSON Frame cannot build more values than its limits.

    ``json.loads`` builds every value of its input at once (a megabyte of
    ``{},`` is 300,000 dicts and seconds of CPU). Every value but the first of
    an object or array follows a comma, so commas, braces and brackets outside
    strings bound the values a parse builds, and each string is a value of
    its own. A C-speed count over the whole text settles almost every frame;
    only a frame whose strings hold many commas or braces (a metadata value,
    an error message) needs the second pass, which skips its strings.

    Raises:
        EnvelopeError: More values than ``max_messages`` messages may hold
            (more than a Frame of that many messages within their own limits).
    """
    budget = max_messages * _JSON_VALUES_PER_MESSAGE + _JSON_VALUES_PER_FRAME
    values = text.count(",")
    if values <= budget:
        values += text.count("{") + text.count("[")
    if values > budget and _values_outside_strings(text, budget) > budget:
        raise EnvelopeError(
            f"a JSON frame of more than {budget} values (at most {max_messages} messages)"
        )


def _values_outside_strings(text: str, budget: int) -> int:
    # A string is a value (or a member's name) of its own, two quotes each: a
    # text with more quotes than twice the budget's strings builds too much
    # whatever is between them, and is never split. Otherwise the pieces
    # between quotes alternate outside, inside, outside...; a quote after an
    # odd run of backslashes is escaped and keeps the string open.
    quotes = text.count('"')
    if quotes > 4 * budget:
        return quotes // 2
    values = 0
    inside = False
    for piece in text.split('"'):
        if inside:
            escapes = len(piece) - len(piece.rstrip("\\"))
            inside = escapes % 2 == 1
        else:
            values += piece.count(",") + piece.count("{") + piece.count("[")
            inside = True
    return values


def frame_from_json(text: str) -> bytes:
    """Serialized Frame bytes from protobuf's canonical JSON mapping of a Frame.

    Raises:
        EnvelopeError: Not JSON, not a Frame, or more JSON values than a
            Frame within its limits holds.
    """
    check_json_frame(text)
    frame = pb.Frame()
    try:
        json_format.ParseDict(_json_object(text), frame)
    # SystemError: upb's JSON parser fails that way on a field name holding an
    # unpaired surrogate (found by tests/hostile/test_decode_fuzz.py).
    except (json_format.ParseError, ValueError, RecursionError, SystemError) as exc:
        raise EnvelopeError(f"invalid JSON frame: {exc}") from None
    return frame.SerializeToString()


def _json_object(text: str | bytes) -> dict[str, object]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, not {type(value).__name__}")
    return value


def frame_to_json(data: bytes) -> str:
    """The canonical JSON mapping of serialized Frame bytes.

    Raises:
        EnvelopeError: The bytes are not a Frame.
    """
    frame = pb.Frame()
    try:
        frame.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise EnvelopeError(f"undecodable Frame: {exc}") from None
    return json_format.MessageToJson(frame, indent=None)


def card_to_json(card: AgentCard) -> str:
    """The canonical JSON mapping of an AgentCard (bytes as base64)."""
    return json_format.MessageToJson(card_to_pb(card), indent=2)


def card_from_json(text: str | bytes) -> AgentCard:
    """Parse the JSON mapping of an AgentCard (not yet verified).

    Raises:
        EnvelopeError: Not an AgentCard in JSON.
    """
    msg = pb.AgentCard()
    try:
        json_format.ParseDict(_json_object(text), msg)
    # SystemError: upb's JSON parser fails that way on a field name holding an
    # unpaired surrogate (found by tests/hostile/test_decode_fuzz.py).
    except (json_format.ParseError, ValueError, RecursionError, SystemError) as exc:
        raise EnvelopeError(f"invalid agent card JSON: {exc}") from None
    return card_from_pb(msg)
