"""Fixtures shared by the test suite: stores of every kind, opened and closed for you.

``store`` is an open store, once per kind (``MemoryStore`` and ``SQLiteStore``);
``store_factory`` makes, opens and *reopens* stores of one kind, so a test can
check what survives a restart: reopening a ``MemoryStore`` hands back the same
object (memory is only as durable as the object), reopening a ``SQLiteStore``
makes a fresh object on the same file. ``sqlite_factory`` is the same for
tests that only make sense with a file. Every store a factory opened is
closed when the test ends.

Hypothesis explores new examples on every local run. Under CI (the ``CI``
environment variable set, as `.ci/run` has it) the ``ci`` profile makes each
property test draw the same examples every time, so a submission's verdict
does not depend on the luck of the draw; set ``HYPOTHESIS_PROFILE=default``
to explore there too.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import hbtrio
from pgserver import PgServer, start_or_skip

settings.register_profile("ci", derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)

STORE_KINDS = ("memory", "sqlite")
#: Options of `SQLiteStore` a `PostgresStore` takes too.
_SHARED_OPTIONS = (
    "max_pending",
    "max_cached_processes",
    "max_cached_assignments",
    "max_cached_bytes",
)


class StoreFactory:
    """Makes stores of one kind that all share the same data (file, object or database).

    ``postgres`` (a `PostgresStore` on ``dsn``, lease 1 s) is made by the
    PostgreSQL conformance tests (``test_pg_conformance.py``).
    """

    def __init__(self, kind: str, path: Path, dsn: str | None = None) -> None:
        if kind not in (*STORE_KINDS, "postgres"):
            raise ValueError(f"unknown store kind {kind!r}")
        self.kind = kind
        self.path = path
        self.dsn = dsn
        self._memory: hbtrio.MemoryStore | None = None
        self._opened: list[hbtrio.Store] = []

    def __repr__(self) -> str:
        return f"<StoreFactory {self.kind} {self.path}>"

    @property
    def durable(self) -> bool:
        """True when a reopened store is a new object reading the same file (or database)."""
        return self.kind != "memory"

    def new(self, **options: object) -> hbtrio.Store:
        """A store over this factory's data, not opened yet.

        ``options`` go to `SQLiteStore` (ignored for memory stores).
        """
        if self.kind == "memory":
            if self._memory is None:
                self._memory = hbtrio.MemoryStore()
            return self._memory
        if self.kind == "postgres":
            assert self.dsn is not None
            shared = {k: v for k, v in options.items() if k in _SHARED_OPTIONS}
            return hbtrio.PostgresStore(self.dsn, lease=1.0, **shared)  # type: ignore[arg-type]
        return hbtrio.SQLiteStore(self.path, **options)  # type: ignore[arg-type]

    async def open(self, **options: object) -> hbtrio.Store:
        """A new, opened store over this factory's data; closed at the end of the test."""
        store = self.new(**options)
        await store.open()
        self._opened.append(store)
        return store

    async def reopen(self, store: hbtrio.Store, **options: object) -> hbtrio.Store:
        """Close ``store`` and open a store over the same data, as a restart would."""
        await store.close()
        return await self.open(**options)

    async def aclose(self) -> None:
        """Close every store this factory opened (closing twice is harmless)."""
        while self._opened:
            await self._opened.pop().close()


@pytest.fixture(params=STORE_KINDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """A `StoreFactory` per store kind."""
    factory = StoreFactory(request.param, tmp_path / "s.sqlite")
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def sqlite_factory(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """A `StoreFactory` for SQLite only: for what only a file can show."""
    factory = StoreFactory("sqlite", tmp_path / "s.sqlite")
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def store(store_factory: StoreFactory) -> hbtrio.Store:
    """An open store, once per kind (``MemoryStore`` and ``SQLiteStore(tmp_path / "s.sqlite")``)."""
    return await store_factory.open()


# -- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (started on first use, see ``pgserver``)."""
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """The DSN of a fresh, empty database on the session's server."""
    return pg_server.create_database()
