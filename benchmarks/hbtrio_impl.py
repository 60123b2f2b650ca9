"""The ``hbtrio`` impl: the workloads on hbtrio's public API only."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio

import hbtrio

__all__ = ["HbtrioAdapter", "adapter"]

T = TypeVar("T")


class HbtrioAdapter:
    """hbtrio as `benchmarks._harness.Adapter`."""

    name = "hbtrio"

    def run(self, main: Callable[[], Awaitable[T]]) -> T:
        return trio.run(main)

    def task_group(self) -> AbstractAsyncContextManager[trio.Nursery]:
        return trio.open_nursery()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def make_store(self, kind: str, path: str | None) -> Any:
        if kind == "sqlite":
            assert path is not None
            return hbtrio.SQLiteStore(path)
        return hbtrio.MemoryStore()

    @asynccontextmanager
    async def open_engine(
        self,
        store: Any,
        *,
        devices: Mapping[str, object] | None = None,
        cache_frequency: int = 1,
    ) -> AsyncIterator[Any]:
        async with hbtrio.open_engine(
            store, devices=dict(devices or {}), cache_frequency=cache_frequency
        ) as engine:
            yield engine

    async def schedule_many(self, engine: Any, pid: str, messages: Sequence[Any]) -> list[int]:
        many = getattr(engine, "schedule_many", None)
        if many is not None:
            return list(await many(pid, messages))
        return [await engine.schedule(pid, m) for m in messages]

    def commits(self, store: Any) -> int | None:
        statistics = getattr(store, "statistics", None)
        if statistics is None:
            return None
        commits = getattr(statistics(), "commits", None)
        return commits if isinstance(commits, int) else None

    def engine_stats(self, engine: Any) -> dict[str, Any] | None:
        stats = engine.stats()
        fields = getattr(type(stats), "__attrs_attrs__", None)
        names = [f.name for f in fields] if fields is not None else list(vars(stats))
        return {name: getattr(stats, name) for name in names}

    def live_workers(self, engine: Any) -> int | None:
        return len(engine.workers)


@functools.cache
def adapter() -> HbtrioAdapter:
    """The shared `HbtrioAdapter`."""
    return HbtrioAdapter()
