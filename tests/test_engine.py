"""The engine's API.md promises: spawn, schedule, compute, now, stop, workers, stats, lifecycle."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import hbtrio
from helpers import (
    COUNTER,
    AsyncFlaky,
    Flaky,
    Recording,
    Slow,
    counter_process,
    definition,
    expected_count,
)


async def test_spawn_schedule_compute_now() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await engine.spawn(COUNTER)
        assert pid == hbtrio.message_id(COUNTER)
        assert await engine.spawn(dict(reversed(list(COUNTER.items())))) == pid
        slots = [await engine.schedule(pid, {"n": n}) for n in (5, 7, 11)]
        assert slots == [1, 2, 3]
        assert await engine.compute(pid, 0) == {"count": 0, "at-slot": 0}
        assert await engine.compute(pid, 2) == {"count": 12, "at-slot": 2}
        assert await engine.now(pid) == {"count": 23, "at-slot": 3}
        assert await engine.latest_slot(pid) == 3


async def test_states_are_read_only() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 2)
        state = await engine.compute(pid, 2)
        with pytest.raises(TypeError):
            state["count"] = 99  # type: ignore[index]
        with pytest.raises(TypeError):
            state.update(count=1)
        assert (await engine.compute(pid, 2))["count"] == 3


async def test_bad_input_is_rejected() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 1)
        for slot in (-1, 1.0, "1", True, None):
            with pytest.raises(hbtrio.InvalidMessage):
                await engine.compute(pid, slot)  # type: ignore[arg-type]
        with pytest.raises(hbtrio.InvalidMessage, match="execution-device"):
            await engine.spawn({"device": "process@1.0"})
        with pytest.raises(hbtrio.InvalidMessage, match="device"):
            await engine.spawn({"device": "other@1.0", "execution-device": "counter@1.0"})
        with pytest.raises(hbtrio.UnknownDevice):
            await engine.spawn(definition("nope@1.0"))
        with pytest.raises(hbtrio.InvalidMessage, match="oops"):
            await engine.schedule(pid, {"oops": {1, 2}})
        with pytest.raises(hbtrio.InvalidMessage):
            await engine.compute("not-an-id", 1)
        unknown = hbtrio.message_id({"x": 1})
        with pytest.raises(hbtrio.ProcessNotFound):
            await engine.compute(unknown, 0)
        with pytest.raises(hbtrio.ProcessNotFound):
            await engine.schedule(unknown, {"n": 1})
        with pytest.raises(hbtrio.SlotNotScheduled) as info:
            await engine.compute(pid, 5)
        assert info.value.phase == "get-schedule"
        assert info.value.attempted_slot == 2
        # Nothing above changed the process.
        assert await engine.now(pid) == {"count": 1, "at-slot": 1}


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
@pytest.mark.parametrize("pid", ["x" * 43, "_" * 43, "A" * 42 + "B", "-" * 43])
async def test_any_43_base64url_characters_name_a_process(
    pid: str, store_kind: str, tmp_path: Any
) -> None:
    """Regression (issue 10.5): a well-formed ID is a lookup, never a validation error."""
    store = hbtrio.MemoryStore() if store_kind == "memory" else hbtrio.SQLiteStore(tmp_path / "s")
    async with hbtrio.open_engine(store) as engine:
        for call in (
            lambda: engine.compute(pid, 1),
            lambda: engine.now(pid),
            lambda: engine.latest_slot(pid),
            lambda: engine.schedule(pid, {"n": 1}),
        ):
            with pytest.raises(hbtrio.ProcessNotFound) as info:
                await call()
            assert info.value.pid == pid
        await engine.stop(pid)  # nothing to stop: a no-op, not an error
    for bad in ("x" * 42, "x" * 44, "x" * 42 + "=", "x" * 42 + "+", "é" * 43):
        async with hbtrio.open_engine() as engine:
            with pytest.raises(hbtrio.InvalidMessage, match="43 base64url"):
                await engine.compute(bad, 1)


async def test_slot_not_scheduled_names_the_requested_and_the_first_missing_slot() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 2)
        with pytest.raises(hbtrio.SlotNotScheduled) as info:
            await engine.compute(pid, 9)
    exc = info.value
    assert (exc.requested_slot, exc.attempted_slot, exc.latest) == (9, 3, 2)
    assert str(exc) == (
        f"slot 9 of process {pid} is not scheduled (latest is 2; slot 3 is the first missing)"
    )


async def test_engine_closed_after_block() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 1)
    for call in (
        engine.spawn(COUNTER),
        engine.schedule(pid, {"n": 1}),
        engine.compute(pid, 1),
        engine.now(pid),
        engine.stop(pid),
        engine.resolve({"device": "counter@1.0"}, {"path": "init"}),
    ):
        with pytest.raises(hbtrio.EngineClosed):
            await call


async def test_an_error_from_the_block_leaves_it_as_itself() -> None:
    """Regression (issue 10.3): not wrapped in an ExceptionGroup by the engine's nursery."""
    try:
        async with hbtrio.open_engine() as engine:
            pid = await counter_process(engine, 2)
            await engine.compute(pid, 5)
    except hbtrio.SlotNotScheduled as exc:
        caught: BaseException = exc
    else:  # pragma: no cover - the test fails here
        raise AssertionError("SlotNotScheduled did not reach the except clause")
    assert type(caught) is hbtrio.SlotNotScheduled
    assert caught.attempted_slot == 3
    assert not isinstance(caught.__context__, BaseExceptionGroup)
    frames = [f.name for f in __import__("traceback").extract_tb(caught.__traceback__)]
    assert "compute" in frames  # raised where the body called the engine


@pytest.mark.parametrize("kind", [KeyboardInterrupt, ValueError])
async def test_any_exception_from_the_block_leaves_it_as_itself(kind: type) -> None:
    cause = RuntimeError("the cause")
    with pytest.raises(kind) as info:
        async with hbtrio.open_engine() as engine:
            await counter_process(engine, 1)
            raise kind("mine") from cause
    assert type(info.value) is kind and info.value.__cause__ is cause


async def test_the_blocks_own_group_stays_the_same_group() -> None:
    mine = ExceptionGroup("mine", [ValueError(1), KeyError(2)])
    with pytest.raises(ExceptionGroup) as info:
        async with hbtrio.open_engine():
            raise mine
    assert info.value is mine


async def test_several_failures_leaving_the_block_stay_a_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hbtrio._idle import IdleReaper

    raised = trio.Event()

    async def crashing_reaper(self: IdleReaper) -> None:  # an engine bug, at the worst moment
        await raised.wait()
        raise RuntimeError("engine bug")

    monkeypatch.setattr(IdleReaper, "run", crashing_reaper)
    with pytest.raises(BaseExceptionGroup) as info:
        async with hbtrio.open_engine():
            await trio.testing.wait_all_tasks_blocked()  # the reaper waits for the event
            raised.set()
            raise ValueError("mine")
    assert sorted(type(e).__name__ for e in info.value.exceptions) == ["RuntimeError", "ValueError"]


async def test_leaving_stores_snapshots_and_leaves_no_task() -> None:
    store = hbtrio.MemoryStore()
    before = trio.lowlevel.current_statistics().tasks_living
    async with hbtrio.open_engine(store, cache_frequency=1000) as engine:
        pids = [await counter_process(engine, 7, nonce=i) for i in range(5)]
        for pid in pids:
            await engine.compute(pid, 7)
        assert len(engine.workers) == 5
        # A waiter parked when the block exits is told, not left hanging.
    assert trio.lowlevel.current_statistics().tasks_living == before
    for pid in pids:
        found = await store.latest_snapshot(pid, 100)
        assert found is not None and found[0] == 7 and found[1]["count"] == expected_count(7)


async def test_waiter_parked_at_exit_gets_engine_closed() -> None:
    slow = Slow(delay=1.0)
    outcome: list[BaseException] = []

    async def waiter(engine: hbtrio.Engine, pid: str) -> None:
        try:
            await engine.compute(pid, 50)
        except hbtrio.HbTrioError as exc:
            outcome.append(exc)

    async with (
        trio.open_nursery() as nursery,
        hbtrio.open_engine(devices={"slow@1.0": slow}, shutdown_grace=5) as engine,
    ):
        pid = await counter_process(engine, 50, "slow@1.0")
        nursery.start_soon(waiter, engine, pid)
        await trio.testing.wait_all_tasks_blocked()
    assert len(outcome) == 1 and isinstance(outcome[0], hbtrio.EngineClosed)


async def test_worker_state_really_advances_between_requests() -> None:
    device = Recording()
    async with hbtrio.open_engine(devices={"rec@1.0": device}) as engine:
        pid = await counter_process(engine, 30, "rec@1.0")
        for slot in range(1, 31):
            state = await engine.compute(pid, slot)
            assert state == {"count": expected_count(slot), "at-slot": slot}
        # Each slot applied once: slot N+1 after slot N costs one application.
        assert device.total() == 30
        assert max(device.calls.values()) == 1
        assert engine.stats().slots_computed == 30
        assert engine.stats().workers_started == 1
        assert engine.workers[pid].slot == 30


async def test_catch_up_far_ahead_then_earlier_slots_come_from_store() -> None:
    device = Recording()
    async with hbtrio.open_engine(devices={"rec@1.0": device}) as engine:
        pid = await counter_process(engine, 3000, "rec@1.0")
        assert (await engine.compute(pid, 3000))["count"] == expected_count(3000)
        hits = engine.stats().cache_hits
        for slot in (1, 17, 2999):
            assert (await engine.compute(pid, slot))["count"] == expected_count(slot)
        assert engine.stats().cache_hits == hits + 3
        assert device.total() == 3000


async def test_reads_never_queue_behind_catch_up(autojump_clock: trio.testing.MockClock) -> None:
    slow = Slow(delay=1.0)
    async with (
        hbtrio.open_engine(devices={"slow@1.0": slow}) as engine,
        trio.open_nursery() as nursery,
    ):
        pid = await counter_process(engine, 1000, "slow@1.0")
        nursery.start_soon(engine.compute, pid, 1000)
        await trio.sleep(10.5)  # virtual time: the worker is ~10 slots in, computing on
        assert 5 <= engine.workers[pid].slot < 1000
        start = trio.current_time()
        assert (await engine.compute(pid, 3))["count"] == 6
        assert trio.current_time() == start  # answered at once, not behind the catch-up
        await engine.stop(pid)
        nursery.cancel_scope.cancel()


async def test_many_waiters_fan_out_each_gets_its_own_slot() -> None:
    results: dict[int, Any] = {}
    async with hbtrio.open_engine(devices={"slow@1.0": Slow(0)}) as engine:
        pid = await counter_process(engine, 300, "slow@1.0")

        async def want(slot: int) -> None:
            results[slot] = await engine.compute(pid, slot)

        async with trio.open_nursery() as nursery:
            for slot in range(300, 0, -1):
                nursery.start_soon(want, slot)
                nursery.start_soon(want, slot)
    assert sorted(results) == list(range(1, 301))
    assert all(s == {"count": expected_count(k), "at-slot": k} for k, s in results.items())


async def test_device_error_is_not_a_worker_death() -> None:
    flaky = AsyncFlaky({3})  # async: every waiter parks on the worker, which fails them all
    async with hbtrio.open_engine(devices={"flaky@1.0": flaky}) as engine:
        pid = await counter_process(engine, 5, "flaky@1.0")
        errors: list[BaseException] = []

        async def want(slot: int) -> None:
            try:
                await engine.compute(pid, slot)
            except hbtrio.ComputeError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for slot in (3, 4, 5):
                nursery.start_soon(want, slot)
        assert len(errors) == 3
        for exc in errors:
            assert exc.phase == "compute" and exc.attempted_slot == 3
            assert isinstance(exc.__cause__, RuntimeError)
        assert len({id(e) for e in errors}) == 3  # each waiter got its own exception
        assert engine.workers[pid].slot == 2  # the last good state
        assert engine.stats().leader_deaths == 0
        # The device recovers: the same worker goes on.
        assert await engine.compute(pid, 5) == {"count": 15, "at-slot": 5}
        assert engine.stats().workers_started == 1


async def test_stop_stores_snapshot_and_next_worker_restores_from_it() -> None:
    device = Recording()
    store = hbtrio.MemoryStore()
    async with hbtrio.open_engine(
        store, devices={"rec@1.0": device}, cache_frequency=100
    ) as engine:
        pid = await counter_process(engine, 60, "rec@1.0")
        await engine.compute(pid, 40)
        await engine.stop(pid)
        assert pid not in engine.workers
        assert (await store.latest_snapshot(pid, 60))[0] == 40  # type: ignore[index]
        await engine.stop(pid)  # no worker: a no-op
        assert (await engine.compute(pid, 60))["count"] == expected_count(60)
        assert device.total() == 60  # restored at 40, computed only 41..60
        stats = engine.stats()
        assert stats.workers_started == 2 and stats.workers_stopped == 1


async def test_stop_reroutes_waiters_who_still_succeed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = Slow(delay=1.0)
    got: list[Any] = []
    async with hbtrio.open_engine(devices={"slow@1.0": slow}) as engine:
        pid = await counter_process(engine, 20, "slow@1.0")
        async with trio.open_nursery() as nursery:

            async def want(slot: int) -> None:
                got.append(await engine.compute(pid, slot))

            for slot in (10, 20):
                nursery.start_soon(want, slot)
            await trio.sleep(5.5)
            await engine.stop(pid)
        assert sorted(s["at-slot"] for s in got) == [10, 20]
        assert all(s["count"] == expected_count(s["at-slot"]) for s in got)
        assert engine.stats().workers_started == 2
        assert engine.stats().leader_deaths == 0


def crash_workers(monkeypatch: pytest.MonkeyPatch, *, pause: float = 0.0) -> dict[str, int]:
    """Make the next ``crashes["left"]`` worker runs raise in engine code, after
    ``pause`` seconds (if any) of their own; returns ``crashes`` to change."""
    from hbtrio._worker import GroupWorker

    original = GroupWorker.advance
    crashes = {"left": 1}

    async def crashing(self: GroupWorker) -> None:
        if crashes["left"] > 0:
            crashes["left"] -= 1
            if pause:
                await trio.sleep(pause)
            raise RuntimeError("bug in the engine")
        await original(self)

    monkeypatch.setattr(GroupWorker, "advance", crashing)
    return crashes


async def test_crash_in_engine_code_reroutes_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    crashes = crash_workers(monkeypatch)
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 10)
        assert (await engine.compute(pid, 10))["count"] == 55
        assert engine.stats().leader_deaths == 1
        assert engine.stats().workers_started == 2
        pid2 = await counter_process(engine, 10, nonce=2)
        crashes["left"] = 100
        with pytest.raises(hbtrio.LeaderDied):
            await engine.compute(pid2, 10)
        assert engine.stats().leader_deaths == 1 + 3
        crashes["left"] = 0
        assert (await engine.compute(pid2, 10))["count"] == 55


async def test_waiters_parked_on_a_busy_worker_reroute_when_it_crashes(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    crash_workers(monkeypatch, pause=1)  # the later callers join the worker meanwhile
    got: dict[int, list[Any]] = {}
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 10)

        async def want(slot: int) -> None:
            got.setdefault(slot, []).append(await engine.compute(pid, slot))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(want, 10)  # starts the worker, aiming at 10
            await trio.testing.wait_all_tasks_blocked()
            assert engine.workers[pid].phase in ("starting", "running")
            for slot in (4, 10, 7):  # at or below its aim: they park on it
                nursery.start_soon(want, slot)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.workers[pid].waiting == 4  # the first caller too
        assert {s: [m["count"] for m in v] for s, v in got.items()} == {
            4: [10],
            7: [28],
            10: [55, 55],
        }
        assert engine.stats().leader_deaths == 1
        assert engine.stats().workers_started == 2


async def test_idle_eviction_snapshots_and_restores(autojump_clock: trio.testing.MockClock) -> None:
    device = Recording()
    store = hbtrio.MemoryStore()
    async with hbtrio.open_engine(
        store, devices={"rec@1.0": device}, max_idle=30, cache_frequency=50
    ) as engine:
        pid = await counter_process(engine, 20, "rec@1.0")
        await engine.compute(pid, 12)
        await trio.sleep(29)
        assert pid in engine.workers
        assert engine.workers[pid].idle_seconds == pytest.approx(29)
        await trio.sleep(2)
        assert pid not in engine.workers
        assert (await store.latest_snapshot(pid, 20))[0] == 12  # type: ignore[index]
        assert await engine.now(pid) == {"count": expected_count(20), "at-slot": 20}
        assert device.total() == 20  # only 13..20 after the restore
        assert device.inits == 1


async def test_requests_keep_a_worker_alive(autojump_clock: trio.testing.MockClock) -> None:
    async with hbtrio.open_engine(max_idle=10) as engine:
        pid = await counter_process(engine, 100)
        for slot in range(1, 20):
            await engine.compute(pid, slot)
            await trio.sleep(9)
        assert engine.stats().workers_started == 1


async def test_idle_time_counts_from_the_end_of_the_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A request that waited 20 s for its slots must not leave a worker that is
    # evicted the moment it goes idle: max_idle counts from then.
    async with hbtrio.open_engine(devices={"slow@1.0": Slow(1.0)}, max_idle=10) as engine:
        pid = await counter_process(engine, 30, "slow@1.0")
        with trio.move_on_after(15):
            await engine.compute(pid, 20)  # the caller leaves; the work goes on
        assert engine.workers[pid].phase == "running"
        assert engine.workers[pid].idle_seconds == 0  # at work, though nobody waits now
        await engine.compute(pid, 20)
        await trio.sleep(9)
        assert engine.workers[pid].phase == "idle"
        assert engine.workers[pid].idle_seconds == pytest.approx(9)
        await trio.sleep(2)
        assert pid not in engine.workers
        assert engine.stats().workers_stopped == 1


async def test_workers_and_stats_introspection(autojump_clock: trio.testing.MockClock) -> None:
    async with hbtrio.open_engine(devices={"slow@1.0": Slow(1.0)}) as engine:
        pid = await counter_process(engine, 10, "slow@1.0")
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(engine.compute, pid, 10)
            await trio.sleep(4.5)
            info = engine.workers[pid]
            assert (info.group, info.pid, info.phase) == (pid, pid, "running")
            assert info.waiting == 3 and info.target == 10 and info.slot == 4
            assert engine.stats().waiters == 3
            with pytest.raises(TypeError):
                engine.workers[pid] = info  # type: ignore[index]
        stats = engine.stats()
        assert stats.waiters == 0 and stats.live_workers == 1 and stats.slots_computed == 10
        with pytest.raises(AttributeError):
            stats.slots_computed = 0  # type: ignore[misc]


async def test_cpu_heavy_device_in_a_thread_does_not_stall_others() -> None:
    release = trio.Event()
    entered = trio.Event()
    token = trio.lowlevel.current_trio_token()
    import threading

    gate = threading.Event()

    class Heavy:
        def init(self, process: Any) -> dict[str, int]:
            return {"count": 0}

        def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
            token.run_sync_soon(entered.set)
            gate.wait(10)  # blocks its thread, not the event loop
            return {**state, "count": state["count"] + 1}

    async with hbtrio.open_engine(devices={"heavy@1.0": hbtrio.run_in_thread(Heavy())}) as engine:
        heavy = await counter_process(engine, 1, "heavy@1.0")
        light = await counter_process(engine, 5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.compute, heavy, 1)
            await entered.wait()
            # The heavy slot is in progress; the other process is served meanwhile.
            assert (await engine.compute(light, 5))["count"] == 15
            assert engine.workers[heavy].slot == 0
            gate.set()
            release.set()
        assert (await engine.compute(heavy, 1))["count"] == 1


async def test_thousands_of_processes_alive_at_once() -> None:
    n = 3000
    async with hbtrio.open_engine() as engine:
        pids = [await counter_process(engine, 3, nonce=i) for i in range(n)]
        results: dict[str, Any] = {}

        async def client(pid: str) -> None:
            for slot in (1, 2, 3):
                results[pid] = await engine.compute(pid, slot)

        async with trio.open_nursery() as nursery:
            for pid in pids:
                nursery.start_soon(client, pid)
        assert len(engine.workers) == n
        assert all(r == {"count": 6, "at-slot": 3} for r in results.values())
        assert engine.stats().slots_computed == 3 * n


async def test_sqlite_engine_continues_where_last_stopped(tmp_path: Any) -> None:
    path = tmp_path / "e.sqlite"
    device = Recording()
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"rec@1.0": device}, cache_frequency=10
    ) as engine:
        pid = await counter_process(engine, 25, "rec@1.0")
        assert (await engine.compute(pid, 23))["count"] == expected_count(23)
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"rec@1.0": device}, cache_frequency=10
    ) as engine:
        assert await engine.latest_slot(pid) == 25
        assert (await engine.compute(pid, 17))["count"] == expected_count(17)  # stored result
        assert await engine.now(pid) == {"count": expected_count(25), "at-slot": 25}
        assert await engine.schedule(pid, {"n": 1}) == 26
        assert (await engine.now(pid))["count"] == expected_count(25) + 1
    assert device.total() == 26  # nothing computed twice across engines
    assert max(device.calls.values()) == 1


async def ticks_during_inline_answers(slots: int) -> int:
    """How often another task ran while one task asked for slots 1..``slots`` in turn."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with hbtrio.open_engine() as engine, trio.open_nursery() as nursery:
        pid = await counter_process(engine, slots)
        await engine.compute(pid, 0)
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()  # the ticker is running from here on
        before = ticks
        for slot in range(1, slots + 1):  # served inline by the calling task
            await engine.compute(pid, slot)
        assert engine.stats().workers_started == 1
        nursery.cancel_scope.cancel()
        return ticks - before


async def test_fast_path_answers_still_let_other_tasks_run() -> None:
    assert await ticks_during_inline_answers(20_000) > 0  # the loop yielded along the way


async def test_fast_path_yields_even_when_the_clock_stands_still(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A MockClock that never advances: the yield budget counts answers too.
    ticks = await ticks_during_inline_answers(5_000)
    assert mock_clock.current_time() == 0.0
    assert ticks >= 10  # at least once per few hundred answers


async def test_idle_worker_has_no_task_and_is_served_inline() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 50)
        await engine.compute(pid, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.workers[pid].phase == "idle"
        tasks = trio.lowlevel.current_statistics().tasks_living
        for slot in range(2, 6):
            assert (await engine.compute(pid, slot))["count"] == expected_count(slot)
            assert trio.lowlevel.current_statistics().tasks_living == tasks
        # A jump larger than the inline limit gives the worker a task again.
        assert (await engine.compute(pid, 50))["count"] == expected_count(50)
        assert engine.stats().workers_started == 1


async def test_stopping_an_idle_worker_and_requests_during_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = hbtrio.MemoryStore()
    async with hbtrio.open_engine(store, cache_frequency=100) as engine:
        pid = await counter_process(engine, 30)
        await engine.compute(pid, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert engine.workers[pid].phase == "idle"
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.stop, pid)
            await trio.testing.wait_all_tasks_blocked()

            async def later() -> None:
                got.append(await engine.compute(pid, 30))

            nursery.start_soon(later)
        assert got == [{"count": expected_count(30), "at-slot": 30}]
        assert (await store.latest_snapshot(pid, 29))[0] == 10  # type: ignore[index]
        assert engine.stats().workers_stopped >= 1


async def test_now_with_only_the_definition_is_slot_zero() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await counter_process(engine, 0)
        assert await engine.now(pid) == {"count": 0, "at-slot": 0}
        assert await engine.compute(pid, 0) == {"count": 0, "at-slot": 0}


async def test_async_device_with_snapshot_hooks(tmp_path: Any) -> None:
    class Boxed:
        """Keeps its count inside a list; stores it as a string."""

        async def init(self, process: Any) -> dict[str, Any]:
            return {"box": [0]}

        async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
            return {"box": [state["box"][0] + assignment["body"]["n"]]}

        def snapshot(self, state: Any) -> dict[str, Any]:
            return {"saved": str(state["box"][0])}

        def restore(self, snap: Any) -> dict[str, Any]:
            return {"box": [int(snap["saved"])]}

    path = tmp_path / "boxed.sqlite"
    devices = {"boxed@1.0": Boxed()}
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices=devices, cache_frequency=4
    ) as engine:
        pid = await counter_process(engine, 10, "boxed@1.0")
        state = await engine.compute(pid, 10)
        assert state == {"box": (expected_count(10),), "at-slot": 10}
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices=devices, cache_frequency=4
    ) as engine:
        await engine.schedule(pid, {"n": 11})
        assert (await engine.now(pid))["box"] == (expected_count(11),)
        snap = await engine.store.latest_snapshot(pid, 10)
        assert snap == (10, {"saved": str(expected_count(10))})


async def test_device_error_on_the_inline_path_keeps_the_last_good_state() -> None:
    flaky = Flaky({3})  # plain: an idle worker's next slots are applied by the caller
    async with hbtrio.open_engine(devices={"flaky@1.0": flaky}) as engine:
        pid = await counter_process(engine, 5, "flaky@1.0")
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 4)
        assert (info.value.phase, info.value.attempted_slot) == ("compute", 3)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert engine.workers[pid].slot == 2  # slots 1 and 2 applied and kept
        assert engine.stats().leader_deaths == 0
        assert await engine.compute(pid, 5) == {"count": 15, "at-slot": 5}
        assert engine.stats().workers_started == 1
