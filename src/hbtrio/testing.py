"""Tools to test devices and applications built on hbtrio under faults, cancellation and timeouts.

This module is public (``import hbtrio.testing``) but not re-exported by
``hbtrio`` itself. It needs nothing beyond hbtrio's own dependencies, and works
with any Trio test runner (the examples use pytest-trio).

Fault injection
    `FaultyStore` wraps any `hbtrio.Store` and makes chosen calls fail like a
    full disk, a locked database or an I/O error (`hbtrio.StoreError` with the
    kind of cause a real store would give), or makes them slow or hang.
    `FaultyDevice` wraps an execution device and raises, delays, hangs or
    returns invalid or non-deterministic data at chosen slots.

Engines for tests
    `open_test_engine` is `hbtrio.open_engine` plus the checks every test
    wants when the block exits: no task outlived the engine and no worker
    crashed.

Cancellation
    `cancel_at_checkpoint` runs a call and cancels it at its k-th checkpoint;
    `run_with_cancel_at_each_checkpoint` walks k = 0, 1, 2, ... until the
    call completes, checking the system after every cancelled attempt.

Consistency
    `replay` computes a process's states from scratch, `audit_process`
    checks everything a store holds for a process (schedule, hash chain,
    every stored result and snapshot) against such a replay, and
    `assert_deterministic` replays twice and compares message IDs.

See ``docs/reliability.md`` for what hbtrio promises under faults and for
worked examples (which the test suite runs).
"""

from __future__ import annotations

import collections
import errno
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, Literal, TypeVar

import attrs
import trio

from ._core import ProcessCore
from ._devices import Devices
from ._driver import Driver
from ._engine import Engine, open_engine
from ._exceptions import StoreError
from ._message import Message, freeze, message_id
from ._process import validate_definition
from ._scheduler import make_assignment, verify_schedule
from ._store import FastPath, MemoryStore, SlotResult, Store, StoreStatistics, fast_path

__all__ = [
    "ALL_METHODS",
    "READ_METHODS",
    "WRITE_METHODS",
    "AuditError",
    "AuditReport",
    "Fault",
    "FaultyDevice",
    "FaultyStore",
    "assert_deterministic",
    "audit_process",
    "cancel_at_checkpoint",
    "open_test_engine",
    "replay",
    "run_with_cancel_at_each_checkpoint",
]

T = TypeVar("T")

#: Store methods that make something durable.
WRITE_METHODS: Final = frozenset(
    {"put_process", "append_assignments", "put_results_nowait", "flush", "put_blob"}
)
#: Store methods that read. A fault on an async read also covers its ``*_nowait`` twin.
READ_METHODS: Final = frozenset(
    {"get_process", "latest_slot", "get_assignments", "get_result", "latest_snapshot", "get_blob"}
)
#: Every store method a fault can target.
ALL_METHODS: Final = WRITE_METHODS | READ_METHODS | {"wait_writable", "open", "close"}

#: The fast path's reads and the async methods whose faults they follow.
_TWINS: Final = {
    "get_assignments_nowait": ("get_assignments",),
    "pending_assignment_nowait": ("get_result", "get_assignments"),
    "get_result_nowait": ("get_result",),
    "get_process_nowait": ("get_process",),
    "latest_snapshot_nowait": ("latest_snapshot",),
}
#: Synchronous writes and the method whose faults they follow.
_WRITE_TWINS: Final = {
    "put_state_nowait": "put_results_nowait",
    "put_states_nowait": "put_results_nowait",
}

FaultKind = Literal["disk-full", "locked", "error", "slow"]


def _cause(kind: str, method: str) -> BaseException:
    if kind == "disk-full":
        return sqlite3.OperationalError("database or disk is full")
    if kind == "locked":
        return sqlite3.OperationalError("database is locked")
    return OSError(errno.EIO, f"injected I/O error in {method}")


# --------------------------------------------------------------------------- FaultyStore


@attrs.define(eq=False)
class Fault:
    """One injected store fault: what it does, which calls it hits, how often.

    Made by `FaultyStore.fail`, `FaultyStore.slow` and their shortcuts. A fault
    hits a call when the method is one of ``methods`` (``None``: any), the
    call is about ``pid`` (``None``: any process), ``after`` matching calls
    have already gone through untouched, and it has fired fewer than
    ``times`` times (``None``: until cleared). Use it as a context manager to
    clear it at the end of a block.
    """

    kind: FaultKind
    methods: frozenset[str] | None
    pid: str | None
    times: int | None
    after: int
    seconds: float = 0.0
    error: Callable[[str], BaseException] | None = None
    #: How many calls it has hit so far.
    fired: int = 0
    #: How many matching calls it let through because of ``after``.
    skipped: int = 0
    active: bool = True

    def matches(self, method: str, pid: str | None) -> bool:
        """Whether a call to ``method`` about ``pid`` is targeted (ignoring the counts)."""
        if not self.active:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.pid is None or pid == self.pid

    @property
    def exhausted(self) -> bool:
        """True once it fired ``times`` times (never for ``times=None``) or was cleared."""
        return not self.active or (self.times is not None and self.fired >= self.times)

    def take(self, method: str, pid: str | None) -> bool:
        """Count a call; True if the fault fires on it."""
        if self.exhausted or not self.matches(method, pid):
            return False
        if self.skipped < self.after:
            self.skipped += 1
            return False
        self.fired += 1
        return True

    def make_error(self, method: str) -> BaseException:
        if self.error is not None:
            return self.error(method)
        text = {
            "disk-full": "database or disk is full",
            "locked": "database is locked",
        }.get(self.kind, "I/O error")
        exc = StoreError(f"injected fault in {method}: {text}")
        exc.__cause__ = _cause(self.kind, method)
        return exc

    def clear(self) -> None:
        """Deactivate this fault."""
        self.active = False

    def __enter__(self) -> Fault:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.clear()


def _methods(
    methods: str | Iterable[str] | None, default: frozenset[str] | None
) -> frozenset[str] | None:
    if methods is None:
        return default
    names = frozenset([methods] if isinstance(methods, str) else methods)
    names = frozenset(
        twin for name in names for twin in _TWINS.get(name, (_WRITE_TWINS.get(name, name),))
    )
    unknown = names - ALL_METHODS
    if unknown:
        raise ValueError(
            f"not store methods: {sorted(unknown)} (choose from {sorted(ALL_METHODS)})"
        )
    return names


def _error_factory(
    error: BaseException | type[BaseException] | Callable[[str], BaseException] | None,
) -> Callable[[str], BaseException] | None:
    if error is None:
        return None
    if isinstance(error, BaseException):
        template = error

        def copy(method: str) -> BaseException:
            # A fresh object per raise: one exception raised in two tasks shares a traceback.
            fresh = type(template)(*template.args)
            fresh.__cause__ = template.__cause__
            return fresh

        return copy
    if isinstance(error, type):
        cls = error
        return lambda method: cls(f"injected fault in {method}")
    return error


class FaultyStore(Store):
    """A `Store` that delegates to ``inner`` and injects faults into chosen calls.

    Failing faults raise `hbtrio.StoreError` (its ``__cause__`` a
    ``sqlite3.OperationalError`` for ``"disk-full"`` and ``"locked"``, an
    ``OSError(EIO)`` for ``"error"``) or an error of your choice, *before*
    delegating, so the failed call changed nothing in ``inner``: exactly what
    the `Store` interface promises for a failed call. Slow faults
    ``await trio.sleep(seconds)`` before delegating (``math.inf`` hangs).

    It has a fast path (`hbtrio.Store.fast`) when ``inner`` has one. Its
    reads never fail or sleep: while a fault targets their async twin
    (``get_result`` for ``get_result_nowait``) they raise `trio.WouldBlock`,
    so the engine takes the async path and meets the fault there, as it would
    with a real store whose memory cache missed. ``put_results_nowait`` (and
    the fast path's single-slot and run-of-states writes, which follow its
    faults) cannot block: failing faults raise from it, slow ones do not apply
    to it (target ``wait_writable`` for a slow disk applying backpressure).
    While a fault targets ``get_assignments``, ``latest_snapshot`` asks
    ``inner`` to read nothing ahead, so the engine's own read meets that
    fault. ``put_blob`` and ``get_blob`` are about no process: only faults
    without a ``pid`` hit them.

    Example::

        store = FaultyStore(hbtrio.MemoryStore())
        with store.disk_full(methods="append_assignments", times=1):
            with pytest.raises(hbtrio.StoreError):
                await engine.schedule(pid, {"n": 1})
        await engine.schedule(pid, {"n": 1})  # the fault is gone

    ``calls`` counts every call by method name; ``faults`` lists the active
    faults.
    """

    def __init__(self, inner: Store) -> None:
        if not isinstance(inner, Store):
            raise TypeError(f"inner must be an hbtrio Store, not {type(inner).__name__}")
        self.inner = inner
        self.faults: list[Fault] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self._inner_fast = fast_path(inner)
        self.fast: FastPath | None = self if inner.fast is not None else None

    def __repr__(self) -> str:
        return f"<FaultyStore {self.inner!r} faults={len(self.faults)}>"

    # configuring faults ----------------------------------------------------------------------

    def fail(
        self,
        error: Literal["disk-full", "locked", "error"]
        | BaseException
        | type[BaseException]
        | Callable[[str], BaseException] = "error",
        *,
        methods: str | Iterable[str] | None = None,
        pid: str | None = None,
        times: int | None = None,
        after: int = 0,
    ) -> Fault:
        """Make matching calls raise.

        ``error`` is ``"disk-full"``, ``"locked"`` or ``"error"`` (a
        `StoreError` as described on the class), or an exception instance,
        class or factory ``(method name) -> exception`` to raise instead.
        ``methods`` defaults to `WRITE_METHODS` for ``"disk-full"`` and
        ``"locked"``, and to reads and writes for anything else.
        """
        if isinstance(error, str):
            if error not in ("disk-full", "locked", "error"):
                raise ValueError(f"error must be 'disk-full', 'locked' or 'error', not {error!r}")
            kind: FaultKind = error
            factory = None
        else:
            kind, factory = "error", _error_factory(error)
        default = WRITE_METHODS if kind in ("disk-full", "locked") else WRITE_METHODS | READ_METHODS
        return self._add(
            Fault(
                kind, _methods(methods, default), pid, _times(times), _after(after), error=factory
            )
        )

    def disk_full(
        self,
        *,
        methods: str | Iterable[str] | None = None,
        pid: str | None = None,
        times: int | None = None,
        after: int = 0,
    ) -> Fault:
        """Writes fail with "database or disk is full" (`fail` with ``"disk-full"``)."""
        return self.fail("disk-full", methods=methods, pid=pid, times=times, after=after)

    def locked(
        self,
        *,
        methods: str | Iterable[str] | None = None,
        pid: str | None = None,
        times: int | None = None,
        after: int = 0,
    ) -> Fault:
        """Writes fail with "database is locked" (`fail` with ``"locked"``)."""
        return self.fail("locked", methods=methods, pid=pid, times=times, after=after)

    def slow(
        self,
        seconds: float,
        *,
        methods: str | Iterable[str] | None = None,
        pid: str | None = None,
        times: int | None = None,
        after: int = 0,
    ) -> Fault:
        """Matching async calls sleep ``seconds`` (Trio's clock) first; ``math.inf`` hangs."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, not {seconds!r}")
        default = (WRITE_METHODS | READ_METHODS | {"wait_writable"}) - {"put_results_nowait"}
        return self._add(
            Fault("slow", _methods(methods, default), pid, _times(times), _after(after), seconds)
        )

    def hang(
        self,
        *,
        methods: str | Iterable[str] | None = None,
        pid: str | None = None,
        times: int | None = None,
        after: int = 0,
    ) -> Fault:
        """Matching async calls never return (until cancelled): `slow` with ``math.inf``."""
        return self.slow(math.inf, methods=methods, pid=pid, times=times, after=after)

    def clear(self) -> None:
        """Remove every fault."""
        for fault in self.faults:
            fault.clear()
        self.faults.clear()

    def _add(self, fault: Fault) -> Fault:
        self.faults = [f for f in self.faults if f.active]
        self.faults.append(fault)
        return fault

    # applying faults ---------------------------------------------------------------------------

    async def _enter(self, method: str, pid: str | None = None) -> None:
        """Count the call; sleep or raise as the faults say. A checkpoint only when sleeping."""
        self.calls[method] += 1
        for fault in list(self.faults):
            if fault.take(method, pid):
                if fault.kind == "slow":
                    await trio.sleep(fault.seconds)
                else:
                    raise fault.make_error(method)

    def _enter_sync(self, method: str, pid: str | None) -> None:
        self.calls[method] += 1
        target = _WRITE_TWINS.get(method, method)
        for fault in list(self.faults):
            if fault.kind != "slow" and fault.take(target, pid):
                raise fault.make_error(method)

    def _redirect(self, method: str, pid: str) -> None:
        """A fast-path read whose async twin is faulty takes the async path."""
        self.calls[method] += 1
        for twin in _TWINS[method]:
            if self._targeted(twin, pid):
                raise trio.WouldBlock

    def _targeted(self, method: str, pid: str) -> bool:
        return any(not f.exhausted and f.matches(method, pid) for f in self.faults)

    # the Store interface -------------------------------------------------------------------------

    async def open(self) -> None:
        await self._enter("open")
        await self.inner.open()

    async def close(self) -> None:
        await self._enter("close")
        await self.inner.close()

    async def put_process(self, pid: str, definition: Message, assignment: Message) -> bool:
        await self._enter("put_process", pid)
        return await self.inner.put_process(pid, definition, assignment)

    async def get_process(self, pid: str) -> Message | None:
        await self._enter("get_process", pid)
        return await self.inner.get_process(pid)

    async def append_assignments(self, pid: str, assignments: Sequence[Message]) -> None:
        await self._enter("append_assignments", pid)
        await self.inner.append_assignments(pid, assignments)

    async def latest_slot(self, pid: str) -> int:
        await self._enter("latest_slot", pid)
        return await self.inner.latest_slot(pid)

    async def get_assignments(self, pid: str, start: int, stop: int) -> list[Message]:
        await self._enter("get_assignments", pid)
        return await self.inner.get_assignments(pid, start, stop)

    def put_results_nowait(self, pid: str, results: Sequence[SlotResult]) -> None:
        self._enter_sync("put_results_nowait", pid)
        self.inner.put_results_nowait(pid, results)

    @property
    def backlogged(self) -> bool:  # type: ignore[override]
        return self.inner.backlogged

    async def wait_writable(self) -> None:
        await self._enter("wait_writable")
        await self.inner.wait_writable()

    async def get_result(self, pid: str, slot: int) -> Message | None:
        await self._enter("get_result", pid)
        return await self.inner.get_result(pid, slot)

    async def latest_snapshot(
        self, pid: str, at_most: int, *, read_to: int = 0
    ) -> tuple[int, Message] | None:
        await self._enter("latest_snapshot", pid)
        if self._targeted("get_assignments", pid):
            read_to = 0  # nothing read ahead: the engine's own read meets the fault
        return await self.inner.latest_snapshot(pid, at_most, read_to=read_to)

    # the fast path (when ``inner`` has one) --------------------------------------------------

    def get_assignments_nowait(self, pid: str, start: int, stop: int) -> list[Message]:
        self._redirect("get_assignments_nowait", pid)
        return self._inner_fast.get_assignments_nowait(pid, start, stop)

    def get_process_nowait(self, pid: str) -> Message | None:
        self._redirect("get_process_nowait", pid)
        return self._inner_fast.get_process_nowait(pid)

    def latest_snapshot_nowait(self, pid: str, at_most: int) -> tuple[int, Message] | None:
        self._redirect("latest_snapshot_nowait", pid)
        return self._inner_fast.latest_snapshot_nowait(pid, at_most)

    def pending_assignment_nowait(self, pid: str, slot: int) -> Message | None:
        self._redirect("pending_assignment_nowait", pid)
        return self._inner_fast.pending_assignment_nowait(pid, slot)

    def get_result_nowait(self, pid: str, slot: int) -> Message | None:
        self._redirect("get_result_nowait", pid)
        return self._inner_fast.get_result_nowait(pid, slot)

    def put_state_nowait(self, pid: str, slot: int, state: Message, snapshot: bool) -> None:
        self._enter_sync("put_state_nowait", pid)
        self._inner_fast.put_state_nowait(pid, slot, state, snapshot)

    def put_states_nowait(
        self, pid: str, first: int, states: Sequence[Message], snapshot_every: int
    ) -> None:
        self._enter_sync("put_states_nowait", pid)
        self._inner_fast.put_states_nowait(pid, first, states, snapshot_every)

    async def flush(self) -> None:
        await self._enter("flush")
        await self.inner.flush()

    async def put_blob(self, blob_id: str, data: bytes) -> None:
        await self._enter("put_blob")
        await self.inner.put_blob(blob_id, data)

    async def get_blob(self, blob_id: str) -> bytes | None:
        await self._enter("get_blob")
        return await self.inner.get_blob(blob_id)

    def pin(self, pid: str) -> None:
        self.inner.pin(pid)

    def unpin(self, pid: str) -> None:
        self.inner.unpin(pid)

    def statistics(self) -> StoreStatistics:
        return self.inner.statistics()


def _times(times: int | None) -> int | None:
    if times is not None and (type(times) is not int or times < 1):
        raise ValueError(f"times must be an int >= 1 or None, not {times!r}")
    return times


def _after(after: int) -> int:
    if type(after) is not int or after < 0:
        raise ValueError(f"after must be an int >= 0, not {after!r}")
    return after


# --------------------------------------------------------------------------- FaultyDevice


class _Invalid:
    """What a device returns at an ``invalid`` slot: not a message."""

    def __repr__(self) -> str:
        return "<invalid device output>"


class FaultyDevice:
    """An execution device wrapper that misbehaves at chosen slots.

    Args:
        inner: the device to wrap (plain or async methods).
        errors: slot -> exception (an instance, a class, or a factory taking
            the slot) raised instead of computing that slot. Slot 0 is
            ``init``.
        delays: slot -> seconds to wait before computing it (Trio's clock;
            with ``blocking=True``, ``time.sleep`` in the calling thread).
        hangs: slots whose computation never finishes (until cancelled, or,
            with ``blocking=True``, until `clear`).
        invalid: slots at which the device returns something that is not a
            message (the engine reports a `hbtrio.ComputeError`).
        nondeterministic: slots whose state gets a random ``"noise"`` key, a
            different one each time the slot is computed.
        times: how often each error, hang or invalid output happens per slot
            (``None``: every time until `clear`).
        blocking: ``False`` (default): ``compute`` and ``init`` are
            ``async def`` and wait with `trio.sleep`, so a hang or delay is
            bounded by ``open_engine(slot_timeout=...)``. ``True``: they are
            plain functions that block the calling thread, like a CPU-heavy
            device; wrap the device in `hbtrio.run_in_thread` to keep the
            event loop free and make ``slot_timeout`` apply.

    ``calls`` counts how often each slot was computed (``init`` is slot 0).
    ``snapshot``/``restore`` are the inner device's, if it has them.
    """

    #: States from this wrapper are checked and frozen by the engine.
    hbtrio_trusted: Final = False

    def __init__(
        self,
        inner: object,
        *,
        errors: Mapping[int, BaseException | type[BaseException] | Callable[[int], BaseException]]
        | None = None,
        delays: Mapping[int, float] | None = None,
        hangs: Collection[int] = (),
        invalid: Collection[int] = (),
        nondeterministic: Collection[int] = (),
        times: int | None = None,
        blocking: bool = False,
    ) -> None:
        self.inner = inner
        self.errors = dict(errors or {})
        self.delays = dict(delays or {})
        self.hangs = set(hangs)
        self.invalid = set(invalid)
        self.nondeterministic = set(nondeterministic)
        self.times = _times(times)
        self.blocking = blocking
        self.calls: collections.Counter[int] = collections.Counter()
        self._fired: collections.Counter[tuple[str, int]] = collections.Counter()
        #: Computations hanging right now.
        self.hanging = 0
        self._release = threading.Event()
        self._cond = threading.Condition()
        self._changed: trio.Event | None = None
        if blocking:
            self.init = self._init_blocking  # type: ignore[method-assign]
            self.compute = self._compute_blocking  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<FaultyDevice {self.inner!r}>"

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    async def wait_hanging(self, n: int = 1) -> None:
        """Return once at least ``n`` computations are hanging (a checkpoint).

        With ``blocking=True`` it waits in a thread, which an autojump clock
        sees as everything being blocked: use a plain `trio.testing.MockClock`
        (and jump it yourself) or the real clock then.
        """
        if self.blocking:

            def wait() -> None:
                with self._cond:
                    self._cond.wait_for(lambda: self.hanging >= n)

            await trio.to_thread.run_sync(wait, abandon_on_cancel=True)
            return
        await trio.lowlevel.checkpoint()
        while self.hanging < n:
            self._changed = trio.Event()
            await self._changed.wait()

    def _hang_count(self, delta: int) -> None:
        with self._cond:
            self.hanging += delta
            self._cond.notify_all()
        changed = self._changed
        if changed is not None and not self.blocking:
            changed.set()

    def clear(self) -> None:
        """Remove every fault and release computations hanging in threads (``blocking=True``)."""
        self.errors.clear()
        self.delays.clear()
        self.hangs.clear()
        self.invalid.clear()
        self.nondeterministic.clear()
        self._release.set()

    def _fires(self, what: str, slot: int) -> bool:
        if self.times is not None and self._fired[what, slot] >= self.times:
            return False
        self._fired[what, slot] += 1
        return True

    def _error(self, slot: int) -> BaseException | None:
        error = self.errors.get(slot)
        if error is None or not self._fires("error", slot):
            return None
        if isinstance(error, BaseException):
            fresh = type(error)(*error.args)
            fresh.__cause__ = error.__cause__
            return fresh
        made: BaseException = (
            error(f"injected failure at slot {slot}") if isinstance(error, type) else error(slot)
        )
        return made

    def _finish(self, slot: int, state: Any) -> Any:
        if slot in self.invalid and self._fires("invalid", slot):
            return _Invalid()
        if slot in self.nondeterministic:
            return {**state, "noise": secrets.token_hex(8)}
        return state

    # async flavour ---------------------------------------------------------------------------

    async def _before(self, slot: int) -> None:
        self.calls[slot] += 1
        delay = self.delays.get(slot)
        if delay:
            await trio.sleep(delay)
        if slot in self.hangs and self._fires("hang", slot):
            self._hang_count(1)
            try:
                await trio.sleep_forever()
            finally:
                self._hang_count(-1)
        error = self._error(slot)
        if error is not None:
            raise error

    async def init(self, process: Message) -> Any:
        await self._before(0)
        return self._finish(0, await _call(getattr(self.inner, "init"), process))  # noqa: B009

    async def compute(self, state: Message, assignment: Message) -> Any:
        slot = assignment["slot"]
        await self._before(slot)
        new = await _call(getattr(self.inner, "compute"), state, assignment)  # noqa: B009
        return self._finish(slot, new)

    # blocking flavour ------------------------------------------------------------------------

    def _before_blocking(self, slot: int) -> None:
        self.calls[slot] += 1
        delay = self.delays.get(slot)
        if delay:
            time.sleep(delay)
        if slot in self.hangs and self._fires("hang", slot):
            self._hang_count(1)
            try:
                self._release.wait()
            finally:
                self._hang_count(-1)
        error = self._error(slot)
        if error is not None:
            raise error

    def _init_blocking(self, process: Message) -> Any:
        self._before_blocking(0)
        return self._finish(0, _call_plain(getattr(self.inner, "init"), process))  # noqa: B009

    def _compute_blocking(self, state: Message, assignment: Message) -> Any:
        slot = assignment["slot"]
        self._before_blocking(slot)
        new = _call_plain(getattr(self.inner, "compute"), state, assignment)  # noqa: B009
        return self._finish(slot, new)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if isinstance(result, Awaitable):
        return await result
    return result


def _call_plain(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if isinstance(result, Awaitable):
        close = getattr(result, "close", None)
        if close is not None:
            close()  # a coroutine that will never be awaited
        raise TypeError("FaultyDevice(blocking=True) needs an inner device with plain methods")
    return result


# --------------------------------------------------------------------------- engines for tests


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


# --------------------------------------------------------------------------- cancellation


class _StepCanceller(trio.abc.Instrument):
    def __init__(self, task: trio.lowlevel.Task, steps: int, scope: trio.CancelScope) -> None:
        self.task, self.left, self.scope = task, steps, scope

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.left -= 1
            if self.left == 0:
                self.scope.cancel()


async def cancel_at_checkpoint(k: int, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run ``call()`` in this task and cancel it right after its k-th step.

    A task's step ends each time it yields to Trio, so this cancels the call
    at its k-th checkpoint (``k=0``: before it starts). Returns
    ``(True, result)`` if the call completed and ``(False, None)`` if the
    cancellation stopped it. Exceptions other than the cancellation propagate.
    """
    if type(k) is not int or k < 0:
        raise ValueError(f"k must be an int >= 0, not {k!r}")
    scope = trio.CancelScope()
    if k == 0:
        scope.cancel()
    instrument = _StepCanceller(trio.lowlevel.current_task(), k, scope)
    trio.lowlevel.add_instrument(instrument)
    try:
        with scope:
            return True, await call()
        return False, None
    finally:
        trio.lowlevel.remove_instrument(instrument)


async def run_with_cancel_at_each_checkpoint(
    make_call: Callable[[], Awaitable[Callable[[], Awaitable[T]]]],
    check: Callable[[bool, T | None], Awaitable[None]],
    *,
    limit: int = 200,
    attempt_timeout: float | None = None,
) -> int:
    """Cancel a call at each of its checkpoints in turn, checking the system after each.

    For k = 0, 1, 2, ...: ``call = await make_call()`` (set up a fresh
    attempt), run it cancelled at its k-th checkpoint (`cancel_at_checkpoint`),
    then ``await check(completed, result)``. Stops at the first k > 0 at which
    the call completes untouched and returns that k (the number of
    checkpoints the call passed). Raises `AssertionError` if it never
    completes within ``limit`` attempts, or if an attempt takes longer than
    ``attempt_timeout`` seconds (Trio's clock): a call that blocks for ever
    before its k-th checkpoint can only be caught that way.
    """
    for k in range(limit):
        call = await make_call()
        try:
            with trio.fail_after(math.inf if attempt_timeout is None else attempt_timeout):
                completed, result = await cancel_at_checkpoint(k, call)
        except trio.TooSlowError:
            raise AssertionError(
                f"attempt {k} (cancelled at checkpoint {k}) did not finish "
                f"within {attempt_timeout} s"
            ) from None
        await check(completed, result)
        if completed and k > 0:
            return k
    raise AssertionError(f"the call never completed in {limit} attempts")


# --------------------------------------------------------------------------- consistency


class AuditError(AssertionError):
    """`audit_process` or `assert_deterministic` found something inconsistent."""


@attrs.frozen
class AuditReport:
    """What `audit_process` checked for one process."""

    pid: str
    #: The latest scheduled slot.
    latest_slot: int
    #: Slots that have a stored result (each equal to the replayed state).
    results: int
    #: Scheduled slots without a stored result (computed later, or never).
    missing_results: int
    #: Stored snapshots (each restoring to the replayed state).
    snapshots: int


def _registry(devices: Mapping[str, object] | Devices | None) -> Devices:
    return devices if isinstance(devices, Devices) else Devices(devices)


async def _replay_assignments(
    registry: Devices,
    definition: Message,
    assignments: Sequence[Message],
    cache_frequency: int,
    found: tuple[int, Message] | None = None,
) -> list[Message | None]:
    """The results of a replay (from ``found``, else slot 0) of ``assignments`` (after it)."""
    device = registry.get(definition["execution-device"])
    pid = assignments[0]["process"] if assignments else message_id(definition)
    driver = Driver(ProcessCore(pid, definition, device, cache_frequency), MemoryStore())
    try:
        return await driver.replay(list(assignments), found)
    finally:
        await driver.close()


async def replay(
    definition: Mapping[str, Any],
    bodies: Iterable[Mapping[str, Any]],
    devices: Mapping[str, object] | None = None,
) -> list[Message]:
    """The states of a process at slots 0, 1, ... computed from scratch, without any engine.

    ``bodies`` are the messages scheduled at slots 1, 2, ...; ``devices`` are
    the extra devices as for `hbtrio.open_engine`. Device failures raise
    `hbtrio.ComputeError` as in the engine. The reference to compare an
    engine's answers with (by value or by `hbtrio.message_id`).
    """
    registry = _registry(devices)
    defn = validate_definition(definition, registry)
    pid = message_id(defn)
    assignment, chain = make_assignment(pid, 0, defn, b"", mid=pid)
    assignments = [assignment]
    for slot, body in enumerate(bodies, start=1):
        assignment, chain = make_assignment(pid, slot, freeze(body, what="body"), chain)
        assignments.append(assignment)
    states = await _replay_assignments(registry, defn, assignments[1:], 1)
    return states  # type: ignore[return-value]  # from slot 0: every result is there


async def assert_deterministic(
    definition: Mapping[str, Any],
    bodies: Sequence[Mapping[str, Any]],
    devices: Mapping[str, object] | None = None,
    *,
    runs: int = 2,
) -> list[Message]:
    """Replay a process ``runs`` times; raise `AuditError` at the first slot whose states differ.

    Compares states by `hbtrio.message_id`, which is what a worker restarted
    on another node would be checked against. Returns the states of the
    first run.
    """
    first = await replay(definition, bodies, devices)
    ids = [message_id(s) for s in first]
    for run in range(1, runs):
        again = await replay(definition, bodies, devices)
        for slot, (a, b) in enumerate(zip(ids, again, strict=True)):
            if a != message_id(b):
                raise AuditError(
                    f"the device is not deterministic: slot {slot} differs between run 1 and "
                    f"run {run + 1}: {first[slot]!r} != {b!r}"
                )
    return first


async def audit_process(
    store: Store,
    pid: str,
    devices: Mapping[str, object] | None = None,
    *,
    require_results: bool = False,
) -> AuditReport:
    """Check everything ``store`` holds for ``pid`` against a replay from scratch.

    - the schedule is gap-free from slot 0 and its IDs and hash chain verify
      (`hbtrio.verify_schedule`);
    - every stored result equals the state replayed at its slot (by
      `hbtrio.message_id`) and says ``"at-slot": slot``;
    - every stored snapshot restores to the state replayed at its slot;
    - with ``require_results``, every scheduled slot has a result.

    Raises `AuditError` naming the first problem; returns an `AuditReport`.
    The store must be open; this only reads. ``devices`` are the extra
    devices as for `hbtrio.open_engine`.
    """
    registry = _registry(devices)
    definition = await store.get_process(pid)
    if definition is None:
        raise AuditError(f"process {pid} is not in the store")
    latest = await store.latest_slot(pid)
    assignments = await store.get_assignments(pid, 0, latest + 1)
    if len(assignments) != latest + 1:
        raise AuditError(
            f"process {pid}: {len(assignments)} assignments stored for slots 0..{latest}"
        )
    try:
        verify_schedule(pid, assignments)
    except Exception as exc:
        raise AuditError(f"process {pid}: the schedule does not verify: {exc}") from exc
    if message_id(definition) != pid or assignments[0]["body"] != definition:
        raise AuditError(f"process {pid}: slot 0 is not the process definition")
    expected = await _replay_assignments(registry, definition, assignments[1:], 1)
    ids = [message_id(s) for s in expected]  # type: ignore[arg-type]  # none is None
    results = missing = 0
    for slot in range(latest + 1):
        stored = await store.get_result(pid, slot)
        if stored is None:
            missing += 1
            if require_results:
                raise AuditError(f"process {pid}: slot {slot} has no stored result")
            continue
        if stored.get("at-slot") != slot or message_id(stored) != ids[slot]:
            raise AuditError(
                f"process {pid}: the stored result at slot {slot} is {stored!r}, "
                f"a replay gives {expected[slot]!r}"
            )
        results += 1
    # Any slots beyond the schedule must not have results.
    beyond = await store.get_result(pid, latest + 1)
    if beyond is not None:
        raise AuditError(f"process {pid}: a result is stored for unscheduled slot {latest + 1}")
    snapshots = 0
    at_most = checked_from = latest
    while at_most >= 0:
        found = await store.latest_snapshot(pid, at_most)
        if found is None:
            break
        slot = found[0]
        if not 0 <= slot <= at_most:
            raise AuditError(f"process {pid}: latest_snapshot(<= {at_most}) gave slot {slot}")
        # Restored, the snapshot gives the state there (a state device), or the same
        # results as the replay up to the next snapshot (a live instance).
        upto = min(latest, checked_from) + 1
        replayed = await _replay_assignments(
            registry, definition, assignments[slot + 1 : upto], 1, found
        )
        for s, state in enumerate(replayed, slot):
            if state is not None and message_id(state) != ids[s]:
                raise AuditError(
                    f"process {pid}: the snapshot at slot {slot} restores to {state!r} at slot "
                    f"{s}, a replay gives {expected[s]!r}"
                )
        snapshots += 1
        checked_from = slot
        at_most = slot - 1
    return AuditReport(pid, latest, results, missing, snapshots)
