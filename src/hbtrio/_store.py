"""The store interface and the in-memory store.

A store keeps, per process: the definition, the assignments (slot 0 is the
definition itself), the result of every computed slot, and snapshots (full,
restorable states) at some slots. It answers "latest snapshot at or below slot
N" without listing slots.

Theory of operation
-------------------
A store provides eight operations (`Store`): put and get a process, append
and read assignments, the latest slot, write results (with their snapshots),
read a result, and find the latest snapshot. Results are written behind:
`put_results_nowait` returns at once and the store makes them durable in
batches; a result is readable as soon as it returns, so "stored" means
"readable" for the engine. Assignments are written through:
`append_assignments` returns only once they are durable. A few optional hooks
have defaults: `open`, `close`, `flush`, backpressure (`wait_writable`,
`backlogged`), `pin`/`unpin` (what must stay in memory) and `statistics`.

Two optional operations keep *blobs*, byte strings named by their content
(`put_blob`, `get_blob`; a process definition names its module image by
blob ID). They are not among the eight: a store without them raises
`StoreError` ("... keeps no blobs") from both, and works for everything else.

One optional fast path: a store that can answer from memory, without
blocking, gives a `FastPath` as `Store.fast` (``None`` otherwise). The
engine's request path, a worker catching up and a worker starting in the
calling task use it first, and fall back on the eight async operations when
it raises `trio.WouldBlock`. Without it everything still works, a little
slower.

Store methods are not checkpoints unless they say so: the async ones only
yield when they actually wait for I/O. All of them are cancellation-safe in
trio's sense: a write that raised `trio.Cancelled` did not happen.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import trio

from ._exceptions import StoreError, StoreFenced
from ._message import Message

__all__ = [
    "FastPath",
    "MemoryStore",
    "SlotResult",
    "Store",
    "StoreStatistics",
    "fast_path",
    "own_snapshots",
]


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


def own_snapshots(first: int, states: Sequence[Message], every: int) -> list[SlotResult]:
    """The `SlotResult` of consecutive states that are their own snapshots every ``every`` slots.

    For a store that writes `FastPath.put_states_nowait` as `Store.put_results_nowait`.
    """
    return [(s, state, state if s % every == 0 else None) for s, state in enumerate(states, first)]


class Store(abc.ABC):
    """What the engine needs from a store: subclass it, and write the eight abstract methods.

    Every async method may block (on I/O) and must be cancellation-safe; the
    one write that never blocks, `put_results_nowait`, must not.
    """

    #: The optional fast path (see the module): an object answering from memory,
    #: or ``None``. The engine reads it once, when it opens.
    fast: FastPath | None = None

    #: Set by the engine while it has the store open (``None`` otherwise). A store
    #: shared with other nodes (`hbtrio.PostgresStore`) calls it, on the event loop and
    #: without blocking, when a process it held was taken over elsewhere, with the
    #: `StoreFenced` its writes for that process now get; the engine then ends that
    #: process's worker like a lost one (`GroupWorker.lose`). Other stores never call it.
    on_lost: Callable[[str, StoreFenced], None] | None = None

    #: True while more results wait to be written than the store accepts
    #: (`wait_writable` would block). Read on the request path before a request
    #: computes a slot itself: while it is true, the request waits in
    #: `wait_writable` first. A store with write-behind keeps it up to date.
    backlogged: bool = False

    # the eight operations ----------------------------------------------------------------------

    @abc.abstractmethod
    async def put_process(self, pid: str, definition: Message, assignment: Message) -> bool:
        """Store a definition and its slot-0 assignment, durably and atomically.

        Returns ``False`` (changing nothing) when ``pid`` is already stored.
        """

    @abc.abstractmethod
    async def get_process(self, pid: str) -> Message | None:
        """The definition of ``pid``, or ``None``."""

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
    def put_results_nowait(self, pid: str, results: Sequence[SlotResult]) -> None:
        """Store computed slots (and their snapshots), written behind. Never blocks.

        Readable at once. A result stored again replaces the old one (the
        engine does that to store a snapshot at a slot that has its result);
        raises `StoreError` when the store cannot take them (nothing taken).
        """

    @abc.abstractmethod
    async def get_result(self, pid: str, slot: int) -> Message | None:
        """The stored result (state) at ``slot``, or ``None``."""

    @abc.abstractmethod
    async def latest_snapshot(
        self, pid: str, at_most: int, *, read_to: int = 0
    ) -> tuple[int, Message] | None:
        """The snapshot with the highest slot ``<= at_most``, as ``(slot, snapshot)``.

        ``read_to`` is a hint: the engine is about to read the assignments after
        the snapshot (after slot 0 without one) up to, not including, that
        slot. A store doing I/O may read some of them in the same trip and
        answer the engine's next reads from its `fast` path; others ignore it.
        """

    # optional hooks -----------------------------------------------------------------------------

    async def latest_snapshot_slot(self, pid: str, at_most: int) -> int | None:
        """The slot of `latest_snapshot` (``None`` without one), for deciding without reading it.

        Optional: the default reads the snapshot. A store that can tell the
        slot more cheaply (from memory, say) overrides it.
        """
        found = await self.latest_snapshot(pid, at_most)
        return None if found is None else found[0]

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (threads, files). Called by the engine on entry; idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Make everything durable and release resources. The store may be opened again."""

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Return once everything stored so far is durable."""

    async def wait_writable(self) -> None:  # noqa: B027 - optional hook
        """Block while too many results wait to be written (backpressure).

        Producers call it *before* they compute (workers before each chunk,
        requests before computing inline when `backlogged`), so the results
        waiting exceed the store's bound by at most one chunk.
        """

    def pin(self, pid: str) -> None:  # noqa: B027 - optional hook
        """Keep what the store holds in memory about ``pid`` until `unpin`. Never blocks.

        The engine pins a process for as long as it has a live worker (whose
        fast-path reads and writes need it there). Pins count: two pins need
        two unpins. A store that keeps everything in memory ignores them.
        """

    def unpin(self, pid: str) -> None:  # noqa: B027 - optional hook
        """Undo one `pin`; what the store holds about ``pid`` may then be evicted."""

    def statistics(self) -> StoreStatistics:
        """Counters for introspection and benchmarks."""
        return StoreStatistics()

    # optional operations: blobs ------------------------------------------------------------------

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        """Store ``data`` under ``blob_id``, durably before it returns; idempotent.

        ``blob_id`` is the unpadded base64url SHA-256 of ``data`` (the engine
        computes it), so storing an ID that is stored already changes nothing.
        The default raises `StoreError`: this store keeps no blobs.
        """
        raise StoreError(f"{type(self).__name__} keeps no blobs")

    async def get_blob(self, blob_id: str) -> bytes | None:
        """The bytes stored under ``blob_id``, or ``None``.

        A store that reads from a medium that can be damaged should check the
        bytes against their ID and raise `StoreError` when they differ. The
        default raises `StoreError`: this store keeps no blobs.
        """
        raise StoreError(f"{type(self).__name__} keeps no blobs")


class FastPath(Protocol):
    """A store's answers from memory (`Store.fast`): each raises `trio.WouldBlock` for I/O.

    None of them blocks or checkpoints. The reads answer what the store's
    async twins would; the writes are `Store.put_results_nowait` for the two
    shapes the engine writes most (one slot; a run of slots that are their
    own snapshots), without a tuple per slot.
    """

    def get_process_nowait(self, pid: str) -> Message | None:
        """`Store.get_process` from memory."""

    def get_assignments_nowait(self, pid: str, start: int, stop: int) -> list[Message]:
        """`Store.get_assignments` from memory: a non-empty prefix of its answer, or ``[]``
        when ``start`` is not scheduled."""

    def pending_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        """The assignment at ``slot`` if it is scheduled and has no stored result, else
        ``None``: the request path's one read before an idle worker computes ``slot``."""

    def get_result_nowait(self, pid: str, slot: int) -> Message | None:
        """`Store.get_result` from memory."""

    def latest_snapshot_nowait(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        """`Store.latest_snapshot` from memory."""

    def put_state_nowait(self, pid: str, slot: int, state: Message, snapshot: bool) -> None:
        """`Store.put_results_nowait` of one state, its own snapshot if ``snapshot``."""

    def put_states_nowait(
        self, pid: str, first: int, states: Sequence[Message], snapshot_every: int
    ) -> None:
        """`Store.put_results_nowait` of consecutive states ``first, first + 1, ...``, each
        its own snapshot at the slots divisible by ``snapshot_every``."""


class _NoFastPath:
    """The fast path of a store that has none: every read takes the async way; the two
    writes are `Store.put_results_nowait`."""

    __slots__ = ("store",)

    def __init__(self, store: Store) -> None:
        self.store = store

    def get_process_nowait(self, pid: str) -> Message | None:
        raise trio.WouldBlock

    def get_assignments_nowait(self, pid: str, start: int, stop: int) -> list[Message]:
        raise trio.WouldBlock

    def pending_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        raise trio.WouldBlock

    def get_result_nowait(self, pid: str, slot: int) -> Message | None:
        raise trio.WouldBlock

    def latest_snapshot_nowait(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        raise trio.WouldBlock

    def put_state_nowait(self, pid: str, slot: int, state: Message, snapshot: bool) -> None:
        self.store.put_results_nowait(pid, [(slot, state, state if snapshot else None)])

    def put_states_nowait(
        self, pid: str, first: int, states: Sequence[Message], snapshot_every: int
    ) -> None:
        self.store.put_results_nowait(pid, own_snapshots(first, states, snapshot_every))


def fast_path(store: Store) -> FastPath:
    """``store.fast``, or, for a store without a fast path, one that always says "wait"."""
    fast = store.fast
    return fast if fast is not None else _NoFastPath(store)


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

    Every method answers at once; none blocks or checkpoints. It keeps blobs
    too (`Store.put_blob`). A `MemoryStore`
    outlives the engines that use it, so a new engine on the same object
    continues where the last one stopped. Memory is all it has, so nothing is
    ever evicted: every process, assignment, result and snapshot stays until
    the store is dropped, and its memory grows with the data (`pin` and
    `unpin` do nothing). Use `SQLiteStore` for bounded memory.
    """

    def __init__(self) -> None:
        self._procs: dict[str, _Proc] = {}
        self._blobs: dict[str, bytes] = {}
        self._results_written = 0
        self._assignments_written = 0
        self.fast: FastPath = self  # every answer is in memory

    def __repr__(self) -> str:
        return f"<MemoryStore processes={len(self._procs)}>"

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        self._blobs.setdefault(blob_id, data)

    async def get_blob(self, blob_id: str) -> bytes | None:
        return self._blobs.get(blob_id)

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
            self.put_results_nowait(pid, [(slot, state, state if snapshot else None)])
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
            self.put_results_nowait(pid, own_snapshots(first, states, snapshot_every))
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

    async def latest_snapshot(
        self, pid: str, at_most: int, *, read_to: int = 0
    ) -> tuple[int, Message] | None:
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
