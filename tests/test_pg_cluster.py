"""A cluster of real nodes: three ``hbtrio serve`` subprocesses on one PostgreSQL, lease 1 s.

Each test starts its own nodes on a fresh database (``pgcluster``) and prints
its figures (run with ``-s`` to see them; docs/reliability.md has them).
``HBTRIO_LONG=1`` runs the long variants (more kills, more load).

What is tested here, one guarantee per test:

* routing: every node answers for every process (forwarded to the owner,
  keeping the token; stored results from the database; ``--redirect``, which
  the CLI follows with its token); ``GET /cluster``;
* ``kill -9`` of the owner under steady schedules, several times: takeover
  times, and no acknowledged schedule lost, no slot twice, no gap, the hash
  chain verifies;
* 50 waiters in flight when the owner dies: all 50 get the right state;
* a paused owner (SIGSTOP past the lease, its own checks off by the test
  hook, then SIGCONT): nothing it writes under its stale epoch is accepted;
* a partition of the owner (a network namespace, link down past the lease,
  then up): none of its buffered writes is accepted;
* a graceful handoff (SIGTERM) without waiting for the lease;
* and after each, every process recomputed on a single engine from its
  assignments gives the states stored (`hbtrio.testing.audit_process`).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

import hbtrio
from cluster_devices import QuickCounter
from hbtrio.testing import audit_process
from pgcluster import LEASE, TOKEN, Client, Netns, Node, node_env, percentile, wait_for
from pgserver import PgServer, start_or_skip

LONG = os.environ.get("HBTRIO_LONG") == "1"
COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}
SLOW = {"device": "process@1.0", "execution-device": "slow@1.0"}

pytestmark = [
    # Requests cut off by a kill leave httpx's generators unfinished; collected later.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpx:ResourceWarning"),
]


def figures(name: str, **values: object) -> None:
    """Print a test's figures on one line (shown with ``pytest -s``)."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


@asynccontextmanager
async def cluster(
    pg_server: PgServer,
    tmp_path: Path,
    count: int = 3,
    *,
    options: tuple[str, ...] = (),
    env: dict[str, dict[str, str]] | None = None,
    netns: dict[int, Netns] | None = None,
) -> AsyncIterator[tuple[list[Node], Client, str]]:
    """``count`` nodes on a fresh database, started together; the nodes, a client, the DSN."""
    name = pg_server.new_database()
    nodes = []
    for i in range(count):
        ns = (netns or {}).get(i)
        store = pg_server.uri(name, host=ns.root_ip if ns is not None else "127.0.0.1")
        host = ns.node_ip if ns is not None else "127.0.0.1"
        nodes.append(
            Node(i, store, tmp_path, host=host, netns=ns, options=options, env=(env or {}).get(i))
        )
    client = Client()
    try:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.start)
        yield nodes, client, pg_server.dsn(name)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(node.stop)
            for node in nodes:
                await node.reap()


async def audit_all(dsn: str, pids: list[str]) -> int:
    """Recompute every process on one engine from its stored assignments and compare every
    stored result and snapshot (`audit_process`); the results compared."""
    devices = {"slow@1.0": QuickCounter()}
    compared = 0
    store = hbtrio.PostgresStore(dsn, lease=LEASE)
    async with hbtrio.open_engine(store, devices=devices):
        for pid in pids:
            report = await audit_process(store, pid, devices)
            compared += report.results
    return compared


async def preload(dsn: str, definition: dict[str, Any], bodies: list[Any]) -> tuple[str, Any]:
    """Spawn and schedule a process in one go from an embedded store, then let it go (the
    first node asked takes it over); its ID and ``{slot: message ID}``."""
    store = hbtrio.PostgresStore(dsn, lease=LEASE)
    async with hbtrio.open_engine(store, devices={"slow@1.0": QuickCounter()}) as engine:
        pid = await engine.spawn(definition)
        slots = await engine.schedule_many(pid, bodies)
    return pid, {slot: hbtrio.message_id(b) for slot, b in zip(slots, bodies, strict=True)}


async def settled(
    client: Client, node: Node, dsn: str, acked: dict[str, dict[int, str]], pid: str, slots: int
) -> int:
    """The end state after a takeover is right: no row of an old epoch committed after its
    takeover, ``pid`` computes to ``slots`` at ``node``, every process in ``acked`` holds
    the schedule acknowledged and a whole hash chain, and an audit agrees; the results
    compared (`audit_all`)."""
    assert stale_rows(dsn) == 0
    final = await client.compute(node, pid, slots, wait=60)
    assert final.status_code == 200 and final.json()["count"] == slots
    for each in acked:
        check_schedule(dsn, each, acked[each])
        await verify_chain(dsn, each)
    return await audit_all(dsn, list(acked))


def schedule_rows(dsn: str, pid: str) -> list[tuple[int, str, int]]:
    """``(slot, message ID, epoch)`` of every stored assignment of ``pid``, in slot order."""
    with psycopg.connect(dsn) as conn:
        return [
            (int(s), str(m), int(e))
            for s, m, e in conn.execute(
                "SELECT a.slot, a.message_id, a.epoch FROM assignments a"
                " JOIN processes p ON p.id = a.proc WHERE p.pid = %s ORDER BY a.slot",
                (pid,),
            )
        ]


def stale_rows(dsn: str) -> int:
    """Rows written under an epoch that committed after the takeover that ended it."""
    query = (
        "SELECT count(*) FROM {table} AS w JOIN takeovers AS t"
        " ON t.proc = w.proc AND t.epoch = w.epoch + 1"
        " WHERE pg_xact_commit_timestamp(w.xmin) > pg_xact_commit_timestamp(t.xmin)"
    )
    with psycopg.connect(dsn) as conn:
        return sum(
            int(conn.execute(query.format(table=t)).fetchone()[0])  # type: ignore[index]
            for t in ("assignments", "results", "snapshots")
        )


def check_schedule(dsn: str, pid: str, acknowledged: dict[int, str]) -> dict[str, int]:
    """Every acknowledged schedule at its slot with its message, no gap, the chain verifies."""
    rows = schedule_rows(dsn, pid)
    slots = [s for s, _, _ in rows]
    assert slots == list(range(len(rows))), "a gap or a slot twice"
    stored = {s: m for s, m, _ in rows}
    lost = [s for s, m in acknowledged.items() if stored.get(s) != m]
    assert not lost, f"acknowledged schedules lost or changed: {lost[:10]}"
    return {"slots": len(rows), "acknowledged": len(acknowledged), "lost": len(lost), "gaps": 0}


async def verify_chain(dsn: str, pid: str) -> None:
    store = hbtrio.PostgresStore(dsn, lease=LEASE)
    await store.open()
    try:
        hbtrio.verify_schedule(pid, await store.get_assignments(pid, 0, 10**9))
    finally:
        await store.close()


# -- routing -------------------------------------------------------------------------------------


async def test_every_node_answers_for_every_process(pg_server: PgServer, tmp_path: Path) -> None:
    async with cluster(pg_server, tmp_path) as (nodes, client, dsn):
        pids = [await client.spawn(node, {**COUNTER, "on": node.index}) for node in nodes]
        for pid, owner in zip(pids, nodes, strict=True):
            assert await client.owner(nodes[0], pid) == owner.url
        # Schedules through every node land at the owner, one after the other.
        for _round in range(3):
            for node in nodes:
                for pid in pids:
                    answer = await client.schedule(node, pid, {"n": 1})
                    assert answer.status_code == 200, answer.text
        for node in nodes:
            for pid in pids:
                answer = await client.compute(node, pid, 9)
                assert answer.status_code == 200 and answer.json()["count"] == 9, answer.text
        # A write without the token is refused by the node asked, forwarded or not.
        answer = await client.http.post(
            f"{nodes[1].url}/{pids[0]}/schedule", json={"n": 1}, headers={"authorization": ""}
        )
        assert answer.status_code == 401
        described = [await client.cluster(node) for node in nodes]
        forwarded = sum(d["node"]["forwarded"] for d in described)
        stored = sum(d["node"]["stored-answers"] for d in described)
        assert forwarded >= 2 * 3 * 2  # two of three nodes forward every schedule
        assert stored >= 1  # non-owners answer stored results from the database
        assert {n["url"] for n in described[0]["nodes"] if n["alive"]} == {n.url for n in nodes}
        assert all(d["node"]["takeovers"] == 0 for d in described)
        answer = await client.http.get(f"{nodes[2].url}/{pids[0]}/now")
        assert answer.status_code == 200 and answer.json()["count"] == 9
        assert answer.headers.get("x-hbtrio-owner") == nodes[0].url
        figures("routing", forwarded=forwarded, stored_answers=stored)
        assert await audit_all(dsn, pids) >= 3 * 10


async def test_redirect_mode_and_the_cli_follows_with_its_token(
    pg_server: PgServer, tmp_path: Path
) -> None:
    async with cluster(pg_server, tmp_path, 2, options=("--redirect",)) as (nodes, client, _dsn):
        pid = await client.spawn(nodes[0], COUNTER)
        answer = await client.schedule(nodes[1], pid, {"n": 5})
        assert answer.status_code == 307
        assert answer.headers["location"] == f"{nodes[0].url}/{pid}/schedule"
        env = node_env({"HBTRIO_TOKEN": TOKEN, "HBTRIO_URL": nodes[1].url})
        cli = [sys.executable, "-m", "hbtrio._cli"]
        done = await trio.run_process(
            [*cli, "schedule", pid, "n:=5"], capture_stdout=True, capture_stderr=True, env=env
        )
        assert done.stdout.strip() == b"1", done.stderr
        done = await trio.run_process([*cli, "now", pid, "--json"], capture_stdout=True, env=env)
        assert b'"count":5' in done.stdout.replace(b" ", b"")
        assert (await client.cluster(nodes[1]))["node"]["redirected"] >= 2


# -- kill -9 of the owner -------------------------------------------------------------------------

KILLS = 10 if LONG else 3


async def test_kill_9_of_the_owner_under_steady_schedules(
    pg_server: PgServer, tmp_path: Path
) -> None:
    async with cluster(pg_server, tmp_path) as (nodes, client, dsn):
        pids = [await client.spawn(nodes[i], {**COUNTER, "k": i}) for i in range(3)]
        acked: dict[str, dict[int, str]] = {pid: {} for pid in pids}
        acks: list[tuple[float, float, str]] = []  # (request started, answered, process)
        duplicates, wrong_reads, failures = 0, 0, Counter[str]()
        alive = dict.fromkeys(range(3), True)
        stop = trio.Event()
        seq = itertools.count()

        async def scheduler(c: int) -> None:
            nonlocal duplicates
            rng = random.Random(c)
            while not stop.is_set():
                pid = rng.choice(pids)
                node = nodes[rng.choice([i for i, up in alive.items() if up])]
                body = {"n": 1, "c": c, "k": next(seq)}
                started = time.monotonic()
                try:
                    answer = await client.schedule(node, pid, body)
                except httpx.HTTPError as exc:
                    failures[type(exc).__name__] += 1
                    continue
                if answer.status_code != 200:
                    failures[f"{answer.status_code} {answer.json().get('error')}"] += 1
                    continue
                slot, mid = answer.json()["slot"], hbtrio.message_id(body)
                if acked[pid].get(slot, mid) != mid:
                    duplicates += 1
                acked[pid][slot] = mid
                acks.append((started, time.monotonic(), pid))

        async def reader(c: int) -> None:
            nonlocal wrong_reads
            rng = random.Random(100 + c)
            while not stop.is_set():
                pid = rng.choice(pids)
                latest = max(acked[pid], default=0)
                slot = rng.randint(0, latest)
                node = nodes[rng.choice([i for i, up in alive.items() if up])]
                try:
                    answer = await client.compute(node, pid, slot, wait=10)
                except httpx.HTTPError:
                    continue
                if answer.status_code == 200 and answer.json()["count"] != slot:
                    wrong_reads += 1

        takeovers: list[float] = []
        async with trio.open_nursery() as nursery:
            for c in range(6):
                nursery.start_soon(scheduler, c)
            for c in range(2):
                nursery.start_soon(reader, c)
            for k in range(KILLS):
                await trio.sleep(0.5)
                pid = pids[k % len(pids)]
                witness = next(n for i, n in enumerate(nodes) if alive[i])
                url = await client.owner(witness, pid)
                victim = next(n for n in nodes if n.url == url)
                alive[victim.index] = False
                victim.kill()
                killed = time.monotonic()
                await victim.wait()

                async def taken_over(pid: str = pid, killed: float = killed) -> float | None:
                    # The first schedule of the process asked after the kill, answered.
                    after = [(s, a) for s, a, p in acks if p == pid and s > killed]
                    return min(after)[1] if after else None

                answered = await wait_for(taken_over, 20, f"a schedule of {pid} after the kill")
                takeovers.append(answered - killed)
                await victim.start()  # a new incarnation on the same URL
                alive[victim.index] = True
            stop.set()
        checked = [check_schedule(dsn, pid, acked[pid]) for pid in pids]
        for pid in pids:
            await verify_chain(dsn, pid)
        assert duplicates == 0 and wrong_reads == 0
        compared = await audit_all(dsn, pids)
        figures(
            "kill -9",
            kills=KILLS,
            takeover_p50=f"{percentile(takeovers, 0.5):.2f}s",
            takeover_max=f"{max(takeovers):.2f}s",
            acknowledged=sum(c["acknowledged"] for c in checked),
            slots=sum(c["slots"] for c in checked),
            lost=0,
            duplicate_slots=duplicates,
            gaps=0,
            chain="verified",
            recomputed=compared,
            refused=dict(failures),
        )


async def test_fifty_waiters_survive_the_death_of_the_owner(
    pg_server: PgServer, tmp_path: Path
) -> None:
    async with cluster(pg_server, tmp_path) as (nodes, client, dsn):
        pid = await client.spawn(nodes[0], {**SLOW, "w": 50})
        slots = 200
        for _ in range(slots):
            assert (await client.schedule(nodes[0], pid, {"n": 1, "ms": 10})).status_code == 200
        answers: list[httpx.Response] = []

        async def waiter(i: int) -> None:
            answers.append(await client.compute(nodes[1 + i % 2], pid, slots, wait=60))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(waiter, i)

            async def parked() -> bool:
                stats = (await client.http.get(f"{nodes[0].url}/stats")).json()
                return bool(stats["waiters"] >= 50 and stats["slots_computed"] > 5)

            await wait_for(parked, 20, "50 waiters parked on the owner")
            nodes[0].kill()
            killed = time.monotonic()
        elapsed = time.monotonic() - killed
        statuses = Counter(a.status_code for a in answers)
        assert statuses == {200: 50}, statuses
        assert all(a.json()["count"] == slots for a in answers)
        owner = await client.owner(nodes[1], pid)
        assert owner in (nodes[1].url, nodes[2].url)
        await nodes[0].wait()
        figures("50 waiters", completed=50, after_kill=f"{elapsed:.2f}s", new_owner=owner)
        assert await audit_all(dsn, [pid]) >= slots


# -- a paused owner ------------------------------------------------------------------------------


async def test_a_paused_owner_gets_nothing_accepted_under_its_stale_epoch(
    pg_server: PgServer, tmp_path: Path
) -> None:
    # Node 0 never gives up what it holds by itself (the test hook): only the fence can stop
    # its writes once it wakes up after the takeover.
    hook = {0: {"HBTRIO_TEST_TRUST_OWNERSHIP": "1"}}
    async with cluster(pg_server, tmp_path, env=hook) as (nodes, client, dsn):
        owner = nodes[0]
        p = await client.spawn(owner, {**COUNTER, "paused": 1})
        slots = 1500
        q, q_acked = await preload(dsn, {**SLOW, "paused": 2}, [{"n": 1, "ms": 2}] * slots)
        acked: dict[str, dict[int, str]] = {p: {}, q: q_acked}
        for k in range(10):
            body = {"n": 1, "k": k}
            answer = await client.schedule(nodes[k % 3], p, body)
            acked[p][answer.json()["slot"]] = hbtrio.message_id(body)
        # The owner takes q over and computes it in the background, writing behind.
        assert (await client.compute(owner, q, slots, wait=0.3)).status_code == 202
        assert await client.owner(nodes[1], q) == owner.url
        owner.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        await trio.sleep(LEASE * 1.5)
        body = {"n": 1, "k": "taken"}
        answer = await client.schedule(nodes[1], p, body)
        assert answer.status_code == 200, answer.text
        acked[p][answer.json()["slot"]] = hbtrio.message_id(body)
        takeover = time.monotonic() - stopped
        assert await client.owner(nodes[2], p) == nodes[1].url
        assert (await client.compute(nodes[2], q, slots, wait=0.5)).status_code in (200, 202)
        owner.signal(signal.SIGCONT)
        # The old owner still believes it holds p: its write is refused by the fence,
        # and the request goes to the new owner.
        body = {"n": 1, "k": "stale"}
        answer = await client.schedule(owner, p, body)
        assert answer.status_code == 200, answer.text
        acked[p][answer.json()["slot"]] = hbtrio.message_id(body)
        assert answer.headers.get("x-hbtrio-owner") == nodes[1].url

        async def fenced() -> dict[str, Any]:
            node = (await client.cluster(owner))["node"]
            return node if node["fenced-writes"] >= 1 else {}

        stale_node = await wait_for(fenced, 20, "the old owner's writes to be refused")
        compared = await settled(client, nodes[1], dsn, acked, q, slots)
        figures(
            "SIGSTOP",
            paused_for=f"{LEASE * 1.5:.1f}s",
            takeover=f"{takeover:.2f}s",
            stale_writes_refused=stale_node["fenced-writes"],
            stale_rows_refused=stale_node["fenced-rows"],
            stale_writes_accepted=0,
            recomputed=compared,
        )


# -- a partition ---------------------------------------------------------------------------------


async def test_a_partitioned_owner_gets_none_of_its_buffered_writes_accepted(
    tmp_path: Path,
) -> None:
    why = Netns.available()
    if why is not None:
        pytest.skip(why)
    ns = Netns(0)
    ns.create()
    server = None
    try:
        server = start_or_skip(listen=("127.0.0.1", ns.root_ip))
        async with cluster(server, tmp_path, netns={0: ns}) as (nodes, client, dsn):
            owner = nodes[0]
            p = await client.spawn(owner, {**COUNTER, "cut": 1})
            slots = 2000
            q, q_acked = await preload(dsn, {**SLOW, "cut": 2}, [{"n": 1, "ms": 2}] * slots)
            acked: dict[str, dict[int, str]] = {p: {}, q: q_acked}
            assert (await client.compute(owner, q, slots, wait=0.3)).status_code == 202
            assert await client.owner(nodes[1], q) == owner.url
            ns.cut()
            cut = time.monotonic()
            await trio.sleep(LEASE * 1.5)
            # Meanwhile the other nodes take both processes over.
            body = {"n": 1, "k": "taken"}
            answer = await client.schedule(nodes[1], p, body)
            assert answer.status_code == 200, answer.text
            acked[p][answer.json()["slot"]] = hbtrio.message_id(body)
            takeover = time.monotonic() - cut
            assert (await client.compute(nodes[2], q, slots, wait=0.5)).status_code in (200, 202)
            await trio.sleep(LEASE)
            ns.restore()

            async def refused() -> dict[str, Any]:
                try:
                    node = (await client.cluster(owner))["node"]
                except httpx.HTTPError:
                    return {}
                return node if node["fenced-rows"] + node["fenced-writes"] > 0 else {}

            old = await wait_for(refused, 30, "the partitioned owner's buffered writes")
            compared = await settled(client, nodes[1], dsn, acked, q, slots)
            figures(
                "partition",
                cut_for=f"{LEASE * 2.5:.1f}s",
                takeover=f"{takeover:.2f}s",
                buffered_rows_refused=old["fenced-rows"],
                buffered_writes_refused=old["fenced-writes"],
                buffered_writes_accepted=0,
                lost_by_old_owner=old["lost"],
                recomputed=compared,
            )
    finally:
        if server is not None:
            server.stop()
        ns.remove()


# -- a graceful handoff ----------------------------------------------------------------------------


async def test_a_graceful_shutdown_hands_its_processes_over_at_once(
    pg_server: PgServer, tmp_path: Path
) -> None:
    lease = 10.0
    options = ("--lease", str(lease))
    async with cluster(pg_server, tmp_path, options=options) as (nodes, client, dsn):
        pid = await client.spawn(nodes[0], COUNTER)
        for _ in range(10):
            assert (await client.schedule(nodes[0], pid, {"n": 1})).status_code == 200
        nodes[0].signal(signal.SIGTERM)
        asked = time.monotonic()
        slots = []
        while True:  # schedules through node 1: forwarded to node 0 until it hands over
            answer = await client.schedule(nodes[1], pid, {"n": 1})
            assert answer.status_code == 200, answer.text
            slots.append(answer.json()["slot"])
            if "x-hbtrio-owner" not in answer.headers:  # answered by node 1's own engine
                break
            assert time.monotonic() - asked < lease, "still forwarded after a lease"
        handoff = time.monotonic() - asked
        assert slots == list(range(11, 11 + len(slots)))
        assert await nodes[0].wait() == 0
        assert await client.owner(nodes[2], pid) == nodes[1].url
        assert handoff < lease / 2, handoff
        last = slots[-1]
        assert (await client.compute(nodes[2], pid, last)).json()["count"] == last
        figures(
            "graceful handoff", lease=f"{lease:.0f}s", handoff=f"{handoff:.2f}s", slots=len(slots)
        )
        await verify_chain(dsn, pid)
        assert await audit_all(dsn, [pid]) >= last
