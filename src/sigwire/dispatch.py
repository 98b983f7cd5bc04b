"""The inbound pipeline every transport shares, on servers and clients alike.

Every inbound envelope passes, in order: validate -> recipient -> verify
signature -> trust policy -> replay and idempotency check -> rate limit ->
handler -> signed reply. (Trust comes before the nonce cache so that refused
senders cannot fill it.) Rejections before the handler raise a
:class:`~sigwire.errors.SigwireError`; the handler's own outcome, success or
failure, becomes signed replies that are cached per ``(sender, id)`` so that a
re-sent envelope is answered again without running the handler twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import hashlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeAlias, cast

from sigwire import _proto
from sigwire._eager import start_eagerly
from sigwire.batch import BatchProof
from sigwire.envelope import Envelope, Message, Reply, ReplyError, Signature, now_ms
from sigwire.errors import (
    HandlerCancelledError,
    HandlerError,
    InternalError,
    InvalidSignatureError,
    KindUnknownError,
    MessageTooLargeError,
    MisdirectedError,
    OverloadedError,
    RateLimitedError,
    ReplayError,
    ShuttingDownError,
    SigwireError,
    StaleMessageError,
)
from sigwire.signing import Identity, ReplayGuard, Verifier
from sigwire.store import SqliteStore

__all__ = [
    "ACKED",
    "ACKED_KEY",
    "BATCH_SIGNATURES",
    "BATCH_SIGNATURES_KEY",
    "HELLO_CONTENT_TYPE",
    "HELLO_KIND",
    "Answer",
    "Dispatcher",
    "Handler",
    "HandlerResult",
    "Handlers",
    "Limits",
    "ReplyCache",
    "SessionHooks",
    "TokenBuckets",
    "finished",
    "internal_error",
    "reply_cost",
]

log = logging.getLogger("sigwire.server")

HandlerResult: TypeAlias = bytes | str | None
Handler: TypeAlias = Callable[[Message], Awaitable[HandlerResult] | AsyncIterator[HandlerResult]]

# Reserved kind: the first envelope on a Connect stream, binding the stream to
# its (verified) sender so that the other side can push to it by DID.
HELLO_KIND = "sigwire.hello"
# Hello metadata by which a client says what it understands (value "1"):
# batch signatures (docs/signing.md 4.5) and acks riding on any frame
# (Frame.acked). The hello reply names what the agent understands in a
# `features` parameter of its content type (see hello_features).
BATCH_SIGNATURES_KEY = "sigwire.batch-signatures"
ACKED_KEY = "sigwire.acked"
BATCH_SIGNATURES = "batch-signatures"
ACKED = "acked"
HELLO_CONTENT_TYPE = f"text/plain; charset=utf-8; features={ACKED},{BATCH_SIGNATURES}"


def hello_features(content_type: str) -> frozenset[str]:
    """What an agent's hello reply says it understands (its ``features`` parameter)."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "features":
            return frozenset(f.strip() for f in value.strip('" ').split(",") if f.strip())
    return frozenset()


RESERVED_PREFIX = "sigwire."

# A streaming handler runs at most _LEAD parts (fewer for large parts: about
# _LEAD_BYTES of them) ahead of the fastest reader of its answer, and lets
# the loop run once every _YIELD_EVERY parts it gives without waiting.
_LEAD = 32
_LEAD_BYTES = 256 * 1024
_YIELD_EVERY = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one endpoint.

    Attributes:
        max_message_size: Largest serialized envelope accepted, in bytes.
        rate: Sustained envelopes per second per sender; None disables the limit.
        burst: Token bucket size per sender.
        window: Unacknowledged messages in flight per stream and direction.
        max_concurrent_streams: Concurrent gRPC streams per connection.
        reply_cache_size: Answers remembered for idempotent retries.
        reply_cache_bytes: Memory those answers may hold, in bytes: each
            reply counts its data and what keeping it costs (objects, ids,
            signatures), see ``reply_cost``.
        reply_cache_ttl: How long they are remembered, in seconds.
        max_answer_bytes: What one answer (every part of a streamed one) may
            hold, counted as in ``reply_cache_bytes`` (and never more than
            ``reply_cache_bytes``); a streaming handler that goes beyond is
            stopped and its answer ends with ``OVERLOADED``.
        outbox_size: Pushes waiting per agent (offline or reconnecting).
    """

    max_message_size: int = 4 * 1024 * 1024
    rate: float | None = 10_000.0
    burst: int = 20_000
    window: int = 256
    max_concurrent_streams: int = 100
    reply_cache_size: int = 50_000
    reply_cache_bytes: int = 256 * 1024 * 1024
    reply_cache_ttl: float = 660.0
    max_answer_bytes: int = 64 * 1024 * 1024
    outbox_size: int = 1000


class Handlers:
    """Handlers registered by kind."""

    def __init__(self) -> None:
        self._by_kind: dict[str, tuple[Handler, bool]] = {}

    def on(self, kind: str) -> Callable[[Handler], Handler]:
        """Decorator registering ``handler`` for envelopes of ``kind``.

        The handler is an ``async def`` returning reply data (bytes, str or
        None), or an async generator whose items become streamed replies.
        Raising a :class:`~sigwire.errors.SigwireError` (for instance
        :class:`~sigwire.errors.ApplicationError`) answers with that error.
        """
        if not kind or kind.startswith(RESERVED_PREFIX):
            raise ValueError(f"kind {kind!r} is empty or reserved (prefix {RESERVED_PREFIX!r})")

        def register(handler: Handler) -> Handler:
            if not (inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler)):
                raise TypeError("a handler must be an async function or async generator")
            self._by_kind[kind] = (handler, inspect.isasyncgenfunction(handler))
            return handler

        return register

    def get(self, kind: str) -> tuple[Handler, bool]:
        """The handler of ``kind`` and whether it streams.

        Raises:
            KindUnknownError: None is registered.
        """
        try:
            return self._by_kind[kind]
        except KeyError:
            raise KindUnknownError(
                f"no handler for kind {kind!r}", details={"kind": kind}
            ) from None

    def kinds(self) -> tuple[str, ...]:
        """Registered kinds, sorted."""
        return tuple(sorted(self._by_kind))


class TokenBuckets:
    """A token bucket per sender, for a bounded number of senders (LRU)."""

    def __init__(self, rate: float, burst: int, *, max_senders: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max = max_senders
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def take(self, sender: str) -> None:
        """Spend one token of ``sender``'s bucket.

        Raises:
            RateLimitedError: The bucket is empty; ``retry_after`` says when a token frees.
        """
        now = time.monotonic()
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = [float(self.burst), now]
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(sender)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] < 1.0:
            raise RateLimitedError(
                f"rate limit of {self.rate:g}/s exceeded", retry_after=(1.0 - bucket[0]) / self.rate
            )
        bucket[0] -= 1.0


class Answer:
    """The answer to one (sender, id): filled by one handler task, read by any number.

    Readers either iterate :meth:`follow` (the unary RPCs) or register a
    callback with :meth:`watch` (stream sessions), which runs synchronously on
    every change: a session queues each reply the moment the handler gives
    it, with no task of its own in between. Readers report how far they got
    (:meth:`took`): a streaming handler runs at most a few parts ahead of its
    fastest reader (:meth:`wait_for_reader`), so a peer that does not read
    holds the handler back instead of making the agent keep its parts.
    """

    __slots__ = (
        "_changed",
        "_following",
        "_room",
        "_watchers",
        "content",
        "done",
        "expires",
        "replies",
        "size",
        "taken",
    )

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.done = False
        self.expires = 0.0
        self.size = 0
        # What was asked: the process-keyed hash of the request (answers made
        # here), the digest kept with it (answers restored from a store), or
        # None (stored before digests were kept). See _same_request.
        self.content: int | bytes | None = None
        # Replies the furthest reader has taken.
        self.taken = 0
        # Made only while someone follows or watches, or the handler waits.
        self._changed: asyncio.Event | None = None
        self._watchers: list[Callable[[], None]] | None = None
        self._room: asyncio.Future[None] | None = None
        self._following = 0

    @property
    def unread(self) -> bool:
        """Whether the handler waits for a reader and nobody follows the answer."""
        return self._room is not None and not self._watchers and not self._following

    def add(self, reply: Reply) -> None:
        self.replies.append(reply)
        self._wake()

    def close(self) -> None:
        self.done = True
        self._wake()

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every change (it must not raise)."""
        if self._watchers is None:
            self._watchers = []
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        watchers = self._watchers
        if watchers is not None and callback in watchers:
            watchers.remove(callback)

    def took(self, count: int) -> None:
        """A reader has taken the first ``count`` replies."""
        if count > self.taken:
            self.taken = count
            room, self._room = self._room, None
            if room is not None and not room.done():
                room.set_result(None)

    async def wait_for_reader(self, lead: int, timeout: float) -> bool:
        """Wait until a reader is fewer than ``lead`` replies behind.

        Returns:
            False if no reader took a reply for ``timeout`` seconds.
        """
        while len(self.replies) - self.taken >= lead:
            room = self._room
            if room is None:
                room = self._room = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await room
            except TimeoutError:
                return False
        return True

    def _wake(self) -> None:
        # A fresh Event per change: readers wait on the one they saw, so none
        # misses a change and none needs clearing.
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
        if self._watchers:
            for callback in tuple(self._watchers):
                callback()

    async def follow(self) -> AsyncIterator[Reply]:
        index = 0
        self._following += 1
        try:
            while True:
                while index < len(self.replies):
                    yield self.replies[index]
                    index += 1
                    self.took(index)
                if self.done:
                    return
                changed = self._changed
                if changed is None:
                    changed = self._changed = asyncio.Event()
                await changed.wait()
        finally:
            self._following -= 1


# A finished answer is kept packed: ONE flat tuple of strs, bytes, ints,
# floats, bools and Nones, which the garbage collector stops tracking at its
# next young collection (a nested tuple would lose its tracking one level per
# collection, as the objects age, and so cost every collection on the way).
# As objects (the Answer, its list, each reply, its signed form, their
# signature and proof) one answer is six tracked objects: at the default
# 50,000 answers a full collection walked 300,000 of them, pausing a busy
# server for ~0.2 s every few seconds. The newest answers stay objects (a
# duplicate usually follows its original closely, and a reply is signed only
# once written): an answer is packed once _PACK_AFTER newer ones have finished.
#
# Layout: (expires, size, content, then _REPLY_FIELDS per reply): the reply's
# fields (error as reason, message, details in JSON), its signature alone
# (signer, algorithm, value) and in a batch (signer, algorithm, value, index,
# size, the proof's path joined), and which of the two, if any, the reply
# itself carries (a reply read back from a store is signed).
_PACK_AFTER = 1024
_ANSWER_FIELDS = 3
_REPLY_FIELDS = 22
_HASH = 32
_Packed: TypeAlias = tuple[Any, ...]
_NO_FORM = (None, None, None)
_NO_BATCH_FORM = (None, None, None, None, None, None)


def _alone_form(signature: Signature | None) -> tuple[Any, ...]:
    if signature is None:
        return _NO_FORM
    return (signature.signer, signature.algorithm, signature.value)


def _batch_form(signature: Signature | None) -> tuple[Any, ...]:
    if signature is None or signature.batch is None:
        return _NO_BATCH_FORM
    proof = signature.batch
    return (
        signature.signer,
        signature.algorithm,
        signature.value,
        proof.index,
        proof.size,
        b"".join(proof.path),
    )


def _pack(entry: Answer) -> _Packed | None:
    """``entry`` as one flat tuple, or None if it cannot be (then it stays as is)."""
    fields: list[Any] = [entry.expires, entry.size, entry.content]
    for reply in entry.replies:
        own = reply.signature
        alone = reply._signed.signature if reply._signed is not None else None
        batch = reply._batch_signed.signature if reply._batch_signed is not None else None
        carries = None
        if own is not None:
            carries = "batch" if own.batch is not None else "alone"
            if own.batch is None:
                alone = own
            else:
                batch = own
        if batch is not None and batch.batch is not None:
            if any(len(node) != _HASH for node in batch.batch.path):
                return None
        error = reply.error
        fields += (
            reply.request_id,
            reply.request_digest,
            reply.responder,
            reply.success,
            reply.data,
            reply.content_type,
            None if error is None else error.reason,
            None if error is None else error.message,
            None if error is None else json.dumps(dict(error.details)),
            reply.created_at_ms,
            reply.sequence,
            reply.final,
        )
        fields += _alone_form(alone)
        fields += _batch_form(batch)
        fields.append(carries)
    return tuple(fields)


def _unpack(packed: _Packed) -> Answer:
    entry = Answer()
    entry.expires, entry.size, entry.content = packed[0], packed[1], packed[2]
    entry.replies = [
        _unpack_reply(packed[i : i + _REPLY_FIELDS])
        for i in range(_ANSWER_FIELDS, len(packed), _REPLY_FIELDS)
    ]
    entry.done = True
    return entry


def _unpack_reply(f: _Packed) -> Reply:
    error = None if f[6] is None else ReplyError(f[6], f[7], json.loads(f[8]))
    alone = None if f[14] is None else Signature(f[12], f[13], f[14])
    batch = None
    if f[17] is not None:
        path = f[20]
        nodes = tuple(path[i : i + _HASH] for i in range(0, len(path), _HASH))
        batch = Signature(f[15], f[16], f[17], BatchProof(f[18], f[19], nodes))
    carries = f[21]
    own = alone if carries == "alone" else batch if carries == "batch" else None
    reply = Reply(f[0], f[1], f[2], f[3], f[4], f[5], error, f[9], f[10], f[11], own)
    # The signed forms it had, so that a re-send costs no new signature.
    if own is None:
        if alone is not None:
            object.__setattr__(reply, "_signed", reply.with_signature(alone))
        if batch is not None:
            object.__setattr__(reply, "_batch_signed", reply.with_signature(batch))
    return reply


# What keeping one reply costs on top of its data, in bytes: the Reply and
# its int and bytes objects, and the signed form a write attaches to it (a
# batch form, the larger one: another Reply, its Signature, proof and path).
# A streamed part of a few bytes, batch-signed, holds ~790 bytes of RSS,
# ~560 packed; an answer adds its Answer, list, key and cache slot.
_REPLY_COST = 800
_ANSWER_COST = 600


def reply_cost(reply: Reply) -> int:
    """Bytes of memory that keeping ``reply`` in an answer costs (an estimate from above)."""
    cost = _REPLY_COST + len(reply.data) + len(reply.content_type)
    error = reply.error
    if error is not None:
        cost += 200 + len(error.reason) + len(error.message)
        cost += sum(100 + len(k) + len(v) for k, v in error.details.items())
    return cost


def _expired(entry: Answer | _Packed, now: float) -> bool:
    if isinstance(entry, tuple):
        return bool(entry[0] < now)
    return entry.done and entry.expires < now


def _size(entry: Answer | _Packed) -> int:
    return int(entry[1]) if isinstance(entry, tuple) else entry.size


class ReplyCache:
    """Signed answers per ``(sender, id)``, bounded in size and age.

    An entry exists from the moment a handler starts, so a duplicate that
    arrives while the handler still runs follows the same answer instead of
    running it again; an answer still being computed is never evicted.
    Finished answers are kept packed (see ``_pack``); :meth:`get` hands out
    an equal :class:`Answer`.
    """

    def __init__(
        self,
        size: int,
        ttl: float,
        store: SqliteStore | None = None,
        *,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.store = store
        self.bytes = 0
        self._entries: collections.OrderedDict[tuple[str, str], Answer | _Packed] = (
            collections.OrderedDict()
        )
        # Keys of the answers finished lately, oldest first: packed in turn.
        self._finished: collections.deque[tuple[str, str]] = collections.deque()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> Answer | None:
        """The live entry of ``key``, if any."""
        found = self._entries.get(key)
        entry: Answer | None = None
        if found is not None and _expired(found, time.monotonic()):
            del self._entries[key]
            self.bytes -= _size(found)
        elif isinstance(found, tuple):
            # Asked for again: an object again (in its place), so that the
            # signed forms its re-sends make are kept, then packed anew.
            entry = self._entries[key] = _unpack(found)
            self._packing(key)
        else:
            entry = found
        if entry is None and self.store is not None:
            stored = self.store.get_answer(*key)
            if stored is not None:
                # Answered before a restart: serve it, never run the handler again.
                entry = Answer()
                entry.content, replies = stored
                entry.replies = [_proto.decode_reply(data) for data in replies]
                self._entries[key] = entry
                self.finish(entry, key, persist=False)
                self._evict()
        return entry

    def begin(self, key: tuple[str, str]) -> Answer:
        """Create the in-progress entry of ``key``."""
        entry = Answer()
        self._entries[key] = entry
        self._evict()
        return entry

    def finish(
        self,
        entry: Answer,
        key: tuple[str, str] | None = None,
        last: Reply | None = None,
        *,
        persist: bool = True,
        asked: bytes | None = None,
    ) -> None:
        """Mark an entry complete, with ``last`` as its final reply if given.

        It expires ``ttl`` seconds from now. Readers see ``last`` only once
        the whole answer is complete (and persisted, with a store, along with
        ``asked``, the ``_asked`` digest of its request).
        """
        if last is not None:
            entry.replies.append(last)
        entry.expires = time.monotonic() + self.ttl
        entry.size = _ANSWER_COST + sum(reply_cost(reply) for reply in entry.replies)
        self.bytes += entry.size
        if persist and key is not None and self.store is not None:
            data = [_proto.reply_to_pb(reply).SerializeToString() for reply in entry.replies]
            try:
                self.store.put_answer(key[0], key[1], data, self.ttl, asked)
            except Exception:
                # The answer stands (the peer gets it) but would not survive a
                # restart; a stuck entry would lose it and its waiters for good.
                log.exception("could not store the answer to %r from %r", key[1], key[0])
        entry.close()
        if key is not None:
            self._packing(key)
        if self.bytes > self.max_bytes:
            self._evict()

    def _packing(self, key: tuple[str, str]) -> None:
        # Queue a finished answer for packing, and pack the one _PACK_AFTER back.
        finished = self._finished
        finished.append(key)
        if len(finished) > _PACK_AFTER:
            older = finished.popleft()
            answer = self._entries.get(older)
            if isinstance(answer, Answer) and answer.done:
                packed = _pack(answer)
                if packed is not None:
                    self._entries[older] = packed  # keeps its place in the order

    def abandon(self, key: tuple[str, str], entry: Answer) -> None:
        """Drop an entry whose handler never finished (cancelled at shutdown)."""
        if self._entries.get(key) is entry:
            del self._entries[key]
            self.bytes -= entry.size
        entry.close()

    def _evict(self) -> None:
        # Oldest first; answers still being computed are never forgotten.
        now = time.monotonic()
        over = len(self._entries) - self.size
        excess = self.bytes - self.max_bytes
        doomed: list[tuple[str, str]] = []
        for key, entry in self._entries.items():
            if isinstance(entry, Answer) and not entry.done:
                if len(doomed) < over or excess > 0:
                    continue
                break
            if len(doomed) < over or excess > 0 or _expired(entry, now):
                doomed.append(key)
                excess -= _size(entry)
            else:
                break
        for key in doomed:
            self.bytes -= _size(self._entries.pop(key))


class SessionHooks(Protocol):
    """What a stream session lets the dispatcher do (bind it to a DID)."""

    @property
    def peer_did(self) -> str | None:
        """The DID the stream is bound to, once a hello has bound it."""

    def bind(self, did: str, *, batch_signatures: bool = False, acked: bool = False) -> None:
        """Record that the stream's peer is ``did`` (verified by its hello).

        ``batch_signatures``, ``acked``: the hello says the peer accepts batch
        signatures, and reads acks riding on any frame.
        """


class _Held:
    """What one streamed answer in progress holds, counted in its dispatcher."""

    __slots__ = ("bytes", "dispatcher")

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.bytes = 0

    def add(self, cost: int) -> None:
        dispatcher = self.dispatcher
        limit = dispatcher.cache.max_bytes
        if dispatcher.in_progress_bytes + cost > limit:
            raise OverloadedError(
                f"answers in progress hold {limit} bytes, all the agent keeps for them",
                details={"limit": str(limit)},
            )
        dispatcher.in_progress_bytes += cost
        self.bytes += cost


class Dispatcher:
    """Runs the inbound pipeline for one endpoint (server or client).

    Args:
        identity: Who signs the replies.
        handlers: Handlers by kind.
        verifier: Signature and trust checks.
        guard: Replay window and nonce cache.
        limits: Size and rate limits, reply cache bounds.
        store: Keeps answers across restarts (see :mod:`sigwire.store`).
    """

    def __init__(
        self,
        identity: Identity,
        handlers: Handlers,
        *,
        verifier: Verifier | None = None,
        guard: ReplayGuard | None = None,
        limits: Limits | None = None,
        store: SqliteStore | None = None,
    ) -> None:
        self.identity = identity
        self.handlers = handlers
        # `is None`, not `or`: an empty ReplayGuard has len() 0 and is falsy.
        self.verifier = verifier if verifier is not None else Verifier()
        self.guard = guard if guard is not None else ReplayGuard()
        self.limits = limits if limits is not None else Limits()
        self.cache = ReplyCache(
            self.limits.reply_cache_size,
            self.limits.reply_cache_ttl,
            store,
            max_bytes=self.limits.reply_cache_bytes,
        )
        self.buckets = (
            TokenBuckets(self.limits.rate, self.limits.burst) if self.limits.rate else None
        )
        self.accepting = True
        # Without a store, the hellos a previous process accepted are unknown:
        # hellos created before this one started are refused (see _hello).
        self.hello_floor_ms = now_ms() - 1
        self._said_guard_full = False
        # Bytes (as reply_cost counts them) of the parts streamed answers in
        # progress hold; bounded by reply_cache_bytes.
        self.in_progress_bytes = 0
        # Tasks inside a handler, with the answer each is making.
        self._running: dict[asyncio.Task[None], Answer] = {}
        self.handled = 0

    def admit(
        self, envelope: Envelope, *, authenticated: bool = False, forged: bool = False
    ) -> bool:
        """Run every check before the handler.

        ``authenticated``: see :meth:`dispatch`. ``forged``: the caller already
        found that this very envelope's signature does not verify (a False of
        ``SignatureChecks.run``); it is refused as such, in its place among
        the checks, without verifying it again.

        Returns:
            True if the envelope is fresh, False if it is an exact re-send.

        Raises:
            SigwireError: The specific rejection (malformed, signature, replay,
                trust, rate limit, unknown kind, shutting down).
        """
        envelope.validate()
        if len(envelope.payload) > self.limits.max_message_size:
            raise MessageTooLargeError(len(envelope.payload), self.limits.max_message_size)
        if envelope.recipient and envelope.recipient != self.identity.did:
            raise MisdirectedError(
                "the envelope is addressed to another agent",
                details={"recipient": envelope.recipient},
            )
        if not authenticated:
            if forged:
                raise InvalidSignatureError("the signature does not verify")
            self.verifier.authenticate(envelope)
        # Trust before the nonce cache: senders we refuse cannot fill it.
        if envelope.signature is not None or self.verifier.require_signatures:
            self.verifier.admit(envelope.sender)
        guard = self.guard
        fresh = guard.check_and_mark(envelope)
        if guard.forgotten and not self._said_guard_full:
            self._said_guard_full = True
            log.warning(
                "the replay guard is full (%d nonces): it forgets the oldest and refuses "
                "envelopes no newer than them, a shorter window; raise its capacity "
                "(sigwire serve --replay-capacity) to keep the whole window under this load",
                guard.capacity,
            )
        return fresh

    def begin(
        self,
        envelope: Envelope,
        session: SessionHooks | None = None,
        *,
        unary: bool = False,
        authenticated: bool = False,
        forged: bool = False,
        context: contextvars.Context | None = None,
    ) -> Answer | Reply:
        """Run every step before the handler, start it if need be, return its answer.

        Synchronous: a stream session calls it for each envelope as it
        arrives, and follows the answer with :meth:`Answer.watch`; replies
        are to be passed through :meth:`restate` before they are sent.

        Args:
            envelope: The decoded inbound envelope.
            session: The stream it came on, if any (a hello binds it).
            unary: See :meth:`dispatch`.
            authenticated: See :meth:`dispatch`.
            forged: See :meth:`admit`.
            context: The handler runs in a copy of it; default, of the current one.

        Returns:
            The answer entry to follow, or, for a hello, its one (unsigned) reply.

        Raises:
            SigwireError: A rejection before the handler (see :meth:`admit`).
        """
        key = (envelope.sender, envelope.id)
        try:
            fresh = self.admit(envelope, authenticated=authenticated, forged=forged)
        except StaleMessageError as exc:
            # Below the floor of a replay guard that let go of its nonce, but
            # answered and still cached: most likely a client's own re-send
            # after a reconnect. Answered as a duplicate: no handler runs again,
            # so nothing is replayed, and work already done does not fail.
            if exc.floor_ms is None or envelope.kind == HELLO_KIND:
                raise
            entry = self._cached(key, envelope, fresh=False)
            if entry is None or not _same_request(entry, envelope):
                raise
            fresh = False
        else:
            if envelope.kind == HELLO_KIND:
                return self._hello(envelope, session, fresh)
            entry = self._cached(key, envelope, fresh=fresh)
        if entry is not None and not _same_request(entry, envelope):
            # Same id, other request: its cached answer must not pass for this one's.
            if entry.content is None:
                raise ReplayError(
                    "this id was answered before the agent kept what was asked: "
                    "only an exact re-send of that request is answered"
                )
            raise ReplayError("this id was already used for a different request")
        if entry is None:
            if not fresh:
                raise ReplayError("a re-sent envelope whose answer is no longer cached")
            try:
                if not self.accepting:
                    raise ShuttingDownError("the agent is shutting down")
                if self.buckets is not None:
                    self.buckets.take(envelope.sender)
                handler, streams = self.handlers.get(envelope.kind)
                if unary and streams:
                    raise SigwireError(
                        f"kind {envelope.kind!r} streams its replies; call SendStream",
                        reason="STREAMING_KIND",
                    )
            except SigwireError:
                # The handler never ran: the same envelope may be re-sent later.
                self.guard.release(envelope)
                raise
            entry = self.cache.begin(key)
            entry.content = _content(envelope)
            # The handler runs in its own task, not the caller's: if the
            # connection drops mid-way, it still finishes and its answer is
            # cached for the re-sent envelope. It starts at once (sigwire._eager):
            # one that answers without waiting has answered before this returns.
            task = start_eagerly(
                self._produce(key, entry, envelope, handler, streams),
                context.copy() if context is not None else None,
            )
            if not entry.done:
                self._running[task] = entry
                task.add_done_callback(self._forget_running)
        elif self.buckets is not None and fresh:
            # A re-signed retry answered from the cache runs no handler, yet
            # costs a signature on each cached reply: only its sender can make
            # one, and it is rated. An exact duplicate is not: anyone who saw
            # the envelope can replay it, and charging it to the sender would
            # let them drain the sender's bucket. It costs no new signature,
            # and its replies wait for room like any others.
            try:
                self.buckets.take(envelope.sender)
            except SigwireError:
                self.guard.release(envelope)  # the identical retry may come later
                raise
        return entry

    def _cached(self, key: tuple[str, str], envelope: Envelope, *, fresh: bool) -> Answer | None:
        # The cache's answer to ``key``; a failure of its store is the
        # agent's, and the envelope may come again once it is mended.
        try:
            return self.cache.get(key)
        except Exception:
            if fresh:
                self.guard.release(envelope)
            raise internal_error(
                "the reply cache failed on envelope %r from %r", envelope.id, envelope.sender
            ) from None

    def _hello(self, envelope: Envelope, session: SessionHooks | None, fresh: bool) -> Reply:
        if session is None:
            raise KindUnknownError(
                f"{HELLO_KIND} opens a Connect stream; it is not a request",
                details={"kind": HELLO_KIND},
            )
        if envelope.recipient != self.identity.did:
            # Without our DID in it, a hello given to another agent could be
            # relayed here to bind this stream to its sender (and take its pushes).
            raise MisdirectedError(
                "a hello must name this agent's DID as its recipient",
                details={"recipient": envelope.recipient},
            )
        if not fresh:
            # A replayed hello would bind this stream to someone else's DID
            # and route their pushes here.
            raise ReplayError("a hello is valid once")
        if session.peer_did is not None:
            # A stream is bound once, by its first hello: a later one binds
            # nothing, so it is not recorded (a stream of hellos must not
            # fill the store's table of them).
            if self.buckets is not None:
                self.buckets.take(envelope.sender)
            return self._hello_reply(envelope)
        # The guard knows the hellos of this process only. With a store, every
        # hello accepted is recorded there before it binds, so a replay is
        # refused after any number of restarts; without one, a hello created
        # before this process started is refused (a client whose clock is
        # behind ours gets in on a later reconnect, once its clock passes it).
        store = self.cache.store
        if store is not None:
            if not store.add_hello(
                _hello_key(envelope),
                envelope.created_at_ms,
                now_ms() + self.guard.ttl_ms,
                keep_ms=self.guard.future_ms,
            ):
                raise ReplayError("a hello is valid once")
        elif envelope.created_at_ms <= self.hello_floor_ms:
            raise StaleMessageError(envelope.created_at_ms - now_ms(), floor_ms=self.hello_floor_ms)
        # Charged once it is known not to be a replay: a captured hello must
        # not drain its sender's bucket.
        if self.buckets is not None:
            self.buckets.take(envelope.sender)
        session.bind(
            envelope.sender,
            batch_signatures=envelope.metadata.get(BATCH_SIGNATURES_KEY) == "1",
            acked=envelope.metadata.get(ACKED_KEY) == "1",
        )
        return self._hello_reply(envelope)

    def _hello_reply(self, envelope: Envelope) -> Reply:
        # The hello reply tells the peer our size limit, before it sends
        # anything, and (in its content type) what we understand.
        return dataclasses.replace(
            self.reply(envelope, str(self.limits.max_message_size)),
            content_type=HELLO_CONTENT_TYPE,
        )

    def restate(self, reply: Reply, digest: bytes) -> Reply:
        """A cached reply as the answer to the request whose digest is ``digest``."""
        if reply.responder != self.identity.did:
            # Answered under a key this agent no longer has (same store, new
            # key): the answer stands, signed again by the current key.
            reply = dataclasses.replace(reply, responder=self.identity.did, signature=None)
        if reply.request_digest != digest:
            # A re-signed retry (same id, new nonce or timestamp): the cached
            # answer is re-bound to the request that asked for it this time.
            reply = dataclasses.replace(reply, request_digest=digest, signature=None)
        return reply

    async def dispatch(
        self,
        envelope: Envelope,
        session: SessionHooks | None = None,
        *,
        unary: bool = False,
        authenticated: bool = False,
    ) -> AsyncIterator[Reply]:
        """Run the whole pipeline on one envelope and yield its signed replies.

        Args:
            envelope: The decoded inbound envelope.
            session: The stream it came on, if any (a hello binds it).
            unary: The caller can carry one reply only: refuse a streaming
                kind (STREAMING_KIND), but only after the envelope passed
                every check, so that unauthenticated callers learn nothing.
            authenticated: The caller already verified this very envelope's
                signature (a stream verifies a frame's envelopes in one batch).

        Raises:
            SigwireError: A rejection before the handler (see :meth:`admit`).
        """
        started = self.begin(envelope, session, unary=unary, authenticated=authenticated)
        if isinstance(started, Reply):
            yield self.identity.sign_reply(started)
            return
        digest = envelope.digest()
        async for reply in started.follow():
            reply = self.restate(reply, digest)
            yield reply if reply.signature is not None else self.identity.sign_reply(reply)
        if not finished(started):
            raise HandlerCancelledError("the handler was cancelled before it answered")

    async def _produce(
        self,
        key: tuple[str, str],
        entry: Answer,
        envelope: Envelope,
        handler: Handler,
        streams: bool,
    ) -> None:
        message = Message(envelope)
        sequence = 0
        try:
            try:
                if streams:
                    limit = min(self.limits.max_answer_bytes, self.cache.max_bytes)
                    kept = _ANSWER_COST
                    parts = cast("AsyncGenerator[HandlerResult, None]", handler(message))
                    with self._holding() as held:
                        async with contextlib.aclosing(parts):
                            async for item in parts:
                                reply = self.reply(envelope, item, sequence=sequence, final=False)
                                cost = reply_cost(reply)
                                kept += cost
                                if kept > limit:
                                    raise OverloadedError(
                                        f"the answer outgrew the {limit} bytes one answer may keep",
                                        details={"limit": str(limit)},
                                    )
                                held.add(cost)
                                entry.add(reply)
                                sequence += 1
                                # Backpressure, and a turn of the loop now and then:
                                # a generator that never awaits must not hold the
                                # loop, nor a peer that stops reading grow its answer.
                                lead = max(1, min(_LEAD, _LEAD_BYTES // cost))
                                if len(entry.replies) - entry.taken >= lead:
                                    if not await entry.wait_for_reader(lead, self.cache.ttl):
                                        raise OverloadedError(
                                            f"nobody read the answer for {self.cache.ttl:g}s"
                                        )
                                elif not sequence % _YIELD_EVERY:
                                    await asyncio.sleep(0)
                    last = self.reply(envelope, b"", sequence=sequence)
                else:
                    result = await handler(message)  # type: ignore[misc]
                    last = self.reply(envelope, result)
            except SigwireError as exc:
                last = self.error_reply(envelope, exc, sequence=sequence)
            except Exception:
                last = self.error_reply(envelope, _crashed(envelope), sequence=sequence)
        except BaseException:
            self.cache.abandon(key, entry)
            raise
        self.handled += 1
        # The final reply is published with the answer complete (and stored,
        # with a store): whoever sends it on sends a persisted answer.
        asked = _asked(envelope) if self.cache.store is not None else None
        self.cache.finish(entry, key, last, asked=asked)

    def reply(
        self, envelope: Envelope, result: HandlerResult, *, sequence: int = 0, final: bool = True
    ) -> Reply:
        """A successful reply to ``envelope``, not yet signed."""
        content_type = ""
        if result is None:
            data = b""
        elif isinstance(result, str):
            data, content_type = result.encode(), "text/plain; charset=utf-8"
        elif isinstance(result, bytes | bytearray | memoryview):
            data = bytes(result)
        else:
            raise TypeError(f"a handler returns bytes, str or None, not {type(result).__name__}")
        if len(data) > self.limits.max_message_size:
            # The peer would refuse the frame and the stream would reset on
            # every re-send; _produce answers with this error instead.
            raise MessageTooLargeError(len(data), self.limits.max_message_size)
        return Reply(
            request_id=envelope.id,
            request_digest=envelope.digest(),
            responder=self.identity.did,
            data=data,
            content_type=content_type,
            created_at_ms=now_ms(),
            sequence=sequence,
            final=final,
        )

    def error_reply(self, envelope: Envelope, exc: SigwireError, *, sequence: int = 0) -> Reply:
        """A failed (and final) reply to ``envelope``, not yet signed."""
        return Reply(
            request_id=envelope.id,
            request_digest=envelope.digest(),
            responder=self.identity.did,
            success=False,
            error=ReplyError(reason=exc.reason, message=exc.message, details=exc.details),
            created_at_ms=now_ms(),
            sequence=sequence,
            final=True,
        )

    def running(self) -> tuple[asyncio.Task[None], ...]:
        """Tasks currently inside a handler."""
        return tuple(self._running)

    @contextlib.contextmanager
    def _holding(self) -> Iterator[_Held]:
        # Parts of answers still being made are kept whole (a re-send is
        # answered from them) and cannot be evicted: all of them together are
        # held to reply_cache_bytes, as the finished answers are.
        held = _Held(self)
        try:
            yield held
        finally:
            self.in_progress_bytes -= held.bytes

    def cancel_unread(self) -> int:
        """Cancel the streaming handlers held back for a reader that has gone.

        Called while draining: no reader can come back for them then, so they
        would only hold the drain for its whole grace.

        Returns:
            How many were cancelled.
        """
        unread = [task for task, entry in self._running.items() if entry.unread]
        for task in unread:
            task.cancel()
        return len(unread)

    def _forget_running(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)


def finished(answer: Answer) -> bool:
    """Whether a done answer ended with its final reply (else it was cancelled)."""
    return bool(answer.replies) and answer.replies[-1].final


def _content(envelope: Envelope) -> int:
    # What a request asks, whatever its nonce, timestamp and signature. Python's
    # hash is keyed per process, so a peer cannot aim for a collision.
    return hash(
        (
            envelope.kind,
            envelope.payload,
            envelope.recipient,
            envelope.context_id,
            envelope.task_id,
            envelope.role,
            envelope.content_type,
            tuple(sorted(envelope.metadata.items())),
        )
    )


def _same_request(entry: Answer, envelope: Envelope) -> bool:
    # Whether ``entry`` answers what ``envelope`` asks: an id may come again
    # with other content (a replayed id, a buggy client), and the answer to
    # the first must never pass for the second's.
    content = entry.content
    if isinstance(content, int):
        return content == _content(envelope)
    if content is not None:
        if content != _asked(envelope):
            return False
        entry.content = _content(envelope)  # matched once: the cheap form from now on
        return True
    # Stored without a digest (an older store): only the very request that
    # was answered, signature and all, is known to ask the same.
    return bool(entry.replies) and entry.replies[0].request_digest == envelope.digest()


_ASKED = b"sigwire asked v1\x00"


def _asked(envelope: Envelope) -> bytes:
    # What a request asks, as _content, but the same in every process and
    # version: it is kept with the answer in a store. Each field is length-
    # prefixed (the payload by its SHA-256), so no two requests encode alike.
    parts = [_ASKED]
    items = sorted(envelope.metadata.items())
    texts = [
        envelope.kind,
        envelope.recipient,
        envelope.context_id,
        envelope.task_id,
        envelope.role,
        envelope.content_type,
        *(text for item in items for text in item),
    ]
    parts.append(len(items).to_bytes(4, "big"))
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        parts += (len(raw).to_bytes(4, "big"), raw)
    parts.append(hashlib.sha256(envelope.payload).digest())
    return hashlib.sha256(b"".join(parts)).digest()


def _hello_key(envelope: Envelope) -> bytes:
    # A hello's (sender, nonce), as the replay guard keys it, at a fixed size.
    sender = envelope.sender.encode("utf-8", "surrogatepass")
    return hashlib.sha256(len(sender).to_bytes(4, "big") + sender + envelope.nonce).digest()


def _crashed(envelope: Envelope) -> HandlerError:
    error_id = uuid.uuid4().hex[:12]
    # The traceback goes to the log only, under an id the peer also receives.
    log.exception(
        "handler for kind %r failed on envelope %r from %r [error_id=%s]",
        envelope.kind,
        envelope.id,
        envelope.sender,
        error_id,
    )
    return HandlerError(error_id)


def internal_error(what: str, *args: object) -> InternalError:
    """The error a peer gets for the exception being handled, which is logged.

    Call it from an ``except`` block: the traceback goes to the
    ``sigwire.server`` log at ERROR, as ``what % args`` and an error id;
    the peer gets the id only (``INTERNAL``).
    """
    error_id = uuid.uuid4().hex[:12]
    log.exception(what + " [error_id=%s]", *args, error_id)
    return InternalError(error_id)
