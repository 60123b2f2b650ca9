"""Results and snapshots written behind: SQLite's flush job.

Theory of operation
-------------------
Results and snapshots are written behind: `SQLiteStore.put_results_nowait`
records them in a process's pending tables (``_memory.Proc``: readable at
once) and in the outbox, and the write-behind takes the outbox to the I/O
thread in flush jobs, with backpressure on producers while more than
``max_pending`` wait. That machinery (the outbox, pieces of `FLUSH_ROWS`
rows, what a commit or a failure does, `wait_writable`, `flush`) is shared
with the PostgreSQL store (``hbtrio._writebehind.WriteBehind``); this module
holds SQLite's flush job: each piece goes in as multi-row INSERTs
(``_writes``, `IOThread.per_statement` rows a statement) inside the round's
transaction, and the job stops after a piece once another job waits.

Everything here runs on the event-loop thread but the flush job itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Final

import outcome

from .._store import Store
from .._writebehind import FLUSH_ROWS, Entry
from .._writebehind import WriteBehind as _WriteBehind
from ._iothread import IOThread, Job
from ._memory import ProcessCache
from ._writes import INSERT_RESULTS, INSERT_SNAPSHOTS, encode_batch, insert_rows

__all__ = ["FLUSH_ROWS", "WriteBehind"]

#: Most pieces of `FLUSH_ROWS` rows in one flush job.
_FLUSH_PIECES: Final = 64


class WriteBehind(_WriteBehind):
    """The results a store has taken and not made durable yet, and their way to the file.

    ``owner``'s ``backlogged`` is kept up to date. Event-loop thread only; the
    async methods block as they say.
    """

    FLUSH_PIECES = _FLUSH_PIECES
    _io: IOThread

    def __init__(self, owner: Store, io: IOThread, memory: ProcessCache, max_pending: int) -> None:
        super().__init__(owner, io, memory, max_pending)

    def _job(self, pieces: list[list[Entry]], done: Callable[[outcome.Outcome[Any]], None]) -> Job:
        io = self._io

        def write(conn: sqlite3.Connection) -> int:
            per_statement, written = io.per_statement, 0
            for piece in pieces:
                if written and io.others_waiting():
                    break
                results, flags, snaps = encode_batch(piece)
                insert_rows(conn, INSERT_RESULTS, 4, results, per_statement)
                if flags:
                    conn.executemany(
                        "UPDATE results SET snapshot = 1 WHERE proc = ? AND slot = ?", flags
                    )
                insert_rows(conn, INSERT_SNAPSHOTS, 3, snaps, per_statement)
                written += 1
            return written

        return Job(write, True, callback=done)

    def _landed(self, pieces: list[list[Entry]], value: Any) -> None:
        written: int = value
        self.outbox[:0] = [e for piece in pieces[written:] for e in piece]
        self._committed([e for piece in pieces[:written] for e in piece])
