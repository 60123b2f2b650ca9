"""The exceptions of the Lua device: each says in one line what happened.

They are a device's failures, which the engine reports as the cause of a
`ComputeError` (or records as a slot's error, for a process that records
failures); like every error hbtrio exports, they are `HbTrioError` subclasses.
"""

from __future__ import annotations

import trio

from .._exceptions import HbTrioError

__all__ = [
    "LuaError",
    "LuaMemoryError",
    "LuaModuleError",
    "LuaResultError",
    "LuaScriptError",
    "LuaSnapshotError",
    "LuaTimeout",
]


class LuaError(HbTrioError):
    """Something went wrong in the Lua device (the base of the others)."""


class LuaModuleError(LuaError, ValueError):
    """A process's modules cannot be had or loaded: none named, a missing blob, a syntax error."""


class LuaScriptError(LuaError):
    """The script raised a Lua error that nothing caught (its text is the error's)."""


class LuaTimeout(LuaError, trio.TooSlowError):
    """A call into the VM ran past its deadline and was stopped."""


class LuaMemoryError(LuaError, MemoryError):
    """The VM needed more memory than its ``max_memory``."""


class LuaResultError(LuaError):
    """``handle`` returned something that is not the result form (a function, a cycle, ...)."""


class LuaSnapshotError(LuaError):
    """The VM's heap holds something a snapshot cannot keep (a coroutine, say), or a snapshot
    cannot be restored."""
