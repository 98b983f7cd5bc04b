"""URL scheme -> transport connector; an instance you create and pass around."""

from __future__ import annotations

from collections.abc import Callable

from sigwire.errors import UnsupportedSchemeError
from sigwire.targets import Target, parse_target
from sigwire.transports.base import Connector
from sigwire.transports.grpc.client import GrpcConnector
from sigwire.transports.memory import MemoryConnector
from sigwire.transports.websocket.client import WebSocketConnector

__all__ = ["Registry", "default_registry"]


class Registry:
    """Maps URL schemes to connectors.

    Connectors are created lazily, once per factory, and shared by every
    scheme registered with that factory (``grpc``, ``grpcs`` and ``unix``
    share one channel pool).
    """

    def __init__(self) -> None:
        self._factories: dict[str, Callable[[], Connector]] = {}
        self._instances: dict[Callable[[], Connector], Connector] = {}

    def register(self, scheme: str, factory: Callable[[], Connector]) -> None:
        """Serve ``scheme://`` URLs with connectors made by ``factory``."""
        self._factories[scheme.lower()] = factory

    @property
    def schemes(self) -> frozenset[str]:
        """The registered schemes."""
        return frozenset(self._factories)

    def parse(self, url: str) -> Target:
        """Parse ``url``, accepting only registered schemes.

        Raises:
            InvalidTargetError: Malformed URL.
            UnsupportedSchemeError: Unregistered scheme; the message lists the supported ones.
        """
        return parse_target(url, tuple(sorted(self._factories)))

    def connector(self, target: Target) -> Connector:
        """The (shared) connector for ``target``'s scheme."""
        factory = self._factories.get(target.scheme)
        if factory is None:
            raise UnsupportedSchemeError(target.url, target.scheme, sorted(self._factories))
        connector = self._instances.get(factory)
        if connector is None:
            connector = self._instances[factory] = factory()
        return connector

    async def aclose(self) -> None:
        """Close every connector created so far."""
        instances, self._instances = self._instances, {}
        for connector in instances.values():
            await connector.aclose()


def default_registry() -> Registry:
    """A new registry with every built-in transport."""
    registry = Registry()
    for scheme in ("grpc", "grpcs", "unix"):
        registry.register(scheme, GrpcConnector)
    for scheme in ("ws", "wss"):
        registry.register(scheme, WebSocketConnector)
    registry.register("memory", MemoryConnector)
    return registry
