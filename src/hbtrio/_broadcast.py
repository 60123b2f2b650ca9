"""The slot-indexed broadcaster: slot -> the tasks waiting for it.

Theory of operation
-------------------
A waiter parks in `SlotBroadcaster.wait_slot` under the slot it wants. The
worker, after computing a slot, calls `publish` for it: every task parked
under that slot is rescheduled with the state; tasks parked under other slots
stay parked. Errors fan out the same way (`fail_from`, `fail_all`), each waiter
getting an exception object of its own.

Invariants (hold at every checkpoint):

- every task in ``_waiters[s]`` is parked in ``wait_slot(s)`` and will read
  what it is handed; no list in ``_waiters`` is empty;
- ``_count`` is the number of parked tasks.

Each wait is cancellation-atomic. trio calls the abort function synchronously
when a parked task is cancelled, and the abort function removes the task, so a
cancelled waiter is never handed a result it will not read, and the table is
left exactly as if it had never waited. A task rescheduled with a result is no
longer abortable: it reads that result (a late deadline then surfaces at its
next checkpoint). Nothing here starts tasks; `publish` and the ``fail_*``
methods never block.
"""

from __future__ import annotations

from collections.abc import Callable

import outcome
import trio

from ._message import Message

__all__ = ["SlotBroadcaster"]

_Abort = trio.lowlevel.Abort


class SlotBroadcaster:
    """Slot -> parked waiters, for one group worker."""

    __slots__ = ("_count", "_waiters")

    def __init__(self) -> None:
        # Invariant: each dict is non-empty; its keys are tasks parked in wait_slot(slot).
        self._waiters: dict[int, dict[trio.lowlevel.Task, None]] = {}
        self._count = 0  # Invariant: == sum(len(d) for d in _waiters.values())

    def __len__(self) -> int:
        """How many tasks are waiting."""
        return self._count

    def __contains__(self, slot: int) -> bool:
        return slot in self._waiters

    def slots(self) -> list[int]:
        """The slots somebody waits for, ascending."""
        return sorted(self._waiters)

    async def wait_slot(self, slot: int) -> Message:
        """Park until ``slot`` is published (or failed) and return its state.

        Not a checkpoint before parking: the caller checks for cancellation.
        Cancellation-atomic: on `trio.Cancelled` the table is as it was.
        """
        task = trio.lowlevel.current_task()
        waiting = self._waiters.get(slot)
        if waiting is None:
            waiting = self._waiters[slot] = {}
        waiting[task] = None
        self._count += 1

        def abort(_: object) -> trio.lowlevel.Abort:
            tasks = self._waiters[slot]
            del tasks[task]
            if not tasks:
                del self._waiters[slot]
            self._count -= 1
            return _Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def publish(self, slot: int, state: Message) -> int:
        """Hand ``state`` to every task waiting for ``slot``; returns how many. Never blocks."""
        tasks = self._waiters.pop(slot, None)
        if tasks is None:
            return 0
        self._count -= len(tasks)
        reschedule, value = trio.lowlevel.reschedule, outcome.Value
        for task in tasks:  # an outcome unwraps once: one each
            reschedule(task, value(state))
        return len(tasks)

    def _fail(self, slots: list[int], make_error: Callable[[int], BaseException]) -> int:
        n = 0
        reschedule = trio.lowlevel.reschedule
        for slot in slots:
            tasks = self._waiters.pop(slot)
            self._count -= len(tasks)
            n += len(tasks)
            for task in tasks:
                reschedule(task, outcome.Error(make_error(slot)))
        return n

    def fail_from(self, first: int, make_error: Callable[[int], BaseException]) -> int:
        """Raise ``make_error(slot)`` in every waiter for a slot ``>= first``."""
        return self._fail([s for s in self._waiters if s >= first], make_error)

    def fail_below(self, limit: int, make_error: Callable[[int], BaseException]) -> int:
        """Raise ``make_error(slot)`` in every waiter for a slot ``< limit``."""
        return self._fail([s for s in self._waiters if s < limit], make_error)

    def fail_all(self, make_error: Callable[[int], BaseException]) -> int:
        """Raise ``make_error(slot)`` in every waiter."""
        return self._fail(list(self._waiters), make_error)
