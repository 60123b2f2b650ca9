"""The WASM device's layers without the engine: images, instances, the JSON interface.

The modules are the project's own (tests/wasm/*.wat, see wasm_kit); nothing
here needs a real aos module.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import hbtrio
from hbtrio._aoiface import header_case
from hbtrio._wasm import _exnref, _instance
from hbtrio._wasm._iface import Process, message_json, parse_result
from hbtrio._wasm._images import ImageCache
from hbtrio._wasm._instance import MAX_OUTPUT, WasmInstance
from hbtrio._wasm._runtime import config_key, make_engine
from wasm_kit import device, image_id, legacy_eh_module, module, wasmtime

PID = "P" * 43


def instance(name: str = "counter", **options: Any) -> WasmInstance:
    dev = device(call_timeout=options.pop("timeout", 5.0))
    rt = dev.runtime()
    data = module(name) if isinstance(name, str) and not name.startswith("(") else name
    image = rt.images.load(image_id(data), data)
    options.setdefault("max_memory", 64 << 20)
    return WasmInstance(image, rt.engine, rt.ticker, timeout=dev.timeout, **options)


def call(inst: WasmInstance, data: str = "", **tags: str) -> dict[str, Any]:
    msg = json.dumps({"Data": data, "Tags": [{"name": k, "value": v} for k, v in tags.items()]})
    return parse_result(inst.handle(msg.encode(), b"{}"), Process(PID, "IMG", "", b"{}"))


def inline(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


#: A minimal JSON-interface module around ``body`` (the handle function's instructions).
def abi(body: str, imports: str = "", extra: str = "") -> bytes:
    answer = '{\\"ok\\":true,\\"response\\":{\\"Output\\":{\\"data\\":\\"\\"}}}\\00'
    return inline(f"""(module {imports}
      (memory (export "memory") i64 1)
      (data (i64.const 0x100) "{answer}")
      (global $top (mut i64) (i64.const 0x1000))
      (func (export "malloc") (param $n i64) (result i64)
        (global.get $top)
        (global.set $top (i64.add (global.get $top) (local.get $n))))
      (func (export "handle") (param i64 i64) (result i64) {body} (i64.const 0x100))
      {extra})""")


# state and memory -------------------------------------------------------------------------------


def test_the_counter_keeps_its_state_in_memory_between_calls() -> None:
    inst = instance()
    outputs = [call(inst)["output"] for _ in range(3)]
    assert outputs == [{"count": n, "calls": n} for n in (1, 2, 3)]
    assert call(inst, "@error") == {
        "output": "",
        "messages": [],
        "spawns": [],
        "assignments": [],
        "error": "error on purpose",
    }
    assert call(inst, "@fail")["error"] == "failed on purpose"
    assert call(inst)["output"] == {"count": 6, "calls": 6}  # reported errors keep the memory


def test_a_snapshot_restores_into_a_fresh_instance_bit_for_bit() -> None:
    hot = instance()
    for _ in range(5):
        call(hot)
    snap = hot.snapshot()
    assert snap["format"] == "wasm-memory@1" and snap["codec"] == "zstd"
    assert snap["size"] == hot.memory_size and len(snap["memory"]) < snap["size"] // 10
    assert snap["globals"] == {"calls": 5}
    assert snap["stack-pointer"] == 0x8000
    cold = instance()
    cold.restore(snap)
    assert call(cold) == call(hot)
    a, b = hot.snapshot(), cold.snapshot()
    assert a == b  # memory, globals and stack pointer alike


def test_instances_snapshot_and_restore_in_parallel_threads() -> None:
    """Regression: a zstd compressor shared by threads crashed the process (SIGSEGV)."""
    instances = [instance() for _ in range(4)]
    for inst in instances:
        call(inst, "z" * 2_000_000)  # megabytes of memory to compress
    errors: list[BaseException] = []

    def work(inst: WasmInstance) -> None:
        try:
            for _ in range(10):
                snap = inst.snapshot()
                instance().restore(snap)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(inst,)) for inst in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_restore_grows_a_fresh_instance_first_and_respects_its_limit() -> None:
    hot = instance()
    call(hot, "x" * 300_000)  # the message is never freed: memory grows
    snap = hot.snapshot()
    assert snap["size"] > 2 * 65536
    cold = instance()
    cold.restore(snap)
    assert cold.memory_size == snap["size"]
    with pytest.raises(hbtrio.WasmError, match="over this instance's limit"):
        instance(max_memory=256 << 10).restore(snap)
    with pytest.raises(hbtrio.WasmError, match="not of"):
        instance("echo").restore(snap)


def test_memory_grows_with_every_message_as_on_hyperbeam() -> None:
    inst = instance()
    before = inst.memory_size
    for _ in range(40):
        call(inst, "y" * 10_000)
    assert inst.memory_size >= 0x10000 + 40 * 10_000 > before  # the heap starts at 0x10000


# failures ---------------------------------------------------------------------------------------


def test_a_trap_is_one_line_and_breaks_the_instance() -> None:
    inst = instance()
    call(inst)
    with pytest.raises(hbtrio.WasmTrap) as info:
        call(inst, "@trap")
    line = str(info.value)
    assert "\n" not in line and "unreachable" in line
    assert inst.broken == line
    with pytest.raises(hbtrio.WasmError, match="broken since a call failed"):
        call(inst)


def test_an_endless_loop_is_interrupted_at_its_deadline() -> None:
    inst = instance(timeout=0.3)
    start = time.monotonic()
    with pytest.raises(hbtrio.WasmTimeout, match=r"wasm call exceeded 0.3 s") as info:
        call(inst, "@loop")
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 2.0
    assert isinstance(info.value, trio.TooSlowError)
    assert inst.broken is not None


def test_fuel_stops_an_endless_loop_at_the_same_point_every_time() -> None:
    dev = device(fuel=100_000)
    rt = dev.runtime()
    image = rt.images.load(image_id(module("counter")), module("counter"))
    for _ in range(2):
        inst = WasmInstance(image, rt.engine, rt.ticker, max_memory=1 << 24, timeout=5, fuel=10**6)
        assert call(inst)["output"] == {"count": 1, "calls": 1}
        with pytest.raises(hbtrio.WasmTrap, match=r"ran out of fuel \(1000000 units\)"):
            call(inst, "@loop")


def test_a_memory_hog_meets_the_limit_and_the_module_sees_out_of_memory() -> None:
    inst = instance(max_memory=4 << 20)
    assert call(inst, "@hog")["error"] == "out of memory"
    assert inst.memory_size <= 4 << 20
    assert call(inst)["output"]["count"] == 2  # still usable: the module handled it


def test_an_image_larger_than_the_limit_is_refused() -> None:
    big = abi("")
    with pytest.raises(hbtrio.WasmImageError, match="over the limit"):
        instance(big, max_memory=1024)


def test_close_is_idempotent_and_refuses_later_calls() -> None:
    inst = instance()
    inst.close()
    inst.close()
    with pytest.raises(hbtrio.WasmError, match="closed"):
        call(inst)


def test_a_module_breaking_the_interface_fails_the_call() -> None:
    bad_pointer = inline("""(module (memory (export "memory") i64 1)
      (func (export "malloc") (param i64) (result i64) (i64.const 0x100))
      (func (export "handle") (param i64 i64) (result i64) (i64.const 999999999)))""")
    with pytest.raises(hbtrio.WasmInterfaceError, match="not a pointer into memory"):
        call(instance(bad_pointer))
    no_malloc = inline("""(module (memory (export "memory") i64 1)
      (func (export "malloc") (param i64) (result i64) (i64.const 0))
      (func (export "handle") (param i64 i64) (result i64) (i64.const 0)))""")
    with pytest.raises(hbtrio.WasmInterfaceError, match="out of memory"):
        call(instance(no_malloc))
    no_nul = inline("""(module (memory (export "memory") i64 1)
      (data (i64.const 0) "\\01")
      (func (export "malloc") (param i64) (result i64) (i64.const 0x100))
      (func (export "handle") (param i64 i64) (result i64)
        (memory.fill (i64.const 0x1000) (i32.const 65) (i64.const 0xf000)) (i64.const 0x1000)))""")
    with pytest.raises(hbtrio.WasmInterfaceError, match="no NUL"):
        call(instance(no_nul))


# imports ----------------------------------------------------------------------------------------


def test_imports_are_stubs_but_output_and_the_clock() -> None:
    imports = """
      (import "wasi_snapshot_preview1" "clock_time_get"
        (func $clock (param i32 i64 i64) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i64 i64 i64) (result i32)))
      (import "env" "anything" (func $anything (param i64) (result f64)))
      (import "env" "nothing" (func $nothing (param i32)))"""
    body = """
      (i64.store (i64.const 0x200) (i64.const 77))
      (i64.store (i64.const 0x208) (i64.const 55))
      (if (i32.ne (call $clock (i32.const 0) (i64.const 0) (i64.const 0x200)) (i32.const 1))
        (then unreachable))
      (if (i64.ne (i64.load (i64.const 0x200)) (i64.const 77)) (then unreachable))
      (if (i32.ne (call $read (i32.const 0) (i64.const 0x300) (i64.const 1) (i64.const 0x208))
                  (i32.const 0)) (then unreachable))
      (if (i64.ne (i64.load (i64.const 0x208)) (i64.const 0)) (then unreachable))
      (if (f64.ne (call $anything (i64.const 1)) (f64.const 0)) (then unreachable))
      (call $nothing (i32.const 3))"""
    assert call(instance(abi(body, imports)))["output"] == ""


def test_fd_write_is_captured_per_call_and_bounded() -> None:
    inst = instance()
    call(inst, "@print")
    assert bytes(inst.stdout) == b"hello from fd_write\n"
    call(inst)
    assert bytes(inst.stdout) == b""
    flood = abi(
        """(i64.store (i64.const 0x300) (i64.const 0))
        (i64.store (i64.const 0x308) (i64.const 60000))
        (drop (call $w (i32.const 2) (i64.const 0x300) (i64.const 1) (i64.const 0x310)))
        (if (i64.ne (i64.load (i64.const 0x310)) (i64.const 60000)) (then unreachable))""",
        '(import "wasi_snapshot_preview1" "fd_write"'
        " (func $w (param i32 i64 i64 i64) (result i32)))",
    )
    inst = instance(flood)
    call(inst)
    assert len(inst.stderr) == 60000 and not inst.stdout
    assert MAX_OUTPUT >= 60000


def test_proc_exit_ends_the_call() -> None:
    exits = abi(
        "(call $exit (i32.const 3))",
        '(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))',
    )
    with pytest.raises(hbtrio.WasmTrap, match=r"proc_exit\(3\)"):
        call(instance(exits))


def test_the_checked_call_gives_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = [call(inst)["output"] for inst in [instance()] for _ in range(2)]
    monkeypatch.setattr(_instance, "_call", _instance._checked_call)
    slow = [call(inst)["output"] for inst in [instance()] for _ in range(2)]
    assert fast == slow


# images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wat", "error"),
    [
        ('(module (func (export "handle")))', "exports no memory named 'memory'"),
        ('(module (memory (export "memory") 1))', "32-bit memory"),
        ('(module (memory (export "memory") i64 1))', "exports no function 'malloc'"),
        (
            """(module (memory (export "memory") i64 1)
               (func (export "malloc") (param i64) (result i64) (i64.const 0))
               (func (export "handle") (param i32 i32) (result i32) (i32.const 0)))""",
            r"handle is \(i32, i32\) -> \(i32\), not \(i64, i64\) -> \(i64\)",
        ),
        (
            """(module (import "env" "memory" (memory i64 1))
               (memory (export "memory") i64 1)
               (func (export "malloc") (param i64) (result i64) (i64.const 0))
               (func (export "handle") (param i64 i64) (result i64) (i64.const 0)))""",
            r"imports a memory \(env.memory\)",
        ),
    ],
)
def test_images_that_are_not_the_json_interface_are_refused_in_one_line(
    wat: str, error: str
) -> None:
    rt = device().runtime()
    data = inline(wat)
    with pytest.raises(hbtrio.WasmImageError, match=error) as info:
        rt.images.load(image_id(data), data)
    assert "\n" not in str(info.value) and image_id(data) in str(info.value)


def test_bytes_that_are_not_wasm_or_do_not_compile_are_refused() -> None:
    rt = device().runtime()
    with pytest.raises(hbtrio.WasmImageError, match="not a WebAssembly binary"):
        rt.images.load("x", b"(module)")
    broken = module("counter")[:200]
    with pytest.raises(hbtrio.WasmImageError, match="does not compile") as info:
        rt.images.load("y", broken)
    assert "\n" not in str(info.value)


def test_an_image_is_compiled_once_per_device_and_once_per_cache_dir(tmp_path: Path) -> None:
    data = module("counter")
    dev = device(cache_dir=tmp_path)
    rt = dev.runtime()
    first = rt.images.load(image_id(data), data)
    assert rt.images.load(image_id(data), data) is first
    assert rt.images.get(image_id(data)) is first
    assert dev.statistics().compiled == 1
    assert list((tmp_path / "modules").iterdir())
    again = device(cache_dir=tmp_path)
    again.runtime().images.load(image_id(data), data)
    assert (again.statistics().compiled, again.statistics().deserialized) == (0, 1)
    # A damaged file is compiled again (and replaced).
    for f in (tmp_path / "modules").iterdir():
        f.write_bytes(b"garbage")
    third = device(cache_dir=tmp_path)
    third.runtime().images.load(image_id(data), data)
    assert third.statistics().compiled == 1


def test_the_cache_key_names_the_wasmtime_version_and_the_fuel_setting() -> None:
    assert config_key(fuel=False) != config_key(fuel=True)
    assert wasmtime.__name__ in config_key(fuel=False)


def test_the_in_memory_cache_is_bounded() -> None:
    engine = make_engine(fuel=False)
    cache = ImageCache(engine, "k", None, max_images=1)
    a, b = module("counter"), module("echo")
    cache.load("a", a)
    cache.load("b", b)
    assert cache.get("a") is None and cache.get("b") is not None


# legacy exception handling ----------------------------------------------------------------------


def test_legacy_exception_handling_is_refused_in_one_line_without_wasm_opt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HBTRIO_WASM_OPT", "off")
    data = legacy_eh_module()
    rt = device().runtime()
    with pytest.raises(hbtrio.WasmImageError) as info:
        rt.images.load(image_id(data), data)
    line = str(info.value)
    assert "\n" not in line
    assert "legacy WASM exception handling" in line
    assert "wasm-opt --translate-to-exnref --enable-exception-handling --enable-memory64" in line


def test_a_wasm_opt_without_the_pass_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = tmp_path / "wasm-opt"
    old.write_text("#!/bin/sh\necho 'wasm-opt version 108'\n")
    old.chmod(0o755)
    monkeypatch.setenv("HBTRIO_WASM_OPT", str(old))
    assert _exnref.find_wasm_opt() is None


def test_the_unpatched_module_runs_and_answers_caught_0() -> None:
    inst = instance("eh")
    assert call(inst)["output"] == "caught 0"


needs_wasm_opt = pytest.mark.skipif(
    _exnref.find_wasm_opt() is None,
    reason="no wasm-opt with --translate-to-exnref (npm install -g binaryen, or HBTRIO_WASM_OPT)",
)


@needs_wasm_opt
def test_legacy_exception_handling_is_translated_and_the_translation_cached(
    tmp_path: Path,
) -> None:
    data = legacy_eh_module()
    dev = device(cache_dir=tmp_path)
    image = dev.runtime().images.load(image_id(data), data)
    assert image.translated and dev.statistics().translated == 1
    rt = dev.runtime()
    inst = WasmInstance(image, rt.engine, rt.ticker, max_memory=1 << 24, timeout=5)
    assert call(inst)["output"] == "caught 1"
    assert (tmp_path / "exnref" / f"{image_id(data)}.wasm").is_file()
    # Another device with the same cache_dir neither translates nor compiles.
    again = device(cache_dir=tmp_path)
    again.runtime().images.load(image_id(data), data)
    assert (again.statistics().translated, again.statistics().compiled) == (0, 0)


# the JSON interface -----------------------------------------------------------------------------


def test_header_case() -> None:
    assert header_case("data-protocol") == "Data-Protocol"
    assert header_case("Action") == "Action"
    assert header_case("x--y") == "X-Y"
    assert header_case("block-HEIGHT") == "Block-Height"


def test_the_message_and_environment_documents() -> None:
    process = Process.of(
        {"device": "process@1.0", "owner": "alice", "image": b"\0asm", "Type": "Process"},
        PID,
        "IMG",
    )
    env = json.loads(process.env)["Process"]
    assert env["Id"] == PID and env["Owner"] == "alice" and env["From"] == "alice"
    assert env["Tags"] == [
        {"name": "Device", "value": "process@1.0"},
        {"name": "Image", "value": "IMG"},
        {"name": "Type", "value": "Process"},
    ]
    assignment = {
        "message-id": "M" * 43,
        "timestamp": 1700000000000,
        "body": {
            "Action": "Eval",
            "data": b"return 1",
            "n": 3,
            "flag": True,
            "nested": {"a": [1, b"\xff"]},
            "block-height": 7,
        },
    }
    msg = json.loads(message_json(assignment, process))
    assert msg["Id"] == "M" * 43
    assert (msg["Owner"], msg["From"], msg["Target"]) == ("alice", "alice", PID)
    assert msg["Data"] == "return 1"
    assert (msg["Module"], msg["Block-Height"], msg["Timestamp"]) == ("IMG", 7, 1700000000000)
    assert msg["Tags"] == [
        {"name": "Action", "value": "Eval"},
        {"name": "Block-Height", "value": "7"},
        {"name": "Flag", "value": "true"},
        {"name": "N", "value": "3"},
        {"name": "Nested", "value": '{"a":[1,{"/bytes":"/w=="}]}'},
    ]
    stranger = json.loads(message_json({**assignment, "body": {"owner": "bob"}}, process))
    assert (stranger["Owner"], stranger["From"]) == ("bob", "bob")
    with pytest.raises(hbtrio.WasmInterfaceError, match="not UTF-8"):
        message_json({**assignment, "body": {"data": b"\xff"}}, process)


def test_results_become_messages() -> None:
    process = Process(PID, "IMG", "", b"{}")
    raw = json.dumps(
        {
            "ok": True,
            "response": {
                "Output": {"data": {"deep": [2**70, 1.5, None, True]}, "prompt": "> "},
                "Messages": [
                    {
                        "Target": "T",
                        "Data": "pong",
                        "Tags": [
                            {"name": "Action", "value": "Pong"},
                            {"name": "Data", "value": "x"},
                        ],
                    }
                ],
                "Spawns": [{"Data": "child"}],
                "Assignments": [{"Processes": ["a"], "Message": "m"}],
                "Error": "",
            },
        }
    ).encode()
    result = parse_result(raw, process)
    assert result == {
        "output": {"deep": [float(2**70), 1.5, None, True]},
        "messages": [
            {"target": "T", "data": "x", "action": "Pong", "from-process": PID, "from-image": "IMG"}
        ],
        "spawns": [{"data": "child", "from-process": PID, "from-image": "IMG"}],
        "assignments": [{"Processes": ["a"], "Message": "m"}],
    }
    hbtrio.freeze(result)  # a valid message
    assert parse_result(b'{"ok":true,"response":{"Output":"plain"}}', process)["output"] == "plain"
    assert parse_result(b'{"ok":false,"response":{"x":1}}', process)["error"] == '{"x": 1}'


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json", "invalid JSON"),
        (b'{"ok": NaN}', "invalid JSON"),
        (b"[1]", 'without an "ok" key'),
        (b'{"ok": true}', 'without a "response" object'),
        (b'{"ok": true, "response": {"Messages": 3}}', "Messages is a int"),
        (b'{"ok": true, "response": {"Output": ' + b"[" * 200 + b"]" * 200 + b"}}", "deeper"),
    ],
)
def test_results_that_are_not_the_form_fail(raw: bytes, error: str) -> None:
    with pytest.raises(hbtrio.WasmInterfaceError, match=error):
        parse_result(raw, Process(PID, "IMG", "", b"{}"))
