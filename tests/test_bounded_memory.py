"""What stays in memory is bounded: SQLite's caches and the scheduler's tails.

`SQLiteStore` keeps at most ``max_cached_assignments`` (and
``max_cached_bytes``) assignments that wait to be computed, and at most
``max_cached_processes`` processes that are neither pinned (a live worker)
nor waiting for writes; the `Scheduler` keeps at most ``max_tails`` tails it
is not using. Everything evicted is read again from the store, and reads
agree with what was written. Concurrent schedules never share a slot while
tails come and go (Hypothesis draws the interleavings).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hbtrio
from hbtrio import MemoryStore, Message, Scheduler, SQLiteStore, Store, freeze, verify_schedule
from hbtrio.testing import FaultyStore, open_test_engine

COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}
MiB = 1 << 20


def cached(store: SQLiteStore) -> int:
    """Assignments the store holds in memory right now, all processes together (those
    appended and those read ahead from the file)."""
    return sum(len(p.assignments) + len(p.ahead or ()) for p in store._procs.values())


async def test_cached_assignments_never_exceed_the_bound(tmp_path: Path) -> None:
    """Before, every assignment appended stayed in memory until its slot was computed."""
    rng = random.Random(5)
    store = SQLiteStore(tmp_path / "a.sqlite", max_cached_assignments=50)
    async with open_test_engine(store, max_idle=1e9) as engine:
        pids = [await engine.spawn({**COUNTER, "i": i}) for i in range(3)]
        scheduled = dict.fromkeys(pids, 0)
        for _ in range(60):
            pid = rng.choice(pids)
            n = rng.randint(1, 40)
            await engine.schedule_many(pid, [{"n": scheduled[pid] + k + 1} for k in range(n)])
            scheduled[pid] += n
            assert cached(store) <= 50
        assert sum(scheduled.values()) > 1000
        for pid in pids:
            # The newest are in memory, the rest come back from the file, in one piece.
            assignments = await store.get_assignments(pid, 0, scheduled[pid] + 1)
            verify_schedule(pid, assignments)
            assert [a["body"]["n"] for a in assignments[1:]] == list(range(1, scheduled[pid] + 1))
            last = scheduled[pid]
            assert (await engine.now(pid))["count"] == last * (last + 1) // 2
            assert cached(store) <= 50
        # Computed slots leave the cache; scheduled next are served from it at once.
        await engine.schedule(pids[0], {"n": 0})
        assert cached(store) >= 1
        assert (await engine.compute(pids[0], scheduled[pids[0]] + 1))["at-slot"] > 0


async def test_cached_assignment_bytes_never_exceed_the_bound(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "b.sqlite", max_cached_bytes=3 * MiB)
    async with open_test_engine(store) as engine:
        pid = await engine.spawn(COUNTER)
        for i in range(12):
            await engine.schedule(pid, {"n": 1, "blob": bytes([i]) * MiB})
            assert cached(store) <= 3
        assert (await engine.now(pid))["count"] == 12
        blobs = [a["body"]["blob"] for a in await store.get_assignments(pid, 1, 13)]
        assert blobs == [bytes([i]) * MiB for i in range(12)]


async def test_read_ahead_runs_are_served_from_memory_within_the_bounds(
    tmp_path: Path,
) -> None:
    """A restore reads the assignments after its snapshot in the snapshot's trip, and
    holds them as one run: the replay's reads come from it, a run counts against
    the bounds like the assignments it holds, and it goes once its slots are
    computed."""
    path = tmp_path / "r.sqlite"
    async with open_test_engine(SQLiteStore(path), cache_frequency=10) as engine:
        pids = [await engine.spawn({**COUNTER, "i": i}) for i in range(2)]
        for pid in pids:
            await engine.schedule_many(pid, [{"n": k} for k in range(1, 71)])
            await engine.compute(pid, 40)
    expected = {pid: await _schedule(path, pid) for pid in pids}
    store = SQLiteStore(path, max_cached_assignments=50)
    await store.open()
    try:
        first, second = pids
        found = await store.latest_snapshot(first, 70, read_to=71)
        assert found is not None and found[0] == 40
        reads = store.statistics().reads
        # Read from the run, in chunks and across its end; no trip to the file.
        assert store.get_assignments_nowait(first, 41, 51) == expected[first][41:51]
        assert store.get_assignments_nowait(first, 45, 100) == expected[first][45:71]
        assert store.get_assignments_nowait(first, 70, 71) == expected[first][70:71]
        with pytest.raises(trio.WouldBlock):
            store.get_assignments_nowait(first, 40, 41)  # before the run: not held
        assert store.statistics().reads == reads
        assert cached(store) <= 50
        # A second run does not fit beside the first: the older run goes, whole.
        found = await store.latest_snapshot(second, 70, read_to=71)
        assert found is not None and found[0] == 40
        assert cached(store) <= 50
        for start in (41, 69):
            with pytest.raises(trio.WouldBlock):
                store.get_assignments_nowait(first, start, start + 1)
        assert await store.get_assignments(first, 41, 51) == expected[first][41:51]
        assert store.get_assignments_nowait(second, 41, 71) == expected[second][41:71]
        # Computing the run's slots lets it go; what was not computed stays readable.
        states = [freeze({"count": k, "at-slot": k}) for k in range(41, 60)]
        store.put_states_nowait(second, 41, states, 10)
        assert store.get_assignments_nowait(second, 60, 71) == expected[second][60:71]
        states = [freeze({"count": k, "at-slot": k}) for k in range(60, 71)]
        store.put_states_nowait(second, 60, states, 10)
        assert cached(store) == 0
        assert store.get_result_nowait(second, 70) == states[-1]
        # The same through results stored one by one.
        await store.latest_snapshot(first, 70, read_to=71)
        assert cached(store) == 30  # 41..70, as one run
        store.put_results_nowait(first, [(k, freeze({"count": k}), None) for k in range(41, 71)])
        assert cached(store) == 0
    finally:
        await store.close()


async def _schedule(path: Path, pid: str) -> list[Message]:
    """The whole schedule of ``pid`` as the file holds it."""
    store = SQLiteStore(path)
    await store.open()
    try:
        latest = await store.latest_slot(pid)
        assignments = await store.get_assignments(pid, 0, latest + 1)
    finally:
        await store.close()
    verify_schedule(pid, assignments)
    return assignments


async def test_evicted_processes_are_read_again_correctly(tmp_path: Path) -> None:
    """Before, the store kept an entry for every process it ever touched."""
    path = tmp_path / "p.sqlite"
    store = SQLiteStore(path, max_cached_processes=3)
    reference = MemoryStore()
    async with open_test_engine(store) as engine, open_test_engine(reference) as model:
        pids = []
        for i in range(20):
            pid = await engine.spawn({**COUNTER, "i": i})
            assert await model.spawn({**COUNTER, "i": i}) == pid
            pids.append(pid)
        rng = random.Random(7)
        for _ in range(200):
            pid = rng.choice(pids)
            op = rng.random()
            if op < 0.4:
                n = rng.randint(1, 9)
                assert await engine.schedule(pid, {"n": n}) == await model.schedule(pid, {"n": n})
            elif op < 0.7:
                assert await engine.now(pid) == await model.now(pid)
            else:
                slot = rng.randint(0, await model.latest_slot(pid))
                assert await engine.compute(pid, slot) == await model.compute(pid, slot)
                assert await engine.latest_slot(pid) == await model.latest_slot(pid)
            if rng.random() < 0.2:
                await engine.stop(pid)  # its worker goes: the process is no longer pinned
        for pid in pids:
            await engine.stop(pid)
        await store.flush()
        assert len(store._procs) <= 3
        for pid in pids:
            latest = await model.latest_slot(pid)
            verify_schedule(pid, await store.get_assignments(pid, 0, latest + 1))
            assert await engine.now(pid) == await model.now(pid)


async def test_a_live_worker_keeps_its_process_in_memory(tmp_path: Path) -> None:
    """The engine pins a process while it has a worker: its inline path never loses the
    entry it reads and writes synchronously. Unpinned, the entries go."""
    store = SQLiteStore(tmp_path / "w.sqlite", max_cached_processes=2)
    async with open_test_engine(store, max_idle=1e9) as engine:
        live = [await engine.spawn({**COUNTER, "live": i}) for i in range(6)]
        for pid in live:
            await engine.schedule_many(pid, [{"n": 1}] * 20)
            assert (await engine.compute(pid, 1))["count"] == 1
        others = [await engine.spawn({**COUNTER, "other": i}) for i in range(10)]
        for pid in others:
            await engine.schedule(pid, {"n": 1})
        assert all(pid in store._procs for pid in live)
        for slot in range(2, 21):  # inline, one slot at a time, each worker
            for pid in live:
                assert (await engine.compute(pid, slot))["count"] == slot
        for pid in live:
            await engine.stop(pid)
        await store.flush()  # once their results are written, the entries can go
        assert len(store._procs) <= 2


async def test_memory_store_keeps_everything() -> None:
    """`MemoryStore` is memory by definition: pins change nothing, nothing is evicted."""
    store = MemoryStore()
    async with open_test_engine(store) as engine:
        pids = [await engine.spawn({**COUNTER, "i": i}) for i in range(50)]
        for pid in pids:
            await engine.schedule_many(pid, [{"n": 1}] * 30)
            await engine.stop(pid)
        assert len(store._procs) == 50
        assert all(len(store._procs[pid].assignments) == 31 for pid in pids)


# --------------------------------------------------------------------------- the scheduler's tails


async def test_the_scheduler_keeps_at_most_max_tails() -> None:
    store = MemoryStore()
    scheduler = Scheduler(store, max_tails=3)
    pids = [(await scheduler.spawn(freeze({**COUNTER, "i": i})))[0] for i in range(10)]
    assert len(scheduler._tails) == 3
    for round_ in range(1, 4):
        for pid in pids:
            assert await scheduler.schedule(pid, [{"n": round_}]) == [round_]
            assert len(scheduler._tails) <= 3
    for pid in pids:
        verify_schedule(pid, await store.get_assignments(pid, 0, 10))
        assert await scheduler.latest(pid) == 3
    with pytest.raises(hbtrio.ProcessNotFound):
        await scheduler.schedule("x" * 42 + "A", [{"n": 1}])
    assert "x" * 42 + "A" not in scheduler._tails  # no tail is kept for a process that is not


async def test_a_tail_in_use_is_not_evicted(autojump_clock: trio.testing.MockClock) -> None:
    """A schedule holding a tail's lock keeps it: a second schedule on that process waits
    for the same lock instead of reading a new tail and taking the same slot."""
    store = FaultyStore(MemoryStore())
    scheduler = Scheduler(store, max_tails=1)
    a, _ = await scheduler.spawn(freeze({**COUNTER, "name": "a"}))
    others = [(await scheduler.spawn(freeze({**COUNTER, "o": i})))[0] for i in range(3)]
    got: dict[str, list[int]] = {}

    async def schedule(name: str, pid: str) -> None:
        got[name] = await scheduler.schedule(pid, [{"n": 1, "who": name}])

    store.slow(10, methods="append_assignments", pid=a, times=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(schedule, "first", a)
        await trio.testing.wait_all_tasks_blocked()
        assert scheduler._tails[a].lock.locked()
        held = scheduler._tails[a]
        for i, pid in enumerate(others):  # each would evict a, if a could go
            await schedule(f"other {i}", pid)
        assert scheduler._tails[a] is held
        nursery.start_soon(schedule, "second", a)
        await trio.testing.wait_all_tasks_blocked()
        assert held.lock.statistics().tasks_waiting == 1
    assert sorted([got["first"], got["second"]]) == [[1], [2]]
    verify_schedule(a, await store.get_assignments(a, 0, 3))


class Jitter(FaultyStore):
    """Delegates to a store, awaiting a drawn number of checkpoints or virtual sleeps first."""

    def __init__(self, inner: Store, rng: random.Random) -> None:
        super().__init__(inner)
        self.rng = rng

    async def _enter(self, method: str, pid: str | None = None) -> None:
        await super()._enter(method, pid)
        if method in ("append_assignments", "latest_slot", "get_assignments"):
            choice = self.rng.random()
            if choice < 0.3:
                await trio.sleep(self.rng.choice([0.001, 0.01]))
            elif choice < 0.6:
                for _ in range(self.rng.randint(1, 3)):
                    await trio.lowlevel.checkpoint()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 4)),  # process, size, delay
        min_size=2,
        max_size=24,
    ),
    max_tails=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
    use_sqlite=st.booleans(),
)
async def test_concurrent_schedules_with_eviction_never_share_a_slot(
    plan: list[tuple[int, int, int]],
    max_tails: int,
    seed: int,
    use_sqlite: bool,
    tmp_path_factory: pytest.TempPathFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Clients on five processes, with tails evicted as they go (``max_tails`` down to 0)
    and store calls that yield a drawn number of times: every message gets its own slot,
    each client's in a row, the schedule has no gap and its hash chain verifies."""
    inner: Store
    if use_sqlite:
        path = tmp_path_factory.mktemp("evict") / "s.sqlite"
        inner = SQLiteStore(path, max_cached_processes=1, max_cached_assignments=2)
    else:
        inner = MemoryStore()
    rng = random.Random(seed)
    store = Jitter(inner, rng)
    await store.open()
    try:
        scheduler = Scheduler(store, max_tails=max_tails)
        pids = [(await scheduler.spawn(freeze({**COUNTER, "p": i})))[0] for i in range(5)]
        got: dict[str, dict[int, Message]] = {pid: {} for pid in pids}

        async def client(i: int, p: int, size: int, delay: int) -> None:
            for _ in range(delay):
                await trio.lowlevel.checkpoint()
            messages = [{"client": i, "k": k} for k in range(size)]
            slots = await scheduler.schedule(pids[p], messages)
            assert slots == list(range(slots[0], slots[0] + size)) if size else slots == []
            for slot, message in zip(slots, messages, strict=True):
                assert slot not in got[pids[p]], (pids[p], slot)
                got[pids[p]][slot] = freeze(message)

        async with trio.open_nursery() as nursery:
            for i, (p, size, delay) in enumerate(plan):
                nursery.start_soon(client, i, p, size, delay)
        for pid in pids:
            total = len(got[pid])
            assert sorted(got[pid]) == list(range(1, total + 1))
            assignments = await inner.get_assignments(pid, 0, total + 5)
            assert {a["slot"]: a["body"] for a in assignments[1:]} == got[pid]
            verify_schedule(pid, assignments)
            assert await scheduler.latest(pid) == total
    finally:
        await store.close()


def test_bounds_are_checked(tmp_path: Any) -> None:
    for option in ("max_cached_processes", "max_cached_assignments", "max_cached_bytes"):
        with pytest.raises(ValueError, match=option):
            SQLiteStore(tmp_path / "x.sqlite", **{option: -1})
    with pytest.raises(ValueError, match="max_tails"):
        Scheduler(MemoryStore(), max_tails=-1)
