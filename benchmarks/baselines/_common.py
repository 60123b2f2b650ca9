"""Pieces both baselines share: process IDs, dedup keys and a blocking SQLite backend."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Final

import cbor2

State = dict[str, Any]
#: Per-slot results waiting to be written: ``(pid, [(slot, state), ...])``.
Batch = tuple[str, list[tuple[int, State]]]

#: Results computed but not yet written beyond which a worker waits for the writer.
MAX_PENDING: Final = 16384


class SlotNotScheduled(LookupError):
    """A request for a slot beyond the latest scheduled one."""


def pid_of(definition: Mapping[str, Any]) -> str:
    """A process ID: SHA-256 of the definition's sorted-keys JSON."""
    raw = json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def initial_state() -> State:
    """``counter@1.0``'s state at slot 0."""
    return {"count": 0, "at-slot": 0}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("m", tuple(sorted((k, _freeze(v)) for k, v in value.items() if k != "priv")))
    if isinstance(value, list | tuple):
        return ("l", tuple(_freeze(v) for v in value))
    return (type(value).__name__, value)


def dedup_key(base: Mapping[str, Any], request: Mapping[str, Any]) -> Any:
    """A hashable key equal for equal ``(base, request)`` pairs, ignoring ``"priv"``."""
    return (_freeze(base), _freeze(request))


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS processes (
    id INTEGER PRIMARY KEY, pid TEXT NOT NULL UNIQUE, definition BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    proc INTEGER NOT NULL, slot INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    proc INTEGER NOT NULL, slot INTEGER NOT NULL, state BLOB NOT NULL, PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    proc INTEGER NOT NULL, slot INTEGER NOT NULL, PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
"""


class SQLiteBackend:
    """Blocking SQLite persistence. Call it from one thread at a time (the caller's I/O lane).

    Rows are keyed by a small integer per process. A snapshot row marks a slot
    whose stored result is a full, restorable state (true of every
    ``counter@1.0`` result), so it costs no second copy. WAL journal with
    ``synchronous=FULL``, as hbtrio's `SQLiteStore` defaults to.
    """

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        if self._conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            self._conn.executescript(_SCHEMA)
            self._conn.execute("PRAGMA user_version = 1")
            self._conn.commit()
        self._ids: dict[str, int] = {}
        self.commits = 0

    def close(self) -> None:
        self._conn.close()

    def _commit(self) -> None:
        self._conn.commit()
        self.commits += 1

    def _id(self, pid: str) -> int:
        rowid = self._ids.get(pid)
        if rowid is None:
            row = self._conn.execute("SELECT id FROM processes WHERE pid = ?", (pid,)).fetchone()
            if row is None:
                raise LookupError(f"process {pid} not found")
            rowid = self._ids[pid] = int(row[0])
        return rowid

    def put_process(self, pid: str, definition: Mapping[str, Any]) -> None:
        blob = cbor2.dumps(dict(definition))
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO processes (pid, definition) VALUES (?, ?)", (pid, blob)
        )
        if cur.rowcount:
            self._conn.execute("INSERT INTO assignments VALUES (?, 0, ?)", (cur.lastrowid, blob))
        self._commit()

    def latest_slot(self, pid: str) -> int:
        """The highest scheduled slot of ``pid``; -1 if it was never spawned."""
        try:
            rowid = self._id(pid)
        except LookupError:
            return -1
        row = self._conn.execute(
            "SELECT max(slot) FROM assignments WHERE proc = ?", (rowid,)
        ).fetchone()
        return -1 if row[0] is None else int(row[0])

    def append(self, pid: str, first: int, messages: Sequence[Mapping[str, Any]]) -> None:
        rowid = self._id(pid)
        self._conn.executemany(
            "INSERT INTO assignments VALUES (?, ?, ?)",
            [(rowid, first + i, cbor2.dumps(dict(m))) for i, m in enumerate(messages)],
        )
        self._commit()

    def bodies(self, pid: str, start: int, stop: int) -> list[Mapping[str, Any]]:
        rows = self._conn.execute(
            "SELECT body FROM assignments WHERE proc = ? AND slot >= ? AND slot < ? ORDER BY slot",
            (self._id(pid), start, stop),
        ).fetchall()
        return [cbor2.loads(row[0]) for row in rows]

    def result(self, pid: str, slot: int) -> State | None:
        row = self._conn.execute(
            "SELECT state FROM results WHERE proc = ? AND slot = ?", (self._id(pid), slot)
        ).fetchone()
        return None if row is None else cbor2.loads(row[0])

    def restore(self, pid: str, at_most: int) -> tuple[State, list[Mapping[str, Any]]]:
        """The latest snapshot at or below ``at_most`` (or slot 0) and the bodies after it."""
        row = self._conn.execute(
            "SELECT r.state FROM snapshots s JOIN results r ON r.proc = s.proc AND r.slot = s.slot"
            " WHERE s.proc = ? AND s.slot <= ? ORDER BY s.slot DESC LIMIT 1",
            (self._id(pid), at_most),
        ).fetchone()
        state = initial_state() if row is None else cbor2.loads(row[0])
        return state, self.bodies(pid, state["at-slot"] + 1, at_most + 1)

    def write(
        self, batches: Sequence[Batch], snapshots: Sequence[tuple[str, int]], every: int
    ) -> None:
        """Write results (a snapshot mark every ``every`` slots) and extra marks, in one commit."""
        dumps, ids = cbor2.dumps, {pid: self._id(pid) for pid, _ in batches}
        self._conn.executemany(
            "INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
            [(ids[pid], slot, dumps(state)) for pid, rows in batches for slot, state in rows],
        )
        marks = [(ids[pid], slot) for pid, rows in batches for slot, _ in rows if slot % every == 0]
        marks.extend((self._id(pid), slot) for pid, slot in snapshots)
        if marks:
            self._conn.executemany("INSERT OR IGNORE INTO snapshots VALUES (?, ?)", marks)
        self._commit()
