"""What a cluster costs a request: local, forwarded, and answered from the database.

::

    python benchmarks/cluster_bench.py --requests 2000

Starts a PostgreSQL server of its own (``tests/pgserver.py``, fsync as asked)
and two ``hbtrio serve --store`` nodes (``tests/pgcluster.py``), spawns a
process on node 0, and times, one request at a time (latency) and with 32
clients (throughput): schedules and computes of the next slot sent to the
owner, the same sent to node 1 (forwarded), and computes of stored slots
sent to node 1 (answered from the database). Each figure: requests/s, p50
and p99 latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pgcluster
import pgserver

COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}


async def _case(name: str, n: int, clients: int, call) -> str:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    counter = iter(range(n))

    async def client() -> None:
        for i in counter:
            start = time.perf_counter()
            answer = await call(i)
            latencies.append(time.perf_counter() - start)
            assert answer.status_code == 200, answer.text

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    elapsed = time.perf_counter() - start
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(0.99 * len(latencies))] * 1000
    return f"{name:42} {n / elapsed:9.0f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms"


async def run(requests: int, fsync: bool) -> None:
    server = pgserver.start_or_skip(fsync=fsync)
    try:
        name = server.new_database()
        logs = Path(tempfile.mkdtemp(prefix="hbtrio-cluster-bench-"))
        print(f"(the nodes' logs: {logs})")
        nodes = [pgcluster.Node(i, server.uri(name), logs) for i in range(2)]
        for node in nodes:
            await node.start()
        client = pgcluster.Client()
        try:
            owner, other = nodes
            lines = []
            for clients in (1, 32):
                pid = await client.spawn(owner, {**COUNTER, "bench": clients})
                pid2 = await client.spawn(owner, {**COUNTER, "bench2": clients})
                lines.append(f"-- {clients} client(s)")
                # In this order: each compute case finds the slots the cases before it
                # scheduled (pid2's by the forwarded schedule) or computed (pid's).
                cases = [
                    (
                        "schedule at the owner",
                        lambda i, pid=pid: client.schedule(owner, pid, {"n": 1}),
                    ),
                    (
                        "schedule forwarded by another node",
                        lambda i, pid=pid2: client.schedule(other, pid, {"n": 1}),
                    ),
                    (
                        "compute (computed now) at the owner",
                        lambda i, pid=pid: client.compute(owner, pid, i + 1),
                    ),
                    (
                        "compute (stored) at another node",
                        lambda i, pid=pid: client.compute(other, pid, i + 1),
                    ),
                    (
                        "compute (computed now) forwarded",
                        lambda i, pid=pid2: client.compute(other, pid, i + 1),
                    ),
                ]
                for label, call in cases:
                    lines.append(await _case(label, requests, clients, call))
            print("\n".join(lines))
        finally:
            await client.aclose()
            for node in nodes:
                await node.stop()
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--fsync", choices=["on", "off"], default="on")
    args = parser.parse_args()
    trio.run(run, args.requests, args.fsync == "on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
