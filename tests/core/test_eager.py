"""start_eagerly: a task whose first step runs at once, as that task, in its own context."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from sigwire._eager import start_eagerly

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="outer")


async def test_a_coroutine_that_never_waits_finishes_before_the_call_returns() -> None:
    """Its whole body has run when start_eagerly returns; its task then ends cleanly."""
    ran: list[str] = []

    async def quick() -> None:
        ran.append("done")

    task = start_eagerly(quick())
    assert ran == ["done"]
    await task
    assert not task.cancelled()
    assert task.exception() is None


async def test_a_coroutine_that_waits_is_finished_by_its_task() -> None:
    """The part before the first wait runs at once; the task runs the rest, with the result."""
    steps: list[str] = []
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def slow() -> None:
        steps.append("before")
        steps.append(await gate)
        await asyncio.sleep(0)
        steps.append("after")

    task = start_eagerly(slow())
    assert steps == ["before"]
    gate.set_result("woken")
    await task
    assert steps == ["before", "woken", "after"]


async def test_the_first_step_runs_as_the_new_task_not_the_caller() -> None:
    """current_task() is the new task from the first line on, and the caller's again after."""
    caller = asyncio.current_task()
    seen: list[asyncio.Task[object] | None] = []

    async def who() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)
        seen.append(asyncio.current_task())

    task = start_eagerly(who())
    assert asyncio.current_task() is caller
    await task
    assert seen == [task, task]


async def test_a_timeout_in_the_coroutine_cancels_only_the_coroutine() -> None:
    """asyncio.timeout entered in the first step times out the new task, never the caller."""
    outcome: list[str] = []

    async def times_out() -> None:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.get_running_loop().create_future()
        except TimeoutError:
            outcome.append("timed out")

    task = start_eagerly(times_out())
    await task
    assert outcome == ["timed out"]
    await asyncio.sleep(0.02)  # the caller was not cancelled meanwhile


async def test_a_task_group_in_the_coroutine_belongs_to_the_new_task() -> None:
    """A failing child cancels the coroutine's own task, not the caller."""

    async def fails() -> None:
        raise ValueError("child")

    async def groups() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(fails())
            await asyncio.get_running_loop().create_future()

    task = start_eagerly(groups())
    with pytest.raises(ExceptionGroup):
        await task
    await asyncio.sleep(0)  # the caller was not cancelled


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    """A cancellation reaches the coroutine's own await, and its cleanup runs."""
    cleaned: list[bool] = []

    async def waits_forever() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            cleaned.append(True)

    task = start_eagerly(waits_forever())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]
    assert task.cancelled()


async def test_a_cancellation_before_the_tasks_first_step_still_reaches_the_coroutine() -> None:
    """Cancelled at once, before the loop ever ran the task: the coroutine's cleanup runs."""
    cleanup: list[str] = []

    async def waits_forever() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            cleanup.append("cancelled")
            raise
        finally:
            cleanup.append("finally")

    task = start_eagerly(waits_forever())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleanup == ["cancelled", "finally"]


async def test_an_error_after_the_first_wait_fails_the_task() -> None:
    """An exception raised after resuming is the task's exception."""

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    task = start_eagerly(fails_later())
    with pytest.raises(ValueError, match="late"):
        await task


async def test_an_error_in_the_first_step_fails_the_task_not_the_caller() -> None:
    """An exception (a self-cancellation too) before the first wait is the task's."""

    async def fails_now() -> None:
        raise ValueError("now")

    async def cancels_itself() -> None:
        raise asyncio.CancelledError

    failing = start_eagerly(fails_now())
    cancelled = start_eagerly(cancels_itself())
    with pytest.raises(ValueError, match="now"):
        await failing
    with pytest.raises(asyncio.CancelledError):
        await cancelled


async def test_context_changes_stay_inside_the_coroutine() -> None:
    """Like a new task, the coroutine runs in a copy of the caller's context."""
    seen: list[str] = []

    async def sets_var() -> None:
        VAR.set("inner")
        await asyncio.sleep(0)
        seen.append(VAR.get())

    task = start_eagerly(sets_var())
    assert VAR.get() == "outer"
    await task
    assert seen == ["inner"]
    assert VAR.get() == "outer"


async def test_a_given_context_is_the_one_it_runs_in() -> None:
    """With a context given, the coroutine sees that context's values, not the caller's."""
    base = contextvars.copy_context()
    VAR.set("caller's")
    seen: list[str] = []

    async def reads() -> None:
        seen.append(VAR.get())

    await start_eagerly(reads(), base.copy())
    assert seen == ["outer"]
