"""The store contract, for every store; then what only the SQLite file can show."""

from __future__ import annotations

import logging
import random
import sqlite3
from functools import partial
from typing import TYPE_CHECKING, Any

import cbor2
import pytest
import trio
import trio.testing

import hbtrio
from hbtrio import Message, SQLiteStore, Store, StoreError, compute_slot, freeze, message_id
from hbtrio._devices import Devices
from hbtrio._scheduler import make_assignment, verify_schedule

if TYPE_CHECKING:
    from conftest import StoreFactory

COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}


class Proc:
    """One process's schedule, built by hand the way the scheduler builds it."""

    def __init__(self, name: str = "p") -> None:
        self.definition = freeze({**COUNTER, "name": name})
        self.pid = message_id(self.definition)
        first, self.chain = make_assignment(self.pid, 0, self.definition, b"", mid=self.pid)
        self.assignments = [first]

    def build(self, count: int) -> tuple[list[Message], bytes]:
        """The next ``count`` assignments and the chain after them (not adopted yet)."""
        chain, out = self.chain, []
        for slot in range(len(self.assignments), len(self.assignments) + count):
            assignment, chain = make_assignment(self.pid, slot, freeze({"n": slot}), chain)
            out.append(assignment)
        return out, chain

    def adopt(self, batch: list[Message], chain: bytes) -> None:
        self.assignments.extend(batch)
        self.chain = chain

    def next(self, count: int) -> list[Message]:
        batch, chain = self.build(count)
        self.adopt(batch, chain)
        return batch

    def at(self, slot: int) -> Message:
        """A lone assignment for ``slot`` (for slots that must be refused)."""
        return make_assignment(self.pid, slot, freeze({"n": slot}), b"")[0]

    async def put(self, store: Store) -> bool:
        return await store.put_process(self.pid, self.definition, self.assignments[0])


def state(slot: int, count: int | None = None) -> Message:
    return freeze({"count": slot * 10 if count is None else count, "at-slot": slot})


async def assignments_in(store: Store, pid: str, start: int, stop: int) -> list[Message]:
    """Read a range both ways; the nowait answer, when it gives one, must agree with the async one.

    ``get_assignments_nowait`` answers from memory: a non-empty prefix of what
    `get_assignments` returns (``[]`` only when ``start`` is not scheduled), or
    `trio.WouldBlock`.
    """
    expected = await store.get_assignments(pid, start, stop)
    try:
        quick = store.get_assignments_nowait(pid, start, stop)
    except trio.WouldBlock:
        return expected
    assert quick == expected[: len(quick)], (start, stop, quick, expected)
    assert bool(quick) == bool(expected), (start, stop, quick, expected)
    return expected


async def assignment_at(store: Store, pid: str, slot: int) -> Message | None:
    found = await assignments_in(store, pid, slot, slot + 1)
    return found[0] if found else None


async def result_at(store: Store, pid: str, slot: int) -> Message | None:
    """Like `assignment_at`, for stored results."""
    expected = await store.get_result(pid, slot)
    try:
        quick = store.get_result_nowait(pid, slot)
    except trio.WouldBlock:
        return expected
    assert quick == expected, (slot, quick, expected)
    return quick


# -- processes ----------------------------------------------------------------------------------


async def test_put_process_is_idempotent(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    assert await proc.put(store) is True
    other_first = make_assignment(proc.pid, 0, proc.definition, b"\x01", mid=proc.pid)[0]
    assert other_first != proc.assignments[0]
    assert await store.put_process(proc.pid, proc.definition, other_first) is False
    assert await store.put_process(proc.pid, freeze({"other": 1}), other_first) is False

    assert store.statistics().assignments_written == 1
    for _ in range(2):
        assert await store.get_process(proc.pid) == proc.definition
        assert await store.latest_slot(proc.pid) == 0
        assert await store.get_assignments(proc.pid, 0, 5) == proc.assignments
        store = await store_factory.reopen(store)
        assert await proc.put(store) is False


async def test_processes_are_independent(store: Store) -> None:
    a, b = Proc("a"), Proc("b")
    assert await a.put(store)
    assert await b.put(store)
    await store.append_assignments(a.pid, a.next(3))
    assert await store.latest_slot(a.pid) == 3
    assert await store.latest_slot(b.pid) == 0
    assert await store.get_assignments(b.pid, 0, 10) == b.assignments


async def test_unknown_process(store: Store) -> None:
    pid = Proc("never stored").pid
    assert await store.get_process(pid) is None
    assert await store.latest_slot(pid) == -1
    assert await store.get_assignments(pid, 0, 10) == []
    assert await store.get_result(pid, 1) is None
    assert await store.latest_snapshot(pid, 10) is None
    assert await assignment_at(store, pid, 0) is None
    assert await result_at(store, pid, 0) is None
    with pytest.raises(StoreError):
        await store.append_assignments(pid, [Proc("never stored").at(1)])


# -- assignments --------------------------------------------------------------------------------


async def test_append_assignments_enforces_contiguity(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(3))
    assert await store.latest_slot(proc.pid) == 3

    refused = {
        "gap": [proc.at(5)],
        "hole inside the batch": [proc.at(4), proc.at(6)],
        "repeat of the latest": [proc.at(3)],
        "slot 0 again": [proc.at(0)],
        "out of order": [proc.at(5), proc.at(4)],
    }
    for why, batch in refused.items():
        with pytest.raises(StoreError):
            await store.append_assignments(proc.pid, batch)
        assert await store.latest_slot(proc.pid) == 3, why
        assert await store.get_assignments(proc.pid, 0, 10) == proc.assignments, why
        assert await assignment_at(store, proc.pid, 4) is None, why

    await store.append_assignments(proc.pid, [])
    await store.append_assignments(proc.pid, proc.next(2))
    store = await store_factory.reopen(store)
    assert await store.latest_slot(proc.pid) == 5
    assert await store.get_assignments(proc.pid, 0, 10) == proc.assignments
    verify_schedule(proc.pid, await store.get_assignments(proc.pid, 0, 10))


async def test_get_assignments_ranges(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(5))
    everything = proc.assignments
    for _ in range(2):  # as written, then read back from a fresh store
        cases = {(0, 6): everything, (2, 4): everything[2:4], (-5, 2): everything[:2]}
        cases |= {(4, 100): everything[4:], (3, 3): [], (5, 2): [], (6, 10): [], (-3, 0): []}
        for (start, stop), expected in cases.items():
            got = await assignments_in(store, proc.pid, start, stop)
            assert got == expected, (start, stop)
            assert [a["slot"] for a in got] == list(range(max(start, 0), min(stop, 6)))
        store = await store_factory.reopen(store)


async def test_nowait_reads_agree_with_their_async_twins(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(4))
    states = {1: state(1), 2: state(2)}
    store.put_results_nowait(proc.pid, [(s, st, None) for s, st in states.items()])

    for phase in ("written", "flushed", "reopened", "reopened and read"):
        if phase == "flushed":
            await store.flush()
        elif phase == "reopened":
            store = await store_factory.reopen(store)
        for slot in range(-1, 8):
            expected_assignment = proc.assignments[slot] if 0 <= slot <= 4 else None
            assert await assignment_at(store, proc.pid, slot) == expected_assignment, (phase, slot)
            assert await result_at(store, proc.pid, slot) == states.get(slot), (phase, slot)


async def test_nowait_reads_never_checkpoint(store: Store) -> None:
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(2))
    with trio.testing.assert_no_checkpoints():
        for slot in range(-1, 5):
            try:
                store.get_assignments_nowait(proc.pid, slot, slot + 3)
            except trio.WouldBlock:
                pass
            try:
                store.get_result_nowait(proc.pid, slot)
            except trio.WouldBlock:
                pass


async def test_pending_assignment_is_a_scheduled_slot_without_a_result(store: Store) -> None:
    proc = Proc()
    await proc.put(store)
    batch = proc.next(4)
    await store.append_assignments(proc.pid, batch)
    store.put_results_nowait(proc.pid, [(1, state(1), None), (3, state(3), None)])
    expected = {0: None, 1: None, 2: batch[1], 3: None, 4: batch[3], 5: None, 9: None}
    for slot, want in expected.items():
        try:
            with trio.testing.assert_no_checkpoints():
                got = store.pending_assignment_nowait(proc.pid, slot)
        except trio.WouldBlock:
            continue  # this store needs I/O for it: allowed
        if slot == 0:
            # slot 0 (the definition) has no stored result here: it is pending
            assert got == proc.assignments[0]
        else:
            assert got == want, slot
    try:
        assert store.pending_assignment_nowait("no-such-process", 1) is None
    except trio.WouldBlock:
        pass


# -- results and snapshots ---------------------------------------------------------------------


async def test_put_results_nowait_is_readable_at_once(store: Store) -> None:
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(3))
    s1, s2 = state(1), state(2)
    with trio.testing.assert_no_checkpoints():
        store.put_results_nowait(proc.pid, [(1, s1, None), (2, s2, s2)])
        assert store.get_result_nowait(proc.pid, 1) == s1
        assert store.get_result_nowait(proc.pid, 2) == s2
    assert await store.get_result(proc.pid, 1) == s1
    assert await store.get_result(proc.pid, 3) is None
    assert await result_at(store, proc.pid, 3) is None
    assert store.statistics().results_written == 2


async def test_results_stored_out_of_order_stay_readable(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(5))
    expected = {slot: state(slot) for slot in (5, 2, 4)}
    store.put_results_nowait(proc.pid, [(s, st, None) for s, st in expected.items()])
    await store.flush()
    for slot in range(7):
        assert await result_at(store, proc.pid, slot) == expected.get(slot), slot


async def test_a_later_result_replaces_an_earlier_one(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(1))
    store.put_results_nowait(proc.pid, [(1, state(1, 5), None)])
    store.put_results_nowait(proc.pid, [(1, state(1, 6), None)])
    assert await result_at(store, proc.pid, 1) == state(1, 6)
    store = await store_factory.reopen(store)
    assert await result_at(store, proc.pid, 1) == state(1, 6)


async def test_latest_snapshot_at_or_below(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(8))
    s = {slot: state(slot) for slot in range(1, 9)}
    custom4 = freeze({"packed": b"four", "at-slot": 4})
    custom6 = freeze({"packed": b"six"})
    store.put_results_nowait(
        proc.pid,
        [(1, s[1], None), (2, s[2], s[2]), (3, s[3], None), (4, s[4], custom4), (5, s[5], None)],
    )
    store.put_results_nowait(proc.pid, [(6, s[6], None), (7, s[7], None)])
    store.put_results_nowait(proc.pid, [(6, s[6], custom6)])  # separate from the state at 6
    store.put_results_nowait(proc.pid, [(7, s[7], s[7])])  # the state is its own snapshot
    expected: dict[int, tuple[int, Message] | None] = {0: None, 1: None}
    expected |= {2: (2, s[2]), 3: (2, s[2]), 4: (4, custom4), 5: (4, custom4), 6: (6, custom6)}
    expected |= dict.fromkeys((7, 8, 100), (7, s[7]))

    for phase in ("pending", "flushed", "reopened"):
        if phase == "flushed":
            await store.flush()
        elif phase == "reopened":
            store = await store_factory.reopen(store)
        for at_most, want in expected.items():
            assert await store.latest_snapshot(proc.pid, at_most) == want, (phase, at_most)
        # Snapshots are not results, and results are not snapshots.
        assert await result_at(store, proc.pid, 4) == s[4]
        assert await result_at(store, proc.pid, 6) == s[6]


async def test_latest_snapshot_while_it_is_being_written(store: Store) -> None:
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(30))
    for slot in range(1, 31):
        current = state(slot)
        custom = freeze({"custom": slot})
        snapshot = current if slot % 2 else custom
        store.put_results_nowait(proc.pid, [(slot, current, snapshot)])
        # Written behind: the commit may land while this read waits for the disk.
        assert await store.latest_snapshot(proc.pid, slot) == (slot, snapshot)
        assert await store.latest_snapshot(proc.pid, slot + 5) == (slot, snapshot)


async def test_latest_snapshot_reads_ahead_for_the_fast_path(
    store_factory: StoreFactory,
) -> None:
    """``read_to`` is a hint: whatever the fast path answers afterwards is right."""
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(12))
    s = {slot: state(slot) for slot in range(1, 13)}
    store.put_results_nowait(proc.pid, [(slot, s[slot], None) for slot in range(1, 9)])
    store.put_results_nowait(proc.pid, [(3, s[3], s[3])])  # the state is its own snapshot
    store.put_results_nowait(proc.pid, [(6, s[6], freeze({"packed": b"six"}))])
    fast = store.fast
    assert fast is not None

    for phase in ("pending", "flushed", "reopened", "reopened, then appended to"):
        if phase == "flushed":
            await store.flush()
        elif phase == "reopened":
            store = await store_factory.reopen(store)
            fast = store.fast
            assert fast is not None
        elif phase == "reopened, then appended to":
            await store.append_assignments(proc.pid, proc.next(3))  # slots 13..15
        for at_most in (0, 2, 3, 5, 6, 7, 12, 50):
            for read_to in (100, 9, 2, 0):
                where = (phase, at_most, read_to)
                found = await store.latest_snapshot(proc.pid, at_most, read_to=read_to)
                assert found == await store.latest_snapshot(proc.pid, at_most), where
                first = 1 if found is None else found[0] + 1
                try:
                    ahead = fast.get_assignments_nowait(proc.pid, first, max(first, read_to))
                except trio.WouldBlock:
                    continue
                assert ahead == proc.assignments[first : max(first, read_to)][: len(ahead)], where
    assert await store.latest_snapshot("no-such-process", 5, read_to=10) is None


async def test_flush_then_reopen_everything_is_durable(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    procs = [Proc("a"), Proc("b")]
    states: dict[tuple[str, int], Message] = {}
    for i, proc in enumerate(procs):
        await proc.put(store)
        await store.append_assignments(proc.pid, proc.next(3 + i))
        results = [(slot, state(slot, slot + i), None) for slot in range(1, 3 + i)]
        store.put_results_nowait(proc.pid, results)
        states |= {(proc.pid, slot): st for slot, st, _ in results}
        store.put_results_nowait(proc.pid, [(2, states[proc.pid, 2], freeze({"snap": i}))])
    await store.flush()
    store = await store_factory.reopen(store)
    for i, proc in enumerate(procs):
        assert await store.get_process(proc.pid) == proc.definition
        assert await store.latest_slot(proc.pid) == 3 + i
        assert await store.get_assignments(proc.pid, 0, 100) == proc.assignments
        for slot in range(6):
            assert await result_at(store, proc.pid, slot) == states.get((proc.pid, slot))
        assert await store.latest_snapshot(proc.pid, 10) == (2, {"snap": i})


async def test_close_makes_pending_results_durable(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(2))
    store.put_results_nowait(proc.pid, [(1, state(1), state(1)), (2, state(2), None)])
    store = await store_factory.reopen(store)  # close without an explicit flush
    assert await result_at(store, proc.pid, 2) == state(2)
    assert await store.latest_snapshot(proc.pid, 5) == (1, state(1))


async def test_a_closed_store_opens_again(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.close()
    await store.close()  # idempotent
    await store.open()
    await store.open()  # idempotent
    assert await store.get_process(proc.pid) == proc.definition
    await store.append_assignments(proc.pid, proc.next(1))
    assert await store.latest_slot(proc.pid) == 1


async def test_statistics_count_writes(store: Store) -> None:
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(4))
    store.put_results_nowait(proc.pid, [(slot, state(slot), None) for slot in range(1, 5)])
    await store.flush()
    stats = store.statistics()
    assert stats.assignments_written == 5
    assert stats.results_written == 4
    assert stats.pending_results == 0


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelled_append_either_happened_or_wrote_nothing(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    rng = random.Random(1234)
    for trial in range(60):
        latest = await store.latest_slot(proc.pid)
        assert latest == len(proc.assignments) - 1
        batch, chain = proc.build(2)
        returned = False
        delay = rng.randrange(-1, 4)  # -1: cancelled before the call

        async def attempt(
            batch: list[Message] = batch,
            delay: int = delay,
            task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            nonlocal returned
            with trio.CancelScope() as scope:
                if delay < 0:
                    scope.cancel()
                task_status.started(scope)
                await store.append_assignments(proc.pid, batch)
                returned = True

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(attempt)
            for _ in range(max(delay, 0)):
                await trio.lowlevel.checkpoint()
            scope.cancel()

        now = await store.latest_slot(proc.pid)
        if returned:
            assert now == latest + 2, trial
            proc.adopt(batch, chain)
        else:
            assert now == latest, trial
        if delay < 0 and store_factory.kind == "sqlite":
            assert not returned  # SQLite calls checkpoint first: cancelled before any I/O
        assert await store.get_assignments(proc.pid, 0, now + 5) == proc.assignments
    # The file agrees with what the callers were told.
    store = await store_factory.reopen(store)
    assert await store.get_assignments(proc.pid, 0, 10_000) == proc.assignments
    verify_schedule(proc.pid, proc.assignments)


async def test_cancelled_reads_leave_the_store_usable(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(3))
    store.put_results_nowait(proc.pid, [(1, state(1), state(1))])
    store = await store_factory.reopen(store)
    for delay in range(4):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.get_assignments, proc.pid, 0, 4)
                nursery.start_soon(store.get_result, proc.pid, 1)
                nursery.start_soon(store.latest_snapshot, proc.pid, 3)
                nursery.start_soon(partial(store.latest_snapshot, proc.pid, 3, read_to=4))
                for _ in range(delay):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
    assert await store.get_assignments(proc.pid, 0, 4) == proc.assignments
    assert await result_at(store, proc.pid, 1) == state(1)
    assert await store.latest_snapshot(proc.pid, 3) == (1, state(1))
    assert await store.latest_snapshot(proc.pid, 3, read_to=4) == (1, state(1))
    assert store.fast is not None
    assert store.fast.get_assignments_nowait(proc.pid, 2, 4) == proc.assignments[2:4]


# -- SQLite only --------------------------------------------------------------------------------


async def test_sqlite_file_is_readable_with_the_stdlib(sqlite_factory: StoreFactory) -> None:
    store = await sqlite_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(3))
    custom, s1 = freeze({"packed": b"2"}), state(1)
    store.put_results_nowait(proc.pid, [(1, s1, s1), (2, state(2), custom)])
    await store.close()

    with sqlite3.connect(sqlite_factory.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        assert {"processes", "assignments", "results", "snapshots", "blobs"} <= tables
        ((rowid, pid, definition),) = conn.execute("SELECT id, pid, definition FROM processes")
        assert pid == proc.pid
        assert cbor2.loads(definition) == proc.definition
        rows = conn.execute(
            "SELECT slot, message_id, assignment FROM assignments WHERE proc = ? ORDER BY slot",
            (rowid,),
        ).fetchall()
        assert [r[0] for r in rows] == [0, 1, 2, 3]
        for (slot, mid, blob), original in zip(rows, proc.assignments, strict=True):
            assert cbor2.loads(blob) == original
            assert mid == message_id(original["body"]) == original["message-id"], slot
            assert blob == hbtrio.encode(original)  # canonical bytes on disk
        results = dict(conn.execute("SELECT slot, state FROM results WHERE proc = ?", (rowid,)))
        assert {s: cbor2.loads(b) for s, b in results.items()} == {1: state(1), 2: state(2)}
        flagged = [r[0] for r in conn.execute("SELECT slot FROM results WHERE snapshot = 1")]
        assert flagged == [1]  # the result at slot 1 is its own snapshot: a flag, no copy
        snapshots = dict(conn.execute("SELECT slot, snapshot FROM snapshots"))
        assert set(snapshots) == {2}
        assert cbor2.loads(snapshots[2]) == custom


async def test_sqlite_latest_snapshot_reads_what_follows_in_the_same_trip(
    sqlite_factory: StoreFactory,
) -> None:
    store = await sqlite_factory.open()
    proc, done = Proc(), Proc("computed")
    for p in (proc, done):
        await p.put(store)
        await store.append_assignments(p.pid, p.next(30))
    snapshots = {10: state(10), 20: state(20)}
    store.put_results_nowait(proc.pid, [(s, state(s), snapshots.get(s)) for s in range(1, 21)])
    store.put_results_nowait(done.pid, [(s, state(s), None) for s in range(1, 31)])
    store = await sqlite_factory.reopen(store)

    # Loading a process keeps its latest assignment while it has no result: the
    # scheduler reads it next (its hash chain continues the schedule).
    reads = store.statistics().reads
    assert await store.latest_slot(proc.pid) == 30
    assert await store.get_assignments(proc.pid, 30, 31) == [proc.assignments[30]]
    assert store.statistics().reads == reads + 1
    assert await store.latest_slot(done.pid) == 30
    with pytest.raises(trio.WouldBlock):
        store.get_assignments_nowait(done.pid, 30, 31)  # computed: not kept

    # The snapshot, and the assignments after it read into memory, in one read.
    reads = store.statistics().reads
    assert await store.latest_snapshot(proc.pid, 25, read_to=31) == (20, state(20))
    assert store.get_assignments_nowait(proc.pid, 21, 31) == proc.assignments[21:31]
    assert await store.latest_snapshot(proc.pid, 19, read_to=15) == (10, state(10))
    assert store.get_assignments_nowait(proc.pid, 11, 15) == proc.assignments[11:15]
    assert store.statistics().reads == reads + 2
    # Assignments appended since the load come from memory, after those from the file.
    await store.append_assignments(proc.pid, proc.next(5))
    reads = store.statistics().reads
    assert await store.latest_snapshot(proc.pid, 25, read_to=100) == (20, state(20))
    assert store.get_assignments_nowait(proc.pid, 21, 100) == proc.assignments[21:36]
    assert store.statistics().reads == reads + 1


async def test_sqlite_a_state_that_cannot_be_written_costs_only_its_own_row(
    sqlite_factory: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A run of states goes to the file encoded in one go; one that cannot be encoded
    (the engine never hands such a state over) is logged and left out, and every
    other row of its run is written, with its snapshot flag."""
    store = await sqlite_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(6))
    states = [state(s) for s in range(1, 7)]
    states[2] = {"count": object()}  # slot 3
    with caplog.at_level(logging.ERROR, logger="hbtrio"):
        store.put_states_nowait(proc.pid, 1, states, 2)
        await store.flush()
    assert "slot 3 of process" in caplog.text and "cannot be stored" in caplog.text
    store = await sqlite_factory.reopen(store)
    for slot in (1, 2, 4, 5, 6):
        assert await store.get_result(proc.pid, slot) == state(slot)
    assert await store.get_result(proc.pid, 3) is None
    assert await store.latest_snapshot(proc.pid, 6) == (6, state(6))
    assert await store.latest_snapshot(proc.pid, 5) == (4, state(4))
    assert await store.latest_snapshot(proc.pid, 3) == (2, state(2))


async def test_sqlite_bad_rows_read_ahead_are_left_to_the_callers_own_read(
    sqlite_factory: StoreFactory,
) -> None:
    store = await sqlite_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(6))
    store.put_results_nowait(proc.pid, [(2, state(2), state(2))])
    await store.close()
    with sqlite3.connect(sqlite_factory.path) as conn:
        conn.execute("UPDATE assignments SET assignment = x'ff' WHERE slot IN (4, 6)")
    store = await sqlite_factory.open()
    # The latest assignment (6) is unreadable: the process still loads.
    assert await store.get_result(proc.pid, 2) == state(2)
    assert await store.latest_snapshot(proc.pid, 5, read_to=7) == (2, state(2))
    with pytest.raises(trio.WouldBlock):  # nothing read ahead: a bad row is among them
        store.get_assignments_nowait(proc.pid, 3, 7)
    for start in (3, 6):
        with pytest.raises(hbtrio.InvalidMessage):
            await store.get_assignments(proc.pid, start, 7)


async def test_sqlite_rows_read_together_decode_as_they_would_alone(
    sqlite_factory: StoreFactory,
) -> None:
    store = await sqlite_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(8))
    await store.close()
    # Row 4 gets the next message's bytes after its own: alone, they are ignored.
    row = hbtrio.encode(proc.assignments[4]) + hbtrio.encode(proc.assignments[5])
    with sqlite3.connect(sqlite_factory.path) as conn:
        conn.execute("UPDATE assignments SET assignment = ? WHERE slot = 4", (row,))
    store = await sqlite_factory.open()
    for start, stop in ((1, 9), (3, 6), (4, 5), (2, 5)):
        assert await store.get_assignments(proc.pid, start, stop) == proc.assignments[start:stop]


async def test_sqlite_cold_start_reads_the_file_twice(sqlite_factory: StoreFactory) -> None:
    """A fresh engine computing past the latest snapshot reads the process, then the
    snapshot with the assignments after it: no other round trip to the I/O thread."""
    store = sqlite_factory.new()
    async with hbtrio.open_engine(store, cache_frequency=50) as engine:
        pid = await engine.spawn(COUNTER)
        await engine.schedule_many(pid, [{"n": n} for n in range(1, 301)])
        assert (await engine.compute(pid, 200))["count"] == 200 * 201 // 2
    store = sqlite_factory.new()
    async with hbtrio.open_engine(store, cache_frequency=50) as engine:
        assert (await engine.compute(pid, 300))["count"] == 300 * 301 // 2
        assert store.statistics().reads == 2
        assert engine.stats().slots_computed == 100


async def test_sqlite_refuses_a_newer_schema(sqlite_factory: StoreFactory) -> None:
    with sqlite3.connect(sqlite_factory.path) as conn:
        conn.execute("PRAGMA user_version = 3")
    with pytest.raises(StoreError, match="schema version 3"):
        await sqlite_factory.open()


async def test_sqlite_batches_thousands_of_results_into_few_commits(
    sqlite_factory: StoreFactory,
) -> None:
    store = await sqlite_factory.open()
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(3000))
    before = store.statistics().commits
    final = await compute_slot(store, Devices(), proc.pid, 3000, cache_frequency=10)
    assert final == {"count": 3000 * 3001 // 2, "at-slot": 3000}
    # A second process's results, all in one put.
    other = Proc("other")
    await other.put(store)
    await store.append_assignments(other.pid, other.next(2000))
    store.put_results_nowait(other.pid, [(s, state(s), None) for s in range(1, 2001)])
    await store.flush()
    stats = store.statistics()
    assert stats.results_written >= 5000
    assert stats.commits - before <= 12, stats
    store = await sqlite_factory.reopen(store)
    assert await store.get_result(proc.pid, 1234) == {"count": 1234 * 1235 // 2, "at-slot": 1234}
    assert await store.get_result(other.pid, 2000) == state(2000)


async def test_sqlite_backpressure_bounds_pending_results(sqlite_factory: StoreFactory) -> None:
    store = await sqlite_factory.open(max_pending=8)
    proc = Proc()
    await proc.put(store)
    await store.append_assignments(proc.pid, proc.next(200))
    for start in range(1, 201, 50):
        store.put_results_nowait(proc.pid, [(s, state(s), None) for s in range(start, start + 50)])
        assert store.statistics().pending_results > 8
        await store.wait_writable()
        assert store.statistics().pending_results <= 8
    # Pending results stay readable all along, and all arrive.
    store = await sqlite_factory.reopen(store)
    for slot in (1, 100, 200):
        assert await store.get_result(proc.pid, slot) == state(slot)


@pytest.mark.parametrize("options", [{"synchronous": "sometimes"}, {"max_pending": 0}])
def test_sqlite_options_are_checked(options: dict[str, Any], tmp_path: Any) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "x.sqlite", **options)


@pytest.mark.parametrize("field", ["body", "message-id", "process", "slot"])
async def test_sqlite_a_flipped_byte_in_a_stored_assignment_is_reported_not_computed(
    sqlite_factory: StoreFactory, field: str
) -> None:
    """Regression (issue 15.8): SQLite keeps no checksums, so a damaged row that still decodes
    used to be computed as it is. Each row read from the file is checked against its ID."""
    store = sqlite_factory.new()
    async with hbtrio.open_engine(store) as engine:
        pid = await engine.spawn(COUNTER)
        await engine.schedule_many(pid, [{"n": 10 + n} for n in range(1, 7)])
    with sqlite3.connect(sqlite_factory.path) as conn:
        (blob,) = conn.execute("SELECT assignment FROM assignments WHERE slot = 4").fetchone()
        original = hbtrio.decode(blob)
        damaged = {
            "body": {**original, "body": {"n": 99}},  # one digit flipped: 14 -> 99
            "message-id": {**original, "message-id": "A" + original["message-id"][1:]},
            "process": {**original, "process": "B" + original["process"][1:]},
            "slot": {**original, "slot": 5},
        }[field]
        conn.execute("UPDATE assignments SET assignment = ? WHERE slot = 4",
                     (hbtrio.encode(damaged),))  # fmt: skip
    store = sqlite_factory.new()
    async with hbtrio.open_engine(store) as engine:
        assert (await engine.compute(pid, 3))["count"] == 11 + 12 + 13
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 6)
        assert info.value.phase == "get-schedule"
        assert "does not match its message ID" in str(info.value)
        assert isinstance(info.value.__cause__, hbtrio.InvalidMessage)
        assert engine.statistics().leader_deaths == 0
        assert (await engine.compute(pid, 3))["count"] == 36  # what is sound still answers
