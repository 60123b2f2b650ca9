"""The exceptions of the WASM device: each says in one line what happened.

They are a device's failures, which the engine reports as the cause of a
`ComputeError` (or records as a slot's error, for a process that records
failures); like every error hbtrio exports, they are `HbTrioError` subclasses.
"""

from __future__ import annotations

import trio

from .._exceptions import HbTrioError

__all__ = ["WasmError", "WasmImageError", "WasmInterfaceError", "WasmTimeout", "WasmTrap"]


class WasmError(HbTrioError):
    """Something went wrong in the WASM device (the base of the others)."""


class WasmImageError(WasmError, ValueError):
    """An image that cannot run: not WASM, does not compile, or not the JSON interface."""


class WasmTrap(WasmError):
    """A call into the module trapped (``unreachable``, out of bounds, out of fuel, ...)."""


class WasmTimeout(WasmError, trio.TooSlowError):
    """A call into the module ran past its deadline and was interrupted."""


class WasmInterfaceError(WasmError):
    """The module broke the JSON interface (a bad pointer, a result that is not the form)."""
