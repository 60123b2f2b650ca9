"""Reading from the file: a process, a snapshot, a run of assignments, a blob (I/O thread).

Theory of operation
-------------------
Each read is a job on the I/O thread, and each costs the thread a take of
the GIL per step of a statement (see ``_iothread``), so reads are shaped to
take few steps. A process is loaded in one statement (`load_process`:
subqueries on the keys), with the latest assignment while it has no result
(the scheduler reads it next: its hash chain continues the schedule). A run
of assignments comes back as one row, their bytes joined by SQLite
(`read_assignments`), and is decoded in one cbor2 call behind an array
header (`_decode_joined`); unless that gives the messages expected, the
rows are read and decoded one by one, as they would be alone. Whatever is
read is checked against its ID (``_checks``).

Functions of a connection: they block, and run on the I/O thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Final

import cbor2

from .._exceptions import InvalidMessage
from .._message import Message, _adopt_map, _Frozen
from .._message import decode_trusted as decode
from ._checks import check_assignment, check_blob, check_run

__all__ = ["Loaded", "load_process", "loaded", "read_assignments", "read_blob", "read_snapshot"]

_LOAD_PROCESS: Final = (
    "SELECT id, definition,"
    " (SELECT slot FROM assignments WHERE proc = p.id ORDER BY slot DESC LIMIT 1),"
    " (SELECT assignment FROM assignments WHERE proc = p.id ORDER BY slot DESC LIMIT 1),"
    " (SELECT MAX(slot) FROM results WHERE proc = p.id)"
    " FROM processes AS p WHERE pid = ?"
)


#: ``(rowid, definition, latest slot, highest result slot, tail, tail's size)``.
Loaded = tuple[int, Message, int, int, Message | None, int]


def load_process(conn: sqlite3.Connection, pid: str) -> Loaded | None:
    """What the store keeps in memory about ``pid`` (`loaded`), or ``None`` if it is not
    stored."""
    # One statement (one step for the I/O thread), subqueries on the keys.
    row = conn.execute(_LOAD_PROCESS, (pid,)).fetchone()
    if row is None:
        return None
    rowid, definition, latest, last, high = row
    return loaded(pid, rowid, definition, latest, last, high)


def loaded(
    pid: str,
    rowid: int,
    definition: bytes,
    latest: int | None,
    last: bytes | None,
    high: int | None,
) -> Loaded:
    """A process's row as a store keeps it (SQLite and PostgreSQL read the same columns).

    ``latest`` is its latest assignment slot, ``last`` that assignment's
    bytes and ``high`` its highest result slot (``None``: none). The tail is
    the latest assignment, checked, kept while it has no result (``None``
    otherwise, and when it does not check: whoever needs it reads it again,
    and reports it).
    """
    high = -1 if high is None else high
    latest = -1 if latest is None else latest
    # Not computed yet, the latest assignment is read next (its hash chain
    # continues the schedule): keep it rather than come back for it.
    tail = None
    if latest > high and last is not None:
        try:
            tail = decode(last)
            check_assignment(tail, pid, latest)
        except InvalidMessage:
            tail = None
    return rowid, decode(definition), latest, high, tail, len(last or b"")


def read_snapshot(
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


def read_assignments(
    conn: sqlite3.Connection,
    rowid: int,
    pid: str,
    start: int,
    stop: int,
    sizes: list[int] | None = None,
) -> list[Message]:
    """The stored assignments for slots ``start..stop-1``, in order, checked (I/O thread).

    Each is checked against its message ID (``_checks``): a damaged row
    raises `InvalidMessage` instead of being computed as it is.

    All of them in one row (their bytes joined by SQLite), so reading a run
    takes the GIL back twice instead of once per row (see ``_writes``).
    Unless that decodes into the messages expected, the rows are read again
    one by one and decoded as they would be alone. ``sizes``, if given, gets
    the size of each row.
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
    check_run(run, rows, pid, start)
    if sizes is not None:
        sizes.extend(map(len, rows))
    return run


def _split(joined: bytes, lengths: str) -> list[memoryview]:
    """The rows in ``joined``, of the (comma-separated) ``lengths``: views, no copies."""
    view, offset, rows = memoryview(joined), 0, []
    for length in map(int, lengths.split(",")):
        rows.append(view[offset : offset + length])
        offset += length
    return rows


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


def read_blob(conn: sqlite3.Connection, path: str, blob_id: str) -> bytes | None:
    """The bytes of a stored blob, checked against its ID, or ``None`` (I/O thread)."""
    row = conn.execute("SELECT data FROM blobs WHERE id = ?", (blob_id,)).fetchone()
    return None if row is None else check_blob(path, blob_id, row[0])
