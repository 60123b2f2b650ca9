"""Memory held at the budget while ten times more processes than fit are driven through an engine.

Run (not part of CI)::

    python benchmarks/budget_soak.py                      # bounded, then unbounded
    python benchmarks/budget_soak.py --processes 400 --fit 40 --size 1M --seconds 20

Each live worker holds a real buffer of ``--size`` bytes (a live device
whose instances allocate it, report it with ``memory_size()`` and snapshot
only the few bytes they need to rebuild it). ``--processes`` processes are
driven by ``--clients`` clients, each asking for the next slot of a random
one of its own processes (a schedule, then a compute) for ``--seconds`` seconds, on an
SQLite store. The engine runs once with ``max_memory`` set to what ``--fit``
workers hold, once without. Every second the RSS (``/proc/self/statm``) and
the engine's ``memory_bytes`` are sampled. One JSON line per run: requests
per second, cold starts (workers started) per second, evictions, refusals,
the RSS samples' median and maximum and the estimate's maximum; and a check
that every process's last state is right.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import hbtrio
from hbtrio._cli._parser import byte_size

MiB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Buffers:
    """A live device: each instance holds ``size`` bytes and a running total."""

    def __init__(self, size: int) -> None:
        self.size = size

    def boot(self, process: hbtrio.Message, snapshot: Any) -> BuffersInstance:
        return BuffersInstance(self.size, 0 if snapshot is None else int(snapshot))


class BuffersInstance:
    def __init__(self, size: int, total: int) -> None:
        self.buffer = bytearray(size)  # touched below: resident, not just reserved
        self.buffer[::4096] = b"\1" * len(range(0, size, 4096))
        self.total = total

    def compute(self, assignment: hbtrio.Message) -> dict[str, int]:
        self.total += assignment["body"]["n"]
        self.buffer[self.total % len(self.buffer)] = self.total & 0xFF
        return {"total": self.total}

    def snapshot(self) -> bytes:
        return str(self.total).encode()

    def memory_size(self) -> int:
        return len(self.buffer)


async def run(args: argparse.Namespace, bounded: bool, path: Path) -> dict[str, Any]:
    device = Buffers(args.size)
    budget = args.fit * (args.size + 3 * 1024) if bounded else None
    rng = random.Random(7)
    expected: dict[str, int] = {}
    rss: list[int] = []
    estimates: list[int] = []
    requests = refused = 0
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path),
        devices={"buffers@1.0": device},
        cache_frequency=50,
        max_memory=budget,
    ) as engine:
        pids = []
        for i in range(args.processes):
            pid = await engine.spawn(
                {"device": "process@1.0", "execution-device": "buffers@1.0", "i": i}
            )
            pids.append(pid)
            expected[pid] = 0
        start = rss_bytes()
        deadline = trio.current_time() + args.seconds
        t0 = time.perf_counter()
        started0 = engine.statistics().workers_started

        async def client(mine: list[str]) -> None:
            nonlocal requests, refused
            while trio.current_time() < deadline:
                pid = rng.choice(mine)  # each process has one client: states are checkable
                n = rng.randrange(1, 10)
                slot = await engine.schedule(pid, {"n": n})
                expected[pid] += n
                try:
                    state = await engine.compute(pid, slot)
                except hbtrio.Overloaded:
                    refused += 1
                    await trio.sleep(0.01)
                    continue
                requests += 1
                if state["total"] != expected[pid]:
                    raise AssertionError(f"{pid} at {slot}: {state['total']} != {expected[pid]}")

        async def sampler() -> None:
            while trio.current_time() < deadline:
                await trio.sleep(1.0)
                rss.append(rss_bytes() - start)
                estimates.append(engine.statistics().memory_bytes)
                print(
                    f"  {'bounded' if bounded else 'unbounded'} t={len(rss)}s "
                    f"rss+{rss[-1] / MiB:.0f} MiB estimate {estimates[-1] / MiB:.0f} MiB "
                    f"workers {len(engine.workers)} requests {requests}",
                    file=sys.stderr,
                    flush=True,
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler)
            for k in range(args.clients):
                nursery.start_soon(client, pids[k :: args.clients])
        elapsed = time.perf_counter() - t0
        stats = engine.statistics()
        ok = True
        for pid, total in expected.items():
            ok = ok and (await engine.now(pid)).get("total", 0) == total
    return {
        "run": "bounded" if bounded else "unbounded",
        "processes": args.processes,
        "fit": args.fit,
        "size_bytes": args.size,
        "max_memory": budget,
        "requests_per_second": requests / elapsed,
        "cold_starts_per_second": (stats.workers_started - started0) / elapsed,
        "evictions": stats.evictions,
        "refused": refused,
        "rss_growth_median_mib": statistics.median(rss) / MiB if rss else None,
        "rss_growth_max_mib": max(rss) / MiB if rss else None,
        "estimate_max_mib": max(estimates) / MiB if estimates else None,
        "check": {"ok": ok},
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/budget_soak.py", description=__doc__)
    p.add_argument("--processes", type=int, default=400)
    p.add_argument("--fit", type=int, default=40, help="workers the memory budget holds")
    p.add_argument("--size", type=byte_size, default=MiB, help="bytes each live worker holds")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--only", choices=["bounded", "unbounded"])
    args = p.parse_args()
    for bounded in (True, False):
        if args.only and args.only != ("bounded" if bounded else "unbounded"):
            continue
        with tempfile.TemporaryDirectory(prefix="hbtrio-budget-") as tmp:
            line = trio.run(run, args, bounded, Path(tmp) / "soak.sqlite")
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
