"""The agent server: handlers, listeners, pushes to connected agents, draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

from sigwire.calls import Correlator
from sigwire.dispatch import Dispatcher, Handler, Handlers, Limits
from sigwire.envelope import AgentCard, Envelope, Reply, now_ms
from sigwire.errors import (
    ConnectError,
    ConnectionClosedError,
    DeadlineExceededError,
    ShuttingDownError,
)
from sigwire.session import Session, SessionOptions
from sigwire.signing import Identity, ReplayGuard, TrustPolicy, Verifier
from sigwire.targets import DEFAULT_WS_PATH
from sigwire.transports.base import FrameStream, Listener, TlsServerConfig
from sigwire.transports.grpc.server import GrpcListener
from sigwire.transports.memory import MemoryListener
from sigwire.transports.websocket.server import WebSocketListener

__all__ = ["Server"]

log = logging.getLogger("sigwire.server")


class Server:
    """A sigwire agent server.

    Example::

        server = Server(Identity.generate(), grpc="127.0.0.1:0")

        @server.on("echo")
        async def echo(msg: Message) -> bytes:
            return msg.payload

        async with server:
            print(server.urls)

    Args:
        identity: The agent's identity; signs every reply and push.
        grpc: ``HOST:PORT`` to serve gRPC on (port 0 picks one), or ``unix:/path``.
        ws: ``HOST:PORT`` to serve the WebSocket fallback on (port 0 picks one).
        ws_path: The WebSocket path (default ``/sigwire/v1``).
        memory: A name to serve in-process at ``memory://NAME`` (tests, embedding).
        name: Human-readable name published in the agent card.
        trust: Which authenticated senders are admitted (default: all).
        require_signatures: Refuse unsigned envelopes (default True).
        limits: Message size, rate, window and cache limits.
        session: Heartbeat settings of Connect streams.
        tls: Certificate and key: serve ``grpcs://``/``wss://`` instead of ``grpc://``/``ws://``.
        keepalive: Seconds between HTTP/2 keepalive pings.
        replay_guard: Replay window and nonce cache (default: 5 min back, 30 s ahead).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        grpc: str | None = None,
        ws: str | None = None,
        ws_path: str = DEFAULT_WS_PATH,
        memory: str | None = None,
        name: str = "",
        trust: TrustPolicy | None = None,
        require_signatures: bool = True,
        limits: Limits | None = None,
        session: SessionOptions | None = None,
        tls: TlsServerConfig | None = None,
        keepalive: float = 20.0,
        replay_guard: ReplayGuard | None = None,
    ) -> None:
        self.identity = identity
        self.name = name
        self.handlers = Handlers()
        self.limits = limits or Limits()
        self.session_options = session or SessionOptions(window=self.limits.window)
        self.verifier = Verifier(trust, require_signatures=require_signatures)
        self.dispatcher = Dispatcher(
            identity, self.handlers, verifier=self.verifier, guard=replay_guard, limits=self.limits
        )
        self.correlator = Correlator(self.verifier)
        self.urls: list[str] = []
        # In preference order, as the agent card lists them: gRPC, then WebSocket.
        self._listeners: list[Listener] = []
        if grpc is not None:
            self._listeners.append(GrpcListener(self, grpc, tls=tls, keepalive=keepalive))
        if ws is not None:
            self._listeners.append(
                WebSocketListener(self, ws, path=ws_path, tls=tls, keepalive=keepalive)
            )
        if memory is not None:
            self._listeners.append(MemoryListener(self, memory))
        self._sessions: dict[str, list[Session]] = {}
        self._all_sessions: set[Session] = set()
        self._card: AgentCard | None = None
        self._stopped = asyncio.Event()
        self._started = False

    def on(self, kind: str) -> Callable[[Handler], Handler]:
        """Decorator registering a handler for ``kind`` (see :meth:`Handlers.on`)."""
        self._card = None  # the card lists the kinds
        return self.handlers.on(kind)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener and start serving."""
        if self._started:
            return
        if not self._listeners:
            raise ValueError("give at least one listener (grpc=..., ws=... or memory=...)")
        self._started = True
        self.dispatcher.accepting = True
        try:
            self.urls = [await listener.start() for listener in self._listeners]
        except BaseException:
            await self.stop(grace=0)
            raise
        self._card = None
        log.info("sigwire agent %s serving on %s", self.identity.did, ", ".join(self.urls))

    async def stop(self, grace: float = 5.0) -> None:
        """Drain and stop.

        New envelopes are refused with SHUTTING_DOWN and health turns
        NOT_SERVING; every Connect stream gets a GoAway; handlers already
        running get up to ``grace`` seconds, then are cancelled; streams are
        closed (never left to hang the grpc server) and listeners stopped.
        """
        if not self._started:
            return
        self._started = False
        self.dispatcher.accepting = False
        for listener in self._listeners:
            await listener.drain()
        grace_ms = int(grace * 1000)
        for session in list(self._all_sessions):
            session.send_goaway("SHUTTING_DOWN", "the agent is shutting down", grace_ms)
        running = self.dispatcher.running()
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self.correlator.fail_all(ShuttingDownError("the server is shutting down"))
        gone = ShuttingDownError("the agent is shutting down")
        closing = [session.close(gone) for session in list(self._all_sessions)]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(grace, 1.0)):
                await asyncio.gather(*closing, return_exceptions=True)
        for listener in self._listeners:
            await listener.stop(grace=0.5)
        self._stopped.set()
        log.info("sigwire agent %s stopped", self.identity.did)

    async def wait_stopped(self) -> None:
        """Wait until :meth:`stop` completes."""
        await self._stopped.wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what listeners call -------------------------------------------------

    def card(self) -> AgentCard:
        """This agent's signed card: DID, endpoints in preference order, kinds, limits."""
        if self._card is None:
            self._card = self.identity.sign_card(
                AgentCard(
                    did=self.identity.did,
                    name=self.name,
                    endpoints=tuple(self.urls),
                    kinds=self.handlers.kinds(),
                    max_message_size=self.limits.max_message_size,
                    created_at_ms=now_ms(),
                )
            )
        return self._card

    def new_session(self, stream: FrameStream, name: str) -> Session:
        """Create a session for a new Connect stream; it registers when bound to a DID."""
        session = Session(
            stream,
            self.dispatcher,
            on_reply=self.correlator.deliver,
            options=self.session_options,
            on_bind=self._bound,
            on_closed=self._gone,
            name=name,
        )
        self._all_sessions.add(session)
        return session

    def _bound(self, session: Session, did: str) -> None:
        self._sessions.setdefault(did, []).append(session)

    def _gone(self, session: Session) -> None:
        self._all_sessions.discard(session)
        if session.peer_did is not None:
            sessions = self._sessions.get(session.peer_did, [])
            if session in sessions:
                sessions.remove(session)
            if not sessions:
                self._sessions.pop(session.peer_did, None)

    # -- pushing -------------------------------------------------------------

    def connected(self) -> list[str]:
        """DIDs of agents with an open Connect stream."""
        return sorted(self._sessions)

    async def push(
        self,
        did: str,
        kind: str,
        payload: bytes = b"",
        *,
        timeout: float = 30.0,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "",
        context_id: str = "",
        task_id: str = "",
    ) -> Reply:
        """Send a signed envelope to a connected agent and wait for its signed reply.

        Raises:
            ConnectError: No Connect stream from ``did`` is open.
            DeadlineExceededError: No reply within ``timeout``.
            ConnectionClosedError: The stream closed before the reply.
            SigwireError: The agent's error reply, as its specific class.
        """
        sessions = [s for s in self._sessions.get(did, ()) if s.is_open]
        if not sessions:
            raise ConnectError(f"agent {did} is not connected", details={"did": did})
        session = sessions[-1]
        envelope = self.identity.sign_envelope(
            Envelope.new(
                kind,
                payload,
                sender=self.identity.did,
                recipient=did,
                metadata=metadata,
                content_type=content_type,
                context_id=context_id,
                task_id=task_id,
                role="agent",
            )
        )
        call = self.correlator.add(envelope, expected_responder=did)
        try:
            async with asyncio.timeout(timeout):
                await session.send_envelope(envelope)
                waiter = asyncio.ensure_future(call.next())
                closed = asyncio.ensure_future(session.closed.wait())
                try:
                    done, _ = await asyncio.wait(
                        (waiter, closed), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    closed.cancel()
                if waiter not in done:
                    waiter.cancel()
                    raise ConnectionClosedError(f"agent {did} disconnected before replying")
                return waiter.result()
        except TimeoutError:
            raise DeadlineExceededError(f"no reply from {did} within {timeout:g}s") from None
        finally:
            self.correlator.discard(call)
