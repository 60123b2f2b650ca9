"""The engine: `open_engine` and the `Engine` it yields.

Supervision tree::

    open_engine()                 root nursery
     |-- IdleReaper.run           evicts idle workers at their deadlines
     |-- GroupWorker.run "pid-A"  a task per process worker that has work
     |-- GroupWorker.run "pid-B"  (idle workers keep their state, not a task)
     '-- Execution.run (key)      one task per deduplicated resolution in flight

Callers never own engine tasks: they park on a worker's broadcaster or on an
execution, inside their own cancel scopes. Leaving the block asks every worker
to stop (each stores a snapshot first), waits for them, cancels what is left,
and closes the store; afterwards every method raises `EngineClosed`.

Checkpoints: every async method checks for cancellation on entry. Calls that
park or do I/O are schedule points too. Calls answered synchronously from
memory (a stored result, an idle worker one slot away) skip the trip through
the scheduler, but yield to it at least once per millisecond of the engine's
clock and once per `YIELD_ANSWERS` such answers, so a loop of them cannot
starve other tasks (even under a `trio.testing.MockClock` that stands still).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn, final

import attrs
import trio

from ._broadcast import _Waiter
from ._budget import Budget, Limits
from ._codec import encode
from ._dedup import Execution, ExecutionInfo
from ._devices import PROCESS_DEVICE, DeviceHost, Devices
from ._driver import Reroute, compute_slot
from ._exceptions import (
    BlobNotFound,
    CatchingUp,
    EngineClosed,
    HbTrioError,
    InvalidMessage,
    LeaderDied,
    SlotNotScheduled,
    StoreError,
    StoreFenced,
)
from ._idle import IdleReaper
from ._message import (
    MAX_SLOT,
    Message,
    _Frozen,
    freeze,
    hand_out,
    id_of_bytes,
    message_id,
    validate_blob_id,
    validate_pid,
    validate_slot,
)
from ._process import validate_definition
from ._scheduler import Scheduler
from ._store import MemoryStore, Store, fast_path
from ._worker import GroupWorker, WorkerInfo

__all__ = ["Engine", "EngineStats", "open_engine"]

log = logging.getLogger("hbtrio")

# Looked up once: the request path awaits it on every call.
_checkpoint_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled
_wait_task_rescheduled: Final = trio.lowlevel.wait_task_rescheduled

#: ``id()`` of every store an open engine uses (each store object has one engine at a time).
_stores_in_use: set[int] = set()

#: How many workers one request may lose before it gives up with `LeaderDied`.
MAX_TRIES: Final = 3
#: Longest a fast-path caller runs without yielding to the scheduler (seconds).
YIELD_EVERY: Final = 0.001
#: Most calls answered from memory in a row without yielding to the scheduler.
YIELD_ANSWERS: Final = 256
#: The clock is read on every ``YIELD_CLOCK + 1``-th answer from memory (a power of two, less 1).
YIELD_CLOCK: Final = 15
assert MAX_SLOT == 9223372036854775807 and YIELD_CLOCK == 15  # spelled out on the request path
#: Blobs at least this long are hashed in a worker thread, off the event loop.
HASH_IN_THREAD: Final = 64 * 1024


@attrs.frozen
class EngineStats:
    """Counters of one engine since it opened (`Engine.statistics`)."""

    #: Device applications (``compute`` calls that produced a slot's state).
    slots_computed: int
    #: `Engine.compute` calls answered from a stored result.
    cache_hits: int
    #: Process workers started (each first request of a process without a live one).
    workers_started: int
    #: Process workers that ended (stopped, evicted when idle, at shutdown, or crashed).
    workers_stopped: int
    #: `Engine.resolve` callers that joined an identical resolution already under way.
    deduplicated: int
    #: Workers that crashed in the engine's own code while requests waited on them.
    leader_deaths: int
    #: `Engine.compute` calls (``now`` included), answered or not.
    requests: int
    #: Deduplicated resolutions that ran to an outcome (each once for all its callers).
    executions: int
    #: Process workers alive now.
    live_workers: int
    #: Requests parked now, on workers and on resolutions.
    waiters: int
    #: `Engine.put_blob` calls that stored their blob (or found it stored already).
    blobs_stored: int
    #: The live workers' memory, their estimates summed (see `WorkerInfo.memory_bytes`).
    memory_bytes: int = 0
    #: Idle workers retired to stay within ``max_workers`` / ``max_memory``.
    evictions: int = 0
    #: Requests refused with `Overloaded` (`CatchingUp` included).
    refused: int = 0
    #: Workers booting now.
    cold_starts: int = 0


class _WorkersView(Mapping[str, WorkerInfo]):
    """Read-only live view: process ID -> `WorkerInfo` of its live worker."""

    def __init__(self, workers: dict[str, GroupWorker]) -> None:
        self._workers = workers

    def __getitem__(self, group: str) -> WorkerInfo:
        return self._workers[group].info()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._workers))

    def __len__(self) -> int:
        return len(self._workers)

    def __repr__(self) -> str:
        return f"<workers {len(self)} live>"


class _ExecutionsView(Mapping[str, ExecutionInfo]):
    def __init__(self, executions: dict[tuple[bytes, bytes], Execution]) -> None:
        self._executions = executions

    def _by_group(self) -> dict[str, Execution]:
        return {e.group: e for e in self._executions.values()}

    def __getitem__(self, group: str) -> ExecutionInfo:
        return self._by_group()[group].info()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._by_group()))

    def __len__(self) -> int:
        return len(self._executions)


@attrs.define(eq=False)
class _Host:
    """What the engine gives its workers and resolutions (`WorkerHost`): nothing more.

    Workers and executions never reach into the engine; they ask this. Its
    methods never block.
    """

    engine: Engine
    store: Store
    devices: Devices
    cache_frequency: int
    slot_timeout: float | None
    shutdown_grace: float
    now: Callable[[], float]
    limits: Limits
    snapshot_policy: Limits | None = attrs.field(init=False)
    measures_memory: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.snapshot_policy = self.limits if self.limits.times_snapshots else None
        self.measures_memory = self.limits.max_memory is not None

    def start_soon(self, fn: Callable[[], Any], name: str) -> None:
        self.engine._nursery.start_soon(fn, name=name)

    def watch_idle(self, worker: GroupWorker) -> None:
        self.engine._reaper.watch(worker)

    def finished(self, worker: GroupWorker, *, crashed: bool) -> None:
        engine = self.engine
        if engine._workers.get(worker.pid) is worker:
            del engine._workers[worker.pid]
        engine._workers_stopped += 1
        engine._retired_computed += worker.computed
        if crashed:
            engine._leader_deaths += 1
        if worker.cold_start:  # it never got to boot
            worker.cold_start = False
            engine._budget.cold_starts -= 1
        if not worker.evicted:  # an evicted one stopped counting when it was evicted
            engine._budget.workers -= 1
            engine._budget.memory -= worker.memory_bytes

    def booted(self, worker: GroupWorker) -> None:
        self.engine._budget.cold_starts -= 1

    def memory_changed(self, worker: GroupWorker, delta: int) -> None:
        engine = self.engine
        engine._budget.memory += delta
        if engine._limits.max_memory is not None:
            engine._evict_while_over()

    def execution_done(self, execution: Execution, *, ran: bool) -> None:
        """A resolution left: out of the table; counted if it ran to an outcome."""
        engine = self.engine
        table = engine._executions
        if table.get(execution.key) is execution:
            del table[execution.key]
        fast = execution.fast_key
        if fast is not None and engine._fast_executions.get(fast) is execution:
            del engine._fast_executions[fast]
        if ran:
            self.engine._executions_run += 1


@final
class Engine:
    """Runs processes: made by `open_engine`, usable only inside its block."""

    def __init__(
        self,
        store: Store,
        devices: Devices,
        nursery: trio.Nursery,
        *,
        max_idle: float,
        cache_frequency: int,
        shutdown_grace: float,
        slot_timeout: float | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._limits = limits = Limits() if limits is None else limits
        self._budget = Budget(limits)
        #: Parking is checked and counted (`_park_counted`), not done on the fast path.
        self._counts_waiters = (
            limits.max_waiters is not None or limits.max_waiters_per_worker is not None
        )
        #: Some bound applies to requests that wait: they all take `_wait_for`.
        self._bounded = self._counts_waiters or limits.max_replay is not None
        self._recomputing: set[tuple[str, int]] = set()
        self._bounds_workers = limits.bounds_workers
        self._store = store
        self._devices = devices
        self._nursery = nursery
        self._max_idle = max_idle
        self._cache_frequency = cache_frequency
        self._shutdown_grace = shutdown_grace
        self._slot_timeout = slot_timeout
        self._scheduler = Scheduler(store)
        self._fast = fast_path(store)
        self._reaper = IdleReaper(max_idle)
        # trio.current_time without its lookups: the request path reads it.
        self._now = trio.lowlevel.current_clock().current_time
        self._workers: dict[str, GroupWorker] = {}
        self._executions: dict[tuple[bytes, bytes], Execution] = {}
        #: The same executions by `_fast_key` (those whose messages have one).
        self._fast_executions: dict[object, Execution] = {}
        self._closed = False
        self._next_yield = 0.0
        self._fast_left = 0
        # counters
        self._retired_computed = 0  # slots computed by workers no longer live
        self._cache_hits = 0
        self._workers_started = 0
        self._workers_stopped = 0
        self._deduplicated = 0
        self._leader_deaths = 0
        self._requests = 0
        self._executions_run = 0
        self._blobs_stored = 0
        self._host = _Host(
            self, store, devices, cache_frequency, slot_timeout, shutdown_grace, self._now, limits
        )
        self.workers: Mapping[str, WorkerInfo] = _WorkersView(self._workers)
        """Process ID -> `WorkerInfo` of each live process worker (a read-only live view)."""
        self.executions: Mapping[str, ExecutionInfo] = _ExecutionsView(self._executions)
        """Group name -> `ExecutionInfo` of each deduplicated resolution in flight."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Engine {state} store={self._store!r} workers={len(self._workers)}>"

    @property
    def store(self) -> Store:
        """The engine's store."""
        return self._store

    def statistics(self) -> EngineStats:
        """A frozen record of the engine's counters (see `EngineStats`). Never blocks."""
        return EngineStats(
            slots_computed=self._retired_computed + sum(w.computed for w in self._workers.values()),
            cache_hits=self._cache_hits,
            workers_started=self._workers_started,
            workers_stopped=self._workers_stopped,
            deduplicated=self._deduplicated,
            leader_deaths=self._leader_deaths,
            requests=self._requests,
            executions=self._executions_run,
            live_workers=len(self._workers),
            waiters=sum(w.waiting for w in self._workers.values())
            + sum(len(e.waiters) for e in self._executions.values()),
            blobs_stored=self._blobs_stored,
            memory_bytes=self._budget.memory
            if self._limits.max_memory is not None
            else sum(w.memory() for w in self._workers.values()),
            evictions=self._budget.evictions,
            refused=self._budget.refused,
            cold_starts=self._budget.cold_starts,
        )

    #: The same as `statistics`.
    stats = statistics

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the engine's open_engine block has exited")

    def _yield_due(self, left: int) -> bool:
        """Whether an answer given from memory must yield to the scheduler now.

        ``left`` is the answers still allowed (already counted down). Due once
        `YIELD_ANSWERS` answers went by, or once the engine's clock moved
        `YIELD_EVERY` on since the last yield (read on every ``YIELD_CLOCK + 1``
        answers only: a `trio.testing.MockClock` may stand still, and reading
        the clock costs). Never blocks.
        """
        if left >= 0:
            now = self._now()
            if now < self._next_yield:
                self._fast_left = left
                return False
        else:
            now = self._now()
        self._next_yield, self._fast_left = now + YIELD_EVERY, YIELD_ANSWERS
        return True

    async def _fast_return(self) -> None:
        """The schedule point of a call answered from memory (see `_yield_due`)."""
        left = self._fast_left - 1
        if left >= 0 and left & YIELD_CLOCK:
            self._fast_left = left
        elif self._yield_due(left):
            await trio.lowlevel.cancel_shielded_checkpoint()

    # processes and schedules -------------------------------------------------------------------

    async def spawn(self, definition: Mapping[str, Any]) -> str:
        """Store a process definition as slot 0 and return its ID (``message_id(definition)``).

        Spawning the same definition again returns the same ID and changes
        nothing. Raises `InvalidMessage` or `UnknownDevice`. Checkpoints;
        cancellation-safe: a cancelled spawn either stored the process or not,
        and spawning again is harmless either way.
        """
        self._check_open()
        definition = validate_definition(definition, self._devices)
        await trio.lowlevel.checkpoint_if_cancelled()
        pid, _created = await self._scheduler.spawn(definition)
        await trio.lowlevel.checkpoint()
        return pid

    async def schedule(self, pid: str, message: Mapping[str, Any]) -> int:
        """Assign the next slot to ``message``; it is durable in the store when this returns.

        Raises `InvalidMessage`, `ProcessNotFound` or `StoreError`. Checkpoints.
        Cancellation-safe: a cancelled call assigned nothing, or returned.
        """
        return (await self.schedule_many(pid, [message]))[0]

    async def schedule_many(self, pid: str, messages: list[Mapping[str, Any]]) -> list[int]:
        """Assign consecutive slots to ``messages`` in one durable write; returns the slots."""
        self._check_open()
        validate_pid(pid)
        if not isinstance(messages, list | tuple):
            raise InvalidMessage("messages must be a list of messages")
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self._scheduler.schedule(pid, messages)

    async def latest_slot(self, pid: str) -> int:
        """The latest scheduled slot of ``pid``. Raises `ProcessNotFound`. Checkpoints."""
        self._check_open()
        validate_pid(pid)
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            latest = self._scheduler.latest_nowait(pid)
        except trio.WouldBlock:
            return await self._scheduler.latest(pid)
        await self._fast_return()
        return latest

    # blobs ---------------------------------------------------------------------------------------

    async def put_blob(self, data: bytes) -> str:
        """Store ``data`` as a blob; return its ID, the SHA-256 of ``data`` as unpadded base64url.

        The ID has the form of a message ID (43 characters), so a process
        definition can name a blob (``"image": blob_id``). Storing the same
        bytes again returns the same ID and changes nothing. The blob is
        durable in the store when this returns. ``data`` is ``bytes``
        (``bytearray`` and ``memoryview`` are copied); anything else is
        `InvalidMessage`. Blobs of `HASH_IN_THREAD` bytes or more are hashed in
        a worker thread. Raises `StoreError` (also for a store that keeps no
        blobs). Checkpoints; cancellation-safe: a cancelled call stored the
        blob or not, and storing it again is harmless either way.
        """
        self._check_open()
        if type(data) is not bytes:
            if not isinstance(data, bytearray | memoryview):
                raise InvalidMessage(f"blob data must be bytes, not {type(data).__name__}")
            data = bytes(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        if len(data) < HASH_IN_THREAD:
            blob_id = id_of_bytes(data)
        else:
            blob_id = await trio.to_thread.run_sync(id_of_bytes, data)
        await self._store.put_blob(blob_id, data)
        self._blobs_stored += 1
        await trio.lowlevel.cancel_shielded_checkpoint()
        return blob_id

    async def get_blob(self, blob_id: str) -> bytes:
        """The bytes of the blob ``blob_id`` (from `put_blob`).

        Raises `BlobNotFound` for a well-formed ID (43 base64url characters)
        of no stored blob, `InvalidMessage` for anything else, `StoreError`
        when the store fails (or keeps no blobs, or its copy is damaged).
        Checkpoints; cancellation-safe (it only reads).
        """
        self._check_open()
        validate_blob_id(blob_id)
        await trio.lowlevel.checkpoint_if_cancelled()
        data = await self._store.get_blob(blob_id)
        if data is None:
            raise BlobNotFound(blob_id)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    # computing -----------------------------------------------------------------------------------

    async def compute(self, pid: str, slot: int) -> Message:
        """The state of ``pid`` after slots 0..``slot``; ``state["at-slot"] == slot``.

        Answers from the process's worker when it has the slot at once, else
        from the stored result (never waiting behind a busy worker), else
        waits for the worker, starting it if needed. Raises `InvalidMessage`,
        `ProcessNotFound`, `SlotNotScheduled`, `ComputeError`, `StoreError`, or
        `LeaderDied` after losing `MAX_TRIES` workers. Cancellation-safe:
        cancelling the caller removes only its wait; the worker goes on to the
        slot anyway.
        """
        if self._closed:
            raise EngineClosed("the engine's open_engine block has exited")
        if type(slot) is not int or not 0 <= slot <= 9223372036854775807:  # MAX_SLOT, a constant
            validate_slot(slot)
        try:
            worker = self._workers.get(pid)
        except TypeError:  # unhashable
            worker = None
        if worker is None:
            validate_pid(pid)
        await _checkpoint_if_cancelled()
        self._requests += 1
        state = None if worker is None else worker.serve_now(slot)
        if state is None:
            try:
                state = self._fast.get_result_nowait(pid, slot)
            except trio.WouldBlock:
                state = await self._store.get_result(pid, slot)
            if state is None:
                if worker is not None and not self._bounded:
                    # A worker at work toward the slot: park on it from this coroutine
                    # (not `_wait_for`: one coroutine fewer per parked waiter).
                    try:
                        joined = worker.join(slot)
                        if isinstance(joined, _Waiter):
                            joined = await _wait_task_rescheduled(joined)
                    except (Reroute, LeaderDied) as exc:
                        deaths = 1 if isinstance(exc, LeaderDied) else 0
                        return hand_out(await self._wait_for(pid, slot, None, deaths))
                    if joined is not None:
                        return _Frozen(joined) if type(joined) is dict else joined
                return hand_out(await self._wait_for(pid, slot, worker))
            self._cache_hits += 1
        # An answer given without parking: a schedule point now and then (`_yield_due`,
        # its first test inlined: the request path's cost is counted in nanoseconds).
        left = self._fast_left - 1
        if left >= 0 and left & 15:  # YIELD_CLOCK, a constant
            self._fast_left = left
        elif self._yield_due(left):
            await trio.lowlevel.cancel_shielded_checkpoint()
        return _Frozen(state) if type(state) is dict else state  # hand_out, inlined

    async def _wait_for(
        self, pid: str, slot: int, worker: GroupWorker | None, deaths: int = 0
    ) -> Message:
        """The slow path of `compute`: check the schedule, then wait for the worker.

        Starts the worker if there is none; re-routes when it dies (``deaths``:
        workers this request already lost). Kept in one coroutine: with
        thousands of waiters, every coroutine object per waiter costs
        garbage-collector time.
        """
        # Every slot a worker ever aimed for was scheduled (schedules only grow).
        if worker is None or not worker.aims_at(slot):
            try:
                latest = self._scheduler.latest_nowait(pid)
            except trio.WouldBlock:
                latest = await self._scheduler.latest(pid)
            if slot > latest:
                raise SlotNotScheduled(pid, latest + 1, latest, requested_slot=slot)
        store = self._store
        replay_checked = False
        while True:
            self._check_open()
            worker = self._workers.get(pid)
            if store.backlogged and (worker is None or worker.idle):
                # This request would compute (inline, or by starting a task): first
                # let the store catch up, before anything is computed. Nothing has
                # happened yet if this is cancelled; it raises `StoreError` if the
                # writes fail.
                await store.wait_writable()
                continue
            limits = self._limits
            if worker is None:
                if limits.max_replay is not None and not replay_checked:
                    # Where a new worker would start computing: the nearest snapshot.
                    start = await self._too_far(pid, slot, limits.max_replay)
                    if start is not None:
                        if pid not in self._workers:  # (one may have started meanwhile)
                            self._new_worker(pid, slot, inline=False)
                        raise self._catching_up(pid, slot, start)
                    replay_checked = True
                    continue  # the store was asked: look again
                worker = self._new_worker(pid, slot)
            try:
                state = worker.serve_now(slot)
                if state is not None:
                    return state
                if limits.max_replay is not None:
                    at = worker.position()
                    if at is not None and slot - at > limits.max_replay:
                        worker.request(slot)  # on its way there, in the background
                        raise self._catching_up(pid, slot, at)
                state = worker.request(slot)
                if state is not None:
                    return state
                if self._counts_waiters:
                    return await self._park_counted(worker, slot)
                parked: Message = await _wait_task_rescheduled(worker.enter(slot))
                return parked
            except Reroute:
                # The worker is past this slot and its stored result is missing:
                # recompute it from the nearest earlier snapshot, with a core of its own.
                if limits.max_replay is not None:
                    start = await self._too_far(pid, slot, limits.max_replay)
                    if start is not None:
                        self._recompute_soon(pid, slot)
                        raise self._catching_up(pid, slot, start) from None
                return await compute_slot(
                    store,
                    self._devices,
                    pid,
                    slot,
                    cache_frequency=self._cache_frequency,
                    slot_timeout=self._slot_timeout,
                )
            except LeaderDied:
                deaths += 1
                if deaths >= MAX_TRIES:
                    raise LeaderDied(
                        f"slot {slot} of {pid}: lost its worker {deaths} times in a row"
                    ) from None

    # bounds (see `_budget`) ---------------------------------------------------------------------

    def _new_worker(self, pid: str, slot: int, *, inline: bool = True) -> GroupWorker:
        """Make and register ``pid``'s worker, within the engine's bounds. Never blocks.

        Booted in the calling task when it can be (``inline``), else with a
        task of its own. Raises `Overloaded` when a bound is reached and no
        idle worker can be evicted to make room; evicts as needed otherwise.
        """
        limits, budget = self._limits, self._budget
        if self._bounds_workers:
            if limits.max_cold_starts is not None and budget.cold_starts >= limits.max_cold_starts:
                raise budget.refuse(
                    f"{budget.cold_starts} processes are booting already (max_cold_starts)",
                    "max_cold_starts",
                )
            while budget.over(extra_workers=1):
                if not self._evict_one():
                    bound = (
                        "max_workers"
                        if limits.max_workers is not None
                        and budget.workers + 1 > limits.max_workers
                        else "max_memory"
                    )
                    raise budget.refuse(
                        f"{budget.workers} workers ({budget.memory} bytes) are live and busy "
                        f"({bound})",
                        bound,
                    )
        host = self._host
        worker = GroupWorker.idle_now(pid, host, slot) if inline else None
        if worker is None:
            worker = GroupWorker.starting(pid, host, slot)
            worker.cold_start = True
            budget.cold_starts += 1
        self._workers[pid] = worker
        self._workers_started += 1
        budget.workers += 1
        if worker.memory_bytes:  # booted inline: measured before it was counted
            budget.memory += worker.memory_bytes
            if limits.max_memory is not None:
                self._evict_while_over(keep=worker)
        return worker

    def _evict_one(self, keep: GroupWorker | None = None) -> bool:
        """Retire the least recently used idle worker (not ``keep``); False if there is none."""
        worker = self._reaper.pop_least_recent()
        if worker is keep and worker is not None:
            other = self._reaper.pop_least_recent()
            self._reaper.watch(worker)
            worker = other
        if worker is None:
            return False
        budget = self._budget
        worker.evicted = True
        budget.workers -= 1
        budget.memory -= worker.memory_bytes
        budget.evictions += 1
        worker.request_stop()  # stores its snapshot first, in a task of its own
        return True

    def _evict_while_over(self, keep: GroupWorker | None = None) -> None:
        budget = self._budget
        while budget.over() and self._evict_one(keep):
            pass

    async def _too_far(self, pid: str, slot: int, max_replay: int) -> int | None:
        """The nearest snapshot's slot at or below ``slot`` when computing from it would
        take more than ``max_replay`` slots, else ``None``. Reads the store."""
        found = await self._store.latest_snapshot_slot(pid, slot)
        start = 0 if found is None else found
        return start if slot - start > max_replay else None

    def _catching_up(self, pid: str, slot: int, position: int) -> CatchingUp:
        self._budget.refused += 1
        return CatchingUp(pid, slot, position)

    def _recompute_soon(self, pid: str, slot: int) -> None:
        """Recompute an earlier slot in the background (once at a time per slot)."""
        key = (pid, slot)
        if key in self._recomputing:
            return
        self._recomputing.add(key)

        async def recompute() -> None:
            try:
                await compute_slot(
                    self._store,
                    self._devices,
                    pid,
                    slot,
                    cache_frequency=self._cache_frequency,
                    slot_timeout=self._slot_timeout,
                )
            except HbTrioError as exc:
                log.warning("recomputing slot %d of %s failed: %s", slot, pid, exc)
            finally:
                self._recomputing.discard(key)

        self._nursery.start_soon(recompute, name=f"hbtrio recompute {pid} {slot}")

    async def _park_counted(self, worker: GroupWorker, slot: int) -> Message:
        """Park on ``worker`` for ``slot`` within the waiter bounds (`Overloaded` over them)."""
        budget = self._budget
        budget.check_waiter(worker.waiting)
        budget.waiting += 1
        try:
            state: Message = await _wait_task_rescheduled(worker.enter(slot))
            return state
        finally:
            budget.waiting -= 1

    async def now(self, pid: str) -> Message:
        """The state at the latest scheduled slot of ``pid`` (see `compute`)."""
        return await self.compute(pid, await self.latest_slot(pid))

    async def stop(self, pid: str) -> None:
        """Stop ``pid``'s worker after it stores a snapshot; a no-op without a worker.

        Requests waiting on it re-route to a fresh worker. Checkpoints.
        Cancelling the caller stops only the wait: the worker still stops.
        """
        self._check_open()
        validate_pid(pid)
        await trio.lowlevel.checkpoint_if_cancelled()
        worker = self._workers.get(pid)
        if worker is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await self._stop_worker(worker)

    def _lost(self, pid: str, exc: StoreFenced) -> None:
        """The store lost ``pid`` to another owner (`Store.on_lost`). Never blocks.

        Its schedule's tail is read again before the next schedule here, and its
        worker ends like a lost one (`GroupWorker.lose`): its waiters get ``exc``.
        """
        self._scheduler.forget(pid)
        worker = self._workers.get(pid)
        if worker is not None:
            worker.lose(exc)

    async def _stop_worker(self, worker: GroupWorker) -> None:
        worker.request_stop()
        await worker.wait_stopped()

    # generic resolution --------------------------------------------------------------------------

    async def resolve(self, base: Mapping[str, Any], request: Mapping[str, Any]) -> Any:
        """Call ``device.<request["path"]>(base, request)`` once for all identical concurrent calls.

        ``base["device"]`` names the device. For ``"process@1.0"``, the paths
        ``compute`` (with ``"slot"``) and ``now`` go to the process workers.
        The execution belongs to the engine: it survives the cancellation of
        the caller that started it while others wait, and is cancelled when
        its last waiter leaves. A device failure raises `ComputeError` (the
        device's exception as ``__cause__``) in every caller. Checkpoints.
        """
        if self._closed:
            raise EngineClosed("the engine's open_engine block has exited")
        # Joining an execution under way costs a tuple of each message's items
        # (`_fast_key`), or, for messages without one, two canonical encodings:
        # a message equal to a validated one is equally valid. Parking is the
        # checkpoint (a cancelled caller is aborted at once).
        execution = self._under_way(base, request)
        if execution is not None:
            self._deduplicated += 1
            return await _wait_task_rescheduled(execution.join())
        given = base, request  # a fast key is of the messages as given: a frozen one has none
        base = freeze(base, what="base")
        request = freeze(request, what="request")
        await trio.lowlevel.checkpoint_if_cancelled()
        device_name = base.get("device")
        path = request.get("path")
        if device_name == PROCESS_DEVICE:
            pid = message_id(base)
            if path == "compute":
                return await self.compute(pid, request.get("slot"))  # type: ignore[arg-type]
            if path == "now":
                return await self.now(pid)
            raise InvalidMessage(
                f"path: {PROCESS_DEVICE} resolves 'compute' and 'now', not {path!r}"
            )
        device = self._devices.get(device_name)
        fn, is_async = device.method(path)
        key = _dedup_key(base, request)
        assert key is not None  # frozen messages always encode
        execution = self._executions.get(key)
        if execution is None:
            base_id, request_id = id_of_bytes(key[0]), id_of_bytes(key[1])
            group = message_id({"base": base_id, "request": request_id})
            execution = Execution(key, group, self._host, device.name, path)  # type: ignore[arg-type]
            self._executions[key] = execution
            fast = _fast_key(*given)
            if fast is not None:
                execution.fast_key = fast
                self._fast_executions[fast] = execution
            self._nursery.start_soon(
                execution.run, fn, is_async, base, request, name=f"hbtrio resolve {group}"
            )
        else:
            self._deduplicated += 1
        return await execution.wait()

    def _under_way(self, base: object, request: object) -> Execution | None:
        """The execution of an identical resolution under way, if any. Never blocks.

        A function of its own so that no key outlives the lookup: a caller that
        joins parks with nothing of its own but its place among the waiters.
        """
        fast = _fast_key(base, request)
        if fast is not None:
            execution = self._fast_executions.get(fast)
            if execution is not None:
                return execution
        key = _dedup_key(base, request)
        return self._executions.get(key) if key is not None else None

    # shutdown ----------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop every worker (each stores a snapshot) and wait for them."""
        self._closed = True
        async with trio.open_nursery() as nursery:
            for worker in list(self._workers.values()):
                nursery.start_soon(self._stop_worker, worker)


def _reraise_alone(exc: BaseException) -> NoReturn:
    """Raise ``exc`` as it was, not as the context of the group being handled."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


def _same_exception(a: BaseException, b: BaseException) -> bool:
    """``a`` is ``b``, or a group with the same leaves (trio's nurseries re-derive groups)."""
    if a is b:
        return True
    if isinstance(a, BaseExceptionGroup) and isinstance(b, BaseExceptionGroup):
        return len(a.exceptions) == len(b.exceptions) and all(
            _same_exception(x, y) for x, y in zip(a.exceptions, b.exceptions, strict=True)
        )
    return False


#: Value types whose equality is equality of the canonical encoding, across types too
#: (not ``bool``, equal to ``0``/``1``, nor ``float``, with ``-0.0 == 0.0``): a fast
#: key holds them as they are, and everything else tagged with its type.
_ATOMS: Final = frozenset({str, bytes, int, type(None)})
#: Deepest nesting a fast key follows (deeper messages, and cycles, take `_dedup_key`).
_FAST_DEPTH: Final = 16


class _NoFastKey(Exception):
    pass


def _fast_key(base: object, request: object) -> tuple[object, object] | None:
    """A key equal for two pairs of messages exactly when they are equal, keys in order.

    Built from each message's items without encoding anything: values of
    `_ATOMS` as they are, ``bool``, ``float``, lists and nested dicts tagged
    with their type (a float by its exact bits). ``None`` for anything else
    (a top-level ``"priv"``, other types, deep nesting). Equal keys mean equal
    messages, and so equal canonical encodings; equal messages whose keys come
    in other orders have other fast keys and meet through `_dedup_key`.
    """
    if type(base) is not dict or type(request) is not dict:
        return None
    try:
        return _fast_items(base, 0), _fast_items(request, 0)
    except _NoFastKey:
        return None


def _fast_items(msg: dict[Any, Any], depth: int) -> tuple[object, ...]:
    atoms = _ATOMS
    for k, v in msg.items():  # the common case: flat, taken as it is
        if type(k) is not str or type(v) not in atoms:
            break
    else:
        if depth == 0 and "priv" in msg:
            raise _NoFastKey
        return tuple(msg.items())
    if depth >= _FAST_DEPTH or (depth == 0 and "priv" in msg):
        raise _NoFastKey
    out = []
    for k, v in msg.items():
        if type(k) is not str:
            raise _NoFastKey
        out.append((k, v if type(v) in atoms else _fast_value(v, depth + 1)))
    return tuple(out)


def _fast_value(v: object, depth: int) -> object:
    t = type(v)
    if t is dict:
        return dict, _fast_items(v, depth)  # type: ignore[arg-type]
    if t is list:
        if depth >= _FAST_DEPTH:
            raise _NoFastKey
        atoms = _ATOMS
        return list, tuple(x if type(x) in atoms else _fast_value(x, depth + 1) for x in v)  # type: ignore[attr-defined]
    if t is bool:
        return bool, v
    if t is float:
        return float, v.hex()  # type: ignore[attr-defined]
    raise _NoFastKey


def _dedup_key(base: object, request: object) -> tuple[bytes, bytes] | None:
    """The canonical bytes of both messages without ``"priv"`` (``None`` if not encodable)."""
    if not (isinstance(base, dict) and isinstance(request, dict)):
        return None
    try:
        if "priv" in base:
            base = {k: v for k, v in base.items() if k != "priv"}
        if "priv" in request:
            request = {k: v for k, v in request.items() if k != "priv"}
        return encode(base), encode(request)
    except (HbTrioError, RecursionError):
        return None


@asynccontextmanager
async def open_engine(
    store: Store | None = None,
    *,
    devices: Mapping[str, object] | None = None,
    max_idle: float = 300.0,
    cache_frequency: int = 1,
    shutdown_grace: float = 30.0,
    slot_timeout: float | None = None,
    max_workers: int | None = None,
    max_memory: int | None = None,
    max_waiters: int | None = None,
    max_waiters_per_worker: int | None = None,
    max_cold_starts: int | None = None,
    max_replay: int | None = None,
    snapshot_seconds: float | None = None,
    snapshot_cost_ratio: float | None = None,
    on_failure: str | None = None,
) -> AsyncIterator[Engine]:
    """Run an engine for the duration of an ``async with`` block.

    Args:
        store: where processes live; ``None`` means a new `MemoryStore`.
        devices: extra execution devices by name (``counter@1.0`` is built in).
        max_idle: seconds a worker waits for a request before it stores a
            snapshot and exits.
        cache_frequency: a full, restorable snapshot is stored every this many
            slots (every slot's result is always stored).
        shutdown_grace: seconds leaving the block waits for workers to store
            their snapshots before cancelling them.
        slot_timeout: seconds one device call (``init``, ``compute``,
            ``snapshot``, ``restore``) of an async device may take; a slot that
            takes longer fails with `ComputeError` (``__cause__`` is
            `trio.TooSlowError`). Plain devices run on the event loop and
            cannot be interrupted: wrap them in `run_in_thread` to bound them.
        max_workers: most live workers; at it, the least recently used idle
            worker retires (snapshot first) to make room, and with none idle
            a request that needs a new worker gets `Overloaded`.
        max_memory: most bytes of live workers' memory (each worker's
            estimate: a live instance's ``memory_size()``, else an estimate
            of its state); over it, least recently used idle workers retire.
        max_waiters, max_waiters_per_worker: most requests parked at once in
            the engine, and on one worker; one more gets `Overloaded`.
        max_cold_starts: most workers booting at once; a request that needs
            one more gets `Overloaded`.
        max_replay: most slots a request waits to have computed (from the
            worker's position or the nearest snapshot); a request for a slot
            further away gets `CatchingUp` while it is computed in the
            background.
        snapshot_seconds: besides every ``cache_frequency`` slots, a snapshot
            once this many seconds of device calls went by since the last.
        snapshot_cost_ratio: besides every ``cache_frequency`` slots, a
            snapshot once the device calls since the last one took this many
            times what taking the last snapshot took.

        on_failure: ``"stop"`` or ``"record"``: what a failed slot of every live
            device does, instead of each device's own choice (its ``failures``);
            a definition's ``"on-failure"`` still decides for its process.

        The bounds and the snapshot policy are off (``None``) by default; see
        docs/api.md. Every refusal changes nothing and is counted in
        `statistics` (``refused``), every eviction too (``evictions``).

    Entering opens the store (blocking until it is ready). Leaving stops every
    worker cleanly (each stores a snapshot of its latest state first), waits
    for them, cancels any resolution still in flight, and closes the store;
    no task outlives the block. Afterwards every method raises `EngineClosed`.
    """
    if type(cache_frequency) is not int or cache_frequency < 1:
        raise ValueError(f"cache_frequency must be an int >= 1, not {cache_frequency!r}")
    if not max_idle > 0:
        raise ValueError(f"max_idle must be > 0, not {max_idle!r}")
    if slot_timeout is not None and not slot_timeout > 0:
        raise ValueError(f"slot_timeout must be > 0 or None, not {slot_timeout!r}")
    limits = Limits(
        max_workers=max_workers,
        max_memory=max_memory,
        max_waiters=max_waiters,
        max_waiters_per_worker=max_waiters_per_worker,
        max_cold_starts=max_cold_starts,
        max_replay=max_replay,
        snapshot_seconds=snapshot_seconds,
        snapshot_cost_ratio=snapshot_cost_ratio,
    )
    registry = Devices(devices, on_failure=on_failure)
    store = MemoryStore() if store is None else store
    if not isinstance(store, Store):
        raise TypeError(f"store must be an hbtrio Store, not {type(store).__name__}")
    if id(store) in _stores_in_use:
        raise StoreError(f"{store!r} is in use by another engine: one engine at a time per store")
    _stores_in_use.add(id(store))
    try:
        await store.open()
    except BaseException:
        _stores_in_use.discard(id(store))
        raise
    body_error: BaseException | None = None
    try:
        try:
            async with trio.open_nursery() as nursery:
                engine = Engine(
                    store,
                    registry,
                    nursery,
                    max_idle=max_idle,
                    cache_frequency=cache_frequency,
                    shutdown_grace=shutdown_grace,
                    slot_timeout=slot_timeout,
                    limits=limits,
                )
                registry.attach(DeviceHost(slot_timeout, engine.get_blob))
                store.on_lost = engine._lost
                nursery.start_soon(engine._reaper.run, name="hbtrio idle reaper")
                try:
                    yield engine
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(shutdown_grace):
                        await engine._shutdown()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The root nursery groups what leaves it. One exception (the body's,
            # typically) is the caller's own and leaves as itself; several stay a group.
            if len(group.exceptions) == 1:
                leaf = group.exceptions[0]
                if body_error is not None and _same_exception(leaf, body_error):
                    leaf = body_error  # the nursery re-derives groups: give back the original
                _reraise_alone(leaf)
            raise
    finally:
        store.on_lost = None
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(shutdown_grace):
                await store.close()
        finally:
            _stores_in_use.discard(id(store))
