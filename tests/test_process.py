"""Slot computation without a worker: `hbtrio.compute_slot` over a store and some devices."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

import hbtrio
from hbtrio import (
    ComputeError,
    InvalidMessage,
    MemoryStore,
    Message,
    ProcessNotFound,
    Scheduler,
    SlotNotScheduled,
    Store,
    UnknownDevice,
    _lua,
    _wasm,
    compute_slot,
    freeze,
    message_id,
)
from hbtrio._devices import Devices
from hbtrio._process import validate_definition

if TYPE_CHECKING:
    from conftest import StoreFactory


def definition(device: str = "counter@1.0", **extra: Any) -> Message:
    return freeze({"device": "process@1.0", "execution-device": device, **extra})


async def new_process(store: Store, device: str, bodies: list[dict[str, Any]]) -> str:
    scheduler = Scheduler(store)
    pid, _ = await scheduler.spawn(definition(device))
    if bodies:
        await scheduler.schedule(pid, bodies)
    return pid


async def schedule(store: Store, pid: str, bodies: list[dict[str, Any]]) -> None:
    await Scheduler(store).schedule(pid, bodies)


def triangle(slot: int) -> int:
    return slot * (slot + 1) // 2


def n_bodies(first: int, last: int) -> list[dict[str, Any]]:
    return [{"n": n} for n in range(first, last + 1)]


class Counting:
    """A user device with counter semantics that records every slot it computes."""

    def __init__(self) -> None:
        self.inits = 0
        self.computed: list[int] = []

    def init(self, process: Message) -> dict[str, Any]:
        self.inits += 1
        return {"count": 0}

    def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
        self.computed.append(assignment["slot"])
        return {"count": state["count"] + assignment["body"].get("n", 0)}


class Packed:
    """Keeps every ``n`` in a list; snapshots pack the list into bytes."""

    def __init__(self) -> None:
        self.computed: list[int] = []
        self.snapshots: list[int] = []
        self.restores: list[Message] = []

    def init(self, process: Message) -> dict[str, Any]:
        return {"items": []}

    def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
        self.computed.append(assignment["slot"])
        return {"items": [*state["items"], assignment["body"]["n"]]}

    def snapshot(self, state: Message) -> dict[str, Any]:
        self.snapshots.append(state["at-slot"])
        return {"packed": json.dumps(list(state["items"])).encode(), "of": state["at-slot"]}

    def restore(self, snapshot: Message) -> dict[str, Any]:
        self.restores.append(snapshot)
        return {"items": json.loads(snapshot["packed"])}


class AsyncPacked(Packed):
    """`Packed` with every method ``async def``."""

    async def init(self, process: Message) -> dict[str, Any]:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return super().init(process)

    async def compute(self, state: Message, assignment: Message) -> dict[str, Any]:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return super().compute(state, assignment)

    async def snapshot(self, state: Message) -> dict[str, Any]:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return super().snapshot(state)

    async def restore(self, snapshot: Message) -> dict[str, Any]:  # type: ignore[override]
        await trio.lowlevel.checkpoint()
        return super().restore(snapshot)


class AsyncCounter:
    def __init__(self) -> None:
        self.computed = 0

    async def init(self, process: Message) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"count": 0}

    async def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        self.computed += 1
        return {"count": state["count"] + assignment["body"]["n"]}


class Failing:
    """Counter semantics; raises (and remembers) an error for bodies with ``"fail"``."""

    def __init__(self, *, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.raised: list[BaseException] = []

    def _boom(self, what: str) -> RuntimeError:
        exc = RuntimeError(f"boom in {what}")
        self.raised.append(exc)
        return exc

    def init(self, process: Message) -> dict[str, Any]:
        if self.fail_init:
            raise self._boom("init")
        return {"count": 0}

    def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
        if assignment["body"].get("fail"):
            raise self._boom(f"slot {assignment['slot']}")
        return {"count": state["count"] + assignment["body"].get("n", 0)}


class Returns:
    """A device whose compute returns whatever it is told to."""

    def __init__(self, value: Any, *, is_init: bool = False) -> None:
        self.value = value
        self.is_init = is_init

    def init(self, process: Message) -> Any:
        return self.value if self.is_init else {"count": 0}

    def compute(self, state: Message, assignment: Message) -> Any:
        return self.value


# -- semantics --------------------------------------------------------------------------------


async def test_counter_sums_the_ns(store: Store) -> None:
    pid = await new_process(store, "counter@1.0", [*n_bodies(1, 8), {}, {"n": 10}])
    devices = Devices()
    for slot in (10, 3, 0, 9, 7):
        state = await compute_slot(store, devices, pid, slot)
        assert isinstance(state, Message)
        assert state["at-slot"] == slot
        expected = triangle(min(slot, 8)) + (10 if slot == 10 else 0)
        assert state == {"count": expected, "at-slot": slot}
        with pytest.raises(TypeError):
            state["count"] = 0  # type: ignore[index]


@pytest.mark.parametrize("n", ["5", 5.0, True, None, [5], {"n": 5}, b"5"])
async def test_counter_refuses_an_n_that_is_not_an_int(n: object) -> None:
    """counter@1.0's documented rule (issue 10.7): only an int ``n`` counts; anything else,
    a bool or the string "5" included, fails that slot (`ComputeError`, TypeError as cause),
    inline or in the worker, and the process keeps its state before it."""
    async with hbtrio.open_engine() as engine:
        pid = await engine.spawn({"device": "process@1.0", "execution-device": "counter@1.0"})
        await engine.schedule_many(pid, [{"n": 2}, {"n": n}, {"n": 3}])
        assert (await engine.compute(pid, 1))["count"] == 2
        for slot in (2, 3):  # the failing slot, and one after it
            with pytest.raises(hbtrio.ComputeError) as info:
                await engine.compute(pid, slot)
            assert info.value.attempted_slot == 2 and info.value.phase == "compute"
            assert isinstance(info.value.__cause__, TypeError)
            assert 'body "n" must be an int' in str(info.value.__cause__)
        assert engine.workers[pid].slot == 1


@pytest.mark.parametrize("frequency", [1, 3, 64])
async def test_user_device_semantics_and_at_slot(store: Store, frequency: int) -> None:
    device = Counting()
    pid = await new_process(store, "count@1.0", n_bodies(1, 20))
    devices = Devices({"count@1.0": device})
    state = await compute_slot(store, devices, pid, 20, cache_frequency=frequency)
    assert state == {"count": triangle(20), "at-slot": 20}
    assert device.computed == list(range(1, 21))
    assert device.inits == 1
    for slot in range(21):
        stored = await compute_slot(store, devices, pid, slot, cache_frequency=frequency)
        assert stored == {"count": triangle(slot), "at-slot": slot}
    assert device.computed == list(range(1, 21))  # every one of those came from the store


async def test_stored_results_are_answered_from_the_store(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    device = Counting()
    devices = Devices({"count@1.0": device})
    pid = await new_process(store, "count@1.0", n_bodies(1, 6))
    await compute_slot(store, devices, pid, 5)
    assert device.computed == [1, 2, 3, 4, 5]

    # A result planted in the store is what compute_slot answers: it did not compute.
    planted = freeze({"count": -1, "at-slot": 6, "planted": True})
    store.put_results_nowait(pid, [(6, planted, None)])
    assert await compute_slot(store, devices, pid, 6) == planted

    store = await store_factory.reopen(store)
    for slot in (5, 2, 6):
        state = await compute_slot(store, devices, pid, slot)
        assert state == (planted if slot == 6 else {"count": triangle(slot), "at-slot": slot})
    assert device.computed == [1, 2, 3, 4, 5]
    assert device.inits == 1


async def test_restore_from_snapshot_computes_only_the_slots_after_it(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory.open()
    device = Counting()
    devices = Devices({"count@1.0": device})
    pid = await new_process(store, "count@1.0", n_bodies(1, 10))
    await compute_slot(store, devices, pid, 10, cache_frequency=5)
    assert device.computed == list(range(1, 11))
    await schedule(store, pid, n_bodies(11, 13))
    store = await store_factory.reopen(store)

    device.computed.clear()
    state = await compute_slot(store, devices, pid, 13, cache_frequency=5)
    assert state == {"count": triangle(13), "at-slot": 13}
    assert device.computed == [11, 12, 13]  # restored from the snapshot at 10
    assert device.inits == 1


async def test_snapshot_and_restore_hooks(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    device = Packed()
    devices = Devices({"packed@1.0": device})
    pid = await new_process(store, "packed@1.0", n_bodies(1, 10))
    state = await compute_slot(store, devices, pid, 10, cache_frequency=4)
    assert state == {"items": list(range(1, 11)), "at-slot": 10}
    assert set(device.snapshots) == {0, 4, 8}
    # The stored snapshot is the device's form, not the state.
    assert await store.latest_snapshot(pid, 10) == (
        8,
        {"packed": b"[1, 2, 3, 4, 5, 6, 7, 8]", "of": 8},
    )
    assert await store.get_result(pid, 8) == {"items": list(range(1, 9)), "at-slot": 8}

    await schedule(store, pid, n_bodies(11, 12))
    store = await store_factory.reopen(store)
    device.computed.clear()
    state = await compute_slot(store, devices, pid, 12, cache_frequency=4)
    assert state == {"items": list(range(1, 13)), "at-slot": 12}
    assert device.restores == [{"packed": b"[1, 2, 3, 4, 5, 6, 7, 8]", "of": 8}]
    assert device.computed == [9, 10, 11, 12]


async def test_missing_result_is_recomputed_from_the_nearest_earlier_snapshot() -> None:
    store = MemoryStore()
    device = Counting()
    devices = Devices({"count@1.0": device})
    pid = await new_process(store, "count@1.0", n_bodies(1, 12))
    await compute_slot(store, devices, pid, 12, cache_frequency=5)
    results = store._procs[pid].results
    original = {slot: results[slot] for slot in (7, 8, 9)}
    results[7] = results[8] = None  # lost, say; the snapshots at 0, 5 and 10 remain

    device.computed.clear()
    assert await compute_slot(store, devices, pid, 8, cache_frequency=5) == original[8]
    assert device.computed == [6, 7, 8]  # from the snapshot at 5, not from 0, not past 8
    assert store.get_result_nowait(pid, 7) == original[7]  # recomputed results are stored
    assert await compute_slot(store, devices, pid, 7, cache_frequency=5) == original[7]
    assert await compute_slot(store, devices, pid, 9, cache_frequency=5) == original[9]
    assert device.computed == [6, 7, 8]


async def test_missing_result_with_restore_hook() -> None:
    store = MemoryStore()
    device = Packed()
    devices = Devices({"packed@1.0": device})
    pid = await new_process(store, "packed@1.0", n_bodies(1, 9))
    await compute_slot(store, devices, pid, 9, cache_frequency=4)
    store._procs[pid].results[6] = None
    device.computed.clear()
    assert await compute_slot(store, devices, pid, 6, cache_frequency=4) == {
        "items": [1, 2, 3, 4, 5, 6],
        "at-slot": 6,
    }
    assert [r["of"] for r in device.restores] == [4]
    assert device.computed == [5, 6]


async def test_async_devices(store: Store) -> None:
    counter = AsyncCounter()
    packed = AsyncPacked()
    devices = Devices({"async-count@1.0": counter, "async-packed@1.0": packed})
    a = await new_process(store, "async-count@1.0", n_bodies(1, 7))
    b = await new_process(store, "async-packed@1.0", n_bodies(1, 7))
    assert await compute_slot(store, devices, a, 7) == {"count": triangle(7), "at-slot": 7}
    assert counter.computed == 7
    assert await compute_slot(store, devices, b, 5, cache_frequency=2) == {
        "items": [1, 2, 3, 4, 5],
        "at-slot": 5,
    }
    assert set(packed.snapshots) == {0, 2, 4}
    assert await compute_slot(store, devices, b, 7, cache_frequency=2) == {
        "items": list(range(1, 8)),
        "at-slot": 7,
    }
    assert [r["of"] for r in packed.restores] == [4]  # slot 5 is no snapshot: 5 is redone
    assert packed.computed == [1, 2, 3, 4, 5, 5, 6, 7]


async def test_compute_slot_checkpoints(store: Store) -> None:
    pid = await new_process(store, "counter@1.0", n_bodies(1, 3))
    with trio.testing.assert_checkpoints():
        await compute_slot(store, Devices(), pid, 3)
    with trio.testing.assert_checkpoints():
        await compute_slot(store, Devices(), pid, 3)  # from the store


async def test_cancelled_compute_stores_only_complete_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Slow:
        def init(self, process: Message) -> dict[str, Any]:
            return {"count": 0}

        async def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
            await trio.sleep(1)
            return {"count": state["count"] + assignment["body"]["n"]}

    store = MemoryStore()
    devices = Devices({"slow@1.0": Slow()})
    pid = await new_process(store, "slow@1.0", n_bodies(1, 10))
    with trio.move_on_after(3.5):
        await compute_slot(store, devices, pid, 10)
    assert {s: store.get_result_nowait(pid, s) for s in range(1, 6)} == {
        1: {"count": 1, "at-slot": 1},
        2: {"count": 3, "at-slot": 2},
        3: {"count": 6, "at-slot": 3},
        4: None,
        5: None,
    }
    # Computing again picks up from there.
    assert await compute_slot(store, devices, pid, 5) == {"count": 15, "at-slot": 5}
    assert trio.current_time() == pytest.approx(5.5)


# -- errors -----------------------------------------------------------------------------------


async def test_device_failure_becomes_compute_error(store: Store) -> None:
    device = Failing()
    devices = Devices({"failing@1.0": device})
    pid = await new_process(store, "failing@1.0", [{"n": 1}, {"n": 2}, {"fail": True}, {"n": 4}])
    with pytest.raises(ComputeError) as info:
        await compute_slot(store, devices, pid, 4)
    error = info.value
    assert not isinstance(error, SlotNotScheduled)
    assert error.phase == "compute"
    assert error.attempted_slot == 3
    assert error.pid == pid
    assert error.__cause__ is device.raised[-1]
    # The slots before the failure were computed and stored.
    assert await store.get_result(pid, 2) == {"count": 3, "at-slot": 2}
    assert await store.get_result(pid, 3) is None
    assert await compute_slot(store, devices, pid, 2) == {"count": 3, "at-slot": 2}
    with pytest.raises(ComputeError) as again:
        await compute_slot(store, devices, pid, 3)
    assert again.value.attempted_slot == 3


async def test_init_failure_is_slot_zero(store: Store) -> None:
    device = Failing(fail_init=True)
    pid = await new_process(store, "failing@1.0", [{"n": 1}])
    with pytest.raises(ComputeError) as info:
        await compute_slot(store, Devices({"failing@1.0": device}), pid, 1)
    assert info.value.phase == "compute"
    assert info.value.attempted_slot == 0
    assert info.value.__cause__ is device.raised[-1]


@pytest.mark.parametrize("hook", ["snapshot", "restore"])
async def test_hook_failures_become_compute_errors(hook: str) -> None:
    class Broken(Packed):
        def snapshot(self, state: Message) -> dict[str, Any]:
            if hook == "snapshot" and state["at-slot"] == 2:
                raise KeyError("no snapshot")
            return super().snapshot(state)

        def restore(self, snapshot: Message) -> dict[str, Any]:
            raise KeyError("no restore")

    store = MemoryStore()
    devices = Devices({"broken@1.0": Broken()})
    pid = await new_process(store, "broken@1.0", n_bodies(1, 4))
    if hook == "restore":
        await compute_slot(store, devices, pid, 2, cache_frequency=2)
    with pytest.raises(ComputeError) as info:
        await compute_slot(store, devices, pid, 4, cache_frequency=2)
    assert info.value.phase == "compute"
    assert info.value.attempted_slot == 2
    assert isinstance(info.value.__cause__, KeyError)


async def test_device_cannot_mutate_the_state_it_is_given(store: Store) -> None:
    class Mutating:
        def init(self, process: Message) -> dict[str, Any]:
            return {"count": 0, "log": []}

        def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
            if assignment["body"].get("evil"):
                state["log"].append("evil")  # type: ignore[attr-defined]
            return {"count": state["count"] + 1, "log": [*state["log"], assignment["slot"]]}

    pid = await new_process(store, "mut@1.0", [{}, {"evil": True}])
    devices = Devices({"mut@1.0": Mutating()})
    with pytest.raises(ComputeError) as info:
        await compute_slot(store, devices, pid, 2)
    assert isinstance(info.value.__cause__, AttributeError)
    assert await compute_slot(store, devices, pid, 1) == {"count": 1, "log": [1], "at-slot": 1}


@pytest.mark.parametrize(
    "bad",
    [{"x": {1, 2}}, {1: "int key"}, ["not", "a", "mapping"], None, {"deep": [[object()]]}],
    ids=["set value", "int key", "list", "None", "object"],
)
@pytest.mark.parametrize("where", ["compute", "async compute", "init"])
async def test_invalid_device_output_is_a_compute_error(bad: Any, where: str) -> None:
    if where == "async compute":

        class Device(Returns):
            async def compute(self, state: Message, assignment: Message) -> Any:  # type: ignore[override]
                return self.value

        device: Returns = Device(bad)
    else:
        device = Returns(bad, is_init=where == "init")
    store = MemoryStore()
    pid = await new_process(store, "returns@1.0", [{"n": 1}])
    with pytest.raises(ComputeError) as info:
        await compute_slot(store, Devices({"returns@1.0": device}), pid, 1)
    assert info.value.phase == "compute"
    assert info.value.attempted_slot == (0 if where == "init" else 1)
    assert isinstance(info.value.__cause__, InvalidMessage)
    assert store.get_result_nowait(pid, 1) is None


async def test_unscheduled_slot(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    pid = await new_process(store, "counter@1.0", n_bodies(1, 3))
    for attempt in ("fresh", "after computing", "after reopening"):
        if attempt == "after computing":
            await compute_slot(store, Devices(), pid, 3)
        elif attempt == "after reopening":
            store = await store_factory.reopen(store)
        for slot in (4, 7, 1000):
            with pytest.raises(SlotNotScheduled) as info:
                await compute_slot(store, Devices(), pid, slot)
            error = info.value
            assert isinstance(error, ComputeError)
            assert error.phase == "get-schedule"
            assert error.attempted_slot == 4, attempt
            assert error.latest == 3
    assert await compute_slot(store, Devices(), pid, 3) == {"count": 6, "at-slot": 3}


async def test_bad_arguments(store: Store) -> None:
    pid = await new_process(store, "counter@1.0", n_bodies(1, 2))
    for slot in (-1, True, 1.0, "1"):
        with pytest.raises(InvalidMessage):
            await compute_slot(store, Devices(), pid, slot)  # type: ignore[arg-type]
    for frequency in (0, -1, 1.5):
        with pytest.raises(ValueError):
            await compute_slot(store, Devices(), pid, 1, cache_frequency=frequency)  # type: ignore[arg-type]
    with pytest.raises(ProcessNotFound):
        await compute_slot(store, Devices(), message_id({"unknown": 1}), 0)


async def test_process_of_a_device_without_init_or_compute(store: Store) -> None:
    class ResolveOnly:
        def hello(self, base: Message, request: Message) -> dict[str, Any]:
            return {}

    pid = await new_process(store, "resolve-only@1.0", [{"n": 1}])
    with pytest.raises(InvalidMessage, match="init/compute"):
        await compute_slot(store, Devices({"resolve-only@1.0": ResolveOnly()}), pid, 1)


# -- definitions and devices ------------------------------------------------------------------


def test_validate_definition_accepts_a_process() -> None:
    plain = {"device": "process@1.0", "execution-device": "counter@1.0", "extra": [1]}
    checked = validate_definition(plain, Devices())
    assert isinstance(checked, Message)
    assert checked == plain


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"device": "process@1.0"}, "execution-device"),
        ({"device": "process@1.0", "execution-device": 5}, "execution-device"),
        ({"device": "process@1.0", "execution-device": None}, "execution-device"),
        ({"execution-device": "counter@1.0"}, "device"),
        ({"device": "other@1.0", "execution-device": "counter@1.0"}, "device"),
        ({"device": "process@1.0", "execution-device": "counter@1.0", "x": {1}}, "x"),
        (["device", "process@1.0"], "mapping"),
    ],
)
def test_validate_definition_rejects(bad: Any, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        validate_definition(bad, Devices())


def test_validate_definition_unknown_device() -> None:
    with pytest.raises(UnknownDevice) as info:
        validate_definition({"device": "process@1.0", "execution-device": "nope@1.0"}, Devices())
    assert info.value.name == "nope@1.0"
    assert not isinstance(info.value, InvalidMessage)
    # Registered devices are found.
    validate_definition(
        {"device": "process@1.0", "execution-device": "nope@1.0"}, Devices({"nope@1.0": Counting()})
    )


def test_devices_registry() -> None:
    devices = Devices({"count@1.0": Counting()})
    assert "counter@1.0" in devices
    assert "count@1.0" in devices
    wasm = list(_wasm.builtin_devices())  # wasm-64@1.0 and stack@1.0 with the wasm extra
    lua = list(_lua.builtin_devices())  # lua@5.3 with the lua extra
    assert devices.names() == sorted(["count@1.0", "counter@1.0", *wasm, *lua])
    for name in ("missing@1.0", None, ["unhashable"]):
        with pytest.raises(UnknownDevice):
            devices.get(name)
    with pytest.raises(ValueError):
        Devices({"process@1.0": Counting()})
    with pytest.raises(TypeError):
        Devices({"": Counting()})
    with pytest.raises(TypeError):
        Devices({"bad@1.0": type("NotCallable", (), {"compute": 5})()})


async def _no_blobs(blob_id: str) -> bytes:
    raise LookupError(blob_id)


def test_built_in_families_are_made_on_first_use_and_attached_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The WASM and Lua devices cost an engine nothing until a process uses one: each
    family is made once, on the first `get` of any of its names, and attached to the
    registry's host then; a name an extra replaces never makes its family's object."""

    class Family:
        def __init__(self) -> None:
            self.hosts: list[hbtrio.DeviceHost] = []

        def attach(self, host: hbtrio.DeviceHost) -> None:
            self.hosts.append(host)

        def compute(self, state: Any, assignment: Any) -> Any:
            return state

    made: list[Family] = []

    def family() -> dict[str, object]:
        made.append(Family())
        return dict.fromkeys(_wasm.NAMES, made[-1])

    monkeypatch.setattr(_wasm, "builtin_devices", family)
    monkeypatch.setattr(_wasm, "available", lambda: True)
    mine = Counting()
    devices = Devices({"stack@1.0": mine})
    assert "wasm-64@1.0" in devices and "stack@1.0" in devices
    assert "wasm-64@1.0" in devices.names()
    assert made == []  # asked about, not made
    host = hbtrio.DeviceHost(3.0, get_blob=_no_blobs)
    devices.attach(host)
    assert made == []
    assert devices.get("stack@1.0").obj is mine  # the extra, not the family
    assert made == []
    first = devices.get("wasm-64@1.0")
    assert [f.hosts for f in made] == [[host]]  # made once, attached at once
    assert devices.get("wasm-64@1.0") is first and len(made) == 1
    assert first.obj is made[0]
    for name in (["unhashable"], 5):
        assert name not in devices
        with pytest.raises(UnknownDevice):
            devices.get(name)


def test_a_family_made_before_attach_is_attached_with_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts: list[object] = []

    class Family:
        def attach(self, host: object) -> None:
            hosts.append(host)

        def compute(self, state: Any, assignment: Any) -> Any:
            return state

    monkeypatch.setattr(_lua, "builtin_devices", lambda: dict.fromkeys(_lua.NAMES, Family()))
    monkeypatch.setattr(_lua, "available", lambda: True)
    devices = Devices(on_failure="record")
    devices.get("lua@5.3")
    assert hosts == []
    host = hbtrio.DeviceHost(None, get_blob=_no_blobs)
    devices.attach(host)
    assert hosts == [host]


def test_a_family_whose_dependencies_are_missing_is_unknown_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_lua, "builtin_devices", dict)
    monkeypatch.setattr(_lua, "available", lambda: False)
    devices = Devices()
    assert "lua@5.3" not in devices and "lua@5.3" not in devices.names()
    with pytest.raises(UnknownDevice, match="pip install"):
        devices.get("lua@5.3")
