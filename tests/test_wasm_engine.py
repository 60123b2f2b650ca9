"""WASM processes through the engine: hot instances, snapshots, failures, limits, cancellation.

Every module is the project's own (tests/wasm/*.wat, see wasm_kit).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import hbtrio
import hbtrio.testing
from hbtrio import _wasm
from wasm_kit import device, image_id, module, wasm_definition

COUNTER = "wasm-64@1.0"


def counts(state: hbtrio.Message) -> tuple[int, int]:
    return state["output"]["count"], state["output"]["calls"]


async def test_one_instance_stays_hot_and_results_have_the_documented_form() -> None:
    dev = device()
    async with hbtrio.testing.open_test_engine(devices={COUNTER: dev}) as engine:
        pid = await engine.spawn(wasm_definition(module("counter")))
        await engine.schedule_many(pid, [{"action": "Tick"}] * 10)
        for slot in range(1, 11):
            state = await engine.compute(pid, slot)
            assert state == {
                "output": {"count": slot, "calls": slot},
                "messages": [],
                "spawns": [],
                "assignments": [],
                "at-slot": slot,
            }
        assert dev.statistics().booted == 1
        assert dev.statistics().live_instances == 1
        assert await engine.compute(pid, 0) == {"at-slot": 0}
        await engine.schedule(pid, {"data": "@print"})
        assert (await engine.now(pid))["stdout"] == "hello from fd_write\n"
    assert dev.statistics().live_instances == 0


async def test_the_module_sees_the_message_and_process_in_hyperbeams_form() -> None:
    async with hbtrio.testing.open_test_engine(devices={COUNTER: device()}) as engine:
        definition = wasm_definition(module("echo"), owner="alice", type="Process")
        pid = await engine.spawn(definition)
        body = {"action": "Eval", "data": "return 1+1", "Data-Protocol": "ao"}
        await engine.schedule(pid, body)
        state = await engine.now(pid)
        [assignment] = await engine.store.get_assignments(pid, 1, 2)
    msg = state["output"]
    assert msg["Id"] == assignment["message-id"]
    assert (msg["Owner"], msg["From"], msg["Target"]) == ("alice", "alice", pid)
    assert msg["Data"] == "return 1+1"
    assert msg["Tags"] == [
        {"name": "Action", "value": "Eval"},
        {"name": "Data-Protocol", "value": "ao"},
    ]
    assert msg["Module"] == image_id(module("echo"))
    assert msg["Timestamp"] == assignment["timestamp"] and msg["Block-Height"] == 0
    env = state["spawns"][0]
    assert env["from-process"] == pid
    process = env["process"]
    assert process["Id"] == pid and process["Owner"] == "alice"
    assert {"name": "Image", "value": image_id(module("echo"))} in process["Tags"]
    [out] = state["messages"]  # the outbox: fields in lower case, tags merged in
    assert out["action"] == "Eval" and out["data-protocol"] == "ao" and out["data"] == "return 1+1"
    assert out["from-process"] == pid and out["from-image"] == image_id(module("echo"))


async def test_a_snapshot_restores_after_a_restart_and_gives_the_same_memory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wasm.sqlite"
    bodies = [{"data": f"message {n}"} for n in range(7)]
    definition = wasm_definition(module("counter"))
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={COUNTER: device()}, cache_frequency=3
    ) as engine:
        pid = await engine.spawn(definition)
        await engine.schedule_many(pid, bodies)
        assert counts(await engine.compute(pid, 7)) == (7, 7)
    dev = device()
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={COUNTER: dev}, cache_frequency=3
    ) as engine:
        await engine.schedule(pid, {"data": "after the restart"})
        assert counts(await engine.compute(pid, 8)) == (8, 8)
        assert engine.statistics().slots_computed == 1  # restored at 7, one slot applied
        await engine.stop(pid)
        found = await engine.store.latest_snapshot(pid, 8)
        assert found is not None and found[0] == 8
        restored = found[1]
        log = await engine.store.get_assignments(pid, 1, 9)
        stored_definition = await engine.store.get_process(pid)
    assert dev.statistics().booted == 1
    # The same log computed hot from slot 0 ends with the same memory, bit for bit.
    assert stored_definition is not None
    live = await device().boot(stored_definition, None)
    for assignment in log:
        live.compute_sync(assignment)
    hot = await live.snapshot()
    live.close()
    assert hot["memory"] == restored["memory"]
    assert hot["globals"] == restored["globals"] == {"calls": 8}


async def test_a_trap_is_the_slots_result_and_the_memory_goes_back() -> None:
    dev = device()
    async with hbtrio.testing.open_test_engine(devices={COUNTER: dev}) as engine:
        pid = await engine.spawn(wasm_definition(module("counter")))
        await engine.schedule_many(pid, [{}, {}, {"data": "@trap"}, {}])
        failed = await engine.compute(pid, 3)
        assert failed["error-kind"] == "failure" and failed["at-slot"] == 3
        assert failed["error"].startswith("WasmTrap: wasm trap: wasm `unreachable`")
        assert "output" not in failed
        # Slot 4 continues from slot 2's memory: the trap's changes are gone.
        assert counts(await engine.compute(pid, 4)) == (3, 3)
        assert dev.statistics().booted == 2  # rebuilt once, from the snapshot at 3


async def test_a_definition_can_ask_to_stop_at_a_failing_slot() -> None:
    async with hbtrio.testing.open_test_engine(devices={COUNTER: device()}) as engine:
        pid = await engine.spawn(wasm_definition(module("counter"), **{"on-failure": "stop"}))
        await engine.schedule_many(pid, [{}, {"data": "@trap"}, {}])
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 3)
        assert info.value.attempted_slot == 2
        assert isinstance(info.value.__cause__, hbtrio.WasmTrap)
        assert counts(await engine.compute(pid, 1)) == (1, 1)


async def test_a_reported_error_is_a_result_and_keeps_the_memory() -> None:
    async with hbtrio.testing.open_test_engine(devices={COUNTER: device()}) as engine:
        pid = await engine.spawn(wasm_definition(module("counter")))
        await engine.schedule_many(pid, [{"data": "@error"}, {"data": "@fail"}, {}])
        assert (await engine.compute(pid, 1))["error"] == "error on purpose"
        assert (await engine.compute(pid, 2))["error"] == "failed on purpose"
        assert counts(await engine.compute(pid, 3)) == (3, 3)


async def test_a_runaway_call_times_out_stops_its_thread_and_the_process_goes_on() -> None:
    dev = device()  # bounded by the engine's slot_timeout, which it is attached with
    async with hbtrio.testing.open_test_engine(devices={COUNTER: dev}, slot_timeout=0.5) as engine:
        assert dev.timeout == 0.5
        pid = await engine.spawn(wasm_definition(module("counter")))
        await engine.schedule_many(pid, [{}, {"data": "@loop"}, {}])
        start = time.monotonic()
        failed = await engine.compute(pid, 2)
        assert failed["error-kind"] == "timeout"
        assert time.monotonic() - start < 5
        assert counts(await engine.compute(pid, 3)) == (2, 2)
    # Nothing goes on burning a core: the interrupted thread has stopped.
    cpu, wall = time.process_time(), time.monotonic()
    await trio.sleep(0.5)
    assert time.process_time() - cpu < 0.25 * (time.monotonic() - wall) + 0.05


async def test_a_memory_hog_meets_the_limit() -> None:
    dev = device(max_memory=4 << 20)
    async with hbtrio.testing.open_test_engine(devices={COUNTER: dev}) as engine:
        pid = await engine.spawn(wasm_definition(module("counter")))
        await engine.schedule_many(pid, [{"data": "@hog"}, {}])
        assert (await engine.compute(pid, 1))["error"] == "out of memory"
        assert counts(await engine.compute(pid, 2)) == (2, 2)
        await engine.stop(pid)
        found = await engine.store.latest_snapshot(pid, 2)
        assert found is not None and found[1]["size"] <= 4 << 20


async def test_the_engine_counts_a_workers_linear_memory() -> None:
    async with hbtrio.testing.open_test_engine(devices={COUNTER: device()}) as engine:
        pid = await engine.spawn(wasm_definition(module("counter")))
        await engine.schedule(pid, {})
        await engine.compute(pid, 1)
        small = engine.workers[pid].memory_bytes
        assert small >= 2 * 65536  # the module's two pages
        await engine.schedule(pid, {"data": "x" * 1_000_000})  # never freed: memory grows
        await engine.compute(pid, 2)
        assert engine.workers[pid].memory_bytes >= small + 900_000
        assert engine.statistics().memory_bytes >= engine.workers[pid].memory_bytes


async def test_a_wasm_process_is_deterministic() -> None:
    bodies: list[dict[str, Any]] = [
        {"data": "one"},
        {"data": "@print"},
        {"data": "@error"},
        {"data": "@trap"},
        {"data": "x" * 100_000},
        {"data": "@fail"},
        {},
    ]
    states = await hbtrio.testing.assert_deterministic(
        wasm_definition(module("counter")), bodies, {COUNTER: device()}
    )
    assert counts(states[-1]) == (6, 6)  # the trap's slot did not count
    assert states[4]["error-kind"] == "failure"


async def test_an_audit_replays_the_snapshots_of_a_wasm_process(tmp_path: Path) -> None:
    store = hbtrio.SQLiteStore(tmp_path / "audit.sqlite")
    async with hbtrio.open_engine(store, devices={COUNTER: device()}, cache_frequency=2) as e:
        pid = await e.spawn(wasm_definition(module("counter")))
        await e.schedule_many(pid, [{}, {"data": "@trap"}, {}, {"data": "@error"}, {}])
        await e.compute(pid, 5)
    await store.open()
    try:
        report = await hbtrio.testing.audit_process(store, pid, {COUNTER: device()})
    finally:
        await store.close()
    assert report.results == 6


async def test_cancelling_a_waiter_while_the_call_runs_in_its_thread() -> None:
    dev = device()
    async with hbtrio.testing.open_test_engine(devices={COUNTER: dev}) as engine:
        pid = await engine.spawn(wasm_definition(module("counter")))
        await engine.compute(pid, 0)
        await engine.schedule(pid, {"data": "@slow"})
        got: list[hbtrio.Message] = []

        async def other() -> None:
            got.append(await engine.compute(pid, 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            with trio.move_on_after(0.01) as scope:
                await engine.compute(pid, 1)
            assert scope.cancelled_caught
        assert counts(got[0]) == (1, 1)
        await engine.schedule(pid, {})
        assert counts(await engine.compute(pid, 2)) == (2, 2)
        assert dev.statistics().booted == 1  # the worker was never disturbed


async def test_processes_of_one_image_share_one_compiled_module() -> None:
    dev = device()
    async with hbtrio.testing.open_test_engine(devices={COUNTER: dev}) as engine:
        pids = [
            await engine.spawn(wasm_definition(module("counter"), name=f"p{n}")) for n in range(4)
        ]
        async with trio.open_nursery() as nursery:
            for pid in pids:
                nursery.start_soon(engine.schedule_many, pid, [{}, {}])
        for pid in pids:
            assert counts(await engine.compute(pid, 2)) == (2, 2)
    stats = dev.statistics()
    assert (stats.compiled, stats.booted, stats.images) == (1, 4, 1)


async def test_an_image_by_blob_id_comes_from_the_engines_store(tmp_path: Path) -> None:
    data = module("counter")
    path = tmp_path / "blobs.sqlite"
    async with hbtrio.testing.open_test_engine(
        hbtrio.SQLiteStore(path), devices={COUNTER: device()}
    ) as engine:
        image = await engine.put_blob(data)
        assert image == image_id(data)
        pid = await engine.spawn(wasm_definition(image))
        await engine.schedule(pid, {})
        assert counts(await engine.now(pid)) == (1, 1)
        missing = await engine.spawn(wasm_definition("M" * 43))
        await engine.schedule(missing, {})
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.now(missing)
        assert isinstance(info.value.__cause__, hbtrio.BlobNotFound)
    dev = device()
    async with hbtrio.testing.open_test_engine(
        hbtrio.SQLiteStore(path), devices={COUNTER: dev}
    ) as engine:
        await engine.schedule(pid, {})
        assert counts(await engine.now(pid)) == (2, 2)  # the image read again from the file
        # Audits and replays without an engine find the image in the store's blobs too.
        report = await hbtrio.testing.audit_process(engine.store, pid, {COUNTER: device()})
        assert report.results == 3 and report.missing_results == 0
        states = await hbtrio.testing.assert_deterministic(
            wasm_definition(image), [{}, {}], {COUNTER: device()}, blobs=engine.store
        )
        assert [counts(s) for s in states[1:]] == [(1, 1), (2, 2)]
        with pytest.raises(hbtrio.ComputeError):  # without the store: no image to boot
            await hbtrio.testing.replay(wasm_definition(image), [{}], {COUNTER: device()})
    assert dev.statistics().compiled == 1


async def test_a_device_shared_by_two_engines_finds_each_ones_blobs() -> None:
    dev = device()
    a, b = module("counter"), module("echo")
    async with (
        hbtrio.testing.open_test_engine(devices={COUNTER: dev}) as one,
        hbtrio.testing.open_test_engine(devices={COUNTER: dev}) as two,
    ):
        pa = await one.spawn(wasm_definition(await one.put_blob(a)))
        pb = await two.spawn(wasm_definition(await two.put_blob(b)))
        await one.schedule(pa, {})
        await two.schedule(pb, {})
        assert counts(await one.now(pa)) == (1, 1)
        assert (await two.now(pb))["output"]["Target"] == pb


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (None, 'needs an "image"'),
        (b"not wasm", "not a WebAssembly binary"),
        (12, 'needs an "image"'),
    ],
)
async def test_a_process_whose_image_cannot_run_fails_at_boot_in_one_line(
    image: Any, error: str
) -> None:
    async with hbtrio.testing.open_test_engine(devices={COUNTER: device()}) as engine:
        definition = wasm_definition(image)
        if image is None:
            del definition["image"]
        pid = await engine.spawn(definition)
        await engine.schedule(pid, {})
        with pytest.raises(hbtrio.ComputeError, match="boot failed at slot 0") as info:
            await engine.now(pid)
        assert error in str(info.value.__cause__)
        assert "\n" not in str(info.value.__cause__)


def hyperbeam_aos_definition(image: bytes | str, stack: list[str] | None = None) -> dict[str, Any]:
    """The keys of HyperBEAM's ``dev_process:test_aos_process`` (its scheduler's left as text)."""
    return {
        "device": "process@1.0",
        "scheduler-device": "scheduler@1.0",
        "scheduler-location": "S" * 43,
        "type": "Process",
        "test-random-seed": 42,
        "execution-device": "stack@1.0",
        "device-stack": stack or ["WASI@1.0", "JSON-Iface@1.0", "WASM-64@1.0", "Multipass@1.0"],
        "image": image,
        "output-prefix": "wasm",
        "patch-from": "/results/outbox",
        "passes": 2,
        "stack-keys": ["init", "compute", "snapshot", "normalize"],
        "scheduler": "S" * 43,
        "authority": "S" * 43,
    }


async def test_hyperbeams_aos_definition_runs_unchanged_on_the_built_in_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HBTRIO_WASM_CACHE", "off")
    async with hbtrio.testing.open_test_engine() as engine:  # the built-in devices
        pid = await engine.spawn(hyperbeam_aos_definition(module("echo")))
        await engine.schedule(pid, {"action": "Eval", "data": "return 1+1"})
        state = await engine.now(pid)
    tags = {t["name"]: t["value"] for t in state["spawns"][0]["process"]["Tags"]}
    assert tags["Execution-Device"] == "stack@1.0"
    assert json.loads(tags["Device-Stack"])[2] == "WASM-64@1.0"
    assert tags["Passes"] == "2" and tags["Type"] == "Process"


@pytest.mark.parametrize(
    "stack",
    [
        ["WASM-64@1.0"],
        ["JSON-Iface@1.0", "WASM-64@1.0", "patch@1.0"],
        ["WASM-64@1.0", "JSON-Iface@1.0"],
    ],
)
async def test_a_device_stack_hbtrio_does_not_run_is_refused_in_one_line(
    stack: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HBTRIO_WASM_CACHE", "off")
    async with hbtrio.testing.open_test_engine() as engine:
        pid = await engine.spawn(hyperbeam_aos_definition(module("echo"), stack))
        await engine.schedule(pid, {})
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.now(pid)
        assert "is not one hbtrio runs" in str(info.value.__cause__)


async def test_without_wasmtime_the_device_names_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_wasm, "builtin_devices", dict)
    async with hbtrio.testing.open_test_engine() as engine:
        with pytest.raises(hbtrio.UnknownDevice) as info:
            await engine.spawn(wasm_definition(module("counter")))
    assert str(info.value).endswith("pip install 'hbtrio[wasm]'")
    assert "\n" not in str(info.value)
