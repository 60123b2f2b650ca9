"""Group workers: one per process, holding its state in memory between requests.

Theory of operation
-------------------
A worker is created by the first request for its process that the store
cannot answer. It lives in the engine's registry until it is evicted, stopped
or crashes, and it keeps the process state in memory all that time. When the
store answers from memory and the device is plain, the requesting task creates
it already idle (`Engine._adopt_idle_worker`); otherwise it runs a task (in
the engine's root nursery), and it runs one only while it has work:

- ``STARTING``: its task restores the latest snapshot at or below the lowest
  slot anybody waits for (or runs ``init``);
- ``RUNNING``: while ``target`` (the highest slot requested of it) is ahead of
  ``slot``, its task applies the next chunk of assignments, stores each
  result, publishes each slot to the broadcaster, and checkpoints;
- ``IDLE``: caught up, the task has exited; the state waits in memory. A
  request a few slots ahead is applied by the requesting task itself
  (`GroupWorker.try_inline`), without waking anyone; a larger or async one
  starts the task again. The engine's `IdleReaper` evicts a worker that has
  had no request for ``max_idle`` seconds;
- ``STOPPING`` -> ``STOPPED``: it stores a snapshot of its latest state,
  leaves the registry, and hands every remaining waiter `LeaderDied`, which
  makes them re-route to a fresh worker.

``target`` only grows: a request whose caller gave up (a timeout, a cancelled
scope) is still computed, so a later request finds it stored. A crash in the
engine's own code ends the worker without a snapshot and counts as a leader
death. A device failure is not a crash: the waiters for the failing slot and
later ones get `ComputeError`, and the worker keeps its last good state.

No task exists for an idle worker, so an idle process costs its state and a
few hundred bytes, and a request served inline costs no task switch. Inline
application never checkpoints, so a cancellation can never leave a
half-applied slot; and it only happens when no task is working on the process.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING, Final, NoReturn

import attrs
import trio

from ._broadcast import SlotBroadcaster
from ._exceptions import ComputeError, HbTrioError, LeaderDied, StoreError
from ._message import Message
from ._process import CHUNK, ProcessRuntime
from ._store import SlotResult, Store

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["GroupWorker", "Phase", "Reroute", "WorkerInfo"]

log = logging.getLogger("hbtrio")

#: Most slots a requesting task applies itself on the fast path.
INLINE_MAX: Final = 8
#: Most assignments a catching-up worker reads ahead in one store call.
AHEAD: Final = 4096


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    IDLE = "idle"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Reroute(Exception):
    """Internal: the worker cannot serve this slot; ask the engine again (not a leader death)."""


@attrs.frozen
class WorkerInfo:
    """What `Engine.workers` tells about one live worker (a snapshot in time)."""

    group: str
    pid: str
    phase: str
    slot: int
    target: int
    waiting: int
    #: Seconds since its last request, or since its last work ended, while it
    #: is idle; 0 while it works.
    idle_seconds: float
    computed: int
    #: Wall-clock time (``time.time()``) when the worker started.
    started_at: float


def _copy_error(exc: HbTrioError) -> HbTrioError:
    """A fresh copy of ``exc`` (its type, attributes and cause): one per waiter."""
    fresh = type(exc).__new__(type(exc))
    fresh.__dict__.update(exc.__dict__)
    fresh.args = exc.args
    fresh.__cause__ = exc.__cause__
    return fresh


@attrs.define(eq=False, repr=False)
class GroupWorker:
    """The worker of one process. Its fields change only on the event loop, between awaits."""

    pid: str
    engine: Engine
    store: Store
    # Invariant: state is None until restored; afterwards state["at-slot"] == slot.
    state: Message | None = None
    slot: int = -1
    # Invariant: target >= every slot a parked waiter asked of this worker, and
    # target <= slot whenever phase is IDLE (so an idle worker has no waiters).
    target: int = -1
    waiters: SlotBroadcaster = attrs.field(factory=SlotBroadcaster)
    # Invariant: a task runs this worker exactly while phase is STARTING or RUNNING
    # (or STOPPING after one of those).
    phase: Phase = Phase.STARTING
    runtime: ProcessRuntime | None = None
    # True once restored, with a device whose slots apply synchronously.
    plain: bool = False
    stop_requested: bool = False
    stopped: trio.Event | None = None
    last_request: float = 0.0
    started_at: float = 0.0
    computed: int = 0
    # True while the idle reaper holds an entry for this worker; its deadline then.
    watched: bool = False
    reap_at: float = 0.0
    # Assignments read ahead of ``slot`` (consecutive from slot + 1), not yet applied.
    # ``ahead[ahead_at:]`` are those (an index, not slices: no copying per chunk);
    # ``None`` rather than an empty list: one object fewer per idle worker for the GC.
    ahead: list[Message] | None = None
    ahead_at: int = 0

    def __lt__(self, other: GroupWorker) -> bool:
        """The idle reaper's heap order: the earlier ``reap_at`` first."""
        return self.reap_at < other.reap_at

    def info(self) -> WorkerInfo:
        now = trio.current_time()
        return WorkerInfo(
            group=self.pid,
            pid=self.pid,
            phase=self.phase.value,
            slot=self.slot,
            target=self.target,
            waiting=len(self.waiters),
            # Only an idle worker is idle: a busy one is at work for somebody.
            idle_seconds=max(0.0, now - self.last_request) if self.phase is Phase.IDLE else 0.0,
            computed=self.computed,
            started_at=self.started_at,
        )

    # requests (called from the requesting task) ---------------------------------------------------

    def request(self, slot: int) -> Message | None:
        """Ask for ``slot``: its state if at hand, else ``None`` (then wait on `waiters`).

        Raises the worker's target to ``slot`` and starts its task if it is
        idle. Raises `LeaderDied` if the worker is gone, `Reroute` if it is
        already past ``slot``. Never blocks: the caller then parks on
        ``self.waiters`` (`SlotBroadcaster.enter`; one coroutine less per waiter).
        """
        phase = self.phase
        if phase is Phase.STOPPED:
            raise LeaderDied(f"the worker of {self.pid} is gone")
        if phase is Phase.RUNNING or phase is Phase.IDLE:
            if slot == self.slot:
                return self.state
            if slot < self.slot:
                raise Reroute
        if slot > self.target and phase is not Phase.STOPPING:
            self.target = slot
            if phase is Phase.IDLE:
                self.phase = Phase.RUNNING
                self.engine._nursery.start_soon(self.run, name=f"hbtrio worker {self.pid}")
        return None

    def try_inline(self, slot: int) -> Message | None:
        """Apply up to ``slot`` in the calling task if this worker is idle. Never checkpoints.

        Returns the state, or ``None`` when the fast path does not apply (the
        worker is busy or starting, somebody waits, the device is async, the
        gap is large, the assignments or stored results need I/O, or the store
        is `~Store.backlogged`: the caller then waits for it first). Raises
        `ComputeError`; the worker then keeps the slots before the failing one.
        The caller records the request's time in ``last_request``.
        """
        if self.phase is not Phase.IDLE or not self.plain or self.store.backlogged:
            return None
        if slot == self.slot + 1:
            return self.step(slot)
        gap = slot - self.slot
        if not 0 < gap <= INLINE_MAX:
            return None
        store, pid, start = self.store, self.pid, self.slot + 1
        try:
            if store.get_result_nowait(pid, start) is not None:
                return None  # stored ahead of us: the worker jumps there instead
            batch = store.get_assignments_nowait(pid, start, slot + 1)
        except trio.WouldBlock:
            return None
        if len(batch) != gap:
            return None
        states: list[Message] = []
        try:
            self.runtime.apply_sync(self.state, batch, states)  # type: ignore[union-attr,arg-type]
        finally:
            self._commit_states(start, states)
        if slot > self.target:
            self.target = slot
        return self.state

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device it calls
    def step(self, slot: int) -> Message | None:
        """`try_inline` for the next slot (``self.slot + 1``) of an idle worker.

        The request path's common case: the caller checked that this worker is
        idle. Never checkpoints; ``None`` when the fast path does not apply.
        """
        store = self.store
        if not self.plain or store.backlogged:
            return None
        try:
            assignment = store.pending_assignment_nowait(self.pid, slot)
        except trio.WouldBlock:
            return None
        if assignment is None:  # unscheduled, or stored ahead (the worker jumps there)
            return None
        rt = self.runtime  # set, like state, whenever plain is
        try:
            state = rt.compute_one(self.state, assignment)  # type: ignore[union-attr,arg-type]
        except BaseException as exc:  # whatever the device raised: see is_device_failure
            raise rt.failure(slot, exc) from exc  # type: ignore[union-attr]
        try:
            snapshot = slot % rt.cache_frequency == 0  # type: ignore[union-attr]
            store.put_state_nowait(self.pid, slot, state, snapshot)
        except StoreError as exc:
            self._refused(slot, exc)
        self.slot, self.state = slot, state
        self.computed += 1
        self.target = slot  # idle, so it was at most our slot
        return state

    # Committing applied slots: the store comes first. If it refuses them
    # (`StoreError`), the worker keeps its previous state (it never holds a
    # state the store does not back), the waiters for those slots and later
    # ones get the error, and it is raised. None of this blocks.

    def _commit_states(self, first: int, states: list[Message]) -> None:
        """Adopt consecutive states from a plain device (each its own snapshot)."""
        if states:
            try:
                self.store.put_states_nowait(
                    self.pid,
                    first,
                    states,
                    self.runtime.cache_frequency,  # type: ignore[union-attr]
                )
            except StoreError as exc:
                self._refused(first, exc)
            self._adopt(first, states)

    def _commit(self, result: SlotResult) -> None:
        """Adopt one slot from an async device (with its snapshot, if any)."""
        try:
            self.store.put_results_nowait(self.pid, [result])
        except StoreError as exc:
            self._refused(result[0], exc)
        self._adopt(result[0], [result[1]])

    def _refused(self, first: int, exc: StoreError) -> NoReturn:
        self.waiters.fail_from(first, lambda _s: _store_error(exc))
        self.target = self.slot
        raise exc

    def _adopt(self, first: int, states: list[Message]) -> None:
        n = len(states)
        self.slot, self.state = first + n - 1, states[-1]
        self.computed += n
        waiters = self.waiters
        if waiters._count:
            if len(waiters._waiters) < n:
                for s in [s for s in waiters._waiters if first <= s <= self.slot]:
                    waiters.publish(s, states[s - first])
            else:
                for s, state in enumerate(states, first):
                    if s in waiters._waiters:
                        waiters.publish(s, state)

    # the worker task ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The worker's task while it has work; run in the engine's root nursery. Never raises.

        Ends by going idle (caught up), or by finishing the worker (stop
        requested, start failed, crash, cancellation at engine shutdown).
        """
        engine = self.engine
        ending = "idle"
        try:
            if self.phase is Phase.STARTING:
                self.started_at = time.time()  # wall clock, for people reading it
                try:
                    await self._start()
                except HbTrioError as exc:
                    # The process cannot run (unknown, bad device, failing init or
                    # restore, store down): each waiter gets the reason; none re-routes.
                    reason = exc
                    self.waiters.fail_all(lambda _s: _copy_error(reason))
                    ending = "failed"
                    return
            self.phase = Phase.RUNNING
            while self.target > self.slot and not self.stop_requested:
                await self._compute_chunk()
            if self.stop_requested:
                ending = "stop"
        except Exception as exc:  # a bug, or a store that raised something unexpected
            ending = "crash"
            engine._leader_deaths += 1
            log.error("the worker of %s crashed", self.pid, exc_info=exc)
        except BaseException:  # cancelled: the engine is closing past its grace period
            ending = "stop"
            raise
        finally:
            if ending == "idle":
                self.phase = Phase.IDLE
                # Idle from now: requests that waited on the work did not stamp it.
                self.last_request = engine._now()
                engine._reaper.watch(self)
            else:
                await self._finish(snapshot=ending == "stop")

    async def _start(self) -> None:
        engine = self.engine
        self.runtime = rt = await ProcessRuntime.load(
            self.pid, engine._store, engine._devices, engine._cache_frequency, engine._slot_timeout
        )
        lowest = min(self.waiters.slots(), default=self.target)
        # The snapshot and the assignments after it (toward the target) in one store read.
        self.state, ahead = await rt.restore_ahead(max(lowest, 0), self.target + 1, AHEAD)
        self.ahead, self.ahead_at = ahead or None, 0
        self.slot = self.state["at-slot"]
        self.plain = rt.plain
        self.waiters.publish(self.slot, self.state)
        # Waiters for slots before the snapshot are served by the engine, not by us.
        self.waiters.fail_below(self.slot, lambda _s: Reroute())

    async def retire(self) -> None:
        """End an idle worker: snapshot, leave the registry. Run as an engine task."""
        if self.phase is Phase.IDLE:
            await self._finish(snapshot=True)

    def request_stop(self) -> None:
        """Ask the worker to stop after its current slot (storing a snapshot). Never blocks.

        A worker with a task stops when that task next looks; an idle one has
        no task to notice, so one is started to retire it. Idempotent, and a
        no-op for a worker that has stopped already.
        """
        if self.phase is Phase.STOPPED or self.stop_requested:
            return
        self.stop_requested = True
        if self.phase is Phase.IDLE:
            self.engine._nursery.start_soon(self.retire)

    async def wait_stopped(self) -> None:
        """Return once the worker has stopped; at once if it already has. Checkpoints.

        A worker can finish before anybody waits for it (an outside
        cancellation ends its task as soon as it is delivered), so the phase
        is what counts, not who created the event first.
        """
        if self.phase is Phase.STOPPED:
            await trio.lowlevel.checkpoint()
            return
        if self.stopped is None:
            self.stopped = trio.Event()
        await self.stopped.wait()

    async def _compute_chunk(self) -> None:
        rt = self.runtime
        assert rt is not None and self.state is not None
        start = self.slot + 1
        try:
            if await self._skip_stored(start):
                return
        except (ComputeError, StoreError) as exc:  # reading or restoring the snapshot failed
            failed = exc
            self.waiters.fail_from(start, lambda _s: _copy_error(failed))
            self.target = self.slot
            return
        stop = min(self.target, self.slot + CHUNK) + 1
        try:
            batch = self._read_ahead(start, stop)
            if not batch:
                # Read toward the target in one go: with a store that does I/O, the
                # next chunks then come from memory instead of queueing behind the
                # writes of the results we are about to produce.
                fetched = await rt.assignments(
                    start, max(stop, min(self.target, start + AHEAD) + 1)
                )
                batch = fetched[: stop - start]
                self.ahead = fetched if len(fetched) > len(batch) else None
                self.ahead_at = len(batch)
        except ComputeError as exc:  # not scheduled, or the schedule cannot be read
            self._give_up(exc)
            return
        except StoreError as exc:  # the store failed answering what is scheduled
            error = exc
            self.waiters.fail_from(start, lambda _s: _store_error(error))
            self.target = self.slot
            return
        # Backpressure comes last before computing: between it and the results
        # nothing awaits, so the store's bound is exceeded by one chunk at most.
        if not await self._writable():
            return
        states: list[Message] = []
        failure: ComputeError | None = None
        try:
            try:
                if rt.plain:
                    rt.apply_sync(self.state, batch, states)
                else:
                    for a in batch:  # slot by slot: a stop takes effect after the current slot
                        if self.stop_requested or not await self._writable():
                            break
                        await rt.apply_async(self.state, [a], self._commit)
            except ComputeError as exc:
                failure = exc
            finally:
                self._commit_states(start, states)
        except StoreError:
            return  # _commit told the waiters; the state is the last one the store took
        if failure is not None:
            self._give_up(failure)
            return
        if self.target > self.slot:
            # Yield between chunks. Caught up, the task goes idle at once instead:
            # the requester it just answered then finds it idle and is served inline.
            await trio.lowlevel.checkpoint()

    async def _writable(self) -> bool:
        """Wait while the store is backlogged; False (waiters told) if it failed."""
        try:
            await self.store.wait_writable()
        except StoreError as exc:
            error = exc
            self.waiters.fail_from(self.slot + 1, lambda _s: _store_error(error))
            self.target = self.slot
            return False
        return True

    def _read_ahead(self, start: int, stop: int) -> list[Message]:
        """Assignments ``start..stop-1`` from what was read ahead (``[]`` if not there)."""
        ahead, at = self.ahead, self.ahead_at
        if ahead is None:
            return []
        if ahead[at]["slot"] != start:  # an inline request or a jump moved us: drop it
            self.ahead = None
            return []
        batch = ahead[at : at + stop - start]
        at += len(batch)
        if at < len(ahead):
            self.ahead_at = at
        else:
            self.ahead = None
        return batch

    async def _skip_stored(self, start: int) -> bool:
        """Jump to a stored snapshot ahead of us instead of recomputing; True if we jumped.

        Costs one dictionary lookup unless results beyond our slot are stored
        (a previous worker got further than the snapshot we restored).
        """
        rt = self.runtime
        assert rt is not None
        try:
            if rt.store.get_result_nowait(self.pid, start) is None:
                return False
        except trio.WouldBlock:
            pass
        found = await rt.store.latest_snapshot(self.pid, self.target)
        if found is None or found[0] <= self.slot:
            return False
        self.state, self.slot = await rt.from_snapshot(*found), found[0]
        self.waiters.publish(self.slot, self.state)
        # Waiters for the slots we skipped read their stored results instead.
        self.waiters.fail_below(self.slot, lambda _s: Reroute())
        return True

    def _give_up(self, exc: ComputeError) -> None:
        """Fail the waiters that needed the failing slot; keep the last good state."""
        first = exc.attempted_slot if exc.attempted_slot is not None else self.slot + 1
        self.waiters.fail_from(first, lambda _s: _copy_error(exc))
        self.target = self.slot

    async def _finish(self, *, snapshot: bool) -> None:
        engine = self.engine
        self.phase = Phase.STOPPING
        try:
            if snapshot and self.state is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(engine._shutdown_grace):
                    await self._store_snapshot()
        finally:
            self.phase = Phase.STOPPED
            if engine._workers.get(self.pid) is self:
                del engine._workers[self.pid]
            self.store.unpin(self.pid)  # pinned by the engine when it made this worker
            engine._workers_stopped += 1
            engine._retired_computed += self.computed
            self.waiters.fail_all(lambda _s: LeaderDied(f"the worker of {self.pid} stopped"))
            if self.stopped is not None:
                self.stopped.set()

    async def _store_snapshot(self) -> None:
        rt, state = self.runtime, self.state
        assert rt is not None and state is not None
        if self.slot % rt.cache_frequency == 0 and rt.device.snapshot is None:
            return  # already stored as a snapshot with its result
        try:
            await rt.store.put_snapshot(self.pid, self.slot, await rt.snapshot_of(state))
        except HbTrioError as exc:
            log.warning("worker of %s could not store its snapshot: %s", self.pid, exc)


def _store_error(exc: StoreError) -> StoreError:
    fresh = StoreError(str(exc))
    fresh.__cause__ = exc.__cause__ or exc
    return fresh
