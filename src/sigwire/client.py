"""The client: ``async with sigwire.connect(url) as peer``.

A :class:`Peer` keeps one Connect stream to an agent. Requests and streamed
requests are multiplexed on it and correlated by id; the agent may push
envelopes, answered by handlers registered with :meth:`Peer.on`. When the
stream drops, the peer reconnects by itself with exponential backoff and
jitter and re-sends every unanswered request with the same id (the server
answers a re-sent id from its reply cache, never running a handler twice);
when reconnection is given up, every pending call fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from sigwire.calls import Correlator, PendingCall
from sigwire.dispatch import (
    ACKED,
    ACKED_KEY,
    BATCH_SIGNATURES,
    BATCH_SIGNATURES_KEY,
    HELLO_KIND,
    Dispatcher,
    Handler,
    Handlers,
    Limits,
    hello_features,
)
from sigwire.envelope import AgentCard, Envelope, Reply
from sigwire.errors import (
    ConnectionClosedError,
    DeadlineExceededError,
    InvalidTargetError,
    MessageTooLargeError,
    NoTransportAvailableError,
    SigwireError,
)
from sigwire.session import GoAwayInfo, Session, SessionOptions
from sigwire.signing import Identity, ReplayGuard, TrustPolicy, Verifier, public_key_from_did
from sigwire.targets import Target
from sigwire.transports.base import ClientOptions, Health, TlsClientConfig
from sigwire.transports.registry import Registry, default_registry

__all__ = ["Backoff", "Peer", "connect"]

log = logging.getLogger("sigwire.client")


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnection schedule: exponential, with jitter.

    Attempt ``n`` (from 0) waits ``min(maximum, initial * multiplier**n)``
    scaled by a random factor in ``[1 - jitter, 1]``, so that many clients
    cut off together do not come back together.

    Attributes:
        initial: First delay, seconds.
        maximum: Largest delay, seconds.
        multiplier: Growth per attempt.
        jitter: Fraction of each delay that is randomized.
        attempts: Attempts before giving up; None retries forever.
    """

    initial: float = 1.0
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    attempts: int | None = 10

    def delays(self) -> Iterator[float]:
        """The successive delays (a stdlib loop; no retry library needed)."""
        attempt = 0
        while self.attempts is None or attempt < self.attempts:
            base = min(self.maximum, self.initial * self.multiplier**attempt)
            yield base * (1 - self.jitter * random.random())
            attempt += 1


class Peer:
    """A connection to one agent (see :func:`connect`)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        identity: Identity | None = None,
        expect_did: str | None = None,
        registry: Registry | None = None,
        tls: TlsClientConfig | None = None,
        connect_timeout: float = 5.0,
        backoff: Backoff | None = None,
        session: SessionOptions | None = None,
        trust: TrustPolicy | None = None,
        limits: Limits | None = None,
        keepalive: float = 20.0,
        learn_endpoints: bool = True,
        allow_insecure_fallback: bool = False,
    ) -> None:
        if not urls:
            raise ValueError("give at least one URL")
        if expect_did is not None:
            public_key_from_did(expect_did)  # InvalidDidError: a pin no agent can match
        self.identity = identity or Identity.generate()
        self.expect_did = expect_did
        self._own_registry = registry is None
        self.registry = registry or default_registry()
        self.targets: list[Target] = [self.registry.parse(url) for url in urls]
        self.allow_insecure_fallback = allow_insecure_fallback
        if not allow_insecure_fallback:
            _refuse_downgrade(self.targets)
        self.options = ClientOptions(
            identity=self.identity,
            tls=tls,
            connect_timeout=connect_timeout,
            max_message_size=(limits or Limits()).max_message_size,
            keepalive=keepalive,
        )
        self.backoff = backoff or Backoff()
        self.session_options = session or SessionOptions()
        self.handlers = Handlers()
        self.verifier = Verifier(trust)
        self.dispatcher = Dispatcher(
            self.identity, self.handlers, verifier=self.verifier, guard=ReplayGuard(), limits=limits
        )
        self.correlator = Correlator(self.verifier)
        self.server_did: str | None = expect_did
        self.target: Target | None = None
        self.reconnects = 0
        self.learn_endpoints = learn_endpoints
        self.card: AgentCard | None = None
        self.peer_max_message_size: int | None = None
        self._learning: asyncio.Task[None] | None = None
        self._session: Session | None = None
        self._ready = asyncio.Event()
        self._failure: SigwireError | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    def on(self, kind: str) -> Callable[[Handler], Handler]:
        """Decorator registering a handler for pushes of ``kind`` from the agent."""
        return self.handlers.on(kind)

    @property
    def did(self) -> str:
        """This client's DID."""
        return self.identity.did

    @property
    def url(self) -> str:
        """The URL currently (or last) connected to."""
        return self.target.url if self.target else self.targets[0].url

    # -- connecting ------------------------------------------------------------

    async def start(self) -> None:
        """Connect (trying each URL in order) and start supervising the stream.

        Raises:
            NoTransportAvailableError: Every URL failed; ``.attempts`` says why.
        """
        session, task = await self._open()
        self._supervisor = asyncio.create_task(self._supervise(session, task))
        if self.learn_endpoints:
            self._learning = asyncio.create_task(self._learn_endpoints())

    async def _learn_endpoints(self) -> None:
        # Given only one URL, the agent's signed card says where else it
        # listens; verified against the DID we just authenticated, its
        # endpoints become reconnect candidates (a session that loses gRPC
        # midway may come back over the WebSocket fallback).
        try:
            card = await self.describe()
        except SigwireError as exc:
            log.debug("no agent card from %s: %s", self.url, exc)
            return
        known = {target.url for target in self.targets}
        # Over TLS, the card must not lead a reconnect to plaintext either.
        tls = not self.allow_insecure_fallback and any(t.tls for t in self.targets)
        for url in card.endpoints:
            if url in known:
                continue
            try:
                target = self.registry.parse(url)
            except SigwireError:
                log.debug("ignoring unusable endpoint %r in the agent card", url)
                continue
            if target.wildcard:
                log.debug("ignoring wildcard endpoint %r in the agent card", url)
            elif tls and target.insecure:
                log.debug("ignoring plaintext endpoint %r in the agent card", url)
            else:
                self.targets.append(target)
        self.card = card

    async def _open(self) -> tuple[Session, asyncio.Task[None]]:
        attempts: list[tuple[str, BaseException]] = []
        for target in self.targets:
            try:
                return await self._open_one(target)
            except SigwireError as exc:
                log.info("cannot use %s: %s", target.url, exc)
                attempts.append((target.url, exc))
        raise NoTransportAvailableError(attempts)

    async def _open_one(self, target: Target) -> tuple[Session, asyncio.Task[None]]:
        connector = self.registry.connector(target)
        stream = await connector.open(target, self.options)
        session = Session(
            stream,
            self.dispatcher,
            on_reply=self._on_reply,
            options=self.session_options,
            on_goaway=self._goaway,
            on_signed=self._signed,
            pending=self.correlator.get,
            name=f"client {target.url}",
        )
        task = asyncio.create_task(session.run(), name=f"sigwire-session {target.url}")
        try:
            # After the first hello, only the agent we authenticated then will do:
            # a reconnect must not silently switch to whoever answers.
            expected = self.expect_did or self.server_did
            if expected is None:
                # A hello names its recipient, so that no agent can relay ours
                # elsewhere: learn who this is from its self-signed card.
                card = await connector.describe(target, self.options)
                self.verifier.verify_card(card)
                expected = card.did
            hello = self.identity.sign_envelope(
                Envelope.new(
                    HELLO_KIND,
                    sender=self.did,
                    recipient=expected or "",
                    metadata={BATCH_SIGNATURES_KEY: "1", ACKED_KEY: "1"},
                )
            )
            call = self.correlator.add(hello, expected_responder=expected)
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    await session.send_envelope(hello)
                    reply = await _first(call, session)
            except TimeoutError:
                raise ConnectionClosedError(f"{target.url}: no hello reply in time") from None
            finally:
                self.correlator.discard(call)
        except BaseException:
            await session.close()
            await asyncio.gather(task, return_exceptions=True)
            raise
        # Batch-sign and piggyback acks only if the agent says it understands them.
        features = hello_features(reply.content_type)
        session.batch_signatures = BATCH_SIGNATURES in features
        session.piggyback_acks = ACKED in features
        session.bind(reply.responder)
        self.server_did = reply.responder
        with contextlib.suppress(ValueError):
            self.peer_max_message_size = int(reply.data or b"0") or None
        self.target = target
        self._session = session
        await self._resend(session)
        self._ready.set()
        return session, task

    async def _resend(self, session: Session) -> None:
        # Until nothing is left unsent on this session; then (with no await
        # in between) the caller marks the peer ready, so no request falls
        # between the two.
        while True:
            todo = [call for call in self.correlator.pending() if call.sent_on is not session]
            if not todo:
                return
            for call in todo:
                call.sent_on = session
                envelope = call.envelope
                signature = envelope.signature
                if (
                    signature is not None
                    and signature.batch is not None
                    and not session.batch_signatures
                ):
                    # This agent did not say it accepts batch signatures (one
                    # rolled back, or another behind the same address): the
                    # same request, re-signed on its own (a re-signed retry,
                    # answered from the reply cache if the first one ran).
                    envelope = call.envelope = envelope.renewed()
                await session.send_envelope(envelope)

    def _signed(self, unsigned: Envelope, signed: Envelope) -> None:
        # The session's writer signed a request: keep the signed one, to re-send
        # it unchanged and to check the replies bound to its signature.
        call = self.correlator.get(signed.id)
        if call is not None and call.envelope is unsigned:
            call.envelope = signed

    def _on_reply(
        self, reply: Reply, signature_checked: bool = False, forged: bool = False
    ) -> None:
        error = reply.error
        if not reply.success and error is not None and error.reason == "SHUTTING_DOWN":
            call = self.correlator.get(reply.request_id)
            if call is not None and not self._closed.is_set() and self._genuine(reply, call):
                # Refused by a draining agent before it ran: safe to send again,
                # which the supervisor does on the next stream it opens.
                call.sent_on = None
                return
        self.correlator.deliver(reply, signature_checked, forged)

    def _genuine(self, reply: Reply, call: PendingCall) -> bool:
        try:
            self.verifier.verify_reply(
                reply, call.envelope, expected_responder=call.expected_responder
            )
        except SigwireError:
            return False  # delivered normally: the correlator fails the call
        return True

    def _goaway(self, info: GoAwayInfo) -> None:
        log.info("%s is going away (%r): %r", self.url, info.reason, info.message)
        self._ready.clear()

    async def _supervise(self, session: Session, task: asyncio.Task[None]) -> None:
        while True:
            await task
            self._ready.clear()
            self._session = None
            if self._closed.is_set():
                return
            log.info("lost %s (%s); reconnecting", self.url, session.error or "closed")
            reconnected = False
            for delay in self.backoff.delays():
                await asyncio.sleep(delay)
                if self._closed.is_set():
                    return
                try:
                    session, task = await self._open()
                except SigwireError as exc:
                    log.info("reconnect failed: %s", exc)
                    continue
                self.reconnects += 1
                reconnected = True
                break
            if not reconnected:
                self._failure = ConnectionClosedError(
                    f"connection to {self.url} lost; gave up reconnecting"
                )
                self.correlator.fail_all(self._failure)
                return

    # -- calling ---------------------------------------------------------------

    def _envelope(
        self,
        kind: str,
        payload: bytes | str,
        metadata: Mapping[str, str] | None,
        extra: Mapping[str, Any],
    ) -> Envelope:
        data = payload.encode() if isinstance(payload, str) else payload
        # Refuse here what the agent would refuse: an envelope over its limit
        # would otherwise reset the stream on every re-send.
        limit = self.peer_max_message_size or self.options.max_message_size
        if len(data) > limit:
            raise MessageTooLargeError(len(data), limit)
        envelope = Envelope.new(
            kind,
            data,
            sender=self.did,
            recipient=self.server_did or "",
            metadata=metadata,
            role=extra.get("role", "agent"),
            content_type=extra.get("content_type", ""),
            context_id=extra.get("context_id", ""),
            task_id=extra.get("task_id", ""),
            id=extra.get("id"),
        )
        envelope.validate()  # the agent would refuse it; say so here
        # Signed by the session's writer, together with whatever else the
        # frame carries (one batch signature for the lot).
        return envelope

    async def _submit(self, envelope: Envelope) -> PendingCall:
        if self._failure is not None:
            raise self._failure
        if self._closed.is_set():
            raise ConnectionClosedError("the peer is closed")
        call = self.correlator.add(envelope, expected_responder=self.server_did)
        session = self._session
        if self._ready.is_set() and session is not None and session.is_open:
            call.sent_on = session
            try:
                await session.send_envelope(envelope)
            except ConnectionClosedError:
                pass  # re-sent by the supervisor after reconnecting
            except BaseException:
                # Cancelled (the caller's deadline) while waiting for window
                # credit: the call is over and must not be sent later.
                self.correlator.discard(call)
                raise
        return call

    async def request(
        self,
        kind: str,
        payload: bytes | str = b"",
        *,
        timeout: float = 30.0,
        metadata: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> Reply:
        """Send a signed request and return the agent's verified reply.

        Args:
            kind: Selects the agent's handler.
            payload: Request bytes (str is sent as UTF-8).
            timeout: Deadline in seconds for the whole call, reconnects included.
            metadata: Signed key/value pairs.
            **fields: ``context_id``, ``task_id``, ``role``, ``content_type``, ``id``.

        Raises:
            DeadlineExceededError: No reply in time.
            MessageTooLargeError: The payload exceeds the agent's limit (checked locally).
            ConnectionClosedError: The connection is gone for good.
            SigwireError: The agent's error, as its specific class (remote=True).
        """
        envelope = self._envelope(kind, payload, metadata, fields)
        try:
            async with asyncio.timeout(timeout):
                call = await self._submit(envelope)
                try:
                    return await call.next()
                finally:
                    self.correlator.discard(call)
        except TimeoutError:
            raise DeadlineExceededError(f"no reply to {kind!r} within {timeout:g}s") from None

    async def stream(
        self,
        kind: str,
        payload: bytes | str = b"",
        *,
        timeout: float = 60.0,
        metadata: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> AsyncIterator[Reply]:
        """Send a signed request and yield each streamed (verified) reply part.

        The terminal reply that ends the stream is not yielded unless it carries data.

        Raises:
            DeadlineExceededError: The stream did not finish within ``timeout``.
            SigwireError: As :meth:`request`, possibly after some parts.
        """
        envelope = self._envelope(kind, payload, metadata, fields)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                call = await self._submit(envelope)
        except TimeoutError:
            raise DeadlineExceededError(f"stream {kind!r} could not be sent in time") from None
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        reply = await call.next()
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"stream {kind!r} did not finish within {timeout:g}s"
                    ) from None
                if reply.final:
                    if reply.data:
                        yield reply
                    return
                yield reply
        finally:
            self.correlator.discard(call)

    async def describe(self) -> AgentCard:
        """The agent's card, verified against its DID (the one this peer talks to)."""
        target = self.target or self.targets[0]
        card = await self.registry.connector(target).describe(target, self.options)
        self.verifier.verify_card(card, expected_did=self.server_did)
        return card

    async def health(self) -> Health:
        """The agent's health status and the probe's round-trip time."""
        target = self.target or self.targets[0]
        return await self.registry.connector(target).health(target, self.options)

    async def close(self) -> None:
        """Close the stream; pending calls fail at once with ConnectionClosedError."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._ready.clear()
        session = self._session
        if session is not None:
            await session.close()
        for task in (self._learning, self._supervisor):
            if task is not None:
                task.cancel()
        if self._learning is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._learning
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self.correlator.fail_all(ConnectionClosedError("the client closed the connection"))
        if self._own_registry:
            await self.registry.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _refuse_downgrade(targets: Sequence[Target]) -> None:
    """Refuse a plaintext fallback listed after a TLS URL: it would undo what TLS protects."""
    secure = next((target for target in targets if target.tls), None)
    if secure is None:
        return
    for target in targets[targets.index(secure) + 1 :]:
        if target.insecure:
            raise InvalidTargetError(
                target.url,
                f"a plaintext fallback after {secure.url} would send in clear what TLS "
                "protects; list a TLS URL instead, or allow it with "
                "allow_insecure_fallback=True (--allow-insecure-fallback)",
            )


async def _first(call: PendingCall, session: Session) -> Reply:
    waiter = asyncio.ensure_future(call.next())
    closed = asyncio.ensure_future(session.closed.wait())
    try:
        done, _ = await asyncio.wait((waiter, closed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when the caller's timeout cancels us: no task is left pending.
        closed.cancel()
        if not waiter.done():
            waiter.cancel()
    if waiter not in done:
        raise session.error or ConnectionClosedError("the stream closed during the hello")
    return waiter.result()


class _Connecting:
    """``await connect(...)`` or ``async with connect(...) as peer``.

    Push handlers may be registered on it before connecting, so that pushes
    an agent has queued for us (delivered as soon as we say hello) find them::

        connection = sigwire.connect(url, identity=me)

        @connection.on("review")
        async def review(msg: sigwire.Message) -> str: ...

        async with connection as peer: ...
    """

    def __init__(self, peer: Peer) -> None:
        self._peer = peer

    def on(self, kind: str) -> Callable[[Handler], Handler]:
        """Register a push handler before connecting (see :meth:`Peer.on`)."""
        return self._peer.on(kind)

    def __await__(self) -> Generator[Any, None, Peer]:
        return self._start().__await__()

    async def _start(self) -> Peer:
        try:
            await self._peer.start()
        except BaseException:
            await self._peer.close()
            raise
        return self._peer

    async def __aenter__(self) -> Peer:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._peer.close()


def connect(url: str | Sequence[str], **options: Any) -> _Connecting:
    """Connect to an agent.

    Args:
        url: One URL, or several in preference order (each is probed for
            real, under ``connect_timeout``; the first that answers wins).
        **options: See :class:`Peer`: ``identity``, ``expect_did`` (pin the
            agent's DID), ``tls``, ``connect_timeout``, ``backoff``,
            ``session``, ``trust``, ``limits``, ``registry``, ``keepalive``,
            ``learn_endpoints`` (default True: after connecting, fetch the
            agent's verified card and add its endpoints as reconnect
            candidates, so that a session losing gRPC can come back over
            WebSocket), ``allow_insecure_fallback`` (default False: a
            plaintext URL listed after a TLS one is refused, and plaintext
            endpoints of a card learned over TLS are ignored).

    Returns:
        An awaitable that is also an async context manager yielding a :class:`Peer`.

    Raises:
        NoTransportAvailableError: No URL could be reached, or each answered as
            another agent than ``expect_did`` (an UnknownSignerError in ``.attempts``).
        InvalidTargetError: A URL is invalid, or a plaintext fallback follows a TLS URL.
        InvalidDidError: ``expect_did`` is not a did:key.
    """
    urls = [url] if isinstance(url, str) else list(url)
    return _Connecting(Peer(urls, **options))
