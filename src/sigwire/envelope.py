"""Envelope, Reply and AgentCard values, and their canonical signing inputs.

No I/O. The signing input of each message is a documented byte string
(``docs/signing.md``) that any language can rebuild from the message's fields;
it never depends on protobuf encoding.

Encoding primitives, all big-endian:

* ``str(s)``   u32 length of the UTF-8 bytes, then the bytes
* ``bytes(b)`` u32 length, then the bytes
* ``u64(n)`` / ``i64(n)``  8 bytes, unsigned / two's complement
* ``bool(b)``  one byte, 0x00 or 0x01
* ``map(m)``   u32 entry count, then ``str(k) str(v)`` per entry, sorted by the
  UTF-8 bytes of the key
* ``list(xs)`` u32 item count, then ``str(x)`` per item, in order
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Self

from sigwire.batch import BatchProof, leaf_hash
from sigwire.errors import EnvelopeError

__all__ = [
    "CARD_DOMAIN",
    "ED25519",
    "ENVELOPE_DOMAIN",
    "PROTOCOL_VERSION",
    "REPLY_DOMAIN",
    "AgentCard",
    "Envelope",
    "Message",
    "Reply",
    "ReplyError",
    "Signature",
    "now_ms",
    "signature_digest",
]

ED25519 = "Ed25519"
PROTOCOL_VERSION = "sigwire/1"
ENVELOPE_DOMAIN = "sigwire/v1/envelope"
REPLY_DOMAIN = "sigwire/v1/reply"
CARD_DOMAIN = "sigwire/v1/agent-card"

MAX_ID_LENGTH = 256
MIN_NONCE_LENGTH = 16
MAX_NONCE_LENGTH = 64
MAX_FIELD_LENGTH = 1024
MAX_METADATA_ENTRIES = 256
MAX_METADATA_BYTES = 64 * 1024

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_EMPTY_SHA256 = hashlib.sha256(b"").digest()


def now_ms() -> int:
    """Milliseconds since the Unix epoch, the unit of every sigwire timestamp."""
    return time.time_ns() // 1_000_000


def _bytes(parts: list[bytes], raw: bytes) -> None:
    parts.append(_U32.pack(len(raw)))
    parts.append(raw)


def _map(parts: list[bytes], mapping: Mapping[str, str]) -> None:
    items = sorted((k.encode(), v.encode()) for k, v in mapping.items())
    parts.append(_U32.pack(len(items)))
    for key, value in items:
        parts.extend((_U32.pack(len(key)), key, _U32.pack(len(value)), value))


def _list(parts: list[bytes], items: Iterable[str]) -> None:
    encoded = [item.encode() for item in items]
    parts.append(_U32.pack(len(encoded)))
    for raw in encoded:
        parts.extend((_U32.pack(len(raw)), raw))


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest() if data else _EMPTY_SHA256


def _strs(parts: list[bytes], texts: Iterable[str]) -> None:
    # ``str`` of each field, the hot path of every signing input: an empty
    # field (most optional ones) costs one constant append.
    pack = _U32.pack
    append = parts.append
    for text in texts:
        if text:
            raw = text.encode()
            append(pack(len(raw)))
            append(raw)
        else:
            append(_EMPTY)


def _fields(*texts: str) -> bytes:
    # The encoding of a run of str fields that repeat from message to message
    # (kind, sender, recipient, ..., algorithm and signer), cached when short.
    # Signing inputs are computed before a message is validated, so a run
    # may be of any length: only short ones are kept (a bounded number), and
    # a peer sending ever new or huge values only costs cache misses.
    if sum(map(len, texts)) > _CACHED_RUN_CHARS:
        return _encode_run(texts)
    return _cached_run(texts)


def _encode_run(texts: Iterable[str]) -> bytes:
    parts: list[bytes] = []
    _strs(parts, texts)
    return b"".join(parts)


_cached_run = functools.lru_cache(maxsize=512)(_encode_run)
_CACHED_RUN_CHARS = 512


def _new_id(raw: bytes) -> str:
    # An RFC 4122 version 4 UUID from 16 random bytes, as str(uuid.uuid4())
    # gives, without building a UUID object.
    h = raw.hex()
    variant = "89ab"[raw[8] >> 6]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


_EMPTY = _U32.pack(0)
_SHA256_LENGTH = _U32.pack(32)


@dataclasses.dataclass(frozen=True, slots=True)
class Signature:
    """A signature over the signing input of the message carrying it.

    Attributes:
        signer: DID of the signer (its ``did:key``); must be the message's author.
        algorithm: ``"Ed25519"``, the only algorithm defined.
        value: The raw signature, 64 bytes for Ed25519.
        batch: Set when ``value`` signs a batch of messages
            (:mod:`sigwire.batch`): this message's inclusion proof.
    """

    signer: str
    algorithm: str
    value: bytes
    batch: BatchProof | None = None


def signature_digest(signature: Signature | None, signing_input: bytes = b"") -> bytes:
    """What a Reply's ``request_digest`` holds for a request with ``signature``.

    SHA-256 of the signature value; for a batch signature, which many requests
    share, SHA-256 of the value followed by the request's own Merkle leaf
    (computed from ``signing_input``), so that each digest names one request.
    """
    if signature is None or not signature.value:
        return _EMPTY_SHA256
    if signature.batch is not None:
        return _sha256(signature.value + leaf_hash(signing_input))
    return _sha256(signature.value)


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """One message from one agent to another: a request or a push.

    Attributes:
        id: Unique per sender; also the idempotency key.
        kind: What the receiver should do; selects its handler.
        sender: DID of the author; selects the verification key.
        payload: Opaque application bytes.
        recipient: DID of the intended receiver, or "" for any.
        context_id: Conversation the message belongs to.
        task_id: Task the message belongs to.
        role: Role of the sender, e.g. "user" or "agent".
        content_type: Media type of ``payload``.
        metadata: Application key/value pairs, all signed.
        created_at_ms: Creation time in Unix milliseconds.
        nonce: 16 or more random bytes.
        signature: The sender's signature, or None before signing.
    """

    id: str
    kind: str
    sender: str
    payload: bytes = b""
    recipient: str = ""
    context_id: str = ""
    task_id: str = ""
    role: str = ""
    content_type: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    created_at_ms: int = 0
    nonce: bytes = b""
    signature: Signature | None = None
    # Computed once per (immutable, signed) envelope: a receiver needs the
    # signing input to verify, and the digest for the replay guard, the reply
    # cache and every reply; a batch-signed envelope's digest hashes its leaf.
    _signed_input: bytes | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    _digest: bytes | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def new(
        cls,
        kind: str,
        payload: bytes = b"",
        *,
        sender: str,
        recipient: str = "",
        context_id: str = "",
        task_id: str = "",
        role: str = "",
        content_type: str = "",
        metadata: Mapping[str, str] | None = None,
        id: str | None = None,
    ) -> Self:
        """Create an unsigned envelope with a fresh id, nonce and timestamp."""
        random = os.urandom(16 + MIN_NONCE_LENGTH)
        return cls(
            id=id or _new_id(random[:16]),
            kind=kind,
            sender=sender,
            payload=payload,
            recipient=recipient,
            context_id=context_id,
            task_id=task_id,
            role=role,
            content_type=content_type,
            metadata=dict(metadata or {}),
            created_at_ms=now_ms(),
            nonce=random[16:],
        )

    def signing_input(self, *, signer: str | None = None, algorithm: str = ED25519) -> bytes:
        """Bytes covered by the signature; independent of protobuf encoding.

        Args:
            signer: The signer DID to bind; defaults to the existing signature's
                signer, else ``sender``.
            algorithm: The algorithm to bind; the existing signature's, if any.

        Returns:
            The signing input defined in ``docs/signing.md``.
        """
        if self.signature is not None:
            if self._signed_input is not None:
                return self._signed_input
            signer, algorithm = self.signature.signer, self.signature.algorithm
        raw_id = self.id.encode()
        parts: list[bytes] = [
            _ENVELOPE_PREFIX,
            _U32.pack(len(raw_id)),
            raw_id,
            _fields(
                self.kind,
                self.sender,
                self.recipient,
                self.context_id,
                self.task_id,
                self.role,
                self.content_type,
            ),
            _SHA256_LENGTH,
            _sha256(self.payload),
        ]
        if self.metadata:
            _map(parts, self.metadata)
        else:
            parts.append(_EMPTY)
        parts.append(_I64.pack(self.created_at_ms))
        _bytes(parts, self.nonce)
        parts.append(_fields(algorithm, self.sender if signer is None else signer))
        data = b"".join(parts)
        if self.signature is not None:
            object.__setattr__(self, "_signed_input", data)
        return data

    def with_signature(self, signature: Signature, signing_input: bytes | None = None) -> Envelope:
        """This envelope carrying ``signature`` (``dataclasses.replace``, faster).

        ``signing_input``: what the signature was computed over, kept so that
        the signed envelope need not rebuild it (its digest needs it).
        """
        signed = Envelope(
            self.id,
            self.kind,
            self.sender,
            self.payload,
            self.recipient,
            self.context_id,
            self.task_id,
            self.role,
            self.content_type,
            self.metadata,
            self.created_at_ms,
            self.nonce,
            signature,
        )
        if signing_input is not None:
            object.__setattr__(signed, "_signed_input", signing_input)
        return signed

    def renewed(self) -> Envelope:
        """The same request under a fresh nonce and timestamp, unsigned.

        Signed again, it is a *re-signed retry* (docs/signing.md section 8):
        the receiver answers it from its reply cache, under the same ``id``,
        without running the handler a second time.
        """
        return dataclasses.replace(
            self, created_at_ms=now_ms(), nonce=os.urandom(MIN_NONCE_LENGTH), signature=None
        )

    def validate(self) -> None:
        """Check the fields every receiver requires.

        Raises:
            EnvelopeError: A required field is empty or out of range.
        """
        # Messages are built only on failure: this runs for every inbound envelope.
        if not 0 < len(self.id) <= MAX_ID_LENGTH:
            raise EnvelopeError(f"id must be 1..{MAX_ID_LENGTH} characters")
        if not 0 < len(self.kind) <= MAX_ID_LENGTH:
            raise EnvelopeError(f"kind must be 1..{MAX_ID_LENGTH} characters")
        if not self.sender:
            raise EnvelopeError("sender is empty")
        if not MIN_NONCE_LENGTH <= len(self.nonce) <= MAX_NONCE_LENGTH:
            raise EnvelopeError(f"nonce must be {MIN_NONCE_LENGTH}..{MAX_NONCE_LENGTH} bytes")
        if self.created_at_ms <= 0:
            raise EnvelopeError("created_at_ms is not set")
        for name, value in (
            ("sender", self.sender),
            ("recipient", self.recipient),
            ("context_id", self.context_id),
            ("task_id", self.task_id),
            ("role", self.role),
            ("content_type", self.content_type),
        ):
            if len(value) > MAX_FIELD_LENGTH:
                raise EnvelopeError(f"{name} is longer than {MAX_FIELD_LENGTH} characters")
        metadata = self.metadata
        if metadata:
            if len(metadata) > MAX_METADATA_ENTRIES:
                raise EnvelopeError(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
            size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
            if size > MAX_METADATA_BYTES:
                raise EnvelopeError(f"metadata exceeds {MAX_METADATA_BYTES} bytes")

    def digest(self) -> bytes:
        """What replies to this envelope carry as ``request_digest``."""
        if self._digest is not None:
            return self._digest
        signature = self.signature
        if signature is not None and signature.batch is not None:
            digest = signature_digest(signature, self.signing_input())
        else:
            digest = signature_digest(signature)
        object.__setattr__(self, "_digest", digest)
        return digest


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyError:
    """An error carried in a Reply.

    Attributes:
        reason: Machine-readable code, e.g. ``"KIND_UNKNOWN"``.
        message: Human-readable explanation; never a traceback.
        details: Further machine-readable facts.
    """

    reason: str
    message: str = ""
    details: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """The answer, or one part of a streamed answer, to one Envelope.

    Attributes:
        request_id: The id of the Envelope this answers.
        request_digest: SHA-256 of that Envelope's signature value.
        responder: DID of the agent that answered.
        success: True when handled; False when ``error`` is set.
        data: Reply bytes.
        content_type: Media type of ``data``.
        error: The failure, when ``success`` is False.
        created_at_ms: Creation time in Unix milliseconds.
        sequence: Position in a streamed answer, from 0.
        final: True on the last part.
        signature: The responder's signature, or None before signing.
    """

    request_id: str
    request_digest: bytes
    responder: str
    success: bool = True
    data: bytes = b""
    content_type: str = ""
    error: ReplyError | None = None
    created_at_ms: int = 0
    sequence: int = 0
    final: bool = True
    signature: Signature | None = None
    # The signed forms of this (unsigned) reply, alone and in a batch, once
    # made: the reply cache hands the same unsigned reply to every re-send of
    # its request, which then costs no new signature (Identity.sign_reply,
    # Identity.sign_batch). The batch form goes only to peers that accept it.
    _signed: Reply | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _batch_signed: Reply | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def with_signature(self, signature: Signature) -> Reply:
        """This reply carrying ``signature`` (``dataclasses.replace``, faster)."""
        return Reply(
            self.request_id,
            self.request_digest,
            self.responder,
            self.success,
            self.data,
            self.content_type,
            self.error,
            self.created_at_ms,
            self.sequence,
            self.final,
            signature,
        )

    def signing_input(self, *, signer: str | None = None, algorithm: str = ED25519) -> bytes:
        """Bytes covered by the signature, bound to the request (``docs/signing.md``)."""
        if self.signature is not None:
            signer, algorithm = self.signature.signer, self.signature.algorithm
        error = self.error
        raw_id = self.request_id.encode()
        parts: list[bytes] = [_REPLY_PREFIX, _U32.pack(len(raw_id)), raw_id]
        _bytes(parts, self.request_digest)
        parts += (
            _fields(self.responder),
            b"\x01" if self.success else b"\x00",
            _fields(self.content_type),
            _SHA256_LENGTH,
            _sha256(self.data),
        )
        if error is None:
            parts += (_EMPTY, _EMPTY, _EMPTY)  # reason, message, details: all empty
        else:
            _strs(parts, (error.reason, error.message))
            _map(parts, error.details)
        parts += (
            _I64.pack(self.created_at_ms),
            _U64.pack(self.sequence),
            b"\x01" if self.final else b"\x00",
        )
        parts.append(_fields(algorithm, self.responder if signer is None else signer))
        return b"".join(parts)


_ENVELOPE_PREFIX = _encode_run((ENVELOPE_DOMAIN,))
_REPLY_PREFIX = _encode_run((REPLY_DOMAIN,))


@dataclasses.dataclass(frozen=True, slots=True)
class AgentCard:
    """What an agent says about itself, signed by the agent.

    Attributes:
        did: The agent's DID.
        name: Human-readable name.
        endpoints: URLs in preference order (gRPC first, WebSocket fallback).
        kinds: Envelope kinds the agent handles.
        max_message_size: Largest Envelope the agent accepts, in bytes.
        protocol_version: ``"sigwire/1"``.
        created_at_ms: Creation time in Unix milliseconds.
        signature: The agent's signature, or None before signing.
    """

    did: str
    name: str = ""
    endpoints: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    max_message_size: int = 0
    protocol_version: str = PROTOCOL_VERSION
    created_at_ms: int = 0
    signature: Signature | None = None

    def signing_input(self, *, signer: str | None = None, algorithm: str = ED25519) -> bytes:
        """Bytes covered by the card's signature (``docs/signing.md``)."""
        if self.signature is not None:
            signer, algorithm = self.signature.signer, self.signature.algorithm
        parts: list[bytes] = []
        _strs(parts, (CARD_DOMAIN, self.did, self.name))
        _list(parts, self.endpoints)
        _list(parts, self.kinds)
        parts.append(_U64.pack(self.max_message_size))
        _strs(parts, (self.protocol_version,))
        parts.append(_I64.pack(self.created_at_ms))
        _strs(parts, (algorithm, self.did if signer is None else signer))
        return b"".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """An inbound envelope after verification, as a handler receives it.

    Attributes:
        envelope: The verified envelope.
    """

    envelope: Envelope

    @property
    def id(self) -> str:
        """The envelope id (the sender's idempotency key)."""
        return self.envelope.id

    @property
    def kind(self) -> str:
        """The kind that selected this handler."""
        return self.envelope.kind

    @property
    def sender(self) -> str:
        """The sender's DID, verified by its signature (unless verification is off)."""
        return self.envelope.sender

    @property
    def payload(self) -> bytes:
        """The application bytes."""
        return self.envelope.payload

    @property
    def content_type(self) -> str:
        """Media type of the payload."""
        return self.envelope.content_type

    @property
    def metadata(self) -> Mapping[str, str]:
        """Signed application key/value pairs."""
        return self.envelope.metadata

    @property
    def context_id(self) -> str:
        """Conversation id."""
        return self.envelope.context_id

    @property
    def task_id(self) -> str:
        """Task id."""
        return self.envelope.task_id

    @property
    def role(self) -> str:
        """Role of the sender."""
        return self.envelope.role

    @property
    def recipient(self) -> str:
        """The DID the sender addressed, or ""."""
        return self.envelope.recipient

    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode()
