"""One Connect stream, seen from either end; shared by every transport.

A session reads Frames from a :class:`~sigwire.transports.base.FrameStream`,
hands inbound envelopes to the :class:`~sigwire.dispatch.Dispatcher` and
inbound replies to its owner, and writes envelopes, replies, acks and
heartbeats through ONE writer task that batches whatever is queued into as
few frames as possible (no added latency when idle: a lone message goes out
at once).

Flow control: each side may have at most ``window`` envelopes sent but not
yet acknowledged; senders wait for acks beyond that. A receiver runs at most
``window`` envelopes at once and acknowledges an envelope only once it has
started, so the envelopes waiting for a slot are bounded by the sender's own
window. The reader itself never blocks: replies the running handlers wait for
always get through. Heartbeats: a Ping goes out after
``heartbeat`` seconds of silence, and a peer silent for ``heartbeat_timeout``
seconds is declared dead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from sigwire import _proto
from sigwire._eager import start_eagerly
from sigwire._proto import pb
from sigwire.dispatch import Answer, Dispatcher, finished, internal_error
from sigwire.envelope import Envelope, Reply, Signature
from sigwire.errors import (
    ConnectionClosedError,
    EnvelopeError,
    HandlerCancelledError,
    OverloadedError,
    ShuttingDownError,
    SigwireError,
)
from sigwire.signing import Verifier
from sigwire.transports.base import FrameStream

__all__ = ["GoAwayInfo", "Session", "SessionOptions", "max_frame_size"]

log = logging.getLogger("sigwire.session")

# What one frame carries at most: the writer batches up to _BATCH_MESSAGES (small
# enough that two peers keep several frames in flight rather than trading one
# big batch in lock-step); a receiver accepts up to _MAX_FRAME_MESSAGES.
_BATCH_MESSAGES: Final = 32
_MAX_FRAME_MESSAGES: Final = _proto.MAX_FRAME_MESSAGES
_UNWALKED_SIZE: Final = _proto.UNWALKED_SIZE
# An ack waits for data to ride behind, at most this long (or a quarter window).
_ACK_DELAY: Final = 0.02
_BATCH_BYTES: Final = 256 * 1024
_FLUSH_TIMEOUT: Final = 2.0
# Frames with at least this many messages have their signatures checked together
# (one Ed25519 check per batch signature); below it, the dispatcher's full check
# verifies the lone message.
_BATCH_VERIFY: Final = 2
# A frame whose signatures come to at most this many Ed25519 checks (a
# batch-signed frame needs one) is verified on the event loop: on two cores
# shared with the peer, a worker-thread hop costs more than the check it moves
# (scripts/bench: Connect streams 12-25% faster inline). A frame needing more
# (separately signed messages, from a peer that does not batch, or a hostile
# one) goes to a worker thread (Ed25519 releases the GIL), so that it cannot
# hold the loop for milliseconds.
_INLINE_CHECKS: Final = 2
# One pass of the pump starts envelopes for _START_BUDGET seconds at most
# (at least one) before it lets the loop run.
_START_BUDGET: Final = 0.005
# The writer lets the loop run after this many frames written without a pause.
_WRITE_FRAMES: Final = 4


def max_frame_size(max_message_size: int) -> int:
    """The largest serialized Frame to accept when each message fits ``max_message_size``.

    The writer batches queued messages into one frame until their payloads pass
    ``_BATCH_BYTES``, so a frame of valid messages may carry that much on top of
    two messages at the limit (the first and the last), plus the other fields of
    up to ``_BATCH_MESSAGES`` messages. A receiver accepting less would reject
    legitimate batches, and since the sender re-sends after reconnecting, it
    would reject them again on every new stream.
    """
    return 2 * max_message_size + _BATCH_BYTES + 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class SessionOptions:
    """Tuning of one stream.

    Attributes:
        window: Envelopes and replies in flight unacknowledged, per direction.
        heartbeat: Seconds of silence before sending a Ping.
        heartbeat_timeout: Seconds of silence after which the peer is dead.
    """

    window: int = 256
    heartbeat: float = 10.0
    heartbeat_timeout: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class GoAwayInfo:
    """What the peer said when it announced it was going away."""

    reason: str
    message: str
    grace_ms: int


def _metadata_size(envelope: Envelope) -> int:
    metadata = envelope.metadata
    return sum(len(k) + len(v) for k, v in metadata.items()) if metadata else 0


async def _check_batch(items: list[tuple[Signature | None, str, bytes]]) -> list[bool | None]:
    # Per message, what SignatureChecks.run found: True verified, False forged
    # (refused without verifying again), None not decided (the full check runs).
    if len({author for _, author, _ in items}) > _INLINE_CHECKS:
        # Authors' keys are parsed on first sight (~35 µs each, and a DID that
        # does not parse is not remembered): many of them in one frame is not a
        # sigwire writer's frame, and all of it goes to the worker thread.
        return await asyncio.to_thread(_plan_and_run, items)
    checks = Verifier.plan_checks(items)
    if checks.count > _INLINE_CHECKS:
        return await asyncio.to_thread(checks.run)
    # No yield here, between a frame's checks and its handlers: that cost
    # the gRPC Connect stream ~6% (scripts/bench, A/B). The reader yields
    # once the frame's handlers have started instead (Session._reader),
    # which measured within noise on either transport (docs/performance.md,
    # step 18).
    return checks.run()


def _plan_and_run(items: list[tuple[Signature | None, str, bytes]]) -> list[bool | None]:
    return Verifier.plan_checks(items).run()


class _Credit:
    """A counting window that wakes every waiter when closed."""

    __slots__ = ("_changed", "available", "closed")

    def __init__(self, size: int) -> None:
        self.available = size
        self.closed: SigwireError | None = None
        # Made only while someone waits: an idle stream holds no Event (and no
        # deque of waiters).
        self._changed: asyncio.Event | None = None

    async def acquire(self) -> None:
        while self.available <= 0:
            if self.closed is not None:
                raise self.closed
            changed = self._changed
            if changed is None:
                changed = self._changed = asyncio.Event()
            await changed.wait()
        if self.closed is not None:
            raise self.closed
        self.available -= 1

    def try_acquire(self) -> bool:
        """Take one unit if one is free and the window is open, without waiting."""
        if self.available <= 0 or self.closed is not None:
            return False
        self.available -= 1
        return True

    def release(self, count: int) -> None:
        self.available += count
        self._wake()

    def close(self, error: SigwireError) -> None:
        self.closed = error
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()


class _Outbox:
    """The writer's queue: one consumer, so one waiter, made only while it waits.

    (An asyncio.Queue holds three deques and an Event, ~3 KB per idle stream.)
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[object] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: object) -> None:
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> object:
        assert self._items
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an idle stream keeps no 64-slot deque block
        return item

    async def wait(self) -> None:
        """Until something is queued (left in the queue)."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter


class _Answering:
    """One inbound envelope being answered on a session: follows its answer entry.

    Called synchronously whenever the handler adds a reply (no task in
    between), it queues each reply for the writer while the session has
    room for replies; when it has none, the session calls it again once the
    writer has made room.
    """

    __slots__ = ("digest", "entry", "envelope", "index", "session")

    def __init__(self, session: Session, envelope: Envelope, entry: Answer) -> None:
        self.session = session
        self.envelope = envelope
        self.entry = entry
        self.digest = envelope.digest()
        self.index = 0

    def __call__(self) -> None:
        # Runs inside the handler's task (and the dispatcher's bookkeeping):
        # nothing may escape from here.
        try:
            self.session._follow(self)
        except Exception:
            log.exception("%s: failed to answer envelope %r", self.session.name, self.envelope.id)
            self.session._begin_close(ConnectionClosedError(f"{self.session.name}: internal error"))


def _answered(reply: Reply) -> Answer:
    # A complete one-reply answer (a refusal, a hello's), outside any cache.
    entry = Answer()
    entry.replies.append(reply)
    entry.done = True
    return entry


_M = TypeVar("_M", Envelope, Reply)
_CLOSE: Final = object()
_ACK: Final = object()
_PONG: Final = object()


class Session:
    """One bidirectional stream of Frames.

    Args:
        stream: The transport's stream.
        dispatcher: Runs inbound envelopes (requests or pushes from the peer).
        on_reply: Called with every inbound reply (the owner correlates them),
            whether its signature was already verified in a batch, and whether
            that check found it forged.
        options: Window and heartbeat settings.
        on_goaway: Called when the peer announces it is going away.
        on_bind: Called once when the peer's hello binds the session to its DID.
        on_closed: Called once when the session has ended.
        on_signed: Called with (unsigned, signed) for every envelope the
            writer signed, before it is written (the owner keeps the signed
            one to re-send it and to check the replies bound to it).
        pending: The owner's pending call for a request id, or None: replies
            to no pending call are dropped before their signatures are checked.
        batch_signatures: Sign what one frame carries with one batch
            signature (``docs/signing.md`` 4.5). Turned on when the peer says
            it accepts them (a client in its hello, an agent in its hello reply).
        piggyback_acks: Carry acks in ``Frame.acked`` on frames written anyway;
            else each flush that has something to ack writes an Ack frame.
            Turned on the same way.
        name: For log lines.

    Envelopes and replies queued unsigned, authored by the dispatcher's
    identity, are signed by the writer as it builds each frame.
    """

    # One per Connect stream, so kept lean: slots, no Event or deque until
    # something needs one (an idle stream's Python state is ~11 KB).
    __slots__ = (
        "__weakref__",
        "_ack_queued",
        "_ack_timer",
        "_acked",
        "_answering",
        "_backlog",
        "_beat",
        "_bound_event",
        "_close_requested",
        "_closed_event",
        "_closing",
        "_context",
        "_credit",
        "_hold",
        "_identity",
        "_is_closed",
        "_last_heard",
        "_on_bind",
        "_on_closed",
        "_on_goaway",
        "_on_reply",
        "_on_signed",
        "_pending",
        "_ping_token",
        "_pong_queued",
        "_pong_token",
        "_pumping",
        "_queue",
        "_received",
        "_reply_room",
        "_sent",
        "_serving",
        "_stalled",
        "_tasks",
        "_unacked",
        "_unstarted",
        "_write_done",
        "_writing",
        "batch_signatures",
        "dispatcher",
        "error",
        "goaway",
        "name",
        "options",
        "peer_did",
        "piggyback_acks",
        "stream",
    )

    def __init__(
        self,
        stream: FrameStream,
        dispatcher: Dispatcher,
        *,
        on_reply: Callable[[Reply, bool, bool], None],
        options: SessionOptions | None = None,
        on_goaway: Callable[[GoAwayInfo], None] | None = None,
        on_bind: Callable[[Session, str], None] | None = None,
        on_closed: Callable[[Session], None] | None = None,
        on_signed: Callable[[Envelope, Envelope], None] | None = None,
        pending: Callable[[str], object | None] | None = None,
        batch_signatures: bool = False,
        piggyback_acks: bool = False,
        name: str = "session",
    ) -> None:
        self.stream = stream
        self.dispatcher = dispatcher
        self.options = options or SessionOptions()
        self.name = name
        self.peer_did: str | None = None
        self.goaway: GoAwayInfo | None = None
        self.error: SigwireError | None = None
        # Events are made when someone asks for them (see `closed`, `bound`).
        self._closed_event: asyncio.Event | None = None
        self._is_closed = False
        self._bound_event: asyncio.Event | None = None
        # What run() waits on; resolved by _begin_close.
        self._close_requested: asyncio.Future[None] | None = None
        self._on_reply = on_reply
        self._on_goaway = on_goaway
        self._on_bind = on_bind
        self._on_closed = on_closed
        self._on_signed = on_signed
        self._pending = pending
        self.batch_signatures = batch_signatures
        self.piggyback_acks = piggyback_acks
        self._identity = dispatcher.identity
        # Handlers (and writes started at once) run in copies of the context
        # the session was made in, never of another handler's.
        self._context = contextvars.copy_context()
        self._queue = _Outbox()
        self._credit = _Credit(self.options.window)
        self._reply_room = _Credit(4 * self.options.window)
        # Inbound envelopes not yet started, and per envelope frame
        # [sequence, envelopes not yet started] until it can be acked.
        # Lists, not deques: an empty list holds no storage (a deque always
        # keeps a 64-slot block); they are consumed in slices.
        self._backlog: list[tuple[Envelope, list[int], bool | None]] = []
        self._unstarted: list[list[int]] = []
        self._serving = 0
        self._pumping = False
        # Envelopes being answered, and those waiting for room for replies
        # (made on first use).
        self._answering: set[_Answering] | None = None
        self._stalled: list[_Answering] | None = None
        self._sent = 0
        # (frame sequence, envelopes in it) of frames the peer has not acked.
        self._unacked: list[tuple[int, int]] = []
        self._received = 0
        self._acked = 0
        self._ack_queued = False
        self._pong_queued = False
        self._pong_token = 0
        self._last_heard = time.monotonic()
        self._ping_token = 0
        self._beat: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # A flush is under way (the writer's, or a message written at once by
        # whoever queued it); the writer waits on _write_done for the latter.
        self._writing = False
        self._write_done: asyncio.Future[None] | None = None
        # Set while a frame's envelopes start together: their replies wait for
        # the writer, which sends them in one frame.
        self._hold = False

    # -- owner API ---------------------------------------------------------

    @property
    def closed(self) -> asyncio.Event:
        """Set once the session has ended."""
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
            if self._is_closed:
                self._closed_event.set()
        return self._closed_event

    @property
    def bound(self) -> asyncio.Event:
        """Set once the peer's hello has bound the session to its DID."""
        if self._bound_event is None:
            self._bound_event = asyncio.Event()
            if self.peer_did is not None:
                self._bound_event.set()
        return self._bound_event

    def bind(self, did: str, *, batch_signatures: bool = False, acked: bool = False) -> None:
        """Record the peer's verified DID (from its hello), and what it accepts."""
        if self.peer_did is not None:
            return
        self.peer_did = did
        self.batch_signatures = self.batch_signatures or batch_signatures
        self.piggyback_acks = self.piggyback_acks or acked
        if self._bound_event is not None:
            self._bound_event.set()
        if self._on_bind is not None:
            self._on_bind(self, did)

    async def send_envelope(self, envelope: Envelope) -> None:
        """Queue an envelope (signed, or to be signed by the writer), waiting for window space.

        Raises:
            ConnectionClosedError: The session is closed.
        """
        await self._credit.acquire()
        self._send(envelope)

    def send_goaway(self, reason: str, message: str, grace_ms: int) -> None:
        """Tell the peer to send nothing new on this stream."""
        frame = pb.Frame(goaway=pb.GoAway(reason=reason, message=message, grace_ms=grace_ms))
        self._queue.put_nowait(frame)

    async def close(self, error: SigwireError | None = None) -> None:
        """Flush what is queued, close the stream, and wait until closed."""
        self._begin_close(error)
        await self.closed.wait()

    @property
    def is_open(self) -> bool:
        """Whether new work may be sent on this session."""
        return not self._closing and self.goaway is None

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Run until the stream ends; never raises (see :attr:`error`)."""
        close_requested = self._close_requested = asyncio.get_running_loop().create_future()
        if self._closing:
            close_requested.set_result(None)
        reader = asyncio.create_task(self._reader(), name=f"{self.name}-reader")
        writer = asyncio.create_task(self._writer(), name=f"{self.name}-writer")
        self._beat = asyncio.get_running_loop().call_later(
            min(self.options.heartbeat, self.options.heartbeat_timeout) / 2, self._heartbeat
        )
        try:
            # Ends when the peer closes (the reader then closes the session),
            # when we do, on a failure of either side (both close it), or when
            # a close is asked for while both are stuck inside the transport
            # (a stream waiting for an HTTP/2 slot): the flush wait below
            # bounds that. One plain future: no extra task per idle stream.
            await close_requested
            # Let the writer flush, but a peer that stopped reading cannot
            # hold a close hostage.
            await asyncio.wait((writer,), timeout=_FLUSH_TIMEOUT)
        finally:
            self._begin_close(None)
            error = self.error
            try:
                with contextlib.suppress(Exception):
                    # Also unblocks a reader stuck in recv().
                    await self.stream.close(
                        error.reason if error else "", error.message if error else ""
                    )
                for timer in (self._beat, self._ack_timer):
                    if timer is not None:
                        timer.cancel()
                for answering in self._answering or ():
                    answering.entry.unwatch(answering)
                self._answering = self._stalled = None
                for task in (reader, writer, *self._tasks):
                    task.cancel()
                await asyncio.gather(reader, writer, *self._tasks, return_exceptions=True)
            finally:
                # Even when cancelled during the cleanup above (grpc cancels the
                # Connect handler when the client goes away), or the owner would
                # keep a dead session registered and wait on it for ever.
                self._is_closed = True
                if self._closed_event is not None:
                    self._closed_event.set()
                if self._on_closed is not None:
                    self._on_closed(self)

    def _begin_close(self, error: SigwireError | None) -> None:
        if self._closing:
            return
        self._closing = True
        close_requested = self._close_requested
        if close_requested is not None and not close_requested.done():
            close_requested.set_result(None)
        if error is not None and self.error is None:
            self.error = error
        closed = (
            self.error
            if isinstance(self.error, ConnectionClosedError)
            else ConnectionClosedError(
                f"{self.name} closed" + (f": {self.error.message}" if self.error else "")
            )
        )
        self._credit.close(closed)
        self._reply_room.close(closed)
        self._queue.put_nowait(_CLOSE)

    async def _reader(self) -> None:
        stream = self.stream
        try:
            while not self._closing:
                data = await stream.recv()
                if data is None:
                    break
                self._last_heard = time.monotonic()
                # Counted from the wire first: parsing builds every message
                # at once, so only a frame within its limits is parsed (a
                # small one is parsed at once, its counts checked after).
                if len(data) > _UNWALKED_SIZE:
                    _proto.check_frame(data, _MAX_FRAME_MESSAGES)
                frame = pb.Frame()
                try:
                    frame.ParseFromString(data)
                except Exception:
                    raise EnvelopeError("undecodable frame") from None
                await self._take(frame)
                # Let the loop run once per frame. A recv that finds a frame
                # queued (websockets, the in-memory pipe) returns without
                # suspending, and the tasks this frame's handlers left to end
                # on the next iteration would pile up frame after frame: the
                # collector walked hundreds of them, 4x as often as over gRPC.
                await asyncio.sleep(0)
        except SigwireError as exc:
            # Kept as the session's error, so it keeps nothing else: its
            # traceback would hold this frame's locals (the refused frame).
            exc.__traceback__ = exc.__context__ = exc.__cause__ = None
            self._begin_close(exc)
        except Exception as exc:
            log.debug("%s: stream failed: %r", self.name, exc)
            self._begin_close(ConnectionClosedError(f"{self.name}: stream failed"))
        finally:
            self._begin_close(None)

    async def _take(self, frame: pb.Frame) -> None:
        if frame.acked:
            self._release(frame.acked)
        body = frame.WhichOneof("body")
        if body == "envelopes":
            # Never block the reader: replies to our own requests may sit in
            # later frames, and handlers may be waiting for exactly those.
            # Envelopes beyond the window wait here; the peer cannot send more
            # than its window unacknowledged, and envelopes waiting here are
            # not acknowledged, so the backlog stays bounded.
            count = len(frame.envelopes.envelopes)
            waiting = len(self._backlog) + count
            if count > _MAX_FRAME_MESSAGES or waiting > 2 * self.options.window:
                # Only a peer that ignores its window (or batches beyond what any
                # sigwire writer sends) gets here; refuse before decoding anything.
                raise OverloadedError(
                    f"peer sent {waiting} envelopes beyond the window of "
                    f"{self.options.window} it was granted"
                )
            entry = [frame.sequence, count]
            self._unstarted.append(entry)
            envelopes = [_proto.envelope_from_pb(msg) for msg in frame.envelopes.envelopes]
            checked: list[bool | None]
            if count < _BATCH_VERIFY:
                checked = [None] * count  # verified inline by the dispatcher's full check
            else:
                checked = await _check_batch(
                    [(e.signature, e.sender, e.signing_input()) for e in envelopes]
                )
            self._backlog.extend(
                (envelope, entry, ok) for envelope, ok in zip(envelopes, checked, strict=True)
            )
            self._hold = count > 1
            try:
                self._pump()
            finally:
                self._hold = False
        elif body == "replies":
            if len(frame.replies.replies) > _MAX_FRAME_MESSAGES:
                raise OverloadedError("a frame of more replies than any writer batches")
            messages: Sequence[pb.Reply] = frame.replies.replies
            pending = self._pending
            if pending is not None and len(messages) >= _BATCH_VERIFY:
                # Nobody waits for an unsolicited reply: dropped here, before
                # the batch check verifies it (a lone reply reaches the
                # correlator, which looks it up before verifying).
                messages = [msg for msg in messages if pending(msg.request_id) is not None]
            replies = [_proto.reply_from_pb(msg) for msg in messages]
            if len(replies) < _BATCH_VERIFY:
                checked = [None] * len(replies)  # verified inline by the correlator
            else:
                checked = await _check_batch(
                    [(r.signature, r.responder, r.signing_input()) for r in replies]
                )
            for reply, ok in zip(replies, checked, strict=True):
                self._on_reply(reply, ok is True, ok is False)
        elif body == "ack":
            self._release(frame.ack.sequence)
        elif body == "ping":
            # One pending pong at most, answering the latest ping: a peer that
            # pings without reading cannot grow our queue.
            self._pong_token = frame.ping.token
            if not self._pong_queued:
                self._pong_queued = True
                self._queue.put_nowait(_PONG)
        elif body == "goaway":
            info = GoAwayInfo(frame.goaway.reason, frame.goaway.message, frame.goaway.grace_ms)
            self.goaway = info
            if self._on_goaway is not None:
                self._on_goaway(info)
        if len(self._unstarted) > 4 * self.options.window:
            raise OverloadedError("peer sent frames far beyond the window it was granted")
        if body != "envelopes" and frame.sequence:
            # Replies are taken in charge on arrival, but acks are cumulative:
            # this one waits behind any earlier frame whose envelopes have not started.
            self._unstarted.append([frame.sequence, 0])
            self._advance_ack()

    def _release(self, sequence: int) -> None:
        unacked = self._unacked
        released = done = 0
        for sent, count in unacked:
            if sent > sequence:
                break
            released += count
            done += 1
        if done:
            del unacked[:done]
        if released:
            self._credit.release(released)

    def _pump(self) -> None:
        # Start what the window allows. Starting is synchronous (every check
        # before the handler runs here, and the handler's first step), and an
        # envelope may be answered at once (a refusal, a cached answer) and
        # free its slot: the loop, not a nested call, then starts the next one.
        # One pass starts envelopes for _START_BUDGET seconds at most; the
        # rest start on a later turn of the loop, so that handlers that do
        # much before their first wait cannot hold it for a whole frame.
        if self._pumping:
            return
        self._pumping = True
        backlog = self._backlog
        started = 0
        deadline = time.perf_counter() + _START_BUDGET
        try:
            window = self.options.window
            while started < len(backlog) and self._serving < window and not self._closing:
                if started and time.perf_counter() > deadline:
                    asyncio.get_running_loop().call_soon(self._pump)
                    break
                envelope, entry, verdict = backlog[started]
                started += 1
                entry[1] -= 1
                self._serving += 1
                # Started from here on: a reply written at once carries the ack.
                self._advance_received()
                self._start(envelope, verdict)
        finally:
            del backlog[:started]
            self._pumping = False
        self._advance_ack()

    def _advance_received(self) -> None:
        # What may be acked: every frame up to the first whose envelopes have
        # not all started.
        unstarted = self._unstarted
        done = 0
        for sequence, waiting in unstarted:
            if waiting:
                break
            done += 1
            if sequence > self._received:
                self._received = sequence
        if done:
            del unstarted[:done]

    def _advance_ack(self) -> None:
        self._advance_received()
        if self._received <= self._acked or self._ack_queued:
            return
        # Acks ride behind the next flush of data (a reply is usually on its
        # way), so they stay off the critical path; they go out on their own
        # only when a quarter window is waiting, or after _ACK_DELAY.
        if self._received - self._acked >= max(1, self.options.window // 4):
            self._queue_ack()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(_ACK_DELAY, self._queue_ack)

    def _queue_ack(self) -> None:
        self._ack_timer = None
        if not self._ack_queued and not self._closing and self._received > self._acked:
            self._ack_queued = True
            self._queue.put_nowait(_ACK)

    def _start(self, envelope: Envelope, verdict: bool | None) -> None:
        dispatcher = self.dispatcher
        try:
            started = dispatcher.begin(
                envelope,
                self,
                authenticated=verdict is True,
                forged=verdict is False,
                context=self._context,
            )
        except SigwireError as exc:
            if isinstance(exc, ConnectionClosedError) and not isinstance(exc, ShuttingDownError):
                self._served()
                return
            # Refused (draining included: the peer must hear it, not wait for
            # a reply that never comes).
            self._answer(envelope, _answered(dispatcher.error_reply(envelope, exc)))
            return
        except Exception:
            # A bug of the agent's: the peer still hears that this envelope
            # failed (with an error id; the traceback stays in the log).
            error = internal_error("%s: failed to start envelope %r", self.name, envelope.id)
            self._answer(envelope, _answered(dispatcher.error_reply(envelope, error)))
            return
        if isinstance(started, Reply):
            self._answer(envelope, _answered(started))  # a hello's
            return
        self._answer(envelope, started)

    def _answer(self, envelope: Envelope, entry: Answer) -> None:
        # Follow an answer until its last reply is queued. A refusal is a
        # one-reply answer followed the same way: it waits for room for
        # replies like any other, holding its envelope's slot meanwhile, so a
        # peer that stops reading cannot queue refusals without end.
        answering = _Answering(self, envelope, entry)
        if self._answering is None:
            self._answering = set()
        self._answering.add(answering)
        if not entry.done:
            entry.watch(answering)
        self._follow(answering)

    def _follow(self, answering: _Answering) -> None:
        # Queue the replies the answer has gained since last time, while there
        # is room (the writer calls again once it has made some). Replies take
        # no window credit from the peer: they answer envelopes that already
        # did, and waiting on the peer's acks for them could deadlock two peers
        # that both request heavily. They are bounded all the same: a peer that
        # stops reading stalls the writer, replies stall here holding their
        # envelopes' slots, no new envelope starts, and a peer that keeps
        # sending beyond its window is cut off.
        while True:
            entry = answering.entry
            replies = entry.replies
            while answering.index < len(replies):
                if self._closing:
                    return
                if not self._reply_room.try_acquire():
                    if self._stalled is None:
                        self._stalled = []
                    if answering not in self._stalled:
                        self._stalled.append(answering)
                    return
                reply = self.dispatcher.restate(replies[answering.index], answering.digest)
                answering.index += 1
                self._send(reply)
            entry.took(answering.index)
            if not entry.done:
                return
            entry.unwatch(answering)
            if finished(entry) or self._closing:
                break
            # It had started: not SHUTTING_DOWN's refusal, which clients re-send
            # on their own, but the peer must still hear that it ended.
            error = HandlerCancelledError("the handler was cancelled before it answered")
            answering.entry = _answered(self.dispatcher.error_reply(answering.envelope, error))
            answering.index = 0
        if self._answering is not None:
            self._answering.discard(answering)
        if self._stalled and answering in self._stalled:
            # (Cannot happen while room frees only through _resume_stalled;
            # an answer must never be served twice should that change.)
            self._stalled.remove(answering)
        self._served()

    def _served(self) -> None:
        self._serving -= 1
        if not self._closing:
            self._pump()

    def _resume_stalled(self) -> None:
        stalled = self._stalled
        while stalled and self._reply_room.available > 0 and not self._closing:
            self._follow(stalled.pop(0))

    def _send(self, message: Envelope | Reply) -> None:
        # Write a message at once when the stream is idle: nothing queued or
        # being written, and (for a request) nothing unacknowledged in flight.
        # That is the common case of one request at a time, which then skips
        # the hop to the writer task. Anything else is queued for the writer,
        # which batches.
        if (
            self._writing
            or self._hold
            or self._closing
            or not self._queue.empty()
            or (self._unacked and isinstance(message, Envelope))
        ):
            self._queue.put_nowait(message)
            return
        self._writing = True
        # Started eagerly: the frame is built and handed to the transport
        # now, in a task of its own that also waits for the transport to take
        # it, so a caller cancelled meanwhile cannot cancel the write. Until
        # that task is done (the next loop iteration at the earliest), what
        # follows queues behind it and is batched.
        task = start_eagerly(self._write_now(message), self._context.copy())
        self._tasks.add(task)
        task.add_done_callback(self._write_task_done)

    async def _write_now(self, message: Envelope | Reply) -> None:
        try:
            await self._flush([message])
        except Exception as exc:
            await self._write_failed(exc)

    def _write_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._written()

    def _written(self) -> None:
        self._writing = False
        done, self._write_done = self._write_done, None
        if done is not None and not done.done():
            done.set_result(None)

    async def _writer(self) -> None:
        queue = self._queue
        # Flushes since the writer last let the loop run, as far as it knows.
        flushes = 0
        try:
            while True:
                if queue.empty():
                    await queue.wait()
                    flushes = 0
                if self._writing:
                    # A message being written at once; what was queued behind
                    # it goes next, in order.
                    done = self._write_done = asyncio.get_running_loop().create_future()
                    await done
                    continue
                if queue.qsize() < _BATCH_MESSAGES:
                    # Room left in the frame: let the loop run once, so callers
                    # woken in the same pass as this writer (those of a frame
                    # of replies just read) join it. Without this a pipelined
                    # stream settled into frames of 1 and 31, each frame of one
                    # paying a whole signature and verification. Nothing is
                    # written at once meanwhile: the queue is not empty.
                    await asyncio.sleep(0)
                    flushes = 0
                batch = [queue.get_nowait()]
                size = 0
                while not queue.empty() and len(batch) < _BATCH_MESSAGES and size < _BATCH_BYTES:
                    nxt = queue.get_nowait()
                    batch.append(nxt)
                    if isinstance(nxt, Envelope):
                        size += len(nxt.payload) + _metadata_size(nxt)
                    elif isinstance(nxt, Reply):
                        size += len(nxt.data)
                self._writing = True
                try:
                    stop = await self._flush(batch)
                finally:
                    self._writing = False
                if stop:
                    return
                flushes += 1
                if flushes >= _WRITE_FRAMES:
                    # A transport that takes every frame without waiting never
                    # suspends the writer, and each frame written frees room
                    # for more replies: up to four windows of them, each
                    # signed on its own for a peer that does not batch.
                    await asyncio.sleep(0)
                    flushes = 0
        except Exception as exc:
            await self._write_failed(exc)

    async def _write_failed(self, exc: Exception) -> None:
        log.debug("%s: write failed: %r", self.name, exc)
        self._begin_close(ConnectionClosedError(f"{self.name}: write failed"))
        # The reader may be blocked in recv(); closing the stream ends it.
        with contextlib.suppress(Exception):
            await self.stream.close()

    async def _flush(self, batch: list[object]) -> bool:
        frames: list[pb.Frame] = []
        envelopes: list[Envelope] = []
        replies: list[Reply] = []
        stop = False
        for item in batch:
            if isinstance(item, Envelope):
                if replies:
                    self._close_replies(replies, frames)
                envelopes.append(item)
            elif isinstance(item, Reply):
                if envelopes:
                    self._close_envelopes(envelopes, frames)
                replies.append(item)
            elif item is _ACK:
                continue
            else:
                if envelopes:
                    self._close_envelopes(envelopes, frames)
                if replies:
                    self._close_replies(replies, frames)
                if item is _PONG:
                    self._pong_queued = False
                    frames.append(pb.Frame(pong=pb.Pong(token=self._pong_token)))
                elif item is _CLOSE:
                    stop = True
                elif isinstance(item, pb.Frame):
                    frames.append(item)
        if envelopes:
            self._close_envelopes(envelopes, frames)
        if replies:
            self._close_replies(replies, frames)
        # The pending ack (cumulative, so one suffices) rides on the last frame
        # written anyway, for a peer that reads Frame.acked; otherwise, or when
        # nothing else is written, it takes a frame of its own.
        self._ack_queued = False
        if self._received > self._acked:
            self._acked = self._received
            if frames and self.piggyback_acks:
                frames[-1].acked = self._acked
            else:
                frames.append(pb.Frame(ack=pb.Ack(sequence=self._acked)))
        send = self.stream.send
        for frame in frames:
            await send(frame.SerializeToString())
        return stop

    def _close_envelopes(self, envelopes: list[Envelope], frames: list[pb.Frame]) -> None:
        count = len(envelopes)
        self._sent += count
        signed = self._sign(envelopes)
        on_signed = self._on_signed
        if on_signed is not None:
            for before, after in zip(envelopes, signed, strict=True):
                if before is not after:
                    on_signed(before, after)
        frame = pb.Frame(sequence=self._sent)
        container = frame.envelopes.envelopes
        for envelope in signed:
            _proto.add_envelope(container, envelope)
        frames.append(frame)
        # Envelopes hold window credit until the peer acks this frame.
        self._unacked.append((self._sent, count))
        envelopes.clear()

    def _close_replies(self, replies: list[Reply], frames: list[pb.Frame]) -> None:
        count = len(replies)
        self._reply_room.release(count)
        if self._stalled:
            self._resume_stalled()
        self._sent += count
        frame = pb.Frame(sequence=self._sent)
        container = frame.replies.replies
        for reply in self._sign(replies):
            _proto.add_reply(container, reply)
        frames.append(frame)
        replies.clear()

    def _sign(self, messages: list[_M]) -> list[_M]:
        # Sign what was queued unsigned (our own requests and answers): in one
        # batch signature when the peer accepts them, else one by one. An
        # answer signed before (a re-send from the reply cache) keeps its
        # signature and costs none.
        identity = self._identity
        if len(messages) == 1 and messages[0].signature is None:
            # The common case when idle: one message, signed alone.
            only = messages[0]
            if isinstance(only, Envelope):
                if only.sender == identity.did:
                    return [identity.sign_envelope(only)]
            elif only.responder == identity.did:
                again = only._signed or (only._batch_signed if self.batch_signatures else None)
                return [again if again is not None else identity.sign_reply(only)]
        did = identity.did
        out = list(messages)
        todo = []
        for i, m in enumerate(messages):
            if m.signature is not None:
                continue
            if (m.sender if isinstance(m, Envelope) else m.responder) != did:
                # Never written unsigned: a bug upstream, and the stream says so.
                raise SigwireError("refusing to write an unsigned message by another DID")
            if isinstance(m, Reply):
                # Only a peer that accepts batch signatures gets a batch form.
                again = m._signed or (m._batch_signed if self.batch_signatures else None)
                if again is not None:
                    out[i] = again
                    continue
            todo.append(i)
        if not todo:
            return out
        if self.batch_signatures and len(todo) > 1:
            signed = identity.sign_batch([messages[i] for i in todo])
        else:
            signed = [
                identity.sign_envelope(m) if isinstance(m, Envelope) else identity.sign_reply(m)
                for m in (messages[i] for i in todo)
            ]
        for i, message in zip(todo, signed, strict=True):
            out[i] = message
        return out

    def _heartbeat(self) -> None:
        # A timer, not a task: an idle stream then costs no coroutine frame.
        if self._closing:
            return
        interval = self.options.heartbeat
        timeout = self.options.heartbeat_timeout
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        beat = self._beat
        late = loop.time() - beat.when() if beat is not None else 0.0
        if late > 0:
            # Silence counts only while this loop ran on time: frames that
            # came while it was held up (by a long callback anywhere in the
            # process) are still unread, and the peer is not to blame for that.
            self._last_heard = min(now, self._last_heard + late)
        silent = now - self._last_heard
        if silent >= timeout:
            log.info("%s: peer silent for %.1fs; closing", self.name, silent)
            self._begin_close(
                ConnectionClosedError("the peer went silent", reason="HEARTBEAT_TIMEOUT")
            )
            # A black-holed peer leaves recv() blocked; closing the stream ends it.
            self._tasks.add(asyncio.ensure_future(self._close_stream()))
            return
        if silent >= interval:
            self._ping_token += 1
            self._queue.put_nowait(pb.Frame(ping=pb.Ping(token=self._ping_token)))
        self._beat = loop.call_later(min(interval, timeout) / 2, self._heartbeat)

    async def _close_stream(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.close()
