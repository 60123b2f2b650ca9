"""Rows going into the file: encoding them and inserting them (on the I/O thread).

Theory of operation
-------------------
sqlite3 releases the GIL around each step of a statement, which is once per
row of an ``executemany``; while the event loop keeps the interpreter busy,
taking the GIL back can cost the I/O thread a switch interval (5 ms) each
time. So rows go in as multi-row INSERTs (`insert_rows`): a statement of
many rows is one step. Row counts are powers of two (full statements of
`rows_per_statement` rows, then the binary digits of the rest), so only a
few distinct statements are ever prepared, and sqlite3 caches them.

Messages are encoded here too, on the I/O thread: definitions and
assignments canonically (a large one in pieces, `encode_large`, so the event
loop gets the GIL in between), states and snapshots in their own key order
(`encode_batch`, `hbtrio._codec.encode_plain`).

Plain functions of their arguments; those taking a connection block and run
on the I/O thread.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from .._codec import encode, encode_in_pieces, encode_plain, is_large
from .._exceptions import InvalidMessage
from .._message import Message
from ._memory import Proc

__all__ = [
    "INSERT_ASSIGNMENTS",
    "INSERT_RESULTS",
    "INSERT_SNAPSHOTS",
    "Entry",
    "encode_batch",
    "encode_large",
    "insert_rows",
    "rows_per_statement",
]

log = logging.getLogger("hbtrio")

#: Most rows in one INSERT statement (fewer where SQLite allows fewer variables).
_MAX_ROWS_PER_STATEMENT: Final = 1024

INSERT_RESULTS: Final = "INSERT OR REPLACE INTO results (proc, slot, state, snapshot) VALUES "
INSERT_SNAPSHOTS: Final = "INSERT OR REPLACE INTO snapshots (proc, slot, snapshot) VALUES "
INSERT_ASSIGNMENTS: Final = "INSERT INTO assignments (proc, slot, message_id, assignment) VALUES "

# Write-behind entries: (proc, slot, state, snapshot, is_snapshot) for one slot, or
# (proc, first, states, snapshot_every) for a run of states that are their own
# snapshots (from `put_states_nowait`).
_Slot = tuple[Proc, int, Message | None, Message | None, bool]
_Run = tuple[Proc, int, Sequence[Message], int]
Entry = _Slot | _Run


def encode_large(message: Message) -> bytes:
    """Canonical CBOR; a large message in pieces (the event loop gets the GIL between them)."""
    return encode_in_pieces(message) if is_large(message) else encode(message)


def encode_batch(
    batch: list[Entry],
) -> tuple[list[tuple[int, int, bytes, int]], list[tuple[int, int]], list[tuple[int, int, bytes]]]:
    """The rows of a write-behind batch: results, snapshot flags, snapshots of their own."""
    results: list[tuple[int, int, bytes, int]] = []
    flags: list[tuple[int, int]] = []
    snaps: list[tuple[int, int, bytes]] = []
    for entry in batch:
        if len(entry) == 4:  # a run of states that are their own snapshots
            run_proc, first, states, every = entry
            rowid = run_proc.rowid
            try:
                # C-level loops: a catch-up writes thousands of these a second.
                encoded = list(map(encode_plain, states))
            except InvalidMessage:
                pass  # row by row below: every other row is written
            else:
                n = len(states)
                marks = [0] * n
                start = (-first) % every
                marks[start::every] = [1] * len(range(start, n, every))
                slots = range(first, first + n)
                results.extend(zip(itertools.repeat(rowid), slots, encoded, marks))
                continue
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


def rows_per_statement(conn: sqlite3.Connection) -> int:
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


def insert_rows(
    conn: sqlite3.Connection,
    head: str,
    width: int,
    rows: Sequence[tuple[Any, ...]],
    per_statement: int,
) -> None:
    """Insert ``rows`` with as few statements as SQLite allows (I/O thread).

    Full statements of ``per_statement`` rows, then one per binary digit of
    the rest (see the module docstring).
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
