"""Results and snapshots written behind: the outbox, flush jobs, backpressure.

Theory of operation
-------------------
Results and snapshots are written behind: `SQLiteStore.put_results_nowait`
records them in a process's pending tables (``_memory.Proc``: readable at
once) and in the outbox, and `WriteBehind.added` makes sure one flush job is
queued on the I/O thread (`kick`). A flush job writes the outbox in pieces
of `FLUSH_ROWS` rows and stops after a piece once another job waits, so a
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

Everything here runs on the event-loop thread but the flush job itself.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

import outcome
import trio

from .._exceptions import StoreError
from .._store import Store
from ._iothread import IOThread, Job
from ._memory import ProcessCache
from ._writes import INSERT_RESULTS, INSERT_SNAPSHOTS, Entry, encode_batch, insert_rows

__all__ = ["FLUSH_ROWS", "WriteBehind"]

#: Results (and snapshots) one write-behind job writes before it looks whether
#: another job waits (and stops if one does) ...
FLUSH_ROWS: Final = 4096
#: ... and most such pieces in one job.
_FLUSH_PIECES: Final = 64


class WriteBehind:
    """The results a store has taken and not made durable yet, and their way to the file.

    ``owner``'s ``backlogged`` is kept up to date. Event-loop thread only; the
    async methods block as they say.
    """

    def __init__(self, owner: Store, io: IOThread, memory: ProcessCache, max_pending: int) -> None:
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
        while self.outbox and len(pieces) < _FLUSH_PIECES:
            pieces.append(self._take_batch())
        self._flushing = True
        io = self._io

        def write(conn: sqlite3.Connection) -> int:
            per_statement, written = io.per_statement, 0
            for piece in pieces:
                if written and io.others_waiting():
                    break
                results, flags, snaps = encode_batch(piece)
                insert_rows(conn, INSERT_RESULTS, 4, results, per_statement)
                if flags:
                    conn.executemany(
                        "UPDATE results SET snapshot = 1 WHERE proc = ? AND slot = ?", flags
                    )
                insert_rows(conn, INSERT_SNAPSHOTS, 3, snaps, per_statement)
                written += 1
            return written

        def done(result: outcome.Outcome[Any]) -> None:
            self._flushing = False
            if isinstance(result, outcome.Error):
                # Keep everything pending (still readable) and retry on the next kick or flush.
                self._write_error = result.error
                self.outbox[:0] = [e for piece in pieces for e in piece]
            else:
                self._write_error = None
                written = result.unwrap()
                self.outbox[:0] = [e for piece in pieces[written:] for e in piece]
                self._committed([e for piece in pieces[:written] for e in piece])
                self.kick()
            if self._drained is not None and (
                self.pending_count <= self._max_pending // 2 or self._write_error is not None
            ):
                self._drained.set()
                self._drained = None

        io.submit(Job(write, True, callback=done))

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
        """Block while more than ``max_pending`` results wait for the disk.

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
                    f"writing results to {self._io.path} failed: {self._write_error}"
                ) from self._write_error

    async def flush(self) -> None:
        """Return once every result and snapshot taken so far is durable. Checkpoints."""
        io = self._io
        if not io.running:
            await trio.lowlevel.checkpoint()
            return
        self.kick()
        # Jobs run in order: once this no-op write commits, earlier batches have too.
        while True:
            await io.run(lambda conn: None, write=True)
            if not self._flushing and not self.outbox:
                break
            if self._write_error is not None and not self._flushing:
                self.kick()
                await io.run(lambda conn: None, write=True)
                if self._write_error is not None:
                    raise StoreError(
                        f"writing to {io.path} failed: {self._write_error}"
                    ) from self._write_error
