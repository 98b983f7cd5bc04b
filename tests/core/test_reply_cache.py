"""The reply cache keeps answers within a count and a byte budget."""

from __future__ import annotations

import asyncio

from sigwire.dispatch import ReplyCache
from sigwire.envelope import Reply


def _answer(cache: ReplyCache, key: tuple[str, str], size: int) -> None:
    entry = cache.begin(key)
    entry.add(Reply(request_id=key[1], request_digest=b"", responder="r", data=b"x" * size))
    cache.finish(entry, key)


def test_answers_beyond_the_byte_budget_evict_the_oldest() -> None:
    """Finishing an answer past max_bytes drops the oldest finished answers first."""

    async def run() -> None:
        cache = ReplyCache(size=1000, ttl=60, max_bytes=1000)
        for i in range(5):
            _answer(cache, ("s", str(i)), 300)
        assert cache.bytes <= 1000
        assert cache.get(("s", "0")) is None
        assert cache.get(("s", "4")) is not None

    asyncio.run(run())


def test_answers_in_progress_are_never_evicted() -> None:
    """An answer still being computed stays, whatever the budget says."""

    async def run() -> None:
        cache = ReplyCache(size=1, ttl=60, max_bytes=10)
        running = cache.begin(("s", "busy"))
        _answer(cache, ("s", "done"), 100)
        assert cache.get(("s", "busy")) is running

    asyncio.run(run())
