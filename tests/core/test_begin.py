"""Dispatcher.begin: every check, then the handler started at once; answers published whole."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

import sigwire
from sigwire.dispatch import Answer, Dispatcher, Handlers, Limits
from sigwire.envelope import Envelope, Reply
from sigwire.errors import StaleMessageError
from sigwire.store import SqliteStore

SERVER = sigwire.Identity.from_seed(b"s" * 32)
CLIENT = sigwire.Identity.from_seed(b"c" * 32)


def _request(payload: bytes = b"hi") -> Envelope:
    return CLIENT.sign_envelope(Envelope.new("work", payload, sender=CLIENT.did))


def _dispatcher(handlers: Handlers, store: SqliteStore | None = None) -> Dispatcher:
    return Dispatcher(SERVER, handlers, limits=Limits(rate=None), store=store)


def _gated(gate: asyncio.Event, result: bytes, runs: list[bytes] | None = None) -> Handlers:
    """Handlers whose ``work`` waits for ``gate``, then answers ``result``."""
    handlers = Handlers()

    @handlers.on("work")
    async def work(msg: sigwire.Message) -> bytes:
        if runs is not None:
            runs.append(msg.payload)
        await gate.wait()
        return result

    return handlers


async def test_a_handler_that_never_waits_has_answered_when_begin_returns() -> None:
    """No task is left running, and the answer is complete and final."""
    handlers = Handlers()

    @handlers.on("work")
    async def work(msg: sigwire.Message) -> bytes:
        return b"done " + msg.payload

    dispatcher = _dispatcher(handlers)
    answer = dispatcher.begin(_request())
    assert isinstance(answer, Answer)
    assert answer.done
    assert [r.data for r in answer.replies] == [b"done hi"]
    assert dispatcher.running() == ()
    assert dispatcher.handled == 1


async def test_a_handler_that_waits_runs_on_in_its_own_task() -> None:
    """It is counted as running until it answers, and its answer then completes."""
    gate = asyncio.Event()
    dispatcher = _dispatcher(_gated(gate, b"late"))
    answer = dispatcher.begin(_request())
    assert isinstance(answer, Answer)
    assert not answer.done
    (task,) = dispatcher.running()
    gate.set()
    await task
    assert answer.done
    assert [r.data for r in answer.replies] == [b"late"]


async def test_watchers_see_the_final_reply_only_once_it_is_stored(tmp_path: Path) -> None:
    """Whoever sends the final reply on sends an answer that survives a restart."""
    gate = asyncio.Event()
    store = SqliteStore(tmp_path / "agent.db")
    dispatcher = _dispatcher(_gated(gate, b"stored"), store)
    request = _request()
    answer = dispatcher.begin(request)
    assert isinstance(answer, Answer)
    seen: list[tuple[list[Reply], bool]] = []

    def watcher() -> None:
        stored = store.get_answer(request.sender, request.id)
        seen.append((list(answer.replies), stored is not None))

    answer.watch(watcher)
    gate.set()
    (task,) = dispatcher.running()
    await task
    assert seen, "the watcher was never called"
    for replies, stored in seen:
        if replies and replies[-1].final:
            assert stored, "the final reply was visible before the answer was stored"
    store.close()


async def test_a_duplicate_follows_the_running_answer_without_running_the_handler() -> None:
    """The same envelope again, while its handler waits, gets the same entry."""
    gate = asyncio.Event()
    runs: list[bytes] = []
    dispatcher = _dispatcher(_gated(gate, b"once", runs))
    request = _request()
    first = dispatcher.begin(request)
    again = dispatcher.begin(request)
    assert again is first
    gate.set()
    (task,) = dispatcher.running()
    await task
    assert runs == [b"hi"]


async def test_an_answer_the_store_cannot_keep_still_completes(tmp_path: Path) -> None:
    """A failing store is logged; the answer is published and its waiters released anyway."""
    handlers = Handlers()

    @handlers.on("work")
    async def work(msg: sigwire.Message) -> bytes:
        await asyncio.sleep(0)
        return b"kept in memory"

    store = SqliteStore(tmp_path / "agent.db")

    def broken(*args: object) -> None:
        raise OSError("disk full")

    store.put_answer = broken  # type: ignore[method-assign]
    dispatcher = _dispatcher(handlers, store)
    answer = dispatcher.begin(_request())
    assert isinstance(answer, Answer)
    (task,) = dispatcher.running()
    await task
    assert answer.done
    assert [r.data for r in answer.replies] == [b"kept in memory"]
    store.close()


def test_long_field_runs_are_encoded_but_not_kept() -> None:
    """Signing inputs of huge (not yet validated) fields leave nothing behind in the cache."""
    from sigwire.envelope import _cached_run

    before = _cached_run.cache_info().currsize
    for i in range(50):
        reply = Reply(
            request_id="r", request_digest=b"", responder="x", content_type=f"{i}" + "y" * 100_000
        )
        assert len(reply.signing_input()) > 100_000
    assert _cached_run.cache_info().currsize <= before + 2


def _counting() -> tuple[Handlers, list[bytes]]:
    handlers, runs = Handlers(), []

    @handlers.on("work")
    async def work(msg: sigwire.Message) -> bytes:
        runs.append(msg.payload)
        return b"done " + msg.payload

    return handlers, runs


async def test_a_resend_below_the_floor_of_an_answered_request_gets_its_answer() -> None:
    """Its nonce let go by a full guard, an answered request's re-send is a duplicate."""
    handlers, runs = _counting()
    dispatcher = _dispatcher(handlers)
    request = _request()
    first = dispatcher.begin(request)
    assert isinstance(first, Answer)
    dispatcher.guard._seen.clear()  # as if forgotten to make room...
    dispatcher.guard.floor_ms = request.created_at_ms  # ...which raised the floor to it
    again = dispatcher.begin(request)
    assert isinstance(again, Answer)
    assert [r.data for r in again.replies] == [b"done hi"]
    assert runs == [b"hi"]


async def test_below_the_floor_an_answer_restored_from_a_store_serves_only_what_was_asked(
    tmp_path: Path,
) -> None:
    """Restored from a store, an answer below the floor serves its own request, never another."""
    handlers, runs = _counting()
    store = SqliteStore(tmp_path / "agent.db")
    request = _request(b"pay 10")
    answered = _dispatcher(handlers, store).begin(request)
    assert isinstance(answered, Answer)
    restarted = _dispatcher(handlers, store)
    restarted.guard.floor_ms = request.created_at_ms
    other = CLIENT.sign_envelope(dataclasses.replace(request, payload=b"pay 99999", signature=None))
    with pytest.raises(StaleMessageError) as info:
        restarted.begin(other)
    assert info.value.floor_ms == request.created_at_ms
    again = restarted.begin(request)
    assert isinstance(again, Answer)
    assert [r.data for r in again.replies] == [b"done pay 10"]
    assert runs == [b"pay 10"]
    store.close()
