"""`open_test_engine`: `hbtrio.open_engine` with the checks a test wants on exit.

No task started inside the block outlives it, and no worker crashed. Runs
on the caller's Trio loop, like `hbtrio.open_engine`, whose blocking
behaviour it has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._engine import Engine, open_engine
from .._store import Store

__all__ = ["open_test_engine"]


@asynccontextmanager
async def open_test_engine(
    store: Store | None = None,
    *,
    devices: Mapping[str, object] | None = None,
    check_tasks: bool = True,
    allow_leader_deaths: bool = False,
    **options: Any,
) -> AsyncIterator[Engine]:
    """`hbtrio.open_engine` with the checks a test wants when the block exits.

    On a clean exit it raises `AssertionError` if any task started since the
    block was entered is still alive (``check_tasks``; leave it on unless your
    test keeps its own background tasks running across the block), or if a
    worker crashed (``engine.stats().leader_deaths``, unless
    ``allow_leader_deaths``). ``options`` go to `hbtrio.open_engine`
    (``max_idle``, ``cache_frequency``, ``shutdown_grace``, ``slot_timeout``).

    A pytest-trio fixture::

        @pytest.fixture
        async def engine():
            async with hbtrio.testing.open_test_engine(devices={"mine@1.0": Mine()}) as engine:
                yield engine
    """
    before = trio.lowlevel.current_statistics().tasks_living
    async with open_engine(store, devices=devices, **options) as engine:
        yield engine
    if not allow_leader_deaths and engine.stats().leader_deaths:
        raise AssertionError(
            f"{engine.stats().leader_deaths} worker(s) crashed (see the 'hbtrio' log)"
        )
    if check_tasks:
        after = trio.lowlevel.current_statistics().tasks_living
        if after > before:
            raise AssertionError(f"{after - before} task(s) outlived the engine")
