"""What the fence costs: fenced writes of `PostgresStore` against the same writes unfenced.

::

    python benchmarks/pg_fence.py --dsn "host=127.0.0.1 port=5432 user=me dbname=bench"
    python benchmarks/pg_fence.py --start-server          # initdb + pg_ctl of its own

It measures, on one process, with psycopg 3 and the store's own statements:

* ``single``: one assignment per transaction, one after the other (a durable
  ``schedule`` at the store): BEGIN, the owner row locked ``FOR SHARE`` and
  its epoch checked, the INSERT, COMMIT; against the same without the fence;
* ``batch``: 100 assignments per transaction, per row;
* ``results``: 100,000 results written behind, per row (the write-behind's
  pieces of 4,096 rows, each fenced).

``--start-server`` starts a server with the tests' helper (``tests/pgserver.py``),
with ``fsync`` as asked (``--fsync on`` by default: commits wait for the disk).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import trio

import hbtrio
from hbtrio import freeze, message_id
from hbtrio._codec import encode
from hbtrio._postgres._rows import check_fence, insert_assignments
from hbtrio._scheduler import make_assignment

COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}


def _assignments(pid: str, first: int, count: int, chain: bytes) -> tuple[list[Any], bytes]:
    out = []
    for slot in range(first, first + count):
        assignment, chain = make_assignment(pid, slot, freeze({"n": slot}), chain)
        out.append(assignment)
    return out, chain


async def _store_runs(dsn: str, single: int, batches: int, results: int) -> dict[str, float]:
    out: dict[str, float] = {}
    store = hbtrio.PostgresStore(dsn, lease=30.0)
    await store.open()
    try:
        definition = freeze({**COUNTER, "bench": time.time()})
        pid = message_id(definition)
        first, chain = make_assignment(pid, 0, definition, b"", mid=pid)
        await store.put_process(pid, definition, first)
        slot = 1

        async def appends(count: int, size: int) -> list[float]:
            """Seconds each of ``count`` appends of ``size`` assignments took."""
            nonlocal slot, chain
            times = []
            for _ in range(count):
                batch, chain = _assignments(pid, slot, size, chain)
                start = time.perf_counter()
                await store.append_assignments(pid, batch)
                times.append(time.perf_counter() - start)
                slot += size
            return times

        times = await appends(single, 1)
        out["single fenced append, ms (median)"] = statistics.median(times) * 1000
        out["single fenced append, ms (p90)"] = sorted(times)[int(len(times) * 0.9)] * 1000
        times = await appends(batches, 100)
        out["batch of 100 fenced, ms per row (median)"] = statistics.median(times) * 10
        state = freeze({"count": 1, "at-slot": 1})
        await store.append_assignments(pid, _assignments(pid, slot, results - slot + 1, chain)[0])
        start = time.perf_counter()
        store.put_states_nowait(pid, 1, [state] * results, 1_000_000_000)
        await store.flush()
        out["results written behind, us per row"] = (time.perf_counter() - start) / results * 1e6
        out["commits"] = store.statistics().commits
    finally:
        await store.close()
    return out


def _raw_runs(dsn: str, single: int) -> dict[str, float]:
    """The same single append as the store's, by hand, with and without the fence."""
    out: dict[str, float] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        node = conn.execute(
            "INSERT INTO nodes (name, lease) VALUES ('bench', interval '1 hour') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        pid = f"raw-{time.time()}"
        proc = conn.execute(
            "INSERT INTO processes (pid, definition) VALUES (%s, '') RETURNING id", (pid,)
        ).fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO owners (proc, node, epoch) VALUES (%s, %s, 1)", (proc, node))
        conn.execute(
            "INSERT INTO assignments (proc, slot, message_id, assignment, epoch)"
            " VALUES (%s, 0, 'm', '', 1)",
            (proc,),
        )
        row = encode({"n": 1, "pad": "x" * 200})
        for fenced in (True, False):
            times = []
            for slot in range(1, single + 1):
                start = time.perf_counter()
                with conn.transaction():
                    if fenced:
                        assert check_fence(conn, node, [(proc, 1)]) == {}
                    assert insert_assignments(conn, proc, 1, slot, ["m"], [row])
                times.append(time.perf_counter() - start)
            conn.execute("DELETE FROM assignments WHERE proc = %s AND slot > 0", (proc,))
            label = "fenced" if fenced else "unfenced"
            out[f"raw {label} transaction, ms (median)"] = statistics.median(times) * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--start-server", action="store_true")
    parser.add_argument("--fsync", choices=["on", "off"], default="on")
    parser.add_argument("--single", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--results", type=int, default=100_000)
    args = parser.parse_args()
    server = None
    dsn = args.dsn
    if args.start_server:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import pgserver

        server = pgserver.start_or_skip(fsync=args.fsync == "on")
        dsn = server.create_database()
    if dsn is None:
        parser.error("give --dsn or --start-server")
    try:
        figures = trio.run(_store_runs, dsn, args.single, args.batches, args.results)
        figures |= _raw_runs(dsn, args.single)
    finally:
        if server is not None:
            server.stop()
    for name, value in figures.items():
        print(f"{name:45} {value:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
