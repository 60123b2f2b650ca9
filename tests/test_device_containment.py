"""A device's failure is its process's, whatever it raises (issue 15.2).

A device that raises `KeyboardInterrupt`, `SystemExit`, `GeneratorExit`, any
other `BaseException` or a stray `trio.Cancelled` (one no scope around the
call cancelled) fails that slot with `ComputeError`, its exception as
``__cause__``; the engine, its other processes and the node go on. Only the
engine's own cancellation (a closing engine, a ``slot_timeout``, a caller
that leaves) is treated as cancellation, and a real Ctrl-C is never
mistaken for a device's failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import hbtrio
import hbtrio.testing
from helpers import definition, node_started, reap

SRC = str(Path(hbtrio.__file__).resolve().parents[1])


class Custom(BaseException):
    """A BaseException that is neither Exception nor one of Python's own."""


async def stray_cancelled() -> trio.Cancelled:
    """A real `trio.Cancelled`, caught from a scope that is over: raising it later is stray."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            caught = exc
    return caught


KINDS: dict[str, Callable[[], BaseException]] = {
    "KeyboardInterrupt": lambda: KeyboardInterrupt("from the device"),
    "SystemExit": lambda: SystemExit(3),
    "GeneratorExit": lambda: GeneratorExit("from the device"),
    "Custom": lambda: Custom("from the device"),
}
ALL_KINDS = [*KINDS, "Cancelled"]


async def make(kind: str) -> BaseException:
    return await stray_cancelled() if kind == "Cancelled" else KINDS[kind]()


class Raising:
    """Raises ``error`` from ``where`` (a method name) at the slots in ``at`` (or always)."""

    def __init__(self, where: str, kind: str, *, is_async: bool, at: int = 2) -> None:
        self.where, self.kind, self.at, self.is_async = where, kind, at, is_async
        self.armed = True

    async def _maybe(self, where: str, slot: int) -> None:
        if self.armed and where == self.where and slot >= self.at:
            raise await make(self.kind)

    def _maybe_sync(self, where: str, slot: int) -> None:
        if self.armed and where == self.where and slot >= self.at:
            if self.kind == "Cancelled":  # built before the test starts: see `plain_device`
                raise self.stray
            raise KINDS[self.kind]()

    stray: BaseException = RuntimeError("set by the test")


def plain_device(where: str, kind: str, at: int = 2) -> Any:
    class Plain(Raising):
        def init(self, process: Any) -> dict[str, Any]:
            self._maybe_sync("init", 0)
            return {"count": 0}

        def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
            self._maybe_sync("compute", assignment["slot"])
            return {"count": state["count"] + assignment["body"]["n"]}

    return Plain(where, kind, is_async=False, at=at)


def async_device(where: str, kind: str, at: int = 2) -> Any:
    class Async(Raising):
        async def init(self, process: Any) -> dict[str, Any]:
            await self._maybe("init", 0)
            return {"count": 0}

        async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
            await trio.lowlevel.checkpoint()
            await self._maybe("compute", assignment["slot"])
            return {"count": state["count"] + assignment["body"]["n"]}

        async def snapshot(self, state: Any) -> dict[str, Any]:
            await self._maybe("snapshot", state["at-slot"])
            return {"c": state["count"]}

        async def restore(self, snapshot: Any) -> dict[str, Any]:
            await self._maybe("restore", 99)
            return {"count": snapshot["c"]}

    return Async(where, kind, is_async=True, at=at)


@asynccontextmanager
async def contained(devices: dict[str, object]) -> AsyncIterator[hbtrio.Engine]:
    """An engine whose block must run to its end: an escaped exception cancels it silently."""
    finished = False
    async with hbtrio.testing.open_test_engine(devices=devices) as engine:
        yield engine
        finished = True
    assert finished, "the block was cut short: a device's exception escaped into the engine"


def assert_contained(info: pytest.ExceptionInfo[hbtrio.ComputeError], kind: str) -> None:
    assert type(info.value.__cause__).__name__ == kind
    assert info.value.phase == "compute"


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("flavour", ["plain", "async"])
async def test_whatever_compute_raises_fails_that_slot_only(kind: str, flavour: str) -> None:
    device = (plain_device if flavour == "plain" else async_device)("compute", kind)
    device.stray = await stray_cancelled()
    async with contained({"dev@1.0": device}) as engine:
        pid = await engine.spawn(definition("dev@1.0"))
        other = await engine.spawn(definition("counter@1.0"))
        await engine.schedule_many(pid, [{"n": 1}, {"n": 2}, {"n": 3}])
        await engine.schedule(other, {"n": 7})
        assert (await engine.compute(pid, 1))["count"] == 1
        for slot in (2, 3):  # the failing slot and the one after it; twice each: not wedged
            for _ in range(2):
                with pytest.raises(hbtrio.ComputeError) as info:
                    await engine.compute(pid, slot)
                assert_contained(info, kind)
                assert info.value.attempted_slot == 2
        assert (await engine.compute(other, 1))["count"] == 7  # other processes carry on
        assert engine.workers[pid].slot == 1  # the last good state
        device.armed = False  # the failure was the device's: once it stops, the process goes on
        assert (await engine.now(pid))["count"] == 6
        assert engine.statistics().leader_deaths == 0


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("where", ["init", "snapshot", "restore"])
async def test_whatever_init_snapshot_or_restore_raise_is_a_compute_error(
    kind: str, where: str
) -> None:
    device = async_device(where, kind, at=0)
    device.stray = await stray_cancelled()
    device.armed = where != "restore"
    async with contained({"dev@1.0": device}) as engine:
        pid = await engine.spawn(definition("dev@1.0"))
        await engine.schedule(pid, {"n": 1})
        if where == "restore":  # a snapshot to restore from, and a fresh worker to restore it
            await engine.compute(pid, 1)
            await engine.schedule(pid, {"n": 2})
            await engine.stop(pid)
            device.armed = True
            slot = 2
        else:
            slot = 1
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, slot)
        assert_contained(info, kind)
        device.armed = False
        assert (await engine.compute(pid, slot))["count"] == slot * (slot + 1) // 2


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_whatever_a_resolution_raises_reaches_every_caller_as_compute_error(
    kind: str,
) -> None:
    class Resolver:
        async def go(self, base: Any, request: Any) -> Any:
            await trio.lowlevel.checkpoint()
            raise await make(kind)

        def __getattr__(self, name: str) -> Any:
            if name == "broken":
                raise KINDS.get(kind, lambda: SystemExit(1))()
            raise AttributeError(name)

    async with contained({"r@1.0": Resolver()}) as engine:
        errors: list[BaseException] = []

        async def call(path: str) -> None:
            try:
                await engine.resolve({"device": "r@1.0"}, {"path": path})
            except hbtrio.ComputeError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(call, "go")
        nursery_errors = [type(e.__cause__).__name__ for e in errors]
        assert nursery_errors == [kind] * 3
        assert len({id(e) for e in errors}) == 3  # one exception object each
        await call("broken")
        assert len(errors) == 4


@pytest.mark.parametrize("kind", [k for k in ALL_KINDS if k != "Cancelled"])
async def test_whatever_a_threaded_device_raises_is_a_compute_error(kind: str) -> None:
    class Threaded:
        def init(self, process: Any) -> dict[str, Any]:
            return {"count": 0}

        def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
            raise KINDS[kind]()

    devices = {"t@1.0": hbtrio.run_in_thread(Threaded())}
    async with contained(devices) as engine:
        pid = await engine.spawn(definition("t@1.0"))
        await engine.schedule(pid, {"n": 1})
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 1)
        assert_contained(info, kind)


# --------------------------------------------------------------------------- real cancellation


async def test_the_engines_own_cancellation_is_still_cancellation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Stuck:
        def init(self, process: Any) -> dict[str, Any]:
            return {"count": 0}

        async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
            await trio.sleep_forever()
            raise AssertionError("unreachable")  # pragma: no cover

    async with hbtrio.open_engine(devices={"s@1.0": Stuck()}, slot_timeout=5) as engine:
        pid = await engine.spawn(definition("s@1.0"))
        await engine.schedule(pid, {"n": 1})
        with trio.move_on_after(1) as scope:  # a caller that gives up: only its wait goes
            await engine.compute(pid, 1)
        assert scope.cancelled_caught
        with pytest.raises(hbtrio.ComputeError) as info:  # the slot_timeout: a failure
            await engine.compute(pid, 1)
        assert isinstance(info.value.__cause__, trio.TooSlowError)
    start = trio.current_time()
    with trio.move_on_after(2) as outer:  # the block cancelled from outside: prompt, not a failure
        async with hbtrio.open_engine(devices={"s@1.0": Stuck()}) as engine:
            pid2 = await engine.spawn(definition("s@1.0", nonce=2))
            await engine.schedule(pid2, {"n": 1})
            await engine.compute(pid2, 1)
    assert outer.cancelled_caught and trio.current_time() - start < 3


_CTRL_C_DEVICE = """
import signal, sys, trio, hbtrio

# A shell's background job starts with SIGINT ignored, and Python then keeps it so.
signal.signal(signal.SIGINT, signal.default_int_handler)

class CtrlC:
    def init(self, process):
        return {"count": 0}

    def compute(self, state, assignment):
        signal.raise_signal(signal.SIGINT)   # a real Ctrl-C, arriving while the device runs
        return {"count": state["count"] + 1}

async def main():
    async with hbtrio.open_engine(devices={"c@1.0": CtrlC()}) as engine:
        pid = await engine.spawn({"device": "process@1.0", "execution-device": "c@1.0"})
        await engine.schedule(pid, {})
        state = await engine.compute(pid, 1)
        print("computed", state["count"], flush=True)
        await trio.sleep_forever()

try:
    trio.run(main)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
"""


def test_a_real_ctrl_c_while_a_device_runs_still_interrupts_the_program(tmp_path: Path) -> None:
    """KI protection: the signal goes to the program, and the slot is computed, not failed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_DEVICE], capture_output=True, timeout=60, env=env
    )
    assert done.stdout.decode().splitlines() == ["computed 1", "KeyboardInterrupt"], done


# --------------------------------------------------------------------------- the node


_NODE_DEVICES = """
import trio

class Exits:
    def init(self, process):
        return {"count": 0}

    async def compute(self, state, assignment):
        await trio.lowlevel.checkpoint()
        raise SystemExit(0)

class Interrupts:
    def init(self, process):
        return {"count": 0}

    def compute(self, state, assignment):
        raise KeyboardInterrupt
"""


async def test_a_node_outlives_devices_that_exit_or_interrupt(tmp_path: Path) -> None:
    """Regression: `hbtrio serve` used to exit (status 0 or 1) and drop every request."""
    (tmp_path / "baddevices.py").write_text(_NODE_DEVICES)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), SRC])
    env.pop("HBTRIO_TOKEN", None)
    cmd = [sys.executable, "-m", "hbtrio", "serve", "--db", str(tmp_path / "n.sqlite"),
           "--port", "0", "--log-level", "warning",
           "--device", "exits@1.0=baddevices:Exits",
           "--device", "interrupts@1.0=baddevices:Interrupts"]  # fmt: skip
    for run in range(2):  # and after a restart: no crash loop
        proc = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        assert proc.stdout is not None
        try:
            seen = await node_started(proc.stdout, 30)
            url = seen.split(b"listening on ")[1].split(b" ")[0].decode()
            async with httpx.AsyncClient(base_url=url, timeout=20) as c:
                for device in ("exits@1.0", "interrupts@1.0", "counter@1.0"):
                    r = await c.post("/processes", json=definition(device))
                    pid = r.json()["process"]
                    if run == 0:
                        assert (await c.post(f"/{pid}/schedule", json={"n": 1})).status_code == 200
                    r = await c.get(f"/{pid}/now")
                    if device == "counter@1.0":
                        assert r.json() == {"at-slot": 1, "count": 1}
                    else:
                        assert r.status_code == 422, r.text
                        body = r.json()
                        assert body["error"] == "compute-error"
                        assert body["cause"].split(":")[0] in ("SystemExit", "KeyboardInterrupt")
                assert (await c.get("/stats")).status_code == 200
            assert proc.returncode is None  # still serving
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await proc.wait() == 0
        finally:
            await reap(proc)


async def test_the_way_out_for_a_device_that_takes_its_process_down(tmp_path: Path) -> None:
    """A device that cannot be contained (it kills or hangs the whole program: os._exit, a
    segfault, an endless plain loop) has a way out: run the node without that device. Its
    processes then answer UnknownDevice (HTTP 400) and every other process is served."""
    path = tmp_path / "node.sqlite"
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"bad@1.0": plain_device("compute", "SystemExit", at=99)}
    ) as engine:
        bad = await engine.spawn(definition("bad@1.0"))
        good = await engine.spawn(definition("counter@1.0"))
        for pid in (bad, good):
            await engine.schedule(pid, {"n": 4})
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:  # bad@1.0 left out
        with pytest.raises(hbtrio.UnknownDevice, match=r"bad@1\.0"):
            await engine.now(bad)
        assert (await engine.now(good))["count"] == 4
        assert await engine.schedule(bad, {"n": 1}) == 2  # its log still takes messages


# --------------------------------------------------------------------------- devices that write


class Scribbler:
    """Writes into everything it is handed, past the read-only API, then computes honestly."""

    def _scribble(self, *messages: Any) -> None:
        for message in messages:
            dict.__setitem__(message, "scribbled", True)
            for value in list(message.values()):
                if isinstance(value, dict):
                    dict.__setitem__(value, "scribbled", True)
                if isinstance(value, tuple):
                    for item in value:
                        if isinstance(item, dict):
                            dict.__setitem__(item, "scribbled", True)

    def init(self, process: Any) -> dict[str, Any]:
        self._scribble(process)
        return {"count": 0, "nested": {"deep": {"n": 0}}, "items": [{"k": 0}]}

    def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        self._scribble(state, assignment, assignment["body"], state["nested"])
        n = assignment["body"]["n"]
        return {
            "count": state["count"] + n,
            "nested": {"deep": {"n": state["nested"]["deep"]["n"] + 1}},
            "items": [{"k": n}],
        }


class AsyncScribbler(Scribbler):
    async def compute(self, state: Any, assignment: Any) -> dict[str, Any]:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return Scribbler.compute(self, state, assignment)


@pytest.mark.parametrize("device", [Scribbler, AsyncScribbler])
async def test_a_device_writing_into_its_input_cannot_make_memory_and_disk_disagree(
    device: type, tmp_path: Path
) -> None:
    """Regression (issue 15.8): what the engine keeps is never what the device was handed."""
    path = tmp_path / "s.sqlite"
    devices = {"scribble@1.0": device()}
    definition_ = definition("scribble@1.0")
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path), devices=devices) as engine:
        pid = await engine.spawn(definition_)
        await engine.schedule_many(pid, [{"n": n, "sub": {"x": n}} for n in range(1, 6)])
        in_memory = [await engine.compute(pid, slot) for slot in range(6)]
        for state in in_memory:
            assert "scribbled" not in state and "scribbled" not in state["nested"]
        assert await engine.compute(pid, 5) == in_memory[5]
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path), devices=devices) as engine:
        on_disk = [await engine.compute(pid, slot) for slot in range(6)]
        assert on_disk == in_memory
        report = await hbtrio.testing.audit_process(engine.store, pid, devices)
        assert report.results == 6  # every stored result equals a fresh replay
    assert hbtrio.message_id(definition_) == pid  # the definition was not changed either
