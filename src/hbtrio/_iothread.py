"""A store's I/O thread: one thread owns the connection and runs jobs in rounds.

Theory of operation
-------------------
Both database stores (``hbtrio._sqlite``, ``hbtrio._postgres``) do all their
database work on one dedicated thread that owns the connection; the event
loop never touches it. `RoundThread` is that thread's machinery, the same
for both; each store's subclass says how to connect, how to run a round's
writes (SQLite: savepoints in one transaction; PostgreSQL: one transaction
behind the fence) and how a database error reads.

Callers submit jobs (a function of the connection) to a queue and park. The
thread works in rounds: it takes every job waiting, runs the writes first
(up to the subclass's `RoundThread.WRITES_PER_BATCH`, handed to
`RoundThread._run_writes` together, so they share one commit: group commit),
then at most `READS_PER_BATCH` reads (fewer once other jobs wait and
`_READS_FOR` has passed), each on its own, so a durable write never waits
behind more than a few reads. It wakes the loop once per batch with every
outcome. Only the thread blocks: `submit` never does, `run` parks the
calling task.

The GIL. The database drivers release the GIL around their calls, and on a
loop that never sleeps each time the thread takes it back can cost seconds
(see `_GILHandoff`). So the thread takes it back as rarely as it can: a
round wakes the loop once, and a busy loop waits for a round that has run
long now and then (`_GILHandoff`).

Cancellation: a job that has not started is withdrawn (the call raises
`trio.Cancelled` and nothing was written); a job already running completes
and its caller gets the result (trio then raises the cancellation at the
caller's next checkpoint). Either way the store matches what the caller was
told. Starting and stopping the thread are shielded: a thread that started
is always either adopted or joined. The start (`launch`) and the withdrawable
wait (`wait_withdrawable`) serve the PostgreSQL store's control thread too
(``hbtrio._postgres._control``), which runs one job at a time between its
heartbeats rather than in rounds.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar, Final, Generic, TypeVar

import attrs
import outcome
import trio

from ._exceptions import StoreError

__all__ = ["READS_PER_BATCH", "Job", "RoundThread", "launch", "wait_withdrawable"]

_PENDING, _RUNNING, _WITHDRAWN = 0, 1, 2

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

C = TypeVar("C")


@attrs.define(eq=False)
class Job:
    """A function of the connection to run on the I/O thread, and who gets its outcome."""

    fn: Callable[..., Any]
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


def _deliver_all(jobs: Sequence[Job]) -> None:
    for j in jobs:
        j.deliver()


async def launch(
    serve: Callable[[Callable[[BaseException | None], None]], None], *, name: str, failure: str
) -> threading.Thread:
    """Start a daemon thread named ``name`` running ``serve(report)``, and return it once
    it serves.

    ``serve`` calls ``report(None)`` once it serves, or ``report(error)`` and
    returns if it cannot; the thread is joined then and `StoreError` raised
    (``error`` itself if it is one, else one reading ``failure: error``). Not
    cancellable: a thread that started is always either adopted or joined.
    """
    token, ready, failed = trio.lowlevel.current_trio_token(), trio.Event(), []

    def report(error: BaseException | None) -> None:  # called once, on the thread
        if error is not None:
            failed.append(error)
        token.run_sync_soon(ready.set)

    thread = threading.Thread(target=serve, args=(report,), name=name, daemon=True)
    thread.start()
    # Shielded: a thread that started is always either adopted or joined.
    with trio.CancelScope(shield=True):
        await ready.wait()
    if failed:
        await trio.to_thread.run_sync(thread.join)
        error = failed[0]
        if isinstance(error, StoreError):
            raise error
        raise StoreError(f"{failure}: {error}") from error
    return thread


async def wait_withdrawable(job: Any, lock: threading.Lock, submit: Callable[[Any], None]) -> Any:
    """Hand ``job`` (its ``task`` the current one) to a thread with ``submit`` and wait
    for the thread to reschedule the task with the job's outcome.

    Always checkpoints. Cancellation-safe: a job still ``_PENDING`` is
    withdrawn (its ``state`` set to ``_WITHDRAWN`` under ``lock``: the thread
    skips it) and `trio.Cancelled` raised; one the thread marked running
    completes, and its result is returned.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    submit(job)

    def abort(_: object) -> trio.lowlevel.Abort:
        with lock:
            if job.state == _PENDING:
                job.state = _WITHDRAWN
                return trio.lowlevel.Abort.SUCCEEDED
        return trio.lowlevel.Abort.FAILED

    return await trio.lowlevel.wait_task_rescheduled(abort)


class _GILHandoff(trio.abc.Instrument):
    """Lets the store's thread run while the event loop never sleeps.

    A thread that wants CPython's GIL waits a switch interval (5 ms) before it
    asks the holder to let go, and every release of the GIL restarts that
    wait. A busy Trio loop releases it briefly on every pass (its poll for
    I/O, with a zero timeout) and takes it back at once, so the store's
    thread, which must take the GIL back after every database call, can wait
    seconds for each one (measured with SQLite: p99 480 ms, 60 takes a
    second). So when the loop is about to poll without blocking while the
    thread has been on one round of jobs for more than `_HANDOFF_AFTER`, the
    loop waits up to `_HANDOFF_FOR` for that round to end, at most once per
    `_HANDOFF_EVERY`: at most a quarter of a busy loop's time, none of an
    idle one's.
    """

    def __init__(self, io: RoundThread[Any]) -> None:
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


class RoundThread(Generic[C]):
    """The thread that owns a store's connection (of type ``C``), and the queue of jobs it runs.

    `start`-like methods of subclasses (via `_launch`) and `stop` run on the
    event loop (one Trio run at a time); jobs are submitted from the
    event-loop thread (`submit`, `run`) and their outcomes delivered there.
    ``where`` names the database, ``owner`` the store, in errors.

    A subclass provides `_run_writes` (a batch of write jobs, sharing one
    commit), `_read` (one read job's outcome) and `_close`; it may override
    `_serving` (called on the thread once it serves).
    """

    #: Most write jobs in one round's batch.
    WRITES_PER_BATCH: ClassVar[int] = 1024

    def __init__(self, where: str, owner: object) -> None:
        self.where = where
        self.owner = owner
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        #: Transactions committed (written by the thread, read anywhere).
        self.commits = 0
        # Write jobs after the running one in its batch, reads waiting: set by the
        # thread, read by its jobs (`others_waiting`).
        self._writes_after = 0
        self._reads_waiting: collections.deque[Job] = collections.deque()
        # The thread's current round of jobs: when it started (0.0: none) and an
        # event set when it ends (see `_GILHandoff`).
        self.round_since = 0.0
        self.round_done = threading.Event()
        self.handoff = _GILHandoff(self)

    @property
    def running(self) -> bool:
        """Whether the thread was started and not stopped since."""
        return self._thread is not None

    # lifecycle (event loop) ---------------------------------------------------------------------

    async def _launch(self, open_: Callable[[], C], *, name: str, failure: str) -> None:
        """Start the thread named ``name``: it gets its connection from ``open_()``.

        Returns once it serves; raises `StoreError` (the thread is joined then)
        if it could not, an error not already one reading ``failure: error``.
        Idempotent. Not cancellable: a thread that started is always either
        adopted or joined.
        """
        if self._thread is not None:
            return
        self._token = trio.lowlevel.current_trio_token()
        self._queue = queue.SimpleQueue()
        trio.lowlevel.add_instrument(self.handoff)
        try:
            self._thread = await launch(partial(self._serve, open_), name=name, failure=failure)
        except BaseException:
            self._remove_handoff()
            raise

    async def stop(self) -> None:
        """Let the thread finish the jobs queued, then join it (shielded: the
        connection is closed when this returns). A no-op unless it runs."""
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
        self, open_: Callable[[], C], report: Callable[[BaseException | None], None]
    ) -> None:
        try:
            conn = open_()
        except BaseException as exc:
            report(exc)
            return
        report(None)
        writes: collections.deque[Job] = collections.deque()
        reads: collections.deque[Job] = collections.deque()
        self._reads_waiting = reads
        stopping = False
        per_batch = self.WRITES_PER_BATCH
        try:
            self._serving(conn)
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
                # Writes first, all of them (up to a bound) in one batch; then a few
                # reads, so that a write never waits behind a long run of reads.
                if writes:
                    batch = [writes.popleft() for _ in range(min(len(writes), per_batch))]
                    self._run_writes(conn, batch)
                if reads:
                    self._run_reads(conn, reads)
                self.round_since = 0.0
                self.round_done.set()
        finally:
            self._close(conn)

    def _serving(self, conn: C) -> None:
        """Called on the thread once it serves, before the first round."""

    def _close(self, conn: C) -> None:
        """Close the connection (on the thread, when it stops)."""
        raise NotImplementedError

    def _run_writes(self, conn: C, jobs: list[Job]) -> None:
        """Run a round's write jobs (those `_start` marks running) and `_deliver` them."""
        raise NotImplementedError

    def _read(self, job: Job, conn: C) -> outcome.Outcome[Any]:
        """Run one read job; its outcome."""
        raise NotImplementedError

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

    def _run_reads(self, conn: C, reads: collections.deque[Job]) -> None:
        """Run up to `READS_PER_BATCH` reads, oldest first, each on its own (outside any
        write transaction: only committed data). Stops early once other jobs arrived
        and the reads have run for `_READS_FOR` (some read thousands of rows)."""
        done: list[Job] = []
        started = time.monotonic()
        while reads and len(done) < READS_PER_BATCH:
            job = reads.popleft()
            if not self._start([job]):
                continue  # withdrawn
            job.result = self._read(job, conn)
            done.append(job)
            if not self._queue.empty() and time.monotonic() - started > _READS_FOR:
                break
        self._deliver(done)

    def others_waiting(self) -> bool:
        """Whether jobs other than the running one wait for this thread (on the thread)."""
        return bool(self._writes_after or self._reads_waiting) or not self._queue.empty()

    def _deliver(self, jobs: Sequence[Job]) -> None:
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

    async def _wait(self, job: Job) -> Any:
        """Submit ``job`` (made for the current task) and return its result.

        Always checkpoints. Cancellation-safe (see `wait_withdrawable`).
        """
        return await wait_withdrawable(job, self._lock, self.submit)

    async def run(self, fn: Callable[..., Any], *, write: bool) -> Any:
        """Run ``fn(conn)`` on the thread and return its result. Always checkpoints.

        Cancellation-safe: a job that has not started is withdrawn (and
        `trio.Cancelled` raised); one that started completes, and its result
        is returned.
        """
        return await self._wait(Job(fn, write, task=trio.lowlevel.current_task()))
