"""`SQLiteStore`: the embedded default store, one SQLite file in WAL mode.

Theory of operation
-------------------
All SQLite work runs on one dedicated thread that owns the connection; the
event loop never touches the file. Callers submit jobs to a queue and park.
The thread works in rounds: it takes every job waiting, runs the writes
first, all in one transaction (each inside its own savepoint, so one failing
job does not undo the others) with one commit, then at most
`_READS_PER_BATCH` reads (fewer once other jobs wait and `_READS_FOR` has
passed) outside any transaction, so they only see committed data; it wakes
the loop once per batch with every outcome. Concurrent
writes therefore share commits (group commit), thousands of computed slots
cost a handful of commits, and a durable write never waits behind more than
a few reads.

Results and snapshots are written behind: `put_results_nowait` records them in
an in-memory pending table (readable at once) and makes sure one flush job is
queued; a flush job writes in pieces of `_FLUSH_ROWS` rows and stops after a
piece once another job waits, so a backlog goes in one transaction when
nothing else waits, and a schedule queued behind it shares the next commit
instead of waiting for all of it. When a commit lands, its entries leave the
pending table and the next flush job is queued. `wait_writable` blocks
producers while more than ``max_pending`` results wait (`backlogged`); every
producer asks before it computes, so the backlog exceeds the bound by one
chunk at most. Assignments are written through: `append_assignments` returns
only after its commit.

The GIL. sqlite3 releases the GIL around every step of a statement, and on a
loop that never sleeps each time the thread takes it back can cost seconds
(see `_GILHandoff`). So the thread takes it back as rarely as it can: rows go
in as multi-row INSERTs (one step per up to 1,024 rows, not one per row),
stored runs are read in one step, a round wakes the loop once; and a busy
loop waits for a round that has run long now and then (`_GILHandoff`).

Reads cost a round trip to the thread each, so a cold process takes two: the
first call about it loads what the store keeps in memory (the definition, the
latest assignment slot, the highest result slot, and the latest assignment
itself while it has no result: the scheduler reads it next); then the
worker's restore reads the snapshot and the assignments after it in one job
(`snapshot_and_assignments`). Runs of stored messages are decoded in one
cbor2 call.

Cancellation: a job that has not started is withdrawn (the call raises
`trio.Cancelled` and nothing was written); a job already running completes and
its caller gets the result (trio then raises the cancellation at the caller's
next checkpoint). Either way the store matches what the caller was told.

Blobs (`put_blob`, `get_blob`) are written through like assignments, one
row each, and never kept in memory: a read fetches the row on the I/O thread
and checks its bytes against the ID there (SHA-256 releases the GIL).

Schema (version 2, in ``PRAGMA user_version``), readable with the ``sqlite3``
shell. Definitions and assignments are canonical CBOR; states and snapshots
are CBOR in the state's own key order (`encode_plain`: the same message,
encoded three times faster, and nothing hashes these bytes)::

    processes(id INTEGER PRIMARY KEY, pid TEXT UNIQUE, definition BLOB)
    assignments(proc, slot, message_id TEXT, assignment BLOB)   -- PK (proc, slot)
    results(proc, slot, state BLOB, snapshot INT)   -- PK (proc, slot); snapshot=1: the state
                                                    -- is also the restorable snapshot
    snapshots(proc, slot, snapshot BLOB)            -- snapshots in a device's own form
    blobs(id TEXT PRIMARY KEY, data BLOB)           -- id: the unpadded base64url SHA-256

Version 1 had no ``blobs`` table; opening such a file adds it (`_MIGRATIONS`).
"""

from __future__ import annotations

import binascii
import collections
import hashlib
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import cbor2
import outcome
import trio

from ._codec import encode, encode_in_pieces, encode_plain, is_large
from ._exceptions import InvalidMessage, StoreError
from ._filelock import FileLock
from ._message import Message, _adopt_map, _Frozen, id_of_bytes
from ._message import decode_trusted as decode
from ._store import FastPath, SlotResult, Store, StoreStatistics

__all__ = ["SQLiteStore"]

log = logging.getLogger("hbtrio")

SCHEMA_VERSION: Final = 2

_BLOBS: Final = """
CREATE TABLE IF NOT EXISTS blobs (
    id TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
"""

#: The tables of schema version 1.
_TABLES_V1: Final = """
CREATE TABLE IF NOT EXISTS processes (
    id INTEGER PRIMARY KEY,
    pid TEXT NOT NULL UNIQUE,
    definition BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    proc INTEGER NOT NULL REFERENCES processes(id),
    slot INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    assignment BLOB NOT NULL,
    PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    proc INTEGER NOT NULL REFERENCES processes(id),
    slot INTEGER NOT NULL,
    state BLOB NOT NULL,
    snapshot INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS results_snapshots ON results (proc, slot) WHERE snapshot = 1;
CREATE TABLE IF NOT EXISTS snapshots (
    proc INTEGER NOT NULL REFERENCES processes(id),
    slot INTEGER NOT NULL,
    snapshot BLOB NOT NULL,
    PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
"""
#: The whole schema (what a new file gets).
_SCHEMA: Final = _TABLES_V1 + _BLOBS

#: What brings a file of schema version N (a key) to version N + 1.
_MIGRATIONS: Final = {1: _BLOBS}

_PENDING, _RUNNING, _WITHDRAWN = 0, 1, 2

#: Most assignments `SQLiteStore.latest_snapshot` reads ahead into memory.
READ_AHEAD: Final = 4096

#: Most write jobs in one transaction.
_WRITES_PER_BATCH: Final = 4096
#: Most read jobs run between two looks at the queue for writes ...
_READS_PER_BATCH: Final = 32
#: ... or fewer, once jobs wait and the reads have run this long (seconds).
_READS_FOR: Final = 0.002
#: Results (and snapshots) one write-behind job writes before it looks whether
#: another job waits (and stops if one does) ...
_FLUSH_ROWS: Final = 4096
#: ... and most such pieces in one job.
_FLUSH_PIECES: Final = 64
#: Most rows in one INSERT statement (fewer where SQLite allows fewer variables).
_MAX_ROWS_PER_STATEMENT: Final = 1024
#: A busy loop waits for a round of the I/O thread that has run this long (seconds) ...
_HANDOFF_AFTER: Final = 0.005
#: ... for this long at most ...
_HANDOFF_FOR: Final = 0.005
#: ... and at most once in this long (see `_GILHandoff`).
_HANDOFF_EVERY: Final = 0.02


@attrs.define(eq=False)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    # Exactly one of task (a parked caller) and callback (write-behind) is set.
    task: trio.lowlevel.Task | None = None
    callback: Callable[[outcome.Outcome[Any]], None] | None = None
    # Guarded by the store's lock: _PENDING -> _RUNNING (thread) or -> _WITHDRAWN (caller).
    state: int = _PENDING
    result: outcome.Outcome[Any] | None = None

    def deliver(self) -> None:
        assert self.result is not None
        if self.task is not None:
            trio.lowlevel.reschedule(self.task, self.result)
        elif self.callback is not None:
            self.callback(self.result)


_STOP: Final = object()


def _deliver_all(jobs: list[_Job]) -> None:
    for j in jobs:
        j.deliver()


@attrs.define(eq=False)
class _Proc:
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
    # processes, see `SQLiteStore._cache`): those appended through this store, and
    # the latest one when the process is loaded (the scheduler reads it next).
    # Each stays until its slot's result is stored or the cache evicts it.
    assignments: dict[int, Message] = attrs.field(factory=dict)
    # Results and snapshots written behind, until their commit lands.
    pending: dict[int, Message] = attrs.field(factory=dict)
    pending_snapshots: dict[int, Message] = attrs.field(factory=dict)
    # Calls in flight that update this entry once their job returns: while any
    # is, the entry is not evicted (the update would go to an orphan).
    busy: int = 0


# Write-behind entries: (proc, slot, state, snapshot, is_snapshot) for one slot, or
# (proc, first, states, snapshot_every) for a run of states that are their own
# snapshots (from `put_states_nowait`).
_Slot = tuple[_Proc, int, Message | None, Message | None, bool]
_Run = tuple[_Proc, int, Sequence[Message], int]
_Entry = _Slot | _Run

_LOAD_PROCESS: Final = (
    "SELECT id, definition,"
    " (SELECT slot FROM assignments WHERE proc = p.id ORDER BY slot DESC LIMIT 1),"
    " (SELECT assignment FROM assignments WHERE proc = p.id ORDER BY slot DESC LIMIT 1),"
    " (SELECT MAX(slot) FROM results WHERE proc = p.id)"
    " FROM processes AS p WHERE pid = ?"
)
_INSERT_RESULTS: Final = "INSERT OR REPLACE INTO results (proc, slot, state, snapshot) VALUES "
_INSERT_SNAPSHOTS: Final = "INSERT OR REPLACE INTO snapshots (proc, slot, snapshot) VALUES "
_INSERT_ASSIGNMENTS: Final = "INSERT INTO assignments (proc, slot, message_id, assignment) VALUES "


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

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.next = 0.0
        self.handoffs = 0  # how many times the loop waited for the thread (for tests)

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            return  # the loop is going to sleep: the thread gets the GIL anyway
        since = self.store._round_since
        if not since:
            return
        now = time.monotonic()
        if now - since < _HANDOFF_AFTER or now < self.next:
            return
        self.handoffs += 1
        self.store._round_done.wait(_HANDOFF_FOR)
        self.next = time.monotonic() + _HANDOFF_EVERY


def _encode_large(message: Message) -> bytes:
    return encode_in_pieces(message) if is_large(message) else encode(message)


class SQLiteStore(Store):
    """The embedded store: one SQLite file, WAL mode, a dedicated I/O thread.

    Args:
        path: the database file (created if missing).
        synchronous: SQLite's ``synchronous`` setting. ``"FULL"`` (the default)
            makes every commit survive power loss; ``"NORMAL"`` survives a crash
            of this process but not of the machine, and commits faster.
        max_pending: how many computed results may wait to be written before
            `wait_writable` blocks the workers producing them.
        max_cached_processes: how many processes the store keeps in memory
            (definition, latest slots, pending results). More may be while they
            are pinned (`Store.pin`: the engine pins each process with a live
            worker) or have results waiting to be written; the others are
            evicted, least recently looked up first, and read again from the
            file when needed.
        max_cached_assignments: how many assignments not computed yet the
            store keeps in memory, for all processes together (oldest evicted
            first; they are read from the file when needed).
        max_cached_bytes: the same bound, in bytes of the assignments' CBOR.

    The engine opens and closes the store; a closed store can be opened again.
    Concurrency: every method runs on the event-loop thread; only the I/O
    thread touches the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        max_pending: int = 20_000,
        max_cached_processes: int = 10_000,
        max_cached_assignments: int = 100_000,
        max_cached_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise ValueError(f"synchronous must be FULL, NORMAL, EXTRA or OFF, not {synchronous!r}")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        for name, bound in (
            ("max_cached_processes", max_cached_processes),
            ("max_cached_assignments", max_cached_assignments),
            ("max_cached_bytes", max_cached_bytes),
        ):
            if type(bound) is not int or bound < 0:
                raise ValueError(f"{name} must be an int >= 0, not {bound!r}")
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Loaded processes, least recently looked up first (event-loop thread only).
        self.fast: FastPath = self  # answers from what it keeps in memory (or WouldBlock)
        self._procs: collections.OrderedDict[str, _Proc] = collections.OrderedDict()
        self._max_procs = max_cached_processes
        self._pins: dict[str, int] = {}
        # The assignment cache's order: (process, slot, CBOR size) as they came in,
        # oldest first. Entries whose slot has since left the process's dict (its
        # result was stored) stay until they reach the front; the bounds count
        # them, so the cache itself is within them too.
        self._cache_order: collections.deque[tuple[_Proc, int, int]] = collections.deque()
        self._cache_bytes = 0
        self._max_cached = max_cached_assignments
        self._max_cached_bytes = max_cached_bytes
        # Write-behind state (event-loop thread only).
        self._outbox: list[_Entry] = []
        self._flushing = False
        self._pending_count = 0
        self.backlogged = False  # _pending_count > _max_pending
        self._drained: trio.Event | None = None
        self._write_error: BaseException | None = None
        # Counters (commits is written by the I/O thread, read anywhere).
        self._commits = 0
        # Rows per INSERT statement, write jobs after the running one in its batch,
        # reads waiting: set by the I/O thread, read by its jobs.
        self._per_statement = 1
        self._writes_after = 0
        self._reads_waiting: collections.deque[_Job] = collections.deque()
        # The I/O thread's current round of jobs: when it started (0.0: none) and
        # an event set when it ends (see `_GILHandoff`).
        self._round_since = 0.0
        self._round_done = threading.Event()
        self._handoff = _GILHandoff(self)
        self._results_written = 0
        self._assignments_written = 0
        self._reads = 0

    def __repr__(self) -> str:
        state = "open" if self._thread is not None else "closed"
        return f"<SQLiteStore {self.path!r} {state}>"

    # lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the I/O thread and create or check the schema. Idempotent."""
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
            target=self._serve, args=(report,), name=f"hbtrio-sqlite:{self.path}", daemon=True
        )
        thread.start()
        trio.lowlevel.add_instrument(self._handoff)
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

    async def close(self) -> None:
        """Write everything pending, then stop the I/O thread and release the file.

        Cancellation stops the writing of what is pending (results are only
        written behind: they are recomputed when needed), never the stop: the
        thread is always joined, so the file is free when this returns.
        """
        thread = self._thread
        if thread is None:
            return
        try:
            await self.flush()
        finally:
            self._queue.put(_STOP)
            self._thread = None
            self._remove_handoff()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join)
            self._procs.clear()
            self._pins.clear()
            self._cache_order.clear()
            self._cache_bytes = 0

    def _remove_handoff(self) -> None:
        try:
            trio.lowlevel.remove_instrument(self._handoff)
        except (KeyError, RuntimeError):  # closed from another Trio run than it opened in
            pass

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=5.0,
            cached_statements=256,
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this hbtrio "
                    f"({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                # One transaction, so a crash leaves either no schema or all of it (or
                # the old version, not half of the new one).
                steps = (
                    _SCHEMA
                    if version == 0
                    else "".join(_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
                )
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{steps}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    # the I/O thread ---------------------------------------------------------------------------

    def _serve(self, report: Callable[[BaseException | None], None]) -> None:
        try:
            lock = FileLock.acquire(self.path)
        except BaseException as exc:
            report(exc)
            return
        try:
            conn = self._connect()
        except BaseException as exc:
            lock.release(remove_created=True)
            report(exc)
            return
        report(None)
        self._per_statement = _rows_per_statement(conn)
        writes: collections.deque[_Job] = collections.deque()
        reads: collections.deque[_Job] = collections.deque()
        self._reads_waiting = reads
        stopping = False
        try:
            while True:
                # Block only when there is nothing left to do.
                if not (writes or reads):
                    if stopping:
                        return
                    stopping = self._sort(self._queue.get(), writes, reads)
                self._round_done.clear()
                self._round_since = time.monotonic()
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
                self._round_since = 0.0
                self._round_done.set()
        finally:
            conn.close()
            lock.release()  # after the connection: its own locks must not be dropped

    @staticmethod
    def _sort(job: Any, writes: collections.deque[_Job], reads: collections.deque[_Job]) -> bool:
        """File a job from the queue under writes or reads; True for the stop sentinel."""
        if job is _STOP:
            return True
        (writes if job.write else reads).append(job)
        return False

    def _start(self, jobs: list[_Job]) -> list[_Job]:
        """Mark the jobs nobody withdrew as running; those are the ones to run."""
        with self._lock:
            jobs = [j for j in jobs if j.state == _PENDING]
            for j in jobs:
                j.state = _RUNNING
        return jobs

    def _run_reads(self, conn: sqlite3.Connection, reads: collections.deque[_Job]) -> None:
        """Run up to `_READS_PER_BATCH` reads, oldest first, each on its own (outside any
        write transaction: only committed data). Stops early once other jobs arrived
        and the reads have run for `_READS_FOR` (some read thousands of rows)."""
        done: list[_Job] = []
        started = time.monotonic()
        while reads and len(done) < _READS_PER_BATCH:
            job = reads.popleft()
            if not self._start([job]):
                continue  # withdrawn
            job.result = self._call(job, conn)
            done.append(job)
            if not self._queue.empty() and time.monotonic() - started > _READS_FOR:
                break
        self._deliver(done)

    def _call(self, j: _Job, conn: sqlite3.Connection) -> outcome.Outcome[Any]:
        try:
            return outcome.Value(j.fn(conn))
        except sqlite3.Error as exc:
            err = StoreError(f"{self.path}: {exc}")
            err.__cause__ = exc
            return outcome.Error(err)
        except Exception as exc:
            return outcome.Error(exc)

    def _others_waiting(self) -> bool:
        """Whether jobs other than the running one wait for this thread (I/O thread)."""
        return bool(self._writes_after or self._reads_waiting) or not self._queue.empty()

    def _run_writes(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
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
                self._commits += 1
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK") if conn.in_transaction else None
                for j in writes:
                    if isinstance(j.result, outcome.Value):
                        err = StoreError(f"commit to {self.path} failed: {exc}")
                        err.__cause__ = exc
                        j.result = outcome.Error(err)
        self._deliver(writes)

    def _deliver(self, jobs: list[_Job]) -> None:
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

    def _fail_writes(self, writes: list[_Job], failed: outcome.Outcome[Any] | None) -> None:
        """The batch's transaction is gone: no write of it happened, whatever it returned."""
        cause = failed.error if isinstance(failed, outcome.Error) else None
        for w in writes:
            if w.result is None or isinstance(w.result, outcome.Value):
                err = StoreError(f"{self.path}: the transaction was rolled back: {cause}")
                err.__cause__ = cause.__cause__ if isinstance(cause, StoreError) else cause
                w.result = outcome.Error(err)

    # submitting jobs (event-loop thread) -------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        if self._thread is None:
            raise StoreError(f"{self!r} is not open")
        if not self._round_since:
            # The thread's next round starts now: it may need a while to get the GIL.
            self._round_done.clear()
            self._round_since = time.monotonic()
        self._queue.put(job)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        """Run ``fn(conn)`` on the I/O thread and return its result. Always checkpoints."""
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, write, task=trio.lowlevel.current_task())
        self._submit(job)

        def abort(_: object) -> trio.lowlevel.Abort:
            with self._lock:
                if job.state == _PENDING:
                    job.state = _WITHDRAWN
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def _proc(self, pid: str) -> _Proc | None:
        proc = self._procs.get(pid)
        if proc is not None:
            self._procs.move_to_end(pid)
            return proc

        def load(
            conn: sqlite3.Connection,
        ) -> tuple[int, Message, int, int, Message | None, int] | None:
            # One statement (one step for the I/O thread), subqueries on the keys.
            row = conn.execute(_LOAD_PROCESS, (pid,)).fetchone()
            if row is None:
                return None
            rowid, definition, latest, last, high = row
            high = -1 if high is None else high
            latest = -1 if latest is None else latest
            # Not computed yet, the latest assignment is read next (its hash chain
            # continues the schedule): keep it rather than come back for it.
            tail = None
            if latest > high:
                try:
                    tail = decode(last)
                    _check_assignment(tail, pid, latest)
                except InvalidMessage:
                    tail = None  # read again, and reported, by whoever needs it
            return rowid, decode(definition), latest, high, tail, len(last or b"")

        self._reads += 1
        found = await self._run(load, write=False)
        if found is None:
            return None
        proc = self._procs.get(pid)  # loaded by another task while we waited
        if proc is None:
            rowid, definition, latest, high, tail, size = found
            proc = self._adopt(pid, _Proc(rowid, definition, latest, high, latest + 1))
            if tail is not None:
                self._cache(proc, latest, tail, size)
        return proc

    # what stays in memory -------------------------------------------------------------------------

    def _adopt(self, pid: str, proc: _Proc) -> _Proc:
        """Keep a newly loaded process, evicting others beyond the bound."""
        self._procs[pid] = proc
        if len(self._procs) > self._max_procs:
            self._trim_procs()
        return proc

    def _evictable(self, pid: str, proc: _Proc) -> bool:
        return not (proc.pending or proc.pending_snapshots or proc.busy or pid in self._pins)

    def _trim_procs(self) -> None:
        """Evict the least recently looked-up processes that can go, down to the bound.

        Looks at a few more entries than it must evict: those that cannot go
        (pinned, results waiting, a call in flight) move to the back.
        """
        procs = self._procs
        excess = len(procs) - self._max_procs
        for _ in range(min(len(procs), excess + 16)):
            if excess <= 0:
                return
            pid, proc = next(iter(procs.items()))
            if self._evictable(pid, proc):
                del procs[pid]
                # Its cached assignments go; entries in the cache's order become stale.
                proc.assignments.clear()
                excess -= 1
            else:
                procs.move_to_end(pid)

    def _cache(self, proc: _Proc, slot: int, assignment: Message, size: int) -> None:
        """Keep an assignment in memory until its result is stored, within the bounds."""
        proc.assignments[slot] = assignment
        self._cache_order.append((proc, slot, size))
        self._cache_bytes += size
        order = self._cache_order
        while order and (
            len(order) > self._max_cached or self._cache_bytes > self._max_cached_bytes
        ):
            old, old_slot, old_size = order.popleft()
            self._cache_bytes -= old_size
            if old.assignments.pop(old_slot, None) is not None and old_slot >= old.appended_from:
                old.appended_from = old_slot + 1  # the slots below it went before it

    def pin(self, pid: str) -> None:
        self._pins[pid] = self._pins.get(pid, 0) + 1

    def unpin(self, pid: str) -> None:
        left = self._pins.pop(pid, 0) - 1
        if left > 0:
            self._pins[pid] = left
        elif len(self._procs) > self._max_procs:
            self._trim_procs()

    def _loaded(self, pid: str) -> _Proc:
        proc = self._procs.get(pid)
        if proc is None:
            raise StoreError(f"process {pid} is not loaded in {self!r}")
        return proc

    # processes ----------------------------------------------------------------------------------

    async def put_process(self, pid: str, definition: Message, assignment: Message) -> bool:
        def put(conn: sqlite3.Connection) -> int | None:
            # Encoded here, on the I/O thread (a large message in pieces, so that the
            # event loop gets the GIL in between).
            row = _encode_large(assignment)
            cur = conn.execute(
                "INSERT OR IGNORE INTO processes (pid, definition) VALUES (?, ?)",
                (pid, _encode_large(definition)),
            )
            if cur.rowcount == 0:
                return None
            conn.execute(
                "INSERT INTO assignments (proc, slot, message_id, assignment) VALUES (?, 0, ?, ?)",
                (cur.lastrowid, assignment["message-id"], row),
            )
            sizes[0] = len(row)
            return cur.lastrowid

        sizes = [0]
        rowid = await self._run(put, write=True)
        if rowid is None:
            return False
        self._assignments_written += 1
        if pid not in self._procs:  # (unless loaded meanwhile, from the commit just made)
            proc = self._adopt(pid, _Proc(rowid, definition, 0, -1, 0))
            self._cache(proc, 0, assignment, sizes[0])
        return True

    async def get_process(self, pid: str) -> Message | None:
        proc = await self._proc(pid)
        return None if proc is None else proc.definition

    def get_process_nowait(self, pid: str) -> Message | None:
        proc = self._procs.get(pid)
        if proc is None:
            raise trio.WouldBlock
        self._procs.move_to_end(pid)
        return proc.definition

    # assignments --------------------------------------------------------------------------------

    async def append_assignments(self, pid: str, assignments: Sequence[Message]) -> None:
        proc = await self._proc(pid)
        if proc is None:
            raise StoreError(f"process {pid} is not in the store")
        if not assignments:
            return
        first = assignments[0]["slot"]
        for offset, a in enumerate(assignments):
            if a["slot"] != first + offset:
                raise StoreError(
                    f"assignment for slot {a['slot']} does not follow slot {first + offset - 1}"
                )

        def append(conn: sqlite3.Connection) -> list[int]:
            # Encoded here, on the I/O thread, and a large one in pieces: it takes tens
            # of ms, and the event loop gets the GIL between pieces.
            rows = [(proc.rowid, a["slot"], a["message-id"], _encode_large(a)) for a in assignments]
            (latest,) = conn.execute(
                "SELECT MAX(slot) FROM assignments WHERE proc = ?", (proc.rowid,)
            ).fetchone()
            if latest != first - 1:
                raise StoreError(f"assignment for slot {first} does not follow slot {latest}")
            _insert_rows(conn, _INSERT_ASSIGNMENTS, 4, rows, self._per_statement)
            return [len(row[3]) for row in rows]

        proc.busy += 1  # not evicted while the append is in flight: we update it after
        try:
            sizes: list[int] = await self._run(append, write=True)
        finally:
            proc.busy -= 1
        self._assignments_written += len(assignments)
        proc.latest = max(proc.latest, assignments[-1]["slot"])
        for a, size in zip(assignments, sizes, strict=True):
            self._cache(proc, a["slot"], a, size)

    async def latest_slot(self, pid: str) -> int:
        proc = await self._proc(pid)
        return -1 if proc is None else proc.latest

    async def get_assignments(self, pid: str, start: int, stop: int) -> list[Message]:
        proc = await self._proc(pid)
        if proc is None:
            return []
        start, stop = max(start, 0), min(stop, proc.latest + 1)
        if start >= stop:
            return []
        cache = proc.assignments
        if all(s in cache for s in (start, stop - 1)) and all(
            s in cache for s in range(start, stop)
        ):
            found = [cache[s] for s in range(start, stop)]  # now: the cache may evict them
            await trio.lowlevel.checkpoint()
            return found
        rowid = proc.rowid
        self._reads += 1
        return await self._run(  # type: ignore[no-any-return]
            lambda conn: _read_assignments(conn, rowid, pid, start, stop), write=False
        )

    def get_assignments_nowait(self, pid: str, start: int, stop: int) -> list[Message]:
        proc = self._procs.get(pid)
        if proc is None:
            raise trio.WouldBlock
        if start > proc.latest:
            return []
        cache = proc.assignments
        out: list[Message] = []
        for slot in range(max(start, 0), min(stop, proc.latest + 1)):
            found = cache.get(slot)
            if found is None:
                if not out:
                    raise trio.WouldBlock
                break
            out.append(found)
        return out

    # results and snapshots ------------------------------------------------------------------------

    def put_results_nowait(self, pid: str, results: Sequence[SlotResult]) -> None:
        proc = self._loaded(pid)
        pending, snaps, cache, outbox = (
            proc.pending,
            proc.pending_snapshots,
            proc.assignments,
            self._outbox,
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
        self._added(len(results))

    def put_states_nowait(
        self, pid: str, first: int, states: Sequence[Message], snapshot_every: int
    ) -> None:
        proc = self._loaded(pid)
        n = len(states)
        last = first + n - 1
        slots = range(first, last + 1)
        proc.pending.update(zip(slots, states, strict=True))
        cache = proc.assignments
        if cache:
            for slot in slots:
                cache.pop(slot, None)
        start = (-first) % snapshot_every
        proc.pending_snapshots.update(
            zip(
                range(first + start, last + 1, snapshot_every),
                states[start::snapshot_every],
                strict=True,
            )
        )
        proc.result_high = max(proc.result_high, last)
        self._outbox.append((proc, first, states, snapshot_every))
        self._added(n)

    def _added(self, n: int) -> None:
        """``n`` more results wait to be written: count them, and see that a flush is on its way."""
        self._pending_count += n
        self._results_written += n
        if self._pending_count > self._max_pending:
            self.backlogged = True
        self._kick()

    def _take_batch(self) -> list[_Entry]:
        """The oldest entries of the outbox, at most `_FLUSH_ROWS` rows (a run may be split)."""
        outbox, rows, i = self._outbox, 0, 0
        while i < len(outbox) and rows < _FLUSH_ROWS:
            entry = outbox[i]
            if len(entry) == 4:  # a run of states
                proc, first, states, every = entry
                room = _FLUSH_ROWS - rows
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

    def _kick(self) -> None:
        """Queue one flush job for the outbox unless one is already on its way.

        The job writes the outbox in pieces of at most `_FLUSH_ROWS` rows and
        stops after a piece once another job waits for the I/O thread: alone,
        a backlog goes in one transaction; a schedule queued behind it waits
        for one piece at most. What it did not write goes back to the outbox
        when it commits, and the next job is queued then.
        """
        if self._flushing or not self._outbox or self._thread is None:
            return
        pieces: list[list[_Entry]] = []
        while self._outbox and len(pieces) < _FLUSH_PIECES:
            pieces.append(self._take_batch())
        self._flushing = True

        def write(conn: sqlite3.Connection) -> int:
            per_statement, written = self._per_statement, 0
            for piece in pieces:
                if written and self._others_waiting():
                    break
                results, flags, snaps = _encode_batch(piece)
                _insert_rows(conn, _INSERT_RESULTS, 4, results, per_statement)
                if flags:
                    conn.executemany(
                        "UPDATE results SET snapshot = 1 WHERE proc = ? AND slot = ?", flags
                    )
                _insert_rows(conn, _INSERT_SNAPSHOTS, 3, snaps, per_statement)
                written += 1
            return written

        def done(result: outcome.Outcome[Any]) -> None:
            self._flushing = False
            if isinstance(result, outcome.Error):
                # Keep everything pending (still readable) and retry on the next kick or flush.
                self._write_error = result.error
                self._outbox[:0] = [e for piece in pieces for e in piece]
            else:
                self._write_error = None
                written = result.unwrap()
                self._outbox[:0] = [e for piece in pieces[written:] for e in piece]
                self._committed([e for piece in pieces[:written] for e in piece])
                self._kick()
            if self._drained is not None and (
                self._pending_count <= self._max_pending // 2 or self._write_error is not None
            ):
                self._drained.set()
                self._drained = None

        self._submit(_Job(write, True, callback=done))

    def _committed(self, batch: list[_Entry]) -> None:
        """A flush committed: its entries leave the pending tables (unless replaced since)."""
        for entry in batch:
            if len(entry) == 4:
                run_proc, first, states, every = entry
                self._pending_count -= len(states)
                pending, snaps = run_proc.pending, run_proc.pending_snapshots
                for slot, run_state in enumerate(states, first):
                    if pending.get(slot) is run_state:
                        del pending[slot]
                        if slot % every == 0 and snaps.get(slot) is run_state:
                            del snaps[slot]
                continue
            proc, slot, state, _snapshot, is_snap = entry
            if state is not None:
                self._pending_count -= 1
                if proc.pending.get(slot) is state:
                    del proc.pending[slot]
            if is_snap:
                proc.pending_snapshots.pop(slot, None)
        self.backlogged = self._pending_count > self._max_pending
        if len(self._procs) > self._max_procs:  # some may have waited only for this commit
            self._trim_procs()

    async def wait_writable(self) -> None:
        """Block while more than ``max_pending`` results wait for the disk.

        Not a checkpoint when nothing needs to wait. Once it blocked, it returns
        when at most half that many wait (and the count is still within the
        bound: every waiter checks again, so they go on one at a time).
        """
        while self._pending_count > self._max_pending:
            if self._drained is None:
                self._drained = trio.Event()
            drained = self._drained
            self._kick()  # (re)tries a failed write: only a fresh failure is reported
            await drained.wait()
            if self._write_error is not None:
                raise StoreError(
                    f"writing results to {self.path} failed: {self._write_error}"
                ) from self._write_error

    async def flush(self) -> None:
        """Return once every result and snapshot stored so far is durable. Checkpoints."""
        if self._thread is None:
            await trio.lowlevel.checkpoint()
            return
        self._kick()
        # Jobs run in order: once this no-op write commits, earlier batches have too.
        while True:
            await self._run(lambda conn: None, write=True)
            if not self._flushing and not self._outbox:
                break
            if self._write_error is not None and not self._flushing:
                self._kick()
                await self._run(lambda conn: None, write=True)
                if self._write_error is not None:
                    raise StoreError(
                        f"writing to {self.path} failed: {self._write_error}"
                    ) from self._write_error

    def get_result_nowait(self, pid: str, slot: int) -> Message | None:
        proc = self._procs.get(pid)
        if proc is None:
            raise trio.WouldBlock
        found = proc.pending.get(slot)
        if found is not None:
            return found
        if slot > proc.result_high:
            return None
        raise trio.WouldBlock

    async def get_result(self, pid: str, slot: int) -> Message | None:
        proc = await self._proc(pid)
        if proc is None:
            return None
        try:
            found = self.get_result_nowait(pid, slot)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.checkpoint()
            return found
        rowid = proc.rowid

        def read(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(
                "SELECT state FROM results WHERE proc = ? AND slot = ?", (rowid, slot)
            ).fetchone()
            return None if row is None else decode(row[0])

        self._reads += 1
        return await self._run(read, write=False)  # type: ignore[no-any-return]

    async def latest_snapshot(
        self, pid: str, at_most: int, *, read_to: int = 0
    ) -> tuple[int, Message] | None:
        """The latest snapshot at or below ``at_most``; with ``read_to``, in the same job on
        the I/O thread, the assignments after it up to that slot (at most `READ_AHEAD`) are
        read into memory (those of a process loaded from the file: the ones appended
        through this store are there already), for the fast path to answer the reads
        that follow. A failure to read them ahead is left to those reads. Blocks;
        cancellation-safe.
        """
        proc = await self._proc(pid)
        if proc is None:
            return None
        # Taken now: the write-behind may commit it (and drop it from the pending
        # table) while we wait for the read below, which only looks above it.
        pending = _pending_snapshot(proc, at_most)
        above, rowid = -1 if pending is None else pending[0], proc.rowid
        # Slots appended through this store are in memory until they are computed.
        from_file = min(proc.latest + 1, proc.appended_from)

        def read(
            conn: sqlite3.Connection,
        ) -> tuple[tuple[int, Message] | None, list[Message], list[int]]:
            found = _read_snapshot(conn, rowid, at_most, above)
            first = (max(above, 0) if found is None else found[0]) + 1
            end = min(from_file, read_to, first + READ_AHEAD)
            sizes: list[int] = []
            if first >= end:
                return found, [], sizes
            try:
                return found, _read_assignments(conn, rowid, pid, first, end, sizes), sizes
            except (sqlite3.Error, InvalidMessage):
                return found, [], []  # only a read-ahead: the reads that follow report it

        self._reads += 1
        found, ahead, sizes = await self._run(read, write=False)
        if ahead and self._procs.get(pid) is proc:
            for assignment, size in zip(ahead, sizes, strict=True):
                if assignment["slot"] not in proc.assignments:
                    self._cache(proc, assignment["slot"], assignment, size)
        return pending if found is None else found

    def latest_snapshot_nowait(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        raise trio.WouldBlock  # a snapshot may be on disk only

    def pending_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        if self.get_result_nowait(pid, slot) is not None:
            return None
        found = self.get_assignments_nowait(pid, slot, slot + 1)
        return found[0] if found else None

    def put_state_nowait(self, pid: str, slot: int, state: Message, snapshot: bool) -> None:
        self.put_results_nowait(pid, [(slot, state, state if snapshot else None)])

    # blobs ----------------------------------------------------------------------------------------

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        """Store a blob, durably (committed) before it returns; idempotent.

        Written on the I/O thread in the next group commit, and not kept in
        memory. Blocks; cancellation-safe (a job that has not started is
        withdrawn).
        """

        def put(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO blobs (id, data) VALUES (?, ?)", (blob_id, data))

        await self._run(put, write=True)

    async def get_blob(self, blob_id: str) -> bytes | None:
        """The blob's bytes, or ``None``; `StoreError` if the row does not hash to its ID.

        Read and checked on the I/O thread (SQLite keeps no checksums: a
        damaged row is refused, not handed out). Blocks; cancellation-safe.
        """
        path = self.path

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT data FROM blobs WHERE id = ?", (blob_id,)).fetchone()
            if row is None:
                return None
            data = row[0]
            if type(data) is not bytes or id_of_bytes(data) != blob_id:
                raise StoreError(
                    f"{path}: blob {blob_id} does not match its ID (the store file is damaged)"
                )
            return data

        self._reads += 1
        return await self._run(read, write=False)  # type: ignore[no-any-return]

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            commits=self._commits,
            pending_results=self._pending_count,
            results_written=self._results_written,
            assignments_written=self._assignments_written,
            reads=self._reads,
        )


# reads shared by several jobs ------------------------------------------------------------------


def _pending_snapshot(proc: _Proc, at_most: int) -> tuple[int, Message] | None:
    """The latest snapshot at or below ``at_most`` still waiting to be written (event loop)."""
    best = max((s for s in proc.pending_snapshots if s <= at_most), default=-1)
    return None if best < 0 else (best, proc.pending_snapshots[best])


def _read_snapshot(
    conn: sqlite3.Connection, rowid: int, at_most: int, above: int
) -> tuple[int, Message] | None:
    """The latest durable snapshot with ``above < slot <= at_most`` (I/O thread)."""
    args = (rowid, at_most, above)
    flagged = conn.execute(
        "SELECT slot, state FROM results WHERE proc = ? AND snapshot = 1"
        " AND slot <= ? AND slot > ? ORDER BY slot DESC LIMIT 1",
        args,
    ).fetchone()
    own = conn.execute(
        "SELECT slot, snapshot FROM snapshots WHERE proc = ?"
        " AND slot <= ? AND slot > ? ORDER BY slot DESC LIMIT 1",
        args,
    ).fetchone()
    row = max((r for r in (flagged, own) if r is not None), default=None)
    return None if row is None else (row[0], decode(row[1]))


_READ_RUN: Final = (
    "SELECT COUNT(*), TOTAL(LENGTH(assignment)), CAST(GROUP_CONCAT(assignment, '') AS BLOB),"
    " GROUP_CONCAT(LENGTH(assignment))"
    " FROM (SELECT assignment FROM assignments"
    " WHERE proc = ? AND slot >= ? AND slot < ? ORDER BY slot)"
)


def _read_assignments(
    conn: sqlite3.Connection,
    rowid: int,
    pid: str,
    start: int,
    stop: int,
    sizes: list[int] | None = None,
) -> list[Message]:
    """The stored assignments for slots ``start..stop-1``, in order, checked (I/O thread).

    Each is checked against its message ID (`_check_assignment`): a damaged
    row raises `InvalidMessage` instead of being computed as it is.

    All of them in one row (their bytes joined by SQLite), so reading a run
    takes the GIL back twice instead of once per row (see `_insert_rows`).
    Unless that decodes into the messages expected, the rows are read again
    one by one and decoded as they would be alone.
    """
    count, size, joined, lengths = conn.execute(_READ_RUN, (rowid, start, stop)).fetchone()
    if count == 0:
        return []
    run: list[Message] | None = None
    rows: Sequence[bytes | memoryview] = ()
    if joined is not None and len(joined) == size:
        run = [decode(joined)] if count == 1 else _decode_joined(joined, count, start)
        if run is not None:
            rows = _split(joined, lengths)
    if run is None:
        blobs: list[bytes] = [
            r[0]
            for r in conn.execute(
                "SELECT assignment FROM assignments"
                " WHERE proc = ? AND slot >= ? AND slot < ? ORDER BY slot",
                (rowid, start, stop),
            ).fetchall()
        ]
        run, rows = _decode_run(blobs, start), blobs
    _check_run(run, rows, pid, start)
    if sizes is not None:
        sizes.extend(len(row) for row in rows)
    return run


def _check_run(
    run: list[Message], rows: Sequence[bytes | memoryview], pid: str, first: int
) -> None:
    """Check each assignment of a run read from the file against its message ID, quickly.

    The quick check hashes the body's bytes in place in the stored row (see
    `_BODY_FIRST`), about 1 us a row; a row that fails it gets the thorough
    `_check_assignment`, which raises `InvalidMessage` for a damaged one.
    """
    sha256, b2a, head, skip = hashlib.sha256, binascii.b2a_base64, _BODY_FIRST, len(_BODY_FIRST)
    for slot, assignment, row in zip(itertools.count(first), run, rows):
        get = assignment.get
        mid, stamp = get("message-id"), get("timestamp")
        if (
            get("slot") == slot
            and get("process") == pid
            and type(mid) is str
            and type(stamp) is int
            and stamp >= 0
            and row[:skip] == head
        ):
            end = len(row) - _TAIL - _uint_size(slot) - _uint_size(stamp)
            digest = sha256(row[skip:end]).digest()
            if b2a(digest, newline=False)[:43].translate(_URLSAFE) == mid.encode():
                continue
        _check_assignment(assignment, pid, slot)


def _split(joined: bytes, lengths: str) -> list[memoryview]:
    """The rows in ``joined``, of the (comma-separated) ``lengths``: views, no copies."""
    view, offset, rows = memoryview(joined), 0, []
    for length in map(int, lengths.split(",")):
        rows.append(view[offset : offset + length])
        offset += length
    return rows


#: A stored assignment's bytes open with this: a map of six entries whose first
#: key, in canonical order, is "body". So the body's canonical encoding is a run of
#: the row's bytes, after this and before the other entries, whose size the decoded
#: integers tell (`_TAIL`): hashing that run in place checks the row against its
#: message ID without encoding anything.
_BODY_FIRST: Final = b"\xa6\x64body"
#: The bytes after the body in a stored assignment, but for its two integers:
#: the keys "slot", "process", "timestamp", "hash-chain", "message-id" and the
#: three 43-character IDs.
_TAIL: Final = 5 + 8 + 45 + 10 + 11 + 45 + 11 + 45


def _uint_size(n: int) -> int:
    """Bytes of a CBOR unsigned integer's canonical encoding."""
    if n >= 1 << 32:  # every timestamp in ms since 1970-02-19
        return 9
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5


#: Standard base64 to base64url (the message-ID alphabet).
_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def _check_assignment(assignment: Message, pid: str, slot: int) -> None:
    """Raise `InvalidMessage` unless a stored assignment is the one that was stored.

    Its body must hash to its message ID, and its process and slot must be the
    row's: a flipped byte in the file (SQLite keeps no checksums) is reported,
    not computed. The thorough check (one canonical encoding and one SHA-256,
    about 3 us for a small body): rows read from the file pass the quick one in
    `_check_run` unless they are damaged.
    """
    body = assignment.get("body")
    if (
        assignment.get("process") != pid
        or assignment.get("slot") != slot
        or not isinstance(body, Message)
        or _id_of(body) != assignment.get("message-id")
    ):
        raise InvalidMessage(
            f"slot {slot} of process {pid}: the stored assignment does not match its message "
            "ID (the store file is damaged)"
        )


def _id_of(body: Message) -> str:
    try:
        return id_of_bytes(encode(body))
    except InvalidMessage:
        return ""


def _decode_joined(data: bytes, count: int, first: int) -> list[Message] | None:
    """``count`` stored assignments for slots ``first, first + 1, ...`` from their joined
    bytes, in one cbor2 call (behind a CBOR array header); ``None`` unless each item is
    a message with the slot expected."""
    head = b"\x9a" + count.to_bytes(4, "big")  # an array of that many items
    try:
        run = cbor2.loads(head + data, object_hook=_adopt_map)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError):
        return None
    if all(type(m) is _Frozen and m.get("slot") == s for s, m in enumerate(run, first)):
        return run  # type: ignore[no-any-return]
    return None


def _decode_run(blobs: list[bytes], first: int) -> list[Message]:
    """Decode stored assignments for slots ``first, first + 1, ...`` like `decode_trusted`.

    In one cbor2 call (`_decode_joined`): row by row, the calls alone cost
    about a tenth of the time. Unless that gives one message per row with the
    slots expected, the rows are decoded one by one, which reports a bad row
    as `decode_trusted` does.
    """
    if len(blobs) > 1:
        run = _decode_joined(b"".join(blobs), len(blobs), first)
        if run is not None:
            return run
    return [decode(blob) for blob in blobs]


# writes (I/O thread) ---------------------------------------------------------------------------


def _encode_batch(
    batch: list[_Entry],
) -> tuple[list[tuple[int, int, bytes, int]], list[tuple[int, int]], list[tuple[int, int, bytes]]]:
    """The rows of a write-behind batch: results, snapshot flags, snapshots of their own."""
    results: list[tuple[int, int, bytes, int]] = []
    flags: list[tuple[int, int]] = []
    snaps: list[tuple[int, int, bytes]] = []
    for entry in batch:
        if len(entry) == 4:  # a run of states that are their own snapshots
            run_proc, first, states, every = entry
            rowid = run_proc.rowid
            for slot, run_state in enumerate(states, first):
                try:
                    results.append((rowid, slot, encode_plain(run_state), int(slot % every == 0)))
                except InvalidMessage as exc:
                    log.error("slot %d of process #%d cannot be stored: %s", slot, rowid, exc)
            continue
        # snapshot None with is_snap: the slot's result is its snapshot (a flag, no copy).
        proc, slot, state, snapshot, is_snap = entry
        rowid = proc.rowid
        try:
            if state is not None:
                flag = 1 if is_snap and snapshot is None else 0
                results.append((rowid, slot, encode_plain(state), flag))
            elif is_snap and snapshot is None:
                flags.append((rowid, slot))
            if is_snap and snapshot is not None:
                snaps.append((rowid, slot, encode_plain(snapshot)))
        except InvalidMessage as exc:
            # Cannot happen for validated states; if it does, this one row is
            # not written (it is recomputed when needed), and no other row waits.
            log.error("slot %d of process #%d cannot be stored: %s", slot, rowid, exc)
    return results, flags, snaps


def _rows_per_statement(conn: sqlite3.Connection) -> int:
    """Rows of four values one statement may bind here: a power of two, at most 1024."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    rows = _MAX_ROWS_PER_STATEMENT
    while rows > 1 and rows * 4 > limit:
        rows //= 2
    return rows


_VALUES: dict[tuple[str, int, int], str] = {}


def _values_sql(head: str, width: int, rows: int) -> str:
    """``head`` followed by ``rows`` groups of ``width`` placeholders (made once, then reused)."""
    key = (head, width, rows)
    sql = _VALUES.get(key)
    if sql is None:
        group = "(" + ", ".join(["?"] * width) + ")"
        sql = _VALUES[key] = head + ", ".join([group] * rows)
    return sql


def _insert_rows(
    conn: sqlite3.Connection,
    head: str,
    width: int,
    rows: Sequence[tuple[Any, ...]],
    per_statement: int,
) -> None:
    """Insert ``rows`` with as few statements as SQLite allows (I/O thread).

    sqlite3 releases the GIL around each step of a statement, which is once
    per row of an ``executemany``; while the event loop keeps the interpreter
    busy, taking the GIL back can cost this thread a switch interval (5 ms)
    each time. A statement of many rows is one step. Row counts are powers of
    two (full statements, then the binary digits of the rest), so only a few
    distinct statements are ever prepared, and sqlite3 caches them.
    """
    n, done = len(rows), 0
    full = n // per_statement
    if full:
        flat = list(itertools.chain.from_iterable(rows[: full * per_statement]))
        step = per_statement * width
        conn.executemany(
            _values_sql(head, width, per_statement),
            [flat[k : k + step] for k in range(0, len(flat), step)],
        )
        done = full * per_statement
    size = per_statement
    while done < n:
        while size > n - done:
            size //= 2
        part = list(itertools.chain.from_iterable(rows[done : done + size]))
        conn.execute(_values_sql(head, width, size), part)
        done += size
