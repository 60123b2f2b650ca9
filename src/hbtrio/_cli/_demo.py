"""``hbtrio demo``: a self-contained tour of an embedded engine, no server needed.

On a temporary SQLite store it spawns ``counter@1.0`` processes, schedules
messages, computes them with concurrent waiters, shows a stored result, a
failing message, a deduplicated resolution (``digest@1.0``, a deliberately
slow device of the demo's own) and a restart that continues from the
snapshots, and prints what the workers did. Each answer is checked against
the counter's known sum, and a wrong one is shown as such.

Runs its own Trio loop (``trio.run``) in the calling thread; the temporary
directory is removed when it ends.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from ._output import format_message, format_table

if TYPE_CHECKING:
    from .._engine import Engine


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.3f}s] {text}", flush=True)

    def step(self, title: str, what: str) -> None:
        """A numbered heading: what the next lines show."""
        print(f"\n== {title}\n   {what}", flush=True)


def _stats_line(engine: Engine) -> str:
    s = engine.statistics()
    return (
        f"slots_computed={s.slots_computed} cache_hits={s.cache_hits} "
        f"workers_started={s.workers_started} workers_stopped={s.workers_stopped} "
        f"requests={s.requests}"
    )


class _Digest:
    """``digest@1.0``, the demo's resolution device: a slow SHA-256 of ``request["data"]``."""

    def __init__(self) -> None:
        self.runs = 0

    async def sha256(self, base: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, str]:
        import hashlib

        self.runs += 1
        await trio.sleep(0.05)  # an expensive call, worth running once for everyone
        return {"sha256": hashlib.sha256(request["data"]).hexdigest()}


#: Show every compute answer up to this many per process; beyond, a summary per process.
_SHOW_ANSWERS: Final = 4


async def _demo(processes: int, messages: int, waiters: int, out: _Clock) -> None:
    import attrs

    import hbtrio

    with tempfile.TemporaryDirectory(prefix="hbtrio-demo-") as tmp:
        path = Path(tmp) / "demo.sqlite"
        out.say(f"temporary SQLite store: {path}")
        digest = _Digest()
        async with hbtrio.open_engine(
            hbtrio.SQLiteStore(path), devices={"digest@1.0": digest}
        ) as engine:
            out.step(
                "1. spawn",
                "a process is a definition naming its execution device; its ID is the "
                "SHA-256 of the definition, and spawning it again changes nothing",
            )
            names: dict[str, str] = {}
            for i in range(processes):
                definition = {
                    "device": "process@1.0",
                    "execution-device": "counter@1.0",
                    "name": f"counter-{i}",
                }
                pid = await engine.spawn(definition)
                names[pid] = f"counter-{i}"
                out.say(f"spawned counter-{i} (counter@1.0) as process {pid}")

            out.step(
                "2. schedule",
                "each message gets the next slot, durable in SQLite before schedule() returns",
            )
            total, done = processes * messages, 0
            every = max(1, total // 10)

            async def schedule_all(pid: str) -> None:
                nonlocal done
                for n in range(1, messages + 1):
                    await engine.schedule(pid, {"n": n})
                    done += 1
                    if total >= 2000 and done % every == 0:
                        out.say(f"  scheduled {done:,} of {total:,} messages")

            async with trio.open_nursery() as nursery:
                for pid in names:
                    nursery.start_soon(schedule_all, pid)
            out.say(
                f"scheduled {messages} messages {{'n': 1..{messages}}} on each process "
                f"(slots 1..{messages})"
            )

            out.step(
                "3. compute, concurrently",
                f"{waiters} requests per process for different slots, all at once: one worker "
                "per process computes each slot once and hands every waiter its own slot",
            )
            targets = sorted({max(1, messages * (k + 1) // waiters) for k in range(waiters)})
            wrong: list[str] = []

            async def ask(pid: str, slot: int, show: bool) -> None:
                t0 = time.perf_counter()
                state = await engine.compute(pid, slot)
                ms = (time.perf_counter() - t0) * 1000
                expected = slot * (slot + 1) // 2
                check = "ok" if state["count"] == expected else f"EXPECTED {expected}"
                if check != "ok":
                    wrong.append(f"{names[pid]} slot {slot}")
                if show or check != "ok":
                    out.say(
                        f"  {names[pid]} slot {slot:>4} -> count {state['count']:>6} "
                        f"({check}, {ms:6.1f} ms)"
                    )

            show = len(targets) <= _SHOW_ANSWERS
            async with trio.open_nursery() as nursery:
                for pid in names:
                    for slot in reversed(targets):
                        nursery.start_soon(ask, pid, slot, show)
            if not show:
                out.say(
                    f"  {len(targets) * processes} answers, "
                    f"{'all right' if not wrong else f'{len(wrong)} WRONG'}"
                )
            out.say(f"done: {_stats_line(engine)}")

            print()
            rows = [
                [names[pid], info.slot, info.target, info.waiting, info.computed, info.phase]
                for pid, info in sorted(engine.workers.items(), key=lambda kv: names[kv[0]])
            ]
            print(format_table(["worker", "slot", "target", "waiting", "computed", "phase"], rows))

            out.step(
                "4. stored results",
                "every computed slot is stored: asking again is answered from the store",
            )
            first = next(iter(names))
            half = max(1, messages // 2)
            before = engine.statistics().cache_hits
            state = await engine.compute(first, half)
            out.say(
                f"{names[first]} slot {half} again -> count {state['count']} "
                f"(from its stored result: cache_hits {before} -> "
                f"{engine.statistics().cache_hits})"
            )

            out.step(
                "5. a failing message",
                "the device raises: the caller gets ComputeError; the worker keeps its "
                "last good state",
            )
            bad_slot = await engine.schedule(first, {"n": "not a number"})
            try:
                await engine.compute(first, bad_slot)
            except hbtrio.ComputeError as exc:
                out.say(
                    f"{names[first]} slot {bad_slot} has n='not a number': ComputeError "
                    f"phase={exc.phase!r} attempted_slot={exc.attempted_slot} "
                    f"({type(exc.__cause__).__name__})"
                )
            state = await engine.compute(first, messages)
            out.say(
                f"the worker kept its last good state: slot {messages} -> count {state['count']}"
            )

            out.step(
                "6. deduplicated resolution",
                "identical concurrent resolve() calls run once, and every caller gets the result",
            )
            callers = 10
            base, request = {"device": "digest@1.0"}, {"path": "sha256", "data": b"hbtrio"}
            results: list[Any] = []

            async def resolve() -> None:
                results.append(await engine.resolve(base, request))

            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(resolve)
            stats = engine.statistics()
            out.say(
                f"{callers} callers of digest@1.0 sha256 -> {len({r['sha256'] for r in results})} "
                f"answer, the device ran {digest.runs} time(s) (deduplicated={stats.deduplicated})"
            )
            first_stats = attrs.asdict(engine.statistics())
        out.step(
            "7. restart",
            "leaving the engine's block stores every worker's snapshot; a new engine on the "
            "same file continues where it stopped",
        )
        out.say("engine closed: every worker stored a snapshot of its state")

        async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:
            states = [await engine.compute(pid, messages) for pid in names]
            again = engine.statistics()
            out.say(
                f"reopened the same file: slot {messages} of each process -> counts "
                f"{[s['count'] for s in states]}, computed again: "
                f"{again.slots_computed} slots ({again.cache_hits} cache hits)"
            )
        print()
        print("engine.statistics() of the first engine:")
        print(format_message(first_stats, ()))


def cmd_demo(args: argparse.Namespace) -> int:
    out = _Clock()
    print(
        f"hbtrio demo: {args.processes} counter processes x {args.messages} messages, "
        f"{args.waiters} concurrent waiters each",
        flush=True,
    )
    trio.run(_demo, args.processes, args.messages, args.waiters, out)
    out.say("demo finished")
    print("next: 'hbtrio serve' runs a node; see docs/http.md for its HTTP API", flush=True)
    return 0
