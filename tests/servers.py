"""Real sigwire servers for the network suites: the probe, handlers and start/stop they share.

The integration, parity and hostile suites each serve their own set of kinds
from their own conftest. What the sets have in common is written once here;
where the suites differ (listeners, how ``block`` reports that it started, the
``refuse`` message, what teardown checks) the difference is a parameter that
each conftest spells out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import sigwire

LOCAL = "127.0.0.1:0"
"""Listen address of every test server: loopback, a port the system picks."""

SECRET = "secret internal detail"
"""Text of the exception the crashing handlers raise; it must never reach a peer."""

MakeServer = Callable[..., Awaitable[sigwire.Server]]


class Probe:
    """What the handlers did, and a gate the test opens.

    Each suite subclasses it to add how ``block`` reports that it started.

    Attributes:
        calls: Invocations per kind.
        gate: ``block`` invocations wait for it; teardown opens it before the servers stop.
    """

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.gate = asyncio.Event()


P = TypeVar("P", bound=Probe)


def install_shared_handlers(
    server: sigwire.Server,
    probe: Probe,
    *,
    block_entered: Callable[[bytes], None],
    refuse_message: str | None = None,
    serve_counted: bool = False,
    empty_count_is_zero: bool = False,
) -> None:
    """Register the kinds more than one suite serves, each counted in ``probe.calls``.

    ``echo`` returns the payload; ``count`` streams ``part 0`` to ``part N-1`` for a
    payload of N; ``crash`` raises a ValueError of SECRET; ``block`` waits for
    ``probe.gate``, then returns ``released `` + the payload.

    Args:
        server: The server to register on.
        probe: Where the handlers count their invocations.
        block_entered: Called with its payload as a ``block`` invocation starts.
        refuse_message: Also serve ``refuse``, which raises an ApplicationError with this
            message and reason TASK_NOT_FOUND.
        serve_counted: Also serve ``counted``, which returns ``run N`` on its Nth invocation.
        empty_count_is_zero: ``count`` takes an empty payload as 0 instead of failing on it.
    """

    @server.on("echo")
    async def echo(msg: sigwire.Message) -> bytes:
        probe.calls["echo"] += 1
        return msg.payload

    @server.on("count")
    async def count(msg: sigwire.Message) -> AsyncIterator[str]:
        probe.calls["count"] += 1
        n = int((msg.payload or b"0") if empty_count_is_zero else msg.payload)
        for i in range(n):
            yield f"part {i}"

    @server.on("crash")
    async def crash(msg: sigwire.Message) -> bytes:
        probe.calls["crash"] += 1
        raise ValueError(SECRET)

    @server.on("block")
    async def block(msg: sigwire.Message) -> bytes:
        probe.calls["block"] += 1
        block_entered(msg.payload)
        await probe.gate.wait()
        return b"released " + msg.payload

    if refuse_message is not None:

        @server.on("refuse")
        async def refuse(msg: sigwire.Message) -> bytes:
            probe.calls["refuse"] += 1
            raise sigwire.ApplicationError(refuse_message, reason="TASK_NOT_FOUND")

    if serve_counted:

        @server.on("counted")
        async def counted(msg: sigwire.Message) -> str:
            probe.calls["counted"] += 1
            return f"run {probe.calls['counted']}"


@contextlib.asynccontextmanager
async def serving(
    identity: sigwire.Identity,
    probe: P,
    install: Callable[[sigwire.Server, P], None],
    listeners: Callable[[], dict[str, str]],
    *,
    stop_timeout: float | None,
    check_sessions_ended: bool,
) -> AsyncIterator[MakeServer]:
    """Start servers on demand; on exit open ``probe.gate`` and stop every one.

    Args:
        identity: The servers' identity, unless a call passes its own ``identity=``.
        probe: Handed to ``install``; its gate releases blocked handlers before the stop.
        install: Registers the suite's handlers on each new server.
        listeners: The default listener options of a new server (the call's own options
            win); called once per server, so that each can have a fresh memory name.
        stop_timeout: Bound on each server's stop, or None for none.
        check_sessions_ended: Assert that each stopped server lists no connected peer.

    Yields:
        ``make(**options)``: builds a sigwire.Server, starts it and returns it.
    """
    servers: list[sigwire.Server] = []

    async def make(**options: Any) -> sigwire.Server:
        for name, value in listeners().items():
            options.setdefault(name, value)
        server = sigwire.Server(options.pop("identity", identity), **options)
        install(server, probe)
        servers.append(server)
        await server.start()
        return server

    yield make
    probe.gate.set()
    for server in servers:
        async with asyncio.timeout(stop_timeout):
            await server.stop(grace=0)
        if check_sessions_ended:
            # A stopped server lists nobody: every session ended and unregistered.
            assert server.connected() == []
