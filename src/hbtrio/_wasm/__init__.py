"""The WASM execution device: AO processes (aos) run as hot hbtrio workers.

Modules, by what they hold:

- `_device`: `WasmDevice`, the live device, and `LiveWasm`, a process's instance
  (on `hbtrio._threaded`'s bases, shared with the Lua device);
- `_iface`: the JSON interface (messages in, results out), pure: the forms of
  `hbtrio._aoiface` as JSON;
- `_instance`: one wasmtime instance: imports, calls, snapshots;
- `_images`: images by ID, checked and compiled once (and cached on disk);
- `_exnref`: legacy exception handling, translated with binaryen's wasm-opt;
- `_snapshot`: the snapshot form and its compression;
- `_runtime`: the wasmtime engine and the epoch ticker that bounds calls;
- `_errors`: the device's exceptions.

Importing this package does not import wasmtime (an optional dependency,
``pip install 'hbtrio[wasm]'``); booting a process does.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Final

from ._device import NAMES, WasmDevice, WasmStats
from ._errors import WasmError, WasmImageError, WasmInterfaceError, WasmTimeout, WasmTrap

__all__ = [
    "MISSING",
    "NAMES",
    "WasmDevice",
    "WasmError",
    "WasmImageError",
    "WasmInterfaceError",
    "WasmStats",
    "WasmTimeout",
    "WasmTrap",
    "available",
    "builtin_devices",
]

#: Why the WASM devices are missing when their dependencies are.
MISSING: Final = "the WASM devices need wasmtime and zstandard: pip install 'hbtrio[wasm]'"


@functools.cache
def available() -> bool:
    """Whether the WASM devices' dependencies are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("wasmtime", "zstandard"))


def builtin_devices() -> dict[str, object]:
    """The built-in WASM devices (one `WasmDevice` under every name of `NAMES`), or none."""
    if not available():
        return {}
    device = WasmDevice()
    return dict.fromkeys(NAMES, device)
