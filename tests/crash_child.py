"""The child of tests/test_reliability_crash.py: an embedded engine on SQLite, to be SIGKILLed.

Run as ``python tests/crash_child.py DB --seed N --slots N [options]``. It opens
an engine on the SQLite file ``DB`` and drives three processes (a plain
device, an async one and one with snapshot/restore hooks) until each has
``--slots`` slots scheduled, mixing schedules, batched schedules, computes of
random slots, stops and idle evictions; then computes every process to the
end and leaves the engine block. It continues wherever the file says the last
run stopped: what it schedules at slot ``s`` depends only on ``s`` (`body`),
so an interrupted schedule that did or did not become durable leads to the
same schedule.

Every line is printed and flushed *before* the child goes on:

    PHASE <name>            about to enter a phase (open, schedule, write, compute,
                            catch-up, snapshot, idle, final, shutdown)
    S <proc> <slot> <mid>   a schedule returned: the assignment is durable from now on
    C <proc> <slot> <id>    a compute returned a state with this message ID
    F <proc> <slot> <id>    the final state of a process
    DONE                    left the engine block cleanly

The devices are importable (the parent replays them, and the node test
registers them with ``hbtrio serve --device NAME=crash_child:CLASS``).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from typing import Any

import trio

import hbtrio

#: (execution device, nonce) of the three processes, by index.
PROCS = (("chain@1.0", 0), ("async-chain@1.0", 1), ("packed-chain@1.0", 2))


class Chain:
    """A plain device: a running sum and a hash chain over the message IDs it applied."""

    def init(self, process: Any) -> dict[str, Any]:
        return {"count": 0, "h": ""}

    def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        h = hashlib.sha256((state["h"] + assignment["message-id"]).encode()).hexdigest()[:32]
        return {"count": state["count"] + assignment["body"]["n"], "h": h}


class AsyncChain(Chain):
    """The same, async, with a checkpoint per slot (kills land between and inside slots)."""

    async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return Chain.compute(self, state, assignment)


class PackedChain(Chain):
    """The same with snapshot/restore hooks: snapshots are packed strings."""

    def snapshot(self, state: Any) -> dict[str, Any]:
        return {"packed": f"{state['count']}:{state['h']}"}

    def restore(self, snapshot: Any) -> dict[str, Any]:
        count, h = snapshot["packed"].split(":")
        return {"count": int(count), "h": h}


DEVICES: dict[str, object] = {
    "chain@1.0": Chain(),
    "async-chain@1.0": AsyncChain(),
    "packed-chain@1.0": PackedChain(),
}


def definition(index: int) -> dict[str, Any]:
    device, nonce = PROCS[index]
    return {"device": "process@1.0", "execution-device": device, "nonce": nonce}


def body(index: int, slot: int) -> dict[str, Any]:
    """What process ``index`` gets at ``slot``: a function of the slot alone."""
    return {"n": (slot * 7 + index) % 13, "pad": "p" * (slot * 31 % 200)}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def drive(
    engine: hbtrio.Engine, index: int, pid: str, rng: random.Random, slots: int, max_idle: float
) -> None:
    while (latest := await engine.latest_slot(pid)) < slots:
        r = rng.random()
        if r < 0.40:
            say("PHASE schedule")
            slot = await engine.schedule(pid, body(index, latest + 1))
            if slot != latest + 1:
                raise AssertionError(f"scheduled at {slot}, expected {latest + 1}")
            say(f"S {index} {slot} {hbtrio.message_id(body(index, slot))}")
        elif r < 0.55:
            k = min(rng.randint(2, 80), slots - latest)
            bodies = [body(index, latest + 1 + j) for j in range(k)]
            say("PHASE write")
            got = await engine.schedule_many(pid, bodies)
            if got != list(range(latest + 1, latest + 1 + k)):
                raise AssertionError(f"scheduled at {got}")
            for slot, b in zip(got, bodies, strict=True):
                say(f"S {index} {slot} {hbtrio.message_id(b)}")
        elif r < 0.80:
            slot = rng.randint(0, latest)
            say("PHASE compute")
            state = await engine.compute(pid, slot)
            say(f"C {index} {slot} {hbtrio.message_id(state)}")
        elif r < 0.88:
            say("PHASE catch-up")
            state = await engine.compute(pid, latest)
            say(f"C {index} {latest} {hbtrio.message_id(state)}")
        elif r < 0.95:
            say("PHASE snapshot")
            await engine.stop(pid)
        else:
            say("PHASE idle")
            await trio.sleep(max_idle * 3)  # the reaper evicts it: a snapshot write


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    say("PHASE open")
    store = hbtrio.SQLiteStore(args.db, synchronous=args.synchronous)
    async with hbtrio.open_engine(
        store, devices=DEVICES, cache_frequency=args.cache_frequency, max_idle=args.max_idle
    ) as engine:
        pids = [await engine.spawn(definition(i)) for i in range(len(PROCS))]
        say("READY")
        async with trio.open_nursery() as nursery:
            for i, pid in enumerate(pids):
                sub = random.Random(rng.random())
                nursery.start_soon(drive, engine, i, pid, sub, args.slots, args.max_idle)
        say("PHASE final")
        for i, pid in enumerate(pids):
            state = await engine.now(pid)
            say(f"F {i} {state['at-slot']} {hbtrio.message_id(state)}")
        say("PHASE shutdown")
    say("DONE")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slots", type=int, default=300)
    parser.add_argument("--cache-frequency", type=int, default=1)
    parser.add_argument("--max-idle", type=float, default=0.05)
    parser.add_argument("--synchronous", default="FULL")
    trio.run(main, parser.parse_args())
