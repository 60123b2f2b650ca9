"""`SQLiteStore`: the embedded default store, one SQLite file in WAL mode.

Theory of operation
-------------------
The store answers the `Store` operations on the event loop from what it
keeps in memory (``_memory``: the processes looked up, the assignments not
computed yet, the results written behind; the fast path over it is shared
with the PostgreSQL store, ``hbtrio._cachedstore``), and sends everything
else to its I/O thread (``_iothread``), the one place that touches the
file: the reads
(``_reads``, checked against their IDs by ``_checks``) and the writes
(``_writes``). Assignments, definitions and blobs are written through: the
call returns once its commit landed, shared with every other write of that
round. Results and snapshots are written behind (``_writebehind``): they are
readable at once and go to the file in a few large transactions, and
``backlogged`` / `wait_writable` hold producers back while too many wait.
The schema and its migrations are ``_schema``'s.

Reads cost a round trip to the thread each, so a cold process takes two:
the first call about it loads what the store keeps in memory (the
definition, the latest assignment slot, the highest result slot, and the
latest assignment itself while it has no result: the scheduler reads it
next); then the worker's boot reads the snapshot and the assignments after
it in one job (`SQLiteStore.latest_snapshot` with ``read_to``; its fast path
then answers the reads of those assignments).

Blobs are never kept in memory: each `get_blob` reads the row and checks it
against its ID on the I/O thread (SHA-256 releases the GIL).

Every method runs on the event-loop thread. The async ones block on the I/O
thread and are cancellation-safe: a job that has not started is withdrawn,
one that started completes and its caller gets the result.
"""

from __future__ import annotations

import collections
import os
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final

import trio

from .._cachedstore import CachedStore, check_bounds
from .._exceptions import InvalidMessage, StoreError
from .._message import Message
from .._message import decode_trusted as decode
from .._store import FastPath
from ._iothread import IOThread, Job
from ._memory import Proc, ProcessCache, pending_snapshot
from ._reads import load_process, read_assignments, read_blob, read_snapshot
from ._schema import connect
from ._writebehind import WriteBehind
from ._writes import INSERT_ASSIGNMENTS, encode_large, insert_rows

__all__ = ["READ_AHEAD", "SQLiteStore"]

#: Most assignments `SQLiteStore.latest_snapshot` reads ahead into memory.
READ_AHEAD: Final = 4096


class SQLiteStore(CachedStore):
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

    _io: IOThread
    _behind: WriteBehind
    _procs: collections.OrderedDict[str, Proc]

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
        check_bounds(max_pending, max_cached_processes, max_cached_assignments, max_cached_bytes)
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._io = IOThread(self.path, self)
        self._handoff = self._io.handoff
        self.fast: FastPath = self  # answers from what it keeps in memory (or WouldBlock)
        self._memory = ProcessCache(max_cached_processes, max_cached_assignments, max_cached_bytes)
        # Loaded processes, least recently looked up first (event-loop thread only).
        self._procs = self._memory.procs
        self.backlogged = False  # more than max_pending results wait (kept by _behind)
        self._behind = WriteBehind(self, self._io, self._memory, max_pending)
        self._assignments_written = 0
        self._reads = 0

    def __repr__(self) -> str:
        state = "open" if self._io.running else "closed"
        return f"<SQLiteStore {self.path!r} {state}>"

    # lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the I/O thread and create or check the schema. Idempotent."""
        await self._io.start(partial(connect, self.path, self._synchronous))

    async def close(self) -> None:
        """Write everything pending, then stop the I/O thread and release the file.

        Cancellation stops the writing of what is pending (results are only
        written behind: they are recomputed when needed), never the stop: the
        thread is always joined, so the file is free when this returns.
        """
        if not self._io.running:
            return
        try:
            await self.flush()
        finally:
            await self._io.stop()
            self._memory.clear()

    def _submit(self, job: Job) -> None:
        """Queue a job on the I/O thread (`IOThread.submit`)."""
        self._io.submit(job)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        """Run ``fn(conn)`` on the I/O thread and return its result (`IOThread.run`)."""
        return await self._io.run(fn, write=write)

    # what stays in memory -------------------------------------------------------------------------

    async def _proc(self, pid: str) -> Proc | None:
        """What the store keeps about ``pid``, loaded from the file (one round trip) if
        it is not in memory; ``None`` for a process that is not stored."""
        proc = self._procs.get(pid)
        if proc is not None:
            self._procs.move_to_end(pid)
            return proc
        self._reads += 1
        found = await self._run(partial(load_process, pid=pid), write=False)
        if found is None:
            return None
        proc = self._procs.get(pid)  # loaded by another task while we waited
        if proc is None:
            rowid, definition, latest, high, tail, size = found
            proc = self._memory.adopt(pid, Proc(rowid, definition, latest, high, latest + 1))
            if tail is not None:
                self._memory.keep(proc, latest, tail, size)
        return proc

    def _writable(self, pid: str) -> Proc:
        proc = self._procs.get(pid)
        if proc is None:
            raise StoreError(f"process {pid} is not loaded in {self!r}")
        return proc

    # processes ----------------------------------------------------------------------------------

    async def put_process(self, pid: str, definition: Message, assignment: Message) -> bool:
        def put(conn: sqlite3.Connection) -> int | None:
            # Encoded here, on the I/O thread (a large message in pieces, so that the
            # event loop gets the GIL in between).
            row = encode_large(assignment)
            cur = conn.execute(
                "INSERT OR IGNORE INTO processes (pid, definition) VALUES (?, ?)",
                (pid, encode_large(definition)),
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
            proc = self._memory.adopt(pid, Proc(rowid, definition, 0, -1, 0))
            self._memory.keep(proc, 0, assignment, sizes[0])
        return True

    async def get_process(self, pid: str) -> Message | None:
        proc = await self._proc(pid)
        return None if proc is None else proc.definition

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
            rows = [(proc.rowid, a["slot"], a["message-id"], encode_large(a)) for a in assignments]
            (latest,) = conn.execute(
                "SELECT MAX(slot) FROM assignments WHERE proc = ?", (proc.rowid,)
            ).fetchone()
            if latest != first - 1:
                raise StoreError(f"assignment for slot {first} does not follow slot {latest}")
            insert_rows(conn, INSERT_ASSIGNMENTS, 4, rows, self._io.per_statement)
            return [len(row[3]) for row in rows]

        proc.busy += 1  # not evicted while the append is in flight: we update it after
        try:
            sizes: list[int] = await self._run(append, write=True)
        finally:
            proc.busy -= 1
        self._assignments_written += len(assignments)
        proc.latest = max(proc.latest, assignments[-1]["slot"])
        self._memory.keep_run(proc, assignments, sizes)

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
            lambda conn: read_assignments(conn, rowid, pid, start, stop), write=False
        )

    # results and snapshots ------------------------------------------------------------------------

    async def wait_writable(self) -> None:
        """Block while more than ``max_pending`` results wait for the disk.

        Not a checkpoint when nothing needs to wait. Once it blocked, it returns
        when at most half that many wait (and the count is still within the
        bound: every waiter checks again, so they go on one at a time).
        """
        await self._behind.wait_writable()

    async def flush(self) -> None:
        """Return once every result and snapshot stored so far is durable. Checkpoints."""
        await self._behind.flush()

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
        pending = pending_snapshot(proc, at_most)
        above, rowid = -1 if pending is None else pending[0], proc.rowid
        # Slots appended through this store are in memory until they are computed.
        from_file = min(proc.latest + 1, proc.appended_from)

        def read(
            conn: sqlite3.Connection,
        ) -> tuple[tuple[int, Message] | None, list[Message], list[int]]:
            found = read_snapshot(conn, rowid, at_most, above)
            first = (max(above, 0) if found is None else found[0]) + 1
            end = min(from_file, read_to, first + READ_AHEAD)
            sizes: list[int] = []
            if first >= end:
                return found, [], sizes
            try:
                return found, read_assignments(conn, rowid, pid, first, end, sizes), sizes
            except (sqlite3.Error, InvalidMessage):
                return found, [], []  # only a read-ahead: the reads that follow report it

        self._reads += 1
        found, ahead, sizes = await self._run(read, write=False)
        if ahead and self._procs.get(pid) is proc:
            self._memory.keep_ahead(proc, ahead, sizes)
        return pending if found is None else found

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
        self._reads += 1
        read = partial(read_blob, path=self.path, blob_id=blob_id)
        return await self._run(read, write=False)  # type: ignore[no-any-return]
