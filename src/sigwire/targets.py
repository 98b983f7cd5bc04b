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

__all__ = [
    "ANY_ORIGIN",
    "DEFAULT_PORTS",
    "DEFAULT_WS_PATH",
    "KNOWN_SCHEMES",
    "Target",
    "parse_origin",
    "parse_target",
]

DEFAULT_WS_PATH = "/sigwire/v1"
DEFAULT_PORTS = {"grpc": 50051, "grpcs": 443, "ws": 80, "wss": 443}
KNOWN_SCHEMES = ("grpc", "grpcs", "ws", "wss", "unix", "memory")
_TLS_SCHEMES = frozenset({"grpcs", "wss"})
# Schemes that never leave the host: no network to protect, with or without TLS.
_LOCAL_SCHEMES = frozenset({"unix", "memory"})
ANY_ORIGIN = "*"
"""Among allowed origins: web pages of every origin."""
_WEB_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


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

    @property
    def insecure(self) -> bool:
        """Plaintext over a network: neither TLS nor a local socket or name."""
        return not self.tls and self.scheme not in _LOCAL_SCHEMES

    @property
    def wildcard(self) -> bool:
        """The host is an unspecified address (``0.0.0.0``, ``::``): bound to, never reached."""
        ip = _ip(self.host)
        return ip is not None and ip.is_unspecified

    @property
    def loopback(self) -> bool:
        """The host is ``localhost`` or a loopback address (or the scheme is local)."""
        if self.scheme in _LOCAL_SCHEMES:
            return True
        ip = _ip(self.host)
        return ip.is_loopback if ip is not None else self.host.lower() == "localhost"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    # ::ffff:127.0.0.1 is 127.0.0.1 (Python < 3.13 does not say so itself).
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


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


def parse_origin(text: str) -> tuple[str, str, int | None]:
    """The ``(scheme, host, port)`` of a web origin, as browsers send it in ``Origin``.

    Origins compare as RFC 6454 says: scheme and host case-insensitively, and
    a default port equals no port, so ``HTTPS://Example.COM:443`` is
    ``https://example.com``. (Browsers send hosts lower-case, IDNs in punycode.)

    Raises:
        ValueError: Not ``scheme://host[:port]``. The opaque origin ``null``
            (sandboxed frames, ``file:`` pages) is refused too: every such page
            sends the same ``null``, so none can be told apart.
    """
    problem = (
        f"not an origin: {text[:120]!r} (expected scheme://host[:port], such as "
        f"https://app.example.com, or {ANY_ORIGIN} for any)"
    )
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(problem) from None
    host = (parts.hostname or "").lower()
    if not parts.scheme or not host or parts.path not in ("", "/"):
        raise ValueError(problem)
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError(problem)
    scheme = parts.scheme.lower()
    return scheme, host, port if port is not None else _WEB_PORTS.get(scheme)
