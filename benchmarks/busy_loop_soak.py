"""Durable writes on a saturated event loop: does SQLite keep up, and does `schedule`?

Run (not part of CI)::

    python benchmarks/busy_loop_soak.py                      # 30 s, 200 clients
    python benchmarks/busy_loop_soak.py --seconds 60 --json busy.json

One in-process engine on `SQLiteStore` (a temporary file, ``synchronous=NORMAL``
unless ``--synchronous`` says otherwise). ``--processes`` counter processes
get ``--slots`` slots each, scheduled before the clock starts. Then, for
``--seconds``:

- ``--clients`` tasks make requests in a loop without ever sleeping, each
  under ``move_on_after(--timeout)``: half ask for the next slot or a few
  ahead of what they last saw (served inline by an idle worker), a fifth
  ask for a slot far ahead (a worker task catches up), the rest read a
  random earlier slot (memory or the file). The event loop is never idle.
  Every answer is checked (``count == slot``).
- one task schedules ``{"n": 1}`` on a process of its own, durably, every
  ``--schedule-every`` seconds, and records how long each `schedule` took.
- the store's counters are sampled every ``--interval`` seconds.

It prints one line per interval and a JSON summary: commits per second,
results written per second, the most results ever waiting to be written
(sampled after every request) against ``max_pending``, `schedule` latency
(p50, p99, max, count), requests answered and timed out, and how long
closing the engine (flushing what waits) took. Timings are reported, never
asserted; exit status 1 only if an answer was wrong or a call failed.

It uses only the public API, so the same file runs against an older
checkout (``PYTHONPATH=/path/to/old/src python benchmarks/busy_loop_soak.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import hbtrio

DEFINITION = {"device": "process@1.0", "execution-device": "counter@1.0"}


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank, or ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class BusyLoop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.pids: list[str] = []
        self.seen: dict[str, int] = {}  # highest slot answered per process
        self.answered = 0
        self.timed_out = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.peak_pending = 0
        self.latencies: list[float] = []
        self.samples: list[dict[str, Any]] = []
        self.done = trio.Event()

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(text)

    async def setup(self, engine: hbtrio.Engine) -> str:
        args = self.args
        batch = [{"n": 1}] * min(args.slots, 1000)
        for i in range(args.processes):
            pid = await engine.spawn({**DEFINITION, "nonce": i})
            left = args.slots
            while left > 0:
                await engine.schedule_many(pid, batch[:left])
                left -= len(batch)
            self.pids.append(pid)
            self.seen[pid] = 0
        return await engine.spawn({**DEFINITION, "nonce": "durable"})

    async def client(self, engine: hbtrio.Engine, store: hbtrio.Store) -> None:
        args, rng = self.args, random.Random(self.rng.random())
        last = args.slots
        while not self.done.is_set():
            pid = rng.choice(self.pids)
            seen = self.seen[pid]
            r = rng.random()
            if r < 0.5:
                slot = min(last, seen + rng.randint(1, 8))
            elif r < 0.7:
                slot = min(last, seen + rng.randint(100, 5000))
            else:
                slot = rng.randint(0, seen)
            with trio.move_on_after(args.timeout):
                try:
                    state = await engine.compute(pid, slot)
                except hbtrio.HbTrioError as exc:
                    self.error(f"compute({pid}, {slot}): {type(exc).__name__}: {exc}")
                    continue
                finally:
                    pending = store.statistics().pending_results
                    if pending > self.peak_pending:
                        self.peak_pending = pending
                if state["count"] != slot or state["at-slot"] != slot:
                    self.error(f"compute({pid}, {slot}) = {dict(state)}")
                self.answered += 1
                if slot > self.seen[pid]:
                    self.seen[pid] = slot
                continue
            self.timed_out += 1

    async def scheduler(self, engine: hbtrio.Engine, pid: str) -> None:
        expected = 0
        while not self.done.is_set():
            t0 = time.perf_counter()
            try:
                slot = await engine.schedule(pid, {"n": 1})
            except hbtrio.HbTrioError as exc:
                self.error(f"schedule: {type(exc).__name__}: {exc}")
                continue
            self.latencies.append(time.perf_counter() - t0)
            expected += 1
            if slot != expected:
                self.error(f"schedule returned slot {slot}, expected {expected}")
            await trio.sleep(self.args.schedule_every)

    async def monitor(self, engine: hbtrio.Engine, store: hbtrio.Store, t0: float) -> None:
        while not self.done.is_set():
            with trio.move_on_after(self.args.interval):
                await self.done.wait()
            s = store.statistics()
            sample = {
                "t": round(time.monotonic() - t0, 2),
                "commits": s.commits,
                "results_written": s.results_written,
                "pending": s.pending_results,
                "answered": self.answered,
                "timed_out": self.timed_out,
                "schedules": len(self.latencies),
                "live_workers": engine.stats().live_workers,
            }
            self.samples.append(sample)
            print(
                "t={t:>6.1f}s commits={commits:>6} pending={pending:>7} answered={answered:>8}"
                " timed_out={timed_out:>7} schedules={schedules:>5}".format(**sample),
                flush=True,
            )

    async def run(self) -> dict[str, Any]:
        args = self.args
        tmp = tempfile.mkdtemp(prefix="hbtrio-busy-")
        store = hbtrio.SQLiteStore(
            str(Path(tmp) / "busy.sqlite"),
            synchronous=args.synchronous,
            max_pending=args.max_pending,
        )
        try:
            async with hbtrio.open_engine(store) as engine:
                t = time.monotonic()
                durable = await self.setup(engine)
                setup_s = time.monotonic() - t
                print(
                    f"busy loop: {args.processes} processes x {args.slots} slots scheduled in"
                    f" {setup_s:.1f} s; {args.clients} clients, timeout {args.timeout} s,"
                    f" max_pending {args.max_pending}",
                    flush=True,
                )
                before = store.statistics()
                t0 = time.monotonic()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.monitor, engine, store, t0)
                    nursery.start_soon(self.scheduler, engine, durable)
                    for _ in range(args.clients):
                        nursery.start_soon(self.client, engine, store)
                    await trio.sleep(args.seconds)
                    self.done.set()
                busy_s = time.monotonic() - t0
                after = store.statistics()
                closing = time.monotonic()
            close_s = time.monotonic() - closing
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        lat = self.latencies
        return {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "python": sys.version.split()[0],
            "busy_seconds": round(busy_s, 1),
            "commits": after.commits - before.commits,
            "commits_per_s": round((after.commits - before.commits) / busy_s, 1),
            "results_written_per_s": round(
                (after.results_written - before.results_written) / busy_s
            ),
            "pending_peak": self.peak_pending,
            "max_pending": args.max_pending,
            "pending_peak_over_bound": round(self.peak_pending / args.max_pending, 2),
            "pending_at_end": after.pending_results,
            "schedule_latency_s": {
                "count": len(lat),
                "p50": percentile(lat, 0.5),
                "p99": percentile(lat, 0.99),
                "max": max(lat, default=None),
                "mean": statistics.fmean(lat) if lat else None,
            },
            "answered": self.answered,
            "timed_out": self.timed_out,
            "close_seconds": round(close_s, 2),
            "errors": self.error_count,
            "error_samples": self.errors,
            "series": self.samples,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=50)
    parser.add_argument("--slots", type=int, default=20_000, help="scheduled per process")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=0.005, help="per request (seconds)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--schedule-every", type=float, default=0.02)
    parser.add_argument("--max-pending", type=int, default=20_000)
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    summary = trio.run(BusyLoop(args).run)
    shown = {k: v for k, v in summary.items() if k != "series"}
    print(json.dumps(shown, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
