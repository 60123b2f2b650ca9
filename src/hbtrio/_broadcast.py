"""The slot-indexed broadcaster: slot -> the tasks waiting for it.

Theory of operation
-------------------
A waiter parks under the slot it wants: `SlotBroadcaster.enter` registers
it, and it awaits ``trio.lowlevel.wait_task_rescheduled`` at once. The
worker, after computing a slot, calls `publish` for it: every task parked
under that slot is rescheduled with the state; tasks parked under other slots
stay parked. Errors fan out the same way (`fail_from`, `fail_all`), each waiter
getting an exception object of its own.

Invariants (hold at every checkpoint):

- every waiter under ``_waiters[s]`` (one `_Waiter`, or a list of two or
  more) is parked under slot ``s`` and will read what it is handed;
- ``_count`` is the number of parked tasks.

Each wait allocates one small object, which is also its abort function:
fan-out to thousands of waiters is bounded by the garbage collector's work
as much as by trio's, so every tracked allocation per waiter counts.

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


class _Waiter:
    """One parked task: the abort function of its own wait (one allocation per wait)."""

    __slots__ = ("board", "slot", "task")

    def __init__(self, board: SlotBroadcaster, slot: int, task: trio.lowlevel.Task) -> None:
        self.board, self.slot, self.task = board, slot, task

    def __call__(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self.board._remove(self)
        return _Abort.SUCCEEDED


class SlotBroadcaster:
    """Slot -> parked waiters, for one group worker."""

    __slots__ = ("_count", "_waiters")

    def __init__(self) -> None:
        # Invariant: each value is one _Waiter or a list of two or more; every one
        # of them is parked under its slot (see enter).
        self._waiters: dict[int, _Waiter | list[_Waiter]] = {}
        self._count = 0  # Invariant: the number of parked waiters in _waiters

    def __len__(self) -> int:
        """How many tasks are waiting."""
        return self._count

    def __contains__(self, slot: int) -> bool:
        return slot in self._waiters

    def slots(self) -> list[int]:
        """The slots somebody waits for, ascending."""
        return sorted(self._waiters)

    def enter(self, slot: int) -> _Waiter:
        """Register the calling task under ``slot``; returns its abort function.

        The caller must then at once (no other await in between) park with
        ``state = await trio.lowlevel.wait_task_rescheduled(abort)``, which
        returns the published state or raises the failure. That await is the
        only checkpoint: a pending cancellation is delivered there, through
        the abort function, which leaves the table as it was. (No coroutine
        of our own around it: one object fewer per waiter.)
        """
        waiter = _Waiter(self, slot, trio.lowlevel.current_task())
        waiters = self._waiters
        present = waiters.get(slot)
        if present is None:
            waiters[slot] = waiter
        elif type(present) is list:
            present.append(waiter)
        else:
            waiters[slot] = [present, waiter]  # type: ignore[list-item]
        self._count += 1
        return waiter

    def _remove(self, waiter: _Waiter) -> None:
        slot = waiter.slot
        present = self._waiters[slot]
        if present is waiter:
            del self._waiters[slot]
        else:
            assert type(present) is list
            present.remove(waiter)
            if not present:
                del self._waiters[slot]
        self._count -= 1

    def _pop(self, slot: int) -> list[_Waiter]:
        present = self._waiters.pop(slot, None)
        if present is None:
            return []
        taken = present if type(present) is list else [present]
        self._count -= len(taken)
        return taken  # type: ignore[return-value]

    def publish(self, slot: int, state: Message) -> int:
        """Hand ``state`` to every task waiting for ``slot``; returns how many. Never blocks."""
        present = self._waiters.pop(slot, None)
        if present is None:
            return 0
        value = outcome.Value
        if type(present) is not list:  # the common case: one waiter
            self._count -= 1
            trio.lowlevel.reschedule(present.task, value(state))  # type: ignore[union-attr]
            return 1
        self._count -= len(present)
        for waiter in present:  # an outcome unwraps once: one each
            trio.lowlevel.reschedule(waiter.task, value(state))
        return len(present)

    def _fail(self, slots: list[int], make_error: Callable[[int], BaseException]) -> int:
        n = 0
        for slot in slots:
            for waiter in self._pop(slot):
                trio.lowlevel.reschedule(waiter.task, outcome.Error(make_error(slot)))
                n += 1
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
