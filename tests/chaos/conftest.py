"""Fixtures shared by the chaos tests: the transport under test, and a proxy
in front of the module's `agent` (each module defines its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import pytest

from tests.integration.helpers import TcpProxy

TRANSPORTS = ("grpc", "ws")


class ServesUrls(Protocol):
    def url(self, transport: str) -> str: ...


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def proxy(agent: ServesUrls, transport: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy the test can cut, in front of the agent's port for `transport`."""
    port = int(agent.url(transport).split(":")[2].split("/")[0])
    proxy = TcpProxy(port)
    await proxy.listen()
    yield proxy
    await proxy.aclose()
