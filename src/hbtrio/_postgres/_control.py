"""The control thread: the node's row, its heartbeats, claims, losses and the release.

Theory of operation
-------------------
A second thread with a connection of its own keeps the node's place in the
cluster, so that neither a long write round nor a takeover waiting for a lock
delays the other:

* *Registration* (`ControlThread.start`): a new row in ``nodes`` for this
  incarnation (a restarted node is a new incarnation: a new row, a new ID,
  and a fresh epoch for whatever it takes over). Earlier incarnations with
  the same URL that never stopped are marked stopped first: a node that
  restarts after a crash takes its processes back at once, and the fence
  keeps the old incarnation, should it still run, from writing.
* *Heartbeats*, every quarter of the lease: ``heartbeat_at`` set to
  PostgreSQL's clock; the node's own `Lease` counts from when the heartbeat
  was sent. Each heartbeat also asks which of the processes the store holds
  are owned by somebody else now, and reports them lost; a heartbeat that
  finds the node's row stopped reports every process lost.
* *Claims* (`ControlThread.claim`): read the owner row and decide
  (``_ownership.decide``); take a released, stopped or expired process over
  with an ``UPDATE`` that bumps the epoch (waiting at most a fifth of the
  lease for the locks of the old owner's writers: longer, and the claim
  reports the process busy; the caller asks again); and load what the store
  keeps in memory about a process it now holds, in the same transaction.
* *Release* (`ControlThread.release`), at a graceful shutdown, after the
  store flushed: every process owned by this incarnation is released and the
  node marked stopped, so the next node asked takes them over without waiting
  for the lease.

What it learns that the event loop must act on (processes lost, the lease
lost) is handed to the loop with ``run_sync_soon``. Everything here blocks
and runs on the control thread but `start`, `stop`, `claim` and `release`,
which run on the event loop and park.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import outcome
import psycopg
import trio

from .._exceptions import StoreError
from .._iothread import _PENDING, _RUNNING, launch, wait_withdrawable
from .._sqlite._reads import Loaded
from ._link import Conn, Link, store_error
from ._ownership import ELSEWHERE, MINE, MISSING, Lease, OwnerRow, decide
from ._rows import load_process

__all__ = ["Claim", "ControlThread", "OwnershipBusy"]


_CLAIM_READ: Final = (
    "SELECT p.id, o.node, o.epoch, n.url,"
    " coalesce(n.stopped_at IS NOT NULL OR clock_timestamp() - n.heartbeat_at > n.lease, true)"
    " FROM processes AS p LEFT JOIN owners AS o ON o.proc = p.id"
    " LEFT JOIN nodes AS n ON n.id = o.node WHERE p.pid = %s"
)
_TAKE: Final = (
    "UPDATE owners AS o SET node = %(me)s, epoch = o.epoch + 1, since = clock_timestamp()"
    " WHERE o.proc = %(proc)s AND o.epoch = %(seen)s AND (o.node IS NULL OR EXISTS"
    " (SELECT 1 FROM nodes AS n WHERE n.id = o.node AND (n.stopped_at IS NOT NULL"
    " OR clock_timestamp() - n.heartbeat_at > n.lease)))"
    " RETURNING o.epoch"
)
_ADOPT: Final = (
    "INSERT INTO owners (proc, node, epoch) VALUES (%(proc)s, %(me)s, 1)"
    " ON CONFLICT (proc) DO NOTHING RETURNING epoch"
)
_HEARTBEAT: Final = (
    "UPDATE nodes SET heartbeat_at = clock_timestamp() WHERE id = %s AND stopped_at IS NULL"
    " RETURNING id"
)
_LOST: Final = (
    "SELECT h.proc, h.epoch, n.url FROM unnest(%s::bigint[], %s::bigint[]) AS h(proc, epoch)"
    " JOIN owners AS o ON o.proc = h.proc LEFT JOIN nodes AS n ON n.id = o.node"
    " WHERE o.node IS DISTINCT FROM %s OR o.epoch <> h.epoch"
)


class OwnershipBusy(StoreError):
    """A claim could not settle who owns a process now: its previous owner's writers
    hold the row past the wait, or other nodes keep moving it. Ask again shortly."""


@attrs.frozen
class Claim:
    """What a claim found: this node holds the process (``mine``) or another does."""

    proc: int
    epoch: int | None
    mine: bool
    #: The owner's node ID and URL (this node's when ``mine``).
    node: int | None = None
    url: str | None = None
    #: The claim took the process over (a new epoch).
    took_over: bool = False
    #: What the store keeps in memory about it, when ``mine`` (read after the claim).
    loaded: Loaded | None = None


_STOP: Final = object()


@attrs.define(eq=False)
class _Job:
    fn: Callable[[Conn], Any]
    task: trio.lowlevel.Task
    # Guarded by the thread's lock: _PENDING -> _RUNNING (thread) or -> _WITHDRAWN (caller).
    state: int = _PENDING
    result: outcome.Outcome[Any] | None = None


class ControlThread:
    """The node's registration, heartbeats, claims and release, on a thread of its own.

    ``tick`` is called on the event loop after every acknowledged heartbeat (the
    store retries writes that failed, once the server answers again);
    ``held`` returns a copy of what the store holds (``pid -> (row ID, epoch)``);
    ``lost`` is called on the event loop with ``[(pid, epoch, owner URL)]`` for
    processes found owned elsewhere; ``lease_lost`` on the event loop when the
    lease ran out (no acknowledged heartbeat for a lease); ``trust_ownership``
    (a test hook) turns both reports off, leaving the fence alone.
    """

    def __init__(
        self,
        where: str,
        connect: Callable[[], Conn],
        *,
        lease: float,
        url: str | None,
        name: str,
        held: Callable[[], dict[str, tuple[int, int]]],
        lost: Callable[[list[tuple[str, int, str | None]]], None],
        lease_lost: Callable[[], None],
        tick: Callable[[], None] | None = None,
        trust_ownership: bool = False,
    ) -> None:
        self.where = where
        self._link = Link(where, connect)
        self.lease = Lease(lease)
        self.url = url
        self.name = name
        self._held = held
        self._lost = lost
        self._lease_lost = lease_lost
        self._tick = tick
        self.trust_ownership = trust_ownership
        self.node = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._lease_reported = False
        #: Counters (written by the thread): heartbeats acknowledged, takeovers made.
        self.heartbeats = 0
        self.takeovers = 0
        #: Test hook: heartbeats are not sent while this is set.
        self.paused = threading.Event()
        # The watchdog: wakes at the end of the lease (or when it is renewed or the
        # thread stops), so a lost lease is reported on time even while the control
        # connection hangs on a network that went away.
        self._watchdog: threading.Thread | None = None
        self._renewed = threading.Event()
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def interval(self) -> float:
        return self.lease.seconds / 4

    # lifecycle (event loop) ---------------------------------------------------------------------

    async def start(self) -> int:
        """Start the thread, connect and register this incarnation; its node ID.

        Raises `StoreError` (the thread is joined) if it cannot. Not cancellable.
        """
        if self._thread is not None:
            return self.node
        self._token = trio.lowlevel.current_trio_token()
        self._queue = queue.SimpleQueue()
        self._thread = await launch(
            self._serve,
            name=f"hbtrio-pg-control:{self.where}",
            failure=f"cannot register with {self.where}",
        )
        self._stopping = False
        self._watchdog = threading.Thread(
            target=self._watch, name=f"hbtrio-pg-lease:{self.where}", daemon=True
        )
        self._watchdog.start()
        return self.node

    async def stop(self) -> None:
        """Stop heartbeating and join the thread (shielded). A no-op unless it runs."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        self._thread = None
        self._stopping = True
        self._renewed.set()
        watchdog, self._watchdog = self._watchdog, None
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)
            if watchdog is not None:
                await trio.to_thread.run_sync(watchdog.join)

    def _watch(self) -> None:
        """The watchdog thread: report the lease lost the moment it runs out."""
        while not self._stopping:
            left = self.lease.until - time.monotonic()
            if left > 0 or self._lease_reported or self.trust_ownership:
                self._renewed.wait(left if left > 0 else None)
                self._renewed.clear()
                continue
            self._report_lease_lost()

    async def _run(self, fn: Callable[[Conn], Any]) -> Any:
        """Run ``fn(conn)`` on the control thread. Checkpoints. Cancellation-safe: a job
        that has not started is withdrawn; one that started runs to its end and its
        caller gets the result (a takeover is never left half-known)."""
        if self._thread is None:
            raise StoreError(f"the cluster connection to {self.where} is not open")
        return await wait_withdrawable(
            _Job(fn, trio.lowlevel.current_task()), self._lock, self._queue.put
        )

    async def claim(self, pid: str) -> Claim | None:
        """Who owns ``pid``, taking it over if it is free or its owner expired (see the
        module). ``None`` for a process that is not stored. Raises `StoreError` when the
        server cannot be asked, or the old owner's writers hold the row past the wait."""
        return await self._run(lambda conn: self._claim(conn, pid))  # type: ignore[no-any-return]

    async def release(self) -> int:
        """Release every process this incarnation owns and mark it stopped; how many.

        The lease is given up first: nothing is held any more once this started.
        """
        self._lease_reported = True  # given up, not lost: nothing to report
        self.lease.expire()
        return await self._run(self._release)  # type: ignore[no-any-return]

    async def query(self, fn: Callable[[Conn], Any]) -> Any:
        """Run a read ``fn(conn)`` on the control connection (for the node's ``/cluster``)."""
        return await self._run(fn)

    # the thread ---------------------------------------------------------------------------------

    def _serve(self, report: Callable[[BaseException | None], None]) -> None:
        try:
            conn = self._link.open()
            sent = time.monotonic()
            self.node = self._register(conn)
            self.lease.renewed(sent)
        except BaseException as exc:
            self._link.close()
            report(exc)
            return
        report(None)
        next_beat = time.monotonic() + self.interval
        try:
            while True:
                try:
                    job = self._queue.get(timeout=max(0.0, next_beat - time.monotonic()))
                except queue.Empty:
                    job = None
                if job is _STOP:
                    return
                if job is not None:
                    self._work(job)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval
                    if not self.paused.is_set():
                        self._heartbeat()
        finally:
            self._link.close()

    def _work(self, job: _Job) -> None:
        with self._lock:
            if job.state != _PENDING:
                return  # withdrawn
            job.state = _RUNNING
        try:
            job.result = outcome.Value(job.fn(self._link.get()))
        except psycopg.Error as exc:
            job.result = outcome.Error(store_error(self.where, exc))
        except Exception as exc:
            job.result = outcome.Error(exc)
        self._call_soon(trio.lowlevel.reschedule, job.task, job.result)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:  # pragma: no cover - the engine left without closing us
            pass

    def _register(self, conn: Conn) -> int:
        with conn.transaction():
            if self.url is not None:
                conn.execute(
                    "UPDATE nodes SET stopped_at = clock_timestamp()"
                    " WHERE url = %s AND stopped_at IS NULL",
                    (self.url,),
                )
            row = conn.execute(
                "INSERT INTO nodes (url, name, lease) VALUES (%s, %s, make_interval(secs => %s))"
                " RETURNING id",
                (self.url, self.name, self.lease.seconds),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def _heartbeat(self) -> None:
        sent = time.monotonic()
        try:
            conn = self._link.get()
            alive = conn.execute(_HEARTBEAT, (self.node,)).fetchone() is not None
            if alive:
                self.lease.renewed(sent)
                self.heartbeats += 1
                self._lease_reported = False
                self._renewed.set()
                self._check_lost(conn)
                if self._tick is not None:
                    self._call_soon(self._tick)
            elif not self.trust_ownership:  # retired (a newer incarnation of our URL)
                self.lease.expire()
                self._report_lease_lost()
        except (psycopg.Error, StoreError):
            pass  # a broken connection is made again at the next heartbeat (`Link.get`)

    def _report_lease_lost(self) -> None:
        """Hand the loss of the lease to the event loop, once until it is renewed (any
        thread: the flag is set before the report, and only a heartbeat clears it)."""
        if not self._lease_reported:
            self._lease_reported = True
            self._call_soon(self._lease_lost)

    def _check_lost(self, conn: Conn) -> None:
        if self.trust_ownership:
            return
        held = self._held()
        if not held:
            return
        pids = {rowid: pid for pid, (rowid, _epoch) in held.items()}
        rows = conn.execute(
            _LOST,
            ([r for r, _ in held.values()], [e for _, e in held.values()], self.node),
        ).fetchall()
        if rows:
            self._call_soon(self._lost, [(pids[proc], epoch, url) for proc, epoch, url in rows])

    def _claim(self, conn: Conn, pid: str) -> Claim | None:
        for _attempt in range(4):
            found = conn.execute(_CLAIM_READ, (pid,)).fetchone()
            row = None if found is None else OwnerRow(*found)
            decision = decide(self.node, row)
            if decision is MISSING or row is None:
                return None
            if decision is ELSEWHERE:
                return Claim(row.proc, row.epoch, False, row.node, row.url)
            if decision is MINE:
                loaded = load_process(conn, pid, row.proc)
                return Claim(row.proc, row.epoch, True, self.node, self.url, loaded=loaded)
            taken = self._take(conn, pid, row)
            if taken is not None:
                return taken
        raise OwnershipBusy(f"process {pid}: its ownership keeps changing; ask again")

    def _take(self, conn: Conn, pid: str, row: OwnerRow) -> Claim | None:
        wait = f"{max(1, round(self.lease.seconds * 200))}ms"  # a fifth of the lease
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (wait,))
                args = {"me": self.node, "proc": row.proc, "seen": row.epoch}
                if row.epoch is None:
                    taken = conn.execute(_ADOPT, args).fetchone()
                else:
                    taken = conn.execute(_TAKE, args).fetchone()
                if taken is None:
                    return None  # somebody moved first: read it again
                epoch = int(taken[0])
                conn.execute(
                    "INSERT INTO takeovers (proc, epoch, node, previous) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    (row.proc, epoch, self.node, row.node),
                )
                loaded = load_process(conn, pid, row.proc)
        except psycopg.errors.LockNotAvailable:
            raise OwnershipBusy(
                f"process {pid} is being written by its previous owner; ask again"
            ) from None
        self.takeovers += 1
        return Claim(row.proc, epoch, True, self.node, self.url, True, loaded)

    def _release(self, conn: Conn) -> int:
        with conn.transaction():
            cur = conn.execute(
                "UPDATE owners SET node = NULL, since = clock_timestamp() WHERE node = %s",
                (self.node,),
            )
            conn.execute(
                "UPDATE nodes SET stopped_at = clock_timestamp() WHERE id = %s", (self.node,)
            )
        return cur.rowcount
