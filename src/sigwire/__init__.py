"""sigwire: signed agent-to-agent messaging over gRPC, with a WebSocket fallback."""

import os

# grpc's C core reads its log level once, when grpc is imported, and by
# default logs every failed TLS handshake at INFO on stderr, in its own
# format, beside the error sigwire raises for it. A level set by the user
# wins; this must run before anything below imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from sigwire.client import Backoff, Peer, connect
from sigwire.dispatch import Limits
from sigwire.envelope import AgentCard, Envelope, Message, Reply, ReplyError, Signature
from sigwire.errors import (
    ApplicationError,
    ConnectError,
    ConnectionClosedError,
    DeadlineExceededError,
    EnvelopeError,
    HandlerCancelledError,
    HandlerError,
    InsecureKeyFileError,
    InternalError,
    InvalidDidError,
    InvalidSignatureError,
    InvalidTargetError,
    KeyFileError,
    KindUnknownError,
    MessageTooLargeError,
    MisdirectedError,
    NoTransportAvailableError,
    OverloadedError,
    PushExpiredError,
    RateLimitedError,
    RemoteError,
    ReplayError,
    ShuttingDownError,
    SignatureMissingError,
    SigningError,
    SigwireError,
    StaleMessageError,
    StoreError,
    TransportError,
    UnknownSignerError,
    UnsupportedAlgorithmError,
    UnsupportedSchemeError,
)
from sigwire.server import Server
from sigwire.session import SessionOptions
from sigwire.signing import (
    AllowList,
    Identity,
    OpenTrust,
    ReplayGuard,
    TrustPolicy,
    Verifier,
    did_from_public_key,
    public_key_from_did,
)
from sigwire.targets import Target, parse_target
from sigwire.transports.base import TlsClientConfig, TlsServerConfig
from sigwire.transports.registry import Registry, default_registry

__version__ = "0.1.0"

__all__ = [
    "AgentCard",
    "AllowList",
    "ApplicationError",
    "Backoff",
    "ConnectError",
    "ConnectionClosedError",
    "DeadlineExceededError",
    "Envelope",
    "EnvelopeError",
    "HandlerCancelledError",
    "HandlerError",
    "Identity",
    "InsecureKeyFileError",
    "InternalError",
    "InvalidDidError",
    "InvalidSignatureError",
    "InvalidTargetError",
    "KeyFileError",
    "KindUnknownError",
    "Limits",
    "Message",
    "MessageTooLargeError",
    "MisdirectedError",
    "NoTransportAvailableError",
    "OpenTrust",
    "OverloadedError",
    "Peer",
    "PushExpiredError",
    "RateLimitedError",
    "Registry",
    "RemoteError",
    "ReplayError",
    "ReplayGuard",
    "Reply",
    "ReplyError",
    "Server",
    "SessionOptions",
    "ShuttingDownError",
    "Signature",
    "SignatureMissingError",
    "SigningError",
    "SigwireError",
    "StaleMessageError",
    "StoreError",
    "Target",
    "TlsClientConfig",
    "TlsServerConfig",
    "TransportError",
    "TrustPolicy",
    "UnknownSignerError",
    "UnsupportedAlgorithmError",
    "UnsupportedSchemeError",
    "Verifier",
    "__version__",
    "connect",
    "default_registry",
    "did_from_public_key",
    "parse_target",
    "public_key_from_did",
]
