"""The exception tree of sigwire.

Every error sigwire raises derives from :class:`SigwireError`::

    * SigwireError
        * InvalidTargetError            a URL that names no usable endpoint
            * UnsupportedSchemeError    .scheme, .supported
        * KeyFileError                  unreadable or unsafe private key file
            * InsecureKeyFileError      readable by group or others (like ssh)
        * StoreError                    unusable --store file, or one in use
        * EnvelopeError                 undecodable or incomplete message (MALFORMED)
            * MessageTooLargeError      over the size limit (PAYLOAD_TOO_LARGE)
        * MisdirectedError              addressed to another agent (RECIPIENT_MISMATCH)
        * SigningError                  the message cannot be authenticated
            * SignatureMissingError     (SIGNATURE_MISSING)
            * InvalidSignatureError     (SIGNATURE_INVALID)
            * UnsupportedAlgorithmError (ALGORITHM_UNSUPPORTED)
            * InvalidDidError           malformed or unresolvable DID (DID_INVALID)
            * UnknownSignerError        outside the trust policy (SIGNER_UNKNOWN)
            * ReplayError               nonce reused with other content (REPLAY)
                * StaleMessageError     timestamp outside the window (TIMESTAMP_OUT_OF_WINDOW)
        * KindUnknownError              no handler for the kind (KIND_UNKNOWN)
        * RateLimitedError              .retry_after seconds (RATE_LIMITED)
        * OverloadedError               a bounded resource is full (OVERLOADED)
        * PushExpiredError              a push nobody answered in time (PUSH_EXPIRED)
        * HandlerError                  the handler crashed; .error_id (HANDLER_FAILED)
        * InternalError                 the agent itself failed; .error_id (INTERNAL)
        * ApplicationError              a handler's own refusal, any .reason
        * TransportError                expected in normal operation
            * ConnectError              peer down or refused (UNAVAILABLE)
            * DeadlineExceededError     (DEADLINE_EXCEEDED)
            * ConnectionClosedError     the connection ended (CONNECTION_CLOSED)
                * ShuttingDownError     the peer is draining (SHUTTING_DOWN)
                    * HandlerCancelledError  stopped mid-handler (HANDLER_CANCELLED)
            * RemoteError               the peer answered with an unmapped error
        * NoTransportAvailableError     .attempts: what each candidate failed with

Each class has a ``reason``: the machine-readable code that travels on the
wire (``google.rpc.ErrorInfo.reason`` on gRPC, ``Error.reason`` in a Reply, the
close reason on WebSocket). :func:`error_from_wire` turns a reason received
from a peer back into the matching class with ``remote=True``, so that
``except sigwire.KindUnknownError`` works the same locally and remotely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

__all__ = [
    "ApplicationError",
    "ConnectError",
    "ConnectionClosedError",
    "DeadlineExceededError",
    "EnvelopeError",
    "HandlerCancelledError",
    "HandlerError",
    "InsecureKeyFileError",
    "InternalError",
    "InvalidDidError",
    "InvalidSignatureError",
    "InvalidTargetError",
    "KeyFileError",
    "KindUnknownError",
    "MessageTooLargeError",
    "MisdirectedError",
    "NoTransportAvailableError",
    "OverloadedError",
    "PushExpiredError",
    "RateLimitedError",
    "RemoteError",
    "ReplayError",
    "ShuttingDownError",
    "SignatureMissingError",
    "SigningError",
    "SigwireError",
    "StaleMessageError",
    "StoreError",
    "TransportError",
    "UnknownSignerError",
    "UnsupportedAlgorithmError",
    "UnsupportedSchemeError",
    "error_from_wire",
]


class SigwireError(Exception):
    """Root of every sigwire error.

    Attributes:
        message: Human-readable explanation, safe to show to a peer.
        reason: Machine-readable code (class default, or overridden per instance).
        details: Further machine-readable facts as strings.
        remote: True when a peer reported this error rather than this process.
    """

    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str = "",
        *,
        reason: str | None = None,
        details: Mapping[str, str] | None = None,
        remote: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.details: dict[str, str] = dict(details or {})
        self.remote = remote

    def _restore_from_details(self) -> None:
        """Set subclass attributes from ``details`` after :func:`error_from_wire`."""

    def __str__(self) -> str:
        origin = "peer: " if self.remote else ""
        return f"{origin}{self.message} [{self.reason}]" if self.message else self.reason


class InvalidTargetError(SigwireError):
    """A URL that cannot be parsed into an endpoint."""

    default_reason = "TARGET_INVALID"

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"invalid target {url!r}: {problem}")
        self.url = url


class UnsupportedSchemeError(InvalidTargetError):
    """A URL whose scheme no registered transport serves."""

    default_reason = "SCHEME_UNSUPPORTED"

    def __init__(self, url: str, scheme: str, supported: Sequence[str]) -> None:
        self.scheme = scheme
        self.supported = tuple(supported)
        names = ", ".join(f"{s}://" for s in self.supported)
        super().__init__(url, f"unsupported scheme {scheme!r}; supported: {names}")


class KeyFileError(SigwireError):
    """A private key file that cannot be read, parsed or written."""

    default_reason = "KEY_FILE"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"key file {path}: {problem}")
        self.path = path


class InsecureKeyFileError(KeyFileError):
    """A private key file that group or others may read; refused like ssh does."""

    default_reason = "KEY_FILE_INSECURE"

    def __init__(self, path: str, mode: int) -> None:
        super().__init__(
            path,
            f"permissions {mode:04o} are too open; a private key must be readable "
            f"by its owner only (chmod 600 {path})",
        )
        self.mode = mode


class StoreError(SigwireError):
    """A server's store that cannot be used: not a database, damaged, or open elsewhere."""

    default_reason = "STORE"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"store {path}: {problem}")
        self.path = path


class EnvelopeError(SigwireError):
    """A message that cannot be decoded or lacks a required field (expected)."""

    default_reason = "MALFORMED"


class MessageTooLargeError(EnvelopeError):
    """A message larger than the receiver's limit."""

    default_reason = "PAYLOAD_TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message of {size} bytes exceeds the limit of {limit} bytes",
            details={"size": str(size), "limit": str(limit)},
        )
        self.size = size
        self.limit = limit

    def _restore_from_details(self) -> None:
        self.size = _int(self.details.get("size"))
        self.limit = _int(self.details.get("limit"))


class MisdirectedError(SigwireError):
    """An envelope addressed to a different recipient DID."""

    default_reason = "RECIPIENT_MISMATCH"


class SigningError(SigwireError):
    """A message whose author cannot be authenticated."""

    default_reason = "SIGNATURE_INVALID"


class SignatureMissingError(SigningError):
    """An unsigned message where signatures are required."""

    default_reason = "SIGNATURE_MISSING"


class InvalidSignatureError(SigningError):
    """A signature that does not verify, has the wrong length, or the wrong signer."""

    default_reason = "SIGNATURE_INVALID"


class UnsupportedAlgorithmError(SigningError):
    """A signature algorithm other than Ed25519."""

    default_reason = "ALGORITHM_UNSUPPORTED"

    def __init__(self, algorithm: str) -> None:
        super().__init__(
            f"unsupported signature algorithm {algorithm!r}; supported: Ed25519",
            details={"algorithm": algorithm},
        )
        self.algorithm = algorithm

    def _restore_from_details(self) -> None:
        self.algorithm = self.details.get("algorithm", "")


class InvalidDidError(SigningError):
    """A DID that is malformed, of an unsupported method, or holds a bad key."""

    default_reason = "DID_INVALID"

    def __init__(self, did: str, problem: str) -> None:
        shown = did if len(did) <= 120 else did[:117] + "..."
        super().__init__(f"invalid DID {shown!r}: {problem}", details={"did": shown})
        self.did = did

    def _restore_from_details(self) -> None:
        self.did = self.details.get("did", "")


class UnknownSignerError(SigningError):
    """A correctly signed message from a DID the trust policy does not admit.

    With ``expected``: from another agent than the one pinned (``expect_did``).
    """

    default_reason = "SIGNER_UNKNOWN"

    def __init__(self, did: str, *, expected: str | None = None) -> None:
        if expected is None:
            super().__init__(f"signer {did} is not trusted here", details={"signer": did})
        else:
            super().__init__(
                f"expected {expected}, the agent is {did}",
                details={"signer": did, "expected": expected},
            )
        self.did = did
        self.expected = expected

    def _restore_from_details(self) -> None:
        self.did = self.details.get("signer", "")
        self.expected = self.details.get("expected")


class ReplayError(SigningError):
    """A nonce seen before with different content: a replayed or forged message."""

    default_reason = "REPLAY"


class StaleMessageError(ReplayError):
    """A timestamp outside the receiver's replay window (too old or in the future).

    ``floor_ms`` is set when the timestamp is inside the window but at or
    before the floor of a replay guard that let go of nonces (expired, or
    forgotten to make room).
    """

    default_reason = "TIMESTAMP_OUT_OF_WINDOW"

    def __init__(self, skew_ms: int, *, floor_ms: int | None = None) -> None:
        if floor_ms is not None:
            # Inside the window, but older than what a full replay guard remembers.
            message = (
                f"message timestamp ({skew_ms} ms from the receiver's clock) is at or "
                f"before {floor_ms}, the newest its replay guard no longer remembers"
            )
            details = {"skew_ms": str(skew_ms), "floor_ms": str(floor_ms)}
        else:
            when = "old" if skew_ms < 0 else "far in the future"
            message = f"message timestamp is {abs(skew_ms)} ms {when}, outside the replay window"
            details = {"skew_ms": str(skew_ms)}
        super().__init__(message, details=details)
        self.skew_ms = skew_ms
        self.floor_ms = floor_ms

    def _restore_from_details(self) -> None:
        self.skew_ms = _int(self.details.get("skew_ms"))
        floor = self.details.get("floor_ms")
        self.floor_ms = _int(floor) if floor is not None else None


class KindUnknownError(SigwireError):
    """No handler is registered for the envelope's kind."""

    default_reason = "KIND_UNKNOWN"


class RateLimitedError(SigwireError):
    """Too many messages from one sender; retry after ``retry_after`` seconds."""

    default_reason = "RATE_LIMITED"

    def __init__(self, message: str = "rate limit exceeded", *, retry_after: float = 1.0) -> None:
        ms = max(1, round(retry_after * 1000))
        super().__init__(message, details={"retry_after_ms": str(ms)})
        self.retry_after = ms / 1000

    def _restore_from_details(self) -> None:
        self.retry_after = _int(self.details.get("retry_after_ms"), 1000) / 1000


class OverloadedError(SigwireError):
    """A bounded resource (in-flight window, replay cache, outbox) is full."""

    default_reason = "OVERLOADED"


class PushExpiredError(SigwireError):
    """A push whose agent neither came back nor answered in time; it was withdrawn."""

    default_reason = "PUSH_EXPIRED"


class HandlerError(SigwireError):
    """The handler crashed; the traceback stays in the server log under ``error_id``."""

    default_reason = "HANDLER_FAILED"

    def __init__(self, error_id: str) -> None:
        super().__init__(
            f"the handler failed; the server logged it as error {error_id}",
            details={"error_id": error_id},
        )
        self.error_id = error_id

    def _restore_from_details(self) -> None:
        self.error_id = self.details.get("error_id", "")


class InternalError(SigwireError):
    """The agent itself failed (its store, say; not a handler); logged under ``error_id``."""

    default_reason = "INTERNAL"

    def __init__(self, error_id: str) -> None:
        super().__init__(
            f"the agent failed unexpectedly; the server logged it as error {error_id}",
            details={"error_id": error_id},
        )
        self.error_id = error_id

    def _restore_from_details(self) -> None:
        self.error_id = self.details.get("error_id", "")


class ApplicationError(SigwireError):
    """Raised by a handler to refuse a request with its own reason.

    Example: ``raise ApplicationError("no such task", reason="TASK_NOT_FOUND")``.
    """

    default_reason = "APPLICATION_ERROR"


class TransportError(SigwireError):
    """A failure to move bytes; expected in normal operation."""

    default_reason = "TRANSPORT"


class ConnectError(TransportError):
    """The peer could not be reached: refused, unresolvable, or never ready."""

    default_reason = "UNAVAILABLE"


class DeadlineExceededError(TransportError):
    """The call did not complete before its deadline."""

    default_reason = "DEADLINE_EXCEEDED"


class ConnectionClosedError(TransportError):
    """The connection ended while the call was pending."""

    default_reason = "CONNECTION_CLOSED"


class ShuttingDownError(ConnectionClosedError):
    """The peer is draining and accepts no new work."""

    default_reason = "SHUTTING_DOWN"


class HandlerCancelledError(ShuttingDownError):
    """The agent stopped while this request's handler ran; it may or may not have acted."""

    default_reason = "HANDLER_CANCELLED"


class RemoteError(TransportError):
    """The peer answered with an error whose reason this version does not know."""

    default_reason = "UNKNOWN"


class NoTransportAvailableError(SigwireError):
    """Every candidate endpoint failed.

    Attributes:
        attempts: ``(url, error)`` for each candidate, in the order tried.
    """

    default_reason = "NO_TRANSPORT"

    def __init__(self, attempts: Sequence[tuple[str, BaseException]]) -> None:
        self.attempts = tuple(attempts)
        lines = "; ".join(
            str(err) if str(err).startswith(url) else f"{url}: {err}" for url, err in self.attempts
        )
        super().__init__(f"no transport available ({lines or 'no candidates'})")


def _all_classes() -> dict[str, type[SigwireError]]:
    found: dict[str, type[SigwireError]] = {}
    pending: list[type[SigwireError]] = [SigwireError]
    while pending:
        cls = pending.pop()
        if "default_reason" in vars(cls):
            # Ancestors are visited first, so a subclass that redeclares its
            # parent's reason wins: SIGNATURE_INVALID is InvalidSignatureError,
            # not its parent SigningError. A subclass that merely inherits a
            # reason does not take it over.
            found[cls.default_reason] = cls
        pending.extend(cls.__subclasses__())
    return found


def error_from_wire(
    reason: str, message: str, details: Mapping[str, str] | None = None
) -> SigwireError:
    """Rebuild the error a peer reported, as the most specific local class.

    Args:
        reason: The wire reason, e.g. ``"KIND_UNKNOWN"``.
        message: The peer's human-readable message.
        details: The peer's machine-readable details.

    Returns:
        An instance with ``remote=True``: the class whose ``default_reason`` is
        ``reason``, :class:`ApplicationError` for ``APPLICATION_ERROR``, or
        :class:`RemoteError` (keeping ``reason``) for reasons this version does
        not know, such as a handler's own.
    """
    cls = _all_classes().get(reason, RemoteError)
    # Bypass the structured constructors: the peer's words are kept verbatim.
    err = cls.__new__(cls)
    SigwireError.__init__(err, message, reason=reason, details=details, remote=True)
    err._restore_from_details()
    return err


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
