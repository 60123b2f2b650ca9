"""Results and snapshots written behind: the outbox, flush jobs, backpressure.

Theory of operation
-------------------
Both database stores write results and snapshots behind, and `WriteBehind`
is the machinery they share; each store's subclass makes the flush job
(`WriteBehind._job`: how a piece's rows go in, SQLite's multi-row INSERTs or
PostgreSQL's writes behind the fence) and says what a committed job means
(`WriteBehind._landed`).

The store's ``put_results_nowait`` records results in a process's pending
tables (``hbtrio._sqlite._memory.Proc``: readable at once) and in the
outbox, and `WriteBehind.added` makes sure one flush job is queued on the
store's I/O thread (`kick`). A flush job writes the outbox in pieces of
`FLUSH_ROWS` rows and stops after a piece once another job waits, so a
backlog goes in one transaction when nothing else waits, and a schedule
queued behind it shares the next commit instead of waiting for all of it.
When a commit lands, its entries leave the pending tables (unless replaced
since) and the next flush job is queued; what the job did not write goes
back to the front of the outbox. A failed write keeps everything pending
(still readable) and is tried again by the next kick.

Backpressure: while more than ``max_pending`` results wait, the store is
``backlogged`` (a plain attribute of the store, read on the request path)
and `wait_writable` blocks producers; every producer asks before it
computes, so the backlog exceeds the bound by one chunk at most. Waiters
wake once at most half that many wait, or once a write failed (then they
raise `StoreError`).

Everything here runs on the event-loop thread but the flush job itself;
nothing here blocks the loop (`kick` and `added` never block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final

import outcome
import trio

from ._exceptions import StoreError
from ._iothread import Job, RoundThread
from ._store import Store

if TYPE_CHECKING:
    from ._sqlite._memory import ProcessCache

__all__ = ["FLUSH_ROWS", "Entry", "WriteBehind"]

#: Results (and snapshots) one write-behind job writes before it looks whether
#: another job waits (and stops if one does).
FLUSH_ROWS: Final = 4096

# (proc, slot, state, snapshot, is_snapshot) for one slot, or (proc, first, states,
# snapshot_every) for a run of states that are their own snapshots.
Entry = tuple[Any, ...]


def _nothing(*_: object) -> None:
    """A write job that writes nothing (`WriteBehind.flush` waits for its commit)."""
    return None


class WriteBehind:
    """The results a store has taken and not made durable yet, and their way to the database.

    ``owner``'s ``backlogged`` is kept up to date. Event-loop thread only; the
    async methods block as they say.
    """

    #: Most pieces of `FLUSH_ROWS` rows in one flush job.
    FLUSH_PIECES: ClassVar[int] = 64

    def __init__(
        self, owner: Store, io: RoundThread[Any], memory: ProcessCache, max_pending: int
    ) -> None:
        self._owner = owner
        self._io = io
        self._memory = memory
        self._max_pending = max_pending
        #: Entries waiting for a flush job, oldest first.
        self.outbox: list[Entry] = []
        self._flushing = False
        #: Results taken and not committed yet (``owner.backlogged``: more than max_pending).
        self.pending_count = 0
        self._drained: trio.Event | None = None
        self._write_error: BaseException | None = None
        #: Results taken since the store was made.
        self.results_written = 0

    def added(self, n: int) -> None:
        """``n`` more results wait to be written: count them, and see that a flush is on its way."""
        self.pending_count += n
        self.results_written += n
        if self.pending_count > self._max_pending:
            self._owner.backlogged = True
        self.kick()

    def _take_batch(self) -> list[Entry]:
        """The oldest entries of the outbox, at most `FLUSH_ROWS` rows (a run may be split)."""
        outbox, rows, i = self.outbox, 0, 0
        while i < len(outbox) and rows < FLUSH_ROWS:
            entry = outbox[i]
            if len(entry) == 4:  # a run of states
                proc, first, states, every = entry
                room = FLUSH_ROWS - rows
                if len(states) > room:
                    outbox[i] = (proc, first, states[:room], every)
                    outbox.insert(i + 1, (proc, first + room, states[room:], every))
                    rows += room
                else:
                    rows += len(states)
            else:
                rows += 1
            i += 1
        batch = outbox[:i]
        del outbox[:i]
        return batch

    def kick(self) -> None:
        """Queue one flush job for the outbox unless one is already on its way.

        The job writes the outbox in pieces of at most `FLUSH_ROWS` rows and
        stops after a piece once another job waits for the I/O thread: alone,
        a backlog goes in one transaction; a schedule queued behind it waits
        for one piece at most. What it did not write goes back to the outbox
        when it commits, and the next job is queued then. Never blocks.
        """
        if self._flushing or not self.outbox or not self._io.running:
            return
        pieces: list[list[Entry]] = []
        while self.outbox and len(pieces) < self.FLUSH_PIECES:
            pieces.append(self._take_batch())
        self._flushing = True

        def done(result: outcome.Outcome[Any]) -> None:
            self._flushing = False
            if isinstance(result, outcome.Error):
                # Keep everything pending (still readable) and retry on the next kick or flush.
                self._write_error = result.error
                self.outbox[:0] = [e for piece in pieces for e in piece]
            else:
                self._write_error = None
                self._landed(pieces, result.unwrap())
                self.kick()
            if self._drained is not None and (
                self.pending_count <= self._max_pending // 2 or self._write_error is not None
            ):
                self._drained.set()
                self._drained = None

        self._io.submit(self._job(pieces, done))

    def _job(self, pieces: list[list[Entry]], done: Callable[[outcome.Outcome[Any]], None]) -> Job:
        """The write job that writes ``pieces`` (some of them) and calls ``done``."""
        raise NotImplementedError

    def _landed(self, pieces: list[list[Entry]], value: Any) -> None:
        """The flush job of ``pieces`` committed with ``value``: put back to the front of
        the outbox what it did not write, and `_committed` what it did."""
        raise NotImplementedError

    def _committed(self, batch: list[Entry]) -> None:
        """A flush committed: its entries leave the pending tables (unless replaced since)."""
        for entry in batch:
            if len(entry) == 4:
                run_proc, first, states, every = entry
                self.pending_count -= len(states)
                pending, snaps = run_proc.pending, run_proc.pending_snapshots
                for slot, run_state in enumerate(states, first):
                    if pending.get(slot) is run_state:
                        del pending[slot]
                        if slot % every == 0 and snaps.get(slot) is run_state:
                            del snaps[slot]
                continue
            proc, slot, state, _snapshot, is_snap = entry
            if state is not None:
                self.pending_count -= 1
                if proc.pending.get(slot) is state:
                    del proc.pending[slot]
            if is_snap:
                proc.pending_snapshots.pop(slot, None)
        self._owner.backlogged = self.pending_count > self._max_pending
        memory = self._memory
        if len(memory.procs) > memory.max_procs:  # some may have waited only for this commit
            memory.trim()

    async def wait_writable(self) -> None:
        """Block while more than ``max_pending`` results wait for the database.

        Not a checkpoint when nothing needs to wait. Once it blocked, it returns
        when at most half that many wait (and the count is still within the
        bound: every waiter checks again, so they go on one at a time).
        """
        while self.pending_count > self._max_pending:
            if self._drained is None:
                self._drained = trio.Event()
            drained = self._drained
            self.kick()  # (re)tries a failed write: only a fresh failure is reported
            await drained.wait()
            if self._write_error is not None:
                raise StoreError(
                    f"writing results to {self._io.where} failed: {self._write_error}"
                ) from self._write_error

    async def flush(self) -> None:
        """Return once every result and snapshot taken so far is durable (or refused by
        the fence, in PostgreSQL). Checkpoints."""
        io = self._io
        if not io.running:
            await trio.lowlevel.checkpoint()
            return
        self.kick()
        # Jobs run in order: once this no-op write commits, earlier batches have too.
        while True:
            await io.run(_nothing, write=True)
            if not self._flushing and not self.outbox:
                break
            if self._write_error is not None and not self._flushing:
                self.kick()
                await io.run(_nothing, write=True)
                if self._write_error is not None:
                    raise StoreError(
                        f"writing to {io.where} failed: {self._write_error}"
                    ) from self._write_error
