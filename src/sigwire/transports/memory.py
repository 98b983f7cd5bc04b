"""The in-process transport (``memory://NAME``), for tests and embedding.

Frames still travel serialized, through the same Session code as on the
network, so a test over ``memory://`` exercises everything but the socket.
Names live in a :class:`MemoryHub`; the process-wide default hub plays the
part the kernel's port table plays for sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from sigwire.envelope import AgentCard
from sigwire.errors import ConnectError, ConnectionClosedError
from sigwire.targets import Target
from sigwire.transports.base import ClientOptions, Health, ServerCore

__all__ = ["DEFAULT_HUB", "MemoryConnector", "MemoryHub", "MemoryListener"]

_CLOSED = None


class _MemoryStream:
    """One end of an in-process pipe of serialized Frames."""

    def __init__(self, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None]):
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self.peer: _MemoryStream | None = None

    async def send(self, data: bytes) -> None:
        if self._closed or (self.peer is not None and self.peer._closed):
            raise ConnectionClosedError("memory stream closed")
        self._outbox.put_nowait(bytes(data))

    async def recv(self) -> bytes | None:
        if self._closed:
            return None
        return await self._inbox.get()

    async def close(self, reason: str = "", message: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        self._outbox.put_nowait(_CLOSED)  # the peer's recv() ends
        self._inbox.put_nowait(_CLOSED)  # and so does ours


def _pipe() -> tuple[_MemoryStream, _MemoryStream]:
    a_to_b: asyncio.Queue[bytes | None] = asyncio.Queue()
    b_to_a: asyncio.Queue[bytes | None] = asyncio.Queue()
    client = _MemoryStream(inbox=b_to_a, outbox=a_to_b)
    server = _MemoryStream(inbox=a_to_b, outbox=b_to_a)
    client.peer, server.peer = server, client
    return client, server


class MemoryHub:
    """Names of in-process listeners."""

    def __init__(self) -> None:
        self._listeners: dict[str, MemoryListener] = {}

    def bind(self, name: str, listener: MemoryListener) -> None:
        if name in self._listeners:
            raise OSError(f"memory://{name} is already in use")
        self._listeners[name] = listener

    def unbind(self, name: str, listener: MemoryListener) -> None:
        if self._listeners.get(name) is listener:
            del self._listeners[name]

    def get(self, name: str) -> MemoryListener | None:
        return self._listeners.get(name)


DEFAULT_HUB = MemoryHub()


class MemoryListener:
    """Serves a sigwire server at ``memory://NAME``."""

    def __init__(self, core: ServerCore, name: str, *, hub: MemoryHub | None = None) -> None:
        self.core = core
        self.name = name
        self.hub = hub or DEFAULT_HUB
        self.url = ""
        self.serving = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.hub.bind(self.name, self)
        self.serving = True
        self.url = f"memory://{self.name}"
        return self.url

    def accept(self) -> _MemoryStream:
        """A new stream to this listener (what a client's open() gets)."""
        if not self.serving:
            raise ConnectError(f"memory://{self.name} is not accepting connections")
        client, server = _pipe()
        session = self.core.new_session(server, f"memory {self.name}")
        task = asyncio.create_task(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client

    async def drain(self) -> None:
        self.serving = False

    async def stop(self, grace: float) -> None:
        self.serving = False
        self.hub.unbind(self.name, self)
        tasks = tuple(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace or None)
            for task in late:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*late, return_exceptions=True)


class MemoryConnector:
    """Opens streams to listeners in a :class:`MemoryHub`."""

    def __init__(self, hub: MemoryHub | None = None) -> None:
        self.hub = hub or DEFAULT_HUB

    def _listener(self, target: Target) -> MemoryListener:
        listener = self.hub.get(target.path)
        if listener is None:
            raise ConnectError(f"{target.url}: no such in-process agent")
        return listener

    async def open(self, target: Target, options: ClientOptions) -> _MemoryStream:
        return self._listener(target).accept()

    async def health(self, target: Target, options: ClientOptions) -> Health:
        started = time.perf_counter()
        listener = self._listener(target)
        status = "SERVING" if listener.serving else "NOT_SERVING"
        return Health(status=status, latency=time.perf_counter() - started)

    async def describe(self, target: Target, options: ClientOptions) -> AgentCard:
        return self._listener(target).core.card()

    async def aclose(self) -> None:
        return
