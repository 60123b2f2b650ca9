"""Results and snapshots written behind, each under its owner's epoch.

Theory of operation
-------------------
As in the SQLite store, with the same machinery (``hbtrio._writebehind``):
`PostgresStore`'s ``put_results_nowait`` records results in the process's
pending tables (readable at once) and in the outbox, and one flush job at a
time takes the outbox to the data thread in pieces of `FLUSH_ROWS` rows,
stopping after a piece once another job waits; backpressure holds producers
back while more than ``max_pending`` wait. This module holds the flush job
and what its commit means.

What is new is the fence. Every entry belongs to a ``PgProc``, the store's
memory of one process *under one epoch*; a flush job names the ``(row ID,
epoch)`` pairs it writes, the data thread refuses the pairs whose epoch is
no longer the process's (``_iothread``), and the job writes only the rest.
The rows of a refused pair are dropped, never retried (they would be refused
for ever), and the store is told (``refused``), which ends the process here
like a lost worker. Rows are encoded before the transaction (`Job.prepare`)
and a piece's rows are made unique by ``(process, slot)`` (one statement may
not update a row twice): the last state wins and snapshot flags add up.

Everything here runs on the event-loop thread but the flush job itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import attrs
import outcome
import psycopg

from .._codec import encode_plain
from .._exceptions import InvalidMessage
from .._sqlite._memory import Proc, ProcessCache
from .._store import Store
from .._writebehind import FLUSH_ROWS, Entry
from .._writebehind import WriteBehind as _WriteBehind
from ._iothread import DataThread, Job
from ._rows import write_results

__all__ = ["FLUSH_ROWS", "PgProc", "WriteBehind"]

log = logging.getLogger("hbtrio")

#: Most pieces of `FLUSH_ROWS` rows in one flush job.
_FLUSH_PIECES: Final = 16


@attrs.define(eq=False)
class PgProc(Proc):
    """What the store keeps in memory about one process it holds, under one epoch."""

    pid: str = ""
    epoch: int = 0


_Result = tuple[int, int, bytes, bool, int]
_Rows = tuple[list[_Result], list[tuple[int, int]], list[tuple[int, int, bytes, int]]]


def _encode_piece(piece: list[Entry]) -> _Rows:
    """A piece's rows, unique by (process, slot): results, snapshot flags, own snapshots."""
    results: dict[tuple[int, int], _Result] = {}
    flags: dict[tuple[int, int], tuple[int, int]] = {}
    snaps: dict[tuple[int, int], tuple[int, int, bytes, int]] = {}

    def result(rowid: int, slot: int, data: bytes, own: bool, epoch: int) -> None:
        key = (rowid, slot)
        old = results.get(key)
        results[key] = (rowid, slot, data, own or (old is not None and old[3]), epoch)

    for entry in piece:
        if len(entry) == 4:
            run_proc, first, states, every = entry
            for slot, run_state in enumerate(states, first):
                try:
                    data = encode_plain(run_state)
                except InvalidMessage as exc:
                    log.error("slot %d of %s cannot be stored: %s", slot, run_proc.pid, exc)
                    continue
                result(run_proc.rowid, slot, data, slot % every == 0, run_proc.epoch)
            continue
        proc, slot, state, snapshot, is_snap = entry
        key = (proc.rowid, slot)
        try:
            if state is not None:
                own = is_snap and snapshot is None
                result(proc.rowid, slot, encode_plain(state), own, proc.epoch)
            elif is_snap and snapshot is None:
                flags[key] = key
            if is_snap and snapshot is not None:
                snaps[key] = (proc.rowid, slot, encode_plain(snapshot), proc.epoch)
        except InvalidMessage as exc:
            log.error("slot %d of %s cannot be stored: %s", slot, proc.pid, exc)
    for key in list(flags):
        if key in results:  # flagged in the same piece as it is written
            row = results[key]
            results[key] = (*row[:3], True, row[4])
            del flags[key]
    return list(results.values()), list(flags.values()), list(snaps.values())


def _pair(entry: Entry) -> tuple[int, int]:
    proc = entry[0]
    return proc.rowid, proc.epoch


class WriteBehind(_WriteBehind):
    """The results a store has taken and not made durable yet, and their way to the server.

    ``refused(pid, epoch, owner URL)`` is called (event loop) for each process
    whose rows the fence refused. ``owner``'s ``backlogged`` is kept up to date.
    """

    FLUSH_PIECES = _FLUSH_PIECES
    _io: DataThread

    def __init__(
        self,
        owner: Store,
        io: DataThread,
        memory: ProcessCache,
        max_pending: int,
        refused: Callable[[str, int, str | None], None],
    ) -> None:
        super().__init__(owner, io, memory, max_pending)
        self._refused = refused
        #: Rows the fence refused (never written).
        self.fenced_rows = 0

    def _job(self, pieces: list[list[Entry]], done: Callable[[outcome.Outcome[Any]], None]) -> Job:
        io = self._io
        encoded: list[_Rows] = []
        fence = {
            (entry[0].rowid, entry[0].epoch, entry[0].pid) for piece in pieces for entry in piece
        }

        def prepare() -> None:
            encoded.extend(_encode_piece(piece) for piece in pieces)

        def write(conn: psycopg.Connection[Any], refused: dict[tuple[int, int], str | None]) -> Any:
            written = 0
            for results, flags, snaps in encoded:
                if written and io.others_waiting():
                    break
                if refused:
                    results = [r for r in results if (r[0], r[4]) not in refused]
                    snaps = [s for s in snaps if (s[0], s[3]) not in refused]
                write_results(conn, results, flags, snaps)
                written += 1
            return written, refused

        return Job(
            write,
            True,
            fence=tuple(sorted(fence)),
            prepare=prepare,
            refuse_whole=False,
            callback=done,
        )

    def _landed(self, pieces: list[list[Entry]], value: Any) -> None:
        written, refused = value
        self.outbox[:0] = [e for piece in pieces[written:] for e in piece]
        done_entries = [e for piece in pieces[:written] for e in piece]
        self._committed([e for e in done_entries if _pair(e) not in refused])
        self._drop([e for e in done_entries if _pair(e) in refused], refused)

    def _count(self, entry: Entry) -> int:
        return len(entry[2]) if len(entry) == 4 else int(entry[2] is not None)

    def _drop(self, entries: list[Entry], owners: dict[tuple[int, int], str | None]) -> None:
        """Entries the fence refused: never written; their processes are lost here."""
        told: set[tuple[int, int]] = set()
        for entry in entries:
            n = self._count(entry)
            self.pending_count -= n
            self.fenced_rows += n
            proc = entry[0]
            if len(entry) == 4:
                for slot in range(entry[1], entry[1] + len(entry[2])):
                    proc.pending.pop(slot, None)
                    proc.pending_snapshots.pop(slot, None)
            else:
                proc.pending.pop(entry[1], None)
                proc.pending_snapshots.pop(entry[1], None)
            pair = (proc.rowid, proc.epoch)
            if pair not in told:
                told.add(pair)
                self._refused(proc.pid, proc.epoch, owners.get(pair))
        self._owner.backlogged = self.pending_count > self._max_pending
