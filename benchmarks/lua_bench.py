"""What a Lua process costs: slots per second on a hot VM, and a cold start.

Run::

    python benchmarks/lua_bench.py            # 5 repetitions of every case
    python benchmarks/lua_bench.py --quick    # 2 repetitions, smaller heaps: a few seconds
    python benchmarks/lua_bench.py --json out.json

Cases, each with the project's scripts under ``tests/lua``:

* ``hot-vm``: ``handle`` calls on one hot VM (``LiveLua.compute_sync``, no
  engine): the counter, and the ledger's transfers among 1,000 accounts;
* ``hot-engine``: the same through an engine (``lua@5.3``: a thread per call,
  results stored in a ``MemoryStore``), with ``cache_frequency`` 1 (a
  snapshot of the heap every slot) and 1000 (almost none);
* ``snapshot``: the time and size of a snapshot of the ledger's heap holding
  ``--accounts`` balances;
* ``cold-start``: a new VM restored from that snapshot, then one slot
  (``boot`` from bytes + the first ``compute``), against booting the modules
  anew (a new process: no restore).

Medians of the repetitions; never a timing assertion.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the src layout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import trio

import hbtrio
from hbtrio._lua import LiveLua, LuaDevice
from hbtrio._lua._modules import modules_of

LUA = Path(__file__).resolve().parents[1] / "tests" / "lua"
OWNER = "owner"


def definition(script: str) -> dict[str, Any]:
    return {
        "device": "process@1.0",
        "execution-device": "lua@5.3",
        "owner": OWNER,
        "script": (LUA / f"{script}.lua").read_text(),
    }


def boot(device: LuaDevice, script: str, snapshot: bytes | None = None) -> LiveLua:
    process = hbtrio.freeze(definition(script))
    modules = modules_of(process)
    sources = [(m.name, m.source) for m in modules if m.source is not None]
    return device._boot(process, [m.id for m in modules], sources, snapshot)  # type: ignore[arg-type]


def assignment(slot: int, body: dict[str, Any]) -> hbtrio.Message:
    return hbtrio.freeze(
        {
            "slot": slot,
            "body": body,
            "message-id": hbtrio.message_id({"slot": slot, **body}),
            "timestamp": 1_700_000_000_000 + slot,
        }
    )


def transfers(n: int, accounts: int) -> list[dict[str, Any]]:
    return [
        {"action": "Transfer", "owner": OWNER, "recipient": f"acct-{i % accounts}", "quantity": "1"}
        for i in range(n)
    ]


def mint() -> dict[str, Any]:
    return {"action": "Mint", "quantity": str(10**12), "owner": OWNER}


def timed(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hot_vm(reps: int, slots: int) -> list[dict[str, Any]]:
    device = LuaDevice()
    out = []
    for script, bodies in (
        ("counter", [{"n": 1}] * slots),
        ("ledger", [mint(), *transfers(slots - 1, 1000)]),
    ):
        msgs = [assignment(i + 1, b) for i, b in enumerate(bodies)]

        def run(script: str = script, msgs: list[hbtrio.Message] = msgs) -> None:
            live = boot(device, script)
            for a in msgs:
                live.compute_sync(a)
            live.close()

        seconds = timed(run, reps)
        out.append({"case": f"hot-vm/{script}", "slots": slots, "slots_per_s": slots / seconds})
    return out


async def _engine_run(script: str, bodies: list[dict[str, Any]], cache_frequency: int) -> float:
    async with hbtrio.open_engine(cache_frequency=cache_frequency) as engine:
        pid = await engine.spawn(definition(script))
        await engine.schedule_many(pid, bodies)
        await engine.compute(pid, 0)
        start = time.perf_counter()
        await engine.compute(pid, len(bodies))
        return time.perf_counter() - start


def hot_engine(reps: int, slots: int) -> list[dict[str, Any]]:
    out = []
    for script, bodies in (
        ("counter", [{"n": 1}] * slots),
        ("ledger", [mint(), *transfers(slots - 1, 1000)]),
    ):
        for cf in (1, 1000):
            seconds = statistics.median(
                trio.run(_engine_run, script, bodies, cf) for _ in range(reps)
            )
            out.append(
                {
                    "case": f"hot-engine/{script}/cache_frequency={cf}",
                    "slots": slots,
                    "slots_per_s": slots / seconds,
                }
            )
    return out


def cold(reps: int, accounts: int) -> list[dict[str, Any]]:
    device = LuaDevice()
    live = boot(device, "ledger")
    bodies = [mint(), *transfers(accounts, accounts)]
    for i, b in enumerate(bodies):
        live.compute_sync(assignment(i + 1, b))
    data = live.snapshot_sync()
    snap_s = timed(live.snapshot_sync, reps)
    live.close()
    nxt = assignment(len(bodies) + 1, transfers(1, accounts)[0])

    def restore() -> None:
        again = boot(device, "ledger", data)
        again.compute_sync(nxt)
        again.close()

    def new() -> None:
        fresh = boot(device, "ledger")
        fresh.compute_sync(assignment(1, mint()))
        fresh.close()

    return [
        {"case": "snapshot/ledger", "accounts": accounts, "bytes": len(data),
         "ms": snap_s * 1e3},
        {"case": "cold-start/ledger-restore+1-slot", "accounts": accounts,
         "ms": timed(restore, reps) * 1e3},
        {"case": "cold-start/ledger-new-process+1-slot", "ms": timed(new, reps) * 1e3},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller heaps")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--slots", type=int, default=None, help="slots per hot run")
    parser.add_argument("--accounts", type=int, default=None, help="balances in the snapshot")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    slots = args.slots or (500 if args.quick else 5000)
    sizes = (
        [args.accounts] if args.accounts else ([1000] if args.quick else [1000, 10_000, 100_000])
    )
    rows = hot_vm(reps, slots) + hot_engine(reps, slots)
    for accounts in sizes:
        rows += cold(reps, accounts)
    for row in rows:
        figures = ", ".join(
            f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}"
            for k, v in row.items()
            if k != "case"
        )
        print(f"{row['case']:<44} {figures}")
    if args.json:
        info = {"python": platform.python_version(), "machine": platform.machine()}
        Path(args.json).write_text(json.dumps({"info": info, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
