"""The database's schema: its tables, its version, the migrations, and opening a connection.

The schema's version is the one row of ``hbtrio_schema``. `connect` opens a
connection with the store's session settings and brings the database to
`SCHEMA_VERSION`: a new database gets every table, an older one the
migrations from its version up (`MIGRATIONS`), all in one transaction under
an advisory lock, so nodes starting together never race each other's DDL and
a crash leaves the old version or the new one. A database of a newer version
is refused (`StoreError`): this hbtrio does not know what it holds.

Definitions and assignments are canonical CBOR; states and snapshots are
CBOR in the state's own key order (as in the SQLite store)::

    processes(id bigint identity PK, pid text UNIQUE, definition bytea)
    assignments(proc, slot, message_id text, assignment bytea, epoch)  -- PK (proc, slot)
    results(proc, slot, state bytea, snapshot bool, epoch)             -- PK (proc, slot)
    snapshots(proc, slot, snapshot bytea, epoch)                       -- a device's own form
    blobs(id text PK, data bytea)
    nodes(id bigint identity PK, url, name, lease interval, started_at,
          heartbeat_at, stopped_at)                                    -- one row per incarnation
    owners(proc PK, node NULL, epoch, since)                           -- node NULL: released
    takeovers(proc, epoch, node, previous, at)                         -- PK (proc, epoch)

``epoch`` on a written row is the owner's epoch it was written under: the
fence (``_iothread``) makes sure no row of an epoch commits after the
takeover that ended it. Times are PostgreSQL's (``clock_timestamp()``), so
nodes never compare their own clocks. The hot tables carry no foreign keys
(a key check per row); ``owners`` references ``processes`` and ``nodes``.

Version 1 is the first; `MIGRATIONS` is empty until a version 2 exists.
`connect` blocks (it runs on the store's threads, which own their
connections).
"""

from __future__ import annotations

from typing import Any, Final

import psycopg

from .._exceptions import StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "connect", "ensure_schema"]

SCHEMA_VERSION: Final = 1

#: Taken (``pg_advisory_xact_lock``) while the schema is created or migrated.
_SCHEMA_LOCK: Final = 0x6862_7472_696F  # "hbtrio"

_TABLES_V1: Final = """
CREATE TABLE hbtrio_schema (version integer NOT NULL);
CREATE TABLE processes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pid text NOT NULL UNIQUE,
    definition bytea NOT NULL
);
CREATE TABLE assignments (
    proc bigint NOT NULL,
    slot bigint NOT NULL,
    message_id text NOT NULL,
    assignment bytea NOT NULL,
    epoch bigint NOT NULL,
    PRIMARY KEY (proc, slot)
);
CREATE TABLE results (
    proc bigint NOT NULL,
    slot bigint NOT NULL,
    state bytea NOT NULL,
    snapshot boolean NOT NULL DEFAULT false,
    epoch bigint NOT NULL,
    PRIMARY KEY (proc, slot)
);
CREATE INDEX results_snapshots ON results (proc, slot) WHERE snapshot;
CREATE TABLE snapshots (
    proc bigint NOT NULL,
    slot bigint NOT NULL,
    snapshot bytea NOT NULL,
    epoch bigint NOT NULL,
    PRIMARY KEY (proc, slot)
);
CREATE TABLE blobs (
    id text PRIMARY KEY,
    data bytea NOT NULL
);
CREATE TABLE nodes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url text,
    name text NOT NULL,
    lease interval NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    stopped_at timestamptz
);
CREATE INDEX nodes_live_urls ON nodes (url) WHERE stopped_at IS NULL;
CREATE TABLE owners (
    proc bigint PRIMARY KEY REFERENCES processes (id),
    node bigint REFERENCES nodes (id),
    epoch bigint NOT NULL,
    since timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX owners_node ON owners (node);
CREATE TABLE takeovers (
    proc bigint NOT NULL,
    epoch bigint NOT NULL,
    node bigint NOT NULL,
    previous bigint,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (proc, epoch)
);
"""

#: What brings a database of schema version N (a key) to version N + 1.
MIGRATIONS: Final[dict[int, str]] = {}


def _version(conn: psycopg.Connection[Any]) -> int:
    exists = conn.execute("SELECT to_regclass('hbtrio_schema') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        return 0
    row = conn.execute("SELECT version FROM hbtrio_schema").fetchone()
    return 0 if row is None else int(row[0])


def ensure_schema(conn: psycopg.Connection[Any], where: str) -> None:
    """Bring the database to `SCHEMA_VERSION` (or refuse a newer one). Blocks.

    One transaction, under a session advisory lock taken before it starts (so
    that it sees the catalog as the previous holder left it): concurrent
    callers wait for the first, then find the schema in place.
    """
    if _version(conn) == SCHEMA_VERSION:
        return
    conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
    try:
        with conn.transaction():
            version = _version(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{where}: schema version {version} is newer than this hbtrio "
                    f"({SCHEMA_VERSION})"
                )
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                conn.execute(_TABLES_V1)
                conn.execute("INSERT INTO hbtrio_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                return
            for step in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[step])
            conn.execute("UPDATE hbtrio_schema SET version = %s", (SCHEMA_VERSION,))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))


def connect(
    dsn: str,
    *,
    application_name: str,
    connect_timeout: float,
    idle_in_transaction: float,
    synchronous_commit: str,
    user_timeout: float | None = None,
) -> psycopg.Connection[Any]:
    """A connection in autocommit mode (transactions are explicit) with the store's settings.

    ``idle_in_transaction`` (seconds) makes PostgreSQL end this session if it
    ever sits in an open transaction that long: a node paused or cut off in
    the middle of a write then cannot hold the lock a takeover waits for.
    TCP keepalives and a user timeout (``user_timeout`` seconds, by default
    ``connect_timeout``) make a dead peer an error within about that long
    instead of the system's minutes. Blocks; raises `psycopg.Error`.
    """
    timeout = max(2, round(connect_timeout))  # (libpq takes whole seconds, at least 2)
    unacked = connect_timeout if user_timeout is None else user_timeout
    conn = psycopg.connect(
        dsn,
        autocommit=True,
        connect_timeout=timeout,
        application_name=application_name,
        keepalives=1,
        keepalives_idle=max(1, timeout // 2),
        keepalives_interval=1,
        keepalives_count=max(1, timeout),
        tcp_user_timeout=max(100, round(unacked * 1000)),
    )
    try:
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false),"
            " set_config('synchronous_commit', %s, false)",
            (f"{max(1, round(idle_in_transaction * 1000))}ms", synchronous_commit),
        )
    except BaseException:
        conn.close()
        raise
    return conn
