"""Randomised interleavings of spawn, schedule, compute, cancellation, stop and idle time.

Hypothesis draws a program: operations with start times on a virtual clock,
run all at once. Afterwards every answer is checked against a reference model
(the state at slot s is the sum of the first s scheduled numbers), every slot
must have been applied exactly once (cache_frequency=1 keeps every slot
restorable, so nothing is ever recomputed), and no task may be left behind.
``HBTRIO_EXAMPLES=1500`` explores further than the 150 examples of a normal run.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hbtrio
from helpers import definition


class Device:
    """Records applications; async with a per-slot delay, or plain."""

    def __init__(self, delays: list[float] | None) -> None:
        self.calls: collections.Counter[tuple[str, int]] = collections.Counter()
        self.delays = delays
        if delays is None:
            self.compute = self._compute_plain  # type: ignore[method-assign]

    def init(self, process: Any) -> dict[str, int]:
        return {"count": 0}

    def _apply(self, state: Any, assignment: Any) -> dict[str, Any]:
        self.calls[assignment["process"], assignment["slot"]] += 1
        return {**state, "count": state["count"] + assignment["body"]["n"]}

    def _compute_plain(self, state: Any, assignment: Any) -> dict[str, Any]:
        return self._apply(state, assignment)

    async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        assert self.delays is not None
        await trio.sleep(self.delays[assignment["slot"] % len(self.delays)])
        return self._apply(state, assignment)


op = st.one_of(
    st.tuples(st.just("schedule"), st.integers(0, 2), st.integers(-5, 50)),
    st.tuples(st.just("compute"), st.integers(0, 2), st.floats(0, 1), st.none() | st.floats(0, 3)),
    st.tuples(st.just("now"), st.integers(0, 2), st.none() | st.floats(0, 3)),
    st.tuples(st.just("stop"), st.integers(0, 2)),
)
program = st.lists(st.tuples(st.floats(0, 20), op), min_size=1, max_size=40)


@settings(
    max_examples=int(os.environ.get("HBTRIO_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    program=program,
    delays=st.none() | st.lists(st.sampled_from([0.0, 0.1, 1.0]), min_size=1, max_size=4),
    max_idle=st.sampled_from([1.0, 5.0, 300.0]),
    initial=st.integers(0, 8),
)
def test_random_interleavings_match_the_model(
    program: list[tuple[float, Any]], delays: list[float] | None, max_idle: float, initial: int
) -> None:
    device = Device(delays)
    scheduled: dict[str, dict[int, int]] = collections.defaultdict(dict)
    observed: list[tuple[str, int, Any]] = []

    async def main() -> None:
        before = trio.lowlevel.current_statistics().tasks_living
        async with hbtrio.open_engine(devices={"dev@1.0": device}, max_idle=max_idle) as engine:
            pids = [await engine.spawn(definition("dev@1.0", nonce=i)) for i in range(3)]
            for pid in pids:
                scheduled[pid][0] = 0
                for n in range(1, initial + 1):
                    scheduled[pid][await engine.schedule(pid, {"n": n})] = n

            async def run(at: float, what: tuple[Any, ...]) -> None:
                await trio.sleep(at)
                pid = pids[what[1]]
                if what[0] == "schedule":
                    scheduled[pid][await engine.schedule(pid, {"n": what[2]})] = what[2]
                elif what[0] == "stop":
                    await engine.stop(pid)
                else:
                    cancel_after = what[-1]
                    with trio.move_on_after(1e9 if cancel_after is None else cancel_after):
                        if what[0] == "now":
                            state = await engine.now(pid)
                        else:
                            slot = int(what[2] * await engine.latest_slot(pid))
                            state = await engine.compute(pid, slot)
                            assert state["at-slot"] == slot
                        observed.append((pid, state["at-slot"], state))

            async with trio.open_nursery() as nursery:
                for at, what in program:
                    nursery.start_soon(run, at, what)
            assert engine.stats().waiters == 0
            # Every slot of every process is computable afterwards, and right.
            for pid in pids:
                latest = await engine.latest_slot(pid)
                observed.extend(
                    [(pid, slot, await engine.compute(pid, slot)) for slot in range(latest + 1)]
                )
        assert trio.lowlevel.current_statistics().tasks_living == before

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for pid, slot, state in observed:
        assert set(scheduled[pid]) == set(range(len(scheduled[pid])))
        assert state == {"count": sum(scheduled[pid][s] for s in range(slot + 1)), "at-slot": slot}
    assert all(n == 1 for n in device.calls.values()), device.calls.most_common(3)
