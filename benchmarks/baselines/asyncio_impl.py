"""The ``asyncio`` impl: a straightforward asyncio engine for the workloads.

The same design as the ``trio`` impl, written the usual asyncio way: one
worker `asyncio.Task` per process computes forward in chunks of `CHUNK`
slots (``await asyncio.sleep(0)`` between chunks), waiters of a slot share an
`asyncio.Event`, identical concurrent resolutions share the leader's result,
and SQLite runs on a one-thread executor with results written behind by a
writer task.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from .._harness import CHUNK
from ._common import (
    MAX_PENDING,
    Batch,
    SlotNotScheduled,
    SQLiteBackend,
    State,
    dedup_key,
    initial_state,
    pid_of,
)

__all__ = ["Engine", "adapter", "open_engine"]

T = TypeVar("T")


class _Proc:
    """One process: its schedule, results, waiters and worker bookkeeping."""

    __slots__ = (
        "bodies",
        "first",
        "latest",
        "pid",
        "results",
        "running",
        "state",
        "target",
        "waiters",
        "wake",
    )

    def __init__(self, pid: str, latest: int, state: State | None) -> None:
        self.pid = pid
        self.latest = latest
        self.bodies: list[Mapping[str, Any]] = []  # bodies[i] is the message at slot first + i
        self.first = 1
        self.results: dict[int, State] = {} if state is None else {0: state}
        self.state = state
        self.target = 0
        self.waiters: dict[int, asyncio.Event] = {}
        self.wake = asyncio.Event()
        self.running = False


class _Call:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Engine:
    """The baseline engine; make it with `open_engine`."""

    def __init__(
        self,
        db: SQLiteBackend | None,
        pool: ThreadPoolExecutor | None,
        devices: Mapping[str, object],
        cache_frequency: int,
    ) -> None:
        self._db = db
        self._pool = pool
        self._devices = devices
        self._every = cache_frequency
        self._procs: dict[str, _Proc] = {}
        self._calls: dict[Any, _Call] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._schedule_lock = asyncio.Lock()
        self._pending: list[Batch] = []
        self._pending_rows = 0
        self._snapshots: list[tuple[str, int]] = []
        self._dirty = asyncio.Event()
        self._written = asyncio.Event()
        self._closing = False
        self.slots_computed = 0

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # processes and schedules ------------------------------------------------------------------

    async def spawn(self, definition: Mapping[str, Any]) -> str:
        pid = pid_of(definition)
        if pid not in self._procs:
            if self._db is not None:
                await self._io(self._db.put_process, pid, definition)
            self._procs[pid] = _Proc(pid, 0, initial_state())
        return pid

    async def _proc(self, pid: str) -> _Proc:
        proc = self._procs.get(pid)
        if proc is None:
            latest = -1 if self._db is None else await self._io(self._db.latest_slot, pid)
            if latest < 0:
                raise LookupError(f"process {pid} not found")
            proc = self._procs.setdefault(pid, _Proc(pid, latest, None))
        return proc

    async def schedule_many(self, pid: str, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        proc = await self._proc(pid)
        async with self._schedule_lock:
            first = proc.latest + 1
            if self._db is not None:
                await self._io(self._db.append, pid, first, messages)
            if proc.first + len(proc.bodies) == first:
                proc.bodies.extend(messages)
            proc.latest += len(messages)
        return list(range(first, proc.latest + 1))

    async def schedule(self, pid: str, message: Mapping[str, Any]) -> int:
        return (await self.schedule_many(pid, [message]))[0]

    # compute -------------------------------------------------------------------------------------

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def compute(self, pid: str, slot: int) -> State:
        proc = self._procs.get(pid) or await self._proc(pid)
        state = proc.results.get(slot)
        if state is not None:
            return state
        if slot > proc.latest:
            raise SlotNotScheduled(f"slot {slot} of {pid} is not scheduled")
        if self._db is not None and (
            not proc.running or (proc.state is not None and slot <= proc.state["at-slot"])
        ):
            stored = await self._io(self._db.result, pid, slot)
            if stored is not None:
                return stored
        event = proc.waiters.get(slot)
        if event is None:
            event = proc.waiters[slot] = asyncio.Event()
        if slot > proc.target:
            proc.target = slot
            if proc.running:
                proc.wake.set()
            else:
                proc.running = True
                self._start(self._work(proc))
        await event.wait()
        return proc.results[slot]

    async def _work(self, proc: _Proc) -> None:
        if proc.state is None:
            await self._restore(proc)
        state = proc.state
        assert state is not None
        results, waiters, persist = proc.results, proc.waiters, self._db is not None
        while True:
            slot = state["at-slot"]
            if slot >= proc.target:
                proc.wake = asyncio.Event()
                await proc.wake.wait()
                continue
            stop = min(proc.target, slot + CHUNK)
            if stop - proc.first >= len(proc.bodies):
                await self._load_bodies(proc, stop)
            bodies, first = proc.bodies, proc.first
            self.slots_computed += stop - slot
            if persist:
                rows: list[tuple[int, State]] = []
                while slot < stop:
                    slot += 1
                    state = {"count": state["count"] + bodies[slot - first]["n"], "at-slot": slot}
                    results[slot] = state
                    rows.append((slot, state))
                    event = waiters.pop(slot, None)
                    if event is not None:
                        event.set()
                proc.state = state
                self._persist(proc.pid, rows)
                while self._pending_rows > MAX_PENDING:
                    await self._written.wait()
            else:
                while slot < stop:
                    slot += 1
                    state = {"count": state["count"] + bodies[slot - first]["n"], "at-slot": slot}
                    results[slot] = state
                    event = waiters.pop(slot, None)
                    if event is not None:
                        event.set()
                proc.state = state
            if slot < proc.target:
                await asyncio.sleep(0)

    async def _restore(self, proc: _Proc) -> None:
        assert self._db is not None
        state, bodies = await self._io(self._db.restore, proc.pid, proc.target)
        slot = state["at-slot"]
        proc.state, proc.bodies, proc.first = state, bodies, slot + 1
        proc.results[slot] = state
        event = proc.waiters.pop(slot, None)
        if event is not None:
            event.set()

    async def _load_bodies(self, proc: _Proc, stop: int) -> None:
        if self._db is None:
            raise SlotNotScheduled(f"slot {stop} of {proc.pid} is not scheduled")
        start = proc.first + len(proc.bodies)
        proc.bodies.extend(await self._io(self._db.bodies, proc.pid, start, stop + 1))

    # persistence ---------------------------------------------------------------------------------

    def _persist(self, pid: str, rows: list[tuple[int, State]]) -> None:
        self._pending.append((pid, rows))
        self._pending_rows += len(rows)
        self._dirty.set()

    async def _writer(self, db: SQLiteBackend) -> None:
        while True:
            if not self._pending and not self._snapshots:
                if self._closing:
                    return
                self._dirty = asyncio.Event()
                await self._dirty.wait()
                continue
            batches, self._pending = self._pending, []
            snapshots, self._snapshots = self._snapshots, []
            await self._io(db.write, batches, snapshots, self._every)
            self._pending_rows -= sum(len(rows) for _, rows in batches)
            self._written.set()
            self._written = asyncio.Event()

    async def _close(self) -> None:
        """Stop the workers, mark their latest states as snapshots, let the writer finish."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in self._procs.values():
            if proc.running and proc.state is not None:
                self._snapshots.append((proc.pid, proc.state["at-slot"]))
        self._closing = True
        self._dirty.set()

    # generic resolution --------------------------------------------------------------------------

    async def resolve(self, base: Mapping[str, Any], request: Mapping[str, Any]) -> Any:
        key = dedup_key(base, request)
        call = self._calls.get(key)
        if call is not None:
            await call.done.wait()
            if call.error is not None:
                raise call.error
            return call.result
        call = self._calls[key] = _Call()
        try:
            method = getattr(self._devices[base["device"]], request["path"])
            result = method(base, request)
            if inspect.isawaitable(result):
                result = await result
            call.result = result
            return result
        except BaseException as exc:
            call.error = (
                exc
                if isinstance(exc, Exception)
                else RuntimeError("the leading call was cancelled")
            )
            raise
        finally:
            del self._calls[key]
            call.done.set()


@asynccontextmanager
async def open_engine(
    path: str | None = None,
    *,
    devices: Mapping[str, object] | None = None,
    cache_frequency: int = 1,
) -> AsyncIterator[Engine]:
    """A baseline engine, in memory or on the SQLite file ``path``."""
    pool = None if path is None else ThreadPoolExecutor(max_workers=1)
    db = None
    if path is not None:
        db = await asyncio.get_running_loop().run_in_executor(pool, SQLiteBackend, path)
    engine = Engine(db, pool, devices or {}, cache_frequency)
    writer = None if db is None else asyncio.create_task(engine._writer(db))
    try:
        yield engine
    finally:
        await engine._close()
        if writer is not None:
            await writer
        if db is not None:
            await engine._io(db.close)
        if pool is not None:
            pool.shutdown()


# the adapter the workload drivers use ---------------------------------------------------------


class BaselineStore:
    """What `Adapter.make_store` returns: a SQLite path (or none) and its backend once open."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.db: SQLiteBackend | None = None


class _Group:
    def __init__(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self._tg.create_task(fn(*args))


class AsyncioAdapter:
    """The ``asyncio`` impl as `benchmarks._harness.Adapter`."""

    name = "asyncio"

    def run(self, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run(main())

    @asynccontextmanager
    async def task_group(self) -> AsyncIterator[_Group]:
        async with asyncio.TaskGroup() as tg:
            yield _Group(tg)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def make_store(self, kind: str, path: str | None) -> BaselineStore:
        return BaselineStore(path if kind == "sqlite" else None)

    @asynccontextmanager
    async def open_engine(
        self,
        store: BaselineStore,
        *,
        devices: Mapping[str, object] | None = None,
        cache_frequency: int = 1,
    ) -> AsyncIterator[Engine]:
        async with open_engine(
            store.path, devices=devices, cache_frequency=cache_frequency
        ) as engine:
            store.db = engine._db
            yield engine

    async def schedule_many(self, engine: Engine, pid: str, messages: Sequence[Any]) -> list[int]:
        return await engine.schedule_many(pid, messages)

    def commits(self, store: BaselineStore) -> int | None:
        return None if store.db is None else store.db.commits

    def engine_stats(self, engine: Engine) -> dict[str, Any] | None:
        return {"slots_computed": engine.slots_computed}

    def live_workers(self, engine: Engine) -> int | None:
        return sum(proc.running for proc in engine._procs.values())


@functools.cache
def adapter() -> AsyncioAdapter:
    """The shared `AsyncioAdapter`."""
    return AsyncioAdapter()
