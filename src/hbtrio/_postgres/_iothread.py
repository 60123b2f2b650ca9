"""The data thread: one connection, jobs in rounds, group commit behind a fence.

Theory of operation
-------------------
All reads and writes of processes, assignments, results, snapshots and
blobs run on one dedicated thread (`DataThread`) that owns one connection;
the event loop never touches it. Callers submit jobs and park, as with the
SQLite store's I/O thread (``hbtrio._sqlite._iothread``), and the thread
works in rounds: every write job waiting goes into one transaction with one
commit (group commit), then a few reads run on their own (autocommit: they
see committed data only). One wake-up of the loop per round hands back every
outcome.

The fence. A write job names the processes it writes and the epoch it
writes each under (`Job.fence`: ``(row ID, epoch)`` pairs, taken when the
job was made). The round's transaction first locks the owner rows of all of
them ``FOR SHARE`` (``_rows.check_fence``) and compares: a pair whose epoch
is no longer the process's, or whose owner is no longer this node, is
refused. A job all of whose pairs are refused fails with `StoreFenced`
without running; a job that writes several processes (the write-behind) is
told which pairs were refused and writes the others. The locks are held to
the commit, so a takeover either commits before the round's check (which
then refuses) or waits for the commit (and then sees what it wrote).

Work that does not need the transaction (encoding rows) runs before it
(`Job.prepare`), so a transaction is a few statements and holds its locks
for a few round trips. A write job that fails in Python leaves nothing
behind: each job does its checks before it writes. A database error aborts
the transaction: with more than one job in it, each job is run again in a
transaction of its own, so one bad job does not fail the others. A lost
connection fails the round's jobs with `StoreError` and the next round
connects again.

Cancellation, as for SQLite: a job that has not started is withdrawn; one
already running completes and its caller gets the result.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import outcome
import psycopg
import trio

from .._exceptions import StoreError, StoreFenced
from .._sqlite._iothread import _GILHandoff
from ._rows import check_fence

__all__ = ["DataThread", "Job"]

_PENDING, _RUNNING, _WITHDRAWN = 0, 1, 2

#: Most write jobs in one transaction.
_WRITES_PER_BATCH: Final = 1024
#: Most read jobs between two looks at the queue for writes ...
READS_PER_BATCH: Final = 32
#: ... or fewer, once jobs wait and the reads have run this long (seconds).
_READS_FOR: Final = 0.002
#: Seconds between two attempts to connect while the server cannot be reached.
_RECONNECT_EVERY: Final = 0.2

Conn = psycopg.Connection[Any]
#: ``(row ID, epoch, process ID)``: a process a write job writes, under that epoch.
FencePair = tuple[int, int, str]


@attrs.define(eq=False)
class Job:
    """A function of the connection to run on the data thread, and who gets its outcome.

    A write job's ``fn`` takes the connection and the refused pairs (a dict
    ``(row ID, epoch) -> owner URL``); a read job's takes the connection.
    """

    fn: Callable[..., Any]
    write: bool
    fence: tuple[FencePair, ...] = ()
    #: Run on the data thread before the round's transaction (encoding rows).
    prepare: Callable[[], None] | None = None
    #: A job whose every pair is refused fails with `StoreFenced` without running;
    #: with False it runs anyway, told what was refused (the write-behind).
    refuse_whole: bool = True
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


class DataThread:
    """The thread that owns the data connection, and the queue of jobs it runs.

    ``connect`` makes a connection (blocking); ``node`` is the incarnation the
    fence checks ownership for (set before the first write). `start` and
    `stop` run on the event loop; jobs are submitted there and their outcomes
    delivered there.
    """

    def __init__(self, where: str, owner: object, connect: Callable[[], Conn]) -> None:
        self.where = where
        self.owner = owner
        self._connect = connect
        self.node = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._conn: Conn | None = None
        self._next_connect = 0.0
        #: Transactions committed, and writes refused by the fence (written by the thread).
        self.commits = 0
        self.fenced_jobs = 0
        #: Test hook: called on the thread inside each write transaction, after the fence
        #: (a test pauses there to hold the owner rows' locks).
        self.in_transaction: Callable[[], None] | None = None
        self._writes_after = 0
        self._reads_waiting: collections.deque[Job] = collections.deque()
        # For `_GILHandoff`: when the current round started (0.0: none), and its end.
        self.round_since = 0.0
        self.round_done = threading.Event()
        self.handoff = _GILHandoff(self)  # type: ignore[arg-type]

    @property
    def running(self) -> bool:
        return self._thread is not None

    # lifecycle (event loop) ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread and connect. Raises `StoreError` (thread joined) if it cannot
        connect. Idempotent; not cancellable (a started thread is adopted or joined)."""
        if self._thread is not None:
            return
        self._token = trio.lowlevel.current_trio_token()
        self._queue = queue.SimpleQueue()
        token, ready, failed = self._token, trio.Event(), []

        def report(error: BaseException | None) -> None:
            if error is not None:
                failed.append(error)
            token.run_sync_soon(ready.set)

        thread = threading.Thread(
            target=self._serve, args=(report,), name=f"hbtrio-pg-data:{self.where}", daemon=True
        )
        thread.start()
        trio.lowlevel.add_instrument(self.handoff)
        with trio.CancelScope(shield=True):
            await ready.wait()
        if failed:
            self._remove_handoff()
            await trio.to_thread.run_sync(thread.join)
            error = failed[0]
            if isinstance(error, StoreError):
                raise error
            raise StoreError(f"cannot connect to {self.where}: {error}") from error
        self._thread = thread

    async def stop(self) -> None:
        """Let the thread finish the jobs queued, then join it (shielded). A no-op unless
        it runs."""
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
        except (KeyError, RuntimeError):
            pass

    # the thread ---------------------------------------------------------------------------------

    def _serve(self, report: Callable[[BaseException | None], None]) -> None:
        try:
            self._conn = self._connect()
        except BaseException as exc:
            report(exc)
            return
        report(None)
        writes: collections.deque[Job] = collections.deque()
        reads: collections.deque[Job] = collections.deque()
        self._reads_waiting = reads
        stopping = False
        try:
            while True:
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
                if writes:
                    batch = [writes.popleft() for _ in range(min(len(writes), _WRITES_PER_BATCH))]
                    self._run_writes(batch)
                if reads:
                    self._run_reads(reads)
                self.round_since = 0.0
                self.round_done.set()
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @staticmethod
    def _sort(job: Any, writes: collections.deque[Job], reads: collections.deque[Job]) -> bool:
        if job is _STOP:
            return True
        (writes if job.write else reads).append(job)
        return False

    def _start(self, jobs: list[Job]) -> list[Job]:
        with self._lock:
            jobs = [j for j in jobs if j.state == _PENDING]
            for j in jobs:
                j.state = _RUNNING
        return jobs

    def _connection(self) -> Conn:
        """The connection, made again if the last one broke (`StoreError` if it cannot be)."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            conn.close()
            self._conn = None
        if time.monotonic() < self._next_connect:
            raise StoreError(f"{self.where}: the connection was lost; connecting again shortly")
        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            self._next_connect = time.monotonic() + _RECONNECT_EVERY
            raise StoreError(f"cannot connect to {self.where}: {exc}") from exc
        return self._conn

    def _error(self, exc: BaseException) -> outcome.Error:
        if isinstance(exc, psycopg.Error):
            err = StoreError(f"{self.where}: {exc}".strip())
            err.__cause__ = exc
            return outcome.Error(err)
        if isinstance(exc, Exception):
            return outcome.Error(exc)
        raise exc

    def _run_reads(self, reads: collections.deque[Job]) -> None:
        done: list[Job] = []
        started = time.monotonic()
        while reads and len(done) < READS_PER_BATCH:
            job = reads.popleft()
            if not self._start([job]):
                continue
            try:
                job.result = outcome.Value(job.fn(self._connection()))
            except Exception as exc:
                job.result = self._error(exc)
            done.append(job)
            if not self._queue.empty() and time.monotonic() - started > _READS_FOR:
                break
        self._deliver(done)

    def others_waiting(self) -> bool:
        """Whether jobs other than the running one wait for this thread (data thread)."""
        return bool(self._writes_after or self._reads_waiting) or not self._queue.empty()

    def _run_writes(self, jobs: list[Job]) -> None:
        writes = self._start(jobs)
        if not writes:
            return
        for j in writes:
            if j.prepare is not None:
                try:
                    j.prepare()
                except Exception as exc:
                    j.result = self._error(exc)
        ready = [j for j in writes if j.result is None]
        if ready and not self._transaction(ready) and len(ready) > 1:
            for j in ready:  # one bad job must not fail the others: each on its own
                j.result = None
                self._transaction([j])
        self._deliver(writes)

    def _transaction(self, jobs: list[Job]) -> bool:
        """Run ``jobs`` in one transaction behind the fence; False if the transaction failed
        (every job then has that failure as its result)."""
        try:
            conn = self._connection()
        except StoreError as exc:
            for j in jobs:
                j.result = outcome.Error(exc)
            return False
        try:
            with conn.transaction():
                refused = check_fence(
                    conn, self.node, {(rowid, epoch) for j in jobs for rowid, epoch, _ in j.fence}
                )
                if self.in_transaction is not None:
                    self.in_transaction()
                for i, j in enumerate(jobs):
                    self._writes_after = len(jobs) - i - 1
                    if j.refuse_whole and j.fence and all((r, e) in refused for r, e, _ in j.fence):
                        self.fenced_jobs += 1
                        rowid, epoch, pid = j.fence[0]
                        owner = refused[rowid, epoch]
                        j.result = outcome.Error(
                            StoreFenced(
                                pid,
                                f"process {pid} is owned by another node now"
                                + (f" ({owner})" if owner else "")
                                + f": the write under epoch {epoch} was refused",
                                epoch=epoch,
                                owner=owner,
                            )
                        )
                        continue
                    if refused and any((r, e) in refused for r, e, _ in j.fence):
                        self.fenced_jobs += 1  # a job told which of its pairs were refused
                    try:
                        j.result = outcome.Value(j.fn(conn, refused))
                    except psycopg.Error:
                        raise  # the transaction is gone: every job fails (or runs alone)
                    except Exception as exc:
                        j.result = outcome.Error(exc)
            self.commits += 1
            return True
        except psycopg.Error as exc:
            failed = self._error(exc)
            for j in jobs:
                j.result = failed
            return False
        finally:
            self._writes_after = 0

    def _deliver(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        assert self._token is not None
        try:
            self._token.run_sync_soon(_deliver_all, jobs)
        except trio.RunFinishedError:  # pragma: no cover - the engine left without closing us
            pass

    # submitting jobs (event loop) ---------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; its outcome is delivered on the event loop. Never blocks.

        Raises `StoreError` when the thread does not run.
        """
        if self._thread is None:
            raise StoreError(f"{self.owner!r} is not open")
        if not self.round_since:
            self.round_done.clear()
            self.round_since = time.monotonic()
        self._queue.put(job)

    async def run(
        self,
        fn: Callable[..., Any],
        *,
        write: bool,
        fence: tuple[FencePair, ...] = (),
        prepare: Callable[[], None] | None = None,
    ) -> Any:
        """Run ``fn`` on the thread (see `Job`) and return its result. Always checkpoints.

        Cancellation-safe: a job that has not started is withdrawn (and
        `trio.Cancelled` raised); one that started completes, and its result
        is returned.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        job = Job(fn, write, fence, prepare, task=trio.lowlevel.current_task())
        self.submit(job)

        def abort(_: object) -> trio.lowlevel.Abort:
            with self._lock:
                if job.state == _PENDING:
                    job.state = _WITHDRAWN
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)
