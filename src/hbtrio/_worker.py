"""Group workers: one per process, holding it in memory between requests.

Theory of operation
-------------------
A worker is a `Driver` (the computation: `_driver`, around the process's
`ProcessCore`) with a lifecycle and waiters. Everything that decides its
phase lives in this module; the engine only asks (`serve_now`, `request`,
`enter`, `request_stop`, `wait_stopped`, `retire`, `info`), and the worker
reaches its engine only through a small `WorkerHost`.

Phases and what moves a worker between them (one owner: this class):

==============  ===========================================  =============
phase           entered when                                 a task runs?
==============  ===========================================  =============
``STARTING``    `starting`: a request found no worker        yes: `run`
``RUNNING``     booted; or `request` asked an idle worker    yes: `run`
                for a slot it cannot serve inline
``IDLE``        `run` caught up (the task ends); or          no
                `idle_now` booted it in the requesting task
``STOPPING``    `request_stop`, the idle reaper (`retire`),  while storing
                the engine closing, a failed start or crash  its snapshot
``STOPPED``     its snapshot is stored (or given up)         no
==============  ===========================================  =============

- ``STARTING``: its task boots the core at the latest snapshot at or below
  the lowest slot anybody waits for (slot 0: ``init``, or a live device's
  ``boot``);
- ``RUNNING``: while ``target`` (the highest slot requested of it) is ahead of
  the position, its task advances: chunks of assignments applied, stored,
  published to the waiters;
- ``IDLE``: caught up, the task has exited; the process waits in memory. A
  request a few slots ahead is computed by the requesting task itself
  (`serve_now`), without waking anyone; a larger one, or one for a device
  whose calls are awaited or threaded, starts the task again. The engine's
  idle reaper retires a worker that has had no request for ``max_idle``;
- ``STOPPING`` -> ``STOPPED``: it stores a snapshot, closes its live
  instance, leaves the registry (`WorkerHost.finished`), and hands every
  remaining waiter `LeaderDied`, which makes them re-route to a fresh worker.

``target`` only grows while somebody waits: a request whose caller gave up (a
timeout, a cancelled scope) is still computed, so a later request finds it
stored. A crash in the engine's own code ends the worker without a snapshot
and counts as a leader death. A device failure is not a crash: the waiters
for the failing slot and later ones get `ComputeError`, and the process stays
at its last good slot (a live instance is rebuilt there first).

No task exists for an idle worker and its waiter table is made on first use,
so an idle process costs its worker, its core and its state: three objects
for the garbage collector. Inline computation never checkpoints, so a
cancellation can never leave a half-applied slot, and it only happens while
no task is working on the process.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import attrs
import trio

from ._broadcast import SlotBroadcaster, _Waiter
from ._budget import Limits
from ._devices import Devices
from ._driver import Driver, Reroute, copy_error, core_nowait
from ._exceptions import ComputeError, HbTrioError, LeaderDied, StoreError, StoreFenced
from ._message import Message
from ._store import Store

__all__ = ["GroupWorker", "Phase", "Reroute", "WorkerHost", "WorkerInfo"]

log = logging.getLogger("hbtrio")


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    IDLE = "idle"
    STOPPING = "stopping"
    STOPPED = "stopped"


_IDLE: Final = Phase.IDLE
_RUNNING: Final = Phase.RUNNING
_STARTING: Final = Phase.STARTING


class WorkerHost(Protocol):
    """What a worker needs of its engine, and all it may touch."""

    store: Store
    devices: Devices
    cache_frequency: int
    slot_timeout: float | None
    shutdown_grace: float
    #: The engine's clock (``trio.current_time`` without its lookups).
    now: Callable[[], float]
    #: The engine's bounds.
    limits: Limits
    #: ``limits`` when it has a snapshot policy (the worker's then), else ``None``.
    snapshot_policy: Limits | None
    #: Whether workers measure their memory at boot and idle (``max_memory`` is set).
    measures_memory: bool

    def start_soon(self, fn: Callable[[], Any], name: str) -> None:
        """Run ``fn()`` as a task of the engine's root nursery."""

    def watch_idle(self, worker: GroupWorker) -> None:
        """The worker went idle: evict it after ``max_idle`` without a request."""

    def finished(self, worker: GroupWorker, *, crashed: bool) -> None:
        """The worker has stopped: take it out of the registry and count it."""

    def booted(self, worker: GroupWorker) -> None:
        """The worker's boot has ended (done or failed): it is no longer a cold start."""

    def memory_changed(self, worker: GroupWorker, delta: int) -> None:
        """The worker's `memory_bytes` changed by ``delta`` (the engine may evict others)."""


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
    #: The estimate of the memory it holds, in bytes (see `Engine.statistics`).
    memory_bytes: int = 0


@attrs.define(eq=False, repr=False, kw_only=True)
class GroupWorker(Driver):
    """The worker of one process. Its fields change only on the event loop, between awaits."""

    pid: str
    host: WorkerHost
    # Invariant: a task runs this worker exactly while phase is STARTING or RUNNING
    # (or STOPPING after one of those).
    phase: Phase = Phase.STARTING
    # Made on first use: an idle worker has no waiters (see `enter`).
    board: SlotBroadcaster | None = None
    stop_requested: bool = False
    stopped: trio.Event | None = None
    #: The engine's clock when it last answered a request, or went idle.
    last_request: float = 0.0
    started_at: float = 0.0
    # The idle reaper's entry: True while it holds this worker, and the ``last_request``
    # it was pushed with (its place in the heap; its deadline is that plus ``max_idle``).
    watched: bool = False
    watched_since: float = 0.0
    #: The estimate of the memory it holds (`ProcessCore.memory_estimate`), measured
    #: when it boots and when it goes idle; 0 before its boot.
    memory_bytes: int = 0
    #: Counted among the engine's booting workers until its boot ends (`WorkerHost.booted`).
    cold_start: bool = False
    #: Retired by the engine to stay within its bounds (no longer counted).
    evicted: bool = False
    #: Set by `lose`: the store can no longer write for this process (another node owns
    #: it); the worker stores nothing more and its waiters get copies of this error.
    lost: StoreFenced | None = None
    _now: Callable[[], float] = attrs.field(init=False, alias="_now")

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._now = self.host.now  # the request path reads it
        self.policy = self.host.snapshot_policy

    # making one ----------------------------------------------------------------------------------

    @classmethod
    def starting(cls, pid: str, host: WorkerHost, target: int) -> GroupWorker:
        """A worker whose task starts now (booting toward ``target``). Never blocks."""
        worker = cls(
            core=None,  # type: ignore[arg-type]  # set by its task before it leaves STARTING
            store=host.store,
            slot_timeout=host.slot_timeout,
            target=target,
            pid=pid,
            host=host,
        )
        host.store.pin(pid)  # what the store holds about it stays in memory: unpinned at finish
        host.start_soon(worker.run, name=f"hbtrio worker {pid}")
        return worker

    @classmethod
    def idle_now(cls, pid: str, host: WorkerHost, slot: int) -> GroupWorker | None:
        """A worker booted in the calling task, idle, when all it needs is in memory.

        A device whose calls are all inline and a store that answers from
        memory need no task to boot: the worker is made at the latest snapshot
        at or below ``slot`` (or at ``init``), and the caller is then served
        inline like any request to an idle worker. ``None`` when a task must do
        it. Never checkpoints; `ComputeError` when the device fails.
        """
        store = host.store
        try:
            core = core_nowait(pid, store, host.devices, host.cache_frequency)
        except trio.WouldBlock:
            return None
        worker = cls(
            core=core,
            store=store,
            slot_timeout=host.slot_timeout,
            pid=pid,
            host=host,
            phase=Phase.IDLE,
        )
        if not worker.boot_nowait(slot):
            return None
        worker.target = core.slot
        worker.started_at, worker.last_request = time.time(), host.now()
        store.pin(pid)
        host.watch_idle(worker)
        worker._measure()
        return worker

    def __lt__(self, other: GroupWorker) -> bool:
        """The idle reaper's heap order: the older request first (so the earlier deadline)."""
        return self.watched_since < other.watched_since

    def __repr__(self) -> str:
        return f"<GroupWorker {self.pid} {self.phase.value} target={self.target}>"

    # what the engine asks ------------------------------------------------------------------------

    @property
    def computed(self) -> int:
        """Slots this worker's device calls applied."""
        core = self.core
        return 0 if core is None else core.computed

    @property
    def idle(self) -> bool:
        return self.phase is _IDLE

    def aims_at(self, slot: int) -> bool:
        """Whether this worker was ever asked for ``slot`` or beyond (so it is scheduled)."""
        return slot <= self.target

    def position(self) -> int | None:
        """The slot its process stands at (``None`` while it boots). Never blocks."""
        core = self.core
        return None if core is None else core.slot

    def join(self, slot: int) -> Message | _Waiter | None:
        """Join the work toward ``slot`` if this worker is at it; never blocks.

        At it means: starting or running, and aiming at ``slot`` or beyond (then
        `serve_now` never computes in the calling task). Returns ``None`` if it
        is not (nothing changed), the result at once if the worker stands at
        ``slot``, or else the calling task registered as waiting for ``slot``:
        park it at once with ``await trio.lowlevel.wait_task_rescheduled(waiter)``
        (see `SlotBroadcaster.enter`), the checkpoint that delivers a pending
        cancellation. Raises `Reroute` if the worker is already past ``slot``.
        (`request` and `enter` in one call, for the parked waiter's path: their
        checks are written out here, one call instead of three; keep them alike.)
        """
        phase = self.phase
        if slot > self.target or (phase is not _RUNNING and phase is not _STARTING):
            return None
        core = self.core
        if core is not None and phase is _RUNNING:
            at = core.slot
            if slot <= at:
                if slot == at and core.result is not None:
                    return core.result
                raise Reroute
        board = self.board
        if board is None:
            board = self.board = SlotBroadcaster()
        return board.enter(slot)

    def info(self) -> WorkerInfo:
        core = self.core
        now = trio.current_time()
        return WorkerInfo(
            group=self.pid,
            pid=self.pid,
            phase=self.phase.value,
            slot=-1 if core is None else core.slot,
            target=self.target,
            waiting=0 if self.board is None else len(self.board),
            # Only an idle worker is idle: a busy one is at work for somebody.
            idle_seconds=max(0.0, now - self.last_request) if self.phase is _IDLE else 0.0,
            computed=self.computed,
            started_at=self.started_at,
            memory_bytes=self.memory(),
        )

    @property
    def waiting(self) -> int:
        return 0 if self.board is None else len(self.board)

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device it calls
    def serve_now(self, slot: int) -> Message | None:
        """The result at ``slot`` if this worker has it at once; ``None`` if not. Never blocks.

        At once means: its current result, or, while it is idle, computed in
        the calling task from a few slots back (`Driver.apply_nowait`; the next
        slot, the request path's common case, inlined here). Records the
        request's time for the idle reaper. Raises `ComputeError`, or
        `StoreError` when the store refuses the result.
        """
        core = self.core
        if core is None:
            return None  # starting
        at = core.slot
        if slot != at + 1 or self.phase is not _IDLE:
            if slot == at:
                state = core.result
            elif self.phase is not _IDLE or slot < at:
                return None
            else:
                state = self.apply_nowait(slot)
        else:
            # `apply_nowait` + `_commit` for one slot, inlined; nobody waits on an
            # idle worker, so there is nobody to wake.
            if not core.inline or self.store.backlogged:
                return None
            fast, pid = self.fast, core.pid
            try:
                assignment = fast.pending_assignment_nowait(pid, slot)
            except trio.WouldBlock:
                return None
            if assignment is None:  # unscheduled, or stored ahead (`advance` jumps there)
                return None
            before = core.result
            if core.instance is None:
                # A state device: `ProcessCore.step` inlined, each state its own
                # snapshot, stored before the core moves to it.
                try:
                    state = core._compute_one(before, assignment)  # type: ignore[arg-type]
                except BaseException as exc:  # whatever the device raised: see is_device_failure
                    raise core.failure(slot, exc) from exc
                try:
                    fast.put_state_nowait(pid, slot, state, slot % core.cache_frequency == 0)
                except StoreError as exc:
                    self._undo(at, before, exc)
                core.slot, core.result = slot, state
                core.computed += 1
                self.target = slot
                self.last_request = self._now()
                return state
            try:
                state = core.step(assignment)
            except ComputeError:
                self._close_discarded_nowait()  # a live instance it threw away
                raise
            try:
                snapshot = core.snapshot_now() if core.is_snapshot(slot) else None
                self.store.put_results_nowait(pid, [(slot, state, snapshot)])
            except (StoreError, ComputeError) as exc:
                self._undo(at, before, exc)
            self.target = slot
        if state is not None:
            self.last_request = self._now()
        return state

    def request(self, slot: int) -> Message | None:
        """Ask for ``slot``: its result if at hand, else ``None`` (then wait on `enter`).

        Raises the worker's target to ``slot`` and starts its task if it is
        idle. Raises `LeaderDied` if the worker is gone, `Reroute` if it is
        already past ``slot``. Never blocks.
        """
        phase = self.phase
        if phase is Phase.STOPPED:
            raise LeaderDied(f"the worker of {self.pid} is gone")
        core = self.core
        if core is not None and (phase is _RUNNING or phase is _IDLE):
            if slot == core.slot and core.result is not None:
                return core.result
            if slot <= core.slot:
                raise Reroute
        if slot > self.target and phase is not Phase.STOPPING:
            self.target = slot
            if phase is _IDLE:
                self.phase = _RUNNING
                self.host.start_soon(self.run, name=f"hbtrio worker {self.pid}")
        return None

    def enter(self, slot: int) -> _Waiter:
        """Register the calling task as waiting for ``slot``; park it at once with
        ``await trio.lowlevel.wait_task_rescheduled(worker.enter(slot))`` (see
        `SlotBroadcaster.enter`)."""
        board = self.board
        if board is None:
            board = self.board = SlotBroadcaster()
        return board.enter(slot)

    # the driver's hooks: whom to wake, when to stop -----------------------------------------------

    def _waiters(self) -> SlotBroadcaster | None:
        return self.board

    def _publish(self, first: int, results: list[Message]) -> None:
        waiters = self.board
        if waiters is None or not waiters._count:
            return
        n, last = len(results), first + len(results) - 1
        if len(waiters._waiters) < n:
            for s in [s for s in waiters._waiters if first <= s <= last]:
                waiters.publish(s, results[s - first])
        else:
            for s, result in enumerate(results, first):
                if s in waiters._waiters:
                    waiters.publish(s, result)

    def _stopping(self) -> bool:
        return self.stop_requested

    # the worker's task ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The worker's task while it has work; run in the engine's root nursery. Never raises.

        Ends by going idle (caught up), or by finishing the worker (stop
        requested, start failed, crash, cancellation at engine shutdown).
        """
        ending = "idle"
        try:
            if self.phase is Phase.STARTING:
                self.started_at = time.time()  # wall clock, for people reading it
                try:
                    try:
                        await self._start()
                    finally:
                        if self.cold_start:
                            self.cold_start = False
                            self.host.booted(self)
                    self._measure()
                except HbTrioError as exc:
                    # The process cannot run (unknown, bad device, failing init or
                    # restore, store down): each waiter gets the reason; none re-routes.
                    reason = exc
                    if self.board is not None:
                        self.board.fail_all(lambda _s: copy_error(reason))
                    ending = "failed"
                    return
            self.phase = _RUNNING
            while self.target > self.core.slot and not self.stop_requested:
                try:
                    await self.advance()
                except (ComputeError, StoreError):
                    pass  # its waiters were told, and the target came back: caught up
            if self.stop_requested:
                ending = "stop"
        except Exception as exc:  # a bug, or a store that raised something unexpected
            ending = "crash"
            log.error("the worker of %s crashed", self.pid, exc_info=exc)
        except BaseException:  # cancelled: the engine is closing past its grace period
            ending = "stop"
            raise
        finally:
            if ending == "idle":
                self.phase = _IDLE
                # Idle from now: requests that waited on the work did not stamp it.
                self.last_request = self.host.now()
                self.host.watch_idle(self)
                self._measure()
            else:
                await self._finish(snapshot=ending == "stop", crashed=ending == "crash")

    async def _start(self) -> None:
        host = self.host
        driver = await Driver.load(self.pid, host.store, host.devices, host.cache_frequency)
        self.core = driver.core
        board = self.board
        lowest = min(board.slots(), default=self.target) if board is not None else self.target
        # The snapshot and the assignments after it (toward the target) in one store read.
        await self.boot(max(lowest, 0), self.target + 1)
        self._jumped()

    def memory(self) -> int:
        """The estimate of the memory it holds: `memory_bytes` when the engine bounds
        memory (then measured at boot and idle), else measured now. Never blocks."""
        if self.host.measures_memory or self.core is None:
            return self.memory_bytes
        return self.core.memory_estimate()

    def _measure(self) -> None:
        """Measure `memory_bytes` again and tell the host what changed, when the engine
        bounds memory (else `memory` measures on demand). Never blocks."""
        core = self.core
        if core is None or self.evicted or not self.host.measures_memory:
            return
        size = core.memory_estimate()
        delta, self.memory_bytes = size - self.memory_bytes, size
        if delta:
            self.host.memory_changed(self, delta)

    # stopping ------------------------------------------------------------------------------------

    async def retire(self) -> None:
        """End an idle worker: snapshot, leave the registry. Run as an engine task."""
        if self.phase is _IDLE:
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
        if self.phase is _IDLE:
            self.host.start_soon(self.retire, name=f"hbtrio retire {self.pid}")

    def lose(self, exc: StoreFenced) -> None:
        """The store lost this process to another owner: end like a lost worker. Never blocks.

        Every waiter gets a copy of ``exc`` now (the node sends them to the new
        owner), and the worker stops without storing a snapshot (the store would
        refuse it); it leaves the registry once its task, if any, has stopped,
        and requests that reach it meanwhile get ``exc`` too. Idempotent.
        """
        if self.phase is Phase.STOPPED or self.lost is not None:
            return
        self.lost = exc
        if self.board is not None:
            self.board.fail_all(lambda _s: copy_error(exc))
        self.request_stop()

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

    async def _finish(self, *, snapshot: bool, crashed: bool = False) -> None:
        self.phase = Phase.STOPPING
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(self.host.shutdown_grace):
                if snapshot and self.core is not None and self.lost is None:
                    await self.store_snapshot()
                if self.core is not None:
                    await self.close()
        finally:
            self.phase = Phase.STOPPED
            self.store.unpin(self.pid)  # pinned when this worker was made
            self.host.finished(self, crashed=crashed)
            if self.board is not None:
                lost = self.lost
                if lost is not None:
                    self.board.fail_all(lambda _s: copy_error(lost))
                else:
                    self.board.fail_all(lambda _s: LeaderDied(f"the worker of {self.pid} stopped"))
            if self.stopped is not None:
                self.stopped.set()
