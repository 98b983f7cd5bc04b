"""The reply cache keeps answers within a count and a byte budget, packed once finished."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from pathlib import Path

import pytest

from sigwire.batch import BatchProof
from sigwire.dispatch import _PACK_AFTER, Answer, ReplyCache, _pack, _unpack
from sigwire.envelope import Reply, ReplyError, Signature
from sigwire.signing import Identity, Verifier
from sigwire.store import SqliteStore


def _answer(cache: ReplyCache, key: tuple[str, str], size: int, parts: int = 1) -> Answer:
    entry = cache.begin(key)
    for _ in range(parts):
        entry.add(Reply(request_id=key[1], request_digest=b"", responder="r", data=b"x" * size))
    cache.finish(entry, key)
    return entry


def test_answers_beyond_the_byte_budget_evict_the_oldest() -> None:
    """Finishing an answer past max_bytes drops the oldest finished answers first."""

    async def run() -> None:
        one = ReplyCache(size=1000, ttl=60)
        cost = _answer(one, ("s", "x"), 300).size
        cache = ReplyCache(size=1000, ttl=60, max_bytes=3 * cost + cost // 2)
        for i in range(5):
            _answer(cache, ("s", str(i)), 300)
        assert cache.bytes <= cache.max_bytes
        assert cache.get(("s", "0")) is None
        assert cache.get(("s", "1")) is None
        assert cache.get(("s", "2")) is not None
        assert cache.get(("s", "4")) is not None

    asyncio.run(run())


def test_an_answer_counts_what_keeping_each_reply_costs_not_only_its_data() -> None:
    """10,000 one-byte parts count as what their objects and signed forms hold (~800 B each)."""

    async def run() -> None:
        cache = ReplyCache(size=1000, ttl=60)
        entry = _answer(cache, ("s", "many"), 1, parts=10_000)
        assert entry.size == cache.bytes
        assert cache.bytes >= 10_000 * 790

    asyncio.run(run())


def test_answers_in_progress_are_never_evicted() -> None:
    """An answer still being computed stays, whatever the budget says."""

    async def run() -> None:
        cache = ReplyCache(size=1, ttl=60, max_bytes=10)
        running = cache.begin(("s", "busy"))
        _answer(cache, ("s", "done"), 100)
        assert cache.get(("s", "busy")) is running

    asyncio.run(run())


def _replies(identity: Identity, n: int, *, error: bool = False) -> list[Reply]:
    """``n`` unsigned replies by ``identity``, as handlers produce them."""
    failure = ReplyError("TASK_NOT_FOUND", "no such task", {"task": "t-1", "why": "gone"})
    return [
        Reply(
            request_id=f"req-{i}",
            request_digest=bytes([i % 256]) * 32,
            responder=identity.did,
            success=not error,
            data=b"" if error else f"data {i}".encode(),
            content_type="text/plain",
            error=failure if error else None,
            created_at_ms=1_700_000_000_000 + i,
            sequence=i % 3,
            final=i % 3 == 2,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("error", [False, True], ids=["data", "error"])
@pytest.mark.parametrize("signed", ["unsigned", "alone", "batch", "both", "restored"])
def test_a_packed_answer_comes_back_equal_with_its_signed_forms(
    alice: Identity, error: bool, signed: str
) -> None:
    """Packing keeps every field, the signature and the signed forms a re-send reuses."""
    replies = _replies(alice, 5, error=error)
    if signed in ("alone", "both"):
        for reply in replies:
            alice.sign_reply(reply)
    if signed in ("batch", "both"):
        alice.sign_batch(replies)
    if signed == "restored":  # read back from a store: the replies carry their signature
        replies = alice.sign_batch(replies)
    entry = Answer()
    entry.replies = list(replies)  # a streamed answer: several replies
    entry.done, entry.expires, entry.size, entry.content = True, 123.5, 42, 7
    packed = _pack(entry)
    assert packed is not None
    # Flat: nothing inside that the collector would have to track.
    assert not any(isinstance(field, tuple | list | dict) for field in packed)
    gc.collect(0)
    assert not gc.is_tracked(packed)
    back = _unpack(packed)
    assert (back.done, back.expires, back.size, back.content) == (True, 123.5, 42, 7)
    assert back.replies == replies
    verifier = Verifier()
    for before, after in zip(replies, back.replies, strict=True):
        assert after.error == before.error
        assert after.signature == before.signature
        for form in ("_signed", "_batch_signed"):
            original, restored = getattr(before, form), getattr(after, form)
            assert (original is None) == (restored is None)
            if restored is not None:
                assert restored == original
                verifier.check_signature(restored.signature, alice.did, restored.signing_input())
        if before._signed is not None:
            assert alice.sign_reply(after) is after._signed  # a re-send signs nothing


def test_finished_answers_cost_the_garbage_collector_nothing_once_packed(
    alice: Identity,
) -> None:
    """20,000 signed answers leave only the newest unpacked for the collector to track."""

    async def run() -> None:
        cache = ReplyCache(size=50_000, ttl=60)
        batches = [_replies(alice, 32) for _ in range(625)]
        for batch in batches:
            alice.sign_batch(batch)  # as the session's writer does
        gc.collect()
        before = len(gc.get_objects())
        for b, batch in enumerate(batches):
            for reply in batch:
                key = ("did:key:sender", f"{b}.{reply.request_id}")
                entry = cache.begin(key)
                entry.add(reply)
                cache.finish(entry, key)
        del batches, batch, reply, entry
        gc.collect()
        gc.collect()
        tracked = len(gc.get_objects()) - before
        # The newest _PACK_AFTER answers stay objects (the answer, its list, the
        # reply, its batch form, their signature and proof); 20,000 such would be 120,000.
        assert tracked < 7 * _PACK_AFTER
        # And the packed ones are untracked by a young collection already.
        packed = cache._entries[("did:key:sender", "0.req-0")]
        assert isinstance(packed, tuple)
        assert not gc.is_tracked(packed)
        assert len(cache) == 20_000
        first = cache.get(("did:key:sender", "0.req-0"))
        assert first is not None
        assert first.done
        assert first.replies[0].data == b"data 0"
        assert first.replies[0]._batch_signed is not None

    asyncio.run(run())


def test_an_answer_whose_proof_is_not_of_hashes_stays_unpacked(alice: Identity) -> None:
    """A proof path of anything but 32-byte hashes cannot be joined and split back: kept as is."""
    (reply,) = _replies(alice, 1)
    odd = Signature(alice.did, "Ed25519", b"v" * 64, BatchProof(0, 2, (b"short",)))
    entry = Answer()
    entry.replies = [reply.with_signature(odd)]
    assert _pack(entry) is None


def test_packed_answers_expire_and_evict_like_the_others() -> None:
    """Packed entries keep their expiry, size and place: TTL and budgets still apply."""

    async def run() -> None:
        cache = ReplyCache(size=_PACK_AFTER + 10, ttl=60, max_bytes=10**9)
        cost = 0
        for i in range(_PACK_AFTER + 10):
            cost = _answer(cache, ("s", str(i)), 10).size
        assert cache.bytes == (_PACK_AFTER + 10) * cost
        assert isinstance(cache._entries[("s", "0")], tuple)  # packed
        _answer(cache, ("s", "new"), 10)  # one over the count: the oldest (packed) goes
        assert cache.get(("s", "0")) is None
        assert cache.get(("s", "1")) is not None
        assert cache.bytes == (_PACK_AFTER + 10) * cost
        cache.ttl = -1.0
        _answer(cache, ("s", "newer"), 10)
        cache.size = 1
        _answer(cache, ("s", "last"), 10)
        assert len(cache) == 1
        assert cache.bytes == cost

    asyncio.run(run())


def test_a_packed_answer_asked_for_again_keeps_the_signatures_its_resends_make(
    alice: Identity,
) -> None:
    """Unpacked on a hit, it stays an object (then is packed anew): re-sends sign once."""

    async def run() -> None:
        cache = ReplyCache(size=10_000, ttl=60)
        first = ("did:key:sender", "first")
        _answer(cache, first, 10)  # unsigned: its signed form is made on re-send
        for i in range(_PACK_AFTER):
            _answer(cache, ("did:key:sender", str(i)), 10)
        assert isinstance(cache._entries[first], tuple)
        entry = cache.get(first)
        assert entry is not None
        assert cache.get(first) is entry
        reply = dataclasses.replace(entry.replies[0], responder=alice.did)
        entry.replies[0] = reply
        signed = alice.sign_reply(reply)
        again = cache.get(first)
        assert again is not None
        assert alice.sign_reply(again.replies[0]) is signed  # no second signature
        for i in range(_PACK_AFTER):
            _answer(cache, ("did:key:sender", f"more {i}"), 10)
        assert isinstance(cache._entries[first], tuple)  # packed anew, signed form in it
        later = cache.get(first)
        assert later is not None
        assert later.replies[0]._signed == signed

    asyncio.run(run())


def test_answers_restored_from_a_store_are_packed_and_bounded_like_the_others(
    tmp_path: Path,
) -> None:
    """Restoring thousands of answers keeps the packing queue and the count bounded."""

    async def run() -> None:
        store = SqliteStore(tmp_path / "agent.db")
        before = ReplyCache(size=10_000, ttl=60, store=store)
        keys = [("did:key:sender", str(i)) for i in range(3000)]
        for key in keys:
            _answer(before, key, 10)
        after = ReplyCache(size=2000, ttl=60, store=store)  # a restart, with a smaller cache
        for key in keys:
            assert after.get(key) is not None
        assert len(after._finished) <= _PACK_AFTER
        assert len(after) <= 2000
        assert sum(isinstance(e, tuple) for e in after._entries.values()) >= 2000 - _PACK_AFTER

    asyncio.run(run())
