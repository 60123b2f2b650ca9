"""One Lua 5.3 VM in hbtrio's sandbox (lupa), and the calls the device makes into it.

Theory of operation
-------------------
`LuaVM` makes a ``lupa.lua53.LuaRuntime`` with no Python in reach of Lua
(no ``python.eval``, no builtins, every attribute access of a host object
refused, ``python`` removed from the globals), a memory limit
(``max_memory``) and strings as bytes, then runs ``sandbox.lua`` in it, which
changes the globals into the sandbox and hands back the host's private
functions (docs/lua.md lists what the sandbox keeps and changes).

Every call (`load_module`, `handle`, `snapshot`, `restore`) has a deadline.
The sandbox's debug hook runs every `HOOK_INTERVAL` VM instructions, in every
coroutine, and asks `_Limits.check` whether to stop: past the deadline, or
once the VM is closed. Then the call raises an error that ``pcall`` cannot
catch, and `LuaTimeout` comes out here (the same for memory: `LuaMemoryError`).
The hook cannot stop one long call into C (a huge ``string.rep`` is bounded by
memory, but a pathological pattern match runs to its end).

**Threads.** The VM is used by one thread at a time (lupa locks it). `close`
never touches the VM: it only sets the flag the hook reads, so it is safe
while an abandoned call still runs in another thread; that call stops at its
next hook, and the VM is freed when the last reference to it goes.
"""

from __future__ import annotations

import hashlib
import math
import time
from importlib import resources
from typing import Any, Final

from ._errors import LuaError, LuaMemoryError, LuaScriptError, LuaSnapshotError, LuaTimeout

__all__ = ["HOOK_INTERVAL", "LuaVM", "seed_of"]

#: VM instructions between two checks of the deadline (a check costs about a microsecond).
HOOK_INTERVAL: Final = 10_000


def _sandbox_source() -> bytes:
    return resources.files(__package__).joinpath("sandbox.lua").read_bytes()


_SANDBOX: bytes | None = None


def seed_of(*parts: str) -> int:
    """A 64-bit signed seed for ``math.random`` from text (the process and message IDs)."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


#: Bytes of the BLAKE2b digest in front of a snapshot's heap.
DIGEST_SIZE: Final = 16


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def _no_attributes(obj: object, name: object, is_setting: bool) -> object:
    raise AttributeError("host objects have no attributes in hbtrio's Lua sandbox")


class _Limits:
    """What the hook reads: kept apart, so the VM holds it and not the other way round."""

    __slots__ = ("closed", "deadline", "stop")

    def __init__(self) -> None:
        self.deadline = math.inf
        self.closed = False
        self.stop: str | None = None  # why the running call was stopped

    def check(self) -> bool:
        if self.closed:
            self.stop = "closed"
            return True
        if time.monotonic() > self.deadline:
            self.stop = "timeout"
            return True
        return False


class LuaVM:
    """A sandboxed Lua 5.3 VM. Blocking; one thread at a time, except `close`."""

    def __init__(self, *, max_memory: int, hook_interval: int = HOOK_INTERVAL) -> None:
        global _SANDBOX
        from lupa import lua53

        if _SANDBOX is None:
            _SANDBOX = _sandbox_source()
        self.max_memory = max_memory
        self._limits = _Limits()
        self._lupa = lua53
        runtime = lua53.LuaRuntime(
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=False,
            attribute_filter=_no_attributes,
            max_memory=max_memory,
        )
        self.runtime: Any = runtime
        try:
            host = runtime.execute(_SANDBOX, self._limits.check, hook_interval)
        except lua53.LuaMemoryError:
            raise LuaMemoryError(self._no_memory()) from None
        self._host: dict[str, Any] | None = {
            name: host[name.encode()] for name in ("load_module", "handle", "snapshot", "restore")
        }

    def __repr__(self) -> str:
        state = "closed" if self._limits.closed else f"{self.memory_used() >> 10} KiB"
        return f"<LuaVM {state}>"

    def memory_used(self) -> int:
        runtime = self.runtime
        return 0 if runtime is None else int(runtime.get_memory_used())

    def _no_memory(self) -> str:
        return f"the Lua VM ran out of its max_memory ({self.max_memory / (1 << 20):g} MiB)"

    def call(self, name: str, *args: Any, timeout: float) -> tuple[Any, str]:
        """Call the host's ``name`` with ``args`` under a deadline: (its result, what it printed).

        Raises `LuaScriptError` (a Lua error nothing caught), `LuaTimeout`,
        `LuaMemoryError` or `LuaError` (the VM was closed).
        """
        limits, host = self._limits, self._host
        if limits.closed or host is None:
            raise LuaError("the Lua VM is closed")
        limits.stop = None
        limits.deadline = time.monotonic() + timeout
        try:
            ok, value, printed = host[name](*args)
        except self._lupa.LuaMemoryError:
            raise LuaMemoryError(self._no_memory()) from None
        except self._lupa.LuaError as exc:  # an error in the host's own part: its first line
            ok, value, printed = False, str(exc).splitlines()[0].encode(), b""
        finally:
            limits.deadline = math.inf
        if not ok:
            raise self._failure(value, timeout)
        return value, printed.decode(errors="replace")

    def _failure(self, value: object, timeout: float) -> LuaError:
        stop = self._limits.stop
        if stop == "timeout":
            return LuaTimeout(f"the Lua call ran past its deadline ({timeout:g} s) and was stopped")
        if stop == "closed":
            return LuaError("the Lua VM was closed while it ran")
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if text == "not enough memory":
            return LuaMemoryError(self._no_memory())
        return LuaScriptError(text)

    def snapshot(self, *, timeout: float) -> bytes:
        """The VM's heap as bytes (see ``sandbox.lua``), behind a digest of them.

        Raises `LuaSnapshotError` (the heap holds what a snapshot cannot keep), ...
        """
        try:
            data, _ = self.call("snapshot", timeout=timeout)
        except LuaScriptError as exc:
            raise LuaSnapshotError(f"cannot snapshot the Lua VM: {exc}") from None
        return _digest(data) + bytes(data)

    def restore(self, snapshot: bytes, *, timeout: float) -> None:
        """Refill a new VM's heap from `snapshot`'s bytes. Raises `LuaSnapshotError`, ...

        The digest is checked first: the heap holds bytecode, which Lua loads
        without checking it, so damaged bytes never reach the VM.
        """
        head, data = snapshot[:DIGEST_SIZE], snapshot[DIGEST_SIZE:]
        if len(head) < DIGEST_SIZE or _digest(data) != head:
            raise LuaSnapshotError("not a snapshot of hbtrio's Lua device, or a damaged one")
        try:
            self.call("restore", data, timeout=timeout)
        except LuaScriptError as exc:
            raise LuaSnapshotError(f"cannot restore the Lua VM: {exc}") from None

    def close(self) -> None:
        """Stop any call at its next hook and let the VM go. Never blocks; idempotent."""
        self._limits.closed = True
        self._host = None
        self.runtime = None
