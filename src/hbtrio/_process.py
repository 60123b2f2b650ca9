"""The process device: slot computation for one process, usable without any worker.

`ProcessRuntime` knows how to make a process's initial state, restore it from a
snapshot, apply assignments one at a time through the execution device, and
store each slot's result (and, every ``cache_frequency`` slots, a snapshot).
It holds no state of its own between calls and starts no task: the engine's
workers drive it, and `compute_slot` drives it once for a single request.

Every device failure becomes `ComputeError` with ``phase``, ``attempted_slot``
and the device's exception as ``__cause__``; a missing assignment becomes
`SlotNotScheduled`. A failed slot leaves the caller's last good state intact:
states are immutable, and a new one only exists once a slot fully applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import trio

from ._devices import PROCESS_DEVICE, DeviceInfo, Devices, is_device_failure
from ._exceptions import ComputeError, InvalidMessage, ProcessNotFound, SlotNotScheduled, StoreError
from ._message import (
    _TRUSTED,
    MAX_INT,
    MIN_INT,
    Message,
    _Frozen,
    freeze,
    hand_out,
    private_assignment,
    private_copy,
    validate_slot,
)
from ._store import SlotResult, Store

__all__ = ["ProcessRuntime", "compute_slot", "validate_definition"]

#: Slots applied between two looks at the outside world (store backpressure, new requests).
CHUNK: Final = 512

_set = dict.__setitem__


def validate_definition(definition: object, devices: Devices) -> Message:
    """Check a process definition and return it frozen.

    It must be a message whose ``"device"`` is ``"process@1.0"`` and whose
    ``"execution-device"`` names a registered device (`UnknownDevice` if not).
    """
    msg = freeze(definition, what="definition")
    if msg.get("device") != PROCESS_DEVICE:
        raise InvalidMessage(
            f'definition: "device" must be {PROCESS_DEVICE!r}, not {msg.get("device")!r}'
        )
    name = msg.get("execution-device")
    if type(name) is not str:
        raise InvalidMessage('definition: "execution-device" must be a device name (str)')
    devices.get(name)
    return msg


def adopt_state(new: object, slot: int, trusted: bool) -> Message:
    """Turn what a device returned into the read-only state at ``slot``.

    A fresh ``dict`` whose values are already frozen is checked at its top
    level only (integers included: out of range is `InvalidMessage`, which
    fails the slot); anything else is validated and frozen in full. A trusted
    device's plain ``dict`` stays a plain dict, like its computed states (see
    `DeviceInfo.trusted`): the garbage collector need not track it.
    """
    state: Message
    if trusted and type(new) is dict:
        return {**new, "at-slot": slot}  # type: ignore[return-value]
    if type(new) is dict:
        if not trusted:
            for key, value in new.items():
                t = type(value)
                if (
                    type(key) is not str
                    or t not in _TRUSTED
                    or not key.isascii()
                    or (t is str and not value.isascii())
                    or (t is int and not MIN_INT <= value <= MAX_INT)
                ):
                    new = freeze(new, what="state")  # checks all of it, or raises
                    break
        state = _Frozen(new)
    elif isinstance(new, Mapping):
        state = _Frozen(freeze(new, what="state"))
    else:
        raise InvalidMessage(f"state must be a mapping, not {type(new).__name__}")
    _set(state, "at-slot", slot)
    return state


@attrs.define(eq=False)
class ProcessRuntime:
    """Computation for one process: restore, apply, store. Holds no mutable state."""

    pid: str
    definition: Message
    device: DeviceInfo
    store: Store
    cache_frequency: int
    #: Seconds an async device call may take before the slot fails (``None``: no limit).
    slot_timeout: float | None = None
    #: ``compute_one(state, assignment)``: one slot of a plain device, its result
    #: adopted as the new state (a trusted device's own ``compute``, with no layer
    #: in between). Raises what the device raises: wrap that with `failure`.
    compute_one: Callable[[Message, Message], Message] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        d = self.device
        self.compute_one = d.compute if d.trusted else self._compute_untrusted  # type: ignore[assignment]

    @classmethod
    async def load(
        cls,
        pid: str,
        store: Store,
        devices: Devices,
        cache_frequency: int,
        slot_timeout: float | None = None,
    ) -> ProcessRuntime:
        """Look up ``pid``'s definition. Raises `ProcessNotFound` or `UnknownDevice`."""
        definition = await store.get_process(pid)
        return cls._of(pid, definition, store, devices, cache_frequency, slot_timeout)

    @classmethod
    def load_nowait(
        cls,
        pid: str,
        store: Store,
        devices: Devices,
        cache_frequency: int,
        slot_timeout: float | None = None,
    ) -> ProcessRuntime:
        """`load` from memory: raises `trio.WouldBlock` if the store needs I/O."""
        definition = store.get_process_nowait(pid)
        return cls._of(pid, definition, store, devices, cache_frequency, slot_timeout)

    @classmethod
    def _of(
        cls,
        pid: str,
        definition: Message | None,
        store: Store,
        devices: Devices,
        cache_frequency: int,
        slot_timeout: float | None,
    ) -> ProcessRuntime:
        if definition is None:
            raise ProcessNotFound(pid)
        device = devices.get(definition["execution-device"])
        if device.init is None or device.compute is None:
            raise InvalidMessage(
                f"device {device.name!r} has no init/compute: it cannot execute a process"
            )
        return cls(pid, definition, device, store, cache_frequency, slot_timeout)

    def failure(self, slot: int, exc: BaseException, what: str = "compute") -> ComputeError:
        """The `ComputeError` for device method ``what`` failing at ``slot`` with ``exc``.

        Whatever the device raised (see `is_device_failure`), except the
        caller's own cancellation, which this raises again as it is: call it
        from the ``except BaseException`` around a device call.
        """
        if not is_device_failure(exc):
            raise exc
        return ComputeError(
            f"process {self.pid}: {what} failed at slot {slot}: {exc!r}",
            phase="compute",
            attempted_slot=slot,
            pid=self.pid,
        )

    def _given(self, message: Message) -> Message:
        """What a device is handed of a message the engine keeps (see `private_copy`).

        A trusted (built-in) device gets the message itself; any other gets a
        copy that shares no ``dict`` with it, so that even a device reaching
        past the read-only API (``dict.__setitem__``) cannot change a stored
        state, a cached assignment or a definition: what is in memory stays
        what is on disk.
        """
        return message if self.device.trusted else private_copy(message)

    @trio.lowlevel.enable_ki_protection
    async def _call(self, fn: Callable[..., Any], is_async: bool, *args: Any) -> Any:
        """Call a device method; an async one is bounded by ``slot_timeout``.

        A plain method runs to completion on the event loop and cannot be
        bounded: wrap such a device in `run_in_thread` to bound it.
        """
        if not is_async:
            return fn(*args)
        if self.slot_timeout is None:
            return await fn(*args)
        with trio.fail_after(self.slot_timeout):
            return await fn(*args)

    # states ----------------------------------------------------------------------------------

    async def initial(self) -> Message:
        """The state at slot 0: the device's ``init`` of the definition."""
        d = self.device
        assert d.init is not None
        try:
            new = await self._call(d.init, d.init_async, self._given(self.definition))
            return adopt_state(new, 0, d.trusted)
        except BaseException as exc:
            raise self.failure(0, exc, "init") from exc

    async def snapshot_of(self, state: Message) -> Message:
        """The restorable form of ``state`` (the state itself without a ``snapshot`` method)."""
        d = self.device
        if d.snapshot is None:
            return state
        try:
            snap = await self._call(d.snapshot, d.snapshot_async, self._given(state))
            frozen = freeze(snap, what="snapshot")
        except BaseException as exc:
            raise self.failure(state["at-slot"], exc, "snapshot") from exc
        return frozen

    async def restore(self, at_most: int) -> Message:
        """The state at the latest snapshot at or below ``at_most``.

        Without one, the initial state, which is then stored as slot 0's result
        and snapshot so that no later worker computes it again.
        """
        found = await self.store.latest_snapshot(self.pid, at_most)
        if found is not None:
            return await self.from_snapshot(*found)
        return await self._initial_stored()

    async def restore_ahead(
        self, at_most: int, stop: int, limit: int
    ) -> tuple[Message, list[Message]]:
        """`restore`, and the assignments after the restored slot, read in the same store trip.

        Returns the state and a prefix (possibly empty) of the assignments for
        the slots after it, below ``stop`` and at most ``limit`` of them (see
        `Store.snapshot_and_assignments`): read the rest with `assignments`.
        Blocks on the store and on an async device's ``restore`` or ``init``,
        and fails, like `restore`. Cancellation-safe: a cancelled call stored
        nothing (slot 0 is stored after the last await).
        """
        found, ahead = await self.store.snapshot_and_assignments(self.pid, at_most, stop, limit)
        if found is not None:
            return await self.from_snapshot(*found), ahead
        return await self._initial_stored(), ahead

    async def _initial_stored(self) -> Message:
        """The initial state, stored as slot 0's result and snapshot."""
        state = await self.initial()
        snapshot = await self.snapshot_of(state)
        await self.store.wait_writable()  # backpressure, right before storing
        self.store.put_results_nowait(self.pid, [(0, state, snapshot)])
        return state

    @trio.lowlevel.enable_ki_protection
    def restore_nowait(self, at_most: int) -> Message:
        """`restore` in the calling task: never checkpoints.

        Only for a plain device whose ``init`` and ``restore`` are plain too;
        raises `trio.WouldBlock` otherwise, or when the store needs I/O.
        """
        d = self.device
        if not self.plain or d.init_async or d.restore_async:
            raise trio.WouldBlock
        found = self.store.latest_snapshot_nowait(self.pid, at_most)
        if found is not None:
            slot, snap = found
            if d.restore is None:
                return self._own_snapshot(slot, snap)
            try:
                return adopt_state(d.restore(self._given(snap)), slot, d.trusted)
            except BaseException as exc:
                raise self.failure(slot, exc, "restore") from exc
        assert d.init is not None
        try:
            state = adopt_state(d.init(self._given(self.definition)), 0, d.trusted)
        except BaseException as exc:
            raise self.failure(0, exc, "init") from exc
        self.store.put_results_nowait(self.pid, [(0, state, state)])  # plain: its own snapshot
        return state

    @staticmethod
    def _own_snapshot(slot: int, snap: Message) -> Message:
        """The state a snapshot stands for when the device stores states as they are."""
        return snap if snap.get("at-slot") == slot else adopt_state(dict(snap), slot, True)

    async def from_snapshot(self, slot: int, snap: Message) -> Message:
        """The state a stored snapshot at ``slot`` stands for."""
        d = self.device
        if d.restore is None:
            return self._own_snapshot(slot, snap)
        try:
            new = await self._call(d.restore, d.restore_async, self._given(snap))
            return adopt_state(new, slot, d.trusted)
        except BaseException as exc:
            raise self.failure(slot, exc, "restore") from exc

    # assignments ---------------------------------------------------------------------------------

    async def assignments(self, start: int, stop: int) -> list[Message]:
        """Assignments ``start..stop-1``; `SlotNotScheduled` if ``start`` is not scheduled.

        Answers from memory when it can (no checkpoint then).
        """
        store, pid = self.store, self.pid
        try:
            got = store.get_assignments_nowait(pid, start, stop)
        except trio.WouldBlock:
            pass
        else:
            if not got:
                raise self._not_scheduled(start, await store.latest_slot(pid))
            return got
        try:
            got = await store.get_assignments(pid, start, stop)
        except (StoreError, InvalidMessage) as exc:  # the store failed, or a row is damaged
            raise ComputeError(
                f"process {pid}: could not read the schedule at slot {start}: {exc}",
                phase="get-schedule",
                attempted_slot=start,
                pid=pid,
            ) from exc
        if not got:
            raise self._not_scheduled(start, await store.latest_slot(pid))
        return got

    def _not_scheduled(self, slot: int, latest: int) -> SlotNotScheduled:
        return SlotNotScheduled(self.pid, latest + 1 if slot > latest else slot, latest)

    # applying slots ------------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    def apply_sync(self, state: Message, assignments: list[Message], out: list[Message]) -> None:
        """Apply consecutive ``assignments`` with a plain (non-async) device.

        Appends each slot's new state to ``out``. On a device failure raises
        `ComputeError` with the states before it already appended. Never
        checkpoints, so nothing can interrupt a slot halfway. Every one of
        these states is its own snapshot (plain devices have no snapshot hook):
        store them with `Store.put_states_nowait`.
        """
        d = self.device
        assert d.compute is not None and d.snapshot is None
        if d.compute_batch is not None:
            try:
                d.compute_batch(state, assignments, out)
            except BaseException as exc:
                raise self.failure(assignments[len(out)]["slot"], exc) from exc
            return
        compute_one, append = self.compute_one, out.append
        for a in assignments:
            try:
                state = compute_one(state, a)
            except BaseException as exc:
                raise self.failure(a["slot"], exc) from exc
            append(state)

    @trio.lowlevel.enable_ki_protection
    def _compute_untrusted(self, state: Message, assignment: Message) -> Message:
        new = self.device.compute(private_copy(state), private_assignment(assignment))  # type: ignore[misc]
        return adopt_state(new, assignment["slot"], False)

    async def apply_async(
        self,
        state: Message,
        assignments: list[Message],
        on_result: Callable[[SlotResult], None],
    ) -> Message:
        """Like `apply_sync`, for any device (async methods, ``snapshot`` hooks).

        Hands each slot to ``on_result`` as soon as it applied, so slow devices
        publish slot by slot. Cancellation between or inside device calls
        leaves nothing half-applied: a slot exists only once ``on_result`` got it.
        """
        d = self.device
        compute, is_async, freq = d.compute, d.compute_async, self.cache_frequency
        assert compute is not None
        for a in assignments:
            slot = a["slot"]
            try:
                if not d.trusted:
                    state_in, a_in = private_copy(state), private_assignment(a)
                else:
                    state_in, a_in = state, a
                new = await self._call(compute, is_async, state_in, a_in)
                new_state = adopt_state(new, slot, d.trusted)
            except BaseException as exc:
                raise self.failure(slot, exc) from exc
            snap = await self.snapshot_of(new_state) if slot % freq == 0 else None
            state = new_state
            on_result((slot, state, snap))
        return state

    @property
    def plain(self) -> bool:
        """True when slots can be applied synchronously (`apply_sync`)."""
        return not self.device.compute_async and self.device.snapshot is None

    async def advance(
        self,
        state: Message,
        target: int,
    ) -> Message:
        """Apply slots after ``state["at-slot"]`` up to ``target``, storing each result.

        Checkpoints between chunks. On failure raises `ComputeError`; the
        slots before the failing one are stored.
        """
        slot = state["at-slot"]
        while slot < target:
            batch = await self.assignments(slot + 1, min(target, slot + CHUNK) + 1)
            await self.store.wait_writable()  # backpressure, right before computing
            if self.plain:
                states: list[Message] = []
                try:
                    self.apply_sync(state, batch, states)
                finally:
                    if states:
                        self.store.put_states_nowait(
                            self.pid, batch[0]["slot"], states, self.cache_frequency
                        )
                state = states[-1]
            else:
                results: list[SlotResult] = []
                try:
                    state = await self.apply_async(state, batch, results.append)
                finally:
                    if results:
                        self.store.put_results_nowait(self.pid, results)
            slot = state["at-slot"]
            await trio.lowlevel.checkpoint()
        return state


async def compute_slot(
    store: Store, devices: Devices, pid: str, slot: int, *, cache_frequency: int = 1
) -> Message:
    """The state of ``pid`` at ``slot``, computed without a worker.

    Answers from the stored result when there is one; otherwise restores the
    nearest snapshot at or below ``slot`` and replays the assignments after it,
    storing what it computes. Checkpoints; cancellation leaves the store with
    the slots computed so far (each complete). Raises `InvalidMessage` for a
    slot that is not a non-negative ``int``.
    """
    validate_slot(slot)
    if type(cache_frequency) is not int or cache_frequency < 1:
        raise ValueError(f"cache_frequency must be an int >= 1, not {cache_frequency!r}")
    try:
        stored = store.get_result_nowait(pid, slot)
    except trio.WouldBlock:
        stored = await store.get_result(pid, slot)
    if stored is not None:
        await trio.lowlevel.checkpoint()
        return hand_out(stored)
    store.pin(pid)  # what the store keeps in memory about pid stays while we write to it
    try:
        runtime = await ProcessRuntime.load(pid, store, devices, cache_frequency)
        state = await runtime.restore(slot)
        if state["at-slot"] < slot:
            state = await runtime.advance(state, slot)
        else:
            await trio.lowlevel.checkpoint()
    finally:
        store.unpin(pid)
    return hand_out(state)
