"""Identities, did:key, signing and verification, the replay guard, trust policy.

No network I/O. (Reading and writing key files lives in :mod:`sigwire.keyfile`;
:meth:`Identity.load` and :meth:`Identity.save` delegate to it.)

An agent's identity is an Ed25519 key pair. Its DID is a ``did:key``: the
multicodec ``ed25519-pub`` prefix (0xed 0x01) followed by the 32-byte public
key, base58btc-encoded behind a ``z`` multibase prefix. Any such DID resolves
to its public key with no lookup, which is how receivers authenticate senders
they have never met.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, Self, TypeAlias, TypeVar

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sigwire.batch import (
    BatchProof,
    BatchProofError,
    batch_signing_input,
    leaf_hash,
    merkle_tree,
    root_from_proof,
)
from sigwire.envelope import ED25519, AgentCard, Envelope, Reply, Signature, now_ms
from sigwire.errors import (
    InvalidDidError,
    InvalidSignatureError,
    KeyFileError,
    OverloadedError,
    ReplayError,
    SignatureMissingError,
    SigwireError,
    StaleMessageError,
    UnknownSignerError,
    UnsupportedAlgorithmError,
)

if TYPE_CHECKING:
    from pathlib import Path

_M = TypeVar("_M", Envelope, Reply)

__all__ = [
    "AllowList",
    "Identity",
    "OpenTrust",
    "ReplayGuard",
    "SignatureChecks",
    "TrustPolicy",
    "Verifier",
    "did_from_public_key",
    "public_key_from_did",
]

DID_KEY_PREFIX = "did:key:z"
_ED25519_MULTICODEC = b"\xed\x01"
_SIGNATURE_LENGTH = 64
# Longest base58 text of 34 bytes is 47 characters; anything longer is garbage.
_MAX_DID_LENGTH = len(DID_KEY_PREFIX) + 48


def did_from_public_key(public_key: bytes) -> str:
    """The ``did:key`` of a raw 32-byte Ed25519 public key.

    Raises:
        InvalidDidError: The key is not 32 bytes.
    """
    if len(public_key) != 32:
        raise InvalidDidError(
            public_key.hex(), f"Ed25519 public keys are 32 bytes, not {len(public_key)}"
        )
    return DID_KEY_PREFIX + base58.b58encode(_ED25519_MULTICODEC + public_key).decode()


def public_key_from_did(did: str) -> bytes:
    """The raw 32-byte Ed25519 public key a ``did:key`` encodes.

    Raises:
        InvalidDidError: Not a did:key, not base58btc, not an Ed25519 key, not
            a point on the curve, or a small-order (forgeable) point.
    """
    return _resolve(did).public_bytes_raw()


@functools.lru_cache(maxsize=8192)
def _resolve(did: str) -> Ed25519PublicKey:
    # Parsed keys are cached per DID: parsing costs more than a hash lookup,
    # and the same few peers sign almost every message a server sees.
    if not did.startswith("did:"):
        raise InvalidDidError(did, "not a DID (expected did:key:z6Mk...)")
    if not did.startswith(DID_KEY_PREFIX):
        raise InvalidDidError(did, "only did:key with base58btc ('z') multibase is supported")
    if len(did) > _MAX_DID_LENGTH:
        raise InvalidDidError(did, "too long for an Ed25519 did:key")
    try:
        raw = base58.b58decode(did[len(DID_KEY_PREFIX) :])
    except ValueError:
        raise InvalidDidError(did, "not valid base58btc") from None
    if not raw.startswith(_ED25519_MULTICODEC):
        raise InvalidDidError(did, "not an Ed25519 key (multicodec ed25519-pub is 0xed01)")
    key = raw[len(_ED25519_MULTICODEC) :]
    if len(key) != 32:
        raise InvalidDidError(did, f"Ed25519 public keys are 32 bytes, not {len(key)}")
    if DID_KEY_PREFIX + base58.b58encode(raw).decode() != did:
        raise InvalidDidError(did, "not the canonical base58btc encoding of its key")
    problem = _weak_key(key)
    if problem:
        raise InvalidDidError(did, problem)
    return Ed25519PublicKey.from_public_bytes(key)


_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _sqrt(a: int) -> int | None:
    # A square root mod p (p = 5 mod 8, RFC 8032 section 5.1.3), or None.
    x = pow(a, (_P + 3) // 8, _P)
    if (x * x - a) % _P:
        x = x * _SQRT_M1 % _P
    return x if (x * x - a) % _P == 0 else None


def _small_order_ys() -> frozenset[int]:
    # The y coordinates of the 8 points of order 1, 2, 4 and 8: (0, 1),
    # (0, -1), (+-sqrt(-1), 0), and the 4 points P with 2P = (+-sqrt(-1), 0),
    # where x^2 = -y^2, so that d*y^4 + 2*y^2 - 1 = 0 on the curve.
    ys = {0, 1, _P - 1}
    root = _sqrt((1 + _D) % _P)
    assert root is not None
    for y2 in ((-1 + root) * pow(_D, -1, _P) % _P, (-1 - root) * pow(_D, -1, _P) % _P):
        y = _sqrt(y2)
        if y is not None:
            ys.update((y, _P - y))
    return frozenset(ys)


_SMALL_ORDER_YS = _small_order_ys()


def _jacobi(a: int, n: int) -> int:
    # The Jacobi symbol (a/n) for odd n > 0: for prime n, 1 if a is a nonzero
    # square mod n, -1 if not, 0 if n divides a. About 5x cheaper in Python
    # than Euler's criterion (a 255-bit modular power).
    a %= n
    result = 1
    while a:
        zeros = (a & -a).bit_length() - 1
        a >>= zeros
        if zeros & 1 and n & 7 in (3, 5):
            result = -result
        if a & 3 == 3 and n & 3 == 3:
            result = -result
        a, n = n % a, a
    return result if n == 1 else 0


def _weak_key(key: bytes) -> str:
    """Why ``key`` is unusable as an Ed25519 public key, or "" if it is fine.

    cryptography loads any 32 bytes; a small-order point (such as the
    identity) lets anyone forge signatures that verify for every message, so
    it must never name a sender. The decoding rules are RFC 8032 section
    5.1.3's, without computing x: the point exists iff x^2 = u / v is a
    square mod p, that is iff u * v is; and the 8 small-order points are
    known by their y coordinates. (A never-seen DID costs ~35 us here rather
    than the ~280 us of decoding x and multiplying by the cofactor.)
    """
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    if y >= _P:
        return "not a canonical point encoding"
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P  # never 0: -1/d is not a square
    if _jacobi(u * v, _P) < 0:
        return "not a point on the Ed25519 curve"
    if u == 0 and key[31] >> 7:
        return "not a canonical point encoding"  # x = 0 carries no sign
    if y in _SMALL_ORDER_YS:
        return "a small-order point: signatures by it prove nothing"
    return ""


class Identity:
    """An agent's Ed25519 key pair and the ``did:key`` derived from it.

    Example::

        me = Identity.generate()
        me.save("agent.pem")             # written 0600
        assert Identity.load("agent.pem").did == me.did
    """

    __slots__ = ("_did", "_private", "_public_raw")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._public_raw = private_key.public_key().public_bytes_raw()
        self._did = did_from_public_key(self._public_raw)

    @classmethod
    def generate(cls) -> Self:
        """A new identity from the operating system's random source."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Self:
        """The identity whose RFC 8032 private key (seed) is ``seed``.

        Raises:
            KeyFileError: The seed is not 32 bytes.
        """
        if len(seed) != 32:
            raise KeyFileError("<seed>", f"an Ed25519 seed is 32 bytes, not {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str = "<pem>") -> Self:
        """Parse an unencrypted PKCS#8 PEM Ed25519 private key.

        Raises:
            KeyFileError: Not PEM, encrypted, or not an Ed25519 key.
        """
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(source, f"not an unencrypted PEM private key ({exc})") from None
        except Exception:  # cryptography raises UnsupportedAlgorithm for odd curves
            raise KeyFileError(source, "unsupported private key type") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(source, f"not an Ed25519 key ({type(key).__name__})")
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Load a key file; see :func:`sigwire.keyfile.load_identity`."""
        from sigwire import keyfile

        return cls.from_pem(keyfile.read_private_key(path), source=os.fspath(path))

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the private key as PEM with mode 0600; see :mod:`sigwire.keyfile`."""
        from sigwire import keyfile

        return keyfile.write_private_key(path, self.to_pem(), overwrite=overwrite)

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def to_seed_hex(self) -> str:
        """The raw 32-byte private key (RFC 8032 seed) as hex; for test vectors only."""
        return self._private.private_bytes_raw().hex()

    @property
    def did(self) -> str:
        """This identity's ``did:key``."""
        return self._did

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public_raw

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._private.sign(data)

    def _signature(self, signing_input: bytes) -> Signature:
        return Signature(signer=self._did, algorithm=ED25519, value=self.sign(signing_input))

    def sign_envelope(self, envelope: Envelope) -> Envelope:
        """``envelope`` signed by this identity, which must be its sender.

        Raises:
            InvalidSignatureError: ``envelope.sender`` is another DID.
        """
        if envelope.sender != self._did:
            raise InvalidSignatureError(f"cannot sign for sender {envelope.sender}")
        if envelope.signature is not None:
            envelope = dataclasses.replace(envelope, signature=None)
        data = envelope.signing_input()
        return envelope.with_signature(self._signature(data), data)

    def sign_reply(self, reply: Reply) -> Reply:
        """``reply`` signed by this identity, which must be its responder."""
        if reply.responder != self._did:
            raise InvalidSignatureError(f"cannot sign for responder {reply.responder}")
        if reply.signature is not None:
            reply = dataclasses.replace(reply, signature=None)
        elif reply._signed is not None:
            return reply._signed  # signed before: re-sends cost no signature
        signed = reply.with_signature(self._signature(reply.signing_input()))
        object.__setattr__(reply, "_signed", signed)
        return signed

    def sign_batch(self, messages: Sequence[_M]) -> list[_M]:
        """``messages`` signed together: one Ed25519 signature for the whole batch.

        Each message gets the batch's signature plus its own inclusion proof
        (:mod:`sigwire.batch`), so it still verifies on its own. A single
        message is signed alone, as :meth:`sign_envelope` would.

        Raises:
            InvalidSignatureError: A message's author is another DID.
            ValueError: No messages, or more than a batch may hold.
        """
        if len(messages) == 1:
            only = messages[0]
            if isinstance(only, Envelope):
                return [self.sign_envelope(only)]
            return [self.sign_reply(only)]
        did = self._did
        inputs = []
        for message in messages:
            author = message.sender if isinstance(message, Envelope) else message.responder
            if author != did:
                raise InvalidSignatureError(f"cannot sign for {author}")
            if message.signature is not None:
                message = dataclasses.replace(message, signature=None)
            inputs.append(message.signing_input(signer=did))
        root, paths = merkle_tree([leaf_hash(data) for data in inputs])
        size = len(messages)
        value = self.sign(batch_signing_input(size, root, ED25519, did))
        signed: list[_M] = []
        for index, (message, data, path) in enumerate(zip(messages, inputs, paths, strict=True)):
            signature = Signature(did, ED25519, value, BatchProof(index, size, path))
            if isinstance(message, Envelope):
                signed.append(message.with_signature(signature, data))
            else:
                signed.append(message.with_signature(signature))
        for before, after in zip(messages, signed, strict=True):
            if isinstance(before, Reply) and before.signature is None:
                object.__setattr__(before, "_batch_signed", after)
        return signed

    def sign_card(self, card: AgentCard) -> AgentCard:
        """``card`` signed by this identity, which must be the card's DID."""
        if card.did != self._did:
            raise InvalidSignatureError(f"cannot sign a card for {card.did}")
        unsigned = dataclasses.replace(card, signature=None)
        return dataclasses.replace(card, signature=self._signature(unsigned.signing_input()))

    def __repr__(self) -> str:
        # Never the private key, even by accident in a log line.
        return f"Identity({self._did})"


class TrustPolicy(Protocol):
    """Decides which authenticated signers may talk to us."""

    def check(self, did: str) -> None:
        """Return if ``did`` is admitted.

        Raises:
            UnknownSignerError: It is not.
        """


class OpenTrust:
    """Admit every signer whose signature verifies (authenticated, open)."""

    def check(self, did: str) -> None:
        """Admit ``did``."""

    def __repr__(self) -> str:
        return "OpenTrust()"


class AllowList:
    """Admit only the listed DIDs."""

    def __init__(self, dids: Iterable[str]) -> None:
        dids = frozenset(dids)
        for did in dids:
            public_key_from_did(did)  # reject malformed entries up front
        self.dids = dids

    @classmethod
    def from_text(cls, text: str, *, source: str = "<text>") -> Self:
        """Parse one DID per line; blank lines and ``#`` comments are ignored.

        Raises:
            InvalidDidError: A line is not a valid did:key (its line number is named).
        """
        dids = []
        for number, line in enumerate(text.splitlines(), start=1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                public_key_from_did(entry)
            except InvalidDidError as exc:
                raise InvalidDidError(entry, f"{source}:{number}: {exc.message}") from None
            dids.append(entry)
        return cls(dids)

    def check(self, did: str) -> None:
        """Admit ``did`` only if listed."""
        if did not in self.dids:
            raise UnknownSignerError(did)

    def __repr__(self) -> str:
        return f"AllowList({len(self.dids)} DIDs)"


class Verifier:
    """Authenticates messages: signature, algorithm, signer and trust policy.

    Args:
        trust: Which authenticated signers are admitted; default everyone.
        require_signatures: When False, unsigned envelopes pass unauthenticated
            (a signature that is present is still checked). Default True.
    """

    def __init__(
        self, trust: TrustPolicy | None = None, *, require_signatures: bool = True
    ) -> None:
        self.trust: TrustPolicy = trust or OpenTrust()
        self.require_signatures = require_signatures

    @staticmethod
    def check_signature(signature: Signature | None, author: str, signing_input: bytes) -> None:
        """Verify that ``signature`` is ``author``'s Ed25519 signature of the input.

        Raises:
            SignatureMissingError: No signature.
            UnsupportedAlgorithmError: Not Ed25519.
            InvalidSignatureError: Wrong signer, wrong length, or does not verify.
            InvalidDidError: ``author`` is not a valid did:key.
        """
        key, value, data = _prepare(signature, author, signing_input)
        if not _verifies(key, value, data):
            raise InvalidSignatureError("the signature does not verify")

    @staticmethod
    def signatures_valid(items: Sequence[tuple[Signature | None, str, bytes]]) -> list[bool]:
        """Check many signatures at once; True where :meth:`check_signature` would pass.

        The messages of one batch share one Ed25519 check, run once per
        distinct (signer, signature, signed root). A False tells the caller to
        run the full check for its specific error. The same as
        ``Verifier.plan_checks(items).run()``, with its None as False.
        """
        return [verdict is True for verdict in Verifier.plan_checks(items).run()]

    @staticmethod
    def plan_checks(items: Sequence[tuple[Signature | None, str, bytes]]) -> SignatureChecks:
        """Every check of :meth:`signatures_valid` but the Ed25519 ones, which it plans.

        Cheap (keys parsed once per DID, one hash per batched message), so a
        session runs it as a frame arrives, then counts the Ed25519 checks
        left (:attr:`SignatureChecks.count`) to decide where to run them: a
        batch-signed frame needs one, on the event loop; many go to a worker
        thread (Ed25519 verification releases the GIL).
        """
        groups: list[tuple[int, _Check | None]] = []
        checks: dict[_Check, Ed25519PublicKey] = {}
        start = 0
        while start < len(items):
            whole = _whole_batch(items, start)
            prepared: tuple[Ed25519PublicKey, bytes, bytes] | None
            if whole is not None:
                size, prepared = whole
            else:
                size = 1
                try:
                    prepared = _prepare(*items[start])
                except SigwireError:
                    prepared = None
            check: _Check | None = None
            if prepared is not None:
                key, value, data = prepared
                check = (items[start][1], value, data)
                checks.setdefault(check, key)
            groups.append((size, check))
            start += size
        return SignatureChecks(groups, checks)

    def authenticate(self, envelope: Envelope) -> None:
        """Check an envelope's signature (not yet the trust policy).

        Raises:
            SigningError: Any of the signature failures of :meth:`check_signature`.
        """
        if envelope.signature is None and not self.require_signatures:
            return
        self.check_signature(envelope.signature, envelope.sender, envelope.signing_input())

    def admit(self, did: str) -> None:
        """Apply the trust policy.

        Raises:
            UnknownSignerError: ``did`` is not admitted.
        """
        self.trust.check(did)

    def verify_envelope(self, envelope: Envelope) -> None:
        """Authenticate ``envelope`` and apply the trust policy."""
        self.authenticate(envelope)
        if envelope.signature is not None or self.require_signatures:
            self.admit(envelope.sender)

    def verify_reply(
        self,
        reply: Reply,
        request: Envelope,
        *,
        expected_responder: str | None = None,
        signature_checked: bool = False,
        forged: bool = False,
    ) -> None:
        """Check that ``reply`` is a signed answer to exactly ``request``.

        Args:
            reply: The reply received.
            request: The envelope it claims to answer.
            expected_responder: If given, the DID the reply must come from (pinning).
            signature_checked: The caller already verified this very reply's
                signature (in a batch); only the binding and pinning remain.
            forged: The caller already found that this very reply's
                signature does not verify (a False of
                :meth:`SignatureChecks.run`): it is refused as such, after
                the binding and pinning, without verifying it again.

        Raises:
            InvalidSignatureError: Bad signature, or bound to another request.
            UnknownSignerError: Not from ``expected_responder``.
        """
        if reply.request_id != request.id or reply.request_digest != request.digest():
            raise InvalidSignatureError("the reply answers a different request")
        if expected_responder is not None and reply.responder != expected_responder:
            raise UnknownSignerError(reply.responder, expected=expected_responder)
        if forged:
            raise InvalidSignatureError("the signature does not verify")
        if not signature_checked:
            self.check_signature(reply.signature, reply.responder, reply.signing_input())

    def verify_card(self, card: AgentCard, *, expected_did: str | None = None) -> None:
        """Check an AgentCard's self-signature (and, if given, whose card it is)."""
        if expected_did is not None and card.did != expected_did:
            raise UnknownSignerError(card.did, expected=expected_did)
        if card.signature is not None and card.signature.batch is not None:
            raise InvalidSignatureError("a card is signed alone, never in a batch")
        self.check_signature(card.signature, card.did, card.signing_input())


# A seen nonce is two byte strings, and no other object: a dict of bytes
# to bytes is not tracked by the garbage collector, so a full guard (a
# million nonces by default) adds nothing to its collections. An OrderedDict
# is always tracked, and visiting its entries added ~40 ms to every full
# collection; a plain dict of tuples would be tracked again by every insert
# of a new tuple, until the next full collection; and each tuple cost the
# young generation an object.
#
# _seen maps its key to its content digest followed by its sequence number;
# _queue holds one fixed-size record per nonce, in the order they were
# recorded (expiry order): key, sequence number, expiry and created_at_ms. A
# record whose sequence number is not its key's in _seen belongs to an entry
# released since, and is skipped.
_KEY_LENGTH = 16  # _nonce_key's digest
_RECORD = struct.Struct(f">{_KEY_LENGTH}sQqq")
_Record: TypeAlias = tuple[bytes, int, int, int]
_SEQUENCE = struct.Struct(">Q")
_DIGEST_LENGTH = 32
_MAX_TTL_MS = 2**62  # with any Unix-ms clock, an expiry still fits a signed 64-bit record


class ReplayGuard:
    """Rejects replayed envelopes: a timestamp window plus a bounded nonce cache.

    An envelope is fresh when its timestamp lies within ``[now - past_ms,
    now + future_ms]`` and its ``(sender, nonce)`` has not been seen. Seen
    nonces are kept for ``ttl_ms`` (at least twice the window, so that clock
    skew cannot reopen it). An exact re-send of an envelope already seen (same
    nonce, same signature) is a *duplicate*, not a replay: the caller answers
    it from its reply cache without running the handler again.

    :meth:`check_and_mark` is ONE atomic step under a lock, so concurrent
    callers (threads included) can never both see the same nonce as fresh.

    Every entry the guard lets go raises its *floor* to that envelope's
    ``created_at_ms``, and an envelope created at or before the floor that
    the cache does not hold is refused: it could be a replay of one let go.
    The floor follows the envelopes' own timestamps, not the clock, so no
    clock step reopens them. Entries go when they expire, and when the cache
    holds ``capacity`` live entries a new envelope makes it forget the one
    recorded first, provided that one was created at least ``future_ms``
    before now (so that the floor stays that far behind the clock and never
    refuses an envelope dated in the last ``future_ms``); otherwise the new
    envelope is refused with OVERLOADED. A server receiving more than
    ``capacity / ttl`` new envelopes per second thus keeps serving, with a
    past window shrunk to about ``capacity / rate`` seconds, instead of
    refusing everything (docs/signing.md section 8).

    Args:
        past_ms: How old an envelope may be. Default 5 minutes.
        future_ms: How far ahead of our clock it may be. Default 30 seconds.
        ttl_ms: How long nonces are remembered; default twice the window.
        capacity: Most nonces remembered at once.
    """

    def __init__(
        self,
        *,
        past_ms: int = 300_000,
        future_ms: int = 30_000,
        ttl_ms: int | None = None,
        capacity: int = 1_000_000,
    ) -> None:
        window = past_ms + future_ms
        self.ttl_ms = 2 * window if ttl_ms is None else ttl_ms
        if self.ttl_ms < 2 * window:
            raise ValueError("ttl_ms must be at least twice the window (past_ms + future_ms)")
        if self.ttl_ms > _MAX_TTL_MS:
            raise ValueError(f"ttl_ms must be at most {_MAX_TTL_MS} (expiries are 64-bit)")
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.past_ms = past_ms
        self.future_ms = future_ms
        self.capacity = capacity
        #: Envelopes created at or before this (Unix ms) and not in the cache
        #: are refused; None until an entry first expires or is forgotten.
        self.floor_ms: int | None = None
        #: Live entries forgotten to make room, since the guard was made.
        self.forgotten = 0
        self._seen: dict[bytes, bytes] = {}
        self._queue = bytearray()
        self._sequence = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_window(self, created_at_ms: int, now: int | None = None) -> None:
        """Raise :class:`StaleMessageError` if the timestamp is outside the window."""
        now = now_ms() if now is None else now
        skew = created_at_ms - now
        if skew < -self.past_ms or skew > self.future_ms:
            raise StaleMessageError(skew)

    def check_and_mark(self, envelope: Envelope, now: int | None = None) -> bool:
        """Atomically check an envelope against the window and cache, and record it.

        Returns:
            True if fresh (now recorded); False if an exact duplicate of one
            already seen.

        Raises:
            StaleMessageError: Timestamp outside the window, or at or before
                the floor (``details["floor_ms"]`` then says where it is).
            ReplayError: The nonce was seen with different content.
            OverloadedError: The cache is full of nonces too recent to forget.
        """
        now = now_ms() if now is None else now
        created = envelope.created_at_ms
        self.check_window(created, now)
        key = _nonce_key(envelope.sender, envelope.nonce)
        digest = _content_digest(envelope)
        with self._lock:
            seen = self._seen
            self._expire(now)
            known = seen.get(key)
            if known is not None:
                if known[:_DIGEST_LENGTH] == digest:
                    return False
                raise ReplayError("nonce already used by another message from this sender")
            floor = self.floor_ms
            if floor is not None and created <= floor:
                raise StaleMessageError(created - now, floor_ms=floor)
            if len(seen) >= self.capacity:
                # Full of live nonces: forget the oldest, and refuse from now on
                # whatever was created no later than it (it could be that one).
                # Not one dated in the last future_ms: envelopes dated ahead
                # would push the floor into the present and refuse everyone.
                oldest = self._oldest()
                if oldest[3] > now - self.future_ms:
                    raise OverloadedError(
                        f"replay cache is full ({self.capacity} nonces, none older than "
                        f"{self.future_ms} ms); try again shortly"
                    )
                self._forget(oldest)
                self.forgotten += 1
            sequence = self._sequence + 1
            # Packed first: should it fail, nothing has changed.
            record = _RECORD.pack(key, sequence, now + self.ttl_ms, created)
            self._sequence = sequence
            seen[key] = digest + _SEQUENCE.pack(sequence)
            self._queue += record
            return True

    def release(self, envelope: Envelope) -> None:
        """Forget an envelope that was refused after :meth:`check_and_mark`.

        Used when the handler never ran (rate limited, unknown kind, shutting
        down), so that the sender may re-send the very same envelope.
        """
        key = _nonce_key(envelope.sender, envelope.nonce)
        digest = _content_digest(envelope)
        with self._lock:
            seen = self._seen
            value = seen.get(key)
            if value is None or value[:_DIGEST_LENGTH] != digest:
                return
            del seen[key]
            queue = self._queue
            last = len(queue) - _RECORD.size
            if last >= 0 and queue[last : last + _KEY_LENGTH] == key:
                # Refused right after it was recorded: the last record, taken back.
                del queue[last:]
            elif len(queue) > 2 * _RECORD.size * (len(seen) + 1024):
                # Mostly records of released entries: keep the others only.
                self._queue = bytearray().join(
                    queue[at : at + _RECORD.size]
                    for at in range(0, len(queue), _RECORD.size)
                    if self._live(_RECORD.unpack_from(queue, at))
                )

    def _live(self, record: _Record) -> bool:
        value = self._seen.get(record[0])
        return value is not None and _SEQUENCE.unpack_from(value, _DIGEST_LENGTH)[0] == record[1]

    def _oldest(self) -> _Record:
        # The record of the oldest entry; the queue is not empty while _seen is not.
        queue = self._queue
        while True:
            record: _Record = _RECORD.unpack_from(queue)
            if self._live(record):
                return record
            del queue[: _RECORD.size]  # O(1): a bytearray shrinks from the front in place

    def _forget(self, record: _Record) -> None:
        # Let go of the oldest entry (``record``, from _oldest).
        del self._seen[record[0]]
        del self._queue[: _RECORD.size]
        self._raise_floor(record[3])

    def _raise_floor(self, created_at_ms: int) -> None:
        floor = self.floor_ms
        if floor is None or created_at_ms > floor:
            self.floor_ms = created_at_ms

    def _expire(self, now: int) -> None:
        # Records are in expiry order (constant TTL, monotone enough clock), so
        # expired entries are always at the front. An expired envelope is
        # older than the window allows, but a clock stepped back could make it
        # acceptable again: the floor keeps it out whatever the clock does.
        while self._seen:
            oldest = self._oldest()
            if oldest[2] > now:
                break
            self._forget(oldest)


def _prepare(
    signature: Signature | None, author: str, signing_input: bytes
) -> tuple[Ed25519PublicKey, bytes, bytes]:
    # Every check but the Ed25519 one, in the order of docs/signing.md 6.1;
    # returns the key, the signature and the bytes it must cover.
    key, signature = _checked_key(signature, author)
    return key, signature.value, _signed_bytes(signature, signing_input)


def _checked_key(signature: Signature | None, author: str) -> tuple[Ed25519PublicKey, Signature]:
    # The checks of _prepare that do not depend on the signed bytes.
    if signature is None or not signature.value:
        raise SignatureMissingError("the message is not signed")
    if signature.algorithm != ED25519:
        raise UnsupportedAlgorithmError(signature.algorithm)
    if signature.signer != author:
        raise InvalidSignatureError("the signer is not the message's author")
    if len(signature.value) != _SIGNATURE_LENGTH:
        raise InvalidSignatureError(f"an Ed25519 signature is 64 bytes, not {len(signature.value)}")
    return _resolve(author), signature


def _whole_batch(
    items: Sequence[tuple[Signature | None, str, bytes]], start: int
) -> tuple[int, tuple[Ed25519PublicKey, bytes, bytes] | None] | None:
    # A writer signs what one frame carries as one batch, in order, so the
    # messages from ``start`` are often a whole batch: leaves 0..size-1 under
    # one signature. Then the tree is rebuilt once (about one hash per message)
    # instead of a root per message from its own proof (one per tree level),
    # and every message's proof must equal the rebuilt tree's path for it:
    # exactly when each proof alone would lead to that root. Anything else
    # (None) is checked message by message. Returns the batch's size and
    # what _prepare would (None if a check failed: all of them fail).
    first = items[start][0]
    if first is None or first.batch is None or first.batch.index != 0:
        return None
    size = first.batch.size
    if not 1 < size <= len(items) - start:
        return None
    value, signer = first.value, first.signer
    group = items[start : start + size]
    for index, (signature, author, _) in enumerate(group):
        if (
            signature is None
            or signature.value != value
            or signature.signer != signer
            or author != signer
            or signature.algorithm != first.algorithm
            or signature.batch is None
            or signature.batch.index != index
            or signature.batch.size != size
        ):
            return None
    try:
        root, paths = merkle_tree([leaf_hash(data) for _, _, data in group])
    except BatchProofError:
        return None
    for (signature, _, _), path in zip(group, paths, strict=True):
        if signature is None or signature.batch is None or signature.batch.path != path:
            return None
    try:
        key, _ = _checked_key(first, signer)
    except SigwireError:
        return size, None
    return size, (key, value, batch_signing_input(size, root, first.algorithm, signer))


def _verifies(key: Ed25519PublicKey, value: bytes, data: bytes) -> bool:
    try:
        key.verify(value, data)
    except InvalidSignature:
        return False
    return True


# One Ed25519 check: the signer, the signature and the bytes it must cover.
_Check: TypeAlias = tuple[str, bytes, bytes]


class SignatureChecks:
    """The Ed25519 checks a run of messages still needs (:meth:`Verifier.plan_checks`)."""

    __slots__ = ("_checks", "_groups")

    def __init__(
        self,
        groups: list[tuple[int, _Check | None]],
        checks: dict[_Check, Ed25519PublicKey],
    ) -> None:
        # Runs of messages judged together (a whole batch, or one message) and
        # the check each depends on (None: it already failed); each distinct
        # (signer, signature, signed bytes) is checked once.
        self._groups = groups
        self._checks = checks

    @property
    def count(self) -> int:
        """How many Ed25519 verifications :meth:`run` will do."""
        return len(self._checks)

    def run(self) -> list[bool | None]:
        """Do the checks; per message, in order, what they found.

        True: the signature verifies. False: every other check passed and the
        Ed25519 one failed, so the full check would raise
        ``InvalidSignatureError("the signature does not verify")``. None: an
        earlier check failed; the full check says which.
        """
        verdicts = {
            check: _verifies(key, check[1], check[2]) for check, key in self._checks.items()
        }
        results: list[bool | None] = []
        for size, check in self._groups:
            results += [None if check is None else verdicts[check]] * size
        return results


def _signed_bytes(signature: Signature, signing_input: bytes) -> bytes:
    # What the Ed25519 signature covers: the signing input itself, or for a
    # batch signature the batch's root, rebuilt from this message's proof.
    proof = signature.batch
    if proof is None:
        return signing_input
    try:
        root = root_from_proof(leaf_hash(signing_input), proof)
    except BatchProofError as exc:
        raise InvalidSignatureError(f"the batch proof is invalid: {exc}") from None
    return batch_signing_input(proof.size, root, signature.algorithm, signature.signer)


def _content_digest(envelope: Envelope) -> bytes:
    # Signed: the signature stands for the content. Unsigned (verification
    # switched off): hash the content itself, or every unsigned envelope
    # would look like a re-send of every other.
    if envelope.signature is not None:
        return envelope.digest()
    return hashlib.sha256(envelope.signing_input()).digest()


def _nonce_key(sender: str, nonce: bytes) -> bytes:
    # A fixed-size digest bounds memory per entry whatever the field sizes.
    return hashlib.blake2b(sender.encode() + b"\x00" + nonce, digest_size=_KEY_LENGTH).digest()
