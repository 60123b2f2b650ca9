"""One instance of an image: its store, its imports, and the calls of the JSON interface.

Theory of operation
-------------------
A `WasmInstance` is a wasmtime instance in a store of its own, limited to
``max_memory`` bytes of linear memory (past it ``memory.grow`` fails, which
a module sees as running out of memory). Its imports are made from the
module's import list: every function returns zeros and does nothing, except

- ``fd_write``, which captures what is written to fd 1 and 2 (up to
  `MAX_OUTPUT` bytes each per call; the module is told all was written),
- ``fd_read``, which reads nothing (an empty stdin),
- ``clock_time_get``, which answers errno 1 and writes nothing, so that the
  module has no clock to read and stays deterministic,
- ``proc_exit``, which ends the call as a trap.

Iovecs and result pointers are 64-bit for memory64 signatures, 32-bit for
the others.

`handle` is one step of the JSON interface: ``malloc`` twice, the message and
the environment written as NUL-terminated JSON, ``handle(msg, env)``, and the
NUL-terminated JSON it returns, read. The input strings are never freed (the
module has no ``free`` to call): memory grows with every message, as on
HyperBEAM. `snapshot` and `restore` move the memory and the exported mutable
globals (and emscripten's stack pointer, when the module exports its
accessors) out of and into an instance.

Every call into the module (``malloc``, ``handle``, the stack accessors, a
start function) runs under an epoch deadline ``timeout`` seconds ahead, and
with ``fuel`` units of fuel when the device counts fuel. A call that traps or
times out leaves the instance *broken*: it refuses every later call, because
a failed call may have left the memory half-changed and the stack pointer
moved. One call at a time: a second call while one runs raises at once,
and `close` during a call lets the call end first.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import wasmtime

from ._errors import WasmError, WasmImageError, WasmInterfaceError, WasmTimeout, WasmTrap
from ._images import PAGE, STACK_GET, STACK_SET, Image
from ._runtime import EpochTicker, deadline_ticks
from ._snapshot import CODEC, FORMAT, bits_of, compress, decompress, value_of

__all__ = ["MAX_OUTPUT", "WasmInstance"]

#: Bytes of stdout (and of stderr) kept per call; the rest is dropped.
MAX_OUTPUT: Final = 1 << 20
WASI: Final = "wasi_snapshot_preview1"
_EFAULT: Final = 21
_E = TypeVar("_E")


def _raw_caller() -> Callable[[wasmtime.Store, wasmtime.Func, tuple[int, ...]], int] | None:
    """A call of an ``(i64...) -> i64?`` export without wasmtime-py's per-call type checks.

    wasmtime-py's ``Func.__call__`` looks the function's type up and converts
    every value on every call, 26 us where the call itself takes 4 (three
    calls a slot). This calls ``wasmtime_func_call_unchecked`` with the values
    laid out raw, as wasmtime-py does itself, through wasmtime-py's own ctypes
    bindings; the signatures were checked once, when the image was loaded.
    ``None`` when this wasmtime-py has no such bindings (the checked call is
    used then).
    """
    try:
        from wasmtime import _ffi
        from wasmtime._func import enter_wasm

        unchecked = _ffi.wasmtime_func_call_unchecked
        raw = _ffi.wasmtime_val_raw_t
    except (ImportError, AttributeError):  # pragma: no cover - another wasmtime-py
        return None

    def call(store: wasmtime.Store, func: wasmtime.Func, args: tuple[int, ...]) -> int:
        n = max(len(args), 1)
        values = (raw * n)()
        for i, a in enumerate(args):
            values[i].i64 = a
        with enter_wasm(store) as trap:
            error = unchecked(store._context(), ctypes.byref(func._func), values, n, trap)
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)
        return values[0].i64

    return call


def _checked_call(store: wasmtime.Store, func: wasmtime.Func, args: tuple[int, ...]) -> int:
    return func(store, *args)  # type: ignore[no-any-return]


_call = _raw_caller() or _checked_call


class _Exit(Exception):
    """``proc_exit`` was called: ends the call (a control-flow signal out of an import)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _export(exports: Mapping[str, object], name: str, kind: type[_E]) -> _E:
    found = exports[name]
    assert isinstance(found, kind), f"{name} is a {type(found).__name__}"  # checked by check()
    return found


def _zero(kind: str) -> Any:
    if kind in ("f32", "f64"):
        return 0.0
    if kind in ("i32", "i64"):
        return 0
    return None  # a reference: null


class WasmInstance:
    """One instance of ``image`` (see the module). Not thread-safe: one call at a time."""

    def __init__(
        self,
        image: Image,
        engine: wasmtime.Engine,
        ticker: EpochTicker,
        *,
        max_memory: int,
        timeout: float,
        fuel: int | None = None,
    ) -> None:
        self.image = image
        self.timeout = timeout
        self.max_memory = max_memory
        self._ticker = ticker
        self._ticks = deadline_ticks(timeout)
        self._fuel = fuel
        self._lock = threading.Lock()
        #: Why the instance is broken (a call failed), or ``None``.
        self.broken: str | None = None
        self.closed = False
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._exit_code: int | None = None
        store = wasmtime.Store(engine)
        store.set_limits(memory_size=max_memory)
        self._store: wasmtime.Store | None = store
        imports = [self._make_import(store, imp) for imp in image.imports]
        if image.initial_memory > max_memory:
            raise WasmImageError(
                f"image {image.id} starts with {image.initial_memory >> 20} MiB of memory, over "
                f"the limit of {max_memory >> 20} MiB"
            )
        with self._lock, self._calling():
            instance = wasmtime.Instance(store, image.module, imports)
        exports = instance.exports(store)
        self._memory = _export(exports, "memory", wasmtime.Memory)
        self._malloc = _export(exports, "malloc", wasmtime.Func)
        self._handle = _export(exports, "handle", wasmtime.Func)
        self._globals = [
            (name, kind, _export(exports, name, wasmtime.Global)) for name, kind in image.globals
        ]
        self._stack = (
            (_export(exports, STACK_GET, wasmtime.Func), _export(exports, STACK_SET, wasmtime.Func))
            if image.stack
            else None
        )
        self._size: int = self._memory.data_len(store)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "broken" if self.broken else "live"
        return f"<WasmInstance {self.image.id} {state}>"

    # imports ------------------------------------------------------------------------------------

    def _make_import(self, store: wasmtime.Store, imp: wasmtime.ImportType) -> wasmtime.Func:
        ft = imp.type
        assert isinstance(ft, wasmtime.FuncType)
        params = tuple(str(p) for p in ft.params)
        results = tuple(str(r) for r in ft.results)
        if imp.module == WASI and imp.name is not None:
            special = self._wasi(imp.name, params, results)
            if special is not None:
                return wasmtime.Func(store, ft, special, access_caller=True)
        zeros = tuple(_zero(r) for r in results)
        value: Any = None if not zeros else zeros[0] if len(zeros) == 1 else list(zeros)

        def stub(*args: Any) -> Any:
            return value

        return wasmtime.Func(store, ft, stub)

    def _wasi(
        self, name: str, params: tuple[str, ...], results: tuple[str, ...]
    ) -> Callable[..., Any] | None:
        if name == "proc_exit":

            def proc_exit(caller: wasmtime.Caller, code: int, *rest: Any) -> None:
                self._exit_code = code
                raise _Exit(code)

            return proc_exit
        if results != ("i32",):
            return None
        wide = len(params) == 4 and params[1:] == ("i64", "i64", "i64")
        if name == "fd_write" and (wide or params == ("i32",) * 4):
            return self._fd_write(wide)
        if name == "fd_read" and (wide or params == ("i32",) * 4):
            return self._fd_read(wide)
        if name == "clock_time_get":
            return lambda caller, *args: 1
        return None

    def _fd_write(self, wide: bool) -> Callable[..., int]:
        size = 8 if wide else 4

        def fd_write(caller: wasmtime.Caller, fd: int, iovs: int, count: int, out: int) -> int:
            memory = caller["memory"]
            assert isinstance(memory, wasmtime.Memory)
            end = memory.data_len(caller)
            if count < 0 or iovs < 0 or iovs + 2 * size * count > end or not 0 <= out <= end - size:
                return _EFAULT
            sink = self.stdout if fd == 1 else self.stderr if fd == 2 else None
            table = memory.read(caller, iovs, iovs + 2 * size * count)
            written = 0
            for k in range(count):
                base = 2 * size * k
                ptr = int.from_bytes(table[base : base + size], "little")
                length = int.from_bytes(table[base + size : base + 2 * size], "little")
                if ptr + length > end:
                    return _EFAULT
                if sink is not None and len(sink) < MAX_OUTPUT:
                    keep = min(length, MAX_OUTPUT - len(sink))
                    sink += memory.read(caller, ptr, ptr + keep)
                written += length
            memory.write(caller, written.to_bytes(size, "little"), out)
            return 0

        return fd_write

    def _fd_read(self, wide: bool) -> Callable[..., int]:
        size = 8 if wide else 4

        def fd_read(caller: wasmtime.Caller, fd: int, iovs: int, count: int, out: int) -> int:
            memory = caller["memory"]
            assert isinstance(memory, wasmtime.Memory)
            if not 0 <= out <= memory.data_len(caller) - size:
                return _EFAULT
            memory.write(caller, bytes(size), out)
            return 0

        return fd_read

    # calls --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _use(self) -> Iterator[wasmtime.Store]:
        """Hold the instance for one operation; raises if it is busy, broken or closed."""
        if not self._lock.acquire(blocking=False):
            raise WasmError(f"{self!r} is busy: one call at a time")
        try:
            if self.closed or self._store is None:
                raise WasmError(f"{self!r} is closed")
            if self.broken is not None:
                raise WasmError(f"{self!r} is broken since a call failed: {self.broken}")
            yield self._store
        finally:
            if self.closed:
                self._drop()
            self._lock.release()

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        """Around calls into the module: the deadline, the fuel, and traps mapped to one line."""
        store = self._store
        assert store is not None
        store.set_epoch_deadline(self._ticks)
        if self._fuel is not None:
            store.set_fuel(self._fuel)
        try:
            with self._ticker.running():
                yield
        except wasmtime.Trap as trap:
            if self._exit_code is not None:
                self.broken = f"the module called proc_exit({self._exit_code})"
                raise WasmTrap(self.broken) from None
            self.broken = self._trap_line(trap)
            kind = WasmTimeout if trap.trap_code == wasmtime.TrapCode.INTERRUPT else WasmTrap
            raise kind(self.broken) from None
        except _Exit:  # wasmtime-py hands a host's exception to whichever thread traps next
            self.broken = (
                "wasm trap"
                if self._exit_code is None
                else f"the module called proc_exit({self._exit_code})"
            )
            raise WasmTrap(self.broken) from None
        except wasmtime.WasmtimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            self.broken = f"wasm error: {lines[0] if lines else exc!r}"
            raise WasmTrap(self.broken) from None
        except BaseException as exc:
            self.broken = f"the call failed: {exc!r}"
            raise

    def _trap_line(self, trap: wasmtime.Trap) -> str:
        code = trap.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            return f"wasm call exceeded {self.timeout:g} s"
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return f"wasm call ran out of fuel ({self._fuel} units)"
        lines = [line.strip() for line in trap.message.splitlines() if line.strip()]
        causes = [re.sub(r"^\d+: ", "", line) for line in lines if "wasm trap" in line]
        what = causes[-1] if causes else f"wasm trap: {code.name.lower() if code else 'trap'}"
        frames = trap.frames
        if frames:
            frame = frames[0]
            where = frame.func_name or f"function {frame.func_index}"
            what = f"{what} in {where}"
        return what

    def handle(self, message: bytes, env: bytes) -> bytes:
        """One call of the JSON interface: the JSON the module returns for ``message`` and ``env``.

        Blocks while the module runs. Raises `WasmTrap`, `WasmTimeout` or
        `WasmInterfaceError` (the instance is then broken).
        """
        with self._use() as store:
            self.stdout.clear()
            self.stderr.clear()
            try:
                with self._calling():
                    msg = self._put(store, message)
                    envp = self._put(store, env)
                    result = _call(store, self._handle, (msg, envp))
                    return self._read_string(store, result)
            finally:
                self._size = self._memory.data_len(store)

    def _put(self, store: wasmtime.Store, data: bytes) -> int:
        n = len(data) + 1
        ptr = _call(store, self._malloc, (n,))
        if not isinstance(ptr, int) or ptr <= 0:
            self.broken = f"malloc({n}) returned {ptr}: the module is out of memory"
            raise WasmInterfaceError(self.broken)
        size = self._memory.data_len(store)
        if ptr + n > size:
            self.broken = f"malloc({n}) returned {ptr}, past the end of memory ({size})"
            raise WasmInterfaceError(self.broken)
        base = ctypes.addressof(self._memory.data_ptr(store).contents)
        ctypes.memmove(base + ptr, data + b"\0", n)
        return ptr

    def _read_string(self, store: wasmtime.Store, ptr: object) -> bytes:
        size = self._memory.data_len(store)
        if not isinstance(ptr, int) or not 0 < ptr < size:
            self.broken = f"handle returned {ptr!r}, not a pointer into memory ({size} bytes)"
            raise WasmInterfaceError(self.broken)
        chunks: list[bytes] = []
        at, step = ptr, 4096
        while at < size:
            chunk = bytes(self._memory.read(store, at, min(at + step, size)))
            nul = chunk.find(0)
            if nul >= 0:
                chunks.append(chunk[:nul])
                return b"".join(chunks)
            chunks.append(chunk)
            at += len(chunk)
            step = min(step * 4, 1 << 24)
        self.broken = f"handle's result at {ptr} has no NUL before the end of memory"
        raise WasmInterfaceError(self.broken)

    # snapshots ----------------------------------------------------------------------------------

    @property
    def memory_size(self) -> int:
        """Bytes of linear memory, as of the end of the last call (or restore). Never blocks.

        Safe from any thread, also while a call runs (it reads no store).
        """
        return self._size

    def snapshot(self) -> dict[str, Any]:
        """The instance's state as a snapshot message (`_snapshot`). Blocks for milliseconds."""
        with self._use() as store:
            size = self._memory.data_len(store)
            memory = compress(self._memory.get_buffer_ptr(store, size))
            globals_ = {name: bits_of(kind, g.value(store)) for name, kind, g in self._globals}
            stack = None
            if self._stack is not None:
                with self._calling():
                    stack = _call(store, self._stack[0], ())
        return {
            "format": FORMAT,
            "image": self.image.id,
            "codec": CODEC,
            "size": size,
            "memory": memory,
            "globals": globals_,
            "stack-pointer": stack,
        }

    def restore(self, snapshot: Any) -> None:
        """Put a snapshot's state into this (fresh) instance. Raises `WasmError`."""
        if snapshot.get("image") != self.image.id:
            raise WasmError(
                f"the snapshot is of image {snapshot.get('image')}, not of {self.image.id}"
            )
        memory = decompress(snapshot)
        with self._use() as store:
            have = self._memory.data_len(store)
            if len(memory) < have:
                raise WasmError(
                    f"the snapshot's memory ({len(memory)} bytes) is smaller than a fresh "
                    f"instance's ({have})"
                )
            if len(memory) > have:
                if len(memory) > self.max_memory:
                    raise WasmError(
                        f"the snapshot's memory ({len(memory) >> 20} MiB) is over this "
                        f"instance's limit ({self.max_memory >> 20} MiB)"
                    )
                try:
                    self._memory.grow(store, (len(memory) - have) // PAGE)
                except wasmtime.WasmtimeError as exc:
                    raise WasmError(f"cannot grow memory to the snapshot's size: {exc}") from None
            base = ctypes.addressof(self._memory.data_ptr(store).contents)
            ctypes.memmove(base, memory, len(memory))
            self._size = len(memory)
            saved = snapshot.get("globals") or {}
            for name, kind, g in self._globals:
                if name in saved:
                    g.set_value(store, value_of(kind, saved[name]))
            stack = snapshot.get("stack-pointer")
            if stack is not None and self._stack is not None:
                with self._calling():
                    _call(store, self._stack[1], (stack,))

    # closing ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Let the instance go (at the end of a call still running). Idempotent; never blocks."""
        self.closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()

    def _drop(self) -> None:
        self._store = None
        self._globals = []
        self._stack = None
