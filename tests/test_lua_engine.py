"""The lua@5.3 device through the engine: hot VMs, snapshots and restores, HyperBEAM's message
form and the result form, failures recorded without wedging the process, limits, blobs, and
replays that agree byte for byte (many VMs, many processes, restarts)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio

import hbtrio
import hbtrio.testing
from hbtrio._lua import LuaDevice
from lua_kit import lua_process, source

OWNER = "owner-address"


def ledger(owner: str = OWNER, **extra: Any) -> dict[str, Any]:
    return lua_process("ledger", owner=owner, **extra)


def mint(n: int, by: str = OWNER) -> dict[str, Any]:
    return {"action": "Mint", "quantity": str(n), "owner": by}


def transfer(frm: str, to: str, n: int) -> dict[str, Any]:
    return {"action": "Transfer", "owner": frm, "recipient": to, "quantity": str(n)}


async def test_a_counter_stays_hot_and_restores_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "lua.sqlite"
    device = LuaDevice()
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"lua@5.3": device}, cache_frequency=4
    ) as engine:
        pid = await engine.spawn(lua_process("counter"))
        for slot in range(1, 11):
            await engine.schedule(pid, {"n": slot})
            state = await engine.compute(pid, slot)
            assert state["output"] == str(slot * (slot + 1) // 2)
        assert device.statistics().booted == 1  # one VM, hot from slot 0 to slot 10
    again = LuaDevice()
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={"lua@5.3": again}, cache_frequency=4
    ) as engine:
        await engine.schedule(pid, {"n": 100})
        assert (await engine.now(pid))["output"] == str(55 + 100)
        assert again.statistics() == hbtrio.LuaStats(
            booted=1, restored=1, live_instances=1, running=0
        )
        assert engine.statistics().slots_computed == 1  # restored at 10, not replayed from 0


async def test_the_ledger_s_messages_and_results() -> None:
    async with hbtrio.testing.open_test_engine() as engine:  # the built-in lua@5.3
        pid = await engine.spawn(ledger())
        await engine.schedule_many(
            pid,
            [
                mint(1000),
                transfer(OWNER, "bob", 300),
                transfer("bob", "carol", 500),  # more than bob has: an error it reports
                {"action": "Balance", "account": "bob"},
                {"action": "Balances"},
                mint(5, by="mallory"),
            ],
        )
        moved = await engine.compute(pid, 2)
        assert moved["output"] == f"{OWNER} -> bob: 300"
        assert moved["messages"] == [
            {"action": "Debit-Notice", "quantity": "300", "recipient": "bob", "target": OWNER,
             "from-process": pid, "from-module": moved["messages"][0]["from-module"]},
            {"target": "bob", "action": "Credit-Notice", "quantity": "300", "sender": OWNER,
             "from-process": pid, "from-module": moved["messages"][0]["from-module"]},
        ]  # fmt: skip
        module = moved["messages"][0]["from-module"]
        assert module == hbtrio._message.id_of_bytes(source("ledger").encode())
        assert (moved["spawns"], moved["assignments"]) == ([], [])
        refused = await engine.compute(pid, 3)
        assert refused["error"] == "insufficient balance"
        assert refused["messages"][0]["action"] == "Transfer-Error"
        assert (await engine.compute(pid, 4))["output"] == 300
        assert (await engine.compute(pid, 5))["output"] == {OWNER: 700, "bob": 300}
        assert (await engine.compute(pid, 6))["error"] == "only the owner mints"


async def test_handle_sees_hyperbeam_s_message_form() -> None:
    script = """
    function handle(msg, env)
      local tags = {}
      for i, t in ipairs(msg.Tags) do tags[i] = t.name .. '=' .. t.value end
      return { Output = { data = {
        id = msg.Id, owner = msg.Owner, from = msg.From, target = msg.Target, data = msg.Data,
        module = msg.Module, height = msg['Block-Height'], ts = msg.Timestamp,
        tags = table.concat(tags, ' '), action = msg.Action, n = msg.N,
        process = env.Process.Id, process_owner = env.Process.Owner,
        process_tags = #env.Process.Tags, process_module = env.Process.Module,
      } } }
    end"""
    async with hbtrio.testing.open_test_engine() as engine:
        definition = lua_process(script, owner="alice", name="probe")
        pid = await engine.spawn(definition)
        await engine.schedule(pid, {"Action": "Ping", "n": 5, "data": b"hello", "x-list": [1, "a"]})
        state = await engine.compute(pid, 1)
        assignment = (await engine.store.get_assignments(pid, 1, 2))[0]
        out = state["output"]
        module = hbtrio._message.id_of_bytes(definition["script"].encode())
        assert out == {
            "id": assignment["message-id"], "owner": "alice", "from": "alice", "target": pid,
            "data": "hello", "module": module, "height": 0, "ts": assignment["timestamp"],
            "tags": 'Action=Ping N=5 X-List=[1,"a"]', "action": "Ping", "n": "5",
            "process": pid, "process_owner": "alice", "process_module": module,
            "process_tags": 4,  # Device, Execution-Device, Module, Name (the script is left out)
        }  # fmt: skip


async def test_a_failing_message_is_recorded_and_the_process_goes_on() -> None:
    async with hbtrio.testing.open_test_engine(cache_frequency=3) as engine:
        pid = await engine.spawn(lua_process("errors"))
        bodies = [{}, {"action": "Boom", "reason": "bad"}, {}, {"action": "Throw"}]
        bodies += [{"action": "Bad"}, {"action": "Report", "reason": "r"}, {}]
        await engine.schedule_many(pid, bodies)
        assert (await engine.compute(pid, 1))["output"] == 1
        assert await engine.compute(pid, 2) == {
            "at-slot": 2,
            "error": "LuaScriptError: script:8: boom: bad",
            "error-kind": "failure",
        }
        assert (await engine.compute(pid, 3))["output"] == 2  # not 102: rolled back
        assert (await engine.compute(pid, 4))["error"] == "LuaScriptError: table"
        assert (await engine.compute(pid, 5))["error"].startswith("LuaResultError: result.Output")
        reported = await engine.compute(pid, 6)
        assert reported["error"] == "reported: r" and "error-kind" not in reported
        assert (await engine.compute(pid, 7))["output"] == 1003  # the reported one kept its +1000
        report = await hbtrio.testing.audit_process(engine.store, pid)
        assert report.results == 8


async def test_on_failure_stop_keeps_a_lua_error_an_error() -> None:
    async with hbtrio.testing.open_test_engine() as engine:
        pid = await engine.spawn(lua_process("errors", **{"on-failure": "stop"}))
        await engine.schedule_many(pid, [{}, {"action": "Boom"}, {}])
        with pytest.raises(hbtrio.ComputeError) as info:
            await engine.compute(pid, 3)
        assert info.value.attempted_slot == 2
        assert isinstance(info.value.__cause__, hbtrio.LuaScriptError)


@pytest.mark.parametrize("action", ["Spin", "Sly", "Co"])
async def test_an_endless_loop_is_a_recorded_timeout_and_its_thread_stops(action: str) -> None:
    device = LuaDevice()
    async with hbtrio.testing.open_test_engine(
        devices={"lua@5.3": device}, slot_timeout=0.3
    ) as engine:
        assert device.timeout == 0.3  # the engine's slot_timeout, from attach
        pid = await engine.spawn(lua_process("loop"))
        await engine.schedule_many(pid, [{}, {"action": action}, {}])
        failed = await engine.compute(pid, 2)
        assert failed["error-kind"] == "timeout"
        assert (await engine.compute(pid, 3))["output"] == 2
        for _ in range(500):  # the abandoned call stopped itself, in its thread
            if device.statistics().running == 0:
                break
            await trio.sleep(0.01)
        assert device.statistics().running == 0
        assert device.statistics().live_instances == 1  # the failed VM was closed


async def test_a_memory_hog_is_a_recorded_failure() -> None:
    device = LuaDevice(max_memory=16 << 20)
    async with hbtrio.testing.open_test_engine(
        devices={"lua@5.3": device}, slot_timeout=20
    ) as engine:
        pid = await engine.spawn(lua_process("hog"))
        await engine.schedule_many(pid, [{}, {"action": "Hog"}, {"action": "Sly"}, {}])
        failed = await engine.compute(pid, 2)
        assert failed["error"] == "LuaMemoryError: the Lua VM ran out of its max_memory (16 MiB)"
        assert (await engine.compute(pid, 3))["error-kind"] == "failure"  # pcall cannot catch it
        assert (await engine.compute(pid, 4))["output"] == 2


async def test_cancelling_a_waiter_while_its_lua_call_runs() -> None:
    device = LuaDevice()
    async with hbtrio.testing.open_test_engine(devices={"lua@5.3": device}) as engine:
        pid = await engine.spawn(lua_process("loop"))
        await engine.schedule_many(pid, [{}, {"action": "Slow", "steps": "3000000"}, {}])
        assert (await engine.compute(pid, 1))["output"] == 1
        with trio.move_on_after(0.02) as scope:
            await engine.compute(pid, 2)  # the call runs in its thread; the waiter goes away
        assert scope.cancelled_caught
        assert (await engine.compute(pid, 3))["output"] == 3  # the call went on, and counted
        assert (await engine.compute(pid, 2))["output"] == sum(i % 7 for i in range(1, 3000001))
        assert device.statistics().booted == 1  # nothing was thrown away


async def test_modules_by_blob_id_and_as_module_messages() -> None:
    lib = "Greeting = 'hello'\nfunction greet(who) return Greeting .. ', ' .. who end\n"
    main = "function handle(msg) return { Output = greet(msg.From) } end\n"
    async with hbtrio.testing.open_test_engine() as engine:
        ids = [await engine.put_blob(lib.encode()), await engine.put_blob(main.encode())]
        by_id = await engine.spawn(lua_process(None, module=ids, owner="ann"))
        by_msg = await engine.spawn(
            lua_process(
                None, owner="ann",
                module=[{"content-type": "application/lua", "body": lib, "name": "lib"},
                        {"body": main.encode()}],
            )
        )  # fmt: skip
        mixed = await engine.spawn(lua_process(main, module=ids[0], owner="ann"))
        for pid in (by_id, by_msg, mixed):
            await engine.schedule(pid, {})
            assert (await engine.compute(pid, 1))["output"] == "hello, ann"
        missing = await engine.spawn(lua_process(None, module=["A" * 43]))
        nothing = await engine.spawn(lua_process(None))
        for pid, why in [(missing, "no such blob"), (nothing, "needs its code")]:
            await engine.schedule(pid, {})
            with pytest.raises(hbtrio.ComputeError) as info:
                await engine.compute(pid, 1)
            assert isinstance(info.value.__cause__, hbtrio.LuaModuleError)
            assert why in str(info.value.__cause__)


async def test_without_lupa_the_device_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hbtrio._lua, "builtin_devices", dict)
    async with hbtrio.testing.open_test_engine() as engine:
        with pytest.raises(hbtrio.UnknownDevice, match=r"pip install 'hbtrio\[lua\]'"):
            await engine.spawn(lua_process("counter"))


# determinism --------------------------------------------------------------------------------


def ledger_traffic(seed: int, n: int) -> list[dict[str, Any]]:
    """Mints, transfers among a dozen accounts, raffles and queries, drawn from ``seed``."""
    rng = random.Random(seed)
    people = [OWNER] + [f"acct-{i:02}" for i in range(12)]
    bodies: list[dict[str, Any]] = [mint(10_000)]
    for _ in range(n - 1):
        kind = rng.random()
        if kind < 0.6:
            a, b = rng.sample(people, 2)
            bodies.append(transfer(a, b, rng.randint(1, 3000)))
        elif kind < 0.75:
            bodies.append({"action": "Raffle"})
        else:
            bodies.append({"action": rng.choice(["Holders", "Balances", "Supply", "Mint"])})
    return bodies


async def test_replays_agree_byte_for_byte() -> None:
    bodies = ledger_traffic(1, 60)
    states = await hbtrio.testing.assert_deterministic(ledger(), bodies, runs=3)
    holders = [
        s["output"] for s in states[1:] if isinstance(s.get("output"), str) and "," in s["output"]
    ]
    assert holders  # pairs over the balances, in a fixed order on every VM
    assert any(s["messages"] and s["messages"][0].get("action") == "Won" for s in states[1:])


async def test_many_processes_on_many_vms_hot_and_restored_agree(tmp_path: Path) -> None:
    """Eight processes computed hot in one engine, and again in engines that snapshot every
    few slots and are stopped, restarted and evicted at random: the same results, the same
    bytes, and audits that replay every stored snapshot."""
    processes = [(ledger(owner=OWNER, nonce=i), ledger_traffic(100 + i, 40)) for i in range(8)]
    hot: dict[str, list[bytes]] = {}
    async with hbtrio.testing.open_test_engine(cache_frequency=1000) as engine:
        for definition, bodies in processes:
            pid = await engine.spawn(definition)
            await engine.schedule_many(pid, bodies)
            await engine.compute(pid, len(bodies))
            hot[pid] = [hbtrio.encode(await engine.compute(pid, s)) for s in range(len(bodies) + 1)]
    rng = random.Random(7)
    path = tmp_path / "many.sqlite"
    for round_ in range(3):
        async with hbtrio.open_engine(
            hbtrio.SQLiteStore(path), devices={"lua@5.3": LuaDevice()}, cache_frequency=3
        ) as engine:
            for definition, bodies in processes:
                pid = await engine.spawn(definition)
                if round_ == 0:
                    await engine.schedule_many(pid, bodies)
                for slot in sorted(rng.sample(range(1, len(bodies) + 1), 4)):
                    await engine.compute(pid, slot)
                    if rng.random() < 0.5:
                        await engine.stop(pid)  # the next request restores a snapshot
            if round_ == 2:
                for pid, expected in hot.items():
                    got = [
                        hbtrio.encode(await engine.compute(pid, s)) for s in range(len(expected))
                    ]
                    assert got == expected
                    report = await hbtrio.testing.audit_process(engine.store, pid)
                    assert report.snapshots > 1 and report.missing_results == 0


async def test_a_process_holding_a_coroutine_snapshots_as_replay_and_restores(
    tmp_path: Path,
) -> None:
    script = """
    -- a generator kept across messages: a coroutine, which no heap snapshot can hold
    function handle(msg)
      if msg.Action == 'Start' then
        Gen = coroutine.wrap(function()
          local i = 0
          while true do i = i + 1 coroutine.yield(i) end
        end)
      elseif msg.Action == 'Stop' then
        Gen = nil
      end
      return { Output = Gen and Gen() or 0 }
    end"""
    path = tmp_path / "co.sqlite"
    bodies = [{}, {"action": "Start"}, {}, {}, {"action": "Stop"}, {}, {"action": "Start"}, {}]
    expected = [0, 1, 2, 3, 0, 0, 1, 2]
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path), cache_frequency=2) as engine:
        pid = await engine.spawn(lua_process(script))
        await engine.schedule_many(pid, bodies)
        for slot in range(1, 5):
            assert (await engine.compute(pid, slot))["output"] == expected[slot - 1]
            await engine.stop(pid)  # every next slot boots from a snapshot
        found = await engine.store.latest_snapshot(pid, 4)
        assert found is not None and found[0] == 4 and len(found[1]["replay"]) == 3
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path), cache_frequency=2) as engine:
        got = [(await engine.compute(pid, s))["output"] for s in range(1, len(bodies) + 1)]
        assert got == expected
        found = await engine.store.latest_snapshot(pid, 6)
        assert found is not None and "hbtrio/bytes" in found[1]  # no coroutine: a heap again
        report = await hbtrio.testing.audit_process(engine.store, pid)
        assert report.missing_results == 0
