"""Soak and load: many processes, a long stream of requests, idle eviction, nothing lost.

Run (not part of CI)::

    python benchmarks/soak.py                          # 10,000 processes, 1,000,000 requests
    python benchmarks/soak.py --processes 2000 --requests 200000 --seconds 60
    python benchmarks/soak.py --store memory --json soak.json

One in-process engine (SQLite on a temporary file by default) serves
``--processes`` counter processes. ``--concurrency`` client tasks make
``--requests`` calls (or run for ``--seconds``, whichever ends first): 40 %
``schedule`` of ``{"n": 1}``, 30 % ``now``, 30 % ``compute`` of a random
earlier slot. Four out of five calls go to a "hot" fifth of the processes,
the rest anywhere, so cold workers keep being evicted after ``--max-idle``
seconds and started again. Since every message adds 1, the state at slot s
has ``count == s``: every answer is checked.

Every ``--interval`` seconds it prints one progress line: requests done,
throughput over the interval, RSS, live workers, workers started/stopped so
far, store results waiting to be written, errors. At the end it checks a
sample of processes from a fresh engine on the same store (nothing lost, the
right state) and prints a JSON summary (also to ``--json``): throughput and
memory over time, whether memory levelled off (RSS growth over the second
half of the run), worker counts, errors. Exit status 1 if anything went
wrong.

With ``--store memory`` every scheduled slot and its result stay in memory,
so RSS grows with the data: there, "levels off" is not expected, and the
summary says so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import hbtrio

DEFINITION = {"device": "process@1.0", "execution-device": "counter@1.0"}


def rss_mb() -> float:
    """Resident set size of this process now, in MB (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pids: list[str] = []
        self.hot: list[str] = []
        self.requests = 0
        self.by_kind: dict[str, int] = {"schedule": 0, "now": 0, "compute": 0}
        self.errors: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.started = 0.0
        self.rng = random.Random(args.seed)
        self.done = trio.Event()

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)
        else:
            self.errors[-1] = f"... and more ({text})"
        self._error_count = getattr(self, "_error_count", 0) + 1

    @property
    def error_count(self) -> int:
        return getattr(self, "_error_count", 0)

    def pick(self) -> str:
        if self.rng.random() < 0.8:
            return self.rng.choice(self.hot)
        return self.rng.choice(self.pids)

    async def spawn_all(self, engine: hbtrio.Engine) -> None:
        n = self.args.processes
        self.pids = [""] * n
        limiter = trio.CapacityLimiter(self.args.concurrency)

        async def spawn(i: int) -> None:
            async with limiter:
                self.pids[i] = await engine.spawn({**DEFINITION, "nonce": i})

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(spawn, i)
        self.hot = self.pids[: max(1, n // 5)]

    async def client(self, engine: hbtrio.Engine) -> None:
        rng = random.Random(self.rng.random())
        while not self.done.is_set():
            if self.requests >= self.args.requests:
                self.done.set()
                return
            self.requests += 1
            pid = self.pick()
            r = rng.random()
            try:
                if r < 0.4:
                    self.by_kind["schedule"] += 1
                    slot = await engine.schedule(pid, {"n": 1})
                    if slot < 1:
                        self.error(f"schedule returned slot {slot}")
                elif r < 0.7:
                    self.by_kind["now"] += 1
                    state = await engine.now(pid)
                    if state["count"] != state["at-slot"]:
                        self.error(f"now({pid}) = {dict(state)}")
                else:
                    self.by_kind["compute"] += 1
                    latest = await engine.latest_slot(pid)
                    slot = rng.randint(0, latest)
                    state = await engine.compute(pid, slot)
                    if state["count"] != slot or state["at-slot"] != slot:
                        self.error(f"compute({pid}, {slot}) = {dict(state)}")
            except Exception as exc:
                self.error(f"{type(exc).__name__}: {exc}")

    async def monitor(self, engine: hbtrio.Engine) -> None:
        last_requests, last_time = 0, time.monotonic()
        while True:
            with trio.move_on_after(self.args.interval):
                await self.done.wait()
            now = time.monotonic()
            stats = engine.stats()
            store = engine.store.statistics()
            sample = {
                "t": round(now - self.started, 2),
                "requests": self.requests,
                "rps": round((self.requests - last_requests) / max(now - last_time, 1e-9)),
                "rss_mb": round(rss_mb(), 1),
                "live_workers": stats.live_workers,
                "workers_started": stats.workers_started,
                "workers_stopped": stats.workers_stopped,
                "pending_results": store.pending_results,
                "errors": self.error_count,
            }
            self.samples.append(sample)
            print(
                "t={t:>7.1f}s requests={requests:>9} rate={rps:>7}/s rss={rss_mb:>7.1f}MB "
                "live={live_workers:>6} started={workers_started:>7} "
                "stopped={workers_stopped:>7} pending={pending_results:>6} "
                "errors={errors}".format(**sample),
                flush=True,
            )
            last_requests, last_time = self.requests, now
            if self.done.is_set():
                return

    async def verify(self, store: hbtrio.Store) -> dict[str, Any]:
        """A fresh engine on the same store: every sampled process is whole and right."""
        sample = self.hot[:200] + self.rng.sample(self.pids, min(300, len(self.pids)))
        checked = 0
        async with hbtrio.open_engine(store, max_idle=self.args.max_idle) as engine:
            for pid in sample:
                latest = await engine.latest_slot(pid)
                state = await engine.now(pid)
                if state["count"] != latest or state["at-slot"] != latest:
                    self.error(f"after restart: now({pid}) = {dict(state)}, latest {latest}")
                assignments = await store.get_assignments(pid, 0, latest + 1)
                try:
                    hbtrio.verify_schedule(pid, assignments)
                except hbtrio.InvalidMessage as exc:
                    self.error(f"after restart: schedule of {pid}: {exc}")
                checked += 1
        return {"processes_checked": checked}

    async def run(self) -> dict[str, Any]:
        args = self.args
        tmp = None
        if args.store == "memory":
            store: hbtrio.Store = hbtrio.MemoryStore()
        else:
            db = args.db
            if db is None:
                tmp = tempfile.mkdtemp(prefix="hbtrio-soak-")
                db = str(Path(tmp) / "soak.sqlite")
            store = hbtrio.SQLiteStore(db, synchronous=args.synchronous)
        print(
            f"soak: {args.processes} processes, {args.requests} requests or {args.seconds} s, "
            f"{args.concurrency} clients, max_idle={args.max_idle}s, store={args.store}",
            flush=True,
        )
        rss_start = rss_mb()
        t0 = time.monotonic()
        async with hbtrio.open_engine(store, max_idle=args.max_idle) as engine:
            await self.spawn_all(engine)
            spawn_seconds = time.monotonic() - t0
            print(f"spawned {len(self.pids)} processes in {spawn_seconds:.1f} s", flush=True)
            self.started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.monitor, engine)
                for _ in range(args.concurrency):
                    nursery.start_soon(self.client, engine)
                with trio.move_on_after(args.seconds):
                    await self.done.wait()
                self.done.set()
            duration = time.monotonic() - self.started
            final_stats = engine.stats()
        closed = time.monotonic()
        verification = await self.verify(store)
        verify_seconds = time.monotonic() - closed
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.summary(
            duration, spawn_seconds, verify_seconds, rss_start, final_stats, verification
        )

    def summary(
        self,
        duration: float,
        spawn_seconds: float,
        verify_seconds: float,
        rss_start: float,
        stats: hbtrio.EngineStats,
        verification: dict[str, Any],
    ) -> dict[str, Any]:
        samples = self.samples
        half = samples[len(samples) // 2 :] if len(samples) >= 4 else samples
        rss = [s["rss_mb"] for s in samples]
        growth = (half[-1]["rss_mb"] - half[0]["rss_mb"]) if half else 0.0
        span = (half[-1]["t"] - half[0]["t"]) if len(half) > 1 else 0.0
        levels_off = growth <= max(10.0, 0.1 * half[0]["rss_mb"]) if half else False
        rates = [s["rps"] for s in samples]
        return {
            "config": {k: v for k, v in vars(self.args).items() if k != "json"},
            "seconds": round(duration, 1),
            "spawn_seconds": round(spawn_seconds, 1),
            "verify_seconds": round(verify_seconds, 1),
            "requests": self.requests,
            "requests_by_kind": self.by_kind,
            "throughput_rps": round(self.requests / max(duration, 1e-9)),
            "throughput_rps_min_interval": min(rates) if rates else None,
            "throughput_rps_max_interval": max(rates) if rates else None,
            "rss_mb": {
                "start": round(rss_start, 1),
                "peak": max(rss) if rss else None,
                "end": rss[-1] if rss else None,
                "second_half_growth": round(growth, 1),
                "second_half_growth_mb_per_min": round(growth / span * 60, 2) if span else None,
                "levels_off": levels_off,
                "note": (
                    "memory store: every slot and result stays in memory, growth is expected"
                    if self.args.store == "memory"
                    else "second-half growth under max(10 MB, 10 %) counts as levelled off"
                ),
            },
            "workers": {
                "started": stats.workers_started,
                "stopped": stats.workers_stopped,
                "live_at_end": stats.live_workers,
                "live_max": max((s["live_workers"] for s in samples), default=0),
                "live_min": min((s["live_workers"] for s in samples), default=0),
            },
            "engine": {
                "slots_computed": stats.slots_computed,
                "cache_hits": stats.cache_hits,
                "leader_deaths": stats.leader_deaths,
            },
            "verification": verification,
            "errors": self.error_count,
            "error_samples": self.errors,
            "series": samples,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    parser.add_argument("--concurrency", type=int, default=200, help="client tasks")
    parser.add_argument("--max-idle", type=float, default=2.0, help="idle eviction (seconds)")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--db", help="SQLite file (default: a temporary one, removed after)")
    parser.add_argument("--synchronous", default="NORMAL", help="SQLite synchronous setting")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between reports")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    summary = trio.run(Soak(args).run)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    failed = summary["errors"] or summary["engine"]["leader_deaths"]
    if args.store == "sqlite" and not summary["rss_mb"]["levels_off"]:
        print("RSS did not level off", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
