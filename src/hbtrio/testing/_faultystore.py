"""`FaultyStore`: a store that fails, or is slow, where a test says.

`FaultyStore` wraps any `hbtrio.Store`; each `Fault` it is given (`fail`,
`disk_full`, `locked`, `slow`, `hang`) names the calls it hits (by method,
`WRITE_METHODS`, `READ_METHODS`, `ALL_METHODS`; by process; after some
calls; some times). A failing fault raises before the call reaches the
inner store, so a failed call changed nothing there, exactly what the
`Store` interface promises; a slow one sleeps on Trio's clock first. The
fast path's reads never fail or sleep: while a fault targets their async
twin they say "would block", so the engine meets the fault on the async
path, as it would with a real store whose memory cache missed.

Everything runs on the caller's Trio loop; a fault is a plain record, not
thread-safe.
"""

from __future__ import annotations

import collections
import errno
import math
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Final, Literal

import attrs
import trio

from .._exceptions import StoreError, StoreFenced
from .._message import Message
from .._store import FastPath, SlotResult, Store, StoreStatistics, fast_path
from ._options import check_after, check_times

__all__ = [
    "ALL_METHODS",
    "READ_METHODS",
    "WRITE_METHODS",
    "Fault",
    "FaultKind",
    "FaultyStore",
]

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
                kind,
                _methods(methods, default),
                pid,
                check_times(times),
                check_after(after),
                error=factory,
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
            Fault(
                "slow",
                _methods(methods, default),
                pid,
                check_times(times),
                check_after(after),
                seconds,
            )
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

    @property
    def on_lost(self) -> Callable[[str, StoreFenced], None] | None:
        """The inner store's (`hbtrio.Store.on_lost`): its losses reach the engine."""
        return self.inner.on_lost

    @on_lost.setter
    def on_lost(self, callback: Callable[[str, StoreFenced], None] | None) -> None:
        self.inner.on_lost = callback

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

    async def latest_snapshot_slot(self, pid: str, at_most: int) -> int | None:
        await self._enter("latest_snapshot", pid)  # the same faults as the snapshot's read
        return await self.inner.latest_snapshot_slot(pid, at_most)

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
