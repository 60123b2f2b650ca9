"""The Lua execution device: AO processes written in Lua 5.3, hot in their workers.

Modules, by what they hold:

- `_device`: `LuaDevice`, the live device, and `LiveLua`, a process's instance
  (on `hbtrio._threaded`'s bases, shared with the WASM device);
- `_vm`: one sandboxed VM (lupa's Lua 5.3) and the calls into it, under deadlines;
- ``sandbox.lua``: the sandbox itself, deterministic iteration, snapshots of the heap;
- `_iface`: the message a script gets and the result made of its answer, pure:
  the forms of `hbtrio._aoiface` as Lua tables;
- `_values`: Lua values to message values, in a fixed key order;
- `_modules`: where a definition's code is (blob IDs, module messages, a script);
- `_errors`: the device's exceptions.

Importing this package does not import lupa (an optional dependency,
``pip install 'hbtrio[lua]'``); booting a process does.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Final

from ._device import NAMES, LiveLua, LuaDevice, LuaStats
from ._errors import (
    LuaError,
    LuaMemoryError,
    LuaModuleError,
    LuaResultError,
    LuaScriptError,
    LuaSnapshotError,
    LuaTimeout,
)

__all__ = [
    "MISSING",
    "NAMES",
    "LiveLua",
    "LuaDevice",
    "LuaError",
    "LuaMemoryError",
    "LuaModuleError",
    "LuaResultError",
    "LuaScriptError",
    "LuaSnapshotError",
    "LuaStats",
    "LuaTimeout",
    "available",
    "builtin_devices",
]

#: Why the Lua device is missing when its dependency is.
MISSING: Final = "the Lua device needs lupa: pip install 'hbtrio[lua]'"


@functools.cache
def available() -> bool:
    """Whether the Lua device's dependency (lupa, with its Lua 5.3 module) is installed."""
    try:
        return importlib.util.find_spec("lupa.lua53") is not None
    except ImportError:
        return False


def builtin_devices() -> dict[str, object]:
    """The built-in Lua device (one `LuaDevice` under every name of `NAMES`), or none."""
    if not available():
        return {}
    device = LuaDevice()
    return dict.fromkeys(NAMES, device)
