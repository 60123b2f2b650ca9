"""What a store keeps in memory about processes, within its bounds.

Theory of operation
-------------------
Reads cost a round trip to the I/O thread each, so the store keeps, per
process it has looked up, a `Proc`: the definition, the latest assignment
slot, the highest result slot, the results and snapshots written behind
(until their commit lands) and the assignments not computed yet. The request
path and the workers answer from it without a round trip (the store's fast
path); what it lacks is read from the file.

Two bounds keep that memory in check (`ProcessCache`). Processes: at most
``max_procs`` entries, least recently looked up evicted first; an entry
that is pinned (a live worker: `pin`), has results waiting to be written, or
a call in flight that will update it (``busy``) stays beyond the bound.
Assignments not computed yet: at most ``max_cached`` of them and
``max_cached_bytes`` of their CBOR, for all processes together, oldest
evicted first (a deque in arrival order: evicting costs nothing per
assignment that already left). A process's assignments are evicted in slot
order, so what is left of them is always a contiguous run ending at its
latest slot (``appended_from``).

A read ahead from the file (the assignments after a restored snapshot, read
in the snapshot's job, up to 4,096 of them) is held apart, as the one list
the read made (``Proc.ahead``, one entry of the bounds' order; `keep_ahead`):
the replay that follows takes its chunks from it by slicing. Putting 1,000
slots one by one into the dict and taking them out again cost more than the
rest of the replay's event-loop work (a third of it, with the garbage
collection the per-slot tuples set off).

Blobs are never kept here: each read of one goes to the file.

Everything here runs on the event-loop thread only, and nothing blocks.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence

import attrs

from .._message import Message

__all__ = ["Proc", "ProcessCache", "pending_snapshot"]


@attrs.define(eq=False)
class Proc:
    """What the store keeps in memory about one process (event-loop thread only)."""

    rowid: int
    definition: Message
    latest: int  # highest durable assignment slot
    result_high: int  # highest slot with a result, durable or pending
    # Invariant: every slot from appended_from to latest without a stored result
    # is in ``assignments``. It starts as the first slot appended through this
    # store (latest + 1 when loaded from the file) and moves up as the cache
    # evicts: a process's entries are evicted in slot order.
    appended_from: int
    # Assignments without a stored result yet (a bounded cache shared by all
    # processes, see `ProcessCache.keep`): those appended through this store, and
    # the latest one when the process is loaded (the scheduler reads it next).
    # Each stays until its slot's result is stored or the cache evicts it.
    assignments: dict[int, Message] = attrs.field(factory=dict)
    # Assignments read ahead from the file (below appended_from), consecutive from
    # ``ahead_first`` on, as one list (`ProcessCache.keep_ahead`); dropped once results
    # cover the last of them or the cache evicts them.
    ahead: list[Message] | None = None
    ahead_first: int = 0
    # Results and snapshots written behind, until their commit lands.
    pending: dict[int, Message] = attrs.field(factory=dict)
    pending_snapshots: dict[int, Message] = attrs.field(factory=dict)
    # Calls in flight that update this entry once their job returns: while any
    # is, the entry is not evicted (the update would go to an orphan).
    busy: int = 0


def pending_snapshot(proc: Proc, at_most: int) -> tuple[int, Message] | None:
    """The latest snapshot at or below ``at_most`` still waiting to be written (event loop)."""
    best = max((s for s in proc.pending_snapshots if s <= at_most), default=-1)
    return None if best < 0 else (best, proc.pending_snapshots[best])


class ProcessCache:
    """The loaded processes and the assignments kept for them, within the bounds.

    Never blocks; event-loop thread only.
    """

    def __init__(self, max_procs: int, max_cached: int, max_cached_bytes: int) -> None:
        # Loaded processes, least recently looked up first.
        self.procs: collections.OrderedDict[str, Proc] = collections.OrderedDict()
        self.max_procs = max_procs
        self._pins: dict[str, int] = {}
        # The assignment cache's order: (process, slot, CBOR size) as they came in,
        # oldest first, or (process, run, CBOR size of the run) for a read-ahead.
        # Entries whose slot has since left the process's dict (its result was
        # stored) stay until they reach the front; the bounds count them, so the
        # cache itself is within them too.
        self._order: collections.deque[tuple[Proc, int | list[Message], int]] = collections.deque()
        self._count = 0  # assignments the entries of _order stand for
        self._bytes = 0
        self._max_cached = max_cached
        self._max_cached_bytes = max_cached_bytes

    def clear(self) -> None:
        """Forget everything (the store closed)."""
        self.procs.clear()
        self._pins.clear()
        self._order.clear()
        self._count = self._bytes = 0

    def adopt(self, pid: str, proc: Proc) -> Proc:
        """Keep a newly loaded process, evicting others beyond the bound."""
        self.procs[pid] = proc
        if len(self.procs) > self.max_procs:
            self.trim()
        return proc

    def _evictable(self, pid: str, proc: Proc) -> bool:
        return not (proc.pending or proc.pending_snapshots or proc.busy or pid in self._pins)

    def trim(self) -> None:
        """Evict the least recently looked-up processes that can go, down to the bound.

        Looks at a few more entries than it must evict: those that cannot go
        (pinned, results waiting, a call in flight) move to the back.
        """
        procs = self.procs
        excess = len(procs) - self.max_procs
        for _ in range(min(len(procs), excess + 16)):
            if excess <= 0:
                return
            pid, proc = next(iter(procs.items()))
            if self._evictable(pid, proc):
                del procs[pid]
                # Its cached assignments go; entries in the cache's order become stale.
                proc.assignments.clear()
                proc.ahead = None
                excess -= 1
            else:
                procs.move_to_end(pid)

    def keep(self, proc: Proc, slot: int, assignment: Message, size: int) -> None:
        """Keep an assignment in memory until its result is stored, within the bounds."""
        proc.assignments[slot] = assignment
        self._order.append((proc, slot, size))
        self._count += 1
        self._bytes += size
        self._bound()

    def keep_run(self, proc: Proc, assignments: Sequence[Message], sizes: list[int]) -> None:
        """`keep` for a run of assignments (``sizes[i]`` the CBOR size of ``assignments[i]``),
        skipping slots held already.

        A run of consecutive slots none of which is held (an append) goes in
        with C-level loops only.
        """
        if len(sizes) != len(assignments):
            raise ValueError("keep_run: one size per assignment")
        if not assignments:
            return
        held, order = proc.assignments, self._order
        first, n = assignments[0]["slot"], len(assignments)
        while n and assignments[n - 1]["slot"] in held:  # the latest slot, held since loading
            n -= 1
        slots = range(first, first + n)
        if n and assignments[n - 1]["slot"] == slots[-1] and held.keys().isdisjoint(slots):
            held.update(zip(slots, assignments, strict=False))
            order.extend(zip(itertools.repeat(proc), slots, sizes, strict=False))
            self._count += n
            self._bytes += sum(sizes[:n])
        else:
            total = 0
            for assignment, size in zip(assignments, sizes, strict=True):
                slot = assignment["slot"]
                if slot not in held:
                    held[slot] = assignment
                    order.append((proc, slot, size))
                    self._count += 1
                    total += size
            self._bytes += total
        self._bound()

    def keep_ahead(self, proc: Proc, assignments: list[Message], sizes: Sequence[int]) -> None:
        """Hold ``assignments``, consecutive and read ahead from the file, as ``proc``'s
        read-ahead (replacing the one it had), within the bounds; the list is kept as it
        is, and nobody changes it after (``sizes[i]`` the CBOR size of ``assignments[i]``).

        Costs nothing per slot: one entry in the bounds' order stands for the run.
        """
        if len(sizes) != len(assignments):
            raise ValueError("keep_ahead: one size per assignment")
        if not assignments:
            return
        total = sum(sizes)
        proc.ahead, proc.ahead_first = assignments, assignments[0]["slot"]
        self._order.append((proc, assignments, total))
        self._count += len(assignments)
        self._bytes += total
        self._bound()

    def _bound(self) -> None:
        """Drop the oldest cached assignments while over ``max_cached`` or ``max_cached_bytes``."""
        order = self._order
        while order and (self._count > self._max_cached or self._bytes > self._max_cached_bytes):
            old, key, old_size = order.popleft()
            self._bytes -= old_size
            if type(key) is list:  # a read-ahead
                self._count -= len(key)
                if old.ahead is key:
                    old.ahead = None
                continue
            self._count -= 1
            assert type(key) is int
            if old.assignments.pop(key, None) is not None and key >= old.appended_from:
                old.appended_from = key + 1  # the slots below it went before it

    def pin(self, pid: str) -> None:
        self._pins[pid] = self._pins.get(pid, 0) + 1

    def unpin(self, pid: str) -> None:
        left = self._pins.pop(pid, 0) - 1
        if left > 0:
            self._pins[pid] = left
        elif len(self.procs) > self.max_procs:
            self.trim()
