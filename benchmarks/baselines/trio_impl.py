"""The ``trio`` impl: the leanest hand-written Trio engine for the workloads.

One worker task per process holds the state and computes forward in chunks of
`CHUNK` slots, yielding between chunks. Every slot gets a fresh state dict,
kept in the process's ``slot -> state`` dict; the tasks waiting for a slot are
parked in a per-slot list (trio's own low-level parking, as `trio.Event` does it,
with an abort function that removes a cancelled waiter) and rescheduled as soon
as the slot is computed. `Engine.resolve` runs
identical concurrent calls once: the first caller leads, the others wait for
its result. With a SQLite file, schedules are durable before ``schedule``
returns, results are written behind by one writer task (sqlite3 in a thread),
and a worker starting cold restores the latest snapshot and replays from there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

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


async def _park(waiters: list[Task]) -> None:
    """Block until a worker reschedules this task; a cancelled waiter leaves ``waiters``."""
    task = current_task()
    waiters.append(task)

    def abort(_: object) -> Abort:
        waiters.remove(task)
        return Abort.SUCCEEDED

    await wait_task_rescheduled(abort)


class _Proc:
    """One process: its schedule, results, waiters and worker bookkeeping."""

    __slots__ = (
        "bodies",
        "first",
        "idle",
        "latest",
        "pid",
        "results",
        "running",
        "state",
        "target",
        "waiters",
    )

    def __init__(self, pid: str, latest: int, state: State | None) -> None:
        self.pid = pid
        self.latest = latest  # highest scheduled slot
        self.bodies: list[Mapping[str, Any]] = []  # bodies[i] is the message at slot first + i
        self.first = 1
        self.results: dict[int, State] = {} if state is None else {0: state}
        self.state = state  # the worker's state; None until restored
        self.target = 0  # highest slot anyone waits for
        self.waiters: dict[int, list[Task]] = {}  # slot -> tasks parked until it is computed
        self.idle: Task | None = None  # the worker task while it is parked, caught up
        self.running = False


class _Call:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Engine:
    """The baseline engine; make it with `open_engine`."""

    def __init__(
        self,
        workers: trio.Nursery,
        db: SQLiteBackend | None,
        devices: Mapping[str, object],
        cache_frequency: int,
    ) -> None:
        self._workers = workers
        self._db = db
        self._devices = devices
        self._every = cache_frequency
        self._procs: dict[str, _Proc] = {}
        self._calls: dict[Any, _Call] = {}
        self._lane = trio.CapacityLimiter(1)  # one SQLite call at a time
        self._schedule_lock = trio.Lock()
        self._pending: list[Batch] = []
        self._pending_rows = 0
        self._snapshots: list[tuple[str, int]] = []
        self._dirty = trio.Event()
        self._written = trio.Event()
        self._closing = False
        self.slots_computed = 0

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._lane)

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

    async def compute(self, pid: str, slot: int) -> State:
        proc = self._procs.get(pid) or await self._proc(pid)
        state = proc.results.get(slot)
        if state is not None:
            await trio.lowlevel.checkpoint()
            return state
        if slot > proc.latest:
            raise SlotNotScheduled(f"slot {slot} of {pid} is not scheduled")
        if self._db is not None and (
            not proc.running or (proc.state is not None and slot <= proc.state["at-slot"])
        ):
            stored = await self._io(self._db.result, pid, slot)
            if stored is not None:
                return stored
        waiters = proc.waiters.get(slot)
        if waiters is None:
            waiters = proc.waiters[slot] = []
        if slot > proc.target:
            proc.target = slot
            if not proc.running:
                proc.running = True
                self._workers.start_soon(self._work, proc)
            elif proc.idle is not None:
                reschedule(proc.idle)
                proc.idle = None
        await _park(waiters)
        return proc.results[slot]

    async def _work(self, proc: _Proc) -> None:
        if proc.state is None:
            await self._restore(proc)
        state = proc.state
        assert state is not None
        results, waiters, persist = proc.results, proc.waiters, self._db is not None
        me = current_task()

        def abort(_: object) -> Abort:
            proc.idle = None
            return Abort.SUCCEEDED

        while True:
            slot = state["at-slot"]
            if slot >= proc.target:
                proc.idle = me
                await wait_task_rescheduled(abort)
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
                    parked = waiters.pop(slot, None)
                    if parked:
                        for task in parked:
                            reschedule(task)
                proc.state = state
                self._persist(proc.pid, rows)
                while self._pending_rows > MAX_PENDING:
                    await self._written.wait()
            else:
                while slot < stop:
                    slot += 1
                    state = {"count": state["count"] + bodies[slot - first]["n"], "at-slot": slot}
                    results[slot] = state
                    parked = waiters.pop(slot, None)
                    if parked:
                        for task in parked:
                            reschedule(task)
                proc.state = state
            if slot < proc.target:
                await trio.lowlevel.checkpoint()

    async def _restore(self, proc: _Proc) -> None:
        assert self._db is not None
        state, bodies = await self._io(self._db.restore, proc.pid, proc.target)
        slot = state["at-slot"]
        proc.state, proc.bodies, proc.first = state, bodies, slot + 1
        proc.results[slot] = state
        for task in proc.waiters.pop(slot, ()):
            reschedule(task)

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
                self._dirty = trio.Event()
                await self._dirty.wait()
                continue
            batches, self._pending = self._pending, []
            snapshots, self._snapshots = self._snapshots, []
            await self._io(db.write, batches, snapshots, self._every)
            self._pending_rows -= sum(len(rows) for _, rows in batches)
            self._written.set()
            self._written = trio.Event()

    def _close(self) -> None:
        """Mark every live worker's latest state as a snapshot and let the writer finish."""
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
    db = None if path is None else await trio.to_thread.run_sync(SQLiteBackend, path)
    try:
        async with trio.open_nursery() as io_nursery:
            engine: Engine | None = None
            try:
                async with trio.open_nursery() as workers:
                    engine = Engine(workers, db, devices or {}, cache_frequency)
                    if db is not None:
                        io_nursery.start_soon(engine._writer, db)
                    try:
                        yield engine
                    finally:
                        workers.cancel_scope.cancel()
            finally:
                if engine is not None:
                    engine._close()
    finally:
        if db is not None:
            await trio.to_thread.run_sync(db.close)


# the adapter the workload drivers use ---------------------------------------------------------


class BaselineStore:
    """What `Adapter.make_store` returns: a SQLite path (or none) and its backend once open."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.db: SQLiteBackend | None = None


class TrioAdapter:
    """The ``trio`` impl as `benchmarks._harness.Adapter`."""

    name = "trio"

    def run(self, main: Callable[[], Awaitable[T]]) -> T:
        return trio.run(main)

    def task_group(self) -> AbstractAsyncContextManager[trio.Nursery]:
        return trio.open_nursery()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

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
def adapter() -> TrioAdapter:
    """The shared `TrioAdapter`."""
    return TrioAdapter()
