"""The agent server: handlers, listeners, pushes to connected agents, draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Self

from sigwire import _proto
from sigwire.calls import Correlator, PendingCall
from sigwire.dispatch import Dispatcher, Handler, Handlers, Limits
from sigwire.envelope import AgentCard, Envelope, Reply, now_ms
from sigwire.errors import (
    ConnectionClosedError,
    InvalidTargetError,
    OverloadedError,
    PushExpiredError,
    ShuttingDownError,
)
from sigwire.session import Session, SessionOptions
from sigwire.signing import Identity, ReplayGuard, TrustPolicy, Verifier
from sigwire.store import SqliteStore
from sigwire.targets import DEFAULT_WS_PATH, Target, parse_target
from sigwire.transports.base import FrameStream, Listener, TlsServerConfig
from sigwire.transports.grpc.server import GrpcListener
from sigwire.transports.memory import MemoryListener
from sigwire.transports.websocket.server import WebSocketListener

__all__ = ["Server"]

log = logging.getLogger("sigwire.server")

# How often a drain looks again for handlers whose reader has gone (seconds).
_UNREAD_CHECK = 0.1


class _Turn:
    """The lock that orders deliveries to one DID, and how many hold or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


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
        ws_compression: Offer permessage-deflate on WebSocket (off: it costs
            about a quarter of the throughput).
        memory: A name to serve in-process at ``memory://NAME`` (tests, embedding).
        name: Human-readable name published in the agent card.
        trust: Which authenticated senders are admitted (default: all).
        require_signatures: Refuse unsigned envelopes (default True).
        limits: Message size, rate, window and cache limits.
        session: Heartbeat settings of Connect streams.
        tls: Certificate and key: serve ``grpcs://``/``wss://`` instead of ``grpc://``/``ws://``.
        keepalive: Seconds between HTTP/2 keepalive pings.
        replay_guard: Replay window and nonce cache (default: 5 min back, 30 s ahead).
        store: A SQLite file (or :class:`~sigwire.store.SqliteStore`) keeping the
            push outbox, the reply cache and the hellos seen across restarts;
            default: memory. A file given by path is opened here (and locked:
            one server per store) and closed by :meth:`stop`.
        allow_origins: Web page origins (``https://app.example.com``) whose
            pages may open a WebSocket stream, or ``"*"`` for any. By default
            a handshake carrying an ``Origin`` header (a browser's) is refused.
        advertise: The URLs the agent card publishes, in preference order,
            instead of the bound ones: where clients reach this agent (behind
            NAT, a proxy, or a listener bound to ``0.0.0.0``). Without it the
            card lists the bound URLs, except those on a wildcard address.

    Raises:
        StoreError: The store file cannot be used, or another process has it open.
        ValueError: An ``allow_origins`` entry is not an origin.
        InvalidTargetError: An ``advertise`` URL is invalid or on a wildcard address.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        grpc: str | None = None,
        ws: str | None = None,
        ws_path: str = DEFAULT_WS_PATH,
        ws_compression: bool = False,
        memory: str | None = None,
        name: str = "",
        trust: TrustPolicy | None = None,
        require_signatures: bool = True,
        limits: Limits | None = None,
        session: SessionOptions | None = None,
        tls: TlsServerConfig | None = None,
        keepalive: float = 20.0,
        replay_guard: ReplayGuard | None = None,
        store: str | os.PathLike[str] | SqliteStore | None = None,
        allow_origins: Iterable[str] = (),
        advertise: Iterable[str] = (),
    ) -> None:
        self.identity = identity
        self.advertise = tuple(_advertised(url) for url in advertise)
        self.name = name
        self.handlers = Handlers()
        self.limits = limits or Limits()
        self.session_options = session or SessionOptions(window=self.limits.window)
        self.verifier = Verifier(trust, require_signatures=require_signatures)
        # A store opened from a path is this server's own: closed at stop.
        self._store_path = store if isinstance(store, str | os.PathLike) else None
        self.store = SqliteStore(store) if isinstance(store, str | os.PathLike) else store
        self.dispatcher = Dispatcher(
            identity,
            self.handlers,
            verifier=self.verifier,
            guard=replay_guard,
            limits=self.limits,
            store=self.store,
        )
        self.correlator = Correlator(self.verifier, fail_on_invalid=False)
        self.urls: list[str] = []
        # In preference order, as the agent card lists them: gRPC, then WebSocket.
        self._listeners: list[Listener] = []
        if grpc is not None:
            self._listeners.append(GrpcListener(self, grpc, tls=tls, keepalive=keepalive))
        if ws is not None:
            self._listeners.append(
                WebSocketListener(
                    self,
                    ws,
                    path=ws_path,
                    tls=tls,
                    keepalive=keepalive,
                    compression=ws_compression,
                    allow_origins=allow_origins,
                )
            )
        if memory is not None:
            self._listeners.append(MemoryListener(self, memory))
        self._sessions: dict[str, list[Session]] = {}
        self._all_sessions: set[Session] = set()
        self._card: AgentCard | None = None
        self._outboxes: dict[str, dict[str, PendingCall]] = {}
        # One delivery at a time per DID; an entry lives while one holds or waits for it.
        self._delivering: dict[str, _Turn] = {}
        self._background: set[asyncio.Task[None]] = set()
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
        if self._store_path is not None and self.store is not None and self.store.closed:
            self.store = self.dispatcher.cache.store = SqliteStore(self._store_path)
        self._started = True
        self.dispatcher.accepting = True
        try:
            self.urls = [await listener.start() for listener in self._listeners]
        except BaseException:
            await self.stop(grace=0)
            raise
        self._card = None
        self._restore_outbox()
        log.info("sigwire agent %s serving on %s", self.identity.did, ", ".join(self.urls))
        for url in self.urls:
            target = _target(url)
            if target is not None and target.insecure and not target.loopback:
                log.warning(
                    "%s serves plaintext beyond this host: anyone on the path reads and "
                    "alters its traffic (signatures still hold); serve TLS (--tls-cert and "
                    "--tls-key) or bind to 127.0.0.1",
                    url,
                )

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
        await self._finish_running(grace)
        self.correlator.fail_all(ShuttingDownError("the server is shutting down"))
        for task in list(self._background):
            task.cancel()
        gone = ShuttingDownError("the agent is shutting down")
        closing = [session.close(gone) for session in list(self._all_sessions)]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(grace, 1.0)):
                await asyncio.gather(*closing, return_exceptions=True)
        for listener in self._listeners:
            await listener.stop(grace=0.5)
        self._outboxes.clear()
        if self.store is not None:
            try:
                self.store.prune()
            except Exception:
                # A broken store must not keep the agent from stopping (nor
                # from releasing the store's lock below).
                log.exception("pruning the store at stop failed")
            if self._store_path is not None:
                self.store.close()  # and its lock: the next server may open it
        self._stopped.set()
        log.info("sigwire agent %s stopped", self.identity.did)

    async def _finish_running(self, grace: float) -> None:
        # Handlers get the grace, except streaming ones held back for a reader
        # that has gone: nobody can come back for their answers while the
        # agent drains. Readers may leave at any time, hence the re-check.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.dispatcher.cancel_unread()
        running = set(self.dispatcher.running())
        while running and (left := deadline - loop.time()) > 0:
            _, running = await asyncio.wait(running, timeout=min(left, _UNREAD_CHECK))
            self.dispatcher.cancel_unread()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

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
                    endpoints=self.advertise or _reachable(self.urls),
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
            pending=self.correlator.get,
            options=self.session_options,
            on_bind=self._bound,
            on_closed=self._gone,
            name=name,
        )
        self._all_sessions.add(session)
        return session

    def _bound(self, session: Session, did: str) -> None:
        self._sessions.setdefault(did, []).append(session)
        if did in self._outboxes:
            task = asyncio.create_task(self._deliver(did))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

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
        """Send a signed envelope to an agent and wait for its signed reply.

        The envelope goes into the agent's outbox first, so an agent that is
        offline or reconnecting still gets it: pushes are delivered in order,
        on whichever Connect stream the agent opens next, until ``timeout``.
        An agent that comes back runs each push once (a re-sent push is
        answered from its reply cache). With a store, the outbox survives a
        restart of this server: a push still unanswered when the server stops
        (or dies) is delivered after the restart, though its pusher, gone with
        the old process, no longer hears the reply.

        Raises:
            OverloadedError: The agent's outbox is full (``Limits.outbox_size``).
            PushExpiredError: No reply within ``timeout``; the push is withdrawn.
            SigwireError: The agent's error reply, as its specific class.
        """
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
        call = self._enqueue(did, envelope, now_ms() + int(timeout * 1000))
        try:
            async with asyncio.timeout(timeout):
                await self._deliver(did)
                return await call.next()
        except TimeoutError:
            raise PushExpiredError(
                f"{did} did not answer {kind!r} within {timeout:g}s; the push was withdrawn",
                details={"did": did, "id": envelope.id},
            ) from None
        finally:
            self._withdraw(did, call)

    def _enqueue(self, did: str, envelope: Envelope, expires_ms: int) -> PendingCall:
        outbox = self._outboxes.get(did, {})
        if len(outbox) >= self.limits.outbox_size:
            raise OverloadedError(
                f"the outbox for {did} is full ({self.limits.outbox_size} pushes)",
                details={"did": did},
            )
        if self.store is not None:
            # First: a full store refuses the push (OverloadedError) before it is queued.
            data = _proto.envelope_to_pb(envelope).SerializeToString()
            self.store.add_push(did, envelope.id, data, expires_ms)
        call = self.correlator.add(envelope, expected_responder=did)
        self._outboxes[did] = outbox
        outbox[envelope.id] = call
        return call

    def _withdraw(self, did: str, call: PendingCall) -> None:
        self.correlator.discard(call)
        outbox = self._outboxes.get(did)
        if outbox is not None and outbox.pop(call.envelope.id, None) is not None:
            if not outbox:
                del self._outboxes[did]
            # Stopping is not withdrawing: a stored push is delivered after the
            # restart, exactly as if the process had been killed.
            if self.store is not None and self._started:
                self.store.remove_push(call.envelope.id)

    async def _deliver(self, did: str) -> None:
        """Send every push of ``did``'s outbox not yet sent on its current stream, in order."""
        turn = self._delivering.get(did)
        if turn is None:
            turn = self._delivering[did] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                outbox = self._outboxes.get(did)
                sessions = [s for s in self._sessions.get(did, ()) if s.is_open]
                if not outbox or not sessions:
                    return
                session = sessions[-1]
                for call in list(outbox.values()):
                    if call.sent_on is session or call.envelope.id not in outbox:
                        continue
                    call.sent_on = session
                    try:
                        await session.send_envelope(call.envelope)
                    except ConnectionClosedError:
                        return  # delivered again when the agent reconnects
        finally:
            turn.users -= 1
            if not turn.users:
                del self._delivering[did]

    def _restore_outbox(self) -> None:
        """Re-queue the pushes a previous run accepted but never saw answered."""
        if self.store is None:
            return
        loop = asyncio.get_running_loop()
        for did, data, expires_ms in self.store.pending_pushes():
            envelope = _proto.decode_envelope(data)
            if envelope.id in self._outboxes.get(did, {}):
                continue
            call = self.correlator.add(envelope, expected_responder=did)
            self._outboxes.setdefault(did, {})[envelope.id] = call
            # Nobody awaits these: the answer itself retires them.
            call.on_final = lambda _reply, did=did, call=call: self._withdraw(did, call)
            delay = max(0.0, (expires_ms - now_ms()) / 1000)
            loop.call_later(delay, self._withdraw, did, call)
            log.info("restored push %s to %s from the store", envelope.id, did)


def _target(url: str) -> Target | None:
    try:
        return parse_target(url)
    except InvalidTargetError:
        return None


def _reachable(urls: Iterable[str]) -> tuple[str, ...]:
    """The bound URLs a client can connect to: a wildcard address is for binding only."""
    targets = [(url, _target(url)) for url in urls]
    return tuple(url for url, target in targets if target is None or not target.wildcard)


def _advertised(url: str) -> str:
    target = parse_target(url)
    if target.wildcard:
        raise InvalidTargetError(
            url, "a wildcard address is for binding, not connecting; advertise a name or address"
        )
    return url
