"""The store's I/O thread: one thread owns the connection and runs jobs in rounds.

Theory of operation
-------------------
All SQLite work runs on one dedicated thread (`IOThread`) that owns the
connection; the event loop never touches the file. Callers submit jobs (a
function of the connection) to a queue and park. The thread works in
rounds: it takes every job waiting, runs the writes first, all in one
transaction (each inside its own savepoint, so one failing job does not
undo the others) with one commit, then at most `READS_PER_BATCH` reads
(fewer once other jobs wait and `_READS_FOR` has passed) outside any
transaction, so they only see committed data; it wakes the loop once per
batch with every outcome. Concurrent writes therefore share commits (group
commit), thousands of computed slots cost a handful of commits, and a
durable write never waits behind more than a few reads.

The thread also holds the file: it takes the store's file lock
(`hbtrio._filelock.FileLock`) before it connects and drops it after the
connection is closed, so one engine at a time uses a file, and a holder
that dies releases it.

The round loop, the hand-back of outcomes, the GIL hand-off and the
trio-facing submission and cancellation are shared with the PostgreSQL
store's data thread (``hbtrio._iothread.RoundThread``); this module holds
what is SQLite's: the file lock, savepoints in one ``BEGIN IMMEDIATE``
transaction, and what a rolled-back transaction means.

The GIL. sqlite3 releases the GIL around every step of a statement, and on a
loop that never sleeps each time the thread takes it back can cost seconds
(see ``hbtrio._iothread._GILHandoff``). So the thread takes it back as
rarely as it can: rows go in as multi-row INSERTs (``_writes``), stored runs
are read in one step (``_reads``), a round wakes the loop once; and a busy
loop waits for a round that has run long now and then.

Cancellation: a job that has not started is withdrawn (the call raises
`trio.Cancelled` and nothing was written); a job already running completes
and its caller gets the result (trio then raises the cancellation at the
caller's next checkpoint). Either way the store matches what the caller was
told.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import outcome

from .._exceptions import StoreError
from .._filelock import FileLock
from .._iothread import READS_PER_BATCH, Job, RoundThread
from ._writes import rows_per_statement

__all__ = ["READS_PER_BATCH", "IOThread", "Job"]


class IOThread(RoundThread[sqlite3.Connection]):
    """The thread that owns a store's connection, and the queue of jobs it runs.

    `start` and `stop` run on the event loop (one Trio run at a time); jobs
    are submitted from the event-loop thread (`submit`, `run`) and their
    outcomes delivered there. ``owner`` names the store in errors.
    """

    #: Most write jobs in one transaction.
    WRITES_PER_BATCH = 4096

    def __init__(self, path: str, owner: object) -> None:
        super().__init__(path, owner)
        self.path = path
        # Rows per INSERT statement: set by the I/O thread, read by its jobs.
        self.per_statement = 1
        self._file_lock: FileLock | None = None

    # lifecycle (event loop) ---------------------------------------------------------------------

    async def start(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Start the thread: it takes the file lock, then connects with ``connect()``.

        Returns once it serves; raises `StoreError` (the thread is joined then)
        if it could not. Idempotent. Not cancellable: a thread that started is
        always either adopted or joined.
        """
        await self._launch(
            lambda: self._open(connect),
            name=f"hbtrio-sqlite:{self.path}",
            failure=f"cannot open {self.path}",
        )

    # the thread ---------------------------------------------------------------------------------

    def _open(self, connect: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
        lock = FileLock.acquire(self.path)
        try:
            conn = connect()
        except BaseException:
            lock.release(remove_created=True)
            raise
        self._file_lock = lock
        return conn

    def _serving(self, conn: sqlite3.Connection) -> None:
        self.per_statement = rows_per_statement(conn)

    def _close(self, conn: sqlite3.Connection) -> None:
        conn.close()
        if self._file_lock is not None:
            # After the connection: its own locks must not be dropped.
            self._file_lock.release()
            self._file_lock = None

    def _read(self, job: Job, conn: sqlite3.Connection) -> outcome.Outcome[Any]:
        return self._call(job, conn)

    def _call(self, j: Job, conn: sqlite3.Connection) -> outcome.Outcome[Any]:
        try:
            return outcome.Value(j.fn(conn))
        except sqlite3.Error as exc:
            err = StoreError(f"{self.path}: {exc}")
            err.__cause__ = exc
            return outcome.Error(err)
        except Exception as exc:
            return outcome.Error(exc)

    def _run_writes(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """Run write jobs in one transaction, each in its own savepoint, and commit once."""
        writes = self._start(jobs)
        if not writes:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for j in writes:
                j.result = outcome.Error(StoreError(f"cannot write {self.path}: {exc}"))
                j.result.error.__cause__ = exc
        for i, j in enumerate(writes):
            if j.result is not None:
                continue
            self._writes_after = len(writes) - i - 1
            conn.execute("SAVEPOINT job")
            j.result = self._call(j, conn)
            if not conn.in_transaction:  # SQLite rolled it all back (SQLITE_FULL, I/O error)
                self._fail_writes(writes, j.result)
                continue
            if isinstance(j.result, outcome.Error):
                conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        self._writes_after = 0
        if conn.in_transaction:
            try:
                conn.execute("COMMIT")
                self.commits += 1
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK") if conn.in_transaction else None
                for j in writes:
                    if isinstance(j.result, outcome.Value):
                        err = StoreError(f"commit to {self.path} failed: {exc}")
                        err.__cause__ = exc
                        j.result = outcome.Error(err)
        self._deliver(writes)

    def _fail_writes(self, writes: list[Job], failed: outcome.Outcome[Any] | None) -> None:
        """The batch's transaction is gone: no write of it happened, whatever it returned."""
        cause = failed.error if isinstance(failed, outcome.Error) else None
        for w in writes:
            if w.result is None or isinstance(w.result, outcome.Value):
                err = StoreError(f"{self.path}: the transaction was rolled back: {cause}")
                err.__cause__ = cause.__cause__ if isinstance(cause, StoreError) else cause
                w.result = outcome.Error(err)
