"""The store interface and the in-memory store.

A store keeps, per process: the definition, the assignments (slot 0 is the
definition itself), the result of every computed slot, and snapshots (full,
restorable states) at some slots. It answers "latest snapshot at or below slot
N" without listing slots.

Theory of operation
-------------------
The engine's hot paths call the synchronous ``*_nowait`` methods. They answer
from memory and raise `trio.WouldBlock` when the answer needs I/O; the engine
then awaits the async twin. Results are written behind (`put_results_nowait`
returns at once and the store makes them durable in batches); `wait_writable`
applies backpressure when too much is pending (`backlogged` says so without
awaiting), and `flush` waits until all of it is durable. Assignments are
different: `append_assignments` returns only once they are durable. A
result is readable (from memory) as soon as `put_results_nowait` returns, so
"stored" means "readable" for the engine.

Store methods are not checkpoints unless they say so: the async ones only
yield when they actually wait for I/O. All of them are cancellation-safe in
trio's sense: a write that raised `trio.Cancelled` did not happen.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Sequence

import attrs
import trio

from ._exceptions import StoreError
from ._message import Message

__all__ = ["MemoryStore", "SlotResult", "Store", "StoreStatistics"]


#: One computed slot on its way to the store: ``(slot, state, snapshot)``.
#: ``snapshot`` is ``None`` when the slot is not a snapshot point, the ``state``
#: object itself when the state is its own restorable form, and a separate
#: message when the device converts states for storage. A plain tuple: one is
#: made per computed slot.
SlotResult = tuple[int, Message, Message | None]


@attrs.frozen
class StoreStatistics:
    """Counters of a store since it was created."""

    commits: int = 0
    pending_results: int = 0
    results_written: int = 0
    assignments_written: int = 0
    reads: int = 0


class Store(abc.ABC):
    """What the engine needs from a store. Subclass it to add a backend."""

    #: True while more results wait to be written than the store accepts
    #: (`wait_writable` would block). Read on the request path before a request
    #: computes a slot itself: while it is true, the request waits in
    #: `wait_writable` first. A store with write-behind keeps it up to date.
    backlogged: bool = False

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (threads, files). Called by the engine on entry; idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Make everything durable and release resources. The store may be opened again."""

    # processes -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def put_process(self, pid: str, definition: Message, assignment: Message) -> bool:
        """Store a definition and its slot-0 assignment, durably and atomically.

        Returns ``False`` (changing nothing) when ``pid`` is already stored.
        """

    @abc.abstractmethod
    async def get_process(self, pid: str) -> Message | None:
        """The definition of ``pid``, or ``None``."""

    def get_process_nowait(self, pid: str) -> Message | None:
        """`get_process` from memory: raises `trio.WouldBlock` if it needs I/O."""
        raise trio.WouldBlock

    # assignments ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def append_assignments(self, pid: str, assignments: Sequence[Message]) -> None:
        """Durably append assignments whose slots continue the process's schedule.

        Either all of them are durable when this returns, or none is and it
        raises `StoreError` (also when the first slot is not ``latest + 1``).
        """

    @abc.abstractmethod
    async def latest_slot(self, pid: str) -> int:
        """The highest assigned slot of ``pid`` (``-1`` if it has none)."""

    @abc.abstractmethod
    async def get_assignments(self, pid: str, start: int, stop: int) -> list[Message]:
        """The assignments for slots ``start`` up to ``stop`` (exclusive) that exist, in order."""

    @abc.abstractmethod
    def get_assignments_nowait(self, pid: str, start: int, stop: int) -> list[Message]:
        """Like `get_assignments`, from memory: raises `trio.WouldBlock` if it needs I/O.

        May return a shorter list than `get_assignments` (a non-empty prefix of
        it: what memory holds). An empty list means ``start`` is not scheduled.
        """

    def get_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        """One assignment from memory (``None`` if not scheduled).

        Raises `trio.WouldBlock` if it needs I/O. The request path's
        single-slot twin of `get_assignments_nowait`.
        """
        found = self.get_assignments_nowait(pid, slot, slot + 1)
        return found[0] if found else None

    def pending_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        """The assignment at ``slot`` if it is scheduled and has no stored result, else ``None``.

        Raises `trio.WouldBlock` if it needs I/O. The request path's one store
        read before an idle worker applies ``slot`` itself.
        """
        if self.get_result_nowait(pid, slot) is not None:
            return None
        return self.get_assignment_nowait(pid, slot)

    # results and snapshots -------------------------------------------------------------------

    @abc.abstractmethod
    def put_results_nowait(self, pid: str, results: Sequence[SlotResult]) -> None:
        """Store computed slots, written behind. Readable at once; never blocks."""

    def put_state_nowait(self, pid: str, slot: int, state: Message, snapshot: bool) -> None:
        """Store one slot's state, which is its own snapshot if ``snapshot``. Never blocks.

        The request path's single-slot twin of `put_results_nowait`.
        """
        self.put_results_nowait(pid, [(slot, state, state if snapshot else None)])

    def put_states_nowait(
        self, pid: str, first: int, states: Sequence[Message], snapshot_every: int
    ) -> None:
        """Store consecutive slots ``first, first + 1, ...`` that are their own snapshots.

        Every slot divisible by ``snapshot_every`` is a snapshot point. The
        same as `put_results_nowait` (which this default calls); a store can do
        it without a tuple per slot.
        """
        self.put_results_nowait(
            pid,
            [
                (slot, state, state if slot % snapshot_every == 0 else None)
                for slot, state in enumerate(states, first)
            ],
        )

    async def wait_writable(self) -> None:  # noqa: B027 - optional hook
        """Block while too many results wait to be written (backpressure).

        Producers call it *before* they compute (workers before each chunk,
        requests before computing inline when `backlogged`), so the results
        waiting exceed the store's bound by at most one chunk.
        """

    @abc.abstractmethod
    def get_result_nowait(self, pid: str, slot: int) -> Message | None:
        """The stored state at ``slot`` (``None`` if absent); `trio.WouldBlock` if it needs I/O."""

    @abc.abstractmethod
    async def get_result(self, pid: str, slot: int) -> Message | None:
        """The stored state at ``slot``, or ``None``."""

    @abc.abstractmethod
    async def put_snapshot(self, pid: str, slot: int, snapshot: Message) -> None:
        """Store a restorable snapshot at ``slot`` (written behind, like results)."""

    @abc.abstractmethod
    async def latest_snapshot(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        """The snapshot with the highest slot ``<= at_most``, as ``(slot, snapshot)``."""

    def latest_snapshot_nowait(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        """`latest_snapshot` from memory: raises `trio.WouldBlock` if it needs I/O."""
        raise trio.WouldBlock

    async def snapshot_and_assignments(
        self, pid: str, at_most: int, stop: int, limit: int
    ) -> tuple[tuple[int, Message] | None, list[Message]]:
        """`latest_snapshot`, with the assignments after it read ahead: what a restore needs.

        Returns ``(latest_snapshot(pid, at_most), ahead)``. ``ahead`` holds the
        assignments for slots ``first, first + 1, ...`` below ``stop``, at most
        ``limit`` of them, where ``first`` follows the snapshot (``1`` without
        one: slot 0 is the device's ``init``). It is a read-ahead, not an
        answer: any prefix of those assignments may come back, down to none,
        and a failure to read them is not reported here. The caller reads what
        is missing with `get_assignments`, and meets any failure there.

        Blocks and is cancellation-safe like `latest_snapshot`. A store that
        does I/O answers both in one round trip; this default reads no
        assignments ahead, which suits a store that answers
        `get_assignments_nowait` from memory.
        """
        return await self.latest_snapshot(pid, at_most), []

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Return once everything stored so far is durable."""

    def pin(self, pid: str) -> None:  # noqa: B027 - optional hook
        """Keep what the store holds in memory about ``pid`` until `unpin`. Never blocks.

        The engine pins a process for as long as it has a live worker (whose
        synchronous reads and writes need it there). Pins count: two pins need
        two unpins. A store that keeps everything in memory ignores them.
        """

    def unpin(self, pid: str) -> None:  # noqa: B027 - optional hook
        """Undo one `pin`; what the store holds about ``pid`` may then be evicted."""

    def statistics(self) -> StoreStatistics:
        """Counters for introspection and benchmarks."""
        return StoreStatistics()


@attrs.define(eq=False)
class _Proc:
    definition: Message
    # assignments[i] is slot i: the list never has holes.
    assignments: list[Message]
    # results[s] is slot s's state, or None where none is stored (a list: slots are dense).
    results: list[Message | None] = attrs.field(factory=list)
    # Sorted ascending: the slots that have a snapshot.
    snapshot_slots: list[int] = attrs.field(factory=list)
    # Snapshots that are not the slot's result object; a snapshot slot missing
    # here has its result as its snapshot.
    snapshots: dict[int, Message] = attrs.field(factory=dict)


class MemoryStore(Store):
    """A store in process memory: fast, and gone with the process.

    Every method answers at once; none blocks or checkpoints. A `MemoryStore`
    outlives the engines that use it, so a new engine on the same object
    continues where the last one stopped. Memory is all it has, so nothing is
    ever evicted: every process, assignment, result and snapshot stays until
    the store is dropped, and its memory grows with the data (`pin` and
    `unpin` do nothing). Use `SQLiteStore` for bounded memory.
    """

    def __init__(self) -> None:
        self._procs: dict[str, _Proc] = {}
        self._results_written = 0
        self._assignments_written = 0

    def __repr__(self) -> str:
        return f"<MemoryStore processes={len(self._procs)}>"

    def _proc(self, pid: str) -> _Proc:
        try:
            return self._procs[pid]
        except KeyError:
            raise StoreError(f"process {pid} is not in the store") from None

    async def put_process(self, pid: str, definition: Message, assignment: Message) -> bool:
        if pid in self._procs:
            return False
        self._procs[pid] = _Proc(definition, [assignment])
        self._assignments_written += 1
        return True

    async def get_process(self, pid: str) -> Message | None:
        return self.get_process_nowait(pid)

    def get_process_nowait(self, pid: str) -> Message | None:
        proc = self._procs.get(pid)
        return None if proc is None else proc.definition

    async def append_assignments(self, pid: str, assignments: Sequence[Message]) -> None:
        proc = self._proc(pid)
        expected = len(proc.assignments)
        for offset, assignment in enumerate(assignments):
            if assignment["slot"] != expected + offset:
                raise StoreError(
                    f"assignment for slot {assignment['slot']} does not follow slot {expected - 1}"
                )
        proc.assignments.extend(assignments)
        self._assignments_written += len(assignments)

    async def latest_slot(self, pid: str) -> int:
        proc = self._procs.get(pid)
        return -1 if proc is None else len(proc.assignments) - 1

    async def get_assignments(self, pid: str, start: int, stop: int) -> list[Message]:
        proc = self._procs.get(pid)
        return [] if proc is None else proc.assignments[max(start, 0) : max(stop, 0)]

    def get_assignments_nowait(self, pid: str, start: int, stop: int) -> list[Message]:
        proc = self._procs.get(pid)
        return [] if proc is None else proc.assignments[max(start, 0) : max(stop, 0)]

    def put_results_nowait(self, pid: str, results: Sequence[SlotResult]) -> None:
        proc = self._proc(pid)
        stored, slots, custom = proc.results, proc.snapshot_slots, proc.snapshots
        for slot, state, snapshot in results:
            size = len(stored)
            if slot == size:
                stored.append(state)
            elif slot < size:
                stored[slot] = state
            else:
                stored.extend([None] * (slot - size))
                stored.append(state)
            if snapshot is not None:
                if slots and slots[-1] >= slot:
                    self._add_snapshot(proc, slot, snapshot)
                else:
                    slots.append(slot)
                    if snapshot is not state:
                        custom[slot] = snapshot
        self._results_written += len(results)

    def get_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        proc = self._procs.get(pid)
        if proc is None or not 0 <= slot < len(proc.assignments):
            return None
        return proc.assignments[slot]

    def pending_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        proc = self._procs.get(pid)
        if proc is None:
            return None
        results = proc.results
        if slot < len(results) and results[slot] is not None:
            return None
        assignments = proc.assignments
        return assignments[slot] if 0 <= slot < len(assignments) else None

    def put_state_nowait(self, pid: str, slot: int, state: Message, snapshot: bool) -> None:
        proc = self._procs.get(pid) or self._proc(pid)
        stored, slots = proc.results, proc.snapshot_slots
        if slot != len(stored) or (snapshot and slots and slots[-1] >= slot):
            super().put_state_nowait(pid, slot, state, snapshot)
            return
        if snapshot:
            slots.append(slot)
        stored.append(state)  # the common case: the next slot
        self._results_written += 1

    def put_states_nowait(
        self, pid: str, first: int, states: Sequence[Message], snapshot_every: int
    ) -> None:
        proc = self._proc(pid)
        stored = proc.results
        if first != len(stored):
            super().put_states_nowait(pid, first, states, snapshot_every)
            return
        stored.extend(states)  # the common case: the next slots, in order
        last = first + len(states) - 1
        start = first + (-first) % snapshot_every
        slots = proc.snapshot_slots
        if start <= last:
            if not slots or slots[-1] < start:
                slots.extend(range(start, last + 1, snapshot_every))
            else:
                for slot in range(start, last + 1, snapshot_every):
                    self._add_snapshot(proc, slot, stored[slot])  # type: ignore[arg-type]
        self._results_written += len(states)

    def get_result_nowait(self, pid: str, slot: int) -> Message | None:
        proc = self._procs.get(pid)
        if proc is None or not 0 <= slot < len(proc.results):
            return None
        return proc.results[slot]

    async def get_result(self, pid: str, slot: int) -> Message | None:
        return self.get_result_nowait(pid, slot)

    async def put_snapshot(self, pid: str, slot: int, snapshot: Message) -> None:
        self._add_snapshot(self._proc(pid), slot, snapshot)

    @staticmethod
    def _add_snapshot(proc: _Proc, slot: int, snapshot: Message) -> None:
        slots = proc.snapshot_slots
        i = bisect.bisect_left(slots, slot)
        if i == len(slots) or slots[i] != slot:
            slots.insert(i, slot)
        if slot < len(proc.results) and snapshot is proc.results[slot]:
            proc.snapshots.pop(slot, None)
        else:
            proc.snapshots[slot] = snapshot

    async def latest_snapshot(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        return self.latest_snapshot_nowait(pid, at_most)

    def latest_snapshot_nowait(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        proc = self._procs.get(pid)
        if proc is None:
            return None
        slots, results = proc.snapshot_slots, proc.results
        i = bisect.bisect_right(slots, at_most)
        while i > 0:  # normally one step; further only past results that went missing
            i -= 1
            slot = slots[i]
            found = proc.snapshots.get(slot)
            if found is None and slot < len(results):
                found = results[slot]
            if found is not None:
                return slot, found
        return None

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            results_written=self._results_written,
            assignments_written=self._assignments_written,
        )
