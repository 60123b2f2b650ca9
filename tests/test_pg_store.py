"""What only `PostgresStore` does: schema versions, group commit, ownership, the fence.

Each test gets a fresh database on the session's PostgreSQL server
(``pg_dsn``). Two stores on one database are two nodes of a cluster. Leases
are real time (a second, or less), so the tests that let one run out wait
for it, polling with a deadline; everything else is ordered by the calls
themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

import hbtrio
from hbtrio import PostgresStore, StoreError, StoreFenced
from hbtrio._postgres import _schema
from hbtrio._postgres._control import _TAKE
from hbtrio._postgres._rows import check_fence
from hbtrio._scheduler import verify_schedule
from helpers import Gate
from test_stores import Proc, state

LEASE = 1.0


@asynccontextmanager
async def opened(dsn: str, **options: Any) -> AsyncIterator[PostgresStore]:
    options.setdefault("lease", LEASE)
    store = PostgresStore(dsn, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def wait_until(what: Callable[[], bool], timeout: float = 10.0, why: str = "") -> None:
    """Poll ``what`` until it is true (real time: leases are), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {why or what}")
        await trio.sleep(0.02)


def sql(dsn: str, query: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else []


def epochs_of(dsn: str, pid: str) -> list[tuple[int, int]]:
    """``(epoch, node)`` of every takeover of ``pid``, in order."""
    return [
        (e, n)  # type: ignore[misc]
        for e, n in sql(
            dsn,
            "SELECT t.epoch, t.node FROM takeovers t JOIN processes p ON p.id = t.proc"
            " WHERE p.pid = %s ORDER BY t.epoch",
            pid,
        )
    ]


async def expire(store: PostgresStore) -> None:
    """Stop ``store``'s heartbeats and wait until its lease has run out (for everyone)."""
    store._control.paused.set()
    await wait_until(
        lambda: not store._control.lease.valid(time.monotonic()), why="the lease to run out"
    )
    await trio.sleep(0.05)  # PostgreSQL's clock counts from a little later


# -- schema ---------------------------------------------------------------------------------------


async def test_the_schema_is_created_once_and_versioned(pg_dsn: str) -> None:
    async with opened(pg_dsn), opened(pg_dsn), opened(pg_dsn):
        pass
    assert sql(pg_dsn, "SELECT version FROM hbtrio_schema") == [(_schema.SCHEMA_VERSION,)]


async def test_concurrent_first_opens_race_no_ddl(pg_dsn: str) -> None:
    async def open_one() -> None:
        async with opened(pg_dsn):
            pass

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(open_one)
    assert sql(pg_dsn, "SELECT count(*) FROM hbtrio_schema") == [(1,)]


async def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    async with opened(pg_dsn):
        pass
    sql(pg_dsn, "UPDATE hbtrio_schema SET version = %s", _schema.SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="newer than this hbtrio"):
        async with opened(pg_dsn):
            pass


async def test_an_older_schema_is_migrated(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with opened(pg_dsn) as store:
        proc = Proc()
        await proc.put(store)
    # A version 2 that adds a column: a database of version 1 gets it when it is opened.
    monkeypatch.setattr(_schema, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(_schema.MIGRATIONS, 1, "ALTER TABLE blobs ADD COLUMN note text;")
    async with opened(pg_dsn) as store:
        assert await store.get_process(proc.pid) == proc.definition
    assert sql(pg_dsn, "SELECT version FROM hbtrio_schema") == [(2,)]
    assert sql(pg_dsn, "SELECT count(note) FROM blobs") == [(0,)]


def test_options_are_checked() -> None:
    for options in ({"lease": 0}, {"synchronous_commit": "sometimes"}, {"max_pending": 0}):
        with pytest.raises(ValueError):
            PostgresStore("host=nowhere", **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PostgresStore("")


async def test_an_unreachable_server_is_a_store_error(pg_server: Any) -> None:
    dsn = f"host=127.0.0.1 port={pg_server.port + 1} user=hbtrio dbname=nothing"
    with pytest.raises(StoreError, match="cannot connect"):
        async with opened(dsn, connect_timeout=1):
            pass


# -- group commit -------------------------------------------------------------------------------


async def test_concurrent_appends_share_commits(pg_dsn: str) -> None:
    async with opened(pg_dsn) as store:
        procs = [Proc(str(i)) for i in range(40)]
        for proc in procs:
            await proc.put(store)
        before = store.statistics().commits
        async with trio.open_nursery() as nursery:
            for proc in procs:
                nursery.start_soon(store.append_assignments, proc.pid, proc.next(3))
        commits = store.statistics().commits - before
        assert commits < len(procs), commits
        for proc in procs:
            assert await store.get_assignments(proc.pid, 0, 10) == proc.assignments


async def test_thousands_of_results_take_a_few_commits(pg_dsn: str) -> None:
    async with opened(pg_dsn) as store:
        proc = Proc()
        await proc.put(store)
        await store.append_assignments(proc.pid, proc.next(5000))
        before = store.statistics().commits
        for slot in range(1, 5001):
            store.put_results_nowait(proc.pid, [(slot, state(slot), None)])
        await store.flush()
        assert store.statistics().commits - before <= 6
    async with opened(pg_dsn) as store:
        assert await store.get_result(proc.pid, 4321) == state(4321)


async def test_a_bad_job_does_not_fail_the_others_of_its_round(pg_dsn: str) -> None:
    async with opened(pg_dsn) as store:
        good, bad = Proc("good"), Proc("bad")
        await good.put(store)
        await bad.put(store)
        bad.next(1)
        await store.append_assignments(bad.pid, bad.assignments[1:])

        def broken(conn: psycopg.Connection[Any], refused: object) -> None:
            conn.execute("SELECT 1/0")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.append_assignments, good.pid, good.next(2))
            with pytest.raises(StoreError, match="division by zero"):
                await store._io.run(broken, write=True)
        assert await store.latest_slot(good.pid) == 2


# -- ownership: claims and takeovers --------------------------------------------------------------


async def test_a_spawned_process_is_owned_by_its_node_at_epoch_1(pg_dsn: str) -> None:
    async with opened(pg_dsn, node_url="http://a") as a, opened(pg_dsn, node_url="http://b") as b:
        proc = Proc()
        await proc.put(a)
        assert a.holds(proc.pid) and not b.holds(proc.pid)
        claim = await b.claim(proc.pid)
        assert claim is not None
        assert (claim.mine, claim.epoch, claim.url) == (False, 1, "http://a")
        assert await b.claim(Proc("never").pid) is None
        # b reads what a wrote, straight from the database, and keeps nothing of it.
        await a.append_assignments(proc.pid, proc.next(2))
        assert await b.get_assignments(proc.pid, 0, 5) == proc.assignments
        assert await b.latest_slot(proc.pid) == 2
        assert not b.holds(proc.pid)
        with pytest.raises(trio.WouldBlock):
            b.get_assignments_nowait(proc.pid, 0, 3)


async def test_writes_for_a_process_owned_elsewhere_are_refused(pg_dsn: str) -> None:
    async with opened(pg_dsn, node_url="http://a") as a, opened(pg_dsn) as b:
        proc = Proc()
        await proc.put(a)
        batch, _chain = proc.build(1)
        with pytest.raises(StoreFenced) as caught:
            await b.append_assignments(proc.pid, batch)
        assert (caught.value.pid, caught.value.owner) == (proc.pid, "http://a")
        with pytest.raises(StoreFenced):
            b.put_results_nowait(proc.pid, [(0, state(0), None)])
        assert await a.latest_slot(proc.pid) == 0


async def test_an_expired_owner_is_taken_over_and_fenced(pg_dsn: str) -> None:
    lost: list[tuple[str, StoreFenced]] = []
    # trust_ownership: the old owner never notices by itself (its lease, its heartbeats),
    # so only the fence stands between its writes and the database.
    async with (
        opened(pg_dsn, node_url="http://a", trust_ownership=True) as a,
        opened(pg_dsn, node_url="http://b") as b,
    ):
        a.on_lost = lambda pid, exc: lost.append((pid, exc))
        proc = Proc()
        await proc.put(a)
        await a.append_assignments(proc.pid, proc.next(2))
        await expire(a)
        claim = await b.claim(proc.pid)
        assert claim is not None and claim.mine and claim.took_over and claim.epoch == 2
        assert b.holds(proc.pid) and a.holds(proc.pid)  # a still believes it
        # Results written behind and an append, both under epoch 1: refused whole.
        a.put_results_nowait(proc.pid, [(1, state(1), state(1)), (2, state(2), None)])
        batch, chain = proc.build(1)
        with pytest.raises(StoreFenced) as caught:
            await a.append_assignments(proc.pid, batch)
        assert caught.value.owner == "http://b" and caught.value.epoch == 1
        await a.flush()
        stats = a.cluster_statistics()
        assert (stats.fenced_rows, stats.held) == (2, 0)
        assert stats.fenced_writes >= 2
        assert {pid for pid, _ in lost} == {proc.pid}
        assert all(exc.epoch == 1 for _, exc in lost)
        assert await b.get_result(proc.pid, 1) is None
        # Asked again, the old owner finds the new one.
        with pytest.raises(StoreFenced) as caught:
            await a.append_assignments(proc.pid, batch)
        assert caught.value.owner == "http://b"
        # The new owner appends after the old one's last slot.
        await b.append_assignments(proc.pid, batch)
        proc.adopt(batch, chain)
        assert await b.get_assignments(proc.pid, 0, 10) == proc.assignments
    assert epochs_of(pg_dsn, proc.pid) == [(1, a.node_id), (2, b.node_id)]
    rows = sql(
        pg_dsn,
        "SELECT slot, epoch FROM assignments a JOIN processes p ON p.id = a.proc"
        " WHERE p.pid = %s ORDER BY slot",
        proc.pid,
    )
    assert rows == [(0, 1), (1, 1), (2, 1), (3, 2)]


async def test_a_graceful_close_releases_at_once(pg_dsn: str) -> None:
    async with opened(pg_dsn, lease=60.0) as b:
        async with opened(pg_dsn, lease=60.0) as a:
            proc = Proc()
            await proc.put(a)
            claim = await b.claim(proc.pid)
            assert claim is not None and not claim.mine
        start = time.monotonic()
        claim = await b.claim(proc.pid)
        assert claim is not None and claim.mine and claim.epoch == 2
        assert time.monotonic() - start < 5  # not the 60 s lease
    stopped = sql(pg_dsn, "SELECT count(*) FROM nodes WHERE stopped_at IS NOT NULL")
    assert stopped == [(2,)]


async def test_a_restarted_node_is_a_new_incarnation_with_new_epochs(pg_dsn: str) -> None:
    async with opened(pg_dsn, node_url="http://a", lease=60.0) as b:
        first = PostgresStore(pg_dsn, node_url="http://x", lease=60.0)
        await first.open()
        proc = Proc()
        await proc.put(first)
        # It dies without a word: its threads stop, nothing is released.
        await first._control.stop()
        await first._io.stop()
        claim = await b.claim(proc.pid)
        assert claim is not None and not claim.mine  # its lease (60 s) holds
        async with opened(pg_dsn, node_url="http://x", lease=60.0) as again:
            assert again.node_id != first.node_id
            claim = await again.claim(proc.pid)  # the old incarnation was retired
            assert claim is not None and claim.mine and claim.epoch == 2
            await again.append_assignments(proc.pid, proc.next(1))
    assert [e for e, _ in epochs_of(pg_dsn, proc.pid)] == [1, 2]


async def test_a_heartbeat_tells_a_node_what_it_lost(pg_dsn: str) -> None:
    lost = trio.Event()
    async with opened(pg_dsn) as a, opened(pg_dsn) as b:
        a.on_lost = lambda pid, exc: lost.set()
        proc = Proc()
        await proc.put(a)
        # Another node takes it over behind a's back (an operator, a partition healed...).
        sql(pg_dsn, "UPDATE owners SET node = %s, epoch = epoch + 1", b.node_id)
        with trio.fail_after(5 * LEASE):
            await lost.wait()
        assert not a.holds(proc.pid)


async def test_losing_the_lease_gives_up_everything_unless_told_not_to(pg_dsn: str) -> None:
    lost: list[str] = []
    async with opened(pg_dsn) as a:
        a.on_lost = lambda pid, exc: lost.append(pid)
        procs = [Proc(str(i)) for i in range(3)]
        for proc in procs:
            await proc.put(a)
        await expire(a)
        await wait_until(lambda: len(lost) == 3, why="every process to be given up")
        assert not any(a.holds(p.pid) for p in procs)
        a._control.paused.clear()  # heartbeats again: the processes are still its own
        await wait_until(lambda: a._control.lease.valid(time.monotonic()))
        claim = await a.claim(procs[0].pid)
        assert claim is not None and claim.mine and claim.epoch == 1
    async with opened(pg_dsn, trust_ownership=True) as c:
        c.on_lost = lambda pid, exc: lost.append(pid)
        await procs[0].put(c)
        claim = await c.claim(procs[0].pid)
        assert claim is not None and claim.mine
        await expire(c)
        await trio.sleep(2 * LEASE)
        assert c.holds(procs[0].pid) and len(lost) == 3


# -- the fence, in SQL ----------------------------------------------------------------------------


def _node_and_process(dsn: str) -> tuple[int, int]:
    node = sql(
        dsn,
        "INSERT INTO nodes (name, lease) VALUES ('test', interval '1 hour') RETURNING id",
    )[0][0]
    proc = sql(dsn, "INSERT INTO processes (pid, definition) VALUES ('p', '') RETURNING id")[0][0]
    sql(dsn, "INSERT INTO owners (proc, node, epoch) VALUES (%s, %s, 1)", proc, node)
    return int(node), int(proc)


def _takeover_in_thread(dsn: str, proc: int) -> tuple[threading.Thread, list[object]]:
    """Take ``proc`` over (its owner expired) in a thread; the result lands in the list."""
    out: list[object] = []

    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            other = conn.execute(
                "INSERT INTO nodes (name, lease) VALUES ('taker', interval '1 hour') RETURNING id"
            ).fetchone()
            assert other is not None
            row = conn.execute(_TAKE, {"me": other[0], "proc": proc, "seen": 1}).fetchone()
            out.append(None if row is None else row[0])

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _waiting_for_a_lock(dsn: str) -> bool:
    rows = sql(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE 'UPDATE owners%%'",
    )
    return bool(rows[0][0])


@pytest.mark.parametrize("lock", ["FOR SHARE", "FOR KEY SHARE"])
def test_why_writers_lock_the_owner_row_for_share(pg_dsn: str, lock: str) -> None:
    """With ``FOR SHARE`` a takeover waits for the writer that checked the epoch, so
    nothing the writer commits comes after it; with ``FOR KEY SHARE`` (or a plain read)
    the takeover commits in between and the writer's stale write is accepted."""
    async_note = "writes of the old epoch committed after the takeover"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _schema.ensure_schema(conn, "test")
    node, proc = _node_and_process(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as writer:
        writer.execute("BEGIN")
        if lock == "FOR SHARE":
            assert check_fence(writer, node, [(proc, 1)]) == {}  # the store's own check
        else:
            writer.execute(f"SELECT epoch FROM owners WHERE proc = %s {lock}", (proc,))
        sql(
            pg_dsn, "UPDATE nodes SET heartbeat_at = now() - interval '2 hours' WHERE id = %s", node
        )
        thread, taken = _takeover_in_thread(pg_dsn, proc)
        deadline = time.monotonic() + 10
        if lock == "FOR SHARE":
            while not _waiting_for_a_lock(pg_dsn):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert taken == []  # the takeover waits for the writer
        else:
            thread.join(10)
            assert taken == [2]  # the takeover went through at once
        writer.execute(
            "INSERT INTO assignments (proc, slot, message_id, assignment, epoch)"
            " VALUES (%s, 1, 'm', '', 1)",
            (proc,),
        )
        writer.execute("COMMIT")
        thread.join(10)
        assert taken == [2]
    stale = sql(
        pg_dsn,
        "SELECT count(*) FROM assignments a, takeovers t WHERE a.epoch = 1 AND t.epoch = 2"
        " AND pg_xact_commit_timestamp(a.xmin) > pg_xact_commit_timestamp(t.xmin)",
    )
    stale = sql(
        pg_dsn,
        "SELECT count(*) FROM assignments a, owners o WHERE a.epoch = 1 AND o.proc = a.proc"
        " AND pg_xact_commit_timestamp(a.xmin) > pg_xact_commit_timestamp(o.xmin)",
    )
    assert stale == [(0 if lock == "FOR SHARE" else 1,)], async_note
    with psycopg.connect(pg_dsn, autocommit=True) as writer, writer.transaction():
        assert check_fence(writer, node, [(proc, 1)]) == {(proc, 1): None}


async def test_a_writer_paused_inside_its_transaction_commits_nothing(pg_dsn: str) -> None:
    """The old owner stops after the fence let its round through: the server ends its
    session within half a lease, the takeover goes through, and the round fails."""
    async with opened(pg_dsn, node_url="http://a") as a, opened(pg_dsn, node_url="http://b") as b:
        proc = Proc()
        await proc.put(a)
        paused, resume = threading.Event(), threading.Event()

        def pause_once() -> None:
            a._io.in_transaction = None
            paused.set()
            resume.wait(30)

        a._io.in_transaction = pause_once
        a.trust_ownership = True
        outcome: list[BaseException | None] = []

        async def append() -> None:
            try:
                await a.append_assignments(proc.pid, proc.build(1)[0])
                outcome.append(None)
            except StoreError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(append)
            await trio.to_thread.run_sync(paused.wait)
            await expire(a)
            while True:  # the takeover may wait for the paused writer's locks at first
                try:
                    claim = await b.claim(proc.pid)
                    break
                except StoreError:
                    await trio.sleep(0.05)
            assert claim is not None and claim.mine and claim.epoch == 2
            resume.set()
        assert isinstance(outcome[0], StoreError)
        assert await b.latest_slot(proc.pid) == 0


# -- the engine over it ---------------------------------------------------------------------------


async def test_a_worker_whose_process_is_taken_over_ends_and_its_waiters_get_fenced(
    pg_dsn: str,
) -> None:
    gate = Gate()
    async with (
        opened(pg_dsn, node_url="http://a") as a,
        opened(pg_dsn, node_url="http://b") as b,
        hbtrio.open_engine(a, devices={"gate@1.0": gate}) as engine,
    ):
        pid = await engine.spawn({"device": "process@1.0", "execution-device": "gate@1.0"})
        await engine.schedule_many(pid, [{"n": 1}] * 3)
        errors: list[BaseException] = []

        async def wait() -> None:
            try:
                await engine.compute(pid, 3)
            except StoreFenced as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(wait)
            await wait_until(lambda: engine.stats().waiters == 5)
            await expire(a)
            claim = await b.claim(pid)
            assert claim is not None and claim.mine
            await wait_until(lambda: len(errors) == 5, why="the waiters to be fenced")
        assert all(e.owner == "http://b" or e.owner is None for e in errors)
        # Its task was inside a device call: it leaves after that slot, storing nothing.
        gate.open.set()
        await wait_until(lambda: pid not in engine.workers)
        assert engine.stats().leader_deaths == 0
        # The new owner schedules and computes; the old node then asks again and
        # gets the process back only through a claim.
        async with hbtrio.open_engine(b, devices={"gate@1.0": gate}) as other:
            assert await other.schedule(pid, {"n": 1}) == 4
            assert (await other.now(pid))["count"] == 4
        a._control.paused.clear()
        await wait_until(lambda: a._control.lease.valid(time.monotonic()))
        assert await engine.schedule(pid, {"n": 1}) == 5  # b released it: a takes it
        assert (await engine.now(pid))["count"] == 5
        verify_schedule(pid, await a.get_assignments(pid, 0, 10))


async def test_nowait_reads_of_a_process_held_elsewhere_never_checkpoint(pg_dsn: str) -> None:
    async with opened(pg_dsn) as a, opened(pg_dsn) as b:
        proc = Proc()
        await proc.put(a)
        with trio.testing.assert_no_checkpoints():
            for call in (
                lambda: b.get_result_nowait(proc.pid, 0),
                lambda: b.get_assignments_nowait(proc.pid, 0, 1),
                lambda: b.get_process_nowait(proc.pid),
            ):
                with pytest.raises(trio.WouldBlock):
                    call()
        assert await b.stored_result(proc.pid, 0) is None
