"""The one driver of a process's computation: the I/O around a `ProcessCore`.

Theory of operation
-------------------
Every path that computes slots goes through a `Driver`: a request that an
idle worker answers in the request's own task (`apply_nowait`, and the one
slot case inlined in `GroupWorker.serve_now`), a worker's catch-up
(`advance`), and the recompute of an earlier slot (`compute_slot`: a driver
and core of its own, never the worker's hot instance). So this is the one
place where:

- device calls that are not inline are made (`call`): awaited under
  ``slot_timeout``, or in a worker thread (`run_in_thread` devices) under the
  same bound, abandoned if it runs out;
- results are committed (`_commit`): the core computes them, the store takes
  them, and only then are the waiters of those slots woken (`_publish`). A
  store that refuses them puts the core back where it was (`_undo`: a live
  instance that already moved is thrown away), fails the waiters from the
  first refused slot, and raises;
- backpressure applies: `Store.wait_writable` right before computing, with
  no await between it and the results;
- a long catch-up yields to the scheduler: between chunks of `CHUNK` slots.

A live instance that a failure threw away is rebuilt (`rebuild`) before the
next slot is computed: booted from the latest snapshot at or below the
position, then replayed to it without storing (those results are stored).

A `Driver` belongs to one task at a time. The worker (`GroupWorker`) is a
driver with a lifecycle and waiters; `compute_slot` uses a bare one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from ._broadcast import SlotBroadcaster
from ._budget import Limits
from ._core import AWAIT, INLINE, Call, ProcessCore
from ._devices import Devices, is_async, is_device_failure
from ._exceptions import (
    ComputeError,
    HbTrioError,
    InvalidMessage,
    ProcessNotFound,
    SlotNotScheduled,
    StoreError,
    StoreFenced,
)
from ._message import Message, hand_out, validate_slot
from ._store import FastPath, Store, fast_path

__all__ = ["AHEAD", "CHUNK", "Driver", "Reroute", "compute_slot"]

log = logging.getLogger("hbtrio")

#: Slots applied between two looks at the outside world (store backpressure, new requests).
CHUNK: Final = 512
#: Most assignments read ahead of the position in one store call.
AHEAD: Final = 4096
#: Most slots handed to one ``compute_many`` call of a live instance (`Driver._apply_many`):
#: a thread hop (about 0.2 ms) shared by that many slots, and the longest a waiter for
#: an early slot of the batch waits for the last one.
MANY_MAX: Final = 32
#: Most slots a requesting task applies itself (`Driver.apply_nowait`).
INLINE_MAX: Final = 8


class Reroute(Exception):
    """Internal: this driver cannot serve that slot (it is past it); ask the store instead."""


def _store_error(exc: StoreError) -> StoreError:
    if isinstance(exc, StoreFenced):  # its waiters go to the new owner: keep what it says
        return copy_error(exc)  # type: ignore[return-value]
    fresh = StoreError(str(exc))
    fresh.__cause__ = exc.__cause__ or exc
    return fresh


def copy_error(exc: HbTrioError) -> HbTrioError:
    """A fresh copy of ``exc`` (its type, attributes and cause): one per waiter."""
    fresh = type(exc).__new__(type(exc))
    fresh.__dict__.update(exc.__dict__)
    fresh.args = exc.args
    fresh.__cause__ = exc.__cause__
    return fresh


@attrs.define(eq=False, repr=False)
class Driver:
    """Computation for one process: boot, apply, store, publish (see the module).

    Blocking methods say so; ``*_nowait`` ones never checkpoint.
    """

    core: ProcessCore
    store: Store
    #: Seconds a device call that is not inline may take (``None``: no limit).
    slot_timeout: float | None = None
    #: The highest slot wanted: `advance` computes toward it.
    target: int = -1
    #: Assignments read ahead of the position (``ahead[ahead_at:]``, consecutive):
    #: an index, not slices, so nothing is copied per chunk; ``None`` when empty.
    ahead: list[Message] | None = None
    ahead_at: int = 0
    #: The store's answers from memory (`Store.fast`, or one that always says "wait").
    fast: FastPath = attrs.field(init=False)
    #: The snapshot policy besides every ``cache_frequency`` slots (`Limits` with
    #: ``snapshot_seconds`` or ``snapshot_cost_ratio``), or ``None``. It times the
    #: calls that are awaited or run in threads, on Trio's clock.
    policy: Limits | None = None
    #: Seconds of device calls since the last snapshot, and what the last one took.
    computing: float = 0.0
    snapshot_cost: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.fast = fast_path(self.store)

    @classmethod
    async def load(
        cls,
        pid: str,
        store: Store,
        devices: Devices,
        cache_frequency: int,
        slot_timeout: float | None = None,
    ) -> Driver:
        """A driver for ``pid``, not booted. Raises `ProcessNotFound` or `UnknownDevice`.

        Blocks on the store.
        """
        return cls(_core(pid, await store.get_process(pid), devices, cache_frequency), store,
                   slot_timeout)  # fmt: skip

    @classmethod
    def load_nowait(
        cls,
        pid: str,
        store: Store,
        devices: Devices,
        cache_frequency: int,
        slot_timeout: float | None = None,
    ) -> Driver:
        """`load` from memory: raises `trio.WouldBlock` if the store needs I/O."""
        return cls(core_nowait(pid, store, devices, cache_frequency), store, slot_timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.core!r} target={self.target}>"

    # whom to wake: a worker has waiters, a bare driver nobody -------------------------------------

    def _waiters(self) -> SlotBroadcaster | None:
        return None

    def _publish(self, first: int, results: list[Message]) -> None:
        """Hand each of these results to those waiting for its slot."""

    def _fail_from(self, slot: int, make_error: Callable[[int], BaseException]) -> None:
        waiters = self._waiters()
        if waiters is not None:
            waiters.fail_from(slot, make_error)

    def _fail_below(self, slot: int) -> None:
        """Waiters for slots before the position read them from the store instead."""
        waiters = self._waiters()
        if waiters is not None:
            waiters.fail_below(slot, lambda _s: Reroute())

    def _give_up(self, exc: HbTrioError, first: int) -> None:
        """Fail the waiters that needed slot ``first`` and later ones; stop aiming past here."""
        self._fail_from(first, lambda _s: copy_error(exc))
        self.target = self.core.slot

    def _stopping(self) -> bool:
        """True when `advance` should stop after the current slot (a worker asked to stop)."""
        return False

    # the one place device calls are made ---------------------------------------------------------

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device it calls
    async def call(self, call: Call, slots: int = 1) -> Any:
        """Make a device call the core asked for: inline, awaited, or in a thread.

        Awaited and threaded calls are bounded by ``slot_timeout`` (``slots``
        times that for a call that computes that many; a thread that runs out
        is abandoned: its result is thrown away). Raises what
        the device raises, or `trio.TooSlowError`; the caller hands that to
        `ProcessCore.failure`. Checkpoints unless the call is inline.
        """
        how, fn, args = call
        if how == INLINE:
            return fn(*args)
        timeout = self.slot_timeout
        with trio.fail_after(math.inf if timeout is None else timeout * slots):
            if how == AWAIT:
                return await fn(*args)
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self.core.device.limiter, abandon_on_cancel=True
            )

    # booting --------------------------------------------------------------------------------------

    async def boot(self, at_most: int, stop: int | None = None) -> None:
        """Stand at the latest snapshot at or below ``at_most`` (slot 0 without one).

        Reads the assignments after it, toward ``stop``, in the same store
        trip. A new process's slot 0 is stored (with its snapshot). Raises
        `ComputeError` (the device failed) or `StoreError`. Blocks on the
        store and the device. Cancellation-safe: a cancelled boot stored
        nothing and left the core unbooted.
        """
        core = self.core
        found = await self.store.latest_snapshot(
            core.pid, at_most, read_to=at_most + 1 if stop is None else stop
        )
        await self._boot_at(found)
        await self._read_result()
        self.ahead = None  # what the store read ahead, its fast path answers

    async def _read_result(self) -> None:
        """A live instance booted at a snapshot: its result there comes from the store."""
        core = self.core
        if core.result is None and core.slot > 0:
            core.result = await self.store.get_result(core.pid, core.slot)

    async def _boot_at(self, found: tuple[int, Message] | None) -> None:
        core = self.core
        initial = await self._booted(found)
        if initial is not None:  # a new process: slot 0 is stored with its snapshot
            snapshot = await self._snapshot_value()
            await self.store.wait_writable()
            self.store.put_results_nowait(core.pid, [(0, initial, snapshot)])

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device it calls
    def boot_nowait(self, at_most: int) -> bool:
        """`boot` in the calling task, when the store answers from memory and every call the
        boot needs (and every slot after it) is inline. Never checkpoints.

        Returns False, having done nothing, when it cannot; raises
        `ComputeError` when the device fails.
        """
        core = self.core
        if not core.inline or core.device.live:
            return False
        try:
            found = self.fast.latest_snapshot_nowait(core.pid, at_most)
        except trio.WouldBlock:
            return False
        slot, call = core.boot_plan(found)
        if call is not None and call[0] != INLINE:
            return False
        what = "restore" if found is not None else "init"
        try:
            value = None if call is None else call[1](*call[2])
            initial = core.booted(slot, value, found[1] if found is not None else None)
        except BaseException as exc:
            raise core.failure(slot, exc, what) from exc
        if initial is not None:
            self.fast.put_state_nowait(core.pid, 0, initial, True)  # its own snapshot
        return True

    # computing in the calling task ----------------------------------------------------------------

    def apply_nowait(self, slot: int) -> Message | None:
        """Apply the slots up to ``slot`` (a few ahead) in the calling task; its result.

        Never checkpoints. ``None`` when that cannot be done without waiting:
        the device's calls are not inline, the store is backlogged, the gap is
        more than `INLINE_MAX` slots, or an assignment (or a result stored
        ahead) needs I/O. Raises `ComputeError`, or `StoreError` when the store
        refuses the results (`_commit`). (`GroupWorker.serve_now` has the one
        slot case inlined.)
        """
        core, fast = self.core, self.fast
        start = core.slot + 1
        if not core.inline or self.store.backlogged or not 0 < slot - core.slot <= INLINE_MAX:
            return None
        try:
            if fast.get_result_nowait(core.pid, start) is not None:
                return None  # stored ahead of us: `advance` jumps there instead
            batch = fast.get_assignments_nowait(core.pid, start, slot + 1)
        except trio.WouldBlock:
            return None
        if len(batch) != slot - core.slot:
            return None
        self._apply_inline(batch)
        if self.target < slot:
            self.target = slot
        return core.result

    def _apply_inline(self, batch: list[Message]) -> None:
        """Apply and commit ``batch`` inline; raises the failure that stopped it, if any.

        The slots before a failing one are committed; the waiters from it on
        get the failure.
        """
        core = self.core
        first, before = core.slot + 1, core.result
        results: list[Message] = []
        snapshots: dict[int, Message] = {}
        failure = core.apply(batch, results, snapshots)
        if results:
            self._commit(first, results, snapshots, before)
        if failure is not None:
            self._close_discarded_nowait()
            self._give_up(failure, _first_failing(failure, core.slot + 1))
            raise failure

    def _commit(
        self,
        first: int,
        results: list[Message],
        snapshots: dict[int, Message] | None,
        before: Message | None,
    ) -> None:
        """Store results the core has just moved through, then wake their waiters.

        The store comes first: if it refuses them, the core goes back to where
        it was (`_undo`) and the error is raised. Never blocks.
        """
        core, store = self.core, self.store
        try:
            if core.own_snapshots:
                self.fast.put_states_nowait(core.pid, first, results, core.cache_frequency)
            else:
                snaps = snapshots or {}
                store.put_results_nowait(
                    core.pid, [(s, r, snaps.get(s)) for s, r in enumerate(results, first)]
                )
        except StoreError as exc:
            self._undo(first - 1, before, exc)
        self._publish(first, results)

    def _undo(self, slot: int, result: Message | None, exc: HbTrioError) -> None:
        """The store refused what the core computed past ``slot``: go back there and raise.

        A state device's core simply stands at ``slot`` again (states are
        immutable). A live instance has moved on and cannot: it is thrown away,
        to be rebuilt at ``slot``. The waiters from ``slot + 1`` get the error.
        """
        core = self.core
        if core.device.live and core.instance is not None:
            core.failure(slot + 1, exc)  # throws the instance away
            self._close_discarded_nowait()
        core.slot, core.result = slot, result
        if isinstance(exc, StoreError):
            self._fail_from(slot + 1, lambda _s: _store_error(exc))
        else:
            self._fail_from(slot + 1, lambda _s: copy_error(exc))
        self.target = slot
        raise exc

    # catching up ----------------------------------------------------------------------------------

    async def advance(self) -> None:
        """Compute toward ``target``, storing each slot and waking its waiters.

        Chunk by chunk: backpressure before each, a yield to the scheduler
        between them. Stops early when `_stopping` says so. On a failure the
        waiters from the failing slot on get it, ``target`` comes back to the
        position, and it is raised (`ComputeError`, `StoreError`); the slots
        before it are stored. Blocks; cancellation leaves every stored slot
        whole and the core at the last one.
        """
        core = self.core
        while self.target > core.slot and not self._stopping():
            if not core.ready:
                await self._rebuild_or_give_up()
            start = core.slot + 1
            try:
                if await self._skip_stored(start):
                    continue
                batch = await self._next_batch(start)
            except (ComputeError, StoreError) as exc:
                self._give_up(exc, _first_failing(exc, start))
                raise
            # Backpressure last before computing: between it and the results
            # nothing awaits, so the store's bound is exceeded by one chunk at most.
            await self._writable()
            if core.inline:
                self._apply_inline(batch)
            else:
                i = 0
                while i < len(batch):  # a stop takes effect between calls
                    if self._stopping():
                        return
                    await self._writable()
                    n = core.many_due(min(MANY_MAX, len(batch) - i))
                    if n > 1 and core.instance is not None:
                        done = await self._apply_many(batch[i : i + n])
                        if done:
                            i += done
                            continue
                    await self._apply_one(batch[i])
                    i += 1
            if self.target > core.slot:
                await trio.lowlevel.checkpoint()  # the one yield of a long catch-up

    async def _apply_one(self, assignment: Message) -> None:
        """One slot through an awaited or threaded call, with its snapshot if due."""
        core = self.core
        slot, before = core.slot + 1, core.result
        timed = self.policy is not None and not core.own_snapshots
        started = trio.current_time() if timed else 0.0
        try:
            core.computed_value(await self.call(core.compute_call(assignment)))
        except BaseException as exc:
            failure = core.failure(slot, exc)  # our own cancellation is raised as it is
            await self._close_discarded()
            if core.records_failure(failure):
                await self._record(failure, before)
                return
            self._give_up(failure, slot)
            raise failure from exc
        snapshot = None
        if timed:
            self.computing += trio.current_time() - started
        if core.is_snapshot(slot) or (timed and self._snapshot_due()):
            try:
                snapshot = await self._timed_snapshot(timed)
            except ComputeError as failure:
                core.slot, core.result = slot - 1, before  # not stored: back to before it
                await self._close_discarded()
                self._give_up(failure, slot)
                raise
        assert core.result is not None
        self._commit(slot, [core.result], None if snapshot is None else {slot: snapshot}, before)

    async def _apply_many(self, batch: list[Message]) -> int:
        """Consecutive slots through one ``compute_many`` call of a live instance.

        Returns how many slots it moved (0: the instance has no
        ``compute_many``; compute one by one). The results before a failing
        slot are stored; the failing slot is then handled as `_apply_one`
        handles it (recorded, or given up). A snapshot is taken after the
        last slot when due (`ProcessCore.many_due` never crosses a snapshot
        point). Bounded by ``slot_timeout`` per slot of the batch.
        """
        core = self.core
        out: list[Any] = []
        call = core.many_call(batch, out)
        if call is None:
            return 0
        first, before = core.slot + 1, core.result
        timed = self.policy is not None
        started = trio.current_time() if timed else 0.0
        error: BaseException | None = None
        try:
            await self.call(call, len(batch))
        except BaseException as exc:
            if not is_device_failure(exc):
                core.failure(first + len(out), exc)  # raises our cancellation (instance gone)
            error = exc
        results: list[Message] = []
        # A call that failed failed at a slot of its batch: one that appended a result
        # for every slot and then raised is taken to have failed at its last.
        usable = len(batch) if error is None else min(len(out), len(batch) - 1)
        for value in out[:usable]:
            try:
                results.append(core.computed_value(value))
            except InvalidMessage as exc:
                error = exc
                break
        if timed:
            self.computing += trio.current_time() - started
        if error is None and len(results) < len(batch):
            error = InvalidMessage(
                f"device {core.device.name!r}: compute_many returned {len(results)} results "
                f"for {len(batch)} slots"
            )
        if error is not None:
            failing = first + len(results)
            failure = core.failure(failing, error)
            if results:  # good slots before the failing one: stored, without a snapshot
                self._commit(first, results, None, before)
            await self._close_discarded()
            if core.records_failure(failure):
                await self._record(failure, core.result)
                return len(results) + 1
            self._give_up(failure, failing)
            raise failure from error
        last = core.slot
        snapshot = None
        if core.is_snapshot(last) or (timed and self._snapshot_due()):
            try:
                snapshot = await self._timed_snapshot(timed)
            except ComputeError as failure:
                # The slots are fine but the last one's snapshot is not: keep those before it.
                core.slot, core.result = last - 1, results[-2] if len(results) > 1 else before
                if len(results) > 1:
                    self._commit(first, results[:-1], None, before)
                await self._close_discarded()
                self._give_up(failure, last)
                raise
        self._commit(first, results, None if snapshot is None else {last: snapshot}, before)
        return len(results)

    async def _timed_snapshot(self, timed: bool) -> Message | None:
        """`_snapshot_value`; when ``timed``, its cost is what the policy learns and the
        computing since the last snapshot starts again from 0."""
        started = trio.current_time() if timed else 0.0
        snapshot = await self._snapshot_value()
        if timed:
            self.computing, self.snapshot_cost = 0.0, trio.current_time() - started
        return snapshot

    def _snapshot_due(self) -> bool:
        """Whether the snapshot policy (`Limits`) wants a snapshot at the slot just computed.

        After ``snapshot_seconds`` of device calls since the last snapshot, or
        once those calls took ``snapshot_cost_ratio`` times what the last
        snapshot took (the first one is taken to learn its cost).
        """
        policy = self.policy
        assert policy is not None
        seconds, ratio = policy.snapshot_seconds, policy.snapshot_cost_ratio
        if seconds is not None and self.computing >= seconds:
            return True
        return ratio is not None and self.computing >= ratio * self.snapshot_cost

    async def _record(self, failure: ComputeError, before: Message | None) -> None:
        """Make ``failure`` its slot's result and go on from the state before it.

        For a device that records its failures (`ProcessCore.records`): the
        instance the failure threw away is rebuilt at the slot before
        (`rebuild`), and the failed slot is stored with its recorded result and
        a snapshot, so that no later boot replays through it: a replay of the
        log gives the same results whatever made that call fail. A rebuild or
        snapshot that fails gives up as any failure does. Blocks.
        """
        core = self.core
        slot = core.slot + 1
        try:
            await self.rebuild()
        except (ComputeError, StoreError) as exc:
            self._give_up(exc, slot)
            raise
        result = core.recorded(failure)
        log.info("process %s: slot %d recorded as failed: %s", core.pid, slot, result["error"])
        core.slot, core.result = slot, result
        try:
            snapshot = await self._snapshot_value()
        except ComputeError as exc:
            core.slot, core.result = slot - 1, before
            await self._close_discarded()
            self._give_up(exc, slot)
            raise
        self._commit(slot, [result], {slot: snapshot} if snapshot is not None else None, before)

    async def _snapshot_value(self) -> Message | None:
        """The snapshot to store at the position: the core's result itself, or a device call's."""
        core = self.core
        call = core.snapshot_call()
        if call is None:
            return core.result
        try:
            return core.snapshotted(await self.call(call))
        except BaseException as exc:
            raise core.failure(core.slot, exc, "snapshot") from exc

    async def _writable(self) -> None:
        """Wait while the store is backlogged; on its failure, fail the waiters and raise."""
        try:
            await self.store.wait_writable()
        except StoreError as exc:
            error = exc
            self._fail_from(self.core.slot + 1, lambda _s: _store_error(error))
            self.target = self.core.slot
            raise

    async def _next_batch(self, start: int) -> list[Message]:
        """The assignments for the next chunk from ``start``: read ahead, or read now."""
        stop = min(self.target, start - 1 + CHUNK) + 1
        batch = self._read_ahead(start, stop)
        if batch:
            return batch
        # Read toward the target in one go: with a store that does I/O, the next
        # chunks then come from memory instead of queueing behind the writes of
        # the results about to be produced.
        fetched = await self.assignments(start, max(stop, min(self.target, start + AHEAD) + 1))
        batch = fetched[: stop - start]
        self.ahead = fetched if len(fetched) > len(batch) else None
        self.ahead_at = len(batch)
        return batch

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

    async def assignments(self, start: int, stop: int) -> list[Message]:
        """Assignments ``start..stop-1``; `SlotNotScheduled` if ``start`` is not scheduled.

        Answers from memory when it can (no checkpoint then); a store that
        fails, or a damaged row, is a `ComputeError` with phase
        ``"get-schedule"``.
        """
        store, pid = self.store, self.core.pid
        try:
            got = self.fast.get_assignments_nowait(pid, start, stop)
        except trio.WouldBlock:
            try:
                got = await store.get_assignments(pid, start, stop)
            except (StoreError, InvalidMessage) as exc:
                raise ComputeError(
                    f"process {pid}: could not read the schedule at slot {start}: {exc}",
                    phase="get-schedule",
                    attempted_slot=start,
                    pid=pid,
                ) from exc
        if not got:
            latest = await store.latest_slot(pid)
            raise SlotNotScheduled(pid, latest + 1 if start > latest else start, latest)
        return got

    async def _skip_stored(self, start: int) -> bool:
        """Jump to a stored snapshot ahead of us instead of recomputing; True if we jumped.

        Costs one dictionary lookup unless results beyond our slot are stored
        (a previous worker got further than the snapshot we restored).
        """
        core, store = self.core, self.store
        try:
            if self.fast.get_result_nowait(core.pid, start) is None:
                return False
        except trio.WouldBlock:
            pass
        found = await store.latest_snapshot(core.pid, self.target)
        if found is None or found[0] <= core.slot:
            return False
        await self._close_instance()
        await self._boot_at(found)
        await self._read_result()
        self._jumped()
        return True

    def _jumped(self) -> None:
        """The core now stands further on: wake those waiting for its slot, reroute earlier ones."""
        core = self.core
        if core.result is not None:
            self._publish(core.slot, [core.result])
        self._fail_below(core.slot)

    # rebuilding a live instance ------------------------------------------------------------------

    async def _rebuild_or_give_up(self) -> None:
        try:
            await self.rebuild()
        except (ComputeError, StoreError) as exc:
            self._give_up(exc, self.core.slot + 1)
            raise

    async def rebuild(self) -> None:
        """Boot a live instance again where the core stands, after a failure threw one away.

        From the latest snapshot at or below the position, replaying the slots
        after it (their results are stored: they are not stored again). Raises
        `ComputeError` or `StoreError`. Blocks.
        """
        core = self.core
        await self._close_discarded()
        slot, result = core.slot, core.result
        found = await self.store.latest_snapshot(core.pid, slot)
        await self._boot_at(found)
        while core.slot < slot:
            for assignment in await self.assignments(core.slot + 1, slot + 1):
                await self._replay_one(assignment)
        core.result = result

    async def replay(
        self, assignments: list[Message], found: tuple[int, Message] | None = None
    ) -> list[Message | None]:
        """Boot at ``found`` (a snapshot; slot 0 without one) and compute ``assignments``.

        Stores nothing: for checking a process against its store (`hbtrio.testing`).
        Returns the result at the boot slot (``None`` for a live instance booted
        at a snapshot: its result is not a thing it can tell) and then each
        assignment's. Raises `ComputeError`. Blocks on the device.
        """
        core = self.core
        await self._booted(found)
        results: list[Message | None] = [core.result]
        applied: list[Message] = []  # since the boot, without the failed (recorded) slots
        for assignment in assignments:
            try:
                results.append(await self._replay_one(assignment))
                applied.append(assignment)
            except ComputeError as failure:
                if not core.records_failure(failure):
                    raise
                # As `_record` does, without a store: boot again and replay the
                # slots applied since, then stand at the failed slot.
                await self._close_discarded()
                await self._booted(found)
                for again in applied:
                    core.slot = again["slot"] - 1  # past the failed slots between
                    await self._replay_one(again)
                core.slot, core.result = assignment["slot"], core.recorded(failure)
                results.append(core.result)
        return results

    async def _booted(self, found: tuple[int, Message] | None) -> Message | None:
        """Boot the core at ``found`` (slot 0 without one), storing nothing.

        Returns a new process's slot-0 result (for the caller to store), else
        ``None``. Raises `ComputeError` (the device failed). Blocks on the device.
        """
        core = self.core
        slot, call = core.boot_plan(found)
        what = "restore" if found is not None else "boot" if core.device.live else "init"
        try:
            value = None if call is None else await self.call(call)
            return core.booted(slot, value, found[1] if found is not None else None)
        except BaseException as exc:
            raise core.failure(slot, exc, what) from exc

    async def _replay_one(self, assignment: Message) -> Message:
        """Compute the next slot, storing nothing (a rebuild's or a replay's). Raises
        `ComputeError`. Blocks on the device unless its calls are inline."""
        core = self.core
        s = core.slot + 1
        try:
            if core.inline:
                return core.step(assignment)
            return core.computed_value(await self.call(core.compute_call(assignment)))
        except ComputeError:
            raise
        except BaseException as exc:
            raise core.failure(s, exc) from exc

    # closing --------------------------------------------------------------------------------------

    def _close_discarded_nowait(self) -> None:
        """Close an instance a failure threw away, if that can be done in this task."""
        call = self.core.discard()
        if call is not None and call[0] == INLINE:
            _close_quietly(call)

    async def _close_discarded(self) -> None:
        call = self.core.discard()
        if call is not None:
            await self._close(call)

    async def _close_instance(self) -> None:
        """Close the live instance, if any (a jump ahead or the driver's end)."""
        core = self.core
        instance, core.instance = core.instance, None
        close = getattr(instance, "close", None) if instance is not None else None
        if close is not None:
            await self._close((core.device.how(is_async(close)), close, ()))

    async def _close(self, call: Call) -> None:
        try:
            await self.call(call)
        except Exception as exc:  # closing is best effort: the instance is gone either way
            log.warning("closing an instance of %s failed: %r", self.core.device.name, exc)

    async def close(self) -> None:
        """Release the core's live instance (and one a failure threw away). Blocks."""
        await self._close_discarded()
        await self._close_instance()

    # the retire snapshot --------------------------------------------------------------------------

    async def store_snapshot(self) -> None:
        """Store a snapshot at the position, unless one is stored there already. Blocks.

        A failure is logged, not raised: it costs only recomputation.
        """
        core = self.core
        if not core.ready or (core.own_snapshots and core.is_snapshot(core.slot)):
            return
        if core.instance is not None and core.is_snapshot(core.slot):
            return  # taken with its slot's result
        try:
            snapshot = await self._snapshot_value()
            result = core.result
            if result is None:  # a live instance booted here: its result is stored
                result = await self.store.get_result(core.pid, core.slot)
            if snapshot is not None and result is not None:
                # Stored with its slot's result again: the store keeps both as one row.
                self.store.put_results_nowait(core.pid, [(core.slot, result, snapshot)])
        except HbTrioError as exc:
            log.warning("worker of %s could not store its snapshot: %s", core.pid, exc)


def _close_quietly(call: Call) -> None:
    try:
        call[1](*call[2])
    except Exception as exc:
        log.warning("closing an instance failed: %r", exc)


def core_nowait(pid: str, store: Store, devices: Devices, cache_frequency: int) -> ProcessCore:
    """A core for ``pid``, not booted, from what the store holds in memory.

    Raises `trio.WouldBlock` if the store needs I/O, `ProcessNotFound` or
    `UnknownDevice`. Never blocks.
    """
    return _core(pid, fast_path(store).get_process_nowait(pid), devices, cache_frequency)


def _first_failing(exc: HbTrioError, start: int) -> int:
    attempted = getattr(exc, "attempted_slot", None)
    return attempted if isinstance(attempted, int) else start


def _core(
    pid: str, definition: Message | None, devices: Devices, cache_frequency: int
) -> ProcessCore:
    if definition is None:
        raise ProcessNotFound(pid)
    device = devices.get(definition["execution-device"])
    if not device.live and (device.init is None or device.compute is None):
        raise InvalidMessage(
            f"device {device.name!r} has neither boot nor init/compute: it cannot execute a process"
        )
    return ProcessCore(pid, definition, device, cache_frequency)


async def compute_slot(
    store: Store,
    devices: Devices,
    pid: str,
    slot: int,
    *,
    cache_frequency: int = 1,
    slot_timeout: float | None = None,
) -> Message:
    """The state of ``pid`` at ``slot``, computed without a worker.

    Answers from the stored result when there is one; otherwise boots its own
    core at the nearest snapshot at or below ``slot`` (never a worker's live
    instance) and replays the assignments after it, storing what it computes.
    Checkpoints; cancellation leaves the store with the slots computed so far
    (each complete). ``slot_timeout`` bounds each device call that is not
    inline, as in `hbtrio.open_engine`. Raises `InvalidMessage` for a slot that
    is not a non-negative ``int``, `ProcessNotFound`, `SlotNotScheduled`,
    `ComputeError` or `StoreError`.
    """
    validate_slot(slot)
    if type(cache_frequency) is not int or cache_frequency < 1:
        raise ValueError(f"cache_frequency must be an int >= 1, not {cache_frequency!r}")
    try:
        stored = fast_path(store).get_result_nowait(pid, slot)
    except trio.WouldBlock:
        stored = await store.get_result(pid, slot)
    if stored is not None:
        await trio.lowlevel.checkpoint()
        return hand_out(stored)
    driver = await Driver.load(pid, store, devices, cache_frequency, slot_timeout)
    store.pin(pid)
    try:
        await driver.boot(slot, slot + 1)
        if driver.core.slot < slot:
            driver.target = slot
            await driver.advance()
        await trio.lowlevel.checkpoint()  # all of it may have come from memory
        result = driver.core.result
        if result is None:  # a live instance booted at its snapshot: the result is stored
            result = await store.get_result(pid, slot)
            if result is None:
                raise StoreError(f"process {pid}: the result at slot {slot} is not stored")
        return hand_out(result)
    finally:
        store.unpin(pid)
        with trio.CancelScope(shield=True):
            await driver.close()
