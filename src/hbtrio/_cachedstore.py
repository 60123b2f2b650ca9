"""`CachedStore`: what the database stores answer from memory, shared.

Theory of operation
-------------------
The SQLite and PostgreSQL stores keep the same memory of the processes they
work with (``hbtrio._sqlite._memory``: the definition, the latest slots,
results written behind, assignments not computed yet) and answer the fast
path (`FastPath`, the ``*_nowait`` operations) from it alone, on the event
loop: each either answers from memory or raises `trio.WouldBlock` (then the
caller takes the blocking operation). Results and states go into the pending
tables and the write-behind's outbox (``hbtrio._writebehind``) without
blocking. `CachedStore` holds those operations, written once; each store
says which processes it may write for (`CachedStore._writable`: SQLite any
loaded one, PostgreSQL only those it holds) and does everything else.

These run on the hot path of every computed slot: they touch dicts only,
never a thread, and take no lock (the event loop is the only thread that
touches this memory).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import trio

from ._iothread import RoundThread
from ._message import Message
from ._sqlite._memory import Proc, ProcessCache
from ._store import SlotResult, Store, StoreStatistics
from ._writebehind import WriteBehind

__all__ = ["CachedStore", "check_bounds"]


def check_bounds(
    max_pending: int, max_cached_processes: int, max_cached_assignments: int, max_cached_bytes: int
) -> None:
    """Raise `ValueError` unless the store's bounds are ones it can keep."""
    if max_pending < 1:
        raise ValueError("max_pending must be >= 1")
    for name, bound in (
        ("max_cached_processes", max_cached_processes),
        ("max_cached_assignments", max_cached_assignments),
        ("max_cached_bytes", max_cached_bytes),
    ):
        if type(bound) is not int or bound < 0:
            raise ValueError(f"{name} must be an int >= 0, not {bound!r}")


def _drop_ahead(proc: Proc, computed: int) -> None:
    """Let ``proc``'s read-ahead go once slot ``computed``, or a later one, is its last."""
    ahead = proc.ahead
    if ahead is not None and computed >= proc.ahead_first + len(ahead) - 1:
        proc.ahead = None


class CachedStore(Store):
    """A `Store` that answers the fast path from a `ProcessCache` and writes results behind.

    A subclass sets ``_io``, ``_memory``, ``_procs`` (its ``procs``),
    ``_behind``, ``_assignments_written`` and ``_reads``, and provides
    `_writable`. Event-loop thread only.
    """

    _io: RoundThread[Any]
    _memory: ProcessCache
    _procs: OrderedDict[str, Any]
    _behind: WriteBehind
    _assignments_written: int
    _reads: int

    def _writable(self, pid: str) -> Proc:
        """The memory of ``pid``, for writing results; raises if it may not be written here."""
        raise NotImplementedError

    # what stays in memory -------------------------------------------------------------------------

    def pin(self, pid: str) -> None:
        self._memory.pin(pid)

    def unpin(self, pid: str) -> None:
        self._memory.unpin(pid)

    # the fast path ------------------------------------------------------------------------------

    def get_process_nowait(self, pid: str) -> Message | None:
        proc = self._procs.get(pid)
        if proc is None:
            raise trio.WouldBlock
        self._procs.move_to_end(pid)
        return proc.definition  # type: ignore[no-any-return]

    def get_assignments_nowait(self, pid: str, start: int, stop: int) -> list[Message]:
        proc = self._procs.get(pid)
        if proc is None:
            raise trio.WouldBlock
        if start > proc.latest:
            return []
        start, stop = max(start, 0), min(stop, proc.latest + 1)
        out: list[Message] = []
        ahead: list[Message] | None = proc.ahead
        if ahead is not None:  # a read-ahead from the file: the replay after a restore
            first = proc.ahead_first
            if first <= start < first + len(ahead):
                out = ahead[start - first : stop - first]
                start += len(out)
                if start >= stop:
                    return out
        cache = proc.assignments
        slots = range(start, stop)
        try:
            held = list(map(cache.__getitem__, slots))  # the common case: all of them held
        except KeyError:
            pass
        else:
            return out + held if out else held
        for slot in slots:
            found = cache.get(slot)
            if found is None:
                if not out:
                    raise trio.WouldBlock
                break
            out.append(found)
        return out

    def put_results_nowait(self, pid: str, results: Sequence[SlotResult]) -> None:
        proc = self._writable(pid)
        pending, snaps, cache, outbox = (
            proc.pending,
            proc.pending_snapshots,
            proc.assignments,
            self._behind.outbox,
        )
        high = proc.result_high
        for slot, state, snapshot in results:
            if slot > high:
                high = slot
            pending[slot] = state
            cache.pop(slot, None)
            if snapshot is not None:
                snaps[slot] = snapshot
                outbox.append((proc, slot, state, None if snapshot is state else snapshot, True))
            else:
                outbox.append((proc, slot, state, None, False))
        proc.result_high = high
        if proc.ahead is not None:
            _drop_ahead(proc, high)
        self._behind.added(len(results))

    def put_states_nowait(
        self, pid: str, first: int, states: Sequence[Message], snapshot_every: int
    ) -> None:
        proc = self._writable(pid)
        n = len(states)
        last = first + n - 1
        slots = range(first, last + 1)
        proc.pending.update(zip(slots, states, strict=True))
        cache = proc.assignments
        if cache:
            # After a restore the dict holds one slot or so (the latest): look only at those.
            for slot in slots if len(cache) > n else [s for s in cache if first <= s <= last]:
                cache.pop(slot, None)
        if proc.ahead is not None:
            _drop_ahead(proc, last)
        start = (-first) % snapshot_every
        proc.pending_snapshots.update(
            zip(
                range(first + start, last + 1, snapshot_every),
                states[start::snapshot_every],
                strict=True,
            )
        )
        proc.result_high = max(proc.result_high, last)
        self._behind.outbox.append((proc, first, states, snapshot_every))
        self._behind.added(n)

    def put_state_nowait(self, pid: str, slot: int, state: Message, snapshot: bool) -> None:
        self.put_results_nowait(pid, [(slot, state, state if snapshot else None)])

    def get_result_nowait(self, pid: str, slot: int) -> Message | None:
        proc = self._procs.get(pid)
        if proc is None:
            raise trio.WouldBlock
        found = proc.pending.get(slot)
        if found is not None:
            return found  # type: ignore[no-any-return]
        if slot > proc.result_high:
            return None
        raise trio.WouldBlock

    def pending_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        if self.get_result_nowait(pid, slot) is not None:
            return None
        found = self.get_assignments_nowait(pid, slot, slot + 1)
        return found[0] if found else None

    def latest_snapshot_nowait(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        raise trio.WouldBlock  # a snapshot may be in the database only

    # statistics -----------------------------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            commits=self._io.commits,
            pending_results=self._behind.pending_count,
            results_written=self._behind.results_written,
            assignments_written=self._assignments_written,
            reads=self._reads,
        )
