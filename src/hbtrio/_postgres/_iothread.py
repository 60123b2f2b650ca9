"""The data thread: one connection, jobs in rounds, group commit behind a fence.

Theory of operation
-------------------
All reads and writes of processes, assignments, results, snapshots and
blobs run on one dedicated thread (`DataThread`) that owns one connection;
the event loop never touches it. Callers submit jobs and park, as with the
SQLite store's I/O thread (``hbtrio._iothread``), and the thread
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

The round loop, the hand-back of outcomes, the GIL hand-off and the
trio-facing submission and cancellation are the SQLite store's too
(``hbtrio._iothread.RoundThread``); this module holds what is
PostgreSQL's: reconnecting, the fence, and the transaction of a round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import attrs
import outcome
import psycopg
import trio

from .._exceptions import StoreError, StoreFenced
from .._iothread import READS_PER_BATCH, RoundThread
from .._iothread import Job as _Job
from ._link import Conn, Link, store_error
from ._rows import check_fence

__all__ = ["READS_PER_BATCH", "DataThread", "Job"]

#: Seconds between two attempts to connect while the server cannot be reached.
_RECONNECT_EVERY: Final = 0.2
#: ``(row ID, epoch, process ID)``: a process a write job writes, under that epoch.
FencePair = tuple[int, int, str]


@attrs.define(eq=False)
class Job(_Job):
    """A function of the connection to run on the data thread, and who gets its outcome.

    A write job's ``fn`` takes the connection and the refused pairs (a dict
    ``(row ID, epoch) -> owner URL``); a read job's takes the connection.
    """

    fence: tuple[FencePair, ...] = attrs.field(default=(), kw_only=True)
    #: Run on the data thread before the round's transaction (encoding rows).
    prepare: Callable[[], None] | None = attrs.field(default=None, kw_only=True)
    #: A job whose every pair is refused fails with `StoreFenced` without running;
    #: with False it runs anyway, told what was refused (the write-behind).
    refuse_whole: bool = attrs.field(default=True, kw_only=True)


class DataThread(RoundThread[None]):
    """The thread that owns the data connection, and the queue of jobs it runs.

    ``connect`` makes a connection (blocking); ``node`` is the incarnation the
    fence checks ownership for (set before the first write). `start` and
    `stop` run on the event loop; jobs are submitted there and their outcomes
    delivered there.
    """

    #: Most write jobs in one transaction.
    WRITES_PER_BATCH = 1024

    def __init__(self, where: str, owner: object, connect: Callable[[], Conn]) -> None:
        super().__init__(where, owner)
        self._link = Link(where, connect, retry_after=_RECONNECT_EVERY)
        self.node = 0
        #: Writes refused by the fence (written by the thread).
        self.fenced_jobs = 0
        #: Test hook: called on the thread inside each write transaction, after the fence
        #: (a test pauses there to hold the owner rows' locks).
        self.in_transaction: Callable[[], None] | None = None

    # lifecycle (event loop) ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread and connect. Raises `StoreError` (thread joined) if it cannot
        connect. Idempotent; not cancellable (a started thread is adopted or joined)."""
        await self._launch(
            self._open,
            name=f"hbtrio-pg-data:{self.where}",
            failure=f"cannot connect to {self.where}",
        )

    # the thread ---------------------------------------------------------------------------------

    def _open(self) -> None:
        self._link.open()

    def _close(self, conn: None) -> None:
        self._link.close()

    def _error(self, exc: BaseException) -> outcome.Error:
        if isinstance(exc, psycopg.Error):
            return outcome.Error(store_error(self.where, exc))
        if isinstance(exc, Exception):
            return outcome.Error(exc)
        raise exc

    def _read(self, job: _Job, conn: None) -> outcome.Outcome[Any]:
        try:
            return outcome.Value(job.fn(self._link.get()))
        except Exception as exc:
            return self._error(exc)

    def _run_writes(self, conn: None, jobs: list[_Job]) -> None:
        writes: list[Job] = self._start(jobs)  # type: ignore[assignment]
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
            conn = self._link.get()
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

    # submitting jobs (event loop) ---------------------------------------------------------------

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
        job = Job(fn, write, fence=fence, prepare=prepare, task=trio.lowlevel.current_task())
        return await self._wait(job)
