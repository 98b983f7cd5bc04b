"""Parse endpoint URLs into :class:`Target` values. No I/O.

Supported schemes (the transports that serve them are chosen by a registry in
:mod:`sigwire.transports.registry`):

========== =========================================== ============
scheme     meaning                                     default port
========== =========================================== ============
grpc://    gRPC over plaintext HTTP/2                  50051
grpcs://   gRPC over TLS                               443
ws://      WebSocket (fallback), plaintext             80
wss://     WebSocket over TLS                          443
unix://    gRPC over a Unix socket: unix:///path       --
memory://  in-process transport: memory://name         --
========== =========================================== ============
"""

from __future__ import annotations

import dataclasses
import ipaddress
import urllib.parse

from sigwire.errors import InvalidTargetError, UnsupportedSchemeError

__all__ = ["DEFAULT_PORTS", "DEFAULT_WS_PATH", "KNOWN_SCHEMES", "Target", "parse_target"]

DEFAULT_WS_PATH = "/sigwire/v1"
DEFAULT_PORTS = {"grpc": 50051, "grpcs": 443, "ws": 80, "wss": 443}
KNOWN_SCHEMES = ("grpc", "grpcs", "ws", "wss", "unix", "memory")
_TLS_SCHEMES = frozenset({"grpcs", "wss"})


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One endpoint, parsed.

    Attributes:
        url: The URL as given.
        scheme: Lower-case scheme without ``://``.
        host: Host name or IP (IPv6 without brackets); "" for unix/memory.
        port: Port number; 0 for unix/memory.
        path: The WebSocket path, the Unix socket path, or the memory name.
        tls: Whether the scheme implies TLS.
    """

    url: str
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    tls: bool = False

    @property
    def authority(self) -> str:
        """``host:port`` with IPv6 brackets, as gRPC and sockets expect."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(url: str, schemes: tuple[str, ...] | frozenset[str] = KNOWN_SCHEMES) -> Target:
    """Parse ``url`` into a :class:`Target`.

    Args:
        url: E.g. ``grpc://127.0.0.1:50051`` or ``ws://host:8765/sigwire/v1``.
        schemes: The schemes to accept (a registry passes its own).

    Raises:
        InvalidTargetError: Malformed URL, bad port, or stray components.
        UnsupportedSchemeError: A scheme not in ``schemes``.
    """
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise InvalidTargetError(str(url)[:80], "expected a URL such as grpc://host:port")
    if "://" not in url:
        raise InvalidTargetError(url, "missing scheme (e.g. grpc://host:port)")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in schemes:
        raise UnsupportedSchemeError(url, scheme, sorted(schemes))
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise InvalidTargetError(url, str(exc)) from None
    if parts.fragment:
        raise InvalidTargetError(url, "fragments are not allowed")
    if scheme == "memory":
        name = (parts.netloc + parts.path).strip("/")
        if not name or parts.query:
            raise InvalidTargetError(url, "expected memory://NAME")
        return Target(url=url, scheme=scheme, path=name)
    if scheme == "unix":
        if parts.netloc or not parts.path or parts.query:
            raise InvalidTargetError(url, "expected unix:///absolute/path/to/socket")
        return Target(url=url, scheme=scheme, path=parts.path)
    if parts.username or parts.password:
        raise InvalidTargetError(url, "credentials in URLs are not supported")
    if parts.query:
        raise InvalidTargetError(url, "query strings are not supported")
    host = parts.hostname or ""
    if not host:
        raise InvalidTargetError(url, "missing host")
    try:
        port = parts.port
    except ValueError:
        raise InvalidTargetError(url, "port must be a number from 1 to 65535") from None
    if port == 0:
        raise InvalidTargetError(url, "port must be a number from 1 to 65535")
    if port is None:
        port = DEFAULT_PORTS.get(scheme, 0)
        if not port:
            raise InvalidTargetError(url, "missing port")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidTargetError(url, f"bad IPv6 address {host!r}") from None
    path = parts.path
    if scheme in ("ws", "wss"):
        path = path or DEFAULT_WS_PATH
    elif path not in ("", "/"):
        raise InvalidTargetError(url, "gRPC targets take no path")
    else:
        path = ""
    return Target(
        url=url, scheme=scheme, host=host, port=port, path=path, tls=scheme in _TLS_SCHEMES
    )
