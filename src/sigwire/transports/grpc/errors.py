"""sigwire errors <-> gRPC status codes, with google.rpc.Status details.

Every error a sigwire server returns carries, in the ``grpc-status-details-bin``
trailer, a ``google.rpc.Status`` whose details hold a ``google.rpc.ErrorInfo``
(domain ``sigwire.dev``, the sigwire reason, the error's details as metadata)
and, for rate limits, a ``google.rpc.RetryInfo``. Any gRPC client can act on it.
"""

from __future__ import annotations

from typing import cast

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from sigwire.errors import (
    ConnectError,
    ConnectionClosedError,
    DeadlineExceededError,
    RateLimitedError,
    RemoteError,
    SigwireError,
    error_from_wire,
)

__all__ = [
    "DOMAIN",
    "STATUS_BY_REASON",
    "abort_args",
    "error_from_rpc",
    "status_code",
    "trailers_for",
]

DOMAIN = "sigwire.dev"
_DETAILS_KEY = "grpc-status-details-bin"

_S = grpc.StatusCode
STATUS_BY_REASON: dict[str, grpc.StatusCode] = {
    "MALFORMED": _S.INVALID_ARGUMENT,
    "TARGET_INVALID": _S.INVALID_ARGUMENT,
    "PAYLOAD_TOO_LARGE": _S.RESOURCE_EXHAUSTED,
    "RECIPIENT_MISMATCH": _S.PERMISSION_DENIED,
    "SIGNATURE_MISSING": _S.UNAUTHENTICATED,
    "SIGNATURE_INVALID": _S.UNAUTHENTICATED,
    "ALGORITHM_UNSUPPORTED": _S.UNAUTHENTICATED,
    "DID_INVALID": _S.UNAUTHENTICATED,
    "REPLAY": _S.UNAUTHENTICATED,
    "TIMESTAMP_OUT_OF_WINDOW": _S.UNAUTHENTICATED,
    "SIGNER_UNKNOWN": _S.PERMISSION_DENIED,
    "KIND_UNKNOWN": _S.UNIMPLEMENTED,
    "RATE_LIMITED": _S.RESOURCE_EXHAUSTED,
    "OVERLOADED": _S.RESOURCE_EXHAUSTED,
    "HANDLER_FAILED": _S.INTERNAL,
    "INTERNAL": _S.INTERNAL,
    "SHUTTING_DOWN": _S.UNAVAILABLE,
    "UNAVAILABLE": _S.UNAVAILABLE,
    "CONNECTION_CLOSED": _S.UNAVAILABLE,
    "DEADLINE_EXCEEDED": _S.DEADLINE_EXCEEDED,
}
# A handler's own reasons (ApplicationError) are refusals of a well-formed,
# authenticated request: FAILED_PRECONDITION.
_DEFAULT_STATUS = _S.FAILED_PRECONDITION


def status_code(reason: str) -> grpc.StatusCode:
    """The gRPC status code a sigwire reason travels as."""
    return STATUS_BY_REASON.get(reason, _DEFAULT_STATUS)


def trailers_for(
    reason: str, message: str, details: dict[str, str] | None = None
) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata holding the google.rpc.Status for an error."""
    code = status_code(reason)
    status = status_pb2.Status(code=code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=details or {})
    status.details.add().Pack(info)
    if reason == RateLimitedError.default_reason and details and "retry_after_ms" in details:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(details["retry_after_ms"]))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return ((_DETAILS_KEY, status.SerializeToString()),)


def abort_args(error: SigwireError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """``(code, message, trailing_metadata)`` for ``context.abort`` on ``error``."""
    return (
        status_code(error.reason),
        error.message or error.reason,
        trailers_for(error.reason, error.message, error.details),
    )


def error_from_rpc(exc: grpc.aio.AioRpcError, *, url: str = "") -> SigwireError:
    """The sigwire error a failed RPC stands for.

    Uses the ErrorInfo reason when the peer sent one; otherwise maps the bare
    status code (a transport failure, or a peer that is not sigwire).
    """
    # grpc-stubs types items as objects; grpc.aio yields (key, value) tuples.
    trailers = cast("tuple[tuple[str, str | bytes], ...]", tuple(exc.trailing_metadata() or ()))
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:
                break
            for any_detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if any_detail.Is(info.DESCRIPTOR) and any_detail.Unpack(info):
                    if info.domain == DOMAIN:
                        return error_from_wire(info.reason, status.message, dict(info.metadata))
    code = exc.code()
    where = f" ({url})" if url else ""
    details = exc.details() or code.name
    if code == _S.UNAVAILABLE:
        return ConnectError(f"unavailable{where}: {details}")
    if code == _S.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"deadline exceeded{where}")
    if code == _S.CANCELLED:
        return ConnectionClosedError(f"call cancelled{where}")
    return RemoteError(f"{code.name}{where}: {details}", reason=code.name, remote=True)
