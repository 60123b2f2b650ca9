"""Cancellation-safety of every public call, injected at every checkpoint of its path.

`hbtrio.testing.cancel_at_checkpoint(k, call)` runs ``call`` in the current
task and cancels it right after the task's k-th step (the k-th time it yields
to trio), i.e. at its k-th checkpoint. Each test walks k from 0 until the
call completes untouched, and after every cancelled attempt checks that the
engine and other callers carry on: correct answers, no stray waiters, no lost
or duplicated slots.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

import hbtrio
from hbtrio.testing import cancel_at_checkpoint
from helpers import Recording, Slow, counter_process, definition, expected_count


async def walk_checkpoints(
    make: Callable[[], Awaitable[Callable[[], Awaitable[Any]]]],
    check: Callable[[bool, Any], Awaitable[None]],
    limit: int = 200,
) -> int:
    """For k = 0, 1, ...: set up, cancel at step k, check. Returns the k that completed."""
    for k in range(limit):
        call = await make()
        completed, result = await cancel_at_checkpoint(k, call)
        await check(completed, result)
        if completed and k > 0:
            return k
    raise AssertionError("the call never completed")


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("situation", ["idle-worker", "no-worker", "stored", "far-ahead"])
async def test_compute_cancelled_at_every_checkpoint(situation: str) -> None:
    device = Recording()
    async with hbtrio.open_engine(devices={"rec@1.0": device}) as engine:
        pids: list[str] = []

        async def make() -> Callable[[], Awaitable[Any]]:
            pid = await counter_process(engine, 40, "rec@1.0", nonce=len(pids))
            pids.append(pid)
            if situation in ("idle-worker", "far-ahead"):
                await engine.compute(pid, 1)
            if situation == "stored":
                await engine.compute(pid, 30)
            slot = {"idle-worker": 2, "no-worker": 20, "stored": 25, "far-ahead": 40}[situation]
            return lambda: engine.compute(pid, slot)

        async def check(completed: bool, result: Any) -> None:
            pid = pids[-1]
            if completed:
                assert result["count"] == expected_count(result["at-slot"])
            await settle()
            assert engine.stats().waiters == 0
            # Another caller gets every slot right, and no slot was applied twice.
            for slot in (40, 7, 1):
                assert (await engine.compute(pid, slot))["count"] == expected_count(slot)
            assert all(device.calls[pid, s] == 1 for s in range(1, 41))

        await walk_checkpoints(make, check)


async def test_compute_cancelled_while_others_wait_for_same_and_other_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = Slow(delay=1.0)
    async with hbtrio.open_engine(devices={"slow@1.0": slow}) as engine:
        for k in range(1, 6):
            pid = await counter_process(engine, 10, "slow@1.0", nonce=k)
            got: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:

                async def other(
                    name: str, slot: int, pid: str = pid, got: dict[str, Any] = got
                ) -> None:
                    got[name] = await engine.compute(pid, slot)

                nursery.start_soon(other, "same", 5)
                nursery.start_soon(other, "later", 8)
                with trio.move_on_after(k * 0.7):
                    await engine.compute(pid, 5)
            assert got["same"] == {"count": 15, "at-slot": 5}
            assert got["later"] == {"count": 36, "at-slot": 8}
            assert slow.cancelled == 0  # the worker itself was never cancelled


async def test_now_and_latest_slot_cancelled_at_every_checkpoint(tmp_path: Any) -> None:
    async with hbtrio.open_engine(hbtrio.SQLiteStore(tmp_path / "c.sqlite")) as engine:
        pid = await counter_process(engine, 12)

        async def make() -> Callable[[], Awaitable[Any]]:
            return lambda: engine.now(pid)

        async def check(completed: bool, result: Any) -> None:
            if completed:
                assert result == {"count": expected_count(12), "at-slot": 12}
            await settle()
            assert engine.stats().waiters == 0
            assert (await engine.now(pid))["at-slot"] == 12

        await walk_checkpoints(make, check)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_schedule_cancelled_at_every_checkpoint(backend: str, tmp_path: Any) -> None:
    store = (
        hbtrio.MemoryStore() if backend == "memory" else hbtrio.SQLiteStore(tmp_path / "s.sqlite")
    )
    async with hbtrio.open_engine(store) as engine:
        pid = await counter_process(engine, 0)
        scheduled: list[int] = []

        async def make() -> Callable[[], Awaitable[Any]]:
            return lambda: engine.schedule(pid, {"n": 1})

        async def check(completed: bool, slot: Any) -> None:
            latest = await engine.latest_slot(pid)
            if completed:
                scheduled.append(slot)
                assert slot == latest
            # Whatever happened, the schedule is gap-free and verifies.
            assignments = await store.get_assignments(pid, 0, latest + 1)
            assert [a["slot"] for a in assignments] == list(range(latest + 1))
            hbtrio.verify_schedule(pid, assignments)
            assert (await engine.now(pid))["count"] == latest

        await walk_checkpoints(make, check)
        assert scheduled == sorted(set(scheduled))


async def test_stop_cancelled_at_every_checkpoint(autojump_clock: trio.testing.MockClock) -> None:
    slow = Slow(delay=1.0)
    async with hbtrio.open_engine(devices={"slow@1.0": slow}) as engine:
        pid = await counter_process(engine, 400, "slow@1.0")
        answers: list[Any] = []

        async def make() -> Callable[[], Awaitable[Any]]:
            await engine.compute(pid, (await engine.latest_slot(pid)) - 399 + len(answers) + 1)
            return lambda: engine.stop(pid)

        async def check(completed: bool, result: Any) -> None:
            await trio.sleep(2)  # virtual: let a stop in progress finish
            # Stopped or not, the process answers correctly afterwards.
            state = await engine.compute(pid, len(answers) + 2)
            answers.append(state)
            assert state["count"] == expected_count(state["at-slot"])
            assert engine.stats().leader_deaths == 0

        await walk_checkpoints(make, check, limit=50)


async def test_resolve_cancelled_at_every_checkpoint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Sleepy:
        def __init__(self) -> None:
            self.runs = 0
            self.finished = 0

        async def work(self, base: Any, request: Any) -> dict[str, Any]:
            self.runs += 1
            await trio.sleep(1)
            self.finished += 1
            return {"answer": request["x"] * 2}

    sleepy = Sleepy()
    async with hbtrio.open_engine(devices={"sleepy@1.0": sleepy}) as engine:
        counter = {"x": 0}

        async def make() -> Callable[[], Awaitable[Any]]:
            counter["x"] += 1
            return lambda x=counter["x"]: engine.resolve(
                {"device": "sleepy@1.0"}, {"path": "work", "x": x}
            )

        async def check(completed: bool, result: Any) -> None:
            await trio.sleep(2)
            if completed:
                assert result == {"answer": counter["x"] * 2}
            assert len(engine.executions) == 0
            assert engine.stats().waiters == 0

        await walk_checkpoints(make, check)
        # Lone callers that were cancelled took their execution with them.
        assert sleepy.finished == 1


async def test_resolve_dedup_survives_its_first_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Sleepy:
        runs = 0

        async def work(self, base: Any, request: Any) -> dict[str, Any]:
            Sleepy.runs += 1
            await trio.sleep(1)
            return {"done": True}

    async with hbtrio.open_engine(devices={"sleepy@1.0": Sleepy()}) as engine:
        base, request = {"device": "sleepy@1.0"}, {"path": "work"}
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def leader() -> None:
                with first:
                    await engine.resolve(base, request)

            async def follower() -> None:
                got.append(await engine.resolve(base, request))

            nursery.start_soon(leader)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(50):
                nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            assert len(engine.executions) == 1
            first.cancel()
        assert got == [{"done": True}] * 50
        assert Sleepy.runs == 1
        stats = engine.stats()
        assert stats.deduplicated == 50 and stats.executions == 1


async def test_resolve_last_waiter_leaving_cancels_execution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []

    class Sleepy:
        async def work(self, base: Any, request: Any) -> dict[str, Any]:
            try:
                await trio.sleep(10)
            except trio.Cancelled:
                seen.append("cancelled")
                raise
            return {}

    async with hbtrio.open_engine(devices={"sleepy@1.0": Sleepy()}) as engine:
        async with trio.open_nursery() as nursery:
            for delay in (1, 2, 3):

                async def caller(delay: float = delay) -> None:
                    with trio.move_on_after(delay):
                        await engine.resolve({"device": "sleepy@1.0"}, {"path": "work"})

                nursery.start_soon(caller)
            await trio.sleep(2.5)
            assert seen == [] and len(engine.executions) == 1
        assert seen == ["cancelled"]
        assert len(engine.executions) == 0


async def test_resolve_errors_and_distinct_requests() -> None:
    class Dev:
        def __init__(self) -> None:
            self.calls = 0

        def echo(self, base: Any, request: Any) -> Any:
            self.calls += 1
            return {"x": request["x"]}

        def fail(self, base: Any, request: Any) -> Any:
            raise KeyError("nope")

    dev = Dev()
    async with hbtrio.open_engine(devices={"dev@1.0": dev}) as engine:
        base = {"device": "dev@1.0"}
        assert await engine.resolve(base, {"path": "echo", "x": 1}) == {"x": 1}
        assert await engine.resolve(base, {"path": "echo", "x": 2}) == {"x": 2}
        assert await engine.resolve(base, {"path": "echo", "x": 1, "priv": {"t": 1}}) == {"x": 1}
        assert dev.calls == 3  # sequential calls are not deduplicated
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.resolve(base, {"path": "fail"})
        assert isinstance(info.value.__cause__, KeyError)
        with pytest.raises(hbtrio.InvalidMessage, match="path"):
            await engine.resolve(base, {"path": "__class__"})
        with pytest.raises(hbtrio.InvalidMessage, match="path"):
            await engine.resolve(base, {"path": "missing"})
        with pytest.raises(hbtrio.UnknownDevice):
            await engine.resolve({"device": "ghost@1.0"}, {"path": "x"})
        # compute through resolve is the process path.
        pid = await counter_process(engine, 3)
        process = {"device": "process@1.0", "execution-device": "counter@1.0"}
        assert await engine.resolve(process, {"path": "compute", "slot": 2}) == {
            "count": 3,
            "at-slot": 2,
        }
        assert pid == hbtrio.message_id(process)


# --------------------------------------------------------------------------- leaving the engine


class _Busy:
    """An async device whose first slot blocks until cancelled; notes who went first."""

    def __init__(self) -> None:
        self.engine: hbtrio.Engine | None = None
        self.order = ""

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"count": 0}

    async def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            # Has leaving the block begun (the engine is closed) before this worker ends?
            assert self.engine is not None
            self.order = "exit-first" if "closed" in repr(self.engine) else "worker-first"
            raise
        raise AssertionError("unreachable")  # pragma: no cover


def test_leaving_after_an_outside_cancellation_is_prompt_in_either_order() -> None:
    """Regression (issue 10.2): the cancelled worker may end before the engine waits for it.

    Trio delivers the outside cancellation to the block's task and to the
    worker's task in one batch, in either order; under Hypothesis the order is
    drawn (``random_module`` seeds Trio's scheduler), so both orders are run,
    reproducibly. Whichever comes first, leaving the block takes no time
    (never the 30 s ``shutdown_grace`` of a wait for an event nobody sets).
    """
    from hypothesis import given, settings
    from hypothesis import strategies as st

    orders: collections.Counter[str] = collections.Counter()

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.random_module())
    def leave(_seed: object) -> None:
        device = _Busy()

        async def main() -> None:
            start = trio.current_time()
            with trio.move_on_after(0.3):
                async with hbtrio.open_engine(devices={"busy@1.0": device}) as engine:
                    device.engine = engine
                    pid = await engine.spawn(definition("busy@1.0"))
                    await engine.schedule(pid, {"n": 1})
                    await engine.compute(pid, 1)
            assert trio.current_time() - start < 1.0, trio.current_time() - start
            orders[device.order] += 1

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    leave()
    assert orders["exit-first"] and orders["worker-first"], orders
