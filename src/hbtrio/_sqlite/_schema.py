"""The file's schema: its tables, its version, the migrations, and opening a connection.

The schema's version is ``PRAGMA user_version``. `connect` opens a
connection in WAL mode with the store's ``synchronous`` setting and brings
the file to `SCHEMA_VERSION`: a new file gets every table, an older one the
migrations from its version up (`_MIGRATIONS`), all in one transaction, so a
crash leaves the old version or the new one, never half of it. A file of a
newer version is refused (`StoreError`): this hbtrio does not know what it
holds.

Definitions and assignments are canonical CBOR; states and snapshots are
CBOR in the state's own key order (`hbtrio._codec.encode_plain`: the same
message, encoded three times faster, and nothing hashes these bytes)::

    processes(id INTEGER PRIMARY KEY, pid TEXT UNIQUE, definition BLOB)
    assignments(proc, slot, message_id TEXT, assignment BLOB)   -- PK (proc, slot)
    results(proc, slot, state BLOB, snapshot INT)   -- PK (proc, slot); snapshot=1: the state
                                                    -- is also the restorable snapshot
    snapshots(proc, slot, snapshot BLOB)            -- snapshots in a device's own form
    blobs(id TEXT PRIMARY KEY, data BLOB)           -- id: the unpadded base64url SHA-256

Version 1 had no ``blobs`` table. `connect` blocks (it runs on the store's
I/O thread, which owns the connection).
"""

from __future__ import annotations

import sqlite3
from typing import Final

from .._exceptions import StoreError

SCHEMA_VERSION: Final = 2

_BLOBS: Final = """
CREATE TABLE IF NOT EXISTS blobs (
    id TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
"""

#: The tables of schema version 1.
_TABLES_V1: Final = """
CREATE TABLE IF NOT EXISTS processes (
    id INTEGER PRIMARY KEY,
    pid TEXT NOT NULL UNIQUE,
    definition BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    proc INTEGER NOT NULL REFERENCES processes(id),
    slot INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    assignment BLOB NOT NULL,
    PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    proc INTEGER NOT NULL REFERENCES processes(id),
    slot INTEGER NOT NULL,
    state BLOB NOT NULL,
    snapshot INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS results_snapshots ON results (proc, slot) WHERE snapshot = 1;
CREATE TABLE IF NOT EXISTS snapshots (
    proc INTEGER NOT NULL REFERENCES processes(id),
    slot INTEGER NOT NULL,
    snapshot BLOB NOT NULL,
    PRIMARY KEY (proc, slot)
) WITHOUT ROWID;
"""
#: The whole schema (what a new file gets).
_SCHEMA: Final = _TABLES_V1 + _BLOBS

#: What brings a file of schema version N (a key) to version N + 1.
_MIGRATIONS: Final = {1: _BLOBS}


def connect(path: str, synchronous: str) -> sqlite3.Connection:
    """A connection to ``path`` with the schema at `SCHEMA_VERSION`. Blocks.

    Raises `StoreError` for a file of a newer schema, `sqlite3.Error` when
    SQLite fails; the connection is closed again then.
    """
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=5.0,
        cached_statements=256,
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version} is newer than this hbtrio ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            # One transaction, so a crash leaves either no schema or all of it (or
            # the old version, not half of the new one).
            steps = (
                _SCHEMA
                if version == 0
                else "".join(_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
            )
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{steps}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
            )
    except BaseException:
        conn.close()
        raise
    return conn
