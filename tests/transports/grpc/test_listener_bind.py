"""A gRPC listener that cannot bind says why, instead of grpc's bare "Failed to bind"."""

from __future__ import annotations

import re
import socket

import pytest

from sigwire.server import Server
from sigwire.signing import Identity


async def test_listening_on_a_port_in_use_names_the_cause() -> None:
    """Server.start on a port another socket listens on raises OSError saying it is in use."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        server = Server(Identity.generate(), grpc=address)
        with pytest.raises(
            OSError, match=re.escape(f"cannot serve gRPC on {address}: address already in use")
        ):
            await server.start()


async def test_listening_on_an_unknown_host_names_the_cause() -> None:
    """Server.start on a host name that does not resolve raises OSError saying so."""
    server = Server(Identity.generate(), grpc="no-such-host.invalid:0")
    with pytest.raises(OSError, match=r"no-such-host\.invalid:0: unknown host"):
        await server.start()
