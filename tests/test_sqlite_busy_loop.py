"""SQLite on a busy event loop: write-behind stays bounded and durable writes keep moving.

These tests hold the store's I/O thread inside a job of their own (a
`threading.Event` it waits on) to stand for a disk or a GIL that does not
keep up, and look at what the event loop does meanwhile. Nothing here
measures time: bounds are counted in results, orders in jobs.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import hbtrio
from hbtrio import SQLiteStore
from hbtrio._driver import CHUNK
from hbtrio._sqlite._iothread import READS_PER_BATCH, Job
from hbtrio._sqlite._reads import read_assignments
from hbtrio._sqlite._writebehind import FLUSH_ROWS
from hbtrio._sqlite._writes import INSERT_RESULTS, insert_rows
from hbtrio.testing import open_test_engine

COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}


def hold_thread(store: SQLiteStore) -> tuple[threading.Event, threading.Event]:
    """Queue a job that keeps the I/O thread until released; returns (inside, release)."""
    inside, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        inside.set()
        release.wait()

    store._submit(Job(hold, False, callback=lambda _result: None))
    return inside, release


@asynccontextmanager
async def held(store: SQLiteStore) -> AsyncIterator[threading.Event]:
    """The I/O thread is busy in our job for the duration of the block (released after)."""
    inside, release = hold_thread(store)
    await trio.to_thread.run_sync(inside.wait)
    try:
        yield release
    finally:
        release.set()


async def processes(engine: hbtrio.Engine, n: int, slots: int, tag: str) -> list[str]:
    pids = []
    for i in range(n):
        pid = await engine.spawn({**COUNTER, "tag": tag, "i": i})
        await engine.schedule_many(pid, [{"n": 1}] * slots)
        pids.append(pid)
    return pids


class Peak:
    """The most results ever seen waiting to be written, sampled by the producers."""

    def __init__(self, store: hbtrio.Store) -> None:
        self.store, self.value = store, 0

    def sample(self) -> None:
        self.value = max(self.value, self.store.statistics().pending_results)


async def test_pending_results_stay_bounded_while_producers_run_inline(tmp_path: Path) -> None:
    """Requests served inline by idle workers, and requests that start a catch-up, all wait
    for the store before they compute: results waiting to be written exceed ``max_pending``
    by one chunk at most, however many producers there are. Before, inline requests never
    waited and a worker's first chunk did not either: the backlog grew without bound."""
    bound = 64
    store = SQLiteStore(tmp_path / "busy.sqlite", synchronous="NORMAL", max_pending=bound)
    async with open_test_engine(store) as engine:
        steppers = await processes(engine, 20, 150, "step")
        jumpers = await processes(engine, 8, 1000, "jump")
        for pid in steppers + jumpers:
            assert (await engine.compute(pid, 1))["count"] == 1  # idle workers at slot 1
        await store.flush()
        peak = Peak(store)
        progress = dict.fromkeys(steppers + jumpers, 1)

        async def step(pid: str) -> None:
            for slot in range(2, 151):
                assert (await engine.compute(pid, slot))["count"] == slot
                progress[pid] = slot
                peak.sample()

        async def jump(pid: str) -> None:
            assert (await engine.compute(pid, 1000))["count"] == 1000
            progress[pid] = 1000
            peak.sample()

        async with trio.open_nursery() as nursery, held(store):
            for pid in steppers:
                nursery.start_soon(step, pid)
            for pid in jumpers:
                nursery.start_soon(jump, pid)
            await trio.testing.wait_all_tasks_blocked()
            peak.sample()
            # Everybody waits for the disk now; nothing ran past the bound.
            assert bound < peak.value <= bound + CHUNK, peak.value
            assert sum(progress.values()) < 20 * 150 + 8 * 1000
        assert all(progress[p] == 150 for p in steppers)
        assert all(progress[p] == 1000 for p in jumpers)
        assert peak.value <= bound + CHUNK
        assert engine.stats().leader_deaths == 0
    async with open_test_engine(SQLiteStore(tmp_path / "busy.sqlite")) as engine:
        for pid in steppers[:3] + jumpers[:3]:
            latest = await engine.latest_slot(pid)
            stored = await engine.store.get_result(pid, latest)
            assert stored == {"count": latest, "at-slot": latest}


async def test_short_timeouts_do_not_get_around_the_bound(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A request that times out while it waits for the store computed nothing, so clients
    that retry at once with short timeouts cannot push past the bound either. (Virtual
    time, moved by hand once every task is blocked: the I/O thread is not a task.)"""
    bound = 32
    store = SQLiteStore(tmp_path / "busy.sqlite", synchronous="NORMAL", max_pending=bound)
    async with open_test_engine(store) as engine:
        pids = await processes(engine, 10, 200, "retry")
        for pid in pids:
            await engine.compute(pid, 1)
        await store.flush()
        peak = Peak(store)
        answered = timed_out = 0

        async def client(pid: str) -> None:
            nonlocal answered, timed_out
            slot = 2
            for _ in range(60):
                with trio.move_on_after(0.01):
                    assert (await engine.compute(pid, slot))["count"] == slot
                    answered += 1
                    slot += 1
                    peak.sample()
                    continue
                timed_out += 1
                peak.sample()

        async with held(store), trio.open_nursery() as nursery:
            for pid in pids:
                nursery.start_soon(client, pid)
            while answered + timed_out < 600:
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(0.01)
        assert timed_out > 0
        assert 0 < answered <= bound + 1
        assert peak.value <= bound + 1, peak.value
        # Released: the same clients get their answers.
        for pid in pids:
            assert (await engine.now(pid))["count"] == 200


async def test_writes_run_before_reads_queued_ahead_of_them(tmp_path: Path) -> None:
    """The I/O thread runs every write waiting (one transaction, one commit) before the
    next few reads, so a durable write never waits behind a long run of reads. Before,
    jobs ran in arrival order: the write came after every read queued before it."""
    store = SQLiteStore(tmp_path / "order.sqlite")
    await store.open()
    try:
        order: list[str] = []

        def job(name: str) -> Callable[[sqlite3.Connection], None]:
            return lambda conn: order.append(name)

        async with trio.open_nursery() as nursery, held(store):
            for i in range(3 * READS_PER_BATCH):
                nursery.start_soon(partial(store._run, job(f"read {i}"), write=False))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(partial(store._run, job("write"), write=True))
            await trio.testing.wait_all_tasks_blocked()
        assert order[0] == "write"
        assert sorted(order[1:]) == sorted(f"read {i}" for i in range(3 * READS_PER_BATCH))
    finally:
        await store.close()


async def test_a_schedule_waits_for_one_bounded_flush_at_most(tmp_path: Path) -> None:
    """A backlog of results goes to the disk in jobs of `FLUSH_ROWS` rows, so a durable
    schedule queued behind it shares a commit with the first job and waits for no other.
    Before, one job took the whole backlog: the schedule waited for all of it."""
    path = tmp_path / "flush.sqlite"
    backlog = 5 * FLUSH_ROWS
    store = SQLiteStore(path, synchronous="NORMAL", max_pending=10 * backlog)
    async with open_test_engine(store) as engine:
        big = await engine.spawn({**COUNTER, "tag": "big"})
        await engine.schedule_many(big, [{"n": 1}] * backlog)
        other = await engine.spawn({**COUNTER, "tag": "other"})
        await store.flush()
        done = trio.Event()

        async def schedule() -> None:
            assert await engine.schedule(other, {"n": 1}) == 1
            done.set()

        async with held(store) as release, trio.open_nursery() as nursery:
            store.put_states_nowait(
                big, 1, [{"count": s, "at-slot": s} for s in range(1, backlog + 1)], 10**9
            )
            nursery.start_soon(schedule)
            await trio.testing.wait_all_tasks_blocked()
            # Held again by the first round after the one that takes the schedule.
            inside2, release2 = hold_thread(store)
            release.set()
            try:
                await trio.to_thread.run_sync(inside2.wait)
                await trio.testing.wait_all_tasks_blocked()
                assert done.is_set()
                with sqlite3.connect(path) as conn:
                    (written,) = conn.execute("SELECT COUNT(*) FROM results").fetchone()
                assert written == FLUSH_ROWS  # the schedule's commit carried one flush job
            finally:
                release2.set()
        await store.flush()
        assert store.statistics().pending_results == 0
    with sqlite3.connect(path) as conn:
        (written,) = conn.execute("SELECT COUNT(*) FROM results").fetchone()
    assert written == backlog


@pytest.mark.parametrize("per_statement", [1, 4, 1024])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 1023, 1024, 1025, 3000])
def test_rows_are_inserted_in_a_few_statements(per_statement: int, count: int) -> None:
    """Full statements of ``per_statement`` rows, then one per binary digit of the rest."""
    conn = sqlite3.connect(":memory:", isolation_level=None)  # as the store's: no implicit BEGIN
    conn.execute("CREATE TABLE results (proc, slot, state, snapshot, PRIMARY KEY (proc, slot))")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    rows = [(7, s, bytes([s % 256]) * 3, s % 2) for s in range(count)]
    insert_rows(conn, INSERT_RESULTS, 4, rows, per_statement)
    conn.set_trace_callback(None)
    stored = conn.execute("SELECT proc, slot, state, snapshot FROM results ORDER BY slot")
    assert stored.fetchall() == rows
    full, rest = divmod(count, per_statement)
    assert len(statements) == full + bin(rest).count("1")


async def test_a_busy_loop_hands_the_interpreter_to_the_store(tmp_path: Path) -> None:
    """While the loop never sleeps and the I/O thread has been on one round for a while,
    the loop waits for that round now and then (that is how the thread gets the GIL). An
    idle loop never does: it sleeps in its poll anyway."""
    store = SQLiteStore(tmp_path / "gil.sqlite")
    await store.open()
    try:
        handoff: Any = store._handoff
        async with held(store):
            # Idle: everybody is blocked, the loop sleeps in its poll.
            with trio.move_on_after(0.05):
                await trio.sleep_forever()
            assert handoff.handoffs == 0
            # Busy: a task that only ever checkpoints keeps the loop from sleeping.
            with trio.fail_after(10):
                while handoff.handoffs < 2:
                    await trio.lowlevel.checkpoint()
    finally:
        await store.close()


async def test_a_run_of_assignments_is_read_in_one_statement(tmp_path: Path) -> None:
    """Stored runs come back in one row (one step of the I/O thread, not one per row);
    a run that does not decode as expected is read again row by row, as before."""
    path = tmp_path / "runs.sqlite"
    async with open_test_engine(SQLiteStore(path)) as engine:
        pid = await engine.spawn(COUNTER)
        await engine.schedule_many(pid, [{"n": n} for n in range(1, 501)])
        expected = await engine.store.get_assignments(pid, 0, 501)
    conn = sqlite3.connect(path, isolation_level=None)
    (rowid,) = conn.execute("SELECT id FROM processes WHERE pid = ?", (pid,)).fetchone()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    assert read_assignments(conn, rowid, pid, 1, 501) == expected[1:501]
    assert read_assignments(conn, rowid, pid, 7, 8) == expected[7:8]
    assert read_assignments(conn, rowid, pid, 600, 700) == []
    assert len(statements) == 3
    # Row 4 also holds row 5's bytes: joined, the run does not decode into slots 1..10.
    conn.set_trace_callback(None)
    row = hbtrio.encode(expected[4]) + hbtrio.encode(expected[5])
    conn.execute("UPDATE assignments SET assignment = ? WHERE proc = ? AND slot = 4", (row, rowid))
    statements.clear()
    conn.set_trace_callback(statements.append)
    assert read_assignments(conn, rowid, pid, 1, 11) == expected[1:11]
    assert len(statements) == 2
    conn.close()
