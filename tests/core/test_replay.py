"""ReplayGuard: the timestamp window, the nonce cache, its bounds, and thread safety."""

from __future__ import annotations

import dataclasses
import gc
import os
import random
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from sigwire.envelope import Envelope
from sigwire.errors import OverloadedError, ReplayError, StaleMessageError
from sigwire.signing import Identity, ReplayGuard
from tests.conftest import TIMEOUT

from .conftest import T0

PAST_MS = 300_000
FUTURE_MS = 30_000
WINDOW_MS = PAST_MS + FUTURE_MS


@pytest.fixture
def make(alice: Identity) -> Callable[..., Envelope]:
    """A factory of envelopes signed by alice: make(n, created_at_ms=T0, payload=b"")."""

    def build(n: int, *, created_at_ms: int = T0, payload: bytes = b"") -> Envelope:
        return alice.sign_envelope(
            Envelope(
                id=f"env-{n}",
                kind="echo",
                sender=alice.did,
                payload=payload,
                created_at_ms=created_at_ms,
                nonce=n.to_bytes(16, "big"),
            )
        )

    return build


@pytest.fixture
def guard() -> ReplayGuard:
    """A guard with the default window (5 min past, 30 s future)."""
    return ReplayGuard()


def test_defaults_are_documented(guard: ReplayGuard) -> None:
    """The default window is 5 minutes back and 30 seconds ahead."""
    assert (guard.past_ms, guard.future_ms) == (PAST_MS, FUTURE_MS)


def test_fresh_then_duplicate(guard: ReplayGuard, make: Callable[..., Envelope]) -> None:
    """The first sighting of an envelope is fresh; an exact re-send is a duplicate (False)."""
    envelope = make(1)
    assert guard.check_and_mark(envelope, now=T0) is True
    assert guard.check_and_mark(envelope, now=T0) is False
    assert guard.check_and_mark(envelope, now=T0 + 1000) is False
    assert len(guard) == 1


def test_same_nonce_other_content_is_a_replay(
    guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """A second envelope with a seen nonce but other content raises ReplayError."""
    assert guard.check_and_mark(make(1), now=T0)
    forged = make(1, payload=b"other")
    assert forged.nonce == make(1).nonce
    with pytest.raises(ReplayError) as info:
        guard.check_and_mark(forged, now=T0)
    assert type(info.value) is ReplayError
    assert info.value.reason == "REPLAY"
    assert len(guard) == 1


def test_same_nonce_from_another_sender_is_fresh(
    guard: ReplayGuard, make: Callable[..., Envelope], bob: Identity
) -> None:
    """Nonces are remembered per sender: bob may use a nonce alice used."""
    mine = make(1)
    theirs = bob.sign_envelope(dataclasses.replace(mine, sender=bob.did, signature=None))
    assert guard.check_and_mark(mine, now=T0)
    assert guard.check_and_mark(theirs, now=T0)
    assert len(guard) == 2


def test_distinct_envelopes_are_all_fresh(
    guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """Envelopes with distinct nonces are each fresh once."""
    envelopes = [make(n) for n in range(50)]
    assert all(guard.check_and_mark(e, now=T0) for e in envelopes)
    assert not any(guard.check_and_mark(e, now=T0) for e in envelopes)
    assert len(guard) == 50


@pytest.mark.parametrize(
    ("now", "skew"),
    [
        (T0 + PAST_MS + 1, -(PAST_MS + 1)),
        (T0 + 10 * PAST_MS, -10 * PAST_MS),
        (T0 - FUTURE_MS - 1, FUTURE_MS + 1),
        (T0 - 10 * FUTURE_MS, 10 * FUTURE_MS),
    ],
    ids=["1 ms too old", "far too old", "1 ms too far ahead", "far ahead"],
)
def test_timestamp_outside_window_is_stale(
    guard: ReplayGuard, make: Callable[..., Envelope], now: int, skew: int
) -> None:
    """An envelope outside the window raises StaleMessageError with its skew, unrecorded."""
    with pytest.raises(StaleMessageError) as info:
        guard.check_and_mark(make(1), now=now)
    assert info.value.skew_ms == skew
    assert info.value.reason == "TIMESTAMP_OUT_OF_WINDOW"
    assert isinstance(info.value, ReplayError)
    assert len(guard) == 0


def test_stale_message_error_says_old_or_future() -> None:
    """StaleMessageError's message says whether the timestamp is old or in the future."""
    assert "old" in str(StaleMessageError(-5))
    assert "future" in str(StaleMessageError(5))


@pytest.mark.parametrize(
    "now", [T0 + PAST_MS, T0 - FUTURE_MS, T0], ids=["oldest allowed", "newest allowed", "now"]
)
def test_timestamp_at_window_edge_is_accepted(
    guard: ReplayGuard, make: Callable[..., Envelope], now: int
) -> None:
    """Timestamps exactly at the edges of the window are accepted."""
    guard.check_window(T0, now=now)
    assert guard.check_and_mark(make(1), now=now)


def test_custom_window_edges() -> None:
    """A custom window is enforced at exactly its own edges."""
    guard = ReplayGuard(past_ms=1000, future_ms=100)
    guard.check_window(T0, now=T0 + 1000)
    guard.check_window(T0, now=T0 - 100)
    with pytest.raises(StaleMessageError):
        guard.check_window(T0, now=T0 + 1001)
    with pytest.raises(StaleMessageError):
        guard.check_window(T0, now=T0 - 101)


def test_default_ttl_is_at_least_twice_the_window() -> None:
    """The default TTL is at least twice past_ms + future_ms, for default and custom windows."""
    assert ReplayGuard().ttl_ms >= 2 * WINDOW_MS
    assert ReplayGuard(past_ms=1000, future_ms=500).ttl_ms >= 3000


@pytest.mark.parametrize("ttl_ms", [0, 1, WINDOW_MS, 2 * WINDOW_MS - 1])
def test_ttl_shorter_than_twice_the_window_is_refused(ttl_ms: int) -> None:
    """ReplayGuard refuses a TTL shorter than twice the window."""
    with pytest.raises(ValueError, match="twice"):
        ReplayGuard(ttl_ms=ttl_ms)


def test_ttl_of_exactly_twice_the_window_is_allowed() -> None:
    """A TTL of exactly twice the window, or more, is accepted."""
    assert ReplayGuard(ttl_ms=2 * WINDOW_MS).ttl_ms == 2 * WINDOW_MS
    assert ReplayGuard(ttl_ms=10 * WINDOW_MS).ttl_ms == 10 * WINDOW_MS


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity: int) -> None:
    """ReplayGuard refuses a capacity below one."""
    with pytest.raises(ValueError, match="capacity"):
        ReplayGuard(capacity=capacity)


def test_nonce_is_remembered_until_ttl(guard: ReplayGuard, make: Callable[..., Envelope]) -> None:
    """A nonce stays remembered for exactly ttl_ms, then its entry is freed for reuse."""
    ttl = guard.ttl_ms
    assert guard.check_and_mark(make(1), now=T0)
    # Same sender and nonce, new content, timestamps fresh at the time they are checked.
    with pytest.raises(ReplayError):
        guard.check_and_mark(make(1, created_at_ms=T0 + ttl - 1), now=T0 + ttl - 1)
    assert len(guard) == 1
    assert guard.check_and_mark(make(1, created_at_ms=T0 + ttl), now=T0 + ttl)
    assert len(guard) == 1


def test_a_full_cache_forgets_its_oldest_and_refuses_what_is_no_newer(
    make: Callable[..., Envelope],
) -> None:
    """At capacity, a newcomer is accepted: the oldest entry goes, and the floor rises to it.

    Whatever was created at or before the floor and is not remembered could be
    the forgotten envelope again: refused as stale, with the floor in the details.
    """
    guard = ReplayGuard(capacity=3)
    now = T0 + FUTURE_MS + 10  # the entries are all old enough to forget
    for n in range(3):
        assert guard.check_and_mark(make(n, created_at_ms=T0 + n), now=now)
    assert (guard.floor_ms, guard.forgotten) == (None, 0)
    assert guard.check_and_mark(make(3, created_at_ms=T0 + 3), now=now + 1)
    assert (len(guard), guard.floor_ms, guard.forgotten) == (3, T0, 1)
    with pytest.raises(StaleMessageError) as info:
        guard.check_and_mark(make(0, created_at_ms=T0), now=now + 2)  # the forgotten one
    assert info.value.reason == "TIMESTAMP_OUT_OF_WINDOW"
    assert info.value.details == {"skew_ms": str(T0 - now - 2), "floor_ms": str(T0)}
    assert info.value.floor_ms == T0
    with pytest.raises(StaleMessageError):
        guard.check_and_mark(make(9, created_at_ms=T0), now=now + 2)  # new, but no newer
    # Those still remembered are told apart exactly, floor or not.
    assert guard.check_and_mark(make(1, created_at_ms=T0 + 1), now=now + 2) is False
    with pytest.raises(ReplayError) as replay:
        guard.check_and_mark(make(1, created_at_ms=T0 + 1, payload=b"x"), now=now + 2)
    assert not isinstance(replay.value, StaleMessageError)
    assert guard.check_and_mark(make(10, created_at_ms=T0 + 1), now=now + 2)  # newer: fresh
    assert (len(guard), guard.floor_ms, guard.forgotten) == (3, T0 + 1, 2)


def test_a_cache_full_of_recent_nonces_refuses_rather_than_raise_the_floor_past_them(
    make: Callable[..., Envelope],
) -> None:
    """Nothing dated in the last future_ms is forgotten: OVERLOADED instead, floor unmoved.

    Otherwise envelopes dated up to future_ms ahead (allowed) would push the
    floor to the present, and every sender's next envelope would be refused.
    """
    guard = ReplayGuard(capacity=2)
    ahead = T0 + FUTURE_MS
    assert guard.check_and_mark(make(0, created_at_ms=ahead), now=T0)  # dated 30 s ahead
    assert guard.check_and_mark(make(1, created_at_ms=ahead), now=T0)
    for now in (T0, T0 + FUTURE_MS, T0 + 2 * FUTURE_MS - 1):
        with pytest.raises(OverloadedError) as info:
            guard.check_and_mark(make(2, created_at_ms=now), now=now)
        assert info.value.reason == "OVERLOADED"
        assert (len(guard), guard.floor_ms, guard.forgotten) == (2, None, 0)
    now = T0 + 2 * FUTURE_MS  # make(0) now dates from future_ms ago: it may go
    assert guard.check_and_mark(make(2, created_at_ms=now), now=now)
    assert (guard.floor_ms, guard.forgotten) == (ahead, 1)
    assert guard.floor_ms <= now - FUTURE_MS


def test_the_floor_follows_timestamps_not_the_clock(make: Callable[..., Envelope]) -> None:
    """A clock stepped back cannot reopen a forgotten envelope; the floor never goes down."""
    guard = ReplayGuard(capacity=2)
    later = T0 + FUTURE_MS
    assert guard.check_and_mark(make(0, created_at_ms=T0 + 5), now=later + 5)
    assert guard.check_and_mark(make(1, created_at_ms=T0 + 1), now=later + 6)
    assert guard.check_and_mark(make(2, created_at_ms=T0 + 6), now=later + 7)  # forgets 0
    assert guard.floor_ms == T0 + 5
    # Below the floor but still remembered: a duplicate, told apart exactly.
    assert guard.check_and_mark(make(1, created_at_ms=T0 + 1), now=later + 7) is False
    assert guard.check_and_mark(make(3, created_at_ms=T0 + 7), now=later + 8)  # forgets 1
    assert guard.floor_ms == T0 + 5  # 1 was older than the floor already
    for stepped_back in (later + 8, T0, T0 - 20_000):  # each inside the window of both
        for n, created in ((0, T0 + 5), (1, T0 + 1)):
            with pytest.raises(StaleMessageError) as info:
                guard.check_and_mark(make(n, created_at_ms=created), now=stepped_back)
            assert info.value.floor_ms == T0 + 5


@pytest.mark.parametrize("seed", range(30))
def test_no_envelope_is_ever_fresh_twice_whatever_the_capacity_or_the_clock(
    seed: int, make: Callable[..., Envelope]
) -> None:
    """Random arrivals, re-sends, reused nonces and releases against small caches, with a
    clock that sometimes jumps a TTL ahead or steps back: an envelope's first acceptance
    is its only one (or its first since a release that forgot it), and every refusal has
    the reason it gives."""
    rng = random.Random(seed)
    future_ms = rng.choice([0, 20, 100])
    guard = ReplayGuard(capacity=rng.randint(1, 8), past_ms=PAST_MS, future_ms=future_ms)
    sent: list[Envelope] = []
    fresh: set[bytes] = set()
    fresh_nonces: dict[bytes, set[bytes]] = {}
    held: list[Envelope] = []
    now = T0
    jumps: list[int] = []
    for step in range(500):
        jump = rng.random()
        if jump < 0.03:
            jumps.append(guard.ttl_ms + rng.randint(0, 5_000))
            now += jumps[-1]  # every entry expires
        elif jump < 0.06 and jumps:
            now -= jumps.pop() + rng.randint(-1_000, 1_000)  # the clock is stepped back
        else:
            now += rng.randint(0, 50)
        choice = rng.random()
        if sent and choice < 0.4:
            envelope = rng.choice(sent)  # an exact re-send (a retry, or a replay)
        elif sent and choice < 0.5:
            old = rng.choice(sent)  # the same nonce, other content
            envelope = make(
                int.from_bytes(old.nonce, "big"), created_at_ms=old.created_at_ms, payload=b"x"
            )
        else:
            envelope = make(10_000 + step, created_at_ms=now - rng.randint(0, 2_000))
            sent.append(envelope)
        digest = envelope.digest()
        try:
            accepted = guard.check_and_mark(envelope, now=now)
        except StaleMessageError as exc:
            floor = exc.floor_ms
            if floor is None:
                skew = envelope.created_at_ms - now
                assert skew < -PAST_MS or skew > future_ms
            else:
                assert envelope.created_at_ms <= floor == guard.floor_ms
            accepted = False
        except ReplayError:
            # A nonce taken by other content (the first with it may not be in `sent`).
            assert fresh_nonces.get(envelope.nonce, set()) - {digest}
            accepted = False
        except OverloadedError:
            assert len(guard) == guard.capacity
            accepted = False
        if accepted:
            assert digest not in fresh, "an envelope was accepted twice"
            fresh.add(digest)
            fresh_nonces.setdefault(envelope.nonce, set()).add(digest)
            held.append(envelope)
        # Releases (a handler that never ran): right away, as the dispatcher
        # does, or later, after other nonces were recorded. Only a release that
        # forgets an entry lets its envelope be fresh once more.
        released = None
        if accepted and rng.random() < 0.1:
            released = envelope
        elif held and rng.random() < 0.05:
            released = rng.choice(held)
        if released is not None:
            before = len(guard)
            guard.release(released)
            if len(guard) < before:
                fresh.discard(released.digest())
                fresh_nonces[released.nonce].discard(released.digest())
        assert len(guard) <= guard.capacity


def test_full_cache_evicts_expired_entries(make: Callable[..., Envelope]) -> None:
    """Expired entries make room first; only live ones are ever forgotten for room."""
    guard = ReplayGuard(capacity=2)
    ttl = guard.ttl_ms
    assert guard.check_and_mark(make(0), now=T0)
    assert guard.check_and_mark(make(1, created_at_ms=T0 + 10), now=T0 + 10)
    late = T0 + ttl
    assert guard.check_and_mark(make(2, created_at_ms=late), now=late)  # expires make(0)
    assert (len(guard), guard.forgotten, guard.floor_ms) == (2, 0, T0)
    later = T0 + 10 + ttl
    assert guard.check_and_mark(make(3, created_at_ms=later), now=later)  # expires make(1)
    assert (len(guard), guard.forgotten, guard.floor_ms) == (2, 0, T0 + 10)


def test_an_expired_nonce_stays_refused_when_the_clock_is_stepped_back(
    make: Callable[..., Envelope],
) -> None:
    """A clock a TTL ahead expires a nonce; stepped back, the envelope is in its window
    again, and only the floor keeps the replay out."""
    guard = ReplayGuard()
    assert guard.check_and_mark(make(0), now=T0)
    ahead = T0 + guard.ttl_ms
    assert guard.check_and_mark(make(1, created_at_ms=ahead), now=ahead)  # expires make(0)
    with pytest.raises(StaleMessageError) as info:
        guard.check_and_mark(make(0), now=T0 + 1)  # back in make(0)'s window
    assert info.value.floor_ms == T0


def _released_then_resent(guard: ReplayGuard, make: Callable[..., Envelope]) -> Envelope:
    # `first` recorded between two others, released, and sighted again at
    # T0 + 100: the newest entry now.
    first, other = make(1), make(2, created_at_ms=T0 + 1)
    assert guard.check_and_mark(make(0), now=T0)
    assert guard.check_and_mark(first, now=T0)
    assert guard.check_and_mark(other, now=T0 + 1)
    guard.release(first)
    assert len(guard) == 2
    assert guard.check_and_mark(first, now=T0 + 100) is True  # fresh again
    assert guard.check_and_mark(first, now=T0 + 100) is False
    return first


def test_a_full_guard_forgets_a_released_envelope_by_its_last_sighting(
    make: Callable[..., Envelope],
) -> None:
    """Released and sighted again, an envelope is the newest entry: a full guard forgets
    the one recorded after its first sighting before it."""
    guard = ReplayGuard(capacity=3)
    first = _released_then_resent(guard, make)
    later = T0 + 1 + FUTURE_MS
    assert guard.check_and_mark(make(3, created_at_ms=later), now=later)
    assert guard.check_and_mark(make(4, created_at_ms=later), now=later)
    assert (len(guard), guard.forgotten, guard.floor_ms) == (3, 2, T0 + 1)
    assert guard.check_and_mark(first, now=later) is False  # still held: a duplicate


def test_a_released_envelope_expires_a_ttl_after_its_last_sighting(
    make: Callable[..., Envelope],
) -> None:
    """Released and sighted again, an envelope is kept a TTL from its last sighting,
    not its first."""
    guard = ReplayGuard()
    _released_then_resent(guard, make)
    later = T0 + guard.ttl_ms + 50  # past the others and the first sighting, not the last
    assert guard.check_and_mark(make(3, created_at_ms=later), now=later)
    assert (len(guard), guard.floor_ms) == (2, T0 + 1)


def test_releases_leave_nothing_behind(make: Callable[..., Envelope]) -> None:
    """Envelopes recorded and released by the thousand, each with a newer one recorded
    after it, leave the guard as small as they found it."""
    guard = ReplayGuard()
    kept = make(0)
    assert guard.check_and_mark(kept, now=T0)
    baseline = sys.getsizeof(guard._queue)
    for n in range(1, 5001):
        released, newer = make(2 * n), make(2 * n + 1)
        assert guard.check_and_mark(released, now=T0)
        assert guard.check_and_mark(newer, now=T0)
        guard.release(released)  # not the last recorded
        guard.release(newer)  # the last recorded
    assert len(guard) == 1
    assert sys.getsizeof(guard._queue) < baseline + 100 * 1024
    assert guard.check_and_mark(kept, now=T0) is False
    assert guard.check_and_mark(make(2), now=T0) is True  # released: fresh again


def test_a_full_guard_costs_the_garbage_collector_nothing(
    guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """The guard holds its nonces in objects the collector does not track, however many
    there are and however recent: an OrderedDict is always tracked (visiting its entries
    added ~40 ms to every full collection at the default million), and a dict of tuples
    is tracked again by the next insert."""
    for n in range(2000):
        guard.check_and_mark(make(n), now=T0)
    gc.collect()
    assert guard.check_and_mark(make(2000), now=T0)  # one more since the collection
    assert len(guard) == 2001
    assert type(guard._seen) is dict
    assert not gc.is_tracked(guard._seen)


def test_a_release_right_after_marking_takes_its_record_back(
    guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """What the dispatcher does (refused after marking, released at once) leaves nothing
    behind, not even a record to skip later."""
    kept = make(0)
    assert guard.check_and_mark(kept, now=T0)
    size = len(guard._queue)
    for n in range(1, 100):
        assert guard.check_and_mark(make(n), now=T0)
        guard.release(make(n))
        assert len(guard._queue) == size
    assert len(guard) == 1


def test_a_call_that_fails_midway_changes_nothing(
    guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """A timestamp the records cannot hold fails the call before anything is recorded,
    and the guard goes on working; a TTL they cannot hold is refused up front."""
    with pytest.raises(struct.error):
        guard.check_and_mark(make(1), now=T0 + 0.5)  # type: ignore[arg-type]
    assert len(guard) == 0
    assert guard.check_and_mark(make(1), now=T0) is True
    assert guard.check_and_mark(make(2), now=T0) is True
    with pytest.raises(ValueError, match="64-bit"):
        ReplayGuard(past_ms=2**62)


def test_all_expired_entries_are_evicted_at_once(make: Callable[..., Envelope]) -> None:
    """A full cache whose entries have all expired holds only the newcomer afterwards."""
    guard = ReplayGuard(capacity=5)
    for n in range(5):
        guard.check_and_mark(make(n), now=T0)
    late = T0 + guard.ttl_ms
    assert guard.check_and_mark(make(9, created_at_ms=late), now=late)
    assert len(guard) == 1


# --- concurrency -------------------------------------------------------------------------

THREADS = 8


class _YieldingDict(dict[bytes, Any]):
    """A dict that gives up the CPU after each lookup.

    Widens the window between "is this nonce known?" and "remember it" so that
    a check_and_mark without its lock fails these tests reliably instead of
    almost never (the GIL alone makes the race rare, not impossible).
    """

    def get(self, key: bytes, default: Any = None) -> Any:
        value = super().get(key, default)
        os.sched_yield()
        return value


@pytest.fixture
def racy_guard() -> ReplayGuard:
    """A default guard whose nonce cache yields to other threads inside the critical section."""
    guard = ReplayGuard()
    assert type(guard._seen) is dict
    guard._seen = _YieldingDict(guard._seen)
    return guard


def _race(work: Callable[[int], list[bool]]) -> list[list[bool]]:
    """Run work(thread_index) in THREADS threads released together by a Barrier."""
    barrier = threading.Barrier(THREADS, timeout=TIMEOUT)
    results: list[list[bool]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    return results


def test_racing_threads_see_one_envelope_fresh_exactly_once(
    racy_guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """Eight threads racing check_and_mark on one envelope: exactly one call returns True."""
    envelope = make(1)
    attempts = 200

    def work(_: int) -> list[bool]:
        return [racy_guard.check_and_mark(envelope, now=T0) for _ in range(attempts)]

    outcomes = [result for results in _race(work) for result in results]
    assert len(outcomes) == THREADS * attempts
    assert outcomes.count(True) == 1
    assert len(racy_guard) == 1


def test_racing_threads_see_each_distinct_envelope_fresh_exactly_once(
    racy_guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """Eight threads racing over the same 500 envelopes: each is fresh exactly once overall."""
    envelopes = [make(n) for n in range(500)]

    def work(index: int) -> list[bool]:
        order = list(range(len(envelopes)))
        random.Random(index).shuffle(order)
        fresh = [False] * len(envelopes)
        for n in order:
            fresh[n] = racy_guard.check_and_mark(envelopes[n], now=T0)
        return fresh

    per_thread = _race(work)
    wins = [sum(thread[n] for thread in per_thread) for n in range(len(envelopes))]
    assert wins == [1] * len(envelopes)
    assert len(racy_guard) == len(envelopes)


def test_racing_threads_with_distinct_envelopes_all_succeed(
    racy_guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """Eight threads each marking their own 250 envelopes all get True for every one."""
    per = 250
    envelopes = [make(n) for n in range(THREADS * per)]

    def work(index: int) -> list[bool]:
        return [
            racy_guard.check_and_mark(e, now=T0) for e in envelopes[index * per : (index + 1) * per]
        ]

    assert all(all(results) and len(results) == per for results in _race(work))
    assert len(racy_guard) == THREADS * per


def test_unsigned_envelopes_with_other_content_are_replays(guard: ReplayGuard) -> None:
    """Unsigned envelopes are told apart by content, not by their (absent) signature."""
    first = Envelope(id="a", kind="k", sender="did:key:z", created_at_ms=T0, nonce=bytes(16))
    other = dataclasses.replace(first, payload=b"different")
    assert guard.check_and_mark(first, now=T0) is True
    assert guard.check_and_mark(first, now=T0) is False
    with pytest.raises(ReplayError):
        guard.check_and_mark(other, now=T0)


def test_a_renewed_envelope_is_a_fresh_request_under_the_same_id(alice: Identity) -> None:
    """``renewed()``: same id and content, new nonce and timestamp, unsigned; fresh to the guard."""
    guard = ReplayGuard()
    first = alice.sign_envelope(Envelope.new("echo", b"x", sender=alice.did))
    renewed = first.renewed()
    assert renewed.signature is None
    assert renewed.nonce != first.nonce
    assert renewed.created_at_ms >= first.created_at_ms
    same = ("id", "kind", "sender", "payload", "recipient", "metadata", "content_type")
    assert all(getattr(renewed, name) == getattr(first, name) for name in same)
    resigned = alice.sign_envelope(renewed)
    assert resigned.digest() != first.digest()
    assert guard.check_and_mark(first) is True
    assert guard.check_and_mark(resigned) is True


def test_remembered_nonces_cost_the_garbage_collector_nothing(
    guard: ReplayGuard, make: Callable[..., Envelope]
) -> None:
    """After a collection, a thousand remembered nonces leave no object for the collector to scan.

    (The cache holds up to a million entries; tracked ones would each be
    visited in every full collection, a pause of a good part of a second.)
    """
    envelopes = [make(n) for n in range(1000)]
    gc.collect()
    before = len(gc.get_objects())
    for envelope in envelopes:
        assert guard.check_and_mark(envelope, now=T0)
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert guard.check_and_mark(envelopes[10], now=T0) is False  # still remembered
