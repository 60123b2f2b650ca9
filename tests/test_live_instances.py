"""Live device instances (issue 11.3): booted once per worker, hot between slots, never trusted
after a failure.

A live device's ``boot(process, snapshot)`` returns an instance whose
``compute(assignment)`` returns each slot's result; the engine asks it for a
``snapshot()`` every ``cache_frequency`` slots and when the worker retires,
and ``close()``s it when the worker goes away. The instances here are mutable
objects that corrupt themselves when they fail: the engine must throw such an
instance away and rebuild it from the latest snapshot plus a replay.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import hbtrio
import hbtrio.testing
from helpers import definition


class Ledger:
    """A live device. Its instances keep a running total; ``boot`` and ``close`` are counted."""

    def __init__(self, *, snapshot_bytes: bool = False) -> None:
        self.boots: list[int | None] = []  # the total each instance was booted with
        self.closed = 0
        self.fail_at: set[int] = set()
        self.hang_at: set[int] = set()
        self.threads: set[int] = set()
        self.snapshot_bytes = snapshot_bytes
        self.live: list[LedgerInstance] = []

    def boot(self, process: hbtrio.Message, snapshot: Any) -> LedgerInstance:
        self.threads.add(threading.get_ident())
        if snapshot is None:
            total = 0
        elif isinstance(snapshot, bytes):
            total = int(snapshot.decode())
        else:
            total = snapshot["total"]
        self.boots.append(None if snapshot is None else total)
        instance = self.make_instance(total)
        self.live.append(instance)
        return instance

    def make_instance(self, total: int) -> LedgerInstance:
        return LedgerInstance(self, total)


class LedgerInstance:
    def __init__(self, device: Ledger, total: int) -> None:
        self.device, self.total, self.slots = device, total, 0

    def compute(self, assignment: hbtrio.Message) -> dict[str, Any]:
        device, slot = self.device, assignment["slot"]
        device.threads.add(threading.get_ident())
        self.total += assignment["body"]["n"]  # changed before it may fail: corrupted then
        self.slots += 1
        if slot in device.hang_at:
            threading.Event().wait(0.5)  # longer than the slot_timeout of the test
        if slot in device.fail_at:
            raise RuntimeError(f"failed at {slot}, after changing itself")
        return {"total": self.total}

    def snapshot(self) -> Any:
        if self.device.snapshot_bytes:
            return str(self.total).encode()
        return {"total": self.total}

    def close(self) -> None:
        self.device.closed += 1
        self.device.live.remove(self)


def totals(ns: list[int]) -> list[int]:
    out, total = [], 0
    for n in ns:
        total += n
        out.append(total)
    return out


async def test_one_instance_stays_hot_slot_after_slot() -> None:
    ledger = Ledger()
    async with hbtrio.testing.open_test_engine(devices={"ledger@1.0": ledger}) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        ns = list(range(1, 21))
        for slot, n in enumerate(ns, 1):
            await engine.schedule(pid, {"n": n})
            assert (await engine.compute(pid, slot))["total"] == totals(ns)[slot - 1]
        assert ledger.boots == [None]  # booted once, for slot 0
        assert ledger.live[0].slots == 20
        assert (await engine.compute(pid, 0)) == {"at-slot": 0}  # slot 0 of a live device
    assert ledger.closed == 1 and not ledger.live  # closed when the worker went away


@pytest.mark.parametrize("snapshot_bytes", [False, True])
async def test_snapshots_every_cache_frequency_and_on_retire(
    snapshot_bytes: bool, tmp_path: Path
) -> None:
    ledger = Ledger(snapshot_bytes=snapshot_bytes)
    path = tmp_path / "ledger.sqlite"
    ns = [5, 1, 2, 3, 4, 6, 7]
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"ledger@1.0": ledger}, cache_frequency=3
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": n} for n in ns])
        assert (await engine.compute(pid, 7))["total"] == sum(ns)
        store = engine.store
        found = await store.latest_snapshot(pid, 5)
        assert found is not None and found[0] == 3
        await engine.stop(pid)  # retiring: a snapshot at its slot, 7
        found = await store.latest_snapshot(pid, 100)
        assert found is not None and found[0] == 7
        assert ledger.closed == 1
    # A new engine on the file: the worker boots from the snapshot at 7, not from slot 0.
    ledger2 = Ledger(snapshot_bytes=snapshot_bytes)
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"ledger@1.0": ledger2}, cache_frequency=3
    ) as engine:
        await engine.schedule(pid, {"n": 10})
        assert (await engine.compute(pid, 8))["total"] == sum(ns) + 10
        assert ledger2.boots == [sum(ns)]
        assert engine.statistics().slots_computed == 1  # only slot 8


async def test_a_failed_instance_is_thrown_away_and_rebuilt_from_snapshot_and_replay() -> None:
    ledger = Ledger()
    ledger.fail_at = {5}
    ns = [1, 2, 3, 4, 5, 6, 7]
    async with hbtrio.testing.open_test_engine(
        devices={"ledger@1.0": ledger}, cache_frequency=2
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": n} for n in ns])
        assert (await engine.compute(pid, 4))["total"] == 10
        for _ in range(2):  # a failure every time it is tried; never from a corrupted instance
            with pytest.raises(hbtrio.ComputeError) as info:
                await engine.compute(pid, 5)
            assert info.value.attempted_slot == 5
            assert isinstance(info.value.__cause__, RuntimeError)
        assert ledger.closed == 2  # each corrupted instance was closed
        ledger.fail_at = set()
        assert (await engine.compute(pid, 7))["total"] == sum(ns)  # not sum(ns) + 5 + 5
        # Rebuilt from the snapshot at 4 (cache_frequency 2), replaying nothing after it.
        assert ledger.boots[0] is None and ledger.boots[-1] == 10
        assert (await engine.compute(pid, 4))["total"] == 10  # stored results are untouched


async def test_a_failure_on_the_worker_task_rebuilds_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    ledger.fail_at = {30}
    async with hbtrio.testing.open_test_engine(
        devices={"ledger@1.0": ledger}, cache_frequency=7
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": 1}] * 40)
        with pytest.raises(hbtrio.ComputeError):
            await engine.compute(pid, 40)  # far ahead: the worker's task computes
        assert engine.workers[pid].slot == 29
        ledger.fail_at = set()
        assert (await engine.compute(pid, 40))["total"] == 40
        assert ledger.boots == [None, 28]  # the latest snapshot at or below 29


async def test_recomputing_an_earlier_slot_never_touches_the_hot_instance() -> None:
    ledger = Ledger()
    store = hbtrio.MemoryStore()
    async with hbtrio.testing.open_test_engine(
        store, devices={"ledger@1.0": ledger}, cache_frequency=4
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": n} for n in range(1, 11)])
        assert (await engine.compute(pid, 10))["total"] == 55
        hot = ledger.live[0]
        devices = hbtrio._devices.Devices({"ledger@1.0": ledger})
        again = await hbtrio.compute_slot(store, devices, pid, 6, cache_frequency=4)
        assert again["total"] == 21  # stored: no instance needed
        # Without a stored result a fresh instance is booted and closed; the hot one is unmoved.
        driver = await hbtrio.ProcessRuntime.load(pid, store, devices, 4)
        results = await driver.replay(
            await store.get_assignments(pid, 5, 7), await store.latest_snapshot(pid, 4)
        )
        await driver.close()
        assert [r["total"] for r in results if r is not None] == [15, 21]
        assert ledger.live == [hot] and hot.total == 55 and hot.slots == 10
        assert (await engine.compute(pid, 10))["total"] == 55


async def test_blocking_instances_run_in_threads_bounded_by_slot_timeout() -> None:
    ledger = Ledger()
    ledger.hang_at = {3}
    devices = {"ledger@1.0": hbtrio.run_in_thread(ledger)}
    async with hbtrio.testing.open_test_engine(
        devices=devices, slot_timeout=0.1, cache_frequency=1
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}])
        assert (await engine.compute(pid, 2))["total"] == 3
        assert threading.get_ident() not in ledger.threads  # never on the event loop
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 3)
        assert isinstance(info.value.__cause__, trio.TooSlowError)
        ledger.hang_at = set()
        assert (await engine.compute(pid, 4))["total"] == 10
        assert ledger.boots == [None, 3]  # the abandoned instance was not used again


async def test_an_async_live_device() -> None:
    class AsyncLedger(Ledger):
        async def boot(self, process: hbtrio.Message, snapshot: Any) -> Any:  # type: ignore[override]
            await trio.lowlevel.checkpoint()
            instance = Ledger.boot(self, process, snapshot)

            class Async:
                async def compute(self, a: hbtrio.Message) -> dict[str, Any]:
                    await trio.lowlevel.checkpoint()
                    return instance.compute(a)

                async def snapshot(self) -> Any:
                    return instance.snapshot()

                async def close(self) -> None:
                    instance.close()

            return Async()

    ledger = AsyncLedger()
    async with hbtrio.testing.open_test_engine(
        devices={"ledger@1.0": ledger}, cache_frequency=2
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": n} for n in range(1, 6)])
        assert (await engine.compute(pid, 5))["total"] == 15
        ledger.fail_at = {6}
        await engine.schedule(pid, {"n": 6})
        with pytest.raises(hbtrio.ComputeError):
            await engine.compute(pid, 6)
        ledger.fail_at = set()
        assert (await engine.compute(pid, 6))["total"] == 21
        assert ledger.boots == [None, 10]  # rebuilt at 4, replaying 5
    assert ledger.closed == 2


async def test_a_live_process_replays_deterministically() -> None:
    states = await hbtrio.testing.assert_deterministic(
        definition("ledger@1.0"), [{"n": n} for n in range(1, 8)], {"ledger@1.0": Ledger()}
    )
    assert [s["total"] for s in states[1:]] == totals(list(range(1, 8)))


async def test_an_audit_checks_a_live_process_snapshots_by_replay(tmp_path: Path) -> None:
    ledger = Ledger()
    store = hbtrio.SQLiteStore(tmp_path / "audit.sqlite")
    async with hbtrio.open_engine(store, devices={"ledger@1.0": ledger}, cache_frequency=3) as e:
        pid = await e.spawn(definition("ledger@1.0"))
        await e.schedule_many(pid, [{"n": n} for n in range(1, 11)])
        await e.compute(pid, 10)
    await store.open()
    try:
        report = await hbtrio.testing.audit_process(store, pid, {"ledger@1.0": Ledger()})
    finally:
        await store.close()
    assert (report.results, report.snapshots) == (11, 5)  # 0, 3, 6, 9 and the retire's 10


class Imaged:
    """A live device whose instances start from a blob the definition names (``"image"``)."""

    def __init__(self) -> None:
        self.hosts: list[hbtrio.DeviceHost] = []

    def attach(self, host: hbtrio.DeviceHost) -> None:
        self.hosts.append(host)

    async def boot(self, process: hbtrio.Message, snapshot: Any) -> LedgerInstance:
        (host,) = self.hosts
        start = int(await host.get_blob(process["image"]))
        ledger = Ledger()
        return LedgerInstance(ledger, start if snapshot is None else snapshot["total"])


async def test_attach_hands_devices_the_engines_blobs_and_slot_timeout() -> None:
    imaged = Imaged()
    devices = {"imaged@1.0": imaged, "again@1.0": imaged}  # one object: attached once
    async with hbtrio.testing.open_test_engine(devices=devices, slot_timeout=7.0) as engine:
        assert [h.slot_timeout for h in imaged.hosts] == [7.0]
        image = await engine.put_blob(b"100")
        pid = await engine.spawn({**definition("imaged@1.0"), "image": image})
        await engine.schedule(pid, {"n": 5})
        assert (await engine.compute(pid, 1))["total"] == 105
        missing = await engine.spawn({**definition("imaged@1.0"), "image": "A" * 43})
        await engine.schedule(missing, {"n": 5})
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(missing, 1)
        assert isinstance(info.value.__cause__, hbtrio.BlobNotFound)


async def test_a_failing_attach_fails_open_engine_and_releases_the_store(tmp_path: Path) -> None:
    class Refuses:
        def attach(self, host: hbtrio.DeviceHost) -> None:
            raise RuntimeError("no licence for this engine")

    path = tmp_path / "x.sqlite"
    with pytest.raises(RuntimeError, match="no licence"):
        async with hbtrio.open_engine(hbtrio.SQLiteStore(path), devices={"r@1.0": Refuses()}):
            pytest.fail("the block must not run")
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path)):
        pass  # the file is free again


class PickyInstance(LedgerInstance):
    """An instance that cannot take its snapshot at its device's ``snapshot_fail_at`` slots."""

    device: PickyLedger
    at: int | None = None  # the slot it stands at, once it has computed one

    def compute(self, assignment: hbtrio.Message) -> dict[str, Any]:
        self.at = assignment["slot"]
        return super().compute(assignment)

    def snapshot(self) -> Any:
        if self.at in self.device.snapshot_fail_at:
            raise RuntimeError(f"no snapshot at {self.at}")
        self.device.snapshots.append(self.at)
        return super().snapshot()


class PickyLedger(Ledger):
    def __init__(self) -> None:
        super().__init__()
        self.snapshot_fail_at: set[int] = set()
        self.snapshots: list[int | None] = []  # the slot of each snapshot taken

    def make_instance(self, total: int) -> LedgerInstance:
        return PickyInstance(self, total)


@pytest.mark.parametrize("path", ["next-slot", "inline-batch", "worker-task"])
async def test_a_slot_whose_snapshot_fails_is_not_stored_on_any_path(
    path: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The request's next slot, a few slots applied by the requesting task, or the worker's
    task: each fails the slot whose snapshot failed, stores nothing for it, and stands
    before it."""
    ledger = PickyLedger()
    store = hbtrio.MemoryStore()
    async with hbtrio.testing.open_test_engine(
        store, devices={"ledger@1.0": ledger}, cache_frequency=2
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": 1}] * 20)
        await engine.compute(pid, 1)
        ledger.snapshot_fail_at = {2}
        target = {"next-slot": 2, "inline-batch": 3, "worker-task": 20}[path]
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, target)
        assert info.value.attempted_slot == 2 and "snapshot failed" in str(info.value)
        assert await store.get_result(pid, 2) is None
        assert engine.workers[pid].slot == 1
        ledger.snapshot_fail_at = set()
        assert (await engine.compute(pid, 2))["total"] == 2
        found = await store.latest_snapshot(pid, 2)
        assert found is not None and found[0] == 2


async def test_booting_at_the_snapshot_of_slot_0_does_not_snapshot_slot_0_again() -> None:
    ledger = PickyLedger()
    async with hbtrio.testing.open_test_engine(
        devices={"ledger@1.0": ledger}, cache_frequency=100
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.compute(pid, 0)
        await engine.stop(pid)  # its snapshot at slot 0 is stored already
        assert ledger.snapshots == [None]
        await engine.schedule(pid, {"n": 1})
        assert (await engine.compute(pid, 1))["total"] == 1
        assert ledger.boots == [None, 0]  # the second from the snapshot at slot 0
        assert ledger.snapshots == [None]  # and slot 0 was not snapshotted (and stored) again


async def test_an_instance_whose_call_was_cancelled_is_never_snapshotted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The engine closing past its grace period cancels an awaited compute halfway: that
    instance may have changed, so it is thrown away, not snapshotted at its last slot."""

    class Halfway:
        hang = True

        def __init__(self, total: int) -> None:
            self.total = total

        async def compute(self, assignment: hbtrio.Message) -> dict[str, Any]:
            self.total += assignment["body"]["n"]  # changed, then interrupted
            if assignment["slot"] == 2 and self.hang:
                await trio.sleep(1000)
            return {"total": self.total}

        async def snapshot(self) -> dict[str, Any]:
            return {"total": self.total}

    class Device:
        async def boot(self, process: hbtrio.Message, snapshot: Any) -> Halfway:
            return Halfway(0 if snapshot is None else snapshot["total"])

    store = hbtrio.MemoryStore()
    devices = {"halfway@1.0": Device()}
    async with hbtrio.open_engine(
        store, devices=devices, shutdown_grace=1.0, cache_frequency=10
    ) as engine:
        pid = await engine.spawn(definition("halfway@1.0"))
        await engine.schedule_many(pid, [{"n": 5}, {"n": 100}])
        assert (await engine.compute(pid, 1))["total"] == 5
        with trio.move_on_after(1):
            await engine.compute(pid, 2)  # still computing when the block is left
    found = await store.latest_snapshot(pid, 10)
    assert found is not None and found[0] == 0  # no snapshot of the interrupted instance
    Halfway.hang = False
    async with hbtrio.open_engine(store, devices=devices, cache_frequency=10) as engine:
        assert (await engine.compute(pid, 2))["total"] == 105  # not 205


class Batched(Ledger):
    """A ledger whose instances also compute consecutive slots in one call (``compute_many``)."""

    def __init__(self, *, short: bool = False) -> None:
        super().__init__()
        self.batches: list[list[int]] = []
        self.short = short  # a compute_many that leaves out the last result

    def boot(self, process: hbtrio.Message, snapshot: Any) -> BatchedInstance:
        base = super().boot(process, snapshot)
        instance = BatchedInstance(self, base.total)
        self.live[-1] = instance
        return instance


class BatchedInstance(LedgerInstance):
    def compute_many(self, assignments: list[hbtrio.Message], out: list[Any]) -> None:
        device = self.device
        assert isinstance(device, Batched)
        device.batches.append([a["slot"] for a in assignments])
        todo = assignments[:-1] if device.short else assignments
        for assignment in todo:
            out.append(self.compute(assignment))  # noqa: PERF401 - one by one: a failure keeps those before


@pytest.mark.parametrize("threaded", [False, True])
async def test_compute_many_takes_runs_of_slots_up_to_each_snapshot_point(threaded: bool) -> None:
    batched = Batched()
    device: object = hbtrio.run_in_thread(batched) if threaded else batched
    ns = list(range(1, 101))
    async with hbtrio.testing.open_test_engine(
        devices={"ledger@1.0": device}, cache_frequency=40
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": n} for n in ns])
        assert (await engine.compute(pid, 100))["total"] == sum(ns)
        for slot in (1, 39, 40, 41, 77, 100):
            assert (await engine.compute(pid, slot))["total"] == totals(ns)[slot - 1]
        slots = [s for batch in batched.batches for s in batch]
        if not threaded:  # plain calls on the event loop: inline, one by one, no hop to share
            assert slots == []
            return
        assert slots == list(range(1, 101))  # every slot once, in order
        for batch in batched.batches:
            assert len(batch) <= hbtrio._driver.MANY_MAX
            assert not any(s % 40 == 0 for s in batch[:-1])  # a snapshot point ends a batch
        found = await engine.store.latest_snapshot(pid, 99)
        assert found is not None and found[0] == 80


async def test_a_failure_inside_compute_many_keeps_the_slots_before_it() -> None:
    batched = Batched()
    batched.fail_at = {7}
    async with hbtrio.testing.open_test_engine(
        devices={"ledger@1.0": hbtrio.run_in_thread(batched)}, cache_frequency=5
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": 1}] * 12)
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 12)
        assert info.value.attempted_slot == 7
        assert batched.batches[0] == [1, 2, 3, 4, 5]  # up to the snapshot point
        assert (await engine.compute(pid, 6))["total"] == 6  # stored before the failure
        batched.fail_at = set()
        assert (await engine.compute(pid, 12))["total"] == 12
        assert batched.boots[-1] == 5  # rebuilt from the snapshot at 5, slot 6 replayed


async def test_a_recorded_failure_inside_compute_many() -> None:
    class Recording(Batched):
        failures = "record"

    batched = Recording()
    batched.fail_at = {3}
    async with hbtrio.testing.open_test_engine(
        devices={"ledger@1.0": hbtrio.run_in_thread(batched)}, cache_frequency=100
    ) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": 1}] * 10)
        assert (await engine.compute(pid, 10))["total"] == 9  # slot 3's message left out
        assert batched.batches[0] == list(range(1, 11))
        assert (await engine.compute(pid, 3))["error-kind"] == "failure"


async def test_a_compute_many_that_returns_too_few_results_fails_the_missing_slot() -> None:
    batched = Batched(short=True)
    devices = {"ledger@1.0": hbtrio.run_in_thread(batched)}
    async with hbtrio.testing.open_test_engine(devices=devices, cache_frequency=100) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": 1}] * 4)
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 4)
        assert isinstance(info.value.__cause__, hbtrio.InvalidMessage)
        assert "compute_many returned" in str(info.value.__cause__)


async def test_a_compute_many_that_raises_after_its_last_result_fails_its_last_slot() -> None:
    class RaisesLate(Batched):
        def boot(self, process: hbtrio.Message, snapshot: Any) -> BatchedInstance:
            instance = super().boot(process, snapshot)
            many = instance.compute_many

            def compute_many(assignments: list[hbtrio.Message], out: list[Any]) -> None:
                many(assignments, out)
                if self.fail_at:
                    raise RuntimeError("failed after appending every result")

            instance.compute_many = compute_many  # type: ignore[method-assign]
            return instance

    batched = RaisesLate()
    batched.fail_at = {4}
    devices = {"ledger@1.0": hbtrio.run_in_thread(batched)}
    async with hbtrio.testing.open_test_engine(devices=devices, cache_frequency=100) as engine:
        pid = await engine.spawn(definition("ledger@1.0"))
        await engine.schedule_many(pid, [{"n": 1}] * 3)
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 3)
        assert info.value.attempted_slot == 3  # in the batch, not the unscheduled slot 4
        assert (await engine.compute(pid, 2))["total"] == 2
        batched.fail_at = set()
        assert (await engine.compute(pid, 3))["total"] == 3
