"""`LuaDevice`: AO processes whose code is Lua 5.3, each a hot VM in its worker.

Theory of operation
-------------------
A `LuaDevice` is a *live device* (see `hbtrio._core`): ``boot(process,
snapshot)`` gives a `LiveLua`, the instance a process's worker keeps hot slot
after slot, snapshots every ``cache_frequency`` slots and throws away after
any failure. Nothing of Lua runs on the event loop:

- ``boot`` is async: it reads the modules a definition names by blob ID
  (through the hosts the engines attached with ``attach``), then makes the
  VM and loads the modules (a new process) or restores the snapshot, in a
  thread;
- ``compute``, ``compute_many`` and ``snapshot`` are async and run in
  threads (`hbtrio._threaded`); ``close`` is plain and never blocks
  (`LuaVM.close`).

Each call into the VM is bounded by a deadline the VM enforces itself
(`_vm`): the device's ``call_timeout``, else the engine's ``slot_timeout``,
else `DEFAULT_CALL_TIMEOUT`. So a thread the engine abandons at its
``slot_timeout`` stops by itself too, instead of burning a core for ever.

A Lua error that ``handle`` does not catch, a call that runs out of time or
memory, and an answer that is not the result form raise (`LuaScriptError`,
`LuaTimeout`, `LuaMemoryError`, `LuaResultError`): the slot fails, and the
engine discards the VM and rebuilds the state before that slot. The device
declares ``failures = "record"``, so the engine stores that slot's error as
its result and goes on from the state before it, as AO compute units do. An
error the script *reports* (a result with ``Error``) is a result like any
other, with its ``"error"`` key set; the VM's changes are kept.

Snapshots are the VM's heap (``sandbox.lua``): a new worker restores it into
a fresh sandbox without running the modules again. A heap that cannot be
written (it holds a coroutine, say) is snapshotted as the last heap that
could be and the messages computed since, which a boot replays (`LiveLua`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import trio

from .._exceptions import BlobNotFound
from .._message import id_of_bytes, message_id
from .._threaded import DEFAULT_CALL_TIMEOUT, ThreadedDevice, ThreadedLive
from ._errors import LuaModuleError, LuaSnapshotError
from ._iface import Process, message_fields, parse_result
from ._modules import ModuleRef, modules_of
from ._values import from_lua, lua_ready, to_lua
from ._vm import HOOK_INTERVAL, LuaVM, seed_of

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_MAX_MEMORY",
    "NAMES",
    "LiveLua",
    "LuaDevice",
    "LuaStats",
]

#: Bytes a VM may allocate, unless the device says otherwise.
DEFAULT_MAX_MEMORY: Final = 256 << 20
#: The names the engine registers the built-in device under.
NAMES: Final = ("lua@5.3",)


@attrs.frozen
class LuaStats:
    """`LuaDevice.statistics`: counted since the device was made."""

    #: VMs booted (new processes and restores), and live now (booted and not closed).
    booted: int
    restored: int
    live_instances: int
    #: Calls into VMs running now, in threads: an abandoned one counts until it has stopped.
    running: int


class LuaDevice(ThreadedDevice):
    """The Lua execution device (``lua@5.3``).

    Example::

        async with hbtrio.open_engine(devices={"lua@5.3": hbtrio.LuaDevice(
            max_memory=64 << 20, call_timeout=5.0)}) as engine:
            module = await engine.put_blob(Path("ledger.lua").read_bytes())
            pid = await engine.spawn({"device": "process@1.0",
                                      "execution-device": "lua@5.3", "module": module})

    Args:
        max_memory: bytes a VM may allocate; past it the call fails with
            `LuaMemoryError` (``pcall`` cannot catch it).
        call_timeout: seconds one call may run before the VM stops it; by
            default the engine's ``slot_timeout``, else 60.
        limiter: bounds the threads its calls run in (trio's default limiter
            otherwise).
        hook_interval: VM instructions between two checks of the deadline.

    One device serves every process that names it, from any number of
    engines in turn; a process's state is in its VM, never in the device.
    Thread-safe.
    """

    failures: Final = "record"

    def __init__(
        self,
        *,
        max_memory: int = DEFAULT_MAX_MEMORY,
        call_timeout: float | None = None,
        limiter: trio.CapacityLimiter | None = None,
        hook_interval: int = HOOK_INTERVAL,
    ) -> None:
        super().__init__(max_memory=max_memory, call_timeout=call_timeout, limiter=limiter)
        if hook_interval <= 0:
            raise ValueError("hook_interval must be positive")
        self.hook_interval = hook_interval
        self._booted = self._restored = self._live = self._running = 0  # guarded by _lock

    def __repr__(self) -> str:
        return f"<LuaDevice max_memory={self.max_memory >> 20} MiB timeout={self.timeout:g} s>"

    def statistics(self) -> LuaStats:
        with self._lock:
            return LuaStats(
                booted=self._booted,
                restored=self._restored,
                live_instances=self._live,
                running=self._running,
            )

    def _enter(self, delta: int) -> None:
        with self._lock:
            self._running += delta

    # booting --------------------------------------------------------------------------------

    async def boot(self, process: Mapping[str, Any], snapshot: Any) -> LiveLua:
        """A live VM of ``process``: its modules loaded, or ``snapshot`` restored.

        Checkpoints; the VM is made in a thread. Raises `LuaModuleError` (no
        code, a missing blob, a module that fails to load), `LuaSnapshotError`,
        or what getting a blob raised.
        """
        modules = modules_of(process)
        heap, replay = _parts(snapshot)
        # A heap holds the modules' code; without one, the modules are loaded anew.
        sources = [await self._source(m) for m in modules] if heap is None else []
        return await trio.to_thread.run_sync(
            self._boot,
            process,
            [m.id for m in modules],
            sources,
            heap,
            replay,
            limiter=self._limiter,
            abandon_on_cancel=True,
        )

    async def _source(self, module: ModuleRef) -> tuple[str, bytes]:
        if module.source is not None:
            return module.name, module.source
        what = f"module {module.id}"
        try:
            data = await self._get_blob(module.id, what, LuaModuleError)
        except BlobNotFound as exc:
            raise LuaModuleError(f"{what}: no such blob") from exc
        if id_of_bytes(data) != module.id:  # pragma: no cover - stores check blobs
            raise LuaModuleError(f"{what}: the blob's bytes do not match")
        return module.name, data

    def _boot(
        self,
        process: Mapping[str, Any],
        module_ids: list[str],
        sources: list[tuple[str, bytes]],
        heap: bytes | None,
        replay: Sequence[Mapping[str, Any]] = (),
    ) -> LiveLua:
        pid = message_id(process)
        timeout = self.timeout
        vm = LuaVM(max_memory=self.max_memory, hook_interval=self.hook_interval)
        live = LiveLua(self, vm, Process.of(process, pid, module_ids), heap)
        try:
            if heap is None:
                for name, source in sources:
                    _, _printed = vm.call(
                        "load_module", name.encode(), source, 0, seed_of(pid, name), timeout=timeout
                    )
            else:
                vm.restore(heap, timeout=timeout)
            for assignment in replay:
                live.compute_sync(assignment)
        except BaseException:
            vm.close()
            raise
        with self._lock:
            self._booted += 1
            self._restored += heap is not None or bool(replay)
            self._live += 1
        return live

    def _closed(self) -> None:
        with self._lock:
            self._live -= 1


def _parts(snapshot: object) -> tuple[bytes | None, list[Mapping[str, Any]]]:
    """A snapshot's heap (``None``: load the modules) and the messages to replay after it."""
    if snapshot is None:
        return None, []
    if isinstance(snapshot, bytes):
        return snapshot, []
    if isinstance(snapshot, Mapping) and isinstance(snapshot.get("replay"), list | tuple):
        heap = snapshot.get("lua-heap")
        if heap is None or isinstance(heap, bytes):
            return heap, list(snapshot["replay"])
    raise LuaSnapshotError("not a snapshot of hbtrio's Lua device")


class LiveLua(ThreadedLive[bytes | dict[str, Any]]):
    """One process's hot VM (the live instance of its worker). One call at a time.

    It keeps its last heap snapshot and the messages computed since: a heap
    that cannot be snapshotted (it holds a coroutine, say) is snapshotted as
    that heap and those messages, ``{"lua-heap": bytes | None, "replay":
    [assignment, ...], "reason": text}``, which a boot restores and replays.
    """

    def __init__(
        self, device: LuaDevice, vm: LuaVM, process: Process, heap: bytes | None = None
    ) -> None:
        self._device = device
        self._limiter = device._limiter
        self.vm = vm
        self.process = process
        self._env = lua_ready(process.env)
        self._closed = False
        self._heap = heap  # the last heap snapshot (None: the modules loaded anew)
        self._since: list[Mapping[str, Any]] = []  # messages computed since _heap

    def __repr__(self) -> str:
        return f"<LiveLua {self.process.id} {self.vm!r}>"

    def compute_sync(self, assignment: Mapping[str, Any]) -> dict[str, Any]:
        """`compute` in the calling thread. Blocks while the script runs."""
        vm, process = self.vm, self.process
        runtime = vm.runtime
        if runtime is None:
            raise LuaModuleError("the Lua VM is closed")
        msg = to_lua(runtime, lua_ready(message_fields(assignment, process)))
        env = to_lua(runtime, self._env)
        seed = seed_of(process.id, assignment["message-id"])
        device = self._device
        device._enter(1)
        try:
            answer, printed = vm.call(
                "handle", msg, env, assignment.get("timestamp", 0), seed, timeout=device.timeout
            )
            result = parse_result(from_lua(answer), printed, process)
        finally:
            device._enter(-1)
        self._since.append(assignment)
        return result

    def snapshot_sync(self) -> bytes | dict[str, Any]:
        """`snapshot` in the calling thread: the VM's heap (``sandbox.lua``), or the last heap
        and the messages since (see the class)."""
        device = self._device
        device._enter(1)
        try:
            heap = self.vm.snapshot(timeout=device.timeout)
        except LuaSnapshotError as exc:
            return {"lua-heap": self._heap, "replay": list(self._since), "reason": str(exc)}
        finally:
            device._enter(-1)
        self._heap, self._since = heap, []
        return heap

    def close(self) -> None:
        """Let the VM go (a call still running in a thread stops at its next hook). Idempotent."""
        if not self._closed:
            self._closed = True
            self.vm.close()
            self._device._closed()
