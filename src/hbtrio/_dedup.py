"""Deduplicated generic resolution: identical concurrent calls execute once.

Theory of operation
-------------------
An `Execution` is keyed by the full message IDs of the base and the request.
The first caller creates it and starts its task in the engine's root nursery:
the execution belongs to the engine, not to that caller. Every caller, the
first included, then parks in `Execution.wait`. When the device call ends,
every parked caller is rescheduled with the outcome (each with an exception
object of its own on failure) and the execution leaves the engine's table.

Invariants: ``waiters`` holds exactly the tasks parked in ``wait``; an
execution is in the engine's table while it runs and has waiters.

Cancellation: a cancelled caller removes only itself. When the last one
leaves, the execution is cancelled and leaves the table at once, so a later
identical call starts afresh instead of joining a dying execution.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import outcome
import trio

from ._devices import call_maybe_async, is_device_failure
from ._exceptions import ComputeError
from ._message import freeze

__all__ = ["Execution", "ExecutionInfo"]


@attrs.frozen
class ExecutionInfo:
    """What `Engine.executions` tells about one resolution in flight."""

    group: str
    device: str
    path: str
    waiting: int
    started_at: float


class ExecutionHost(Protocol):
    """What an execution needs of its engine."""

    def execution_done(self, execution: Execution, *, ran: bool) -> None:
        """Take ``execution`` out of the engine's table; count it if it ran to an outcome."""


@attrs.define(eq=False)
class Execution:
    key: tuple[bytes, bytes]
    group: str
    host: ExecutionHost
    device: str
    path: str
    # Invariant: exactly the tasks parked in wait(); insertion-ordered.
    waiters: dict[trio.lowlevel.Task, None] = attrs.field(factory=dict)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Its key in the engine's table of flat messages, if it has one.
    fast_key: object = None
    started_at: float = attrs.field(factory=time.time)  # wall clock

    def info(self) -> ExecutionInfo:
        return ExecutionInfo(self.group, self.device, self.path, len(self.waiters), self.started_at)

    def _leave_table(self, *, ran: bool = False) -> None:
        self.host.execution_done(self, ran=ran)

    async def run(self, fn: Callable[..., Any], is_async: bool, *args: Any) -> None:
        """The execution's task: call the device once and fan the outcome out."""
        result: outcome.Outcome[Any] | None = None
        with self.scope:
            try:
                value = await call_maybe_async(fn, is_async, *args)
                result = outcome.Value(_freeze_result(value))
            except BaseException as exc:  # whatever the device raised, but our cancellation
                if not is_device_failure(exc):
                    raise
                error = exc
                result = outcome.Error(error)
        self._leave_table(ran=result is not None)
        if result is None:  # cancelled: nobody waits any more (or the engine is closing)
            return
        reschedule = trio.lowlevel.reschedule
        waiters, self.waiters = self.waiters, {}
        for task in waiters:  # an outcome unwraps once: one each
            if isinstance(result, outcome.Value):
                reschedule(task, outcome.Value(result.value))
            else:
                assert isinstance(result, outcome.Error)
                reschedule(task, outcome.Error(self._error(result.error)))

    def _error(self, exc: BaseException) -> BaseException:
        fresh = ComputeError(
            f"{self.device} {self.path} failed: {exc!r}", phase="compute", attempted_slot=None
        )
        fresh.__cause__ = exc
        return fresh

    async def wait(self) -> Any:
        """Park until the execution ends; return its result. Cancellation-atomic."""
        return await trio.lowlevel.wait_task_rescheduled(self.join())

    def join(self) -> Callable[[object], trio.lowlevel.Abort]:
        """Count the calling task in; the abort function it must park with, at once.

        ``await trio.lowlevel.wait_task_rescheduled(execution.join())`` is
        `wait` without its frame (the engine's join path). Never blocks.
        """
        task = trio.lowlevel.current_task()
        self.waiters[task] = None
        return functools.partial(self._abort, task)  # one object: lighter than a closure

    def _abort(self, task: trio.lowlevel.Task, _raise_cancel: object) -> trio.lowlevel.Abort:
        del self.waiters[task]
        if not self.waiters:
            self._leave_table()
            self.scope.cancel()
        return trio.lowlevel.Abort.SUCCEEDED


def _freeze_result(value: object) -> object:
    """A device method's result, read-only: a message, or any message value."""
    if isinstance(value, Mapping):
        return freeze(value, what="result")
    return freeze({"result": value}, what="device")["result"]
