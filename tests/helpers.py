"""Devices and helpers shared by the engine tests."""

from __future__ import annotations

import collections
from typing import Any

import trio

import hbtrio

COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}


def definition(device: str = "counter@1.0", **extra: Any) -> dict[str, Any]:
    return {"device": "process@1.0", "execution-device": device, **extra}


class Recording:
    """A counter that records every (process, slot) it computes."""

    def __init__(self) -> None:
        self.calls: collections.Counter[tuple[str, int]] = collections.Counter()
        self.inits = 0

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        self.inits += 1
        return {"count": 0}

    def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        self.calls[assignment["process"], assignment["slot"]] += 1
        return {**state, "count": state["count"] + assignment["body"].get("n", 0)}

    def total(self) -> int:
        return sum(self.calls.values())


class Slow:
    """An async counter whose every slot takes ``delay`` seconds (of the clock in use)."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self.computed = 0
        self.cancelled = 0

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"count": 0}

    async def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        try:
            await trio.sleep(self.delay)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        self.computed += 1
        return {**state, "count": state["count"] + assignment["body"].get("n", 0)}


class Flaky:
    """A counter that raises at the slots in ``fail_at`` (each only ``times`` times)."""

    def __init__(self, fail_at: set[int], times: int = 1) -> None:
        self.remaining = dict.fromkeys(fail_at, times)

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"count": 0}

    def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        slot = assignment["slot"]
        if self.remaining.get(slot, 0) > 0:
            self.remaining[slot] -= 1
            raise RuntimeError(f"boom at {slot}")
        return {**state, "count": state["count"] + assignment["body"].get("n", 0)}


class AsyncFlaky(Flaky):
    """`Flaky` with an async ``compute``: never applied inline, always by the worker's task."""

    async def compute(  # type: ignore[override]
        self, state: hbtrio.Message, assignment: hbtrio.Message
    ) -> dict[str, Any]:
        return super().compute(state, assignment)


class Gate:
    """``gate@1.0``: each slot adds 1, but only once the test opens the gate."""

    def __init__(self) -> None:
        self.open = trio.Event()

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"count": 0}

    async def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        await self.open.wait()
        return {**state, "count": state["count"] + 1}


async def counter_process(
    engine: hbtrio.Engine, slots: int, device: str = "counter@1.0", **extra: Any
) -> str:
    """Spawn a process and schedule ``slots`` messages with n = 1, 2, 3, ..."""
    pid = await engine.spawn(definition(device, **extra))
    if slots:
        await engine.schedule_many(pid, [{"n": i} for i in range(1, slots + 1)])
    return pid


def expected_count(slot: int) -> int:
    """The count at ``slot`` for a process made by `counter_process`."""
    return slot * (slot + 1) // 2


async def reap(proc: trio.Process) -> None:
    """End a test's subprocess whatever happened: kill it if it runs, wait, close its stdout."""
    if proc.returncode is None:
        proc.kill()
    with trio.CancelScope(shield=True):
        await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()


async def node_started(stdout: trio.abc.ReceiveStream, timeout: float = 30) -> bytes:
    """What an ``hbtrio serve`` subprocess printed on ``stdout`` until it was ready
    (its "press Ctrl-C" line): the banner with its URLs. Fails if the output ends first."""
    seen = bytearray()
    with trio.fail_after(timeout):
        while b"press Ctrl-C" not in seen:
            chunk = await stdout.receive_some()
            assert chunk, f"node output ended: {bytes(seen)!r}"
            seen += chunk
    return bytes(seen)
