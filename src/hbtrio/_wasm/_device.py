"""`WasmDevice`: AO processes whose code is a WASM module driven through the JSON interface.

Theory of operation
-------------------
A `WasmDevice` is a *live device* (see `hbtrio._core`): ``boot(process,
snapshot)`` gives a `LiveWasm`, the instance a process's worker keeps hot
slot after slot, snapshots every ``cache_frequency`` slots and throws away
after any failure. Nothing of it runs WASM on the event loop:

- ``boot`` is async: it gets the image's bytes (a blob, through the host the
  engine attached with ``attach``, or bytes in the definition itself), then
  compiles (once per image: `_images`), instantiates and restores in a
  thread;
- ``compute``, ``compute_many`` and ``snapshot`` are async and run in
  threads (`hbtrio._threaded`); ``close`` is plain and never blocks.

Each call into the module is bounded by an epoch deadline (`_runtime`): the
device's ``call_timeout``, else the engine's ``slot_timeout``, else
`DEFAULT_CALL_TIMEOUT`. So a thread the engine abandons at its
``slot_timeout`` stops by itself too, instead of burning a core for ever.

A call that traps, times out, exceeds its fuel or breaks the interface
raises (`WasmTrap`, `WasmTimeout`, `WasmInterfaceError`): the slot fails,
the engine discards the instance and rebuilds the state before that slot.
The device declares ``failures = "record"``: an engine that records failures
stores that slot's error as its result and goes on from the state before it.
An error the module *reports* (aos's ``Error``, or ``"ok": false``) is a
result like any other, with its ``"error"`` key set; the memory is kept.

Definitions
-----------
The short shape: ``{"device": "process@1.0", "execution-device":
"wasm-64@1.0", "image": <blob ID or the module's bytes>, ...}``. HyperBEAM's
aos shape runs unchanged: ``"execution-device": "stack@1.0"`` with a
``"device-stack"`` of ``WASI@1.0``, ``JSON-Iface@1.0``, ``WASM-64@1.0`` and
``Multipass@1.0`` (any case; WASI and Multipass may be left out); its other
keys (``passes``, ``output-prefix``, ``stack-keys``, ...) are passed to the
module as tags and otherwise ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._message import message_id
from .._threaded import DEFAULT_CALL_TIMEOUT, ThreadedDevice, ThreadedLive
from ._errors import WasmImageError
from ._iface import Process, message_json, parse_result

if TYPE_CHECKING:
    import wasmtime

    from ._images import ImageCache
    from ._instance import WasmInstance
    from ._runtime import EpochTicker

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_MAX_MEMORY",
    "NAMES",
    "LiveWasm",
    "WasmDevice",
    "WasmStats",
    "default_cache_dir",
]

#: Bytes of linear memory an instance may have, unless the device says otherwise.
DEFAULT_MAX_MEMORY: Final = 256 << 20
#: The names the engine registers the built-in device under.
NAMES: Final = ("wasm-64@1.0", "stack@1.0")
#: The device stack of HyperBEAM's aos processes that ``stack@1.0`` runs (lower case).
STACK: Final = ("wasi@1.0", "json-iface@1.0", "wasm-64@1.0", "multipass@1.0")
_OPTIONAL: Final = frozenset({"wasi@1.0", "multipass@1.0"})
CACHE_ENV: Final = "HBTRIO_WASM_CACHE"


def default_cache_dir() -> Path | None:
    """``$HBTRIO_WASM_CACHE`` (``off`` for none), else ``$XDG_CACHE_HOME/hbtrio/wasm``."""
    named = os.environ.get(CACHE_ENV)
    if named is not None:
        return None if named.strip().lower() in ("", "off", "0", "no", "false") else Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hbtrio" / "wasm"


_DEFAULT: Final[Any] = object()


@attrs.frozen
class WasmStats:
    """`WasmDevice.statistics`: counted since the device was made."""

    #: Images compiled in memory now.
    images: int
    #: Images compiled, read from the on-disk cache, translated from legacy exception handling.
    compiled: int
    deserialized: int
    translated: int
    #: Instances booted, and live now (booted and not closed).
    booted: int
    live_instances: int


@attrs.define(eq=False)
class _Runtime:
    engine: wasmtime.Engine
    ticker: EpochTicker
    images: ImageCache


def _stack_of(process: Mapping[str, Any]) -> None:
    """Check HyperBEAM's ``device-stack`` for a ``stack@1.0`` definition; raises one line."""
    stack = process.get("device-stack")
    if isinstance(stack, Mapping):
        stack = [stack[k] for k in sorted(stack, key=lambda k: (len(k), k))]
    names = (
        [s.lower() for s in stack if isinstance(s, str)] if isinstance(stack, list | tuple) else []
    )
    required = [n for n in names if n not in _OPTIONAL]
    in_order = [n for n in STACK if n in names]
    if len(names) != len(stack or ()) or required != list(STACK[1:3]) or names != in_order:
        raise WasmImageError(
            f"device-stack {stack!r} is not one hbtrio runs: stack@1.0 runs WASI@1.0, "
            "JSON-Iface@1.0, WASM-64@1.0 and Multipass@1.0 (WASI and Multipass optional)"
        )


class WasmDevice(ThreadedDevice):
    """The WASM execution device (``wasm-64@1.0``, and HyperBEAM's ``stack@1.0`` shape).

    Example::

        async with hbtrio.open_engine(devices={"wasm-64@1.0": hbtrio.WasmDevice(
            max_memory=512 << 20, call_timeout=5.0)}) as engine:
            image = await engine.put_blob(Path("aos.wasm").read_bytes())
            pid = await engine.spawn({"device": "process@1.0",
                                      "execution-device": "wasm-64@1.0", "image": image})

    Args:
        max_memory: bytes of linear memory per instance; past it ``memory.grow``
            fails (aos answers with an out-of-memory error).
        call_timeout: seconds one call may run before it is interrupted; by
            default the engine's ``slot_timeout``, else 60.
        fuel: units of fuel per call (``None``: not counted). Unlike a timeout,
            running out of fuel happens at the same point on every replay.
        cache_dir: where compiled modules and translated images are kept across
            runs; by default `default_cache_dir`, ``None`` for nowhere.
        limiter: bounds the threads its calls run in (trio's default limiter
            otherwise).
        max_images: compiled images kept in memory.

    One device serves every process that names it, from any number of
    engines in turn; a process's state is in its instance, never in the
    device. Thread-safe.
    """

    failures: Final = "record"

    def __init__(
        self,
        *,
        max_memory: int = DEFAULT_MAX_MEMORY,
        call_timeout: float | None = None,
        fuel: int | None = None,
        cache_dir: str | os.PathLike[str] | None = _DEFAULT,
        limiter: trio.CapacityLimiter | None = None,
        max_images: int = 32,
    ) -> None:
        super().__init__(max_memory=max_memory, call_timeout=call_timeout, limiter=limiter)
        if fuel is not None and fuel <= 0:
            raise ValueError("fuel must be positive")
        self.fuel = fuel
        self.cache_dir = (
            default_cache_dir()
            if cache_dir is _DEFAULT
            else None
            if cache_dir is None
            else Path(cache_dir)
        )
        self._max_images = max_images
        self._runtime: _Runtime | None = None  # made at the first boot; guarded by _lock
        self._booted = 0  # guarded by _lock
        self._live = 0  # guarded by _lock

    def __repr__(self) -> str:
        return (
            f"<WasmDevice max_memory={self.max_memory >> 20} MiB timeout={self.timeout:g} s"
            f"{f' fuel={self.fuel}' if self.fuel else ''}>"
        )

    def statistics(self) -> WasmStats:
        with self._lock:
            rt, booted, live = self._runtime, self._booted, self._live
        counts = rt.images.counts if rt is not None else {}
        return WasmStats(
            images=len(rt.images._images) if rt is not None else 0,
            compiled=counts.get("compiled", 0),
            deserialized=counts.get("deserialized", 0),
            translated=counts.get("translated", 0),
            booted=booted,
            live_instances=live,
        )

    def runtime(self) -> _Runtime:
        """The engine, ticker and image cache, made on first use. Blocks for milliseconds."""
        with self._lock:
            if self._runtime is None:
                from ._images import ImageCache
                from ._runtime import EpochTicker, config_key, make_engine

                engine = make_engine(fuel=self.fuel is not None)
                self._runtime = _Runtime(
                    engine,
                    EpochTicker(engine),
                    ImageCache(
                        engine,
                        config_key(fuel=self.fuel is not None),
                        self.cache_dir,
                        max_images=self._max_images,
                    ),
                )
            return self._runtime

    # booting --------------------------------------------------------------------------------

    async def boot(self, process: Mapping[str, Any], snapshot: Any) -> LiveWasm:
        """A live instance of ``process`` (restored from ``snapshot`` unless it is ``None``).

        Checkpoints; the compiling and restoring run in a thread. Raises
        `WasmImageError` for an image that cannot run (one line), or what
        getting the blob raised.
        """
        if process.get("execution-device") == "stack@1.0":
            _stack_of(process)
        image, data = await self._image(process.get("image"))
        return await trio.to_thread.run_sync(
            self._boot,
            process,
            image,
            data,
            snapshot,
            limiter=self._limiter,
            abandon_on_cancel=True,
        )

    async def _image(self, ref: object) -> tuple[str, bytes | None]:
        """The image's ID, and its bytes unless that image is compiled already."""
        if isinstance(ref, bytes):
            from ._images import image_id

            return image_id(ref), ref
        if not isinstance(ref, str) or not ref:
            raise WasmImageError(
                'the process definition needs an "image": the blob ID of its WASM module '
                "(engine.put_blob), or the module's bytes"
            )
        with self._lock:
            rt = self._runtime
        if rt is not None and rt.images.get(ref) is not None:
            return ref, None
        return ref, await self._get_blob(ref, f"image {ref}", WasmImageError)

    def _boot(
        self, process: Mapping[str, Any], image_id: str, data: bytes | None, snapshot: Any
    ) -> LiveWasm:
        from ._instance import WasmInstance

        rt = self.runtime()
        image = rt.images.get(image_id) if data is None else rt.images.load(image_id, data)
        if image is None:  # dropped from memory since _image looked: pragma: no cover
            raise WasmImageError(f"image {image_id} was dropped from the cache; boot again")
        instance = WasmInstance(
            image,
            rt.engine,
            rt.ticker,
            max_memory=self.max_memory,
            timeout=self.timeout,
            fuel=self.fuel,
        )
        try:
            if snapshot is not None:
                instance.restore(snapshot)
            info = Process.of(process, message_id(process), image_id)
        except BaseException:
            instance.close()
            raise
        with self._lock:
            self._booted += 1
            self._live += 1
        return LiveWasm(self, instance, info)

    def _closed(self) -> None:
        with self._lock:
            self._live -= 1


class LiveWasm(ThreadedLive[dict[str, Any]]):
    """One process's hot instance (the live instance of its worker). One call at a time."""

    def __init__(self, device: WasmDevice, instance: WasmInstance, process: Process) -> None:
        self._device = device
        self._limiter = device._limiter
        self.instance = instance
        self.process = process
        self._closed = False

    def __repr__(self) -> str:
        return f"<LiveWasm {self.process.id} {self.instance!r}>"

    def compute_sync(self, assignment: Mapping[str, Any]) -> dict[str, Any]:
        """`compute` in the calling thread. Blocks while the module runs."""
        instance = self.instance
        raw = instance.handle(message_json(assignment, self.process), self.process.env)
        result = parse_result(raw, self.process)
        if instance.stdout:
            result["stdout"] = instance.stdout.decode(errors="replace")
        if instance.stderr:
            result["stderr"] = instance.stderr.decode(errors="replace")
        return result

    def memory_size(self) -> int:
        """Bytes of the instance's linear memory (for the engine's memory bounds). Never blocks."""
        return self.instance.memory_size

    def snapshot_sync(self) -> dict[str, Any]:
        """`snapshot` in the calling thread: the instance's memory and globals (`_snapshot`)."""
        return self.instance.snapshot()

    def close(self) -> None:
        """Let the instance go (after a call still running in a thread ends). Idempotent."""
        if not self._closed:
            self._closed = True
            self.instance.close()
            self._device._closed()
