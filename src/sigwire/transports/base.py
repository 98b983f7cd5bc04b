"""The small interfaces every transport implements.

A transport moves serialized ``sigwire.v1.Frame`` bytes over one
bidirectional stream (:class:`FrameStream`); everything above it (sessions,
correlation, the inbound pipeline) is shared by all transports.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

from sigwire.envelope import AgentCard
from sigwire.signing import Identity
from sigwire.targets import Target

if TYPE_CHECKING:
    from sigwire.dispatch import Dispatcher
    from sigwire.session import Session

__all__ = [
    "ClientOptions",
    "Connector",
    "FrameStream",
    "Health",
    "Listener",
    "ServerCore",
    "TlsClientConfig",
    "TlsServerConfig",
]


class FrameStream(Protocol):
    """One bidirectional stream of serialized Frames."""

    async def send(self, data: bytes) -> None:
        """Send one serialized Frame.

        Raises:
            ConnectionClosedError: The stream is closed.
        """

    async def recv(self) -> bytes | None:
        """The next serialized Frame, or None once the peer closed the stream.

        Raises:
            ConnectionClosedError: The stream broke.
        """

    async def close(self, reason: str = "", message: str = "") -> None:
        """Close the stream (idempotent); ``reason`` is a sigwire error reason."""


@dataclasses.dataclass(frozen=True, slots=True)
class TlsClientConfig:
    """TLS settings of a client.

    Attributes:
        ca_file: PEM roots to verify the server with; None uses the system roots.
        cert_file: PEM client certificate, for mTLS.
        key_file: PEM key of ``cert_file``.
        server_name: Override of the name checked in the server certificate.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """What a health probe found.

    Attributes:
        status: ``"SERVING"``, ``"NOT_SERVING"`` or ``"UNKNOWN"``.
        latency: Round-trip time of the probe, in seconds.
    """

    status: str
    latency: float


@dataclasses.dataclass(frozen=True, slots=True)
class ClientOptions:
    """What a connector needs besides the target.

    Attributes:
        identity: Who the client is (for transports that authenticate channels).
        tls: TLS settings for ``grpcs://`` and ``wss://``.
        connect_timeout: Seconds to wait for the endpoint to become ready.
        max_message_size: Largest frame accepted from the peer, in bytes.
        keepalive: Seconds between transport-level keepalive pings.
    """

    identity: Identity
    tls: TlsClientConfig | None = None
    connect_timeout: float = 5.0
    max_message_size: int = 4 * 1024 * 1024
    keepalive: float = 20.0


class Connector(Protocol):
    """Opens streams to one kind of target (one per URL scheme family)."""

    async def open(self, target: Target, options: ClientOptions) -> FrameStream:
        """Probe ``target`` for real (ready within ``options.connect_timeout``) and open a stream.

        Raises:
            ConnectError: The endpoint is unreachable, refused, or never ready.
        """

    async def health(self, target: Target, options: ClientOptions) -> Health:
        """Ask the endpoint's health service.

        Raises:
            ConnectError: The endpoint is unreachable.
        """

    async def describe(self, target: Target, options: ClientOptions) -> AgentCard:
        """Fetch the endpoint's signed AgentCard (the caller verifies it).

        Raises:
            ConnectError: The endpoint is unreachable.
        """

    async def aclose(self) -> None:
        """Release pooled resources (channels, sockets)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TlsServerConfig:
    """TLS for ``grpcs://`` and ``wss://`` listeners.

    Attributes:
        cert_file: PEM certificate chain of the server.
        key_file: PEM private key of that certificate.
        client_ca_file: If set, clients must present a certificate signed by
            this CA (mutual TLS).
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class ServerCore(Protocol):
    """What a listener needs from :class:`sigwire.Server`."""

    @property
    def dispatcher(self) -> Dispatcher:
        """The inbound pipeline."""
        ...

    def card(self) -> AgentCard:
        """The signed agent card."""
        ...

    def new_session(self, stream: FrameStream, name: str) -> Session:
        """Create and register a session for a new Connect stream."""
        ...


class Listener(Protocol):
    """One bound endpoint of a server (a gRPC or a WebSocket listener)."""

    url: str

    async def start(self) -> str:
        """Bind and serve; returns the bound URL."""
        ...

    async def drain(self) -> None:
        """Stop accepting new work (health NOT_SERVING, new connections refused)."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop serving; open connections get ``grace`` seconds."""
        ...
