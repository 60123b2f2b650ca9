"""Device faults: devices that raise, hang, return junk, are non-deterministic or very slow.

Devices are wrapped in `hbtrio.testing.FaultyDevice`. Time is virtual
(``autojump_clock``, or ``mock_clock`` jumped by hand when a device blocks a
real thread), so "other processes are served meanwhile" is shown by the
virtual time at which they were answered, not by sleeping.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import hbtrio
from hbtrio.testing import (
    AuditError,
    FaultyDevice,
    assert_deterministic,
    audit_process,
    open_test_engine,
)
from helpers import Recording, counter_process, definition, expected_count


class PlainCounter:
    """Like ``counter@1.0``, but an ordinary (untrusted) device with plain methods."""

    def init(self, process: Any) -> dict[str, int]:
        return {"count": 0}

    def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        return {**state, "count": state["count"] + assignment["body"].get("n", 0)}


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "plain"])
async def test_a_raising_device_reports_phase_slot_and_cause(blocking: bool) -> None:
    device = FaultyDevice(PlainCounter(), errors={5: ValueError("bad input")}, blocking=blocking)
    async with open_test_engine(devices={"faulty@1.0": device}) as engine:
        pid = await counter_process(engine, 10, "faulty@1.0")
        errors: list[hbtrio.ComputeError] = []

        async def wait_for(slot: int) -> None:
            with pytest.raises(hbtrio.ComputeError) as info:
                await engine.compute(pid, slot)
            errors.append(info.value)

        async with trio.open_nursery() as nursery:
            for slot in (5, 6, 8, 8):
                nursery.start_soon(wait_for, slot)
        assert len({id(e) for e in errors}) == 4  # each waiter its own exception object
        for error in errors:
            assert error.phase == "compute"
            assert error.attempted_slot == 5
            assert error.pid == pid
            assert isinstance(error.__cause__, ValueError)
            assert "bad input" in str(error.__cause__)
        # The worker keeps its last good state and serves what it can.
        assert engine.workers[pid].slot == 4
        assert (await engine.compute(pid, 4))["count"] == expected_count(4)
        with pytest.raises(hbtrio.ComputeError):
            await engine.now(pid)
        # Fixed: the same engine carries on, and slots 1..4 were applied once each.
        device.clear()
        assert (await engine.now(pid))["count"] == expected_count(10)
        assert all(device.calls[s] == 1 for s in range(1, 5))
        # Tries of slot 5, besides now() and the fixed run: the async device's worker
        # task tried once for all four waiters; with a plain device the four requests
        # were each applied inline by their own task, one after another, each trying.
        assert device.calls[5] == (4 if blocking else 1) + 2
        assert engine.stats().leader_deaths == 0


async def test_a_transient_device_error_succeeds_on_the_next_request() -> None:
    device = FaultyDevice(PlainCounter(), errors={3: RuntimeError}, times=1)
    async with open_test_engine(devices={"faulty@1.0": device}) as engine:
        pid = await counter_process(engine, 5, "faulty@1.0")
        with pytest.raises(hbtrio.ComputeError, match="slot 3"):
            await engine.now(pid)
        assert (await engine.now(pid))["count"] == expected_count(5)


async def test_a_failing_init_is_slot_zero_and_nothing_is_stored() -> None:
    device = FaultyDevice(PlainCounter(), errors={0: OSError("no config")}, times=1)
    store = hbtrio.MemoryStore()
    async with open_test_engine(store, devices={"faulty@1.0": device}) as engine:
        pid = await counter_process(engine, 3, "faulty@1.0")
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 2)
        assert info.value.attempted_slot == 0 and isinstance(info.value.__cause__, OSError)
        assert await store.get_result(pid, 0) is None
        assert pid not in engine.workers
        assert (await engine.compute(pid, 2))["count"] == expected_count(2)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda d: FaultyDevice(d, invalid={3}),
        lambda d: FaultyDevice(d, invalid={3}, blocking=True),
    ],
    ids=["async", "plain"],
)
async def test_invalid_device_output_is_a_compute_error(wrap: Any) -> None:
    device = wrap(PlainCounter())
    async with open_test_engine(devices={"faulty@1.0": device}) as engine:
        pid = await counter_process(engine, 5, "faulty@1.0")
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.now(pid)
        assert info.value.attempted_slot == 3
        assert isinstance(info.value.__cause__, hbtrio.InvalidMessage)
        assert engine.workers[pid].slot == 2
        device.clear()
        assert (await engine.now(pid))["count"] == expected_count(5)
        await audit_process(engine.store, pid, {"faulty@1.0": PlainCounter()})


async def test_a_hanging_async_device_is_bounded_and_others_are_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = FaultyDevice(PlainCounter(), hangs={3})
    devices = {"faulty@1.0": device, "fine@1.0": FaultyDevice(PlainCounter())}
    async with open_test_engine(devices=devices, slot_timeout=5.0) as engine:
        stuck = await counter_process(engine, 6, "faulty@1.0")
        other = await counter_process(engine, 6, "fine@1.0")  # async too
        counter = await counter_process(engine, 6)
        start = trio.current_time()
        seen: dict[str, float] = {}

        async def hung() -> None:
            with pytest.raises(hbtrio.ComputeError) as info:
                await engine.now(stuck)
            assert isinstance(info.value.__cause__, trio.TooSlowError)
            assert info.value.attempted_slot == 3
            seen["stuck"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hung)
            await device.wait_hanging()
            assert (await engine.now(other))["count"] == expected_count(6)
            assert (await engine.now(counter))["count"] == expected_count(6)
            seen["others"] = trio.current_time()
        assert seen["others"] == start  # answered while slot 3 of `stuck` hung
        assert seen["stuck"] == start + 5.0  # the per-slot limit, exactly
        assert device.hanging == 0  # the hung call was cancelled, not leaked
        assert engine.workers[stuck].slot == 2
        device.clear()
        assert (await engine.now(stuck))["count"] == expected_count(6)


async def test_a_hanging_plain_device_in_a_thread_is_bounded(
    mock_clock: trio.testing.MockClock,
) -> None:
    device = FaultyDevice(PlainCounter(), hangs={2}, blocking=True)
    devices = {"threaded@1.0": hbtrio.run_in_thread(device)}
    try:
        async with open_test_engine(devices=devices, slot_timeout=30.0) as engine:
            stuck = await counter_process(engine, 4, "threaded@1.0")
            other = await counter_process(engine, 4)
            outcome: list[BaseException] = []

            async def hung() -> None:
                try:
                    await engine.now(stuck)
                except hbtrio.ComputeError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hung)
                await device.wait_hanging()  # a worker thread is stuck in slot 2
                # The event loop is free: another process is served, no time passes.
                assert (await engine.now(other))["count"] == expected_count(4)
                assert outcome == []
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(30.0)
            assert isinstance(outcome[0].__cause__, trio.TooSlowError)
            assert engine.workers[stuck].slot == 1
            device.clear()  # let the abandoned thread finish
            assert (await engine.now(stuck))["count"] == expected_count(4)
    finally:
        device.clear()


async def test_a_plain_device_that_blocks_cannot_be_preempted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Documented limit: slot_timeout cannot interrupt a plain device running on the loop."""
    device = FaultyDevice(PlainCounter(), delays={2: 0.05}, blocking=True)
    async with open_test_engine(devices={"plain@1.0": device}, slot_timeout=0.001) as engine:
        pid = await counter_process(engine, 3, "plain@1.0")
        assert (await engine.now(pid))["count"] == expected_count(3)  # no TooSlowError


async def test_a_very_slow_device_keeps_computing_for_the_callers_who_gave_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = FaultyDevice(PlainCounter(), delays=dict.fromkeys(range(1, 11), 100.0))
    async with open_test_engine(devices={"slow@1.0": device}, max_idle=10_000) as engine:
        slow = await counter_process(engine, 10, "slow@1.0")
        fast = await counter_process(engine, 10)
        start = trio.current_time()
        with trio.move_on_after(250):
            await engine.now(slow)
        assert trio.current_time() == start + 250
        assert (await engine.now(fast))["count"] == expected_count(10)
        assert trio.current_time() == start + 250  # not held up by the slow process
        assert engine.workers[slow].slot == 2  # the worker went on without the caller
        assert (await engine.now(slow))["count"] == expected_count(10)
        assert trio.current_time() == start + 1000
        assert all(device.calls[s] == 1 for s in range(1, 11))


async def test_slot_timeout_on_a_slow_device(autojump_clock: trio.testing.MockClock) -> None:
    device = FaultyDevice(PlainCounter(), delays={4: 100.0})
    async with open_test_engine(devices={"slow@1.0": device}, slot_timeout=50.0) as engine:
        pid = await counter_process(engine, 6, "slow@1.0")
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.now(pid)
        assert info.value.attempted_slot == 4
        assert isinstance(info.value.__cause__, trio.TooSlowError)
        device.delays[4] = 10.0
        assert (await engine.now(pid))["count"] == expected_count(6)


async def test_a_nondeterministic_device_is_pinned_by_stored_results_and_detected() -> None:
    device = FaultyDevice(PlainCounter(), nondeterministic={2})
    devices = {"noisy@1.0": device}
    store = hbtrio.MemoryStore()
    async with open_test_engine(store, devices=devices) as engine:
        pid = await counter_process(engine, 4, "noisy@1.0")
        first = await engine.compute(pid, 2)
        await engine.stop(pid)
        again = await engine.compute(pid, 2)
        assert hbtrio.message_id(first) == hbtrio.message_id(again)  # served from the store
        assert device.calls[2] == 1  # computed once: nothing was recomputed to disagree
    async with open_test_engine(store, devices=devices) as engine:
        assert hbtrio.message_id(await engine.compute(pid, 2)) == hbtrio.message_id(first)
    # The tools catch it: a replay disagrees with what is stored, and two replays disagree.
    with pytest.raises(AuditError, match="slot 2"):
        await audit_process(store, pid, devices)
    bodies = [{"n": n} for n in range(1, 5)]
    with pytest.raises(AuditError, match="not deterministic: slot 2"):
        await assert_deterministic(definition("noisy@1.0"), bodies, devices)
    states = await assert_deterministic(definition("noisy@1.0"), bodies, {"noisy@1.0": Recording()})
    assert [s["count"] for s in states] == [expected_count(s) for s in range(5)]


class Decoder:
    """Turns the body's bytes into text the way many real devices do: lossless, surrogates."""

    def init(self, process: Any) -> dict[str, str]:
        return {"text": ""}

    def compute(self, state: Any, assignment: Any) -> dict[str, str]:
        return {"text": assignment["body"]["raw"].decode("utf-8", "surrogateescape")}


async def test_a_state_that_cannot_be_encoded_is_invalid_device_output() -> None:
    """Regression: ``freeze`` accepted str values with lone surrogates, which have no CBOR
    form; such a state broke the SQLite write-behind and the HTTP layer (fixed in b884ca3)."""
    async with open_test_engine(devices={"dec@1.0": Decoder()}) as engine:
        pid = await counter_process(engine, 0, "dec@1.0")
        await engine.schedule(pid, {"raw": b"ok"})
        await engine.schedule(pid, {"raw": b"\xff"})
        assert (await engine.compute(pid, 1))["text"] == "ok"
        try:
            state = await engine.compute(pid, 2)
        except hbtrio.ComputeError as exc:
            assert isinstance(exc.__cause__, hbtrio.InvalidMessage)
        else:
            raise AssertionError(f"a state with no CBOR form was accepted: {state!r}")
