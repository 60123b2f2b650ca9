"""`SQLiteStore`: the embedded default store, one SQLite file in WAL mode.

The modules, each importing only those above it:

* ``_schema``: the tables, the schema version, migrations, `connect`;
* ``_memory``: what the store keeps in memory about processes, and its bounds;
* ``_writes``: rows going into the file (encoding, multi-row INSERTs);
* ``_checks``: rows read from the file, checked against their IDs;
* ``_reads``: reading a process, a snapshot, a run of assignments, a blob;
* ``_iothread``: the thread that owns the connection: job rounds, group
  commit, the file lock, the GIL handoff;
* ``_writebehind``: results written behind, flush jobs, backpressure;
* ``_sqlitestore``: `SQLiteStore`, the `hbtrio.Store` operations over them.

Each module's docstring explains its part; what blocks and what is
cancellation-safe is on each function.
"""

from ._sqlitestore import SQLiteStore as SQLiteStore

__all__ = ["SQLiteStore"]
