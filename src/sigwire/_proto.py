"""The only module that imports the generated protobuf code.

Converts between sigwire's own values (:mod:`sigwire.envelope`) and the
``sigwire.v1`` protobuf messages. Everything outside this module and the
transports sees only sigwire values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

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
from sigwire.errors import EnvelopeError
from sigwire_pb.v1 import messages_pb2 as pb
from sigwire_pb.v1 import transport_pb2 as transport_pb

__all__ = [
    "add_envelope",
    "add_reply",
    "card_from_json",
    "card_from_pb",
    "card_to_json",
    "card_to_pb",
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
        EnvelopeError: The bytes are not an Envelope.
    """
    return envelope_from_pb(_parse(pb.Envelope, data))


def decode_reply(data: bytes) -> Reply:
    """Parse serialized Reply bytes.

    Raises:
        EnvelopeError: The bytes are not a Reply.
    """
    return reply_from_pb(_parse(pb.Reply, data))


def decode_card(data: bytes) -> AgentCard:
    """Parse serialized AgentCard bytes.

    Raises:
        EnvelopeError: The bytes are not an AgentCard.
    """
    return card_from_pb(_parse(pb.AgentCard, data))


def frame_from_json(text: str) -> bytes:
    """Serialized Frame bytes from protobuf's canonical JSON mapping of a Frame.

    Raises:
        EnvelopeError: Not JSON, or not a Frame.
    """
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
