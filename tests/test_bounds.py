"""The engine's bounds: workers, memory, waiters, cold starts, replay, and the snapshot policy.

Each bound is proved where it bites: evictions happen at the budget and in
least-recently-used order, a request over a bound is refused at once with
`Overloaded` (and changes nothing), a slot too far away is `CatchingUp` while
it is computed in the background, and nothing is lost: every evicted worker's
snapshot restores to the state it had. Time is Trio's (``autojump_clock``).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import hbtrio
import hbtrio.testing
from helpers import definition


class Blocks:
    """A live device with a declared memory size whose compute can be held at a gate."""

    def __init__(self, size: int = 1_000_000) -> None:
        self.size = size
        self.gate: trio.Event | None = None
        self.boot_gate: trio.Event | None = None
        self.boots: list[tuple[str, int | None]] = []
        self.compute_seconds = 0.0
        self.snapshot_seconds = 0.0
        self.snapshots: list[int] = []

    async def boot(self, process: hbtrio.Message, snapshot: Any) -> BlocksInstance:
        if self.boot_gate is not None:
            await self.boot_gate.wait()
        total = None if snapshot is None else int(snapshot)
        self.boots.append((process["name"], total))
        return BlocksInstance(self, total or 0)


class BlocksInstance:
    def __init__(self, device: Blocks, total: int) -> None:
        self.device, self.total, self.slot = device, total, 0

    async def compute(self, assignment: hbtrio.Message) -> dict[str, int]:
        device = self.device
        if device.gate is not None:
            await device.gate.wait()
        if device.compute_seconds:
            await trio.sleep(device.compute_seconds)
        self.total += assignment["body"]["n"]
        self.slot = assignment["slot"]
        return {"total": self.total}

    async def snapshot(self) -> bytes:
        if self.device.snapshot_seconds:
            await trio.sleep(self.device.snapshot_seconds)
        self.device.snapshots.append(self.slot)
        return str(self.total).encode()

    def memory_size(self) -> int:
        return self.device.size


def named(name: str) -> dict[str, Any]:
    return {**definition("blocks@1.0"), "name": name}


async def spawn_with(engine: hbtrio.Engine, name: str, ns: list[int]) -> str:
    pid = await engine.spawn(named(name))
    await engine.schedule_many(pid, [{"n": n} for n in ns])
    return pid


async def test_max_workers_evicts_the_least_recently_used_idle_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Blocks()
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, max_workers=2
    ) as engine:
        a, b, c = [await spawn_with(engine, name, [1, 2]) for name in "abc"]
        assert (await engine.compute(a, 1))["total"] == 1
        await trio.sleep(1)
        assert (await engine.compute(b, 1))["total"] == 1
        await trio.sleep(1)
        assert (await engine.compute(a, 2))["total"] == 3  # a is now the more recent
        await trio.sleep(1)
        assert (await engine.compute(c, 2))["total"] == 3  # b, least recently used, goes
        await trio.testing.wait_all_tasks_blocked()
        assert set(engine.workers) == {a, c}
        stats = engine.statistics()
        assert stats.evictions == 1 and stats.live_workers == 2
        # b retired with a snapshot at its slot: it boots from there, it does not replay.
        assert (await engine.compute(b, 2))["total"] == 3
        assert ("b", 1) in device.boots


async def test_at_max_workers_with_every_worker_busy_a_new_one_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Blocks()
    device.gate = trio.Event()
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, max_workers=2
    ) as engine:
        a, b, c = [await spawn_with(engine, name, [1]) for name in "abc"]
        got: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            for name, pid in (("a", a), ("b", b)):

                async def ask(name: str = name, pid: str = pid) -> None:
                    got[name] = (await engine.compute(pid, 1))["total"]

                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(hbtrio.Overloaded) as info:
                await engine.compute(c, 1)
            assert info.value.bound == "max_workers" and info.value.retry_after > 0
            assert c not in engine.workers  # nothing was started for it
            assert engine.statistics().refused == 1
            device.gate.set()
        assert got == {"a": 1, "b": 1}
        assert (await engine.compute(c, 1))["total"] == 1  # now an idle one makes room


async def test_max_memory_holds_the_sum_of_estimates_at_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Blocks(size=1_000_000)
    budget = 3_500_000
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, max_memory=budget
    ) as engine:
        pids = [await spawn_with(engine, f"p{i}", [i, 1]) for i in range(10)]
        for pid in pids:
            await engine.compute(pid, 2)
            await trio.testing.wait_all_tasks_blocked()
            stats = engine.statistics()
            assert stats.memory_bytes <= budget
            assert all(info.memory_bytes > 1_000_000 for info in engine.workers.values())
        assert len(engine.workers) == 3
        assert engine.statistics().evictions == 7
        # Nothing lost: every evicted process restores from its snapshot and goes on.
        for i, pid in enumerate(pids):
            await engine.schedule(pid, {"n": 10})
            assert (await engine.compute(pid, 3))["total"] == i + 1 + 10


async def test_waiter_bounds_refuse_the_next_waiter_and_keep_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Blocks()
    device.gate = trio.Event()
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, max_waiters=5, max_waiters_per_worker=3
    ) as engine:
        a = await spawn_with(engine, "a", [1] * 5)
        b = await spawn_with(engine, "b", [1] * 5)
        results: list[int] = []

        async def ask(pid: str, slot: int) -> None:
            results.append((await engine.compute(pid, slot))["total"])

        async with trio.open_nursery() as nursery:
            for slot in (1, 2, 3):
                nursery.start_soon(ask, a, slot)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(hbtrio.Overloaded) as info:
                await engine.compute(a, 4)
            assert info.value.bound == "max_waiters_per_worker"
            for slot in (1, 2):
                nursery.start_soon(ask, b, slot)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(hbtrio.Overloaded) as info:
                await engine.compute(b, 3)
            assert info.value.bound == "max_waiters"
            assert engine.statistics().refused == 2
            device.gate.set()
        assert sorted(results) == [1, 1, 2, 2, 3]


async def test_max_cold_starts_refuses_a_boot_over_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Blocks()
    device.boot_gate = trio.Event()
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, max_cold_starts=2
    ) as engine:
        pids = [await spawn_with(engine, name, [1]) for name in "abc"]
        async with trio.open_nursery() as nursery:
            for pid in pids[:2]:
                nursery.start_soon(engine.compute, pid, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.statistics().cold_starts == 2
            with pytest.raises(hbtrio.Overloaded) as info:
                await engine.compute(pids[2], 1)
            assert info.value.bound == "max_cold_starts"
            device.boot_gate.set()
        assert engine.statistics().cold_starts == 0
        assert (await engine.compute(pids[2], 1))["total"] == 1


async def test_max_replay_answers_catching_up_and_computes_in_the_background(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Blocks()
    device.compute_seconds = 0.01
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, max_replay=10, cache_frequency=1000
    ) as engine:
        pid = await spawn_with(engine, "a", [1] * 100)
        assert (await engine.compute(pid, 5))["total"] == 5  # within the bound: waits
        with pytest.raises(hbtrio.CatchingUp) as info:
            await engine.compute(pid, 100)
        assert (info.value.slot, info.value.position) == (100, 5)
        assert info.value.bound == "max_replay"
        # Stored slots keep being answered while it catches up.
        assert (await engine.compute(pid, 3))["total"] == 3
        # 95 slots of 0.01 s each: a client retrying after retry_after gets it in time.
        assert (await retrying(engine, pid, 100, info.value.retry_after))["total"] == 100
        # A fresh worker far from the nearest snapshot (slot 0 here) is the same.
        await engine.schedule_many(pid, [{"n": 1}] * 50)
        await engine.stop(pid)
        with pytest.raises(hbtrio.CatchingUp) as info:
            await engine.compute(pid, 150)
        assert info.value.position == 100  # the snapshot stored when it stopped
        assert (await retrying(engine, pid, 150, 0.1))["total"] == 150
        assert engine.statistics().refused >= 2


async def retrying(engine: hbtrio.Engine, pid: str, slot: int, after: float) -> hbtrio.Message:
    """A client given `CatchingUp`: ask again after ``after`` seconds, 10 times at most."""
    for _ in range(10):
        try:
            return await engine.compute(pid, slot)
        except hbtrio.CatchingUp:
            await trio.sleep(after)
    raise AssertionError(f"slot {slot} was not computed in 10 tries")


async def test_snapshot_policy_by_compute_time_and_by_cost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Blocks()
    device.compute_seconds = 1.0
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, cache_frequency=1000, snapshot_seconds=5.0
    ) as engine:
        pid = await spawn_with(engine, "a", [1] * 20)
        assert (await engine.compute(pid, 20))["total"] == 20
        assert device.snapshots == [0, 5, 10, 15, 20]  # slot 0's, at the first boot
    device = Blocks()
    device.compute_seconds, device.snapshot_seconds = 1.0, 2.0
    async with hbtrio.testing.open_test_engine(
        devices={"blocks@1.0": device}, cache_frequency=1000, snapshot_cost_ratio=4.0
    ) as engine:
        pid = await spawn_with(engine, "a", [1] * 20)
        assert (await engine.compute(pid, 20))["total"] == 20
        # Slot 0's, then one to learn its cost (2 s), then each after 8 s of computing.
        assert device.snapshots == [0, 1, 9, 17]


def test_bad_bounds_are_refused() -> None:
    async def main() -> None:
        for options in (
            {"max_workers": 0},
            {"max_memory": -1},
            {"max_replay": 1.5},
            {"snapshot_seconds": 0},
            {"snapshot_cost_ratio": "2"},
        ):
            with pytest.raises(ValueError, match=next(iter(options))):
                async with hbtrio.open_engine(**options):
                    pass

    trio.run(main)


@settings(max_examples=20, deadline=None)
@given(
    plan=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=40),
    max_workers=st.integers(1, 3),
    cache_frequency=st.integers(1, 4),
)
def test_nothing_is_lost_under_evictions(
    plan: list[tuple[int, int]], max_workers: int, cache_frequency: int
) -> None:
    """Any mix of requests to more processes than fit gives every state right."""

    async def main() -> None:
        device = Blocks()
        async with hbtrio.testing.open_test_engine(
            devices={"blocks@1.0": device},
            max_workers=max_workers,
            cache_frequency=cache_frequency,
        ) as engine:
            pids = [await spawn_with(engine, f"p{i}", list(range(1, 7))) for i in range(6)]
            for which, slot in plan:
                state = await engine.compute(pids[which], slot)
                assert state["total"] == slot * (slot + 1) // 2
                await trio.testing.wait_all_tasks_blocked()
                assert len(engine.workers) <= max_workers
            for pid in pids:
                report = await hbtrio.testing.audit_process(
                    engine.store, pid, {"blocks@1.0": Blocks()}
                )
                assert report.results + report.missing_results == 7  # and all of them check

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
