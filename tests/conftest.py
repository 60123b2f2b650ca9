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
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import settings

import hbtrio

settings.register_profile("ci", derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)

STORE_KINDS = ("memory", "sqlite")


class StoreFactory:
    """Makes stores of one kind that all share the same data (file or object)."""

    def __init__(self, kind: str, path: Path) -> None:
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown store kind {kind!r}")
        self.kind = kind
        self.path = path
        self._memory: hbtrio.MemoryStore | None = None
        self._opened: list[hbtrio.Store] = []

    def __repr__(self) -> str:
        return f"<StoreFactory {self.kind} {self.path}>"

    @property
    def durable(self) -> bool:
        """True when a reopened store is a new object reading the same file."""
        return self.kind == "sqlite"

    def new(self, **options: object) -> hbtrio.Store:
        """A store over this factory's data, not opened yet.

        ``options`` go to `SQLiteStore` (ignored for memory stores).
        """
        if self.kind == "memory":
            if self._memory is None:
                self._memory = hbtrio.MemoryStore()
            return self._memory
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
