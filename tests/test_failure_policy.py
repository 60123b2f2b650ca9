"""Recorded failures: a live device whose failed slot becomes that slot's result.

A live device with ``failures = "record"`` (or a definition with
``"on-failure": "record"``) does not stop its process at a failing slot: the
engine throws the instance away, rebuilds the state before the slot, stores
``{"error": ..., "error-kind": ...}`` as the slot's result with a snapshot,
and goes on. ``"on-failure": "stop"`` asks for the failure as a `ComputeError`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import hbtrio
import hbtrio.testing
from helpers import definition


class Tally:
    """A live device recording its failures; instances keep a running total."""

    failures = "record"

    def __init__(self) -> None:
        self.fail_at: set[int] = set()
        self.hang_at: set[int] = set()
        self.boots: list[int | None] = []
        self.closed = 0

    def boot(self, process: hbtrio.Message, snapshot: Any) -> TallyInstance:
        total = None if snapshot is None else int(snapshot.decode())
        self.boots.append(total)
        return TallyInstance(self, total or 0)


class TallyInstance:
    def __init__(self, device: Tally, total: int) -> None:
        self.device, self.total = device, total

    def compute(self, assignment: hbtrio.Message) -> dict[str, Any]:
        slot = assignment["slot"]
        self.total += assignment["body"]["n"]  # corrupted if what follows fails
        if slot in self.device.hang_at:
            threading.Event().wait(0.5)  # longer than the tests' slot_timeout
        if slot in self.device.fail_at:
            raise RuntimeError(f"bad message at {slot}\nsecond line")
        return {"total": self.total}

    def snapshot(self) -> bytes:
        return str(self.total).encode()

    def close(self) -> None:
        self.device.closed += 1


def expected_totals(ns: list[int], failed: set[int]) -> dict[int, int]:
    out, total = {}, 0
    for slot, n in enumerate(ns, 1):
        if slot not in failed:
            total += n
            out[slot] = total
    return out


async def test_a_failed_slot_is_recorded_and_the_process_goes_on() -> None:
    tally = Tally()
    tally.fail_at = {5}
    ns = [1, 2, 3, 4, 5, 6, 7]
    async with hbtrio.testing.open_test_engine(
        devices={"tally@1.0": tally}, cache_frequency=3
    ) as engine:
        pid = await engine.spawn(definition("tally@1.0"))
        await engine.schedule_many(pid, [{"n": n} for n in ns])
        failed = await engine.compute(pid, 5)
        assert failed == {
            "at-slot": 5,
            "error": "RuntimeError: bad message at 5",
            "error-kind": "failure",
        }
        # The state before slot 5 (10), not the corrupted instance's 15.
        assert (await engine.compute(pid, 7))["total"] == 10 + 6 + 7
        assert (await engine.compute(pid, 4))["total"] == 10
        # Rebuilt from the snapshot at 3, replaying slot 4; the failed instance closed.
        assert tally.boots == [None, 6]
        assert tally.closed == 1
        # The failed slot was stored with a snapshot: no later boot replays through it.
        found = await engine.store.latest_snapshot(pid, 5)
        assert found is not None and found[0] == 5


async def test_a_call_that_times_out_is_recorded_as_a_timeout() -> None:
    tally = Tally()
    tally.hang_at = {2}
    devices = {"tally@1.0": hbtrio.run_in_thread(tally)}
    async with hbtrio.testing.open_test_engine(devices=devices, slot_timeout=0.1) as engine:
        pid = await engine.spawn(definition("tally@1.0"))
        await engine.schedule_many(pid, [{"n": 1}, {"n": 2}, {"n": 3}])
        assert (await engine.compute(pid, 3))["total"] == 4
        failed = await engine.compute(pid, 2)
        assert failed["error-kind"] == "timeout"
        assert failed["error"] == "slot 2 ran out of its slot_timeout"


async def test_on_failure_stop_in_the_definition_keeps_the_failure_an_error() -> None:
    tally = Tally()
    tally.fail_at = {2}
    async with hbtrio.testing.open_test_engine(devices={"tally@1.0": tally}) as engine:
        pid = await engine.spawn({**definition("tally@1.0"), "on-failure": "stop"})
        await engine.schedule_many(pid, [{"n": 1}, {"n": 2}, {"n": 3}])
        for _ in range(2):
            with pytest.raises(hbtrio.ComputeError) as info:
                await engine.compute(pid, 3)
            assert info.value.attempted_slot == 2
        assert (await engine.compute(pid, 1))["total"] == 1


async def test_on_failure_record_in_the_definition_of_a_device_that_stops() -> None:
    class Strict(Tally):
        failures = "stop"

    tally = Strict()
    tally.fail_at = {1}
    async with hbtrio.testing.open_test_engine(devices={"strict@1.0": tally}) as engine:
        stopping = await engine.spawn(definition("strict@1.0"))
        recording = await engine.spawn({**definition("strict@1.0"), "on-failure": "record"})
        for pid in (stopping, recording):
            await engine.schedule_many(pid, [{"n": 1}, {"n": 2}])
        with pytest.raises(hbtrio.ComputeError):
            await engine.compute(stopping, 2)
        assert (await engine.compute(recording, 2))["total"] == 2


async def test_a_recorded_failure_survives_a_restart_and_is_never_recomputed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tally.sqlite"
    tally = Tally()
    tally.fail_at = {2}
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"tally@1.0": tally}, cache_frequency=10
    ) as engine:
        pid = await engine.spawn(definition("tally@1.0"))
        await engine.schedule_many(pid, [{"n": 1}, {"n": 2}, {"n": 3}])
        assert (await engine.compute(pid, 2))["error-kind"] == "failure"
    # The next engine's device would not fail at 2: the stored failure still stands,
    # and slot 3 is computed from the snapshot taken at the failed slot.
    again = Tally()
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"tally@1.0": again}, cache_frequency=10
    ) as engine:
        assert (await engine.compute(pid, 2))["error-kind"] == "failure"
        await engine.schedule(pid, {"n": 4})
        assert (await engine.compute(pid, 4))["total"] == 1 + 3 + 4
        assert again.boots == [1]  # booted from the snapshot stored with the failed slot


@settings(max_examples=25, deadline=None)
@given(
    ns=st.lists(st.integers(0, 9), min_size=1, max_size=25),
    failing=st.sets(st.integers(1, 25), max_size=6),
    cache_frequency=st.integers(1, 6),
    splits=st.lists(st.integers(1, 25), max_size=4),
)
def test_recorded_failures_match_the_model_and_a_replay(
    ns: list[int], failing: set[int], cache_frequency: int, splits: list[int]
) -> None:
    """Whatever fails and wherever requests land, results follow the model and audit clean."""
    failed = {s for s in failing if s <= len(ns)}
    expected = expected_totals(ns, failed)

    async def main() -> None:
        tally = Tally()
        tally.fail_at = failed
        devices = {"tally@1.0": tally}
        async with hbtrio.testing.open_test_engine(
            devices=devices, cache_frequency=cache_frequency
        ) as engine:
            pid = await engine.spawn(definition("tally@1.0"))
            await engine.schedule_many(pid, [{"n": n} for n in ns])
            for slot in [*(s for s in splits if s <= len(ns)), len(ns)]:
                await engine.compute(pid, slot)
                if slot % 2:
                    await engine.stop(pid)  # the next request boots from a snapshot
            for slot in range(1, len(ns) + 1):
                state = await engine.compute(pid, slot)
                if slot in failed:
                    assert state["error-kind"] == "failure"
                else:
                    assert state["total"] == expected[slot]
            report = await hbtrio.testing.audit_process(engine.store, pid, devices)
            assert report.results == len(ns) + 1 and report.missing_results == 0
        again = await hbtrio.testing.replay(
            definition("tally@1.0"), [{"n": n} for n in ns], devices
        )
        assert [s.get("total", s.get("error-kind")) for s in again[1:]] == [
            "failure" if slot in failed else expected[slot] for slot in range(1, len(ns) + 1)
        ]

    trio.run(main)


async def test_bad_failure_policies_are_refused() -> None:
    class Stateful:
        failures = "record"

        def init(self, process: hbtrio.Message) -> dict[str, int]:
            return {}

        def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, int]:
            return {}

    class Bogus(Tally):
        failures = "retry"

    with pytest.raises(TypeError, match="needs a live device"):
        async with hbtrio.open_engine(devices={"s@1.0": Stateful()}):
            pass
    with pytest.raises(TypeError, match="must be 'stop' or 'record'"):
        async with hbtrio.open_engine(devices={"b@1.0": Bogus()}):
            pass
    async with hbtrio.testing.open_test_engine(devices={"tally@1.0": Tally()}) as engine:
        with pytest.raises(hbtrio.InvalidMessage, match="on-failure"):
            await engine.spawn({**definition("tally@1.0"), "on-failure": "retry"})
        with pytest.raises(hbtrio.InvalidMessage, match="needs a live device"):
            await engine.spawn({**definition("counter@1.0"), "on-failure": "record"})


async def test_the_engine_can_choose_for_every_live_device() -> None:
    tally = Tally()  # records by its own choice
    tally.fail_at = {2}
    async with hbtrio.testing.open_test_engine(
        devices={"tally@1.0": tally}, on_failure="stop"
    ) as engine:
        stopping = await engine.spawn(definition("tally@1.0"))
        recording = await engine.spawn({**definition("tally@1.0"), "on-failure": "record"})
        for pid in (stopping, recording):
            await engine.schedule_many(pid, [{"n": 1}, {"n": 2}, {"n": 3}])
        with pytest.raises(hbtrio.ComputeError):
            await engine.compute(stopping, 3)
        assert (await engine.compute(recording, 3))["total"] == 4  # the definition wins
    with pytest.raises(ValueError, match="on_failure"):
        async with hbtrio.open_engine(on_failure="retry"):
            pass
