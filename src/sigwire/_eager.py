"""Tasks whose first step runs at once, as Python 3.12's eager tasks do.

Answering one request at a time is a chain of steps that would each cost a
trip around the event loop if every one started in a new task: the handler,
then the write of its reply. :func:`start_eagerly` makes the task as usual,
then runs the coroutine's first step right away, *as that task*:
:func:`asyncio.current_task` is the new task throughout, so
``asyncio.timeout``, ``TaskGroup`` and cancellation act on it, never on the
caller; and the coroutine runs in its own copy of the context. Whatever
remains after the first wait runs in the task, as usual; a coroutine that never
waits has finished when the call returns (its task then ends at its first step).

The current task is switched with ``asyncio.tasks._enter_task`` and
``_leave_task``, which the standard library's own eager tasks use. Where they
are missing, the task simply starts on the next loop iteration.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
from collections.abc import Coroutine
from typing import Any, Final

__all__ = ["start_eagerly"]

_enter_task: Final = getattr(asyncio.tasks, "_enter_task", None)
_leave_task: Final = getattr(asyncio.tasks, "_leave_task", None)

_RUNNING: Final = 0
_DONE: Final = 1
_FAILED: Final = 2


def start_eagerly(
    coro: Coroutine[Any, Any, None], context: contextvars.Context | None = None
) -> asyncio.Task[None]:
    """Run ``coro`` in a new task, whose first step runs before this returns.

    Args:
        coro: The coroutine.
        context: The context it runs in; default, a copy of the current one.

    Returns:
        The task; already past its first step, and done in effect if ``coro``
        finished without waiting (the task itself completes on the next
        loop iteration).
    """
    loop = asyncio.get_running_loop()
    if context is None:
        context = contextvars.copy_context()
    if _enter_task is None or _leave_task is None:
        return loop.create_task(coro, context=context)
    first = _FirstStepDone(coro)
    task = loop.create_task(first, context=context)
    caller = asyncio.current_task(loop)
    if caller is not None:
        _leave_task(loop, caller)
    _enter_task(loop, task)
    try:
        context.run(first.step)
    finally:
        _leave_task(loop, task)
        if caller is not None:
            _enter_task(loop, caller)
    if first.state == _FAILED and isinstance(first.error, KeyboardInterrupt | SystemExit):
        first.state = _DONE
        raise first.error
    return task


class _FirstStepDone(collections.abc.Coroutine[Any, Any, None]):
    """What a task drives when the coroutine's first step already ran.

    Its first ``send`` hands the task what the coroutine waits on (or ends
    the task the way the coroutine ended); then every ``send`` and ``throw``
    goes straight to the coroutine, a cancellation that comes before the
    task's first step included.
    """

    __slots__ = ("coro", "error", "first", "result", "state", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self.coro = coro
        self.state = _RUNNING
        self.first = True
        self.waiting: Any = None
        self.result: Any = None
        self.error: BaseException | None = None

    def step(self) -> None:
        try:
            self.waiting = self.coro.send(None)
        except StopIteration as stop:
            self.state, self.result = _DONE, stop.value
        except BaseException as exc:
            self.state, self.error = _FAILED, exc

    def send(self, value: Any) -> Any:
        if self.first:
            self.first = False
            if self.state == _DONE:
                raise StopIteration(self.result)
            if self.state == _FAILED:
                assert self.error is not None
                raise self.error
            return self.waiting
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if val is None and tb is None else typ(val).with_traceback(tb)
        if self.first:
            self.first = False
            if self.state != _RUNNING:
                raise exc  # the coroutine already ended; the task ends with this
        return self.coro.throw(exc)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Any:
        raise TypeError("driven by its task only")
