"""start_eagerly runs a handler's coroutine at once and hands what remains to a task."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from sigwire.dispatch import start_eagerly

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="outer")


async def test_a_coroutine_that_never_waits_finishes_before_the_call_returns() -> None:
    """No task is made for a coroutine that returns without waiting."""
    ran: list[str] = []

    async def quick() -> None:
        ran.append("done")

    assert start_eagerly(quick()) is None
    assert ran == ["done"]


async def test_a_coroutine_that_waits_is_finished_by_the_task() -> None:
    """The part before the first wait runs at once; the task runs the rest, with the result."""
    steps: list[str] = []
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def slow() -> None:
        steps.append("before")
        steps.append(await gate)
        await asyncio.sleep(0)
        steps.append("after")

    task = start_eagerly(slow())
    assert task is not None
    assert steps == ["before"]
    gate.set_result("woken")
    await task
    assert steps == ["before", "woken", "after"]


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    """A cancellation reaches the coroutine's own await, and its cleanup runs."""
    cleaned: list[bool] = []

    async def waits_forever() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            cleaned.append(True)

    task = start_eagerly(waits_forever())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]
    assert task.cancelled()


async def test_an_error_after_the_first_wait_fails_the_task() -> None:
    """An exception raised after resuming is the task's exception."""

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    task = start_eagerly(fails_later())
    assert task is not None
    with pytest.raises(ValueError, match="late"):
        await task


async def test_a_base_exception_before_the_first_wait_stays_in_a_task() -> None:
    """A coroutine that cancels itself at once does not cancel its caller."""

    async def cancels_itself() -> None:
        raise asyncio.CancelledError

    task = start_eagerly(cancels_itself())
    assert task is not None
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_context_changes_stay_inside_the_coroutine() -> None:
    """Like a new task, the coroutine runs in a copy of the caller's context."""
    seen: list[str] = []

    async def sets_var() -> None:
        VAR.set("inner")
        await asyncio.sleep(0)
        seen.append(VAR.get())

    task = start_eagerly(sets_var())
    assert VAR.get() == "outer"
    assert task is not None
    await task
    assert seen == ["inner"]
    assert VAR.get() == "outer"
