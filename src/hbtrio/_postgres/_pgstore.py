"""`PostgresStore`: processes in PostgreSQL, shared by the nodes of a cluster.

Theory of operation
-------------------
The store answers the `Store` operations like the SQLite store does: from
what it keeps in memory about the processes it *holds* (``PgProc``: the
definition, the latest slots, results written behind, assignments not
computed yet; bounded like SQLite's, ``hbtrio._sqlite._memory``; the fast
path over it is SQLite's too, ``hbtrio._cachedstore``), and
everything else on its data thread (``_iothread``): reads, and writes in
group-committed transactions behind the fence. Assignments, definitions and
blobs are written through; results and snapshots behind (``_writebehind``).

Holding. Only the owner of a process writes for it, and it is the only one
whose memory of the process can be trusted (nobody else appends to it). So
the store keeps memory only for the processes it holds, each under the epoch
it holds it at (``held``: pid -> (row ID, epoch)). The first access to a
process it does not hold *claims* it on the control thread (``_control``):
a process that is free (released, or its owner stopped or expired) is taken
over, with a new epoch, and loaded in the same trip; one owned by a live
node elsewhere is only read (straight from the server, nothing kept), and
writes for it raise `StoreFenced` naming the owner. `claim` and `holds` are
what a node's router asks before it sends a request to its engine or to the
owner.

Losing. A process is lost when a write for it is refused by the fence, when
a heartbeat finds it owned elsewhere, or when the node's lease runs out
(every held process at once: another node may take any of them over from
then on; `trust_ownership`, a test hook, turns the last two off to show the
fence alone is enough). Its memory is dropped, its results still waiting are
dropped as the fence refuses them, and the engine is told (`Store.on_lost`),
which ends its worker like a lost one. Asking for it again claims it again.

Every method runs on the event-loop thread. The async ones block on a thread
and are cancellation-safe: a job that has not started is withdrawn, one that
started completes and its caller gets the result.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final

import attrs
import psycopg
import trio

from .._cachedstore import CachedStore, check_bounds
from .._exceptions import InvalidMessage, StoreError, StoreFenced
from .._message import Message
from .._message import decode_trusted as decode
from .._sqlite._memory import ProcessCache, pending_snapshot
from .._sqlite._writes import encode_large
from .._store import FastPath
from ._control import Claim, ControlThread
from ._iothread import DataThread
from ._rows import (
    insert_assignments,
    insert_process,
    read_assignments,
    read_blob,
    read_result,
    read_snapshot,
)
from ._schema import connect, ensure_schema
from ._writebehind import PgProc, WriteBehind

__all__ = ["READ_AHEAD", "ClusterStatistics", "PostgresStore"]

#: Most assignments `PostgresStore.latest_snapshot` reads ahead into memory.
READ_AHEAD: Final = 4096


@attrs.frozen
class ClusterStatistics:
    """What a `PostgresStore` did as one node of a cluster (`PostgresStore.cluster_statistics`)."""

    node: int
    url: str | None
    lease: float
    lease_valid: bool
    held: int
    heartbeats: int
    takeovers: int
    #: Processes this node lost (a refused write, a heartbeat, the lease running out).
    lost: int
    #: Write jobs the fence refused (in part or whole), and result rows it refused.
    fenced_writes: int
    fenced_rows: int


def _where(dsn: str) -> str:
    """The server and database of a DSN, without its password (for messages)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "PostgreSQL"
    host, port, db = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname")
    return f"postgresql://{host}:{port}/{db or ''}"


class PostgresStore(CachedStore):
    """A store in a PostgreSQL database that several nodes share, one owner per process.

    Args:
        dsn: a libpq connection string or URI (``postgresql://user@host/db``).
        node_url: the URL other nodes reach this node's HTTP API at (shown to
            them as the owner of its processes); ``None`` for an embedded store.
        node_name: a name for this node in ``nodes`` (default: host and pid).
        lease: seconds a node's processes stay its own without a heartbeat;
            heartbeats go every quarter of it. Every node of a cluster should
            use the same lease.
        synchronous_commit: PostgreSQL's ``synchronous_commit`` for this
            store's sessions (``"on"`` by default; ``"off"`` is faster and may
            lose the last commits if the server crashes).
        max_pending, max_cached_processes, max_cached_assignments,
            max_cached_bytes: as for `SQLiteStore`.
        connect_timeout: seconds to connect, and for a dead data connection
            to be noticed (its TCP user timeout); by default twice the lease,
            between 2 and 5 s. The control connection (heartbeats, claims)
            notices within half a lease.
        trust_ownership: a test hook: never give up held processes on its own
            (an expired lease, a heartbeat finding them elsewhere); only the
            fence, refusing a write, takes them away.

    The engine opens and closes the store; a closed store can be opened again
    (as a new incarnation). Every method runs on the event-loop thread.
    """

    _io: DataThread
    _behind: WriteBehind

    def __init__(
        self,
        dsn: str,
        *,
        node_url: str | None = None,
        node_name: str | None = None,
        lease: float = 10.0,
        synchronous_commit: str = "on",
        max_pending: int = 20_000,
        max_cached_processes: int = 10_000,
        max_cached_assignments: int = 100_000,
        max_cached_bytes: int = 64 * 1024 * 1024,
        connect_timeout: float | None = None,
        trust_ownership: bool = False,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ValueError("dsn must be a PostgreSQL connection string")
        if not (isinstance(lease, int | float) and lease > 0):
            raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
        if synchronous_commit not in ("on", "off", "local", "remote_write", "remote_apply"):
            raise ValueError(f"synchronous_commit: not a setting: {synchronous_commit!r}")
        check_bounds(max_pending, max_cached_processes, max_cached_assignments, max_cached_bytes)
        self.dsn = dsn
        self.where = _where(dsn)
        self.node_url = node_url
        self.lease = float(lease)
        name = node_name or f"{socket.gethostname()}:{os.getpid()}"
        if connect_timeout is None:
            connect_timeout = min(5.0, max(2.0, 2 * self.lease))
        settings = partial(
            connect,
            dsn,
            connect_timeout=connect_timeout,
            # A session idle in a transaction this long is ended by the server: a node
            # paused inside a write cannot keep a takeover waiting past half a lease.
            idle_in_transaction=self.lease / 2,
            synchronous_commit=synchronous_commit,
        )
        self._io = DataThread(self.where, self, partial(self._connect_data, settings, name))
        self._control = ControlThread(
            self.where,
            partial(
                settings,
                application_name=f"hbtrio control {name}"[:63],
                user_timeout=self.lease / 2,
            ),
            lease=self.lease,
            url=node_url,
            name=name,
            held=self._held_copy,
            lost=self._heartbeat_lost,
            lease_lost=self._lease_lost,
            tick=self._tick,
            trust_ownership=trust_ownership,
        )
        self.trust_ownership = trust_ownership
        self.fast: FastPath = self
        self._memory = ProcessCache(max_cached_processes, max_cached_assignments, max_cached_bytes)
        # The held processes' memory (only `PgProc` entries go in), least recently used first.
        self._procs: collections.OrderedDict[str, PgProc] = self._memory.procs  # type: ignore[assignment]
        #: The processes this store holds: pid -> (row ID, epoch). Event loop only
        #: (the control thread takes copies).
        self._held: dict[str, tuple[int, int]] = {}
        self.backlogged = False
        self._behind = WriteBehind(self, self._io, self._memory, max_pending, self._refused)
        self._assignments_written = 0
        self._reads = 0
        self._lost_count = 0

    def __repr__(self) -> str:
        state = "open" if self._io.running else "closed"
        return f"<PostgresStore {self.where} node={self._control.node or '-'} {state}>"

    def _connect_data(self, settings: Callable[..., Any], name: str) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = settings(application_name=f"hbtrio data {name}"[:63])
        try:
            ensure_schema(conn, self.where)
        except BaseException:
            conn.close()
            raise
        return conn

    # lifecycle ------------------------------------------------------------------------------

    @property
    def node_id(self) -> int:
        """This incarnation's row in ``nodes`` (0 while closed)."""
        return self._control.node

    async def open(self) -> None:
        """Connect (creating or migrating the schema) and register this node. Idempotent."""
        if self._io.running:
            return
        await self._io.start()
        try:
            self._io.node = await self._control.start()
        except BaseException:
            await self._io.stop()
            raise

    async def close(self) -> None:
        """Write everything pending, release every held process, and disconnect.

        Released processes are taken over at once by the next node asked for
        them. Cancellation stops the writing of what is pending (results are
        only written behind), never the disconnection.
        """
        if not self._io.running:
            return
        try:
            await self.flush()
            with trio.CancelScope(shield=True):
                try:
                    await self._control.release()
                except StoreError:
                    pass  # the lease will run out instead
        finally:
            await self._control.stop()
            await self._io.stop()
            self._memory.clear()
            self._held.clear()

    # holding --------------------------------------------------------------------------------

    def _held_copy(self) -> dict[str, tuple[int, int]]:
        return self._held.copy()  # one C call: safe from the control thread

    def _lease_valid(self) -> bool:
        return self.trust_ownership or self._control.lease.valid(time.monotonic())

    def holds(self, pid: str) -> bool:
        """Whether this store holds ``pid`` now, its lease valid. Never blocks."""
        return pid in self._held and self._lease_valid()

    async def claim(self, pid: str) -> Claim | None:
        """Who owns ``pid``, taking it over when it is free or its owner expired.

        ``None`` for a process that is not stored; a `Claim` whose ``mine``
        says whether this store holds it now (then its memory is loaded), and
        otherwise who does (``url``). Blocks (one trip to the server unless it
        is held and the lease valid); cancellation-safe. Raises `StoreError`
        when the server cannot be asked, or the process is being taken over.
        """
        proc = self._procs.get(pid)
        if proc is not None and self._lease_valid():
            await trio.lowlevel.checkpoint()
            return Claim(proc.rowid, proc.epoch, True, self.node_id, self.node_url)
        claim = await self._control.claim(pid)
        if claim is not None and claim.mine:
            self._adopt(pid, claim)
        elif claim is not None and pid in self._held:
            self._lose(pid, self._held[pid][1], claim.url, "it is owned by another node now")
        return claim

    def _adopt(self, pid: str, claim: Claim) -> PgProc:
        """Keep what a claim loaded about a process this store now holds (event loop)."""
        assert claim.epoch is not None and claim.loaded is not None
        old = self._procs.get(pid)
        held = self._held.get(pid)
        if old is not None and old.epoch == claim.epoch:
            return old  # loaded by another task while we waited
        if held is not None and held[1] != claim.epoch:
            self._lose(pid, held[1], None, "it was taken over again")
        rowid, definition, latest, high, tail, size = claim.loaded
        proc = PgProc(rowid, definition, latest, high, latest + 1, pid=pid, epoch=claim.epoch)
        self._memory.adopt(pid, proc)
        if tail is not None:
            self._memory.keep(proc, latest, tail, size)
        self._held[pid] = (rowid, claim.epoch)
        return proc

    def _lose(self, pid: str, epoch: int, owner: str | None, why: str) -> None:
        """Stop holding ``pid`` (held at ``epoch``) and tell the engine. Never blocks."""
        held = self._held.get(pid)
        if held is None or held[1] != epoch:
            return  # lost already, or held again under a newer epoch
        del self._held[pid]
        proc = self._procs.pop(pid, None)
        if proc is not None:
            proc.assignments.clear()
        self._lost_count += 1
        callback = self.on_lost
        if callback is not None:
            where = f" ({owner})" if owner else ""
            callback(
                pid,
                StoreFenced(pid, f"process {pid}: {why}{where}", epoch=epoch, owner=owner),
            )

    def _refused(self, pid: str, epoch: int, owner: str | None) -> None:
        self._lose(pid, epoch, owner, "its writes were refused: another node owns it now")

    def _heartbeat_lost(self, lost: list[tuple[str, int, str | None]]) -> None:
        for pid, epoch, owner in lost:
            self._lose(pid, epoch, owner, "another node took it over")

    def _tick(self) -> None:
        """After each heartbeat: results whose write failed (the server was away) are
        tried again, even if nothing new was written since."""
        if self._io.running:
            self._behind.kick()

    def _lease_lost(self) -> None:
        if self.trust_ownership:
            return
        for pid, (_rowid, epoch) in list(self._held.items()):
            self._lose(pid, epoch, None, "this node's lease ran out")

    async def _lookup(self, pid: str) -> tuple[PgProc | None, Claim | None]:
        """The held process's memory (claiming it first if needed), or the claim that found
        it elsewhere; ``(None, None)`` for a process that is not stored."""
        proc = self._procs.get(pid)
        if proc is not None and self._lease_valid():
            self._procs.move_to_end(pid)
            return proc, None
        claim = await self.claim(pid)
        if claim is None:
            return None, None
        if claim.mine:
            return self._procs.get(pid), claim
        return None, claim

    async def _proc(self, pid: str) -> PgProc | None:
        """The held process's memory, or ``None`` (not stored, or owned elsewhere)."""
        proc, _claim = await self._lookup(pid)
        return proc

    def _fenced_here(self, pid: str, claim: Claim | None) -> StoreFenced:
        owner = None if claim is None else claim.url
        return StoreFenced(
            pid,
            f"process {pid} is owned by another node" + (f" ({owner})" if owner else ""),
            owner=owner,
        )

    # reads of a process held elsewhere -----------------------------------------------------------

    async def _read(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        self._reads += 1
        return await self._io.run(fn, write=False)

    async def stored_result(self, pid: str, slot: int) -> Message | None:
        """The result of ``slot`` as committed in the database, wherever ``pid`` is owned.

        Never claims anything: a node answers stored results of processes owned
        elsewhere with it. Blocks (one read); cancellation-safe.
        """
        proc = self._procs.get(pid)
        if proc is not None:
            found = proc.pending.get(slot)
            if found is not None:
                await trio.lowlevel.checkpoint()
                return found

        def read(conn: psycopg.Connection[Any]) -> Message | None:
            row = conn.execute(
                "SELECT r.state FROM results AS r JOIN processes AS p ON p.id = r.proc"
                " WHERE p.pid = %s AND r.slot = %s",
                (pid, slot),
                binary=True,
            ).fetchone()
            return None if row is None else decode(row[0])

        return await self._read(read)  # type: ignore[no-any-return]

    # processes ----------------------------------------------------------------------------------

    async def put_process(self, pid: str, definition: Message, assignment: Message) -> bool:
        encoded: list[bytes] = []

        def prepare() -> None:
            encoded.extend((encode_large(definition), encode_large(assignment)))

        node = self.node_id

        def put(conn: psycopg.Connection[Any], refused: object) -> int | None:
            return insert_process(conn, pid, encoded[0], assignment["message-id"], encoded[1], node)

        rowid = await self._io.run(put, write=True, prepare=prepare)
        if rowid is None:
            return False
        self._assignments_written += 1
        if pid not in self._procs:
            proc = PgProc(rowid, definition, 0, -1, 0, pid=pid, epoch=1)
            self._memory.adopt(pid, proc)
            self._memory.keep(proc, 0, assignment, len(encoded[1]))
            self._held[pid] = (rowid, 1)
        return True

    async def get_process(self, pid: str) -> Message | None:
        proc, claim = await self._lookup(pid)
        if proc is not None:
            return proc.definition
        if claim is None:
            return None
        rowid = claim.proc

        def read(conn: psycopg.Connection[Any]) -> Message | None:
            row = conn.execute(
                "SELECT definition FROM processes WHERE id = %s", (rowid,), binary=True
            ).fetchone()
            return None if row is None else decode(row[0])

        return await self._read(read)  # type: ignore[no-any-return]

    # assignments --------------------------------------------------------------------------------

    async def append_assignments(self, pid: str, assignments: Sequence[Message]) -> None:
        proc, claim = await self._lookup(pid)
        if proc is None:
            if claim is None:
                raise StoreError(f"process {pid} is not in the store")
            raise self._fenced_here(pid, claim)
        if not assignments:
            return
        first = assignments[0]["slot"]
        for offset, a in enumerate(assignments):
            if a["slot"] != first + offset:
                raise StoreError(
                    f"assignment for slot {a['slot']} does not follow slot {first + offset - 1}"
                )
        rows: list[bytes] = []

        def prepare() -> None:
            rows.extend(encode_large(a) for a in assignments)

        rowid, epoch = proc.rowid, proc.epoch

        def append(conn: psycopg.Connection[Any], refused: object) -> None:
            mids = [a["message-id"] for a in assignments]
            if not insert_assignments(conn, rowid, epoch, first, mids, rows):
                raise StoreError(f"assignment for slot {first} does not follow the stored schedule")

        proc.busy += 1
        try:
            await self._io.run(append, write=True, fence=((rowid, epoch, pid),), prepare=prepare)
        except StoreFenced as exc:
            self._lose(pid, epoch, exc.owner, "its writes were refused: another node owns it now")
            raise
        finally:
            proc.busy -= 1
        self._assignments_written += len(assignments)
        proc.latest = max(proc.latest, assignments[-1]["slot"])
        self._memory.keep_run(proc, assignments, list(map(len, rows)))

    async def latest_slot(self, pid: str) -> int:
        proc, claim = await self._lookup(pid)
        if proc is not None:
            return proc.latest
        if claim is None:
            return -1
        rowid = claim.proc

        def read(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "SELECT max(slot) FROM assignments WHERE proc = %s", (rowid,)
            ).fetchone()
            return -1 if row is None or row[0] is None else int(row[0])

        return await self._read(read)  # type: ignore[no-any-return]

    async def get_assignments(self, pid: str, start: int, stop: int) -> list[Message]:
        proc, claim = await self._lookup(pid)
        if proc is None:
            if claim is None:
                return []
            rowid = claim.proc
            start, stop = max(start, 0), max(stop, 0)
            if start >= stop:
                await trio.lowlevel.checkpoint()
                return []
            return await self._read(  # type: ignore[no-any-return]
                lambda conn: read_assignments(conn, rowid, pid, start, stop)
            )
        start, stop = max(start, 0), min(stop, proc.latest + 1)
        if start >= stop:
            await trio.lowlevel.checkpoint()
            return []
        cache = proc.assignments
        if all(s in cache for s in range(start, stop)):
            found = [cache[s] for s in range(start, stop)]
            await trio.lowlevel.checkpoint()
            return found
        rowid = proc.rowid
        return await self._read(  # type: ignore[no-any-return]
            lambda conn: read_assignments(conn, rowid, pid, start, stop)
        )

    # results and snapshots ------------------------------------------------------------------------

    def _writable(self, pid: str) -> PgProc:
        proc = self._procs.get(pid)
        if proc is None:
            if pid in self._held:
                raise StoreError(f"process {pid} is not loaded in {self!r}")
            raise self._fenced_here(pid, None)
        return proc

    async def wait_writable(self) -> None:
        """Block while more than ``max_pending`` results wait for the server."""
        await self._behind.wait_writable()

    async def flush(self) -> None:
        """Return once every result and snapshot stored so far is durable (or was refused,
        for a process lost meanwhile). Checkpoints."""
        await self._behind.flush()

    async def get_result(self, pid: str, slot: int) -> Message | None:
        proc, claim = await self._lookup(pid)
        if proc is None:
            if claim is None:
                return None
            rowid = claim.proc
            return await self._read(lambda conn: read_result(conn, rowid, slot))  # type: ignore[no-any-return]
        try:
            found = self.get_result_nowait(pid, slot)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.checkpoint()
            return found
        rowid = proc.rowid
        return await self._read(lambda conn: read_result(conn, rowid, slot))  # type: ignore[no-any-return]

    async def latest_snapshot(
        self, pid: str, at_most: int, *, read_to: int = 0
    ) -> tuple[int, Message] | None:
        """The latest snapshot at or below ``at_most``; with ``read_to``, the assignments
        after it (up to `READ_AHEAD`) are read into memory in the same job (see
        `SQLiteStore.latest_snapshot`). Blocks; cancellation-safe."""
        proc, claim = await self._lookup(pid)
        if proc is None:
            if claim is None:
                return None
            rowid = claim.proc
            return await self._read(  # type: ignore[no-any-return]
                lambda conn: read_snapshot(conn, rowid, at_most, -1)
            )
        pending = pending_snapshot(proc, at_most)
        above, rowid = -1 if pending is None else pending[0], proc.rowid
        from_file = min(proc.latest + 1, proc.appended_from)

        def read(
            conn: psycopg.Connection[Any],
        ) -> tuple[tuple[int, Message] | None, list[Message], list[int]]:
            found = read_snapshot(conn, rowid, at_most, above)
            first = (max(above, 0) if found is None else found[0]) + 1
            end = min(from_file, read_to, first + READ_AHEAD)
            sizes: list[int] = []
            if first >= end:
                return found, [], sizes
            try:
                return found, read_assignments(conn, rowid, pid, first, end, sizes), sizes
            except InvalidMessage:
                return found, [], []  # only a read-ahead: the reads that follow report it

        found, ahead, sizes = await self._read(read)
        if ahead and self._procs.get(pid) is proc:
            self._memory.keep_ahead(proc, ahead, sizes)
        return pending if found is None else found

    # blobs ----------------------------------------------------------------------------------------

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        """Store a blob, durably (committed) before it returns; idempotent. Blocks;
        cancellation-safe."""

        def put(conn: psycopg.Connection[Any], refused: object) -> None:
            conn.execute(
                "INSERT INTO blobs (id, data) VALUES (%s, %b) ON CONFLICT (id) DO NOTHING",
                (blob_id, data),
            )

        await self._io.run(put, write=True)

    async def get_blob(self, blob_id: str) -> bytes | None:
        """The blob's bytes, or ``None``; `StoreError` if they do not hash to its ID."""
        return await self._read(partial(read_blob, where=self.where, blob_id=blob_id))  # type: ignore[no-any-return]

    # statistics -----------------------------------------------------------------------------------

    def cluster_statistics(self) -> ClusterStatistics:
        """This node's part in the cluster (see `ClusterStatistics`). Never blocks."""
        control = self._control
        return ClusterStatistics(
            node=control.node,
            url=self.node_url,
            lease=self.lease,
            lease_valid=control.lease.valid(time.monotonic()),
            held=len(self._held),
            heartbeats=control.heartbeats,
            takeovers=control.takeovers,
            lost=self._lost_count,
            fenced_writes=self._io.fenced_jobs,
            fenced_rows=self._behind.fenced_rows,
        )

    async def cluster_view(self, limit: int = 1000) -> dict[str, Any]:
        """The nodes and the owners of (at most ``limit``) processes, as the database says.

        One read on the control connection; for the node's ``GET /cluster``.
        """

        def read(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            nodes = conn.execute(
                "SELECT id, url, name, extract(epoch FROM lease),"
                " extract(epoch FROM clock_timestamp() - heartbeat_at),"
                " stopped_at IS NOT NULL,"
                " stopped_at IS NULL AND clock_timestamp() - heartbeat_at <= lease"
                " FROM nodes WHERE stopped_at IS NULL"
                " OR stopped_at > clock_timestamp() - interval '1 hour' ORDER BY id"
            ).fetchall()
            owners = conn.execute(
                "SELECT p.pid, o.node, o.epoch FROM owners AS o"
                " JOIN processes AS p ON p.id = o.proc ORDER BY o.proc LIMIT %s",
                (limit + 1,),
            ).fetchall()
            return {
                "nodes": [
                    {
                        "id": n[0],
                        "url": n[1],
                        "name": n[2],
                        "lease": float(n[3]),
                        "heartbeat-age": round(float(n[4]), 3),
                        "stopped": n[5],
                        "alive": n[6],
                    }
                    for n in nodes
                ],
                "owners": {
                    pid: {"node": node, "epoch": epoch} for pid, node, epoch in owners[:limit]
                },
                "owners-truncated": len(owners) > limit,
            }

        return await self._control.query(read)  # type: ignore[no-any-return]
