"""The `hbtrio.testing` module itself: its checks catch what they promise to catch."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import hbtrio
import hbtrio.testing
from hbtrio.testing import (
    AuditError,
    FaultyDevice,
    audit_process,
    cancel_at_checkpoint,
    open_test_engine,
    replay,
    run_with_cancel_at_each_checkpoint,
)
from helpers import counter_process, definition, expected_count


def test_it_is_a_public_module_not_reexported() -> None:
    assert hbtrio.testing.__name__ == "hbtrio.testing"
    for name in hbtrio.testing.__all__:
        assert hasattr(hbtrio.testing, name)
        assert not hasattr(hbtrio, name) or name in ("testing",)


async def test_open_test_engine_catches_a_task_that_outlives_the_engine() -> None:
    with pytest.raises(AssertionError, match="outlived the engine"):
        async with open_test_engine():
            trio.lowlevel.spawn_system_task(trio.sleep_forever)


async def test_open_test_engine_catches_a_crashed_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: Any) -> None:
        raise RuntimeError("a bug in engine code")

    monkeypatch.setattr(hbtrio._worker.GroupWorker, "advance", broken)
    far = hbtrio._driver.INLINE_MAX + 5  # too far to apply inline: the worker's task runs
    with pytest.raises(AssertionError, match="crashed"):
        async with open_test_engine() as engine:
            pid = await counter_process(engine, far)
            with pytest.raises(hbtrio.LeaderDied):
                await engine.compute(pid, far)
    async with open_test_engine(allow_leader_deaths=True) as engine:
        pid = await counter_process(engine, far)
        with pytest.raises(hbtrio.LeaderDied):
            await engine.compute(pid, far)


async def test_cancel_at_checkpoint() -> None:
    async def two_checkpoints() -> str:
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        return "done"

    assert await cancel_at_checkpoint(0, two_checkpoints) == (False, None)
    assert await cancel_at_checkpoint(1, two_checkpoints) == (False, None)
    assert await cancel_at_checkpoint(2, two_checkpoints) == (False, None)
    assert await cancel_at_checkpoint(3, two_checkpoints) == (True, "done")
    with pytest.raises(ValueError, match="k must be"):
        await cancel_at_checkpoint(-1, two_checkpoints)

    seen: list[tuple[bool, Any]] = []

    async def make() -> Any:
        return two_checkpoints

    async def check(completed: bool, result: Any) -> None:
        seen.append((completed, result))

    assert await run_with_cancel_at_each_checkpoint(make, check) == 3
    assert seen == [(False, None)] * 3 + [(True, "done")]

    async def many() -> None:
        for _ in range(100):
            await trio.lowlevel.checkpoint()

    async def make_many() -> Any:
        return many

    with pytest.raises(AssertionError, match="never completed in 5 attempts"):
        await run_with_cancel_at_each_checkpoint(make_many, check, limit=5)


async def test_a_call_that_blocks_for_ever_is_caught_by_the_attempt_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never() -> None:
        await trio.sleep_forever()  # one step, then never another: k=2 cannot cancel it

    async def make() -> Any:
        return never

    async def check(completed: bool, result: Any) -> None:
        assert not completed

    with pytest.raises(AssertionError, match=r"attempt 2 .* did not finish within 5"):
        await run_with_cancel_at_each_checkpoint(make, check, attempt_timeout=5)


async def test_audit_catches_tampering() -> None:
    store = hbtrio.MemoryStore()
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 6)
        assert (await engine.now(pid))["count"] == expected_count(6)
    report = await audit_process(store, pid, require_results=True)
    assert (report.latest_slot, report.results, report.missing_results) == (6, 7, 0)
    assert report.snapshots == 7
    proc = store._procs[pid]
    # A wrong result.
    good = proc.results[3]
    proc.results[3] = hbtrio.freeze({"count": 999, "at-slot": 3})
    with pytest.raises(AuditError, match="slot 3"):
        await audit_process(store, pid)
    proc.results[3] = good
    # A reordered schedule: the hash chain no longer verifies.
    proc.assignments[2], proc.assignments[3] = proc.assignments[3], proc.assignments[2]
    with pytest.raises(AuditError, match="does not verify"):
        await audit_process(store, pid)
    proc.assignments[2], proc.assignments[3] = proc.assignments[3], proc.assignments[2]
    await audit_process(store, pid)
    with pytest.raises(AuditError, match="not in the store"):
        await audit_process(store, hbtrio.message_id({"other": 1}))


async def test_audit_reports_missing_results() -> None:
    store = hbtrio.MemoryStore()
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 6)
        await engine.compute(pid, 2)
    report = await audit_process(store, pid)
    assert (report.results, report.missing_results) == (3, 4)
    with pytest.raises(AuditError, match="no stored result"):
        await audit_process(store, pid, require_results=True)


async def test_replay_matches_the_engine() -> None:
    bodies = [{"n": n} for n in range(1, 8)]
    states = await replay(definition(), bodies)
    async with open_test_engine() as engine:
        pid = await counter_process(engine, 7)
        for slot in range(8):
            assert await engine.compute(pid, slot) == states[slot]
    with pytest.raises(hbtrio.ComputeError):
        await replay(definition(), [{"n": "x"}])


class WithHooks:
    def init(self, process: Any) -> dict[str, int]:
        return {"count": 0}

    def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        return {**state, "count": state["count"] + assignment["body"]["n"]}

    def snapshot(self, state: Any) -> dict[str, Any]:
        return {"c": state["count"]}

    def restore(self, snapshot: Any) -> dict[str, Any]:
        return {"count": snapshot["c"]}

    def greet(self, base: Any, request: Any) -> dict[str, str]:
        return {"hello": request["who"]}


async def test_faulty_device_passes_through_hooks_and_other_methods() -> None:
    device = FaultyDevice(WithHooks(), errors={3: KeyError})
    store = hbtrio.MemoryStore()
    devices = {"hooks@1.0": device}
    async with open_test_engine(store, devices=devices, cache_frequency=2) as engine:
        pid = await counter_process(engine, 5, "hooks@1.0")
        with pytest.raises(hbtrio.ComputeError, match="slot 3"):
            await engine.now(pid)
        device.clear()
        assert (await engine.now(pid))["count"] == expected_count(5)
        assert await engine.resolve({"device": "hooks@1.0"}, {"path": "greet", "who": "x"}) == {
            "hello": "x"
        }
    report = await audit_process(store, pid, devices)
    assert report.snapshots >= 3


async def test_faulty_device_checks_its_arguments() -> None:
    class AsyncOnly:
        async def init(self, process: Any) -> dict[str, int]:
            return {"count": 0}

        async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
            return dict(state)

    device = FaultyDevice(AsyncOnly(), blocking=True)
    async with open_test_engine(devices={"a@1.0": device}) as engine:
        pid = await counter_process(engine, 1, "a@1.0")
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.now(pid)
        assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(ValueError, match="times"):
        FaultyDevice(WithHooks(), times=0)


async def test_faulty_device_error_factories_and_delays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = FaultyDevice(
        WithHooks(),
        errors={1: lambda slot: OSError(f"disk gone at {slot}"), 2: ValueError("no")},
        delays={3: 7.0},
        times=1,
    )
    async with open_test_engine(devices={"d@1.0": device}) as engine:
        pid = await counter_process(engine, 3, "d@1.0")
        with pytest.raises(hbtrio.ComputeError, match="disk gone at 1"):
            await engine.now(pid)
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.now(pid)
        assert isinstance(info.value.__cause__, ValueError)
        start = trio.current_time()
        assert (await engine.now(pid))["count"] == expected_count(3)
        assert trio.current_time() - start == 7.0
