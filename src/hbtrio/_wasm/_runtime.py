"""The wasmtime engine of a WASM device, and the ticker that bounds its calls in time.

Theory of operation
-------------------
One wasmtime `Engine` per `WasmDevice`: every module it compiles and every
store it creates belong to it. It is configured for the JSON interface
(memory64, standard exception handling) and for replays that give the same
memory on any machine (NaN canonicalization, deterministic relaxed SIMD),
with epoch interruption always on and fuel when the device asks for it.

A call is bounded with the engine's *epoch*: before a call its store sets a
deadline some ticks ahead, and `EpochTicker` increments the epoch every
`TICK` seconds while at least one call runs; a call still running at its
deadline traps with an interrupt, in whatever thread it runs. The ticker's
thread sleeps on a condition while no call runs, and ends after
`IDLE_EXIT` seconds of that, so an idle device costs no wake-ups.

Everything here is thread-safe.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import threading
import time
from collections.abc import Iterator
from typing import Final

import wasmtime

__all__ = ["IDLE_EXIT", "TICK", "EpochTicker", "config_key", "make_engine", "wasmtime_version"]

#: Seconds between two increments of the epoch while calls run (the deadlines' resolution).
TICK: Final = 0.01
#: Seconds without calls after which the ticker's thread ends (a later call starts another).
IDLE_EXIT: Final = 5.0


def wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a vendored copy
        return "unknown"


def config_key(*, fuel: bool) -> str:
    """What a compiled module depends on besides its bytes (the on-disk cache's key)."""
    return f"wasmtime {wasmtime_version()}; memory64 exceptions epoch nan-canon fuel={fuel}"


def make_engine(*, fuel: bool) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.wasm_memory64 = True
    config.wasm_exceptions = True
    config.epoch_interruption = True
    config.consume_fuel = fuel
    config.cranelift_nan_canonicalization = True
    config.wasm_relaxed_simd_deterministic = True
    return wasmtime.Engine(config)


def deadline_ticks(seconds: float) -> int:
    """Ticks of `TICK` that cover ``seconds`` (at least ``seconds``, up to one tick more)."""
    return max(1, math.ceil(seconds / TICK)) + 1


class EpochTicker:
    """Increments an engine's epoch every `TICK` seconds while a call runs (see the module)."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._running = 0  # calls inside running(); guarded by _cond
        self._thread: threading.Thread | None = None  # guarded by _cond

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around a call whose store has set its epoch deadline."""
        with self._cond:
            self._running += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hbtrio-wasm-epoch", daemon=True
                )
                self._thread.start()
            else:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                idle_since = time.monotonic()
                while self._running == 0:
                    left = IDLE_EXIT - (time.monotonic() - idle_since)
                    if left <= 0:
                        self._thread = None
                        return
                    self._cond.wait(left)
            time.sleep(TICK)
            self._engine.increment_epoch()

    @property
    def alive(self) -> bool:
        """Whether its thread runs (it ends by itself after `IDLE_EXIT` idle seconds)."""
        with self._cond:
            return self._thread is not None
