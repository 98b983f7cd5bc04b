"""Correlation of replies with the requests (or pushes) waiting for them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sigwire.envelope import Envelope, Reply
from sigwire.errors import SigwireError, error_from_wire
from sigwire.signing import Verifier

__all__ = ["Correlator", "PendingCall"]

log = logging.getLogger("sigwire.client")


class PendingCall:
    """One request waiting for its reply or replies.

    Attributes:
        envelope: The signed request, kept for re-sending after a reconnect.
        expected_responder: The DID every reply must come from, if known.
        sent_on: The session it was last sent on (re-sent on a new one).
    """

    __slots__ = (
        "_head",
        "_items",
        "_waiter",
        "envelope",
        "expected_responder",
        "next_sequence",
        "on_final",
        "sent_on",
    )

    def __init__(self, envelope: Envelope, expected_responder: str | None) -> None:
        self.envelope = envelope
        self.expected_responder = expected_responder
        self.next_sequence = 0
        self.sent_on: object = None
        # Called with the final verified reply (for pushes nobody awaits).
        self.on_final: Callable[[Reply], None] | None = None
        # One consumer at a time, so a list and one waiter (made only while
        # it waits) do what an asyncio.Queue would, for less per request.
        self._items: list[Reply | SigwireError] = []
        self._head = 0
        self._waiter: asyncio.Future[None] | None = None

    async def next(self) -> Reply:
        """The next reply, in sequence order.

        Raises:
            SigwireError: The call failed (connection lost for good, bad reply
                signature, or the peer's error).
        """
        items = self._items
        while self._head == len(items):
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = items[self._head]
        self._head += 1
        if self._head == len(items):
            items.clear()
            self._head = 0
        if isinstance(item, SigwireError):
            raise item
        if not item.success:
            error = item.error
            raise error_from_wire(
                error.reason if error else "UNKNOWN",
                error.message if error else "the peer reported a failure",
                error.details if error else None,
            )
        return item

    def put(self, item: Reply | SigwireError) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: SigwireError) -> None:
        self.put(error)


class Correlator:
    """Pending calls by request id; verifies every reply before delivering it.

    A reply is delivered only if its signature verifies, it is bound to the
    very request (id and signature digest), and it comes from the expected
    responder. A reply that fails these checks fails its call when the
    correlator serves one stream to one known peer (``fail_on_invalid``, the
    client); a server, whose correlator is shared by every connected agent,
    drops it, so that no agent can cancel a push meant for another. Replies
    already delivered (same sequence number, as after a re-send) are dropped,
    so a streamed answer is never seen twice.
    """

    def __init__(self, verifier: Verifier, *, fail_on_invalid: bool = True) -> None:
        self.verifier = verifier
        self.fail_on_invalid = fail_on_invalid
        self._pending: dict[str, PendingCall] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, envelope: Envelope, expected_responder: str | None) -> PendingCall:
        call = PendingCall(envelope, expected_responder)
        self._pending[envelope.id] = call
        return call

    def get(self, request_id: str) -> PendingCall | None:
        return self._pending.get(request_id)

    def discard(self, call: PendingCall) -> None:
        if self._pending.get(call.envelope.id) is call:
            del self._pending[call.envelope.id]

    def pending(self) -> list[PendingCall]:
        return list(self._pending.values())

    def deliver(self, reply: Reply, signature_checked: bool = False, forged: bool = False) -> None:
        call = self._pending.get(reply.request_id)
        if call is None:
            log.debug("dropping reply to unknown or finished request %r", reply.request_id)
            return
        if reply.sequence < call.next_sequence:
            return  # already delivered before a re-send
        try:
            self.verifier.verify_reply(
                reply,
                call.envelope,
                expected_responder=call.expected_responder,
                signature_checked=signature_checked,
                forged=forged,
            )
        except SigwireError as exc:
            # A failed call tells its caller; only a dropped reply needs the log.
            level = logging.INFO if self.fail_on_invalid else logging.WARNING
            log.log(level, "refusing reply to %r: %s", reply.request_id, exc)
            if self.fail_on_invalid:
                call.fail(exc)
                self.discard(call)
            return
        call.next_sequence = reply.sequence + 1
        call.put(reply)
        if reply.final:
            self.discard(call)
            if call.on_final is not None:
                call.on_final(reply)

    def fail_all(self, error: SigwireError) -> None:
        """Fail every pending call at once (the connection is gone for good)."""
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.fail(error)
