"""Snapshot cost against replay cost for a WASM process: what each snapshot policy buys.

Run (not part of CI)::

    python benchmarks/snapshot_policy.py                       # the work module (~0.6 ms a slot)
    HBTRIO_AOS_WASM=aos.wasm python benchmarks/snapshot_policy.py --aos

For each policy (a snapshot every N slots, or by cost with
``snapshot_cost_ratio`` R) one process catches up ``--slots`` slots on an
SQLite store, hot; then a fresh engine on the same file, asked for one slot
past the end, must restore the latest snapshot and replay what follows it
(the cost of a restart, or of a failure, under that policy). One JSON line
per policy: hot slots per second, snapshots taken, bytes of snapshots
written, and the restart's time; ratios against the run without
snapshots (one every ``--slots`` + 1) in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hbtrio
from benchmarks.wasm_bench import BODY, DEVICE, EVAL, bench_module, calibrate, definition


async def run_policy(
    image: bytes, body: dict[str, Any], slots: int, path: Path, policy: dict[str, Any]
) -> dict[str, Any]:
    policy = dict(policy)
    cache = path.parent / "compiled"  # the restart reads the compiled module from here
    device = hbtrio.WasmDevice(cache_dir=cache)
    options = {"cache_frequency": policy.pop("every", slots + 1), **policy}
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={DEVICE: device}, **options
    ) as engine:
        blob = await engine.put_blob(image)
        pid = await engine.spawn(definition(blob))
        await engine.schedule_many(pid, [body] * (slots + 1))
        await engine.compute(pid, 0)
        start = time.perf_counter()
        await engine.compute(pid, slots)  # not a snapshot point of the policies below
        hot = time.perf_counter() - start
        # Leave as a crash would: without the snapshot a retiring worker stores (its
        # instance dropped, the worker has nothing to snapshot).
        engine._workers[pid].core.instance = None
    db = sqlite3.connect(path)
    snapshots, written = db.execute(
        "SELECT count(*), coalesce(sum(length(s.snapshot)), 0) FROM snapshots s "
        "JOIN processes p ON p.id = s.proc WHERE p.pid = ?",
        (pid,),
    ).fetchone()
    db.close()
    device = hbtrio.WasmDevice(cache_dir=cache)
    start = time.perf_counter()
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={DEVICE: device}, **options
    ) as engine:
        await engine.compute(pid, slots + 1)
        restart = time.perf_counter() - start
    return {
        "policy": dict(options),
        "hot_slots_per_s": slots / hot,
        "snapshots": snapshots,
        "snapshot_bytes": written,
        "restart_ms": restart * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/snapshot_policy.py", description=__doc__)
    p.add_argument("--slots", type=int, default=1999)
    p.add_argument("--aos", action="store_true", help="the aos module of HBTRIO_AOS_WASM")
    args = p.parse_args()
    if args.aos:
        image, body = Path(os.environ["HBTRIO_AOS_WASM"]).read_bytes(), EVAL
    else:
        image, body = bench_module(calibrate()), BODY
    policies: list[dict[str, Any]] = [
        {"every": args.slots + 1},
        {"every": 10},
        {"every": 100},
        {"every": 1000},
        {"snapshot_cost_ratio": 1.0},
        {"snapshot_cost_ratio": 10.0},
        {"snapshot_cost_ratio": 50.0},
        {"snapshot_seconds": 0.25},
    ]
    base: dict[str, Any] | None = None
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="hbtrio-policy-") as tmp:
            line = trio.run(run_policy, image, body, args.slots, Path(tmp) / "p.sqlite", policy)
        if base is None:
            base = line
        line["hot_over_no_snapshots"] = line["hot_slots_per_s"] / base["hot_slots_per_s"]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
