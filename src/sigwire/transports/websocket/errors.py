"""sigwire reasons <-> WebSocket close codes, and the shared stream adapter.

Per-request errors travel as signed error Replies, exactly as on gRPC
Connect. A close code ends the whole stream; its reason text starts with the
sigwire reason (``"PAYLOAD_TOO_LARGE: message of ..."``) so that clients in
any language can act on it.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from sigwire import _proto
from sigwire.errors import (
    ConnectionClosedError,
    EnvelopeError,
    SigwireError,
    error_from_wire,
)

__all__ = ["JSON_SUBPROTOCOL", "PROTO_SUBPROTOCOL", "WebSocketStream", "close_code"]

CLOSE_TIMEOUT = 1.0
"""Seconds to wait for the peer's close frame before dropping the connection."""

_JSON_INLINE = 16 * 1024
"""Size of a frame converted to or from JSON on the event loop; larger ones go to a worker
thread (json_format converts field by field in Python: ~35 ms per MB)."""

PROTO_SUBPROTOCOL = "sigwire.v1.proto"
JSON_SUBPROTOCOL = "sigwire.v1.json"

CLOSE_BY_REASON = {
    "": 1000,
    "CONNECTION_CLOSED": 1000,
    "SHUTTING_DOWN": 1001,
    "PROTOCOL": 1002,
    "UNSUPPORTED_DATA": 1003,
    "MALFORMED": 1007,
    "PAYLOAD_TOO_LARGE": 1009,
    "HEARTBEAT_TIMEOUT": 1011,
    "INTERNAL": 1011,
    "OVERLOADED": 1013,
    "RATE_LIMITED": 1013,
}


def close_code(reason: str) -> int:
    """The close code a sigwire reason ends a WebSocket with."""
    return CLOSE_BY_REASON.get(reason, 1008)


def _close_text(reason: str, message: str) -> str:
    text = f"{reason}: {message}" if reason else message
    # A close frame's reason is at most 123 bytes of UTF-8.
    raw = text.encode()[:123]
    return raw.decode(errors="ignore")


# Close codes that websockets itself sends (without a sigwire reason text).
_REASON_BY_CLOSE = {1001: "SHUTTING_DOWN", 1009: "PAYLOAD_TOO_LARGE", 1013: "OVERLOADED"}


def _closed_error(exc: ConnectionClosed, where: str) -> SigwireError:
    close = exc.rcvd or exc.sent
    if close is None:
        return ConnectionClosedError(f"{where}: connection lost")
    reason, sep, message = close.reason.partition(": ")
    if sep and reason.isupper() and close.code != 1000:
        return error_from_wire(reason, message)
    if close.code in _REASON_BY_CLOSE:
        return error_from_wire(_REASON_BY_CLOSE[close.code], close.reason or where)
    return ConnectionClosedError(f"{where}: closed with code {close.code} {close.reason!r}".strip())


class WebSocketStream:
    """A WebSocket connection as a FrameStream (binary protobuf or JSON frames)."""

    def __init__(self, ws: Connection, *, json: bool, where: str) -> None:
        self.ws = ws
        self._json = json
        self._where = where

    async def send(self, data: bytes) -> None:
        try:
            if not self._json:
                await self.ws.send(data)
            elif len(data) <= _JSON_INLINE:
                await self.ws.send(_proto.frame_to_json(data))
            else:
                await self.ws.send(await asyncio.to_thread(_proto.frame_to_json, data))
        except ConnectionClosed as exc:
            raise _as_closed(_closed_error(exc, self._where)) from None

    async def recv(self) -> bytes | None:
        try:
            message = await self.ws.recv()
        except ConnectionClosedOK:
            return None
        except ConnectionClosed as exc:
            raise _as_closed(_closed_error(exc, self._where)) from None
        if self._json:
            if not isinstance(message, str):
                raise EnvelopeError(
                    f"binary message on the {JSON_SUBPROTOCOL} subprotocol",
                    reason="UNSUPPORTED_DATA",
                )
            if len(message) <= _JSON_INLINE:
                return _proto.frame_from_json(message)
            # Off the loop, bounds first: frame_from_json counts the values a
            # parse would build before parsing, and json_format walks a large
            # frame in Python for milliseconds.
            return await asyncio.to_thread(_proto.frame_from_json, message)
        if not isinstance(message, bytes):
            raise EnvelopeError(
                f"text message on the {PROTO_SUBPROTOCOL} subprotocol", reason="UNSUPPORTED_DATA"
            )
        return message

    async def close(self, reason: str = "", message: str = "") -> None:
        # The closing handshake waits for the peer's close frame; a partitioned
        # or dead peer never sends one, so it gets a short grace, then the
        # socket is dropped.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(close_code(reason), _close_text(reason, message))
        except TimeoutError:
            self.ws.transport.abort()


def _as_closed(err: SigwireError) -> SigwireError:
    if isinstance(err, ConnectionClosedError):
        return err
    return ConnectionClosedError(str(err), reason=err.reason, details=err.details, remote=True)
