"""What every implementation shares: the adapter interface, messages, checks, memory probes.

The workload drivers in `benchmarks.workloads` are written once against
`Adapter`, so hbtrio and the baselines are timed by the same code; only the
engine behind the adapter differs.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Protocol

#: Slots a baseline worker applies between two yields to the event loop
#: (hbtrio's worker uses the same chunk size).
CHUNK: Final = 512

#: The process definition every workload spawns (``nonce`` makes processes distinct).
PROCESS_DEVICE: Final = "process@1.0"
COUNTER_DEVICE: Final = "counter@1.0"
SLEEPY_DEVICE: Final = "sleepy@1.0"

#: What ``sleepy@1.0``'s ``work`` returns (every caller must get exactly this).
SLEEPY_RESULT: Final[Mapping[str, Any]] = {"slept-ms": 10}


def definition(nonce: int) -> dict[str, Any]:
    """The definition of the ``nonce``-th counter process."""
    return {"device": PROCESS_DEVICE, "execution-device": COUNTER_DEVICE, "nonce": nonce}


def body(slot: int) -> dict[str, int]:
    """The message scheduled at ``slot``: it adds ``slot`` to the count."""
    return {"n": slot}


def bodies(first: int, last: int) -> list[dict[str, int]]:
    """The messages for slots ``first..last`` (inclusive)."""
    return [{"n": slot} for slot in range(first, last + 1)]


def expected_count(slot: int) -> int:
    """The count after slots ``1..slot`` were applied: ``1 + 2 + ... + slot``."""
    return slot * (slot + 1) // 2


class TaskGroup(Protocol):
    """The one thing drivers need from a nursery or task group."""

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None: ...


class Adapter(Protocol):
    """An implementation as the workload drivers see it.

    ``open_engine`` yields an engine with ``spawn``, ``schedule``, ``compute``
    and ``resolve`` as in hbtrio's API (``schedule_many`` is reached through
    `Adapter.schedule_many`, which falls back to ``schedule``).
    """

    name: str

    def run(self, main: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``main`` on this implementation's event loop."""

    def task_group(self) -> AbstractAsyncContextManager[TaskGroup]:
        """A nursery-like task group that waits for its tasks on exit."""

    async def sleep(self, seconds: float) -> None:
        """This event loop's sleep."""

    def make_store(self, kind: str, path: str | None) -> Any:
        """A store object: ``kind`` is ``"memory"`` or ``"sqlite"`` (then ``path`` is its file)."""

    def open_engine(
        self, store: Any, *, devices: Mapping[str, object] | None = None, cache_frequency: int = 1
    ) -> AbstractAsyncContextManager[Any]:
        """An engine on ``store``."""

    async def schedule_many(self, engine: Any, pid: str, messages: Sequence[Any]) -> list[int]:
        """Schedule ``messages`` in order (one store write when the engine can)."""

    def commits(self, store: Any) -> int | None:
        """How many commits the store made, or ``None`` if it does not say."""

    def engine_stats(self, engine: Any) -> dict[str, Any] | None:
        """The engine's counters, if it has any."""

    def live_workers(self, engine: Any) -> int | None:
        """How many process workers are alive."""


class Sleepy:
    """``sleepy@1.0``: ``work`` sleeps 10 ms on the given loop and counts its executions."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._sleep = sleep
        self.executions = 0

    async def work(self, base: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
        self.executions += 1
        await self._sleep(0.01)
        return dict(SLEEPY_RESULT)


# checks -------------------------------------------------------------------------------------


class Checker:
    """Counts responses and those that are not the state at their slot.

    Cheap enough to call inline (`see`) from client tasks; `verify` checks a
    list of collected states after timing.
    """

    __slots__ = ("bad", "first_bad", "seen")

    def __init__(self) -> None:
        self.seen = 0
        self.bad = 0
        self.first_bad: str | None = None

    def see(self, slot: int, state: Mapping[str, Any]) -> None:
        """Record the response to a request for ``slot``."""
        self.seen += 1
        if state["at-slot"] != slot or state["count"] != slot * (slot + 1) // 2:
            self.bad += 1
            if self.first_bad is None:
                self.first_bad = f"slot {slot}: got {dict(state)!r}"

    def verify(self, states: Sequence[Mapping[str, Any] | None], first: int = 1) -> None:
        """Check ``states[i]`` is the state at slot ``first + i`` for each ``i``."""
        for offset, state in enumerate(states):
            slot = first + offset
            if state is None:
                self.seen += 1
                self.bad += 1
                if self.first_bad is None:
                    self.first_bad = f"slot {slot}: no response"
            else:
                self.see(slot, state)

    def as_dict(self, expected_responses: int, **extra: Any) -> dict[str, Any]:
        """The ``check`` field of a result line.

        ``ok`` needs every response right and every extra ``(got, want)`` pair equal.
        """
        pairs = {k: v for k, v in extra.items() if isinstance(v, tuple)}
        plain = {k: v for k, v in extra.items() if not isinstance(v, tuple)}
        ok = self.seen == expected_responses and self.bad == 0
        out: dict[str, Any] = {
            "responses": self.seen,
            "expected_responses": expected_responses,
            "bad_responses": self.bad,
        }
        for key, (got, want) in pairs.items():
            out[key] = got
            out[f"expected_{key}"] = want
            ok = ok and got == want
        out.update(plain)
        if self.first_bad is not None:
            out["first_bad"] = self.first_bad
        out["ok"] = ok
        return out


# memory -------------------------------------------------------------------------------------

_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """The current resident set size (Linux ``/proc/self/statm``), or ``None``."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _hwm_bytes() is not None


class MemoryProbe:
    """Peak resident memory over a baseline taken by `start`.

    Uses the kernel's resettable peak mark (``VmHWM``) where possible, so the
    setup phase's own peak does not count; otherwise ``ru_maxrss``.
    """

    def __init__(self) -> None:
        self.method = "none"
        self.base = 0

    def start(self) -> None:
        """Collect garbage and take the baseline."""
        gc.collect()
        if _reset_peak():
            self.method = "VmHWM"
            self.base = rss_bytes() or 0
        else:
            self.method = "ru_maxrss"
            self.base = rss_bytes() or _maxrss_bytes()

    def peak_delta(self) -> int:
        """Peak resident bytes since `start`, minus the baseline."""
        peak = _hwm_bytes() if self.method == "VmHWM" else _maxrss_bytes()
        return max(0, (peak or 0) - self.base)

    def live_delta(self) -> int | None:
        """Resident bytes now, minus the baseline."""
        now = rss_bytes()
        return None if now is None else now - self.base
