"""The store contract and the engine over a store, run against `PostgresStore`.

Every test of ``test_stores.py`` (but those about the SQLite file), and the
tests of ``test_process.py``, ``test_scheduler.py`` and ``test_blobs.py``
that take a store, run here again with ``store_factory`` (and so ``store``)
giving `PostgresStore` objects on a fresh database of the session's
PostgreSQL server (``pgserver``). A reopened store is a new incarnation of a
node on the same database: it takes over what the closed one released.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import test_blobs
import test_process
import test_scheduler
import test_stores
from conftest import StoreFactory


@pytest.fixture
async def store_factory(pg_dsn: str, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """A `StoreFactory` of `PostgresStore` objects on one fresh database."""
    factory = StoreFactory("postgres", tmp_path / "unused", dsn=pg_dsn)
    try:
        yield factory
    finally:
        await factory.aclose()


def _store_tests(module: object) -> dict[str, object]:
    """The tests of ``module`` that take a store (``store`` or ``store_factory``)."""
    found = {}
    for name, fn in vars(module).items():
        if not name.startswith("test_") or name.startswith("test_sqlite"):
            continue
        code = getattr(fn, "__code__", None)
        if code is None:
            continue
        params = code.co_varnames[: code.co_argcount]
        if "store" in params or "store_factory" in params:
            found[f"{name}__{module.__name__}"] = fn  # type: ignore[attr-defined]
    return found


for _module in (test_stores, test_process, test_scheduler, test_blobs):
    globals().update(_store_tests(_module))
del _module
