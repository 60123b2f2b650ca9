"""Model-based stateful testing: a Hypothesis state machine drives the engine against a model.

The rules spawn processes, schedule messages, compute (one slot, several at
once, beyond the schedule, cancelled after a virtual delay or at a chosen
checkpoint), ask for ``now``, stop workers, let virtual time pass (idle
eviction) and restart the engine on the same store, for `MemoryStore`,
`SQLiteStore` (a fresh file per example), and `SQLiteStore` with caches of
one under a scheduler keeping one tail (so nearly everything is read again
from the file). The model is plain arithmetic:
the state at slot s of a process is the sum of the ``n`` scheduled at slots
1..s. After every step the answers matched the model, nobody is left waiting,
every worker's slot is a scheduled one, and (with ``cache_frequency=1``) no
slot was ever applied twice, restarts included. Each time the engine exits,
the number of living Trio tasks is back to where it was before it opened.

How it runs: one Trio run per example lives in a thread (`EngineHost`) with
a `trio.testing.MockClock`, and holds the engine across steps; each rule
sends it one async step and waits for the outcome. Virtual time only moves
while a step runs (the clock autojumps then), so what happens between steps
never depends on real time.
"""

from __future__ import annotations

import collections
import math
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import outcome
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

import hbtrio
from hbtrio.testing import cancel_at_checkpoint
from strategies import ints

STEP_LIMIT = 60.0  # real seconds one step may take before the test calls it a hang
#: Real seconds everything must be idle before virtual time jumps. Not 0: with 0 and no
#: deadline pending, Trio's loop spins while the SQLite store's thread works, and starves
#: that thread of the GIL.
AUTOJUMP = 0.001


class Plain:
    """A plain device that counts its applications."""

    def __init__(self) -> None:
        self.calls: collections.Counter[tuple[str, int]] = collections.Counter()

    def init(self, process: Any) -> dict[str, int]:
        return {"count": 0}

    def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        self.calls[assignment["process"], assignment["slot"]] += 1
        return {**state, "count": state["count"] + assignment["body"]["n"]}


class Slow(Plain):
    """An async device taking 0.5 virtual seconds per slot."""

    async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:  # type: ignore[override]
        await trio.sleep(0.5)
        return Plain.compute(self, state, assignment)


Step = Callable[[hbtrio.Engine], Awaitable[Any]]


class EngineHost:
    """A Trio run in a thread that holds an engine and runs steps sent from the test's thread."""

    def __init__(
        self,
        make_store: Callable[[], hbtrio.Store],
        max_tails: int | None = None,
        **engine_options: Any,
    ) -> None:
        self.make_store = make_store
        self.max_tails = max_tails
        self.engine_options = engine_options
        self.clock = trio.testing.MockClock()  # autojump only while a step runs
        self.requests: queue.SimpleQueue[tuple[str, Step | None, queue.SimpleQueue[Any]]]
        self.requests = queue.SimpleQueue()
        self.ready = threading.Event()
        self.token: trio.lowlevel.TrioToken | None = None
        self.wake: trio.Event | None = None
        self.leaks: list[int] = []
        self.thread = threading.Thread(target=self._thread, daemon=True, name="engine-host")
        self.thread.start()
        if not self.ready.wait(STEP_LIMIT):
            raise AssertionError("the engine host did not start")

    def _thread(self) -> None:
        trio.run(self._main, clock=self.clock)

    async def _next(self) -> tuple[str, Step | None, queue.SimpleQueue[Any]]:
        while True:
            try:
                return self.requests.get_nowait()
            except queue.Empty:
                self.wake = trio.Event()
                self.ready.set()
                await self.wake.wait()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        baseline = trio.lowlevel.current_statistics().tasks_living
        store = self.make_store()
        while True:
            self.clock.autojump_threshold = AUTOJUMP
            async with hbtrio.open_engine(store, **self.engine_options) as engine:
                if self.max_tails is not None:  # a scheduler that keeps fewer tails
                    engine._scheduler = hbtrio.Scheduler(store, max_tails=self.max_tails)
                while True:
                    self.clock.autojump_threshold = math.inf
                    kind, step, reply = await self._next()
                    self.clock.autojump_threshold = AUTOJUMP
                    if kind != "step":
                        break
                    assert step is not None
                    result = await outcome.acapture(step, engine)
                    await trio.testing.wait_all_tasks_blocked()
                    reply.put(result)
            # The engine has exited: every task it started is gone.
            self.leaks.append(trio.lowlevel.current_statistics().tasks_living - baseline)
            if kind == "exit":
                reply.put(outcome.Value(None))
                return
            store = self.make_store()
            reply.put(outcome.Value(None))

    def _send(self, kind: str, step: Step | None = None) -> Any:
        reply: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.requests.put((kind, step, reply))
        assert self.token is not None

        def wake() -> None:
            if self.wake is not None:
                self.wake.set()

        try:
            self.token.run_sync_soon(wake)
        except trio.RunFinishedError:
            raise AssertionError("the engine host has stopped") from None
        try:
            result = reply.get(timeout=STEP_LIMIT)
        except queue.Empty:
            raise AssertionError(f"a {kind} step hung for {STEP_LIMIT} s") from None
        return result.unwrap()

    def run(self, step: Step) -> Any:
        """Run ``await step(engine)`` in the engine's Trio run; return or raise its outcome."""
        return self._send("step", step)

    def restart(self) -> None:
        self._send("restart")

    def exit(self) -> None:
        self._send("exit")
        self.thread.join(STEP_LIMIT)


@attrs.define
class Proc:
    device: str
    ns: list[int] = attrs.field(factory=lambda: [0])  # slot 0 adds nothing

    @property
    def latest(self) -> int:
        return len(self.ns) - 1

    def state(self, slot: int) -> dict[str, int]:
        return {"count": sum(self.ns[: slot + 1]), "at-slot": slot}


DEVICE_NAMES = ("counter@1.0", "plain@1.0", "slow@1.0")


class EngineMachine(RuleBasedStateMachine):
    """The engine against the model; subclasses pick the store."""

    STORE = "memory"
    processes = Bundle("processes")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="hbtrio-stateful-")
        self.model: dict[str, Proc] = {}
        self.plain, self.slow = Plain(), Slow()
        self.host: EngineHost | None = None
        self.cache_frequency = 1
        self.max_idle = 5.0
        self.memory = hbtrio.MemoryStore()

    def make_store(self) -> hbtrio.Store:
        if self.STORE == "memory":
            return self.memory
        if self.STORE == "sqlite-tiny":  # every cache of one: nearly everything read again
            return hbtrio.SQLiteStore(
                f"{self.tmp}/stateful.sqlite",
                max_cached_processes=1,
                max_cached_assignments=1,
                max_cached_bytes=400,
            )
        return hbtrio.SQLiteStore(f"{self.tmp}/stateful.sqlite")

    @property
    def engine(self) -> EngineHost:
        assert self.host is not None
        return self.host

    @initialize(cache_frequency=st.sampled_from([1, 1, 3]), max_idle=st.sampled_from([2.0, 30.0]))
    def start(self, cache_frequency: int, max_idle: float) -> None:
        self.cache_frequency, self.max_idle = cache_frequency, max_idle
        self.host = EngineHost(
            self.make_store,
            max_tails=1 if self.STORE == "sqlite-tiny" else None,
            devices={"plain@1.0": self.plain, "slow@1.0": self.slow},
            cache_frequency=cache_frequency,
            max_idle=max_idle,
        )

    def teardown(self) -> None:
        try:
            if self.host is not None:
                self.host.exit()
                assert self.host.leaks and all(n == 0 for n in self.host.leaks), self.host.leaks
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # rules -------------------------------------------------------------------------------------

    @rule(target=processes, device=st.sampled_from(DEVICE_NAMES), nonce=st.integers(0, 2))
    def spawn(self, device: str, nonce: int) -> str:
        definition = {"device": "process@1.0", "execution-device": device, "nonce": nonce}
        pid: str = self.engine.run(lambda e: e.spawn(definition))
        assert pid == hbtrio.message_id(definition)
        self.model.setdefault(pid, Proc(device))
        return pid

    @rule(pid=processes, ns=st.lists(st.integers(-3, 20), min_size=1, max_size=4))
    def schedule(self, pid: str, ns: list[int]) -> None:
        proc = self.model[pid]
        if len(ns) == 1:
            slots = [self.engine.run(lambda e: e.schedule(pid, {"n": ns[0]}))]
        else:
            slots = self.engine.run(lambda e: e.schedule_many(pid, [{"n": n} for n in ns]))
        assert slots == list(range(proc.latest + 1, proc.latest + 1 + len(ns)))
        proc.ns.extend(ns)

    @rule(pid=processes, where=st.floats(0, 1))
    def compute(self, pid: str, where: float) -> None:
        proc = self.model[pid]
        slot = round(where * proc.latest)
        assert self.engine.run(lambda e: e.compute(pid, slot)) == proc.state(slot)

    @rule(pid=processes)
    def now(self, pid: str) -> None:
        proc = self.model[pid]
        assert self.engine.run(lambda e: e.now(pid)) == proc.state(proc.latest)
        assert self.engine.run(lambda e: e.latest_slot(pid)) == proc.latest

    @rule(pid=processes, beyond=st.integers(1, 3))
    def compute_unscheduled(self, pid: str, beyond: int) -> None:
        proc = self.model[pid]

        async def step(e: hbtrio.Engine) -> hbtrio.SlotNotScheduled:
            try:
                await e.compute(pid, proc.latest + beyond)
            except hbtrio.SlotNotScheduled as exc:
                return exc
            raise AssertionError("computed an unscheduled slot")

        error = self.engine.run(step)
        assert error.attempted_slot == proc.latest + 1

    @rule(pid=processes, wheres=st.lists(st.floats(0, 1), min_size=2, max_size=6))
    def compute_concurrently(self, pid: str, wheres: list[float]) -> None:
        proc = self.model[pid]
        slots = [round(w * proc.latest) for w in wheres]

        async def step(e: hbtrio.Engine) -> dict[int, Any]:
            got: dict[int, Any] = {}

            async def one(i: int, slot: int) -> None:
                got[i] = await e.compute(pid, slot)

            async with trio.open_nursery() as nursery:
                for i, slot in enumerate(slots):
                    nursery.start_soon(one, i, slot)
            return got

        got = self.engine.run(step)
        assert got == {i: proc.state(slot) for i, slot in enumerate(slots)}

    @rule(pid=processes, where=st.floats(0, 1), after=st.sampled_from([0.0, 0.2, 0.6, 1.7, 5.0]))
    def compute_cancelled_after(self, pid: str, where: float, after: float) -> None:
        proc = self.model[pid]
        slot = round(where * proc.latest)

        async def step(e: hbtrio.Engine) -> Any:
            with trio.move_on_after(after):
                return await e.compute(pid, slot)
            return None

        state = self.engine.run(step)
        assert state is None or state == proc.state(slot)

    @rule(pid=processes, where=st.floats(0, 1), k=st.integers(0, 6))
    def compute_cancelled_at_checkpoint(self, pid: str, where: float, k: int) -> None:
        proc = self.model[pid]
        slot = round(where * proc.latest)
        done, state = self.engine.run(
            lambda e: cancel_at_checkpoint(k, lambda: e.compute(pid, slot))
        )
        assert not done or state == proc.state(slot)

    @rule(pid=processes)
    def stop(self, pid: str) -> None:
        async def step(e: hbtrio.Engine) -> bool:
            await e.stop(pid)
            return pid in e.workers

        assert not self.engine.run(step)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 40.0]))
    def idle(self, seconds: float) -> None:
        async def step(e: hbtrio.Engine) -> list[float]:
            await trio.sleep(seconds)
            await trio.testing.wait_all_tasks_blocked()
            return [info.idle_seconds for info in e.workers.values() if info.phase == "idle"]

        # The reaper left no idle worker past its deadline.
        assert all(idle < self.max_idle for idle in self.engine.run(step))

    @rule()
    def restart(self) -> None:
        self.engine.restart()

    @rule(x=ints)
    def unknown_process(self, x: int) -> None:
        pid = hbtrio.message_id({"never spawned": x})

        async def step(e: hbtrio.Engine) -> bool:
            try:
                await e.compute(pid, 0)
            except hbtrio.ProcessNotFound:
                return True
            return False

        assert self.engine.run(step)

    # invariants --------------------------------------------------------------------------------

    @invariant()
    def quiescent_and_consistent(self) -> None:
        if self.host is None:
            return

        async def step(e: hbtrio.Engine) -> tuple[Any, dict[str, Any]]:
            return e.stats(), dict(e.workers)

        stats, workers = self.engine.run(step)
        assert stats.waiters == 0  # nobody is left parked after a step
        assert stats.leader_deaths == 0
        for pid, info in workers.items():
            proc = self.model[pid]
            assert -1 <= info.slot <= proc.latest
            assert info.target <= proc.latest
        if self.cache_frequency == 1:  # every slot restorable: never applied twice
            for device in (self.plain, self.slow):
                assert all(n == 1 for n in device.calls.values()), device.calls.most_common(2)


class MemoryStoreMachine(EngineMachine):
    STORE = "memory"


class SQLiteStoreMachine(EngineMachine):
    STORE = "sqlite"


class TinyCachesMachine(EngineMachine):
    """SQLite keeping one process, one assignment and one scheduler tail in memory."""

    STORE = "sqlite-tiny"


LONG = os.environ.get("HBTRIO_LONG") == "1"
_settings = settings(
    max_examples=400 if LONG else 60,
    stateful_step_count=50 if LONG else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMemoryStore = MemoryStoreMachine.TestCase
TestMemoryStore.settings = _settings
TestSQLiteStore = SQLiteStoreMachine.TestCase
TestSQLiteStore.settings = settings(_settings, max_examples=250 if LONG else 40)
TestTinyCaches = TinyCachesMachine.TestCase
TestTinyCaches.settings = settings(_settings, max_examples=250 if LONG else 40)
