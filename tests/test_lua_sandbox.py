"""The Lua sandbox, one VM at a time and without an engine: what a script cannot reach, the
order it iterates in, its clock and random numbers, the limits that stop a call, and the
snapshot of its heap."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import hbtrio
from hbtrio._lua import LuaDevice
from hbtrio._lua._vm import LuaVM
from lua_kit import assignment, instance, run

# A script that answers with what its Code tag's Lua expression evaluates to (in pcall):
# {ok, value or error text}.
PROBE = """
function handle(msg)
  local chunk = assert(load("return " .. msg.Code, "=probe"))
  local ok, value = pcall(chunk)
  if type(value) ~= "string" and type(value) ~= "number" and type(value) ~= "boolean" then
    value = tostring(value)
  end
  return { Output = { data = { ok = ok, value = value } } }
end
"""


def probe(code: str, live: Any = None) -> dict[str, Any]:
    live = live or instance(PROBE)
    result = live.compute_sync(assignment(1, {"code": code}))
    assert "error" not in result, result
    output: dict[str, Any] = result["output"]
    return output


@pytest.mark.parametrize(
    "code",
    [
        "io",
        "os.execute",
        "os.getenv",
        "os.exit",
        "os.remove",
        "os.date",
        "require",
        "package",
        "dofile",
        "loadfile",
        "loadstring",
        "debug",
        "string.dump",
        "getmetatable('').__index.dump",
        "python",
        "_G.python",
    ],
)
def test_what_reaches_outside_is_not_there(code: str) -> None:
    assert probe(code) == {"ok": True, "value": "nil"}


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("load(string.char(27) .. 'Lua', 'x', 'b')", "only text chunks"),
        ("load(string.char(27) .. 'LuaS', 'x', 'bt')", "only text chunks"),
        ("select(2, load(string.char(27) .. 'LuaS'))", "attempt to load a binary chunk"),
        ("os.time({year = 2000, month = 1, day = 1})", "os.time(table) is not in"),
        ("setmetatable({}, {__gc = print})", "__gc and __mode"),
        ("setmetatable({}, {__mode = 'k'})", "__mode"),
        ("next({}, 'nope')", "invalid key to 'next'"),
        ("pairs({[{}] = 1})", "no fixed order"),
    ],
)
def test_refused(code: str, error: str) -> None:
    out = probe(code)
    if out["ok"]:  # load's own refusal: nil and its message
        assert error in str(out["value"]), out
    else:
        assert error in out["value"], out


def test_load_of_text_runs_in_the_sandbox() -> None:
    assert probe("load('return io')()") == {"ok": True, "value": "nil"}
    assert probe("load('return x', 'c', 't', {x = 5})()") == {"ok": True, "value": 5}


def test_host_objects_have_no_attributes() -> None:
    vm = LuaVM(max_memory=32 << 20)
    vm.runtime.globals()[b"thing"] = object()  # as if a host object had leaked in
    source = b"""function handle()
      local ok, err = pcall(function() return thing.__class__ end)
      return { Output = tostring(ok) .. ' ' .. tostring(err) }
    end"""
    vm.call("load_module", b"t", source, 0, 0, timeout=5)
    answer, _ = vm.call("handle", None, None, 0, 0, timeout=5)
    assert b"false" in answer[b"Output"] and b"no attributes" in answer[b"Output"]


def test_no_addresses_in_text() -> None:
    out = probe("tostring({}) .. ' ' .. tostring(print) .. ' ' .. string.format('%s', {})")
    assert out == {"ok": True, "value": "table function table"}
    named = "tostring(setmetatable({}, {__name = 'Account'}))"
    assert probe(named)["value"] == "Account"
    custom = "tostring(setmetatable({}, {__tostring = function() return 'me' end}))"
    assert probe(custom)["value"] == "me"


def test_clock_garbage_collector_and_random_are_the_message_s() -> None:
    live = instance(PROBE)
    a = assignment(1, {"code": "os.time()"}, timestamp=1_700_000_123_456)
    assert live.compute_sync(a)["output"]["value"] == 1_700_000_123  # the message's timestamp
    assert probe("os.clock()")["value"] == 0.0
    assert probe("collectgarbage('count')")["value"] == 0
    draws = "math.random(1000) .. ',' .. math.random(6) .. ',' .. math.random()"
    first = probe(draws)["value"]
    assert probe(draws)["value"] == first  # seeded by the process and the message
    other = instance(PROBE, owner="someone else")  # another process
    assert probe(draws, other)["value"] != first
    seeded = "(function() math.randomseed(42); return math.random(10^9) end)()"
    assert probe(seeded)["value"] == probe(seeded, other)["value"]
    assert probe("math.random(3, 3)")["value"] == 3
    assert not probe("math.random(5, 1)")["ok"]


def test_iteration_order_is_fixed_and_the_vm_s_own_is_not() -> None:
    # Without the sandbox, two VMs of this lupa iterate one table in different orders...
    from lupa import lua53

    code = "local t = {} for i = 1, 40 do t['k' .. i] = i end local o = {} " \
        "for k in next, t do o[#o + 1] = k end return table.concat(o, ',')"  # fmt: skip
    vms = [lua53.LuaRuntime() for _ in range(30)]  # alive together: each its own seed
    assert len({vm.execute(code) for vm in vms}) > 1
    # ... and pairs and next in the sandbox go in key order, on every VM.
    script = """
    function handle(msg)
      local t = {}
      for i = 1, 40 do t['k' .. i] = i end
      t[3], t[1.5], t[-2], t[true], t[false] = 'c', 'f', 'm', 'T', 'F'
      local o = {}
      for k in pairs(t) do o[#o + 1] = tostring(k) end
      local n, k = {}, nil
      repeat k = next(t, k); n[#n + 1] = tostring(k) until k == nil
      return { Output = table.concat(o, ',') .. '|' .. table.concat(n, ',') }
    end"""
    outputs = {run(instance(script), [{}])[0]["output"] for _ in range(30)}
    assert len(outputs) == 1
    order, by_next = outputs.pop().split("|")
    keys = order.split(",")
    assert keys[:3] == ["-2", "1.5", "3"] and keys[-2:] == ["false", "true"]
    assert keys[3:-2] == sorted(f"k{i}" for i in range(1, 41))
    assert by_next == order + ",nil"


def test_table_sort_is_stable() -> None:
    script = """
    function handle()
      local t = {}
      for i = 1, 300 do t[i] = { key = i % 3, id = i } end
      table.sort(t, function(a, b) return a.key < b.key end)
      local ids = {}
      for i, v in ipairs(t) do ids[i] = v.id end
      local s = { 5, 3, 9, 1 }
      table.sort(s)
      return { Output = table.concat(ids, ',', 1, 5) .. ' ' .. table.concat(s, ',') }
    end"""
    assert run(instance(script), [{}])[0]["output"] == "3,6,9,12,15 1,3,5,9"


@pytest.mark.parametrize("action", ["Spin", "Sly", "Co"])
def test_an_endless_loop_is_stopped_at_its_deadline(action: str) -> None:
    live = instance("loop", LuaDevice(call_timeout=0.2))
    started = time.monotonic()
    with pytest.raises(hbtrio.LuaTimeout, match=r"past its deadline \(0.2 s\)"):
        run(live, [{"action": action}])
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("action", ["Hog", "Sly"])
def test_a_memory_hog_fails_at_max_memory(action: str) -> None:
    live = instance("hog", LuaDevice(max_memory=16 << 20, call_timeout=20))
    with pytest.raises(hbtrio.LuaMemoryError, match=r"max_memory \(16 MiB\)"):
        run(live, [{"action": action}])


def test_close_stops_a_call_running_in_another_thread() -> None:
    live = instance("loop", LuaDevice(call_timeout=60))
    failed: list[BaseException] = []

    def spin() -> None:
        try:
            run(live, [{"action": "Sly"}])
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.1)
    live.close()  # from this thread, while the call runs in the other
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(failed[0], hbtrio.LuaError) and "closed while it ran" in str(failed[0])
    live.close()  # idempotent


def test_errors_are_one_line_with_the_module_s_name() -> None:
    live = instance("errors")
    assert run(live, [{}])[0]["output"] == 1
    with pytest.raises(hbtrio.LuaScriptError, match=r"^script:8: boom: why$"):
        run(live, [{"action": "Boom", "reason": "why"}], first=2)
    with pytest.raises(hbtrio.LuaScriptError, match=r"^table$"):
        run(live, [{"action": "Throw"}], first=3)
    with pytest.raises(hbtrio.LuaResultError, match=r"result.Output: a Lua function"):
        run(live, [{"action": "Bad"}], first=4)
    reported = run(live, [{"action": "Report", "reason": "r"}], first=5)[0]
    assert reported["error"] == "reported: r"


def test_a_module_that_fails_to_load() -> None:
    with pytest.raises(hbtrio.LuaScriptError, match=r"^script:1: .*near"):
        instance("x = = 1\n")
    with pytest.raises(hbtrio.LuaScriptError, match=r"^script:1: nope"):
        instance("error('nope')\n")
    with pytest.raises(hbtrio.LuaScriptError, match="no global function handle"):
        run(instance("x = 1\n"), [{}])


SHARED = """
local count = 0          -- an upvalue two closures share
local function bump(n) count = count + n return count end
local function peek() return count end
Api = { bump = bump, peek = peek, made = {} }
Cycle = { name = 'a' }
Cycle.self = Cycle
string.shout = function(s) return s:upper() .. '!' end
local meta = { __index = function(t, k) return 'default ' .. k end }

function handle(msg)
  if msg.Action == 'Make' then       -- a closure made by a message, over its own upvalue
    local base = tonumber(msg.Base)
    Api.made[#Api.made + 1] = function(x) base = base + x return base end
    Lookup = setmetatable({}, meta)
  end
  local out = {}
  for i, f in ipairs(Api.made) do out[i] = f(1) end
  return { Output = table.concat({ Api.bump(1), Api.peek(), table.concat(out, '+'),
    Cycle.self.self.name, ('hi'):shout(), Lookup and Lookup.x or '-', math.pi }, ' ') }
end
"""


def test_a_snapshot_keeps_upvalues_closures_cycles_and_library_changes() -> None:
    bodies = [{}, {"action": "Make", "base": "10"}, {}, {"action": "Make", "base": "100"}, {}]
    bodies += [{}, {}]
    hot = instance(SHARED)
    expected = run(hot, bodies)
    for cut in range(1, len(bodies)):
        live = instance(SHARED)
        run(live, bodies[:cut])
        data = live.snapshot_sync()
        restored = instance(SHARED, snapshot=data)
        assert restored.snapshot_sync() == data  # the same heap, the same bytes
        assert run(restored, bodies[cut:], first=cut + 1) == expected[cut:]
    assert expected[-1]["output"] == "7 7 16+104 a HI! default x 3.1415926535898"


def test_a_heap_that_cannot_be_written_is_snapshotted_as_messages_to_replay() -> None:
    script = """
    function handle(msg)
      if msg.Action == 'Co' then Held = { co = coroutine.create(print) } end
      if msg.Action == 'Iter' then Iter = string.gmatch('a b', '%a') end
      if msg.Action == 'Key' then Keyed = { [{}] = 1 } end
      if msg.Action == 'Drop' then Held, Iter, Keyed = nil, nil, nil end
      Count = (Count or 0) + 1
      return { Output = Count }
    end"""
    for action, where in [
        ("Co", "_G.Held.co: a thread cannot be snapshotted"),
        ("Iter", "_G.Iter: a function made by the host cannot be snapshotted"),
        ("Key", "_G.Keyed: a table with a table as a key cannot be snapshotted"),
    ]:
        live = instance(script)
        heap = live.snapshot_sync()  # as the engine takes at slot 0
        run(live, [{}, {"action": action}, {}])
        snapshot = live.snapshot_sync()
        assert isinstance(snapshot, dict) and where in snapshot["reason"]
        assert snapshot["lua-heap"] == heap and len(snapshot["replay"]) == 3
        again = instance(script, snapshot=hbtrio.freeze(snapshot))  # the heap, then 3 messages
        assert run(again, [{}], first=4) == run(live, [{}], first=4)
        run(again, [{"action": "Drop"}], first=5)
        assert isinstance(again.snapshot_sync(), bytes)  # a heap again: the chain is over
    with pytest.raises(hbtrio.LuaSnapshotError, match="not a snapshot"):
        instance(script, snapshot=hbtrio.freeze({"replay": 5}))


def test_a_damaged_snapshot_is_refused() -> None:
    data = instance("counter").snapshot_sync()
    for damaged in (b"nonsense", data[:-3] + b"?xx", data[:10]):
        with pytest.raises(hbtrio.LuaSnapshotError, match="damaged"):
            instance("counter", snapshot=damaged)
