"""The WebSocket transport (websockets, asyncio API): the fallback where gRPC cannot pass."""

from sigwire.transports.websocket.client import WebSocketConnector
from sigwire.transports.websocket.server import WebSocketListener

__all__ = ["WebSocketConnector", "WebSocketListener"]
