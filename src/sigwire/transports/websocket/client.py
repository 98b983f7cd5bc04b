"""The WebSocket client side: connect with a real handshake, health, the card over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidURI, WebSocketException

from sigwire import _proto
from sigwire.envelope import AgentCard
from sigwire.errors import ConnectError, EnvelopeError
from sigwire.session import max_frame_size
from sigwire.targets import Target
from sigwire.transports.base import ClientOptions, Health, TlsClientConfig
from sigwire.transports.websocket.errors import (
    CLOSE_TIMEOUT,
    PROTO_SUBPROTOCOL,
    WebSocketStream,
)
from sigwire.transports.websocket.server import WELL_KNOWN_PATH

__all__ = ["WebSocketConnector"]

_MAX_CARD = 256 * 1024


def _ssl_context(target: Target, tls: TlsClientConfig | None) -> ssl.SSLContext | None:
    if not target.tls:
        return None
    tls = tls or TlsClientConfig()
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _server_hostname(target: Target, tls: TlsClientConfig | None) -> str | None:
    if not target.tls:
        return None
    return tls.server_name if tls and tls.server_name else target.host


def _ws_url(target: Target) -> str:
    return f"{'wss' if target.tls else 'ws'}://{target.authority}{target.path}"


class WebSocketConnector:
    """Opens Connect streams over WebSocket (``ws://`` and ``wss://``)."""

    async def _connect(self, target: Target, options: ClientOptions) -> WebSocketStream:
        limit = max_frame_size(options.max_message_size)
        tls = options.tls
        try:
            ws = await connect(
                _ws_url(target),
                subprotocols=[PROTO_SUBPROTOCOL],  # type: ignore[list-item]
                compression=None,
                max_size=limit,
                close_timeout=CLOSE_TIMEOUT,
                open_timeout=options.connect_timeout,
                ping_interval=options.keepalive,
                ping_timeout=options.keepalive,
                ssl=_ssl_context(target, tls),
                server_hostname=tls.server_name if tls and tls.server_name else None,
            )
        except TimeoutError:
            raise ConnectError(
                f"{target.url}: no WebSocket handshake within {options.connect_timeout:g}s",
                details={"url": target.url},
            ) from None
        except (OSError, InvalidHandshake, InvalidURI, WebSocketException) as exc:
            raise ConnectError(f"{target.url}: {exc}", details={"url": target.url}) from None
        if ws.subprotocol != PROTO_SUBPROTOCOL:
            await ws.close(1002, "PROTOCOL: expected subprotocol " + PROTO_SUBPROTOCOL)
            raise ConnectError(f"{target.url}: the server did not accept {PROTO_SUBPROTOCOL}")
        return WebSocketStream(ws, json=False, where=target.url)

    async def open(self, target: Target, options: ClientOptions) -> WebSocketStream:
        """Complete a WebSocket handshake (the probe) and return the stream."""
        return await self._connect(target, options)

    async def health(self, target: Target, options: ClientOptions) -> Health:
        """Open a connection and time one WebSocket ping/pong."""
        stream = await self._connect(target, options)
        try:
            started = time.perf_counter()
            pong = await stream.ws.ping()
            async with asyncio.timeout(options.connect_timeout):
                await pong
            return Health(status="SERVING", latency=time.perf_counter() - started)
        except TimeoutError:
            raise ConnectError(f"{target.url}: no pong in time") from None
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def describe(self, target: Target, options: ClientOptions) -> AgentCard:
        """GET the card from ``/.well-known/sigwire-agent.json`` (HTTP/1.1)."""
        try:
            async with asyncio.timeout(options.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    target.host,
                    target.port,
                    ssl=_ssl_context(target, options.tls),
                    server_hostname=_server_hostname(target, options.tls),
                )
                try:
                    writer.write(
                        f"GET {WELL_KNOWN_PATH} HTTP/1.1\r\nHost: {target.authority}\r\n"
                        "Accept: application/json\r\nConnection: close\r\n\r\n".encode()
                    )
                    await writer.drain()
                    raw = await reader.read(_MAX_CARD)
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        except TimeoutError:
            raise ConnectError(f"{target.url}: no agent card within the timeout") from None
        except OSError as exc:
            raise ConnectError(f"{target.url}: {exc}") from None
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            raise ConnectError(f"{target.url}: agent card request answered {head[:60]!r}")
        try:
            json.loads(body)
        except ValueError:
            raise EnvelopeError("the agent card is not JSON") from None
        return _proto.card_from_json(body)

    async def aclose(self) -> None:
        """Nothing pooled: each stream owns its connection."""
