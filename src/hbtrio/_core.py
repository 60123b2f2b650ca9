"""The sans-I/O core of one process's log: where it stands, and what applying slots changes.

Theory of operation
-------------------
A `ProcessCore` is the position of one process: the slot it is at, the
result there (what a caller of ``compute(pid, slot)`` gets), and what
computes the next slot. For a *state device* (``init``/``compute``) that is
the state itself, a read-only message; for a *live device* (``boot``) it is
a live instance, an object of the device's that holds the process in memory
(a WASM instance, a Lua VM) and that nobody can copy per slot.

The core never awaits, never touches a store and wakes nobody. It is given
assignments, and says what came of them; the driver (`_driver`) does the I/O
around it, in the spirit of h11's state machine and httpcore's "decide, then
do I/O":

- `step` and `apply` apply assignments through a device whose calls run in
  the calling task (`inline`), and return the new results (and the
  snapshots due);
- for a device whose calls are awaited or run in a thread, the driver asks
  the core for the call (`compute_call`, `snapshot_call`, `boot_plan`),
  performs it (`Driver.call`, the one place where ``slot_timeout`` and
  threads apply), and hands the value back (`computed_value`,
  `snapshotted`, `booted`);
- `is_snapshot` says which slots are snapshot points (every
  ``cache_frequency``), `failure` what a failed call means.

A failed call never leaves the core at a state that call may have changed.
A state device's states are immutable: the core simply keeps the previous
one. A live instance may be half-changed: `failure` throws it away (the core
is then not `ready`), and the driver rebuilds one from the latest snapshot
and a replay before computing again (`Driver.rebuild`).

What a device is handed is never what the engine keeps: a device the engine
does not trust gets private copies (`private_copy`) of states, assignments,
definitions and snapshots, so that even a device reaching past the read-only
API cannot change what is in memory and on disk.

Invariants (between any two calls):

- ``result`` is ``None`` or the result at ``slot`` (``result["at-slot"] == slot``);
- a state device's core is `ready` exactly when ``result`` is set (its state);
- a live device's core is `ready` exactly when ``instance`` is set.

Nothing here blocks or checkpoints; a core belongs to one task at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import trio

from ._budget import WORKER_BYTES, estimate_bytes
from ._devices import AWAIT, INLINE, RECORD, THREAD, DeviceInfo, is_async, is_device_failure
from ._exceptions import ComputeError, InvalidMessage
from ._message import (
    _TRUSTED,
    MAX_INT,
    MIN_INT,
    Message,
    _Frozen,
    freeze,
    private_assignment,
    private_copy,
)

__all__ = ["AWAIT", "BYTES_SNAPSHOT", "INLINE", "THREAD", "Call", "ProcessCore", "adopt_state"]

#: What a live instance without ``memory_size()`` is taken to hold.
LIVE_INSTANCE_BYTES: Final = 64 * 1024
#: A live instance's snapshot that is bytes is stored as this one-key message.
BYTES_SNAPSHOT: Final = "hbtrio/bytes"

_set = dict.__setitem__


def adopt_state(new: object, slot: int, trusted: bool) -> Message:
    """Turn what a device returned into the read-only state (or result) at ``slot``.

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


def _how(device: DeviceInfo, fn: Callable[..., Any] | None) -> str:
    return device.how(fn is not None and is_async(fn))


#: A device call for the driver to make: ``(how, fn, args)``.
Call = tuple[str, Callable[..., Any], tuple[Any, ...]]


@attrs.define(eq=False, repr=False)
class ProcessCore:
    """The position of one process and how its next slot is computed (see the module)."""

    pid: str
    definition: Message
    device: DeviceInfo
    cache_frequency: int
    slot: int = -1
    #: The result at `slot`, when it is held (always, for a state device that is ready).
    result: Message | None = None
    #: A live device's instance (``None`` before boot, and after a failure).
    instance: Any = None
    #: Slots applied by this core's device calls.
    computed: int = 0
    #: True when `step` and `apply` may compute (calls that run in the calling task).
    inline: bool = attrs.field(default=False, init=False)
    #: How the compute (and snapshot) calls run: `INLINE`, `AWAIT` or `THREAD`.
    how: str = attrs.field(default=INLINE, init=False)
    #: A live device whose failed slots are recorded as their results (`DeviceInfo.failures`,
    #: the definition's ``"on-failure"``): the driver rebuilds the instance and goes on.
    #: Such a core is never `inline`: recording needs the driver's I/O.
    records: bool = attrs.field(default=False, init=False)
    #: A live instance a failure threw away, until `discard` hands it over to be closed.
    _broken: Any = attrs.field(default=None, init=False, alias="_broken")
    #: One slot of an inline state device: ``(state, assignment) -> state`` (a trusted
    #: device's own ``compute``, with no layer in between).
    _compute_one: Callable[[Message, Message], Message] = attrs.field(
        init=False, alias="_compute_one"
    )

    def __attrs_post_init__(self) -> None:
        d = self.device
        if d.live:
            self.records = self.definition.get("on-failure", d.failures) == RECORD
            return  # how its instance is called is known once it is booted
        self.how = d.how(d.compute_async)
        self.inline = self.how == INLINE and d.snapshot is None
        self._compute_one = d.compute if d.trusted else self._compute_untrusted  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<ProcessCore {self.pid} {self.device.name} at {self.slot}>"

    @property
    def ready(self) -> bool:
        """Whether the next slot can be computed (else the driver must boot or rebuild)."""
        return self.instance is not None if self.device.live else self.result is not None

    def is_snapshot(self, slot: int) -> bool:
        """Whether ``slot`` is a snapshot point (every ``cache_frequency`` slots)."""
        return slot % self.cache_frequency == 0

    @property
    def own_snapshots(self) -> bool:
        """True when each state is its own snapshot (a state device without a snapshot hook)."""
        return not self.device.live and self.device.snapshot is None

    def memory_estimate(self) -> int:
        """What this process holds in memory, in bytes: an estimate. Never blocks.

        A live instance's own ``memory_size()`` when it has one (a WASM
        instance's linear memory), else `WORKER_BYTES` plus `estimate_bytes`
        of the state at hand (for a live instance without ``memory_size``,
        `LIVE_INSTANCE_BYTES`). A ``memory_size`` that fails or returns
        something that is not an ``int`` counts as the latter.
        """
        instance = self.instance
        if instance is not None:
            size = getattr(instance, "memory_size", None)
            if size is not None:
                try:
                    value = size()
                except Exception:
                    value = None
                if type(value) is int and value >= 0:
                    return WORKER_BYTES + value
            return WORKER_BYTES + LIVE_INSTANCE_BYTES
        return WORKER_BYTES + (0 if self.result is None else estimate_bytes(self.result))

    def _given(self, message: Message) -> Message:
        """What a device is handed of a message the engine keeps (see the module)."""
        return message if self.device.trusted else private_copy(message)

    def failure(self, slot: int, exc: BaseException, what: str = "compute") -> ComputeError:
        """The `ComputeError` for device method ``what`` failing at ``slot`` with ``exc``.

        Whatever the device raised (see `is_device_failure`), but the caller's
        own cancellation, which this raises again as it is: call it from the
        ``except BaseException`` around a device call. ``exc`` is its
        ``__cause__``. A live instance is thrown away either way (the core is
        no longer `ready`), since a call that did not complete may have
        changed it: call `discard` to get it and close it.
        """
        if self.device.live and self.instance is not None:
            self._broken, self.instance = self.instance, None
            self.inline = False  # until an instance is booted again
        if not is_device_failure(exc):
            raise exc
        error = ComputeError(
            f"process {self.pid}: {what} failed at slot {slot}: {exc!r}",
            phase="compute",
            attempted_slot=slot,
            pid=self.pid,
        )
        error.__cause__ = exc
        return error

    def records_failure(self, failure: ComputeError) -> bool:
        """Whether ``failure`` (of the next slot's compute) is to be recorded as its result."""
        return (
            self.records and failure.phase == "compute" and failure.attempted_slot == self.slot + 1
        )

    def recorded(self, failure: ComputeError) -> Message:
        """The result that records ``failure`` as its slot's: ``error`` and ``error-kind``.

        ``error-kind`` is ``"timeout"`` for a call that ran out of ``slot_timeout``,
        else ``"failure"``; ``error`` is one line saying what happened.
        """
        slot = failure.attempted_slot
        assert isinstance(slot, int)
        cause = failure.__cause__
        if isinstance(cause, trio.TooSlowError):
            kind, text = "timeout", f"slot {slot} ran out of its slot_timeout"
        else:
            kind = "failure"
            lines = str(cause).strip().splitlines() if cause is not None else []
            text = type(cause).__name__ + (f": {lines[0]}" if lines else "")
        result: Message = _Frozen({"error": text[:1000], "error-kind": kind, "at-slot": slot})
        return result

    def discard(self) -> Call | None:
        """The call that closes the instance a failure threw away, if it has a ``close``."""
        broken, self._broken = self._broken, None
        close = getattr(broken, "close", None) if broken is not None else None
        if close is None:
            return None
        return _how(self.device, close), close, ()

    # booting ------------------------------------------------------------------------------------

    def boot_plan(self, found: tuple[int, Message] | None) -> tuple[int, Call | None]:
        """How to stand at the snapshot ``found`` (``(slot, snapshot)``), or at slot 0 without one.

        Returns the slot and the call to make (``None``: the snapshot is the
        state itself); hand the call's value to `booted`.
        """
        d = self.device
        if d.live:
            assert d.boot is not None
            if found is None:
                return 0, (d.how(d.boot_async), d.boot, (self._given(self.definition), None))
            slot, snap = found
            given: object = snap
            if len(snap) == 1 and BYTES_SNAPSHOT in snap:
                given = snap[BYTES_SNAPSHOT]
            else:
                given = self._given(snap)
            return slot, (d.how(d.boot_async), d.boot, (self._given(self.definition), given))
        if found is None:
            assert d.init is not None
            return 0, (d.how(d.init_async), d.init, (self._given(self.definition),))
        slot, snap = found
        if d.restore is None:
            return slot, None
        return slot, (d.how(d.restore_async), d.restore, (self._given(snap),))

    def booted(self, slot: int, value: Any, found: Message | None = None) -> Message | None:
        """Stand at ``slot`` with what the boot call returned (``value``).

        ``found`` is the snapshot given to `boot_plan` (``None`` for a new
        process); for a state device without a ``restore`` call (`boot_plan`
        gave none) it is the state itself. Returns the result at slot 0 for a
        new process (for the driver to store, with its snapshot), else
        ``None``. Raises `InvalidMessage` for a state that is not a message, or
        an instance without ``compute`` and ``snapshot`` (the caller turns that
        into the boot's failure); the core has then not moved.
        """
        d = self.device
        if d.live:
            for method in ("compute", "snapshot"):
                fn = getattr(value, method, None)
                if fn is None or not callable(fn):
                    raise InvalidMessage(
                        f"device {d.name!r}: boot returned no instance with {method}"
                    )
            self.slot, self.instance = slot, value
            self.how = _how(d, value.compute)
            self.inline = self.how == INLINE and not is_async(value.snapshot) and not self.records
            self.result = _Frozen({"at-slot": 0}) if slot == 0 else None
            return self.result if found is None else None
        if value is None and found is not None:
            state = found if found.get("at-slot") == slot else adopt_state(dict(found), slot, True)
        else:
            state = adopt_state(value, slot, d.trusted)
        self.slot, self.result = slot, state
        return state if found is None else None

    # computing inline ---------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device
    def step(self, assignment: Message) -> Message:
        """Apply the next slot in the calling task; its result. Requires `inline`.

        Raises `ComputeError` (the core then stays where it was).
        """
        slot = self.slot + 1
        try:
            if self.instance is None:
                result = self._compute_one(self.result, assignment)  # type: ignore[arg-type]
            else:
                given = assignment if self.device.trusted else private_assignment(assignment)
                result = adopt_state(self.instance.compute(given), slot, self.device.trusted)
        except BaseException as exc:  # whatever the device raised: see is_device_failure
            raise self.failure(slot, exc) from exc
        self.slot, self.result = slot, result
        self.computed += 1
        return result

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device
    def snapshot_now(self) -> Message:
        """A live inline instance's snapshot at `slot`, taken now. Raises `ComputeError`."""
        snapshot = self.instance.snapshot
        try:
            return self.snapshotted(snapshot())
        except BaseException as exc:
            raise self.failure(self.slot, exc, "snapshot") from exc

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device
    def apply(
        self, batch: list[Message], out: list[Message], snapshots: dict[int, Message]
    ) -> ComputeError | None:
        """Apply consecutive ``batch`` in the calling task. Requires `inline`. Never checkpoints.

        Appends each slot's result to ``out`` (a live instance's snapshots due
        to ``snapshots``) and moves the core with them; returns the failure
        that stopped the batch, if any (the results before it are kept; a
        slot whose snapshot failed is not: the core stands before it).
        """
        d = self.device
        if self.instance is None and d.compute_batch is not None:
            done = len(out)
            try:
                d.compute_batch(self.result, batch, out)
            except BaseException as exc:
                failure = self.failure(batch[len(out) - done]["slot"], exc)
                self._moved(len(out) - done, out)
                return failure
            self._moved(len(out) - done, out)
            return None
        before = self.result
        for assignment in batch:
            try:
                result = self.step(assignment)
                if self.instance is not None and self.is_snapshot(self.slot):
                    snapshots[self.slot] = self.snapshot_now()
            except ComputeError as exc:
                if exc.attempted_slot == self.slot:  # computed, but its snapshot failed
                    self.slot, self.result = self.slot - 1, before
                return exc
            out.append(result)
            before = result
        return None

    def _moved(self, n: int, out: list[Message]) -> None:
        if n:
            self.slot, self.result = self.slot + n, out[-1]
            self.computed += n

    @trio.lowlevel.enable_ki_protection  # a real Ctrl-C never lands in the device it calls
    def _compute_untrusted(self, state: Message, assignment: Message) -> Message:
        new = self.device.compute(private_copy(state), private_assignment(assignment))  # type: ignore[misc]
        return adopt_state(new, assignment["slot"], False)

    # computing through the driver ---------------------------------------------------------------

    def compute_call(self, assignment: Message) -> Call:
        """The call that computes the next slot (for `AWAIT` and `THREAD` devices)."""
        if self.instance is not None:
            given = assignment if self.device.trusted else private_assignment(assignment)
            return self.how, self.instance.compute, (given,)
        state = self.result
        assert state is not None
        if not self.device.trusted:
            state, assignment = private_copy(state), private_assignment(assignment)
        return self.how, self.device.compute, (state, assignment)  # type: ignore[return-value]

    def many_call(self, batch: list[Message], out: list[Any]) -> Call | None:
        """The call that computes consecutive ``batch`` at once, appending each result to
        ``out`` (a live instance's ``compute_many``), or ``None`` if it has none."""
        instance = self.instance
        many = getattr(instance, "compute_many", None) if instance is not None else None
        if many is None:
            return None
        if not self.device.trusted:
            batch = [private_assignment(a) for a in batch]
        return _how(self.device, many), many, (batch, out)

    def many_due(self, limit: int) -> int:
        """How many slots from the next one to hand a ``compute_many`` at most: up to
        ``limit``, and never past the next snapshot point (so it is taken there)."""
        cf = self.cache_frequency
        return min(limit, cf - self.slot % cf)

    def computed_value(self, value: Any) -> Message:
        """Move to the next slot with what its compute call returned; its result.

        Raises `InvalidMessage` when it is not a message (the caller fails the
        slot with `failure`).
        """
        slot = self.slot + 1
        result = adopt_state(value, slot, self.device.trusted)
        self.slot, self.result = slot, result
        self.computed += 1
        return result

    def snapshot_call(self) -> Call | None:
        """The call that gives the snapshot at `slot`; ``None`` when the result is its own."""
        if self.instance is not None:
            snapshot = self.instance.snapshot  # `booted` made sure there is one
            return _how(self.device, snapshot), snapshot, ()
        d = self.device
        if d.snapshot is None:
            return None
        assert self.result is not None
        return d.how(d.snapshot_async), d.snapshot, (self._given(self.result),)

    def snapshotted(self, value: Any) -> Message:
        """The message to store for what a snapshot call returned (bytes are wrapped)."""
        if isinstance(value, bytes | bytearray | memoryview):
            wrapped: Message = _Frozen({BYTES_SNAPSHOT: bytes(value)})
            return wrapped
        return freeze(value, what="snapshot")
