"""The workloads, written once against `benchmarks._harness.Adapter`, and a one-run CLI.

Usage::

    python -m benchmarks.workloads w1 [--n N] [--impl hbtrio|trio|asyncio] [--quick]
    python -m benchmarks.workloads w2 --store sqlite
    python -m benchmarks.workloads w4 --n 10000 --r 10
    python -m benchmarks.workloads w6 --n 5000 --every 1000

Each run prints one JSON line: ``impl``, ``workload``, ``value``, ``unit``, the
sizes, extra measurements and a ``check`` object whose ``ok`` says the results
were right (final counts, per-slot states, execution counts). A failed check
exits with status 1, an error with status 2. Every message is scheduled
before timing starts; timings use `time.perf_counter` with the garbage
collector on.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from ._harness import (
    SLEEPY_DEVICE,
    SLEEPY_RESULT,
    Adapter,
    Checker,
    MemoryProbe,
    Sleepy,
    bodies,
    definition,
    expected_count,
)

__all__ = ["IMPLS", "WORKLOADS", "Workload", "describe", "load_adapter", "main", "run_workload"]

Result = dict[str, Any]

#: Seconds W6 waits before timing the warm worker, for background writes to finish.
SETTLE_S = 0.5

#: Implementation name -> module with an ``adapter()`` function.
IMPLS: dict[str, str] = {
    "hbtrio": "benchmarks.hbtrio_impl",
    "trio": "benchmarks.baselines.trio_impl",
    "asyncio": "benchmarks.baselines.asyncio_impl",
}


def load_adapter(impl: str) -> Adapter:
    """The adapter of implementation ``impl``."""
    module = importlib.import_module(IMPLS[impl])
    adapter: Adapter = module.adapter()
    return adapter


def _check_slots(out: list[Any]) -> dict[str, Any]:
    """The ``check`` of responses ``out[i]`` for slots ``i + 1``, and of the final count."""
    checker = Checker()
    checker.verify(out)
    final = out[-1]["count"] if out and out[-1] is not None else None
    return checker.as_dict(len(out), final_count=(final, expected_count(len(out))))


# W1 ------------------------------------------------------------------------------------------


async def w1_roundtrip(a: Adapter, *, n: int) -> Result:
    """One client asks for slot 1, awaits it, then slot 2, ... up to ``n``."""
    store = a.make_store("memory", None)
    async with a.open_engine(store) as engine:
        pid = await engine.spawn(definition(0))
        await a.schedule_many(engine, pid, bodies(1, n))
        out: list[Any] = [None] * n
        compute = engine.compute
        gc.collect()
        t0 = perf_counter()
        for slot in range(1, n + 1):
            out[slot - 1] = await compute(pid, slot)
        elapsed = perf_counter() - t0
        stats = a.engine_stats(engine)
    return {
        "value": elapsed / n * 1e6,
        "unit": "us_per_request",
        "elapsed_s": elapsed,
        "check": _check_slots(out),
        "engine_stats": stats,
    }


# W2 ------------------------------------------------------------------------------------------


async def w2_catchup(a: Adapter, *, n: int, store: str = "memory", tmp: str = "") -> Result:
    """One request for slot ``n`` of a process that has computed nothing yet.

    In memory: microseconds per slot until the answer. With SQLite: slots per
    second until every result is durable (the engine's block has exited), and
    the commits made meanwhile.
    """
    the_store = a.make_store(store, os.path.join(tmp, "w2.sqlite") if store == "sqlite" else None)
    async with a.open_engine(the_store) as engine:
        pid = await engine.spawn(definition(0))
        await a.schedule_many(engine, pid, bodies(1, n))
        commits_before = a.commits(the_store)
        gc.collect()
        t0 = perf_counter()
        state = await engine.compute(pid, n)
        answered = perf_counter() - t0
        stats = a.engine_stats(engine)
    durable = perf_counter() - t0
    commits_after = a.commits(the_store)
    checker = Checker()
    checker.see(n, state)
    checks: dict[str, Any] = {"final_count": (state["count"], expected_count(n))}
    if stats is not None and "slots_computed" in stats:
        checks["slots_computed"] = (stats["slots_computed"], n)
    result: Result = {
        "variant": store,
        "elapsed_s": answered,
        "engine_stats": stats,
        "check": checker.as_dict(1, **checks),
    }
    if store == "sqlite":
        commits = (
            None
            if commits_before is None or commits_after is None
            else commits_after - commits_before
        )
        result.update(
            value=n / durable,
            unit="slots_per_second",
            us_per_slot=durable / n * 1e6,
            answered_s=answered,
            durable_s=durable,
            commits=commits,
        )
    else:
        result.update(value=answered / n * 1e6, unit="us_per_slot")
    return result


# W3 ------------------------------------------------------------------------------------------


async def w3_fanout(a: Adapter, *, n: int, order: str = "slot") -> Result:
    """``n`` tasks each wait for their own slot; the worker computes to ``n``.

    All waiter tasks are released together before the worker has run, so they
    are registered before computing starts. The time runs from their release
    to the moment the last waiter resumed.

    ``order="slot"`` starts them in slot order, and trio's scheduler runs a
    batch either in that order or reversed (its choice, half the time each):
    in slot order each waiter finds the worker idle one slot behind and is
    served by its own task. ``order="parked"`` starts the waiter for slot
    ``n`` first and then the others in slot order, so whichever way the batch
    runs, the first waiter to run asks for a slot far ahead, the worker takes
    the computation, and every other waiter parks: the fan-out alone.
    """
    store = a.make_store("memory", None)
    async with a.open_engine(store) as engine:
        pid = await engine.spawn(definition(0))
        await a.schedule_many(engine, pid, bodies(1, n))
        out: list[Any] = [None] * n
        last = 0.0
        compute = engine.compute

        async def waiter(slot: int) -> None:
            nonlocal last
            out[slot - 1] = await compute(pid, slot)
            last = perf_counter()

        slots = [n, *range(1, n)] if order == "parked" else range(1, n + 1)
        gc.collect()
        t0 = perf_counter()
        async with a.task_group() as tg:
            for slot in slots:
                tg.start_soon(waiter, slot)
        elapsed = last - t0
        stats = a.engine_stats(engine)
    return {
        "value": elapsed / n * 1e6,
        "unit": "us_per_waiter",
        "elapsed_s": elapsed,
        "engine_stats": stats,
        "check": _check_slots(out),
    }


# W4 ------------------------------------------------------------------------------------------


async def w4_many_groups(a: Adapter, *, n: int, r: int = 10) -> Result:
    """``n`` processes, each asked for slots ``1..r`` in turn by its own client, all at once."""
    store = a.make_store("memory", None)
    async with a.open_engine(store) as engine:
        pids = [await engine.spawn(definition(i)) for i in range(n)]
        messages = bodies(1, r)
        for pid in pids:
            await a.schedule_many(engine, pid, messages)
        checker = Checker()
        see, compute = checker.see, engine.compute

        async def client(pid: str) -> None:
            for slot in range(1, r + 1):
                see(slot, await compute(pid, slot))

        gc.collect()
        probe = MemoryProbe()
        probe.start()
        t0 = perf_counter()
        async with a.task_group() as tg:
            for pid in pids:
                tg.start_soon(client, pid)
        elapsed = perf_counter() - t0
        peak, live = probe.peak_delta(), probe.live_delta()
        workers = a.live_workers(engine)
        stats = a.engine_stats(engine)
    return {
        "value": n * r / elapsed,
        "unit": "requests_per_second",
        "elapsed_s": elapsed,
        "bytes_per_worker": peak / n,
        "live_bytes_per_worker": None if live is None else live / n,
        "memory_method": probe.method,
        "live_workers": workers,
        "engine_stats": stats,
        "check": checker.as_dict(n * r),
    }


# W5 ------------------------------------------------------------------------------------------


async def w5_dedup(a: Adapter, *, n: int) -> Result:
    """``n`` concurrent identical resolutions of a method that sleeps 10 ms: one execution."""
    device = Sleepy(a.sleep)
    store = a.make_store("memory", None)
    async with a.open_engine(store, devices={SLEEPY_DEVICE: device}) as engine:
        results: list[Any] = []
        resolve = engine.resolve

        async def caller() -> None:
            results.append(await resolve({"device": SLEEPY_DEVICE}, {"path": "work"}))

        gc.collect()
        t0 = perf_counter()
        async with a.task_group() as tg:
            for _ in range(n):
                tg.start_soon(caller)
        elapsed = perf_counter() - t0
        stats = a.engine_stats(engine)
    checker = Checker()
    checker.seen = len(results)
    checker.bad = sum(1 for r in results if dict(r) != SLEEPY_RESULT)
    if checker.bad:
        checker.first_bad = f"got {next(r for r in results if dict(r) != SLEEPY_RESULT)!r}"
    return {
        "value": elapsed * 1e3,
        "unit": "ms",
        "elapsed_s": elapsed,
        "executions": device.executions,
        "engine_stats": stats,
        "check": checker.as_dict(n, executions=(device.executions, 1)),
    }


# W6 ------------------------------------------------------------------------------------------


async def w6_cold_restore(a: Adapter, *, n: int, every: int = 1000, tmp: str = "") -> Result:
    """A fresh engine on a SQLite file computes ``every`` slots past ``n`` computed ones.

    Setup: two identical processes (nonces 0 and 1) each computed to slot
    ``n`` with a snapshot every ``every`` slots. On the warm engine, once the
    setup's writes had `SETTLE_S` to finish, process 1 computes to
    ``n + every`` (the warm time). The engine exits; a fresh one on
    the same file computes process 0 to ``n + every`` (the cold time, from
    opening the engine to the answer).
    """
    path = os.path.join(tmp, "w6.sqlite")
    target = n + every
    store = a.make_store("sqlite", path)
    async with a.open_engine(store, cache_frequency=every) as engine:
        cold_pid = await engine.spawn(definition(0))
        warm_pid = await engine.spawn(definition(1))
        for pid in (cold_pid, warm_pid):
            await a.schedule_many(engine, pid, bodies(1, target))
            await engine.compute(pid, n)
        # Let the setup's results reach the disk first: a writer thread busy
        # encoding them would otherwise steal the GIL from the warm worker.
        await a.sleep(SETTLE_S)
        gc.collect()
        t0 = perf_counter()
        warm_state = await engine.compute(warm_pid, target)
        warm = perf_counter() - t0
        warm_stats = a.engine_stats(engine)
    store = a.make_store("sqlite", path)
    gc.collect()
    t0 = perf_counter()
    async with a.open_engine(store, cache_frequency=every) as engine:
        opened = perf_counter() - t0
        cold_state = await engine.compute(cold_pid, target)
        cold = perf_counter() - t0
        stats = a.engine_stats(engine)
    checker = Checker()
    checker.see(target, warm_state)
    checker.see(target, cold_state)
    checks: dict[str, Any] = {"final_count": (cold_state["count"], expected_count(target))}
    if stats is not None and "slots_computed" in stats:
        checks["replayed_slots"] = (stats["slots_computed"], every)
    return {
        "value": cold * 1e3,
        "unit": "ms",
        "elapsed_s": cold,
        "cold_ms": cold * 1e3,
        "open_ms": opened * 1e3,
        "warm_ms": warm * 1e3,
        "cold_over_warm": cold / warm if warm > 0 else None,
        "engine_stats": stats,
        "warm_engine_stats": warm_stats,
        "check": checker.as_dict(2, **checks),
    }


# registry and CLI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A workload: its report name, driver, and full and quick sizes."""

    key: str
    name: str
    driver: Callable[..., Awaitable[Result]]
    full: Mapping[str, Any]
    quick: Mapping[str, Any]
    needs_tmp: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in [
        Workload("w1", "W1_roundtrip", w1_roundtrip, {"n": 20_000}, {"n": 500}),
        Workload(
            "w2",
            "W2_catchup",
            w2_catchup,
            {"n": 200_000},
            {"n": 5_000},
            needs_tmp=True,
            options={"store": "memory"},
        ),
        Workload(
            "w3", "W3_fanout", w3_fanout, {"n": 10_000}, {"n": 500}, options={"order": "slot"}
        ),
        Workload(
            "w4", "W4_many_groups", w4_many_groups, {"n": 10_000, "r": 10}, {"n": 300, "r": 10}
        ),
        Workload("w5", "W5_dedup", w5_dedup, {"n": 10_000}, {"n": 500}),
        Workload(
            "w6",
            "W6_cold_restore",
            w6_cold_restore,
            {"n": 5_000, "every": 1_000},
            {"n": 500, "every": 100},
            needs_tmp=True,
        ),
    ]
}


def run_workload(key: str, impl: str, sizes: Mapping[str, Any]) -> Result:
    """Run workload ``key`` once with implementation ``impl``; returns the result line."""
    workload = WORKLOADS[key]
    adapter = load_adapter(impl)
    params = dict(workload.options)
    params.update(sizes)
    with tempfile.TemporaryDirectory(prefix="hbtrio-bench-") as tmp:
        kwargs = dict(params, tmp=tmp) if workload.needs_tmp else params

        async def main() -> Result:
            return await workload.driver(adapter, **kwargs)

        result = adapter.run(main)
    line: Result = {
        "impl": impl,
        "workload": workload.name,
        "value": result.pop("value"),
        "unit": result.pop("unit"),
        "params": params,
    }
    line.update(result)
    line["gc_enabled"] = gc.isenabled()
    line["python"] = platform.python_version()
    return line


def describe(exc: BaseException) -> str:
    """A one-line description of ``exc``; the leaf exceptions of an exception group."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(exc)
    text = "; ".join(f"{type(e).__name__}: {e}" for e in leaves[:3])
    return text + (f" (and {len(leaves) - 3} more)" if len(leaves) > 3 else "")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.workloads",
        description="Run one workload once; print one JSON line.",
    )
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--impl", choices=list(IMPLS), default="hbtrio")
    p.add_argument("--n", type=_positive, help="the main size (N1, N2, K3, G4, M5 or S)")
    p.add_argument("--r", type=_positive, help="w4: requests per process (R4)")
    p.add_argument(
        "--every", type=_positive, help="w6: snapshot every this many slots (also the extra slots)"
    )
    p.add_argument("--store", choices=["memory", "sqlite"], help="w2: the store")
    p.add_argument("--order", choices=["slot", "parked"], help="w3: the order the waiters start in")
    p.add_argument("--quick", action="store_true", help="small default sizes")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    workload = WORKLOADS[args.workload]
    sizes = dict(workload.quick if args.quick else workload.full)
    for name in ("n", "r", "every", "store", "order"):
        value = getattr(args, name)
        if value is not None:
            if name not in sizes and name not in workload.options:
                print(f"--{name} does not apply to {args.workload}", file=sys.stderr)
                return 2
            sizes[name] = value
    try:
        line = run_workload(args.workload, args.impl, sizes)
    except Exception as exc:
        traceback.print_exc()
        error = {
            "impl": args.impl,
            "workload": workload.name,
            "error": describe(exc),
            "check": {"ok": False},
        }
        print(json.dumps(error), flush=True)
        return 2
    print(json.dumps(line, default=str), flush=True)
    return 0 if line["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
