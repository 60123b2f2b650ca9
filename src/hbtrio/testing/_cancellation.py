"""Cancelling a call at each of its checkpoints in turn.

`cancel_at_checkpoint` runs a call in the calling task and cancels it right
after its k-th step (a Trio instrument counts the task's steps: each ends
at a checkpoint); `run_with_cancel_at_each_checkpoint` walks k = 0, 1, 2,
... until the call completes untouched, checking the system after every
attempt. This is how hbtrio's own calls are shown cancellation-safe
(``docs/design.md``).

Both run in the calling task, on its Trio loop; the instrument is removed
when the call ends, however it ends.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

__all__ = ["cancel_at_checkpoint", "run_with_cancel_at_each_checkpoint"]

T = TypeVar("T")


class _StepCanceller(trio.abc.Instrument):
    def __init__(self, task: trio.lowlevel.Task, steps: int, scope: trio.CancelScope) -> None:
        self.task, self.left, self.scope = task, steps, scope

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.left -= 1
            if self.left == 0:
                self.scope.cancel()


async def cancel_at_checkpoint(k: int, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run ``call()`` in this task and cancel it right after its k-th step.

    A task's step ends each time it yields to Trio, so this cancels the call
    at its k-th checkpoint (``k=0``: before it starts). Returns
    ``(True, result)`` if the call completed and ``(False, None)`` if the
    cancellation stopped it. Exceptions other than the cancellation propagate.
    """
    if type(k) is not int or k < 0:
        raise ValueError(f"k must be an int >= 0, not {k!r}")
    scope = trio.CancelScope()
    if k == 0:
        scope.cancel()
    instrument = _StepCanceller(trio.lowlevel.current_task(), k, scope)
    trio.lowlevel.add_instrument(instrument)
    try:
        with scope:
            return True, await call()
        return False, None
    finally:
        trio.lowlevel.remove_instrument(instrument)


async def run_with_cancel_at_each_checkpoint(
    make_call: Callable[[], Awaitable[Callable[[], Awaitable[T]]]],
    check: Callable[[bool, T | None], Awaitable[None]],
    *,
    limit: int = 200,
    attempt_timeout: float | None = None,
) -> int:
    """Cancel a call at each of its checkpoints in turn, checking the system after each.

    For k = 0, 1, 2, ...: ``call = await make_call()`` (set up a fresh
    attempt), run it cancelled at its k-th checkpoint (`cancel_at_checkpoint`),
    then ``await check(completed, result)``. Stops at the first k > 0 at which
    the call completes untouched and returns that k (the number of
    checkpoints the call passed). Raises `AssertionError` if it never
    completes within ``limit`` attempts, or if an attempt takes longer than
    ``attempt_timeout`` seconds (Trio's clock): a call that blocks for ever
    before its k-th checkpoint can only be caught that way.
    """
    for k in range(limit):
        call = await make_call()
        try:
            with trio.fail_after(math.inf if attempt_timeout is None else attempt_timeout):
                completed, result = await cancel_at_checkpoint(k, call)
        except trio.TooSlowError:
            raise AssertionError(
                f"attempt {k} (cancelled at checkpoint {k}) did not finish "
                f"within {attempt_timeout} s"
            ) from None
        await check(completed, result)
        if completed and k > 0:
            return k
    raise AssertionError(f"the call never completed in {limit} attempts")
