"""What memory a `SQLiteStore` engine keeps: schedules not computed yet, and many processes.

Run (not part of CI)::

    python benchmarks/memory_bounds.py                       # all three scenarios
    python benchmarks/memory_bounds.py --scenario tiny --n 1000000
    python benchmarks/memory_bounds.py --scenario processes --n 200000
    python benchmarks/memory_bounds.py --scenario body --n 64

Each scenario runs in a fresh interpreter and prints one JSON line; RSS is
read from ``/proc/self/statm`` after ``gc.collect()``, once before the
scenario and once after it (the engine still open):

- ``tiny``: one process, ``--n`` schedules of ``{"n": 1}`` (in
  `schedule_many` calls of 1,000), none computed.
- ``processes``: ``--n`` processes, each spawned, given one schedule and
  computed to it; then every worker is left to be evicted (``max_idle`` of
  0.5 s) and the RSS is taken once none is live.
- ``body``: one process, ``--n`` schedules of a 1 MiB ``bytes`` body, none
  computed; ``per_body_mb`` is the RSS growth divided by ``--n``, and
  ``first_body_peak_mb`` how far the first one alone raised the peak RSS
  while it was scheduled (Linux; ``null`` elsewhere).

``kept`` counts what the store and the scheduler still hold in memory, read
from their private fields where they exist (``null`` where they do not).
The same file runs against an older checkout with ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import hbtrio

DEFINITION = {"device": "process@1.0", "execution-device": "counter@1.0"}
MiB = 1 << 20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def settled_rss() -> float:
    gc.collect()
    return rss_mb()


def kept(engine: hbtrio.Engine) -> dict[str, Any]:
    """How many entries the store and the scheduler keep (private fields, if present)."""
    store: Any = engine.store
    scheduler: Any = getattr(engine, "_scheduler", None)
    procs = getattr(store, "_procs", None)
    cached = None if procs is None else sum(len(p.assignments) for p in procs.values())
    tails = getattr(scheduler, "_tails", None)
    return {
        "store_processes": None if procs is None else len(procs),
        "store_cached_assignments": cached,
        "scheduler_tails": None if tails is None else len(tails),
        "live_workers": engine.stats().live_workers,
    }


async def tiny(engine: hbtrio.Engine, n: int) -> dict[str, Any]:
    pid = await engine.spawn(DEFINITION)
    before = settled_rss()
    t = time.monotonic()
    left = n
    while left > 0:
        k = min(left, 1000)
        await engine.schedule_many(pid, [{"n": 1}] * k)
        left -= k
    seconds = time.monotonic() - t
    after = settled_rss()
    return {"rss_before_mb": before, "rss_after_mb": after, "seconds": seconds}


async def processes(engine: hbtrio.Engine, n: int) -> dict[str, Any]:
    before = settled_rss()
    t = time.monotonic()
    numbers = iter(range(n))

    async def client() -> None:  # 100 of them, so that the clients' own tasks stay few
        for i in numbers:
            pid = await engine.spawn({**DEFINITION, "nonce": i})
            await engine.schedule(pid, {"n": 1})
            state = await engine.now(pid)
            assert state["count"] == 1

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(client)
    seconds = time.monotonic() - t
    peak = settled_rss()
    while engine.stats().live_workers:  # noqa: ASYNC110 - polling a counter, no event for it
        await trio.sleep(0.2)
    await engine.store.flush()
    await trio.sleep(0.1)
    after = settled_rss()
    return {
        "rss_before_mb": before,
        "rss_all_live_mb": peak,
        "rss_after_mb": after,
        "seconds": seconds,
    }


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux ``clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


async def body(engine: hbtrio.Engine, n: int) -> dict[str, Any]:
    pid = await engine.spawn(DEFINITION)
    await engine.schedule(pid, {"blob": b"x"})  # warm up the paths once
    before = settled_rss()
    # The first body alone: what it costs while it is scheduled (transient copies).
    peak = None
    if reset_peak():
        await engine.schedule(pid, {"blob": b"\x00" * MiB})
        peak = peak_rss_mb() - before
        n -= 1
    for i in range(n):
        await engine.schedule(pid, {"blob": i.to_bytes(4, "big") * (MiB // 4)})
    after = settled_rss()
    return {
        "rss_before_mb": before,
        "rss_after_mb": after,
        "per_body_mb": (after - before) / (n + (peak is not None)),
        "first_body_peak_mb": peak,
    }


SCENARIOS = {"tiny": (tiny, 1_000_000), "processes": (processes, 200_000), "body": (body, 64)}


async def run_one(name: str, n: int, synchronous: str) -> dict[str, Any]:
    fn, _ = SCENARIOS[name]
    tmp = tempfile.mkdtemp(prefix="hbtrio-mem-")
    try:
        store = hbtrio.SQLiteStore(str(Path(tmp) / "mem.sqlite"), synchronous=synchronous)
        async with hbtrio.open_engine(store, max_idle=0.5) as engine:
            out = await fn(engine, n)
            out["kept"] = kept(engine)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["growth_mb"] = round(out["rss_after_mb"] - out["rss_before_mb"], 1)
    return {"scenario": name, "n": n, **{k: _round(v) for k, v in out.items()}}


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--n", type=int, help="size (default: per scenario)")
    parser.add_argument("--synchronous", default="NORMAL")
    args = parser.parse_args(argv)
    if args.scenario != "all":
        n = args.n if args.n is not None else SCENARIOS[args.scenario][1]
        print(json.dumps(trio.run(run_one, args.scenario, n, args.synchronous)), flush=True)
        return 0
    for name in SCENARIOS:
        cmd = [sys.executable, __file__, "--scenario", name, "--synchronous", args.synchronous]
        if args.n is not None:
            cmd += ["--n", str(args.n)]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
