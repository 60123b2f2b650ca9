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

The GIL. sqlite3 releases the GIL around every step of a statement, and on a
loop that never sleeps each time the thread takes it back can cost seconds
(see `_GILHandoff`). So the thread takes it back as rarely as it can: rows
go in as multi-row INSERTs (``_writes``), stored runs are read in one step
(``_reads``), a round wakes the loop once; and a busy loop waits for a round
that has run long now and then (`_GILHandoff`).

Cancellation: a job that has not started is withdrawn (the call raises
`trio.Cancelled` and nothing was written); a job already running completes
and its caller gets the result (trio then raises the cancellation at the
caller's next checkpoint). Either way the store matches what the caller was
told.
"""

from __future__ import annotations

import collections
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import outcome
import trio

from .._exceptions import StoreError
from .._filelock import FileLock
from ._writes import rows_per_statement

__all__ = ["READS_PER_BATCH", "IOThread", "Job"]

_PENDING, _RUNNING, _WITHDRAWN = 0, 1, 2

#: Most write jobs in one transaction.
_WRITES_PER_BATCH: Final = 4096
#: Most read jobs run between two looks at the queue for writes ...
READS_PER_BATCH: Final = 32
#: ... or fewer, once jobs wait and the reads have run this long (seconds).
_READS_FOR: Final = 0.002
#: A busy loop waits for a round of the I/O thread that has run this long (seconds) ...
_HANDOFF_AFTER: Final = 0.005
#: ... for this long at most ...
_HANDOFF_FOR: Final = 0.005
#: ... and at most once in this long (see `_GILHandoff`).
_HANDOFF_EVERY: Final = 0.02


@attrs.define(eq=False)
class Job:
    """A function of the connection to run on the I/O thread, and who gets its outcome."""

    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    # Exactly one of task (a parked caller) and callback (write-behind) is set.
    task: trio.lowlevel.Task | None = None
    callback: Callable[[outcome.Outcome[Any]], None] | None = None
    # Guarded by the thread's lock: _PENDING -> _RUNNING (thread) or -> _WITHDRAWN (caller).
    state: int = _PENDING
    result: outcome.Outcome[Any] | None = None

    def deliver(self) -> None:
        assert self.result is not None
        if self.task is not None:
            trio.lowlevel.reschedule(self.task, self.result)
        elif self.callback is not None:
            self.callback(self.result)


_STOP: Final = object()


def _deliver_all(jobs: list[Job]) -> None:
    for j in jobs:
        j.deliver()


class _GILHandoff(trio.abc.Instrument):
    """Lets the store's thread run while the event loop never sleeps.

    A thread that wants CPython's GIL waits a switch interval (5 ms) before it
    asks the holder to let go, and every release of the GIL restarts that
    wait. A busy Trio loop releases it briefly on every pass (its poll for
    I/O, with a zero timeout) and takes it back at once, so the store's
    thread, which must take the GIL back after every SQLite call, can wait
    seconds for each one (measured: p99 480 ms, 60 takes a second). So when
    the loop is about to poll without blocking while the thread has been on
    one round of jobs for more than `_HANDOFF_AFTER`, the loop waits up to
    `_HANDOFF_FOR` for that round to end, at most once per `_HANDOFF_EVERY`:
    at most a quarter of a busy loop's time, none of an idle one's.
    """

    def __init__(self, io: IOThread) -> None:
        self.io = io
        self.next = 0.0
        self.handoffs = 0  # how many times the loop waited for the thread (for tests)

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            return  # the loop is going to sleep: the thread gets the GIL anyway
        since = self.io.round_since
        if not since:
            return
        now = time.monotonic()
        if now - since < _HANDOFF_AFTER or now < self.next:
            return
        self.handoffs += 1
        self.io.round_done.wait(_HANDOFF_FOR)
        self.next = time.monotonic() + _HANDOFF_EVERY


class IOThread:
    """The thread that owns a store's connection, and the queue of jobs it runs.

    `start` and `stop` run on the event loop (one Trio run at a time); jobs
    are submitted from the event-loop thread (`submit`, `run`) and their
    outcomes delivered there. ``owner`` names the store in errors.
    """

    def __init__(self, path: str, owner: object) -> None:
        self.path = path
        self.owner = owner
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Commits made (written by the I/O thread, read anywhere).
        self.commits = 0
        # Rows per INSERT statement, write jobs after the running one in its batch,
        # reads waiting: set by the I/O thread, read by its jobs.
        self.per_statement = 1
        self._writes_after = 0
        self._reads_waiting: collections.deque[Job] = collections.deque()
        # The I/O thread's current round of jobs: when it started (0.0: none) and
        # an event set when it ends (see `_GILHandoff`).
        self.round_since = 0.0
        self.round_done = threading.Event()
        self.handoff = _GILHandoff(self)

    @property
    def running(self) -> bool:
        """Whether the thread was started and not stopped since."""
        return self._thread is not None

    # lifecycle (event loop) ---------------------------------------------------------------------

    async def start(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Start the thread: it takes the file lock, then connects with ``connect()``.

        Returns once it serves; raises `StoreError` (the thread is joined then)
        if it could not. Idempotent. Not cancellable: a thread that started is
        always either adopted or joined.
        """
        if self._thread is not None:
            return
        self._token = trio.lowlevel.current_trio_token()
        self._queue = queue.SimpleQueue()
        token, ready, failed = self._token, trio.Event(), []

        def report(error: BaseException | None) -> None:  # called once, on the I/O thread
            if error is not None:
                failed.append(error)
            token.run_sync_soon(ready.set)

        thread = threading.Thread(
            target=self._serve,
            args=(connect, report),
            name=f"hbtrio-sqlite:{self.path}",
            daemon=True,
        )
        thread.start()
        trio.lowlevel.add_instrument(self.handoff)
        # Shielded: a thread that started is always either adopted or joined.
        with trio.CancelScope(shield=True):
            await ready.wait()
        error = failed[0] if failed else None
        if error is not None:
            self._remove_handoff()
            await trio.to_thread.run_sync(thread.join)
            if isinstance(error, StoreError):
                raise error
            raise StoreError(f"cannot open {self.path}: {error}") from error
        self._thread = thread

    async def stop(self) -> None:
        """Let the thread finish the jobs queued, then join it (shielded: the file is
        free when this returns). A no-op unless it runs."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        self._thread = None
        self._remove_handoff()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)

    def _remove_handoff(self) -> None:
        try:
            trio.lowlevel.remove_instrument(self.handoff)
        except (KeyError, RuntimeError):  # closed from another Trio run than it opened in
            pass

    # the thread ---------------------------------------------------------------------------------

    def _serve(
        self,
        connect: Callable[[], sqlite3.Connection],
        report: Callable[[BaseException | None], None],
    ) -> None:
        try:
            lock = FileLock.acquire(self.path)
        except BaseException as exc:
            report(exc)
            return
        try:
            conn = connect()
        except BaseException as exc:
            lock.release(remove_created=True)
            report(exc)
            return
        report(None)
        self.per_statement = rows_per_statement(conn)
        writes: collections.deque[Job] = collections.deque()
        reads: collections.deque[Job] = collections.deque()
        self._reads_waiting = reads
        stopping = False
        try:
            while True:
                # Block only when there is nothing left to do.
                if not (writes or reads):
                    if stopping:
                        return
                    stopping = self._sort(self._queue.get(), writes, reads)
                self.round_done.clear()
                self.round_since = time.monotonic()
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    stopping = self._sort(job, writes, reads) or stopping
                # Writes first, all of them (up to a bound) in one transaction; then a
                # few reads, so that a write never waits behind a long run of reads.
                if writes:
                    batch = [writes.popleft() for _ in range(min(len(writes), _WRITES_PER_BATCH))]
                    self._run_writes(conn, batch)
                if reads:
                    self._run_reads(conn, reads)
                self.round_since = 0.0
                self.round_done.set()
        finally:
            conn.close()
            lock.release()  # after the connection: its own locks must not be dropped

    @staticmethod
    def _sort(job: Any, writes: collections.deque[Job], reads: collections.deque[Job]) -> bool:
        """File a job from the queue under writes or reads; True for the stop sentinel."""
        if job is _STOP:
            return True
        (writes if job.write else reads).append(job)
        return False

    def _start(self, jobs: list[Job]) -> list[Job]:
        """Mark the jobs nobody withdrew as running; those are the ones to run."""
        with self._lock:
            jobs = [j for j in jobs if j.state == _PENDING]
            for j in jobs:
                j.state = _RUNNING
        return jobs

    def _run_reads(self, conn: sqlite3.Connection, reads: collections.deque[Job]) -> None:
        """Run up to `READS_PER_BATCH` reads, oldest first, each on its own (outside any
        write transaction: only committed data). Stops early once other jobs arrived
        and the reads have run for `_READS_FOR` (some read thousands of rows)."""
        done: list[Job] = []
        started = time.monotonic()
        while reads and len(done) < READS_PER_BATCH:
            job = reads.popleft()
            if not self._start([job]):
                continue  # withdrawn
            job.result = self._call(job, conn)
            done.append(job)
            if not self._queue.empty() and time.monotonic() - started > _READS_FOR:
                break
        self._deliver(done)

    def _call(self, j: Job, conn: sqlite3.Connection) -> outcome.Outcome[Any]:
        try:
            return outcome.Value(j.fn(conn))
        except sqlite3.Error as exc:
            err = StoreError(f"{self.path}: {exc}")
            err.__cause__ = exc
            return outcome.Error(err)
        except Exception as exc:
            return outcome.Error(exc)

    def others_waiting(self) -> bool:
        """Whether jobs other than the running one wait for this thread (I/O thread)."""
        return bool(self._writes_after or self._reads_waiting) or not self._queue.empty()

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

    def _deliver(self, jobs: list[Job]) -> None:
        """Hand the outcomes to the event loop: one wake-up for the whole batch.

        Each wake-up is a write to trio's wake-up socket, which releases the GIL;
        on a busy loop, taking it back costs this thread up to a switch interval.
        """
        if not jobs:
            return
        assert self._token is not None
        try:
            self._token.run_sync_soon(_deliver_all, jobs)
        except trio.RunFinishedError:  # pragma: no cover - the engine left without closing us
            pass

    def _fail_writes(self, writes: list[Job], failed: outcome.Outcome[Any] | None) -> None:
        """The batch's transaction is gone: no write of it happened, whatever it returned."""
        cause = failed.error if isinstance(failed, outcome.Error) else None
        for w in writes:
            if w.result is None or isinstance(w.result, outcome.Value):
                err = StoreError(f"{self.path}: the transaction was rolled back: {cause}")
                err.__cause__ = cause.__cause__ if isinstance(cause, StoreError) else cause
                w.result = outcome.Error(err)

    # submitting jobs (event loop) ---------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; its outcome is delivered on the event loop. Never blocks.

        Raises `StoreError` when the thread does not run.
        """
        if self._thread is None:
            raise StoreError(f"{self.owner!r} is not open")
        if not self.round_since:
            # The thread's next round starts now: it may need a while to get the GIL.
            self.round_done.clear()
            self.round_since = time.monotonic()
        self._queue.put(job)

    async def run(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        """Run ``fn(conn)`` on the thread and return its result. Always checkpoints.

        Cancellation-safe: a job that has not started is withdrawn (and
        `trio.Cancelled` raised); one that started completes, and its result
        is returned.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        job = Job(fn, write, task=trio.lowlevel.current_task())
        self.submit(job)

        def abort(_: object) -> trio.lowlevel.Abort:
            with self._lock:
                if job.state == _PENDING:
                    job.state = _WITHDRAWN
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)
