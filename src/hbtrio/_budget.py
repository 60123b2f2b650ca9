"""The engine's bounds: how many workers, how much memory, how many waiters, how far to replay.

Theory of operation
-------------------
Every resource an engine holds grows with what its callers ask, so each one
has a bound (`Limits`, all off by default) and one owner of its accounting
(`Budget`):

- **Live workers and their memory.** Each worker reports an estimate of the
  memory it holds (`GroupWorker.memory_bytes`: what a live instance says
  with ``memory_size()``, else a fixed cost per worker plus an estimate of
  its state), measured when it boots and when it goes idle, never per slot.
  When a new worker would pass ``max_workers``, or the total passes
  ``max_memory``, the least recently used *idle* workers retire (each
  stores its snapshot first, as on idle eviction) until the engine is under
  its bounds again. A worker that is busy is never evicted: a request that
  needs a new worker while every worker is busy and the engine is at a
  bound is refused with `Overloaded`. An evicted worker no longer counts
  from the moment it is asked to retire (its snapshot is on its way).
- **Waiters.** A request that would park is refused with `Overloaded` when
  the engine has ``max_waiters`` parked already, or its worker has
  ``max_waiters_per_worker``; so is a request that needs a cold start while
  ``max_cold_starts`` workers are booting.
- **Replay.** A request for a slot more than ``max_replay`` slots of
  computing away from where computing would start (the worker's position,
  or the nearest snapshot) gets `CatchingUp` at once, after the computation
  toward it was started: stored slots keep being answered at once, and
  nobody waits behind a long replay.

Refusals change nothing: the request asked for nothing before being
refused, except that a `CatchingUp` slot is being computed. All of this runs
on the event loop, in O(1) per request (O(log n) per eviction: the idle
reaper's heap gives the least recently used idle worker); nothing here
blocks.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from ._exceptions import Overloaded

__all__ = ["WORKER_BYTES", "Budget", "Limits", "estimate_bytes"]

#: What a worker with a small message state costs besides its state (its worker,
#: core and bookkeeping objects), measured on CPython 3.11 (docs/design.md).
WORKER_BYTES: Final = 3 * 1024
#: Values `estimate_bytes` need not look into.
_ATOMS: Final = frozenset({str, bytes, int, float, bool, type(None)})
#: Most entries `estimate_bytes` looks at; beyond it, the average so far is extrapolated.
_ESTIMATE_ENTRIES: Final = 4096


def _positive_int(name: str, value: object) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{name} must be an int >= 1 or None, not {value!r}")


def _positive_number(name: str, value: object) -> None:
    if value is not None and (type(value) not in (int, float) or not value > 0):  # type: ignore[operator]
        raise ValueError(f"{name} must be a number > 0 or None, not {value!r}")


@attrs.frozen
class Limits:
    """An engine's bounds (`open_engine` takes each as a keyword; ``None``: unbounded)."""

    #: Most live workers.
    max_workers: int | None = None
    #: Most bytes of live workers' memory (their estimates, see the module).
    max_memory: int | None = None
    #: Most requests parked on workers at once, in the whole engine.
    max_waiters: int | None = None
    #: Most requests parked on one worker.
    max_waiters_per_worker: int | None = None
    #: Most workers booting at once (a cold start reads a snapshot and replays).
    max_cold_starts: int | None = None
    #: Most slots a request may wait to have computed; beyond, `CatchingUp`.
    max_replay: int | None = None
    #: A snapshot after this many seconds of computing since the last one.
    snapshot_seconds: float | None = None
    #: A snapshot once the computing since the last one took this many times
    #: what taking the last snapshot took (replay saved against its cost).
    snapshot_cost_ratio: float | None = None

    def __attrs_post_init__(self) -> None:
        for name in (
            "max_workers",
            "max_memory",
            "max_waiters",
            "max_waiters_per_worker",
            "max_cold_starts",
            "max_replay",
        ):
            _positive_int(name, getattr(self, name))
        _positive_number("snapshot_seconds", self.snapshot_seconds)
        _positive_number("snapshot_cost_ratio", self.snapshot_cost_ratio)

    @property
    def bounds_workers(self) -> bool:
        """Whether admitting a new worker needs a check (`Budget.admit_worker`)."""
        return (
            self.max_workers is not None
            or self.max_memory is not None
            or self.max_cold_starts is not None
        )

    @property
    def times_snapshots(self) -> bool:
        """Whether drivers time their device calls for the snapshot policy."""
        return self.snapshot_seconds is not None or self.snapshot_cost_ratio is not None


def estimate_bytes(value: object, _depth: int = 0) -> int:
    """An estimate of the memory ``value`` (a message or message value) holds. Never blocks.

    ``sys.getsizeof`` of each container and atom, down to 32 levels, looking
    at `_ESTIMATE_ENTRIES` entries of a container at most (the rest counted
    at their average). Shared objects count each time they appear.
    """
    size = sys.getsizeof(value)
    if type(value) in _ATOMS or _depth >= 32:
        return size
    pairs: Iterable[tuple[object, object]]
    if isinstance(value, Mapping):
        pairs = value.items()
    elif isinstance(value, list | tuple):
        pairs = ((None, item) for item in value)  # no keys: getsizeof(None) is not counted
    else:
        return size
    n, seen, total = len(value), 0, 0
    for key, item in itertools.islice(pairs, _ESTIMATE_ENTRIES):
        total += (0 if key is None else sys.getsizeof(key)) + estimate_bytes(item, _depth + 1)
        seen += 1
    return size + (total if seen == n or not seen else total * n // seen)


@attrs.define(eq=False)
class Budget:
    """The accounting of an engine's bounds: the one owner of these counts (see the module)."""

    limits: Limits
    #: Sum of the live (not retiring) workers' `memory_bytes`.
    memory: int = 0
    #: Live workers that are not retiring after an eviction.
    workers: int = 0
    #: Workers booting (made by a request, their task not past its boot yet).
    cold_starts: int = 0
    #: Requests parked on workers.
    waiting: int = 0
    #: Workers retired to stay under ``max_workers`` / ``max_memory``.
    evictions: int = 0
    #: Requests refused with `Overloaded` (`CatchingUp` included).
    refused: int = 0

    def refuse(self, text: str, bound: str) -> Overloaded:
        self.refused += 1
        return Overloaded(text, bound=bound)

    def check_waiter(self, worker_waiting: int) -> None:
        """Raise `Overloaded` if one more request may not park (on a worker with that many)."""
        limits = self.limits
        if limits.max_waiters is not None and self.waiting >= limits.max_waiters:
            raise self.refuse(
                f"{self.waiting} requests are waiting already (max_waiters)", "max_waiters"
            )
        per = limits.max_waiters_per_worker
        if per is not None and worker_waiting >= per:
            raise self.refuse(
                f"{worker_waiting} requests are waiting on this process already "
                "(max_waiters_per_worker)",
                "max_waiters_per_worker",
            )

    def over(self, extra_workers: int = 0) -> bool:
        """Whether the workers (``extra_workers`` more) pass ``max_workers`` or ``max_memory``."""
        limits = self.limits
        if limits.max_workers is not None and self.workers + extra_workers > limits.max_workers:
            return True
        return limits.max_memory is not None and self.memory > limits.max_memory
