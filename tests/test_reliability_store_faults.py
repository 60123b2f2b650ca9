"""Store faults: full disks, locked databases, failing and slow calls.

Faults are injected with `hbtrio.testing.FaultyStore` around both stores, and
for real with SQLite: another connection holding the write lock, and a
database that cannot grow (``PRAGMA max_page_count``, which makes SQLite
itself fail with SQLITE_FULL, exactly as on a full disk).

What every test checks: the caller gets a clear error (`StoreError`, or
`ComputeError` whose ``__cause__`` is one), nothing is half-done (a failed
schedule assigned nothing; a worker never holds a state the store does not
back), no worker crashes, and once the fault clears the same engine carries
on, without a restart, with correct answers (`audit_process` replays
everything stored).
"""

from __future__ import annotations

import inspect
import logging
import math
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import hbtrio
from hbtrio._devices import Devices
from hbtrio.testing import FaultyDevice, FaultyStore, audit_process, open_test_engine
from helpers import counter_process, definition, expected_count

STORES = ["memory", "sqlite"]


def make_store(kind: str, tmp_path: Path, **options: Any) -> hbtrio.Store:
    if kind == "memory":
        return hbtrio.MemoryStore()
    return hbtrio.SQLiteStore(tmp_path / "faults.sqlite", **options)


async def assert_backed(engine: hbtrio.Engine, store: hbtrio.Store, pid: str) -> None:
    """The worker's in-memory state is one the store holds (readable) for its slot."""
    info = engine.workers.get(pid)
    if info is None or info.slot < 0:
        return
    stored = await store.get_result(pid, info.slot)
    assert stored is not None, f"worker at slot {info.slot} but no stored result there"
    assert stored["at-slot"] == info.slot


def cause_of(kind: str) -> type[BaseException]:
    return sqlite3.OperationalError if kind in ("disk-full", "locked") else OSError


# --------------------------------------------------------------------------- the wrapper itself


def test_faulty_store_implements_the_whole_store_interface() -> None:
    public = {
        name
        for name, member in inspect.getmembers(hbtrio.Store)
        if not name.startswith("_") and callable(member)
    }
    assert public >= {"put_process", "latest_snapshot", "put_results_nowait", "flush"}
    missing = {name for name in public if name not in vars(FaultyStore)}
    assert not missing, f"FaultyStore does not delegate {missing}"
    assert not getattr(FaultyStore, "__abstractmethods__", None)


@pytest.mark.parametrize("kind", STORES)
async def test_without_faults_the_wrapper_is_transparent(kind: str, tmp_path: Path) -> None:
    device = FaultyDevice(hbtrio.Counter())
    store = FaultyStore(make_store(kind, tmp_path))
    devices = {"faulty@1.0": device}
    async with open_test_engine(store, devices=devices, cache_frequency=3) as engine:
        a = await counter_process(engine, 20)
        b = await counter_process(engine, 20, "faulty@1.0")
        assert (await engine.compute(a, 17))["count"] == expected_count(17)
        assert (await engine.now(b))["count"] == expected_count(20)
        await engine.stop(b)
        assert (await engine.compute(b, 11))["count"] == expected_count(11)
    async with open_test_engine(store, devices=devices) as engine:
        assert (await engine.now(a))["count"] == expected_count(20)
        for pid in (a, b):
            report = await audit_process(store, pid, devices)
            assert report.latest_slot == 20 and report.results >= 18
    assert store.calls["append_assignments"] == 2
    writes = ("put_results_nowait", "put_state_nowait", "put_states_nowait")
    assert sum(store.calls[name] for name in writes) > 0


def test_fault_targets_are_validated() -> None:
    store = FaultyStore(hbtrio.MemoryStore())
    with pytest.raises(ValueError, match="not store methods"):
        store.fail(methods="drop_table")
    with pytest.raises(ValueError, match="times"):
        store.fail(times=0)
    with pytest.raises(ValueError, match="after"):
        store.fail(after=-1)
    with pytest.raises(ValueError, match="seconds"):
        store.slow(-1.0)
    with pytest.raises(ValueError, match="error must be"):
        store.fail("meltdown")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FaultyStore(object())  # type: ignore[arg-type]
    # A fault on a *_nowait read is a fault on its async twin.
    fault = store.fail(methods="get_result_nowait")
    assert fault.methods == frozenset({"get_result"})


async def test_fault_counting_after_times_pid_and_clear() -> None:
    inner = hbtrio.MemoryStore()
    store = FaultyStore(inner)
    async with open_test_engine(store) as engine:
        a = await counter_process(engine, 0, nonce="a")
        b = await counter_process(engine, 0, nonce="b")
        fault = store.disk_full(methods="append_assignments", pid=a, after=1, times=2)
        assert await engine.schedule(a, {"n": 1}) == 1  # the first one is let through
        for _ in range(2):
            with pytest.raises(hbtrio.StoreError, match="database or disk is full"):
                await engine.schedule(a, {"n": 1})
            assert await engine.schedule(b, {"n": 1}) >= 1  # another process: untouched
        assert await engine.schedule(a, {"n": 1}) == 2  # times=2 used up
        assert (fault.skipped, fault.fired, fault.exhausted) == (1, 2, True)
        with store.fail("error", methods="append_assignments") as forever:
            for _ in range(3):
                with pytest.raises(hbtrio.StoreError):
                    await engine.schedule(a, {"n": 1})
        assert forever.fired == 3 and not forever.active
        assert await engine.schedule(a, {"n": 1}) == 3
        store.locked(methods="append_assignments")
        store.clear()
        assert store.faults == []
        assert await engine.schedule(a, {"n": 1}) == 4


async def test_custom_errors_are_raised_as_given() -> None:
    store = FaultyStore(hbtrio.MemoryStore())
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 0)
        store.fail(hbtrio.StoreError("quota exceeded"), methods="append_assignments", times=1)
        with pytest.raises(hbtrio.StoreError, match="quota exceeded"):
            await engine.schedule(pid, {"n": 1})
        store.fail(hbtrio.StoreError, methods="append_assignments", times=1)
        with pytest.raises(hbtrio.StoreError, match="injected fault in append_assignments"):
            await engine.schedule(pid, {"n": 1})
        assert await engine.schedule(pid, {"n": 1}) == 1


@pytest.mark.parametrize("kind", STORES)
async def test_the_restore_read_follows_the_faults_of_the_reads_it_stands_for(
    kind: str, tmp_path: Path
) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    async with open_test_engine(store, cache_frequency=5) as engine:
        pid = await counter_process(engine, 20)
        assert (await engine.compute(pid, 12))["count"] == expected_count(12)
        snapshot = await store.latest_snapshot(pid, 12)
        assert snapshot is not None and snapshot[0] == 10
        fault = store.fail(methods="latest_snapshot", times=1)
        with fault, pytest.raises(hbtrio.StoreError):
            await store.latest_snapshot(pid, 12, read_to=21)
        assert fault.fired == 1
        # A fault on get_assignments: nothing is read ahead, and the fault is left
        # for the caller's own read of the assignments (the fast path sends it there).
        with store.fail(methods="get_assignments") as fault:
            assert await store.latest_snapshot(pid, 12, read_to=21) == snapshot
            assert fault.fired == 0
            with pytest.raises(trio.WouldBlock):
                store.get_assignments_nowait(pid, 11, 21)
            with pytest.raises(hbtrio.StoreError):
                await store.get_assignments(pid, 11, 21)
        assert await store.latest_snapshot(pid, 12, read_to=21) == snapshot
        ahead = store.get_assignments_nowait(pid, 13, 21)  # not computed yet: in memory
        assert ahead and ahead == (await store.get_assignments(pid, 13, 21))[: len(ahead)]


# --------------------------------------------------------------------------- schedule and spawn


@pytest.mark.parametrize("fault", ["disk-full", "locked", "error"])
@pytest.mark.parametrize("kind", STORES)
async def test_schedule_is_durable_or_fails_loudly(kind: str, fault: str, tmp_path: Path) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 3)
        with store.fail(fault, methods="append_assignments", times=2) as injected:  # type: ignore[arg-type]
            with pytest.raises(hbtrio.StoreError) as one:
                await engine.schedule(pid, {"n": 100})
            with pytest.raises(hbtrio.StoreError) as many:
                await engine.schedule_many(pid, [{"n": 100}, {"n": 100}])
        assert injected.fired == 2
        for info in (one, many):
            assert isinstance(info.value.__cause__, cause_of(fault))
        # Nothing was assigned: the next schedule takes the next slot, no gap, no 100s.
        assert await engine.latest_slot(pid) == 3
        assert await engine.schedule(pid, {"n": 4}) == 4
        assert (await engine.now(pid))["count"] == expected_count(4)
    async with open_test_engine(store) as engine:  # and so it stays after a restart
        assert await engine.latest_slot(pid) == 4
        report = await audit_process(store, pid)
        assert report.latest_slot == 4


@pytest.mark.parametrize("kind", STORES)
async def test_spawn_is_durable_or_fails_loudly(kind: str, tmp_path: Path) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    async with open_test_engine(store) as engine:
        with store.disk_full(methods="put_process", times=1), pytest.raises(hbtrio.StoreError):
            await engine.spawn(definition())
        pid = hbtrio.message_id(definition())
        with pytest.raises(hbtrio.ProcessNotFound):
            await engine.latest_slot(pid)
        assert await engine.spawn(definition()) == pid
        assert await engine.schedule(pid, {"n": 1}) == 1


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("device", ["counter@1.0", "async@1.0"])
@pytest.mark.parametrize("kind", STORES)
async def test_refused_results_never_leave_unbacked_state(
    kind: str, device: str, tmp_path: Path
) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    devices = {"async@1.0": FaultyDevice(hbtrio.Counter())}
    async with open_test_engine(store, devices=devices) as engine:
        pid = await counter_process(engine, 30, device)
        fresh = await counter_process(engine, 30, device, nonce="fresh")
        assert (await engine.compute(pid, 5))["count"] == expected_count(5)
        with store.disk_full(methods="put_results_nowait") as fault:
            for slot in (7, 25):  # an idle worker a few slots away, and a worker task
                with pytest.raises(hbtrio.StoreError) as info:
                    await engine.compute(pid, slot)
                assert isinstance(info.value.__cause__, sqlite3.OperationalError)
                await assert_backed(engine, store, pid)
                assert engine.workers[pid].slot == 5
            with pytest.raises(hbtrio.StoreError):  # a worker that cannot even store slot 0
                await engine.compute(fresh, 3)
            await assert_backed(engine, store, fresh)
            # What is stored is still served.
            assert (await engine.compute(pid, 5))["count"] == expected_count(5)
            assert (await engine.compute(pid, 2))["count"] == expected_count(2)
        assert fault.fired >= 3
        # The fault is gone: the same engine carries on.
        assert (await engine.compute(pid, 25))["count"] == expected_count(25)
        assert (await engine.compute(fresh, 3))["count"] == expected_count(3)
        assert (await engine.now(pid))["count"] == expected_count(30)
        assert engine.stats().leader_deaths == 0
        for p in (pid, fresh):
            await audit_process(store, p, devices)


@pytest.mark.parametrize("kind", STORES)
async def test_backpressure_failure_reaches_the_waiters(kind: str, tmp_path: Path) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 2000)
        with store.fail("disk-full", methods="wait_writable", times=1):
            # Before its first chunk the worker asks the store whether it can
            # take more, and the store cannot: the slots asked for fail loudly.
            with pytest.raises(hbtrio.StoreError):
                await engine.compute(pid, 1500)
            await assert_backed(engine, store, pid)
        assert (await engine.compute(pid, 1500))["count"] == expected_count(1500)
        await audit_process(store, pid)


# --------------------------------------------------------------------------- reads


@pytest.mark.parametrize("kind", STORES)
async def test_read_failures_are_errors_not_crashes(kind: str, tmp_path: Path) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 40)
        # No worker yet: the definition cannot be read.
        with store.fail(methods="get_process", pid=pid):
            with pytest.raises(hbtrio.StoreError) as info:
                await engine.compute(pid, 3)
            assert isinstance(info.value.__cause__, OSError)
        # The schedule cannot be read: a ComputeError in phase get-schedule.
        with store.fail(methods="get_assignments", pid=pid):
            with pytest.raises(hbtrio.ComputeError) as info2:
                await engine.compute(pid, 20)
            assert info2.value.phase == "get-schedule"
            assert isinstance(info2.value.__cause__, hbtrio.StoreError)
            await assert_backed(engine, store, pid)
        # A stored result cannot be read.
        with store.fail(methods="get_result", pid=pid), pytest.raises(hbtrio.StoreError):
            await engine.compute(pid, 2)
        assert (await engine.compute(pid, 20))["count"] == expected_count(20)
        assert (await engine.compute(pid, 2))["count"] == expected_count(2)
        assert engine.stats().leader_deaths == 0


@pytest.mark.parametrize("kind", STORES)
async def test_snapshot_read_failure_in_a_running_worker_is_a_store_error(
    kind: str, tmp_path: Path
) -> None:
    """Regression: a store error while a worker skips ahead to a stored snapshot crashed it.

    (``_driver.py``, ``advance`` -> ``_skip_stored``: the `StoreError`
    escaped to the worker's crash handler, counted a leader death and logged
    a traceback; the waiters re-routed instead of hearing about the store.)
    """
    store = FaultyStore(make_store(kind, tmp_path))
    async with open_test_engine(store, cache_frequency=5) as engine:
        pid = await counter_process(engine, 40)
        assert (await engine.compute(pid, 12))["count"] == expected_count(12)
        # The stop snapshot at 12 is lost: results 11 and 12 are stored past snapshot 10.
        with store.disk_full(methods="put_results_nowait"):
            await engine.stop(pid)
        # Worker start reads the snapshot (let through); skipping ahead reads again: fails.
        fault = store.fail(methods="latest_snapshot", after=1, times=1)
        with fault, pytest.raises(hbtrio.StoreError):
            await engine.compute(pid, 13)
        assert fault.fired == 1
        assert engine.stats().leader_deaths == 0
        await assert_backed(engine, store, pid)
        assert (await engine.compute(pid, 13))["count"] == expected_count(13)
        await audit_process(store, pid)


class Packed:
    """A counter whose snapshots are packed; ``restore`` can be made to fail."""

    def __init__(self) -> None:
        self.fail_restore = False

    def init(self, process: Any) -> dict[str, int]:
        return {"count": 0}

    def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        return {**state, "count": state["count"] + assignment["body"].get("n", 0)}

    def snapshot(self, state: Any) -> dict[str, Any]:
        return {"packed": str(state["count"])}

    def restore(self, snapshot: Any) -> dict[str, Any]:
        if self.fail_restore:
            raise RuntimeError("cannot unpack")
        return {"count": int(snapshot["packed"])}


async def test_restore_failure_while_skipping_ahead_is_a_compute_error() -> None:
    """Regression: a failing ``restore`` when a live worker jumps to a later snapshot crashed it."""
    packed = Packed()
    store = hbtrio.MemoryStore()
    async with open_test_engine(store, devices={"packed@1.0": packed}) as engine:
        pid = await counter_process(engine, 40, "packed@1.0")
        assert (await engine.compute(pid, 3))["count"] == expected_count(3)
        # Results and snapshots get stored ahead of the (idle) worker without it.
        await hbtrio.compute_slot(store, Devices({"packed@1.0": packed}), pid, 12)
        assert engine.workers[pid].slot == 3
        packed.fail_restore = True
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 14)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert engine.stats().leader_deaths == 0
        assert engine.workers[pid].slot == 3  # kept its last good state
        packed.fail_restore = False
        assert (await engine.compute(pid, 14))["count"] == expected_count(14)


# --------------------------------------------------------------------------- slow, hanging stores


async def test_a_slow_store_for_one_process_does_not_stall_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FaultyStore(hbtrio.MemoryStore())
    async with open_test_engine(store) as engine:
        slow = await counter_process(engine, 5, nonce="slow")
        fast = await counter_process(engine, 5, nonce="fast")
        store.slow(10.0, pid=slow)
        done: dict[str, float] = {}

        async def use_slow() -> None:
            assert await engine.schedule(slow, {"n": 6}) == 6
            assert (await engine.now(slow))["count"] == expected_count(6)
            done["slow"] = trio.current_time()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(use_slow)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(6, 30):
                assert await engine.schedule(fast, {"n": n}) == n
                assert (await engine.now(fast))["count"] == expected_count(n)
            done["fast"] = trio.current_time()
        assert done["fast"] == start  # not one virtual second spent waiting for the slow disk
        assert done["slow"] >= start + 20.0  # schedule and the reads behind now each waited


@pytest.fixture
def thread_friendly_clock() -> trio.testing.MockClock:
    """Virtual time that jumps once everything has been idle for 1 ms of real time.

    (pytest-trio's ``autojump_clock`` jumps at 0 ms: with no deadline pending, Trio's
    loop then spins while the SQLite store's thread works, starving it of the GIL.)
    """
    return trio.testing.MockClock(autojump_threshold=0.001)


@pytest.mark.parametrize("kind", STORES)
async def test_a_hanging_write_is_cancellable_and_assigns_nothing(
    kind: str, tmp_path: Path, thread_friendly_clock: trio.testing.MockClock
) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 3)
        with store.hang(methods="append_assignments"):
            with trio.move_on_after(30) as scope:
                await engine.schedule(pid, {"n": 100})
            assert scope.cancelled_caught
            assert await engine.latest_slot(pid) == 3
            assert (await engine.compute(pid, 3))["count"] == expected_count(3)
        assert await engine.schedule(pid, {"n": 4}) == 4
        await audit_process(store, pid)


# --------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize("kind", STORES)
async def test_lost_snapshots_are_logged_and_recomputed(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore(make_store(kind, tmp_path))
    caplog.set_level(logging.WARNING, logger="hbtrio")
    async with open_test_engine(store, cache_frequency=4) as engine:
        pid = await counter_process(engine, 20)
        other = await counter_process(engine, 20, nonce="other")
        assert (await engine.compute(pid, 6))["count"] == expected_count(6)
        assert (await engine.compute(other, 7))["count"] == expected_count(7)
        with store.disk_full(methods="put_results_nowait") as fault:
            await engine.stop(pid)  # does not raise: a snapshot only saves recomputation
        assert fault.fired == 1
        assert "could not store its snapshot" in caplog.text
        # The next worker restores the snapshot before (slot 4) and recomputes 5, 6, ...
        assert (await engine.compute(pid, 9))["count"] == expected_count(9)
    async with open_test_engine(store, cache_frequency=4) as engine:
        assert (await engine.compute(pid, 15))["count"] == expected_count(15)
        assert (await engine.compute(other, 19))["count"] == expected_count(19)
        for p in (pid, other):
            await audit_process(store, p)


async def test_shutdown_with_snapshots_refused_logs_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FaultyStore(hbtrio.MemoryStore())
    caplog.set_level(logging.WARNING, logger="hbtrio")
    async with open_test_engine(store, cache_frequency=4) as engine:
        pid = await counter_process(engine, 20)
        assert (await engine.compute(pid, 6))["count"] == expected_count(6)
        store.disk_full(methods="put_results_nowait")
    assert "could not store its snapshot" in caplog.text
    store.clear()
    async with open_test_engine(store, cache_frequency=4) as engine:
        assert (await engine.now(pid))["count"] == expected_count(20)
    await audit_process(store, pid, require_results=True)


async def test_a_store_that_cannot_close_fails_loudly() -> None:
    inner = hbtrio.MemoryStore()
    store = FaultyStore(inner)
    with pytest.raises(hbtrio.StoreError, match="injected fault in close"):
        async with open_test_engine(store) as engine:
            pid = await counter_process(engine, 3)
            store.fail(methods="close", times=1)
    async with open_test_engine(store) as engine:
        assert (await engine.now(pid))["count"] == expected_count(3)


# --------------------------------------------------------------------------- real SQLite faults


class _Locker:
    """Another connection holding the database's write lock (BEGIN IMMEDIATE) in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.locked = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.locked.set()
            self.release.wait(60)
            conn.execute("COMMIT")
        finally:
            conn.close()

    async def __aenter__(self) -> _Locker:
        self.thread.start()
        await trio.to_thread.run_sync(self.locked.wait)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await trio.to_thread.run_sync(self.thread.join)


async def test_real_locked_database_write_waits_for_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite"
    async with open_test_engine(hbtrio.SQLiteStore(path)) as engine:
        pid = await counter_process(engine, 3)
        assert (await engine.now(pid))["count"] == expected_count(3)
        got: list[int] = []
        async with _Locker(path) as locker, trio.open_nursery() as nursery:

            async def schedule() -> None:
                got.append(await engine.schedule(pid, {"n": 4}))

            nursery.start_soon(schedule)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # parked behind the other connection's lock
            # Answers from memory go on meanwhile. (Anything needing a read would
            # queue behind the blocked write on the store's one I/O thread.)
            assert (await engine.compute(pid, 3))["count"] == expected_count(3)
            locker.release.set()
        assert got == [4]
        assert (await engine.now(pid))["count"] == expected_count(4)


async def test_real_locked_database_beyond_the_busy_timeout_fails_loudly(tmp_path: Path) -> None:
    """The store waits for a lock up to SQLite's busy timeout (5 s), then raises."""
    path = tmp_path / "locked.sqlite"
    store = hbtrio.SQLiteStore(path)
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 3)
        assert (await engine.now(pid))["count"] == expected_count(3)
        async with _Locker(path):
            with trio.fail_after(30), pytest.raises(hbtrio.StoreError) as info:
                await engine.schedule(pid, {"n": 100})
            cause = info.value.__cause__
            assert isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause)
            assert await engine.latest_slot(pid) == 3
            assert (await engine.compute(pid, 2))["count"] == expected_count(2)
        assert await engine.schedule(pid, {"n": 4}) == 4
        assert (await engine.now(pid))["count"] == expected_count(4)
    async with open_test_engine(hbtrio.SQLiteStore(path)) as engine:
        assert await engine.latest_slot(pid) == 4
        await audit_process(engine.store, pid, require_results=True)


class SmallDisk(hbtrio.SQLiteStore):
    """A SQLite store whose file can be kept from growing: a real SQLITE_FULL, as on a full disk."""

    async def set_max_pages(self, pages: int | None) -> None:
        def limit(conn: sqlite3.Connection) -> None:
            n = pages
            if n is None:
                (n,) = conn.execute("PRAGMA page_count").fetchone()
            conn.execute(f"PRAGMA max_page_count={n}")

        await self._run(limit, write=False)


@asynccontextmanager
async def full_disk(store: SmallDisk) -> AsyncIterator[None]:
    await store.set_max_pages(None)
    try:
        yield
    finally:
        await store.set_max_pages(1 << 30)


async def test_real_disk_full_schedule_fails_loudly_and_recovers(tmp_path: Path) -> None:
    """Regression: SQLITE_FULL rolled SQLite's transaction back and killed the I/O thread.

    (``_sqlite.py``, ``_run_batch``: ``ROLLBACK TO job`` raised "no such
    savepoint" on the I/O thread, which died; every call parked on the store
    then hung for ever, and could not even be cancelled.)
    """
    path = tmp_path / "full.sqlite"
    store = SmallDisk(path)
    returned: list[int] = []
    pad = "x" * 2000
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 0)
        async with full_disk(store):
            with trio.fail_after(30):
                for _ in range(1000):
                    try:
                        returned.append(await engine.schedule(pid, {"n": 1, "pad": pad}))
                    except hbtrio.StoreError as exc:
                        error = exc
                        break
                else:
                    pytest.fail("the disk never filled up")
            assert isinstance(error.__cause__, sqlite3.OperationalError)
            assert "full" in str(error.__cause__)
            assert await engine.latest_slot(pid) == len(returned)
            # Results are written behind: still readable while they cannot be written.
            with trio.fail_after(30):
                assert (await engine.now(pid))["count"] == len(returned)
                await assert_backed(engine, store, pid)
        with trio.fail_after(30):
            slot = await engine.schedule(pid, {"n": 1})
            assert slot == len(returned) + 1
            assert (await engine.now(pid))["count"] == slot
    async with open_test_engine(hbtrio.SQLiteStore(path)) as engine:
        assert await engine.latest_slot(pid) == slot
        report = await audit_process(engine.store, pid, require_results=True)
        assert report.results == slot + 1


async def test_real_disk_full_results_backlog_recovers_at_once(tmp_path: Path) -> None:
    """Regression: after a failed write-behind, the first requests after the disk recovered
    still failed with the old error (``_sqlite.py``, ``wait_writable`` raised the stale
    ``_write_error`` while a retry was in flight)."""
    path = tmp_path / "full.sqlite"
    store = SmallDisk(path, max_pending=5)
    async with open_test_engine(store) as engine:
        pid = await counter_process(engine, 0)
        await engine.schedule_many(pid, [{"n": 1, "pad": "y" * 3000}] * 2000)
        assert (await engine.compute(pid, 1))["count"] == 1
        async with full_disk(store):
            with trio.fail_after(30), pytest.raises(hbtrio.StoreError, match="full"):
                await engine.compute(pid, 1000)
            await assert_backed(engine, store, pid)
        with trio.fail_after(30):
            assert (await engine.compute(pid, 1800))["count"] == 1800
            assert (await engine.now(pid))["count"] == 2000
    async with open_test_engine(hbtrio.SQLiteStore(path)) as engine:
        await audit_process(engine.store, pid, require_results=True)


async def test_real_disk_full_at_shutdown_fails_loudly_and_loses_only_results(
    tmp_path: Path,
) -> None:
    path = tmp_path / "full.sqlite"
    store = SmallDisk(path)
    with pytest.raises(hbtrio.StoreError, match="full"):
        async with open_test_engine(store) as engine:
            pid = await counter_process(engine, 0)
            await engine.schedule_many(pid, [{"n": 1, "pad": "z" * 3000}] * 300)
            await store.set_max_pages(None)
            with trio.fail_after(30):
                assert (await engine.now(pid))["count"] == 300
    # Every assignment is there; the results that could not be written are recomputed.
    async with open_test_engine(hbtrio.SQLiteStore(path)) as engine:
        assert await engine.latest_slot(pid) == 300
        assert (await engine.now(pid))["count"] == 300
        await audit_process(engine.store, pid, require_results=True)


def test_math_inf_is_a_hang() -> None:
    store = FaultyStore(hbtrio.MemoryStore())
    assert store.hang().seconds == math.inf


class Decoder:
    """A device whose state can hold a str with a lone surrogate (from ``surrogateescape``)."""

    def init(self, process: Any) -> dict[str, str]:
        return {"text": ""}

    def compute(self, state: Any, assignment: Any) -> dict[str, str]:
        return {"text": assignment["body"]["raw"].decode("utf-8", "surrogateescape")}


async def test_a_state_cbor_cannot_encode_does_not_poison_other_processes(
    tmp_path: Path,
) -> None:
    """Regression: such a state failed SQLite's write-behind batch, retried for ever, so no
    process's results were written and closing raised (fixed in b884ca3: text must be
    valid Unicode, and one unencodable row cannot block the others)."""
    path = tmp_path / "poison.sqlite"
    async with open_test_engine(hbtrio.SQLiteStore(path), devices={"dec@1.0": Decoder()}) as e:
        bad = await counter_process(e, 0, "dec@1.0")
        good = await counter_process(e, 50)
        await e.schedule(bad, {"raw": b"\xff"})
        with pytest.raises(hbtrio.ComputeError) as info:  # invalid device output
            await e.now(bad)
        assert isinstance(info.value.__cause__, hbtrio.InvalidMessage)
        assert (await e.now(good))["count"] == expected_count(50)
    async with open_test_engine(hbtrio.SQLiteStore(path), devices={"dec@1.0": Decoder()}) as e:
        await audit_process(e.store, good, require_results=True)
        assert await e.store.get_result(bad, 0) is not None
