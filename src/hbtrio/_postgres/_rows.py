"""Rows in and out of PostgreSQL: the statements the store runs (on its threads).

Theory of operation
-------------------
Every round trip to the server costs a few tens of microseconds on loopback
and milliseconds across a network, so each operation is one statement where
it can be: a run of rows goes in as one ``INSERT ... SELECT FROM unnest()``
of arrays (binary parameters, ``%b``), whatever its length; a process is
loaded in one statement (a lateral join for its latest assignment); a
snapshot is found in one (the latest flagged result and the latest snapshot
of the device's own form, ``UNION ALL``). An append checks that its first
slot follows the stored schedule in the same statement (`insert_assignments`
returns False when it does not, having inserted nothing), so a refused
append is not an error inside the transaction it shares with others.

Rows read back are checked against their IDs as the SQLite store checks
them (``hbtrio._sqlite._checks``), and runs of assignments are decoded in
one cbor2 call (``hbtrio._sqlite._reads``).

Functions of a connection: they block, and run on the store's threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from .._message import Message
from .._message import decode_trusted as decode
from .._sqlite._checks import check_blob, check_run
from .._sqlite._reads import Loaded, _decode_run, loaded
from ._link import Conn

__all__ = [
    "check_fence",
    "insert_assignments",
    "insert_process",
    "load_process",
    "read_assignments",
    "read_blob",
    "read_result",
    "read_snapshot",
    "write_results",
]


_LOAD: Final = (
    "SELECT p.id, p.definition, a.slot, a.assignment,"
    " (SELECT max(slot) FROM results AS r WHERE r.proc = p.id)"
    " FROM processes AS p LEFT JOIN LATERAL"
    " (SELECT slot, assignment FROM assignments WHERE proc = p.id ORDER BY slot DESC LIMIT 1)"
    " AS a ON true WHERE p.{key} = %s"
)
_LOAD_BY_PID: Final = _LOAD.format(key="pid")
_LOAD_BY_ID: Final = _LOAD.format(key="id")


def load_process(conn: Conn, pid: str, rowid: int | None = None) -> Loaded | None:
    """What the store keeps in memory about ``pid`` (by its row ID if given: `loaded`), or
    ``None`` if it is not stored."""
    if rowid is None:
        row = conn.execute(_LOAD_BY_PID, (pid,), binary=True).fetchone()
    else:
        row = conn.execute(_LOAD_BY_ID, (rowid,), binary=True).fetchone()
    if row is None:
        return None
    rowid, definition, latest, last, high = row
    return loaded(pid, rowid, definition, latest, last, high)


_INSERT_PROCESS: Final = (
    "WITH p AS (INSERT INTO processes (pid, definition) VALUES (%(pid)s, %(definition)b)"
    " ON CONFLICT (pid) DO NOTHING RETURNING id),"
    " o AS (INSERT INTO owners (proc, node, epoch) SELECT id, %(node)s, 1 FROM p),"
    " t AS (INSERT INTO takeovers (proc, epoch, node) SELECT id, 1, %(node)s FROM p),"
    " a AS (INSERT INTO assignments (proc, slot, message_id, assignment, epoch)"
    " SELECT id, 0, %(mid)s, %(row)b, 1 FROM p)"
    " SELECT id FROM p"
)


def insert_process(
    conn: Conn, pid: str, definition: bytes, mid: str, row: bytes, node: int
) -> int | None:
    """Store a new process, owned by ``node`` at epoch 1, with its slot 0; its row ID, or
    ``None`` (nothing changed) when ``pid`` is stored already. One statement."""
    found = conn.execute(
        _INSERT_PROCESS,
        {"pid": pid, "definition": definition, "mid": mid, "row": row, "node": node},
    ).fetchone()
    return None if found is None else int(found[0])


_INSERT_ASSIGNMENTS: Final = (
    "INSERT INTO assignments (proc, slot, message_id, assignment, epoch)"
    " SELECT %(proc)s, t.slot, t.mid, t.row, %(epoch)s"
    " FROM unnest(%(slots)b::bigint[], %(mids)s::text[], %(rows)b::bytea[]) AS t(slot, mid, row)"
    " WHERE (SELECT max(slot) FROM assignments WHERE proc = %(proc)s) = %(previous)s"
)


def insert_assignments(
    conn: Conn, rowid: int, epoch: int, first: int, mids: list[str], rows: list[bytes]
) -> bool:
    """Append rows for slots ``first, first + 1, ...``; False (nothing inserted) unless
    ``first`` follows the latest stored slot. One statement."""
    cur = conn.execute(
        _INSERT_ASSIGNMENTS,
        {
            "proc": rowid,
            "epoch": epoch,
            "slots": list(range(first, first + len(rows))),
            "mids": mids,
            "rows": rows,
            "previous": first - 1,
        },
    )
    return cur.rowcount == len(rows)


_WRITE_RESULTS: Final = (
    "INSERT INTO results (proc, slot, state, snapshot, epoch)"
    " SELECT * FROM unnest(%b::bigint[], %b::bigint[], %b::bytea[], %b::bool[], %b::bigint[])"
    " ON CONFLICT (proc, slot) DO UPDATE SET state = EXCLUDED.state,"
    " snapshot = results.snapshot OR EXCLUDED.snapshot, epoch = EXCLUDED.epoch"
)
_FLAG_SNAPSHOTS: Final = (
    "UPDATE results AS r SET snapshot = true"
    " FROM unnest(%b::bigint[], %b::bigint[]) AS f(proc, slot)"
    " WHERE r.proc = f.proc AND r.slot = f.slot"
)
_WRITE_SNAPSHOTS: Final = (
    "INSERT INTO snapshots (proc, slot, snapshot, epoch)"
    " SELECT * FROM unnest(%b::bigint[], %b::bigint[], %b::bytea[], %b::bigint[])"
    " ON CONFLICT (proc, slot) DO UPDATE SET snapshot = EXCLUDED.snapshot, epoch = EXCLUDED.epoch"
)


def _columns(rows: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def write_results(
    conn: Conn,
    results: Sequence[tuple[int, int, bytes, bool, int]],
    flags: Sequence[tuple[int, int]],
    snapshots: Sequence[tuple[int, int, bytes, int]],
) -> None:
    """Write results ``(proc, slot, state, is its own snapshot, epoch)``, snapshot flags of
    stored results ``(proc, slot)`` and snapshots of their own ``(proc, slot, bytes, epoch)``:
    one statement each that has rows. No key may appear twice in one of them."""
    if results:
        conn.execute(_WRITE_RESULTS, _columns(results, 5))
    if flags:
        conn.execute(_FLAG_SNAPSHOTS, _columns(flags, 2))
    if snapshots:
        conn.execute(_WRITE_SNAPSHOTS, _columns(snapshots, 4))


_FENCE: Final = (
    "SELECT o.proc, o.node, o.epoch, n.url FROM owners AS o LEFT JOIN nodes AS n ON n.id = o.node"
    " WHERE o.proc = ANY(%s) ORDER BY o.proc FOR SHARE OF o"
)


def check_fence(
    conn: Conn, node: int, wanted: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], str | None]:
    """Lock the owner rows of the processes written (``FOR SHARE``, until the transaction
    ends) and return the ``(proc, epoch)`` pairs refused, each with the URL of the owner
    now (``None`` if released or unknown). A pair is refused unless ``node`` owns ``proc``
    at that epoch. Must run inside the write transaction, before its writes."""
    pairs = set(wanted)
    if not pairs:
        return {}
    current = {
        proc: (owner, epoch, url)
        for proc, owner, epoch, url in conn.execute(_FENCE, (sorted({p for p, _ in pairs}),))
    }
    refused: dict[tuple[int, int], str | None] = {}
    for proc, epoch in pairs:
        owner, now, url = current.get(proc, (None, None, None))
        if owner != node or now != epoch:
            refused[proc, epoch] = url
    return refused


_READ_RUN: Final = (
    "SELECT assignment FROM assignments WHERE proc = %s AND slot >= %s AND slot < %s ORDER BY slot"
)


def read_assignments(
    conn: Conn,
    rowid: int,
    pid: str,
    start: int,
    stop: int,
    sizes: list[int] | None = None,
) -> list[Message]:
    """The stored assignments for slots ``start..stop-1``, in order, checked against their
    message IDs (a damaged row raises `InvalidMessage`). ``sizes`` gets each row's size."""
    rows: list[bytes] = [r[0] for r in conn.execute(_READ_RUN, (rowid, start, stop), binary=True)]
    if not rows:
        return []
    run = _decode_run(rows, start)
    check_run(run, rows, pid, start)
    if sizes is not None:
        sizes.extend(map(len, rows))
    return run


def read_result(conn: Conn, rowid: int, slot: int) -> Message | None:
    row = conn.execute(
        "SELECT state FROM results WHERE proc = %s AND slot = %s", (rowid, slot), binary=True
    ).fetchone()
    return None if row is None else decode(row[0])


_READ_SNAPSHOT: Final = (
    "(SELECT slot, state, 0 FROM results WHERE proc = %(proc)s AND snapshot"
    " AND slot <= %(at_most)s AND slot > %(above)s ORDER BY slot DESC LIMIT 1)"
    " UNION ALL"
    " (SELECT slot, snapshot, 1 FROM snapshots WHERE proc = %(proc)s"
    " AND slot <= %(at_most)s AND slot > %(above)s ORDER BY slot DESC LIMIT 1)"
)


def read_snapshot(conn: Conn, rowid: int, at_most: int, above: int) -> tuple[int, Message] | None:
    """The latest durable snapshot with ``above < slot <= at_most``; at one slot, a snapshot
    of the device's own form wins over the state flagged as its own."""
    rows = conn.execute(
        _READ_SNAPSHOT, {"proc": rowid, "at_most": at_most, "above": above}, binary=True
    ).fetchall()
    if not rows:
        return None
    slot, data, _own = max(rows, key=lambda r: (r[0], r[2]))
    return int(slot), decode(data)


def read_blob(conn: Conn, where: str, blob_id: str) -> bytes | None:
    row = conn.execute("SELECT data FROM blobs WHERE id = %s", (blob_id,), binary=True).fetchone()
    return None if row is None else check_blob(where, blob_id, bytes(row[0]))
