"""Live devices whose calls run in threads: the devices' bounds and hosts, their instances.

Theory of operation
-------------------
The WASM and Lua devices are live devices (see `hbtrio._core`) whose code
must not run on the event loop. What they share is here:

- `ThreadedDevice`, the base of the devices: their bounds (``max_memory``,
  ``call_timeout``, the limiter) and the engines they are attached to
  (`hbtrio.DeviceHost`), newest first. The latest engine's ``slot_timeout``
  bounds the calls (`ThreadedDevice.timeout`), and a blob is looked up in
  each engine in turn, one that has closed being dropped on the way.
  Thread-safe.
- `ThreadedLive`, the base of their live instances: a subclass writes the
  blocking calls (``compute_sync``, ``snapshot_sync``), and ``compute``,
  ``compute_many`` and ``snapshot`` run them in a thread bounded by the
  device's limiter. Each of those checkpoints; a cancelled one abandons its
  thread (``abandon_on_cancel=True``): the call runs on to its end, which
  the device bounds by a deadline of its own (`ThreadedDevice.timeout`), and
  its result is thrown away, as the engine throws away an instance whose
  call failed or was cancelled. One call at a time, as the engine makes
  them.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Awaitable, Mapping
from typing import Any, Final, Generic, Protocol, TypeVar

import trio

from ._exceptions import BlobNotFound, EngineClosed

__all__ = ["DEFAULT_CALL_TIMEOUT", "Host", "ThreadedDevice", "ThreadedLive"]

#: Seconds a call may run when neither the device nor the engine sets a bound.
DEFAULT_CALL_TIMEOUT: Final = 60.0

S = TypeVar("S")


class Host(Protocol):
    """What a device is attached to (`hbtrio.DeviceHost`): ``slot_timeout`` and blobs."""

    slot_timeout: float | None

    def get_blob(self, blob_id: str) -> Awaitable[bytes]: ...


class ThreadedDevice:
    """The base of a live device whose instances are `ThreadedLive`s: bounds and hosts.

    ``max_memory`` and ``call_timeout`` (``None``: unset) must be positive,
    ``limiter`` bounds the threads its calls run in (``None``: trio's default
    limiter). Thread-safe.
    """

    def __init__(
        self, *, max_memory: int, call_timeout: float | None, limiter: trio.CapacityLimiter | None
    ) -> None:
        if max_memory <= 0:
            raise ValueError("max_memory must be positive")
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError("call_timeout must be positive")
        self.max_memory = max_memory
        self.call_timeout = call_timeout
        self._limiter = limiter
        self._lock = threading.Lock()  # guards _hosts, and the subclass's counters
        self._hosts: list[Host] = []  # newest first; guarded by _lock

    def attach(self, host: Host) -> None:
        """Called by each engine it is registered with, when it opens: blobs and ``slot_timeout``.

        A device registered with several engines at once looks a blob (an
        image, a module) up in each, the latest first; its calls are bounded
        by the latest engine's ``slot_timeout``.
        """
        with self._lock:
            self._hosts = [host, *(h for h in self._hosts if h is not host)]

    @property
    def timeout(self) -> float:
        """Seconds one call may run: ``call_timeout``, else the latest engine's
        ``slot_timeout``, else `DEFAULT_CALL_TIMEOUT`."""
        if self.call_timeout is not None:
            return self.call_timeout
        with self._lock:
            host = self._hosts[0] if self._hosts else None
        slot_timeout = getattr(host, "slot_timeout", None)
        return slot_timeout if slot_timeout else DEFAULT_CALL_TIMEOUT

    async def _get_blob(self, blob_id: str, what: str, error: type[Exception]) -> bytes:
        """The bytes of blob ``blob_id`` from the latest attached engine that has it.

        Awaits each engine's ``get_blob`` in turn; a closed one is dropped.
        Raises `BlobNotFound` when no open engine has it, ``error`` (its
        message starting with ``what``) when none is attached or every one
        has closed, or what an engine raised.
        """
        with self._lock:
            hosts = list(self._hosts)
        if not hosts:
            raise error(f"{what}: this device is attached to no engine that holds blobs")
        missing: BaseException | None = None
        for host in hosts:
            try:
                return await host.get_blob(blob_id)
            except EngineClosed:
                with self._lock:
                    self._hosts = [h for h in self._hosts if h is not host]
            except BlobNotFound as exc:
                missing = exc
        if missing is not None:
            raise missing
        raise error(f"{what}: every engine this device was attached to is closed")


class ThreadedLive(abc.ABC, Generic[S]):
    """A live instance whose calls run in threads (see the module); ``S`` is its snapshot."""

    #: Bounds the threads its calls run in (the device's; ``None``: trio's default limiter).
    _limiter: trio.CapacityLimiter | None

    @abc.abstractmethod
    def compute_sync(self, assignment: Mapping[str, Any]) -> dict[str, Any]:
        """`compute` in the calling thread. Blocks while the process's code runs."""

    @abc.abstractmethod
    def snapshot_sync(self) -> S:
        """`snapshot` in the calling thread. Blocks."""

    async def compute(self, assignment: Mapping[str, Any]) -> dict[str, Any]:
        """The result of one message (`compute_sync`). Runs in a thread; checkpoints."""
        return await trio.to_thread.run_sync(
            self.compute_sync, assignment, limiter=self._limiter, abandon_on_cancel=True
        )

    async def compute_many(
        self, assignments: list[Mapping[str, Any]], out: list[dict[str, Any]]
    ) -> None:
        """`compute` for consecutive messages in one thread hop, appending each result to
        ``out``; raises at the first that fails (the results before it are in ``out``)."""
        await trio.to_thread.run_sync(
            self._compute_all, assignments, out, limiter=self._limiter, abandon_on_cancel=True
        )

    def _compute_all(self, assignments: list[Mapping[str, Any]], out: list[dict[str, Any]]) -> None:
        compute = self.compute_sync
        for assignment in assignments:
            out.append(compute(assignment))  # noqa: PERF401 - out must grow one by one: a failure keeps those before it

    async def snapshot(self) -> S:
        """The instance's snapshot (`snapshot_sync`). Runs in a thread; checkpoints."""
        return await trio.to_thread.run_sync(
            self.snapshot_sync, limiter=self._limiter, abandon_on_cancel=True
        )
