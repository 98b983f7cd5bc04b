"""The WebSocket listener: Connect semantics over ``websockets``, plus the card over HTTP.

Serves the Connect stream at a path (default ``/sigwire/v1``) with two
subprotocols negotiated by name: ``sigwire.v1.proto`` (one binary protobuf
Frame per message) and ``sigwire.v1.json`` (one text message per Frame, in
protobuf's canonical JSON mapping). ``GET /.well-known/sigwire-agent.json``
on the same port returns the signed AgentCard as JSON.

A handshake that carries an ``Origin`` header comes from a web page, which
any site can make a visitor's browser open: it is refused (403) unless its
origin is allowed. Handshakes without one (programs, not browsers) pass.
"""

from __future__ import annotations

import contextlib
import http
import logging
import ssl
from collections.abc import Iterable, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from sigwire import _proto
from sigwire.session import max_frame_size
from sigwire.targets import ANY_ORIGIN, DEFAULT_WS_PATH, parse_origin
from sigwire.transports.base import ServerCore, TlsServerConfig
from sigwire.transports.websocket.errors import (
    CLOSE_TIMEOUT,
    JSON_SUBPROTOCOL,
    PROTO_SUBPROTOCOL,
    WebSocketStream,
)

__all__ = ["WELL_KNOWN_PATH", "WebSocketListener"]

log = logging.getLogger("sigwire.server")

WELL_KNOWN_PATH = "/.well-known/sigwire-agent.json"


def _select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    for name in offered:
        if name in (PROTO_SUBPROTOCOL, JSON_SUBPROTOCOL):
            return name
    return None


class WebSocketListener:
    """One WebSocket server bound to one address.

    Args:
        core: The sigwire server it serves.
        address: ``HOST:PORT`` (port 0 picks a free one).
        path: Where the Connect stream is served.
        tls: Certificate and key: serve ``wss://``.
        keepalive: Seconds between WebSocket pings (a peer that misses a
            pong for as long is dropped).
        compression: Offer permessage-deflate (off by default: it costs ~25%
            of throughput and the payloads are often already compact).
        allow_origins: Origins of the web pages allowed to connect
            (``scheme://host[:port]``), or ``*`` for any; by default none.

    Raises:
        ValueError: An entry of ``allow_origins`` is not an origin.
    """

    def __init__(
        self,
        core: ServerCore,
        address: str,
        *,
        path: str = DEFAULT_WS_PATH,
        tls: TlsServerConfig | None = None,
        keepalive: float = 20.0,
        compression: bool = False,
        allow_origins: Iterable[str] = (),
    ) -> None:
        self.core = core
        self.address = address
        self.path = path
        self.tls = tls
        self.keepalive = keepalive
        self.compression = compression
        origins = list(allow_origins)
        self.allowed_origins = (
            None if ANY_ORIGIN in origins else frozenset(parse_origin(o) for o in origins)
        )
        self.url = ""
        self._server: Server | None = None
        self._draining = False

    async def start(self) -> str:
        """Bind and serve; returns the bound URL (e.g. ``ws://127.0.0.1:8765/sigwire/v1``)."""
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        limit = max_frame_size(self.core.dispatcher.limits.max_message_size)
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            if self.tls.client_ca_file:
                context.load_verify_locations(self.tls.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
        self._server = await serve(
            self._handle,
            host,
            int(port),
            subprotocols=[PROTO_SUBPROTOCOL, JSON_SUBPROTOCOL],  # type: ignore[list-item]
            # Accept the handshake even without a known subprotocol, so that
            # _handle can close with 1002 and say which ones to offer.
            select_subprotocol=_select_subprotocol,
            compression="deflate" if self.compression else None,
            process_request=self._http,
            max_size=limit,
            ping_interval=self.keepalive,
            ping_timeout=self.keepalive,
            ssl=context,
            server_header=None,
            close_timeout=CLOSE_TIMEOUT,
        )
        bound = next(iter(self._server.sockets)).getsockname()
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'wss' if self.tls else 'ws'}://{shown}:{bound[1]}{self.path}"
        return self.url

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == WELL_KNOWN_PATH:
            body = _proto.card_to_json(self.core.card()).encode()
            headers = Headers(
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "max-age=60"),
                ]
            )
            return Response(200, "OK", headers, body)
        if request.path.split("?", 1)[0] != self.path:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "no sigwire endpoint here\n")
        refusal = self._refuse_origin(request.headers.get_all("Origin"))
        if refusal:
            return connection.respond(http.HTTPStatus.FORBIDDEN, refusal)
        if self._draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return None

    def _refuse_origin(self, origins: Sequence[str]) -> str:
        """Why a handshake with these ``Origin`` headers is refused; "" if it is not."""
        if not origins or self.allowed_origins is None:
            return ""
        if len(origins) > 1:
            return "more than one Origin header\n"
        with contextlib.suppress(ValueError):
            if parse_origin(origins[0]) in self.allowed_origins:
                return ""
        shown = origins[0] if len(origins[0]) <= 120 else origins[0][:117] + "..."
        log.info("refused a WebSocket handshake from origin %r", shown)
        return (
            f"origin {shown} may not open a sigwire stream here: the agent admits web "
            "pages only from the origins its operator allows (--allow-origin)\n"
        )

    async def _handle(self, ws: ServerConnection) -> None:
        subprotocol = ws.subprotocol
        if subprotocol not in (PROTO_SUBPROTOCOL, JSON_SUBPROTOCOL):
            await ws.close(
                1002, f"PROTOCOL: offer subprotocol {PROTO_SUBPROTOCOL} or {JSON_SUBPROTOCOL}"
            )
            return
        where = f"ws {ws.remote_address}"
        stream = WebSocketStream(ws, json=subprotocol == JSON_SUBPROTOCOL, where=where)
        session = self.core.new_session(stream, where)
        await session.run()

    async def drain(self) -> None:
        """Refuse new connections (503); open ones are drained by the server."""
        self._draining = True

    async def stop(self, grace: float) -> None:
        """Close the listener and any connection still open."""
        server, self._server = self._server, None
        if server is None:
            return
        self._draining = True
        server.close(close_connections=True)
        with contextlib.suppress(Exception):
            await server.wait_closed()
