"""Execution devices: the registry, the calling convention and the built-in devices.

A device is any object with ``init(process)`` and ``compute(state, assignment)``
(plain functions or ``async def``), optionally ``snapshot(state)`` and
``restore(snapshot)``. Devices reached only through ``resolve`` need none of
these. Whether each method is async is decided once, when the device is
registered, so the per-slot path does not inspect anything.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import attrs
import trio

from . import _lua, _wasm
from ._exceptions import ComputeError, InvalidMessage, UnknownDevice
from ._message import MAX_INT, MIN_INT, Message

__all__ = [
    "Counter",
    "DeviceHost",
    "DeviceInfo",
    "Devices",
    "call_maybe_async",
    "is_async",
    "is_device_failure",
    "run_in_thread",
]

PROCESS_DEVICE: Final = "process@1.0"


def is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised out of a device call, is that device's failure.

    Whatever a device raises is its own failure, and so its process's, never
    the engine's: `KeyboardInterrupt`, `SystemExit`, `GeneratorExit` and any
    other `BaseException` included. The one exception is the calling task's
    own cancellation: a `trio.Cancelled` while a scope around the call is
    cancelled (the engine closing, a ``slot_timeout``, the last waiter
    leaving), which must propagate. A `trio.Cancelled` raised while no scope
    around the call is cancelled is a stray one, and the device's failure.

    A real Ctrl-C never lands in device code: the engine's frames that call
    devices are KI-protected (`trio.lowlevel.enable_ki_protection`), so Trio
    delivers it to the main task instead; a `KeyboardInterrupt` out of a device
    is one the device raised. Call from the task that called the device.
    """
    if isinstance(exc, trio.Cancelled):
        return trio.current_effective_deadline() != -math.inf
    return True


@trio.lowlevel.enable_ki_protection
async def call_maybe_async(fn: Callable[..., Any], awaited: bool, *args: Any) -> Any:
    """Call ``fn(*args)``, awaiting it when ``awaited``. Not a checkpoint by itself."""
    if awaited:
        return await fn(*args)
    return fn(*args)


#: How a device method is called (`DeviceInfo`): in the calling task, awaited, or in a thread.
INLINE: Final = "inline"
AWAIT: Final = "await"
THREAD: Final = "thread"


#: What a failed slot of a live instance does (`DeviceInfo.failures`, a definition's
#: ``"on-failure"``): fail with `ComputeError`, or become the slot's result.
STOP: Final = "stop"
RECORD: Final = "record"
FAILURE_POLICIES: Final = (STOP, RECORD)


@attrs.frozen
class DeviceInfo:
    """A registered device with its methods looked up once.

    A *state device* has ``init``/``compute`` (and maybe ``snapshot``/
    ``restore``); a *live device* has ``boot``, which returns a live instance
    (see `_core`). ``threaded`` devices (`run_in_thread`) have plain methods
    that the engine calls in worker threads, bounded by ``limiter``.
    """

    name: str
    obj: object
    init: Callable[..., Any] | None
    init_async: bool
    compute: Callable[..., Any] | None
    compute_async: bool
    snapshot: Callable[..., Any] | None
    snapshot_async: bool
    restore: Callable[..., Any] | None
    restore_async: bool
    #: True for devices written against the engine's internals (the built-in
    #: ones): their ``compute`` returns the final state, ``"at-slot"`` included,
    #: either a `Message` or a plain dict of atomic values that nothing will
    #: ever mutate (the engine freezes it when it hands it out), so the engine
    #: adopts it without checking or copying.
    trusted: bool
    boot: Callable[..., Any] | None = None
    boot_async: bool = False
    #: Its methods are plain and block: call them in threads (`run_in_thread`).
    threaded: bool = False
    limiter: trio.CapacityLimiter | None = None
    #: A trusted device's ``compute_batch(state, assignments, out)``: applies
    #: the assignments in one go, appending each final state to ``out`` (and
    #: raising at the first failing one), or ``None``.
    compute_batch: Callable[..., Any] | None = None
    #: What a failed ``compute`` of a live instance does by default: ``"stop"``
    #: (the slot fails with `ComputeError`) or ``"record"`` (the failure is the
    #: slot's result and the process goes on); a definition's ``"on-failure"``
    #: chooses otherwise.
    failures: str = STOP
    #: True for a live device (``boot``); False for a state device (``init``/``compute``).
    live: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "live", self.boot is not None)  # frozen: set once

    @classmethod
    def of(cls, name: str, obj: object) -> DeviceInfo:
        threaded = isinstance(obj, _InThread)
        inner = obj._device if isinstance(obj, _InThread) else obj

        def method(attr: str) -> tuple[Callable[..., Any] | None, bool]:
            fn = getattr(inner, attr, None)
            if fn is None:
                return None, False
            if not callable(fn):
                raise TypeError(f"device {name!r}: {attr} is not callable")
            return fn, is_async(fn)

        init, init_async = method("init")
        compute, compute_async = method("compute")
        snapshot, snapshot_async = method("snapshot")
        restore, restore_async = method("restore")
        boot, boot_async = method("boot")
        trusted = bool(getattr(inner, "hbtrio_trusted", False)) and not threaded
        failures = getattr(inner, "failures", STOP)
        if failures not in FAILURE_POLICIES:
            raise TypeError(
                f"device {name!r}: failures must be 'stop' or 'record', not {failures!r}"
            )
        if failures == RECORD and boot is None:
            raise TypeError(f"device {name!r}: failures='record' needs a live device (boot)")
        return cls(
            name=name,
            obj=obj,
            init=init,
            init_async=init_async,
            compute=compute,
            compute_async=compute_async,
            snapshot=snapshot,
            snapshot_async=snapshot_async,
            restore=restore,
            restore_async=restore_async,
            boot=boot,
            boot_async=boot_async,
            threaded=threaded,
            limiter=obj._limiter if isinstance(obj, _InThread) else None,
            trusted=trusted,
            compute_batch=getattr(inner, "compute_batch", None) if trusted else None,
            failures=failures,
        )

    def how(self, is_async: bool) -> str:
        """How to call one of its methods: `THREAD`, `AWAIT` or `INLINE`."""
        return THREAD if self.threaded else AWAIT if is_async else INLINE

    def method(self, path: object) -> tuple[Callable[..., Any], bool]:
        """The public method named ``path`` for a generic resolution."""
        if type(path) is not str or not path.isidentifier() or path.startswith("_"):
            raise InvalidMessage(f"path: {path!r} is not a device method name")
        try:
            fn = getattr(self.obj, path, None)
        except BaseException as exc:  # the device's own __getattr__ failed: its failure
            if not is_device_failure(exc):
                raise
            raise ComputeError(
                f"device {self.name!r}: looking up {path!r} failed: {exc!r}",
                phase="compute",
                attempted_slot=None,
            ) from exc
        if fn is None or not callable(fn):
            raise InvalidMessage(f"path: device {self.name!r} has no method {path!r}")
        return fn, is_async(fn)


@attrs.frozen
class DeviceHost:
    """What an engine offers the devices registered with it.

    A device with an ``attach(host)`` method is handed one when its engine
    opens, before any process boots (once per device object, whatever names
    it is registered under); an exception from ``attach`` fails
    `open_engine`. A device registered with several engines is attached to
    each, and must keep what it needs per host. (A built-in WASM or Lua
    device is made, and attached, when a process first needs it.)
    """

    #: The engine's ``slot_timeout`` (``None``: no limit). A device whose calls
    #: run in threads uses it to stop a call that runs out by itself.
    slot_timeout: float | None
    _get_blob: Callable[[str], Awaitable[bytes]] = attrs.field(alias="get_blob", repr=False)

    async def get_blob(self, blob_id: str) -> bytes:
        """The bytes of blob ``blob_id`` (`Engine.get_blob`): raises `BlobNotFound`,
        `InvalidMessage` or `StoreError`. Checkpoints; call it from the engine's
        Trio thread (an async ``boot``, say), or through ``trio.from_thread.run``."""
        return await self._get_blob(blob_id)


class Devices:
    """Name -> device: the built-in devices, then the extras (which may replace a built-in).

    The WASM and Lua devices are made on first use (`get`), and attached then
    to the host the registry was attached to: an engine that never runs one
    pays nothing for them when it opens.
    """

    def __init__(
        self, extra: Mapping[str, object] | None = None, *, on_failure: str | None = None
    ) -> None:
        """``on_failure`` (``"stop"`` or ``"record"``), when given, replaces every live
        device's own `DeviceInfo.failures`; a definition's ``"on-failure"`` still wins."""
        if on_failure is not None and on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be 'stop', 'record' or None, not {on_failure!r}")
        self._on_failure = on_failure
        self._host: DeviceHost | None = None
        self._devices: dict[str, DeviceInfo] = {}
        extra = extra or {}
        # Built-in families not made yet: name -> the family's factory (one device object
        # under all of its names), for the names no extra replaces.
        self._lazy: dict[str, Callable[[], dict[str, object]]] = {
            name: family
            for names, family in (
                (_wasm.NAMES, _wasm.builtin_devices),
                (_lua.NAMES, _lua.builtin_devices),
            )
            for name in names
            if name not in extra
        }
        self._add("counter@1.0", Counter())
        for name, obj in extra.items():
            if type(name) is not str or not name:
                raise TypeError(f"device names must be non-empty str, not {name!r}")
            if name == PROCESS_DEVICE:
                raise ValueError(f"{PROCESS_DEVICE!r} is the engine's own device")
            self._add(name, obj)

    def _add(self, name: str, obj: object) -> DeviceInfo:
        info = DeviceInfo.of(name, obj)
        if self._on_failure is not None and info.live:
            info = attrs.evolve(info, failures=self._on_failure)
        self._devices[name] = info
        return info

    def _make(self, name: str) -> DeviceInfo | None:
        """Make the built-in family of ``name`` (``None`` if its dependencies are missing)."""
        family = self._lazy[name]
        made = family()
        added = []
        for other in [n for n, f in self._lazy.items() if f is family]:
            del self._lazy[other]
            if other in made:
                added.append(self._add(other, made[other]))
        if self._host is not None:
            _attach_each(added, self._host)
        return self._devices.get(name)

    def __contains__(self, name: object) -> bool:
        if type(name) is not str:
            return False
        if name in self._devices:
            return True
        return name in self._lazy and (
            _wasm.available() if name in _wasm.NAMES else _lua.available()
        )

    def attach(self, host: DeviceHost) -> None:
        """Call ``attach(host)`` on each registered device object that has one, once each
        (a built-in made later is attached when it is made)."""
        self._host = host
        _attach_each(self._devices.values(), host)

    def get(self, name: object) -> DeviceInfo:
        """The device registered as ``name``; `UnknownDevice` otherwise."""
        try:
            return self._devices[name]  # type: ignore[index]
        except (KeyError, TypeError):
            pass
        info = self._make(name) if type(name) is str and name in self._lazy else None
        if info is not None:
            return info
        why = _wasm.MISSING if name in _wasm.NAMES else _lua.MISSING if name in _lua.NAMES else None
        raise UnknownDevice(name, why) from None

    def names(self) -> list[str]:
        return sorted([*self._devices, *(n for n in self._lazy if n in self)])


def _attach_each(infos: Iterable[DeviceInfo], host: DeviceHost) -> None:
    """``attach(host)`` on each device object of ``infos`` that has one, once per object."""
    seen: set[int] = set()
    for info in infos:
        inner = info.obj._device if isinstance(info.obj, _InThread) else info.obj
        if id(inner) in seen:
            continue
        seen.add(id(inner))
        attach = getattr(inner, "attach", None)
        if attach is None:
            continue
        if not callable(attach):
            raise TypeError(f"device {info.name!r}: attach is not callable")
        attach(host)


class Counter:
    """``counter@1.0``: state ``{"count": 0}``; each assignment adds its body's ``"n"``.

    A body without ``"n"`` adds nothing; an ``"n"`` that is not an ``int``,
    or a count that would leave the message integer range (``-2**64`` to
    ``2**64-1``), makes the slot fail with `ComputeError`.
    """

    hbtrio_trusted: Final = True

    def init(self, process: Message) -> dict[str, Any]:
        return {"count": 0}

    def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
        n = assignment["body"].get("n", 0)
        if type(n) is not int:
            raise TypeError(f'counter@1.0: body "n" must be an int, not {type(n).__name__}')
        count = state["count"] + n
        if not MIN_INT <= count <= MAX_INT:
            raise _overflow(count)
        return {"count": count, "at-slot": assignment["slot"]}

    def compute_batch(self, state: Message, assignments: list[Message], out: list[Any]) -> None:
        """`compute` for consecutive assignments, appending each state to ``out``."""
        count = state["count"]
        append = out.append
        lo, hi = MIN_INT, MAX_INT
        # Consecutive slots: counted, not read from each assignment.
        for slot, a in enumerate(assignments, assignments[0]["slot"] if assignments else 0):
            n = a["body"].get("n", 0)
            if type(n) is not int:
                raise TypeError(f'counter@1.0: body "n" must be an int, not {type(n).__name__}')
            count += n
            if not lo <= count <= hi:
                raise _overflow(count)
            append({"count": count, "at-slot": slot})


def _overflow(count: int) -> OverflowError:
    return OverflowError(
        f"counter@1.0: the count would be a {count.bit_length()}-bit integer, "
        "outside the message range (-2**64 to 2**64-1)"
    )


class _InThread:
    """A device whose methods the engine calls in worker threads (see `run_in_thread`).

    Registered, it is seen through (`DeviceInfo.of`): its own methods are the
    device's, called by the engine's driver in threads. Methods called on it
    directly (a resolution's ``path``) run in threads too.
    """

    def __init__(self, device: object, limiter: trio.CapacityLimiter | None) -> None:
        self._device = device
        self._limiter = limiter
        for attr in ("init", "compute", "snapshot", "restore", "boot"):
            fn = getattr(device, attr, None)
            if fn is not None and is_async(fn):
                raise TypeError("run_in_thread takes a device with plain (non-async) methods")

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def in_thread(*args: Any) -> Any:
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self._limiter, abandon_on_cancel=True
            )

        return in_thread

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._device, name)
        return self._wrap(value) if callable(value) and not is_async(value) else value


def run_in_thread(device: object, *, limiter: trio.CapacityLimiter | None = None) -> object:
    """Wrap a CPU-heavy device so its methods run in threads, off the event loop.

    The event loop keeps serving every other process while a slot computes.
    ``limiter`` bounds how many of its calls run at once (trio's default
    limiter otherwise). A cancelled call (a ``slot_timeout``, engine shutdown)
    abandons its thread: the call runs on to its end and its result is thrown
    away; the slot counts as not applied, so no state is half-changed.

    Example::

        engine_devices = {"heavy@1.0": hbtrio.run_in_thread(HeavyDevice())}
    """
    return _InThread(device, limiter)
