"""Idle eviction for every worker of an engine, with one task.

Theory of operation
-------------------
A worker that goes idle asks to be *watched*: the reaper keeps a heap of
workers ordered by ``watched_since``, their ``last_request`` when the entry
is pushed (so by their deadlines, ``watched_since + max_idle``; the workers
themselves are the entries, so watching allocates nothing) and sleeps in a
cancel scope whose deadline is the earliest one. Requests do not touch
the heap (they only update ``last_request``), so the request path stays cheap;
when an entry comes due, the reaper compares the worker's real deadline with
the clock and either retires the worker or pushes the entry back with its new
deadline. Each worker has at most one entry (``watched``), so the heap is
bounded by the number of workers, and every check is O(log n).

A worker that is busy again (a request started its task) when its entry comes
due is simply dropped from the heap; it asks to be watched again the next
time it goes idle.

The same heap gives the least recently used idle worker (`pop_least_recent`,
for the engine's worker and memory bounds): the entry on top whose
``last_request`` is still the one it was pushed with is the oldest of all
(every other entry's real ``last_request`` is at least its own); an entry
on top that was used since is pushed back with its new time first.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._worker import GroupWorker

__all__ = ["IdleReaper"]


class IdleReaper:
    """Retires workers idle for ``max_idle`` seconds, at their deadlines."""

    def __init__(self, max_idle: float) -> None:
        self.max_idle = max_idle
        # Invariant: each worker whose ``watched`` is True, and no other, ordered
        # by ``watched_since`` (which does not change while the worker is in here).
        self._heap: list[GroupWorker] = []
        self._scope: trio.CancelScope | None = None

    def watch(self, worker: GroupWorker) -> None:
        """Start watching an idle worker (no-op if already watched). Never blocks."""
        if worker.watched:
            return
        worker.watched = True
        worker.watched_since = worker.last_request
        deadline = worker.last_request + self.max_idle
        heapq.heappush(self._heap, worker)
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline

    def pop_least_recent(self) -> GroupWorker | None:
        """Take the idle worker with the oldest request out of the heap (``None``: none).

        Entries of workers that are busy or stopping are dropped on the way.
        Never blocks; O(log n) per entry looked at.
        """
        heap = self._heap
        while heap:
            worker = heap[0]
            if not worker.idle or worker.stop_requested:
                heapq.heappop(heap)
                worker.watched = False
                continue
            if worker.last_request != worker.watched_since:  # used since it was pushed
                worker.watched_since = worker.last_request
                heapq.heapreplace(heap, worker)
                continue
            heapq.heappop(heap)
            worker.watched = False
            return worker
        return None

    async def run(self) -> None:
        """The reaper's task, for the engine's lifetime (cancelled when it closes)."""
        heap, max_idle = self._heap, self.max_idle
        while True:
            now = trio.current_time()
            while heap and heap[0].watched_since + max_idle <= now:
                worker = heapq.heappop(heap)
                worker.watched = False
                if not worker.idle:
                    continue
                if worker.last_request + max_idle > now:
                    self.watch(worker)
                else:
                    await worker.retire()
            with trio.move_on_at(heap[0].watched_since + max_idle if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
