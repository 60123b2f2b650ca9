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

import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

import hbtrio
from hbtrio.testing import audit_process
from pgcluster import LEASE, TOKEN, Client, Netns, Node, node_env, percentile, wait_for
from pgserver import PgServer

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
    devices = {"slow@1.0": __import__("cluster_devices").SlowCounter()}
    compared = 0
    store = hbtrio.PostgresStore(dsn, lease=LEASE)
    async with hbtrio.open_engine(store, devices=devices):
        for pid in pids:
            report = await audit_process(store, pid, devices)
            compared += report.results
    return compared


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
    async with cluster(pg_server, tmp_path, 2, options=("--redirect",)) as (nodes, client, dsn):
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
