"""The exception tree and rebuilding peers' errors from their wire reasons."""

from __future__ import annotations

import builtins
import inspect

import pytest

import sigwire
from sigwire import errors
from sigwire.errors import (
    ApplicationError,
    ConnectionClosedError,
    HandlerError,
    InsecureKeyFileError,
    InvalidDidError,
    InvalidSignatureError,
    InvalidTargetError,
    KindUnknownError,
    MessageTooLargeError,
    NoTransportAvailableError,
    RateLimitedError,
    RemoteError,
    ShuttingDownError,
    SigningError,
    SigwireError,
    StaleMessageError,
    TransportError,
    UnknownSignerError,
    UnsupportedAlgorithmError,
    error_from_wire,
)

ERROR_CLASSES = [
    obj
    for name in errors.__all__
    if inspect.isclass(obj := getattr(errors, name)) and issubclass(obj, BaseException)
]
# Every class whose reason names it on the wire; SigningError shares SIGNATURE_INVALID with
# its more specific subclass InvalidSignatureError, which is what a peer's error becomes,
# as SigwireError shares INTERNAL with InternalError.
WIRE_CLASSES = [cls for cls in ERROR_CLASSES if cls not in (SigningError, SigwireError)]


def test_error_classes_are_all_exported() -> None:
    """errors.__all__ lists every exception class defined there; sigwire re-exports them."""
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }
    assert defined == {cls.__name__ for cls in ERROR_CLASSES}
    assert len(ERROR_CLASSES) > 20
    for cls in ERROR_CLASSES:
        assert getattr(sigwire, cls.__name__) is cls


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_derives_from_sigwire_error(cls: type[BaseException]) -> None:
    """Every error class derives from SigwireError and has a non-empty upper-case reason."""
    assert issubclass(cls, SigwireError)
    assert cls.default_reason
    assert cls.default_reason == cls.default_reason.upper()


def test_no_builtin_is_shadowed() -> None:
    """No sigwire error is named like a builtin exception."""
    assert not {cls.__name__ for cls in ERROR_CLASSES} & set(dir(builtins))


@pytest.mark.parametrize("cls", WIRE_CLASSES, ids=lambda cls: cls.__name__)
def test_error_from_wire_rebuilds_the_class(cls: type[SigwireError]) -> None:
    """error_from_wire gives the class of each known reason, remote, keeping message and details."""
    err = error_from_wire(cls.default_reason, "the peer's words", {"k": "v"})
    assert type(err) is cls
    assert err.remote is True
    assert err.reason == cls.default_reason
    assert err.message == "the peer's words"
    assert err.details == {"k": "v"}
    assert str(err) == f"peer: the peer's words [{cls.default_reason}]"


def test_signature_invalid_becomes_invalid_signature_error() -> None:
    """SIGNATURE_INVALID from a peer is an InvalidSignatureError (and thus a SigningError)."""
    err = error_from_wire("SIGNATURE_INVALID", "bad signature")
    assert type(err) is InvalidSignatureError
    assert isinstance(err, SigningError)


def test_remote_error_can_be_caught_like_a_local_one() -> None:
    """A peer's KIND_UNKNOWN is caught by `except KindUnknownError` like a local one."""
    with pytest.raises(KindUnknownError):
        raise error_from_wire("KIND_UNKNOWN", "no handler for 'x'")


@pytest.mark.parametrize("reason", ["TASK_NOT_FOUND", "SOMETHING_NEW", "lower_case", "é"])
def test_unknown_reason_becomes_remote_error(reason: str) -> None:
    """An unknown reason becomes a RemoteError (a TransportError) that keeps the reason."""
    err = error_from_wire(reason, "what the peer said", {"a": "b"})
    assert type(err) is RemoteError
    assert isinstance(err, TransportError)
    assert err.reason == reason
    assert err.remote is True
    assert err.details == {"a": "b"}
    assert str(err) == f"peer: what the peer said [{reason}]"


def test_empty_reason_becomes_remote_error() -> None:
    """An empty reason becomes a RemoteError with the reason UNKNOWN."""
    err = error_from_wire("", "no reason given")
    assert type(err) is RemoteError
    assert err.reason == "UNKNOWN"


def test_application_error_with_own_reason_arrives_as_remote_error() -> None:
    """A handler's ApplicationError with its own reason arrives as RemoteError with that reason."""
    local = ApplicationError("no such task", reason="TASK_NOT_FOUND")
    assert local.reason == "TASK_NOT_FOUND"
    remote = error_from_wire(local.reason, local.message, local.details)
    assert type(remote) is RemoteError
    assert remote.reason == "TASK_NOT_FOUND"
    assert remote.message == "no such task"


def _round_trip(err: SigwireError) -> SigwireError:
    remote = error_from_wire(err.reason, err.message, err.details)
    assert type(remote) is type(err)
    assert remote.remote is True
    assert err.remote is False
    return remote


def test_rate_limited_restores_retry_after() -> None:
    """RateLimitedError's retry_after survives the wire in milliseconds."""
    remote = _round_trip(RateLimitedError(retry_after=0.25))
    assert isinstance(remote, RateLimitedError)
    assert remote.retry_after == 0.25
    assert remote.details == {"retry_after_ms": "250"}


@pytest.mark.parametrize(
    ("details", "retry_after"),
    [({}, 1.0), ({"retry_after_ms": "abc"}, 1.0), ({"retry_after_ms": "1500"}, 1.5)],
)
def test_rate_limited_from_wire_defaults(details: dict[str, str], retry_after: float) -> None:
    """RATE_LIMITED without a usable retry_after_ms means retry after one second."""
    err = error_from_wire("RATE_LIMITED", "slow down", details)
    assert isinstance(err, RateLimitedError)
    assert err.retry_after == retry_after


def test_rate_limited_retry_after_is_at_least_one_ms() -> None:
    """A zero retry_after is rounded up to one millisecond."""
    assert RateLimitedError(retry_after=0).retry_after == 0.001


def test_handler_error_restores_error_id() -> None:
    """HandlerError's error_id survives the wire and is named in its message."""
    local = HandlerError("e-1234")
    assert "e-1234" in str(local)
    remote = _round_trip(local)
    assert isinstance(remote, HandlerError)
    assert remote.error_id == "e-1234"


def test_invalid_did_restores_did() -> None:
    """InvalidDidError's did survives the wire."""
    remote = _round_trip(InvalidDidError("did:web:example.com", "unsupported method"))
    assert isinstance(remote, InvalidDidError)
    assert remote.did == "did:web:example.com"


def test_unknown_signer_restores_did() -> None:
    """UnknownSignerError's did survives the wire."""
    did = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"
    remote = _round_trip(UnknownSignerError(did))
    assert isinstance(remote, UnknownSignerError)
    assert remote.did == did


@pytest.mark.parametrize("skew_ms", [-400_000, 45_000, 0])
def test_stale_message_restores_skew(skew_ms: int) -> None:
    """StaleMessageError's skew_ms survives the wire, sign included."""
    remote = _round_trip(StaleMessageError(skew_ms))
    assert isinstance(remote, StaleMessageError)
    assert remote.skew_ms == skew_ms


def test_message_too_large_restores_size_and_limit() -> None:
    """MessageTooLargeError's size and limit survive the wire."""
    local = MessageTooLargeError(5_000_000, 4_194_304)
    assert "5000000" in str(local)
    assert "4194304" in str(local)
    remote = _round_trip(local)
    assert isinstance(remote, MessageTooLargeError)
    assert (remote.size, remote.limit) == (5_000_000, 4_194_304)


def test_unsupported_algorithm_restores_algorithm() -> None:
    """UnsupportedAlgorithmError's algorithm survives the wire."""
    remote = _round_trip(UnsupportedAlgorithmError("RS256"))
    assert isinstance(remote, UnsupportedAlgorithmError)
    assert remote.algorithm == "RS256"


def test_restored_attributes_tolerate_missing_details() -> None:
    """Known reasons with no details still get their attributes, with neutral values."""
    too_large = error_from_wire("PAYLOAD_TOO_LARGE", "x")
    assert isinstance(too_large, MessageTooLargeError)
    assert (too_large.size, too_large.limit) == (0, 0)
    stale = error_from_wire("TIMESTAMP_OUT_OF_WINDOW", "x")
    assert isinstance(stale, StaleMessageError)
    assert stale.skew_ms == 0
    crashed = error_from_wire("HANDLER_FAILED", "x")
    assert isinstance(crashed, HandlerError)
    assert crashed.error_id == ""
    bad_did = error_from_wire("DID_INVALID", "x")
    assert isinstance(bad_did, InvalidDidError)
    assert bad_did.did == ""


def test_shutting_down_is_a_connection_closed_error() -> None:
    """A peer's SHUTTING_DOWN is caught as ConnectionClosedError."""
    with pytest.raises(ConnectionClosedError):
        raise error_from_wire("SHUTTING_DOWN", "draining")
    assert issubclass(ShuttingDownError, TransportError)


def test_str_formats_message_and_reason() -> None:
    """str() of a local error is 'message [REASON]'; of a remote one it starts with 'peer: '."""
    assert str(KindUnknownError("no handler")) == "no handler [KIND_UNKNOWN]"
    assert str(KindUnknownError("no handler", remote=True)) == "peer: no handler [KIND_UNKNOWN]"
    assert str(SigwireError()) == "INTERNAL"
    assert str(ApplicationError("nope", reason="MINE")) == "nope [MINE]"


def test_details_are_copied() -> None:
    """An error keeps its own copy of the details it was given."""
    details = {"a": "1"}
    err = SigwireError("x", details=details)
    details["a"] = "2"
    assert err.details == {"a": "1"}


def test_insecure_key_file_message_names_mode() -> None:
    """InsecureKeyFileError names the path, the octal mode and the fix."""
    err = InsecureKeyFileError("/k.pem", 0o644)
    assert "0644" in str(err)
    assert "chmod 600 /k.pem" in str(err)
    assert err.reason == "KEY_FILE_INSECURE"


def test_invalid_target_message_names_url() -> None:
    """InvalidTargetError names the URL and the problem."""
    err = InvalidTargetError("grpc://x:0", "bad port")
    assert str(err) == "invalid target 'grpc://x:0': bad port [TARGET_INVALID]"


def test_invalid_did_message_truncates_long_dids() -> None:
    """InvalidDidError shows at most 120 characters of the DID but keeps all of it."""
    did = "did:key:z" + "1" * 10_000
    err = InvalidDidError(did, "too long")
    assert err.did == did
    assert len(err.details["did"]) == 120
    assert len(str(err)) < 300


def test_no_transport_available_lists_attempts() -> None:
    """NoTransportAvailableError lists each candidate and what it failed with."""
    attempts = [
        ("grpc://h:1", ConnectionRefusedError("refused")),
        ("ws://h:2", KindUnknownError("nope")),
    ]
    err = NoTransportAvailableError(attempts)
    assert err.attempts == tuple(attempts)
    assert "grpc://h:1: refused" in str(err)
    assert "ws://h:2: nope [KIND_UNKNOWN]" in str(err)
    assert "no candidates" in str(NoTransportAvailableError([]))
