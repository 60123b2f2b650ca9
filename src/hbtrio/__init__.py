"""hbtrio: AO-style process workers on Trio.

One long-lived worker per process keeps its state in memory, computes slot
after slot and fans each slot's result out to every task waiting for it;
structured concurrency makes sure nothing leaks, hangs or gets corrupted when
callers cancel, time out or crash. See ``docs/`` and the README.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._codec import decode as decode
from ._codec import encode as encode
from ._dedup import ExecutionInfo as ExecutionInfo
from ._devices import Counter as Counter
from ._devices import DeviceHost as DeviceHost
from ._devices import run_in_thread as run_in_thread
from ._driver import Driver as ProcessRuntime
from ._driver import compute_slot as compute_slot
from ._engine import Engine as Engine
from ._engine import EngineStats as EngineStats
from ._engine import open_engine as open_engine
from ._exceptions import BlobNotFound as BlobNotFound
from ._exceptions import CatchingUp as CatchingUp
from ._exceptions import ComputeError as ComputeError
from ._exceptions import EngineClosed as EngineClosed
from ._exceptions import HbTrioError as HbTrioError
from ._exceptions import InternalError as InternalError
from ._exceptions import InvalidMessage as InvalidMessage
from ._exceptions import LeaderDied as LeaderDied
from ._exceptions import Overloaded as Overloaded
from ._exceptions import ProcessNotFound as ProcessNotFound
from ._exceptions import SlotNotScheduled as SlotNotScheduled
from ._exceptions import StoreError as StoreError
from ._exceptions import StoreFenced as StoreFenced
from ._exceptions import UnknownDevice as UnknownDevice
from ._lua import LuaDevice as LuaDevice
from ._lua import LuaError as LuaError
from ._lua import LuaMemoryError as LuaMemoryError
from ._lua import LuaModuleError as LuaModuleError
from ._lua import LuaResultError as LuaResultError
from ._lua import LuaScriptError as LuaScriptError
from ._lua import LuaSnapshotError as LuaSnapshotError
from ._lua import LuaStats as LuaStats
from ._lua import LuaTimeout as LuaTimeout
from ._message import FrozenList as FrozenList
from ._message import Message as Message
from ._message import freeze as freeze
from ._message import message_id as message_id
from ._scheduler import Scheduler as Scheduler
from ._scheduler import verify_schedule as verify_schedule
from ._sqlite import SQLiteStore as SQLiteStore
from ._store import FastPath as FastPath
from ._store import MemoryStore as MemoryStore
from ._store import SlotResult as SlotResult
from ._store import Store as Store
from ._store import StoreStatistics as StoreStatistics
from ._wasm import WasmDevice as WasmDevice
from ._wasm import WasmError as WasmError
from ._wasm import WasmImageError as WasmImageError
from ._wasm import WasmInterfaceError as WasmInterfaceError
from ._wasm import WasmStats as WasmStats
from ._wasm import WasmTimeout as WasmTimeout
from ._wasm import WasmTrap as WasmTrap
from ._worker import WorkerInfo as WorkerInfo

if _TYPE_CHECKING:
    from ._postgres import PostgresStore as PostgresStore

__all__ = [
    "BlobNotFound",
    "CatchingUp",
    "ComputeError",
    "Counter",
    "DeviceHost",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "ExecutionInfo",
    "FastPath",
    "FrozenList",
    "HbTrioError",
    "InternalError",
    "InvalidMessage",
    "LeaderDied",
    "LuaDevice",
    "LuaError",
    "LuaMemoryError",
    "LuaModuleError",
    "LuaResultError",
    "LuaScriptError",
    "LuaSnapshotError",
    "LuaStats",
    "LuaTimeout",
    "MemoryStore",
    "Message",
    "Overloaded",
    "PostgresStore",
    "ProcessNotFound",
    "ProcessRuntime",
    "SQLiteStore",
    "Scheduler",
    "SlotNotScheduled",
    "SlotResult",
    "Store",
    "StoreError",
    "StoreFenced",
    "StoreStatistics",
    "UnknownDevice",
    "WasmDevice",
    "WasmError",
    "WasmImageError",
    "WasmInterfaceError",
    "WasmStats",
    "WasmTimeout",
    "WasmTrap",
    "WorkerInfo",
    "__version__",
    "compute_slot",
    "decode",
    "encode",
    "freeze",
    "message_id",
    "open_engine",
    "run_in_thread",
    "verify_schedule",
]

__version__ = "0.1.0"

# Present public names as hbtrio's own (tracebacks, reprs, docs).
for _name, _obj in list(globals().items()):
    if not _name.startswith("_") and getattr(_obj, "__module__", "").startswith("hbtrio._"):
        try:
            _obj.__module__ = "hbtrio"
        except (AttributeError, TypeError):  # pragma: no cover - builtins
            pass
del _name, _obj

#: Public names whose modules need an optional dependency: imported on first use.
_OPTIONAL = {"PostgresStore": ("._postgres", "psycopg", "postgres")}


def __getattr__(name: str) -> object:
    try:
        module, needs, extra = _OPTIONAL[name]
    except KeyError:
        raise AttributeError(f"module 'hbtrio' has no attribute {name!r}") from None
    import importlib

    try:
        obj = getattr(importlib.import_module(module, __name__), name)
    except ImportError as exc:
        raise ImportError(
            f"hbtrio.{name} needs {needs}, which is not installed: "
            f"pip install 'hbtrio[{extra}]' ({exc})"
        ) from exc
    obj.__module__ = "hbtrio"
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted({*globals(), *_OPTIONAL})
