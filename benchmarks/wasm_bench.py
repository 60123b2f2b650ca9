"""WASM processes on hbtrio: engine overhead, cold restore, memory per worker, parallel calls.

Run::

    python benchmarks/wasm_bench.py                 # full sizes (about a minute)
    python benchmarks/wasm_bench.py --quick         # small sizes (seconds; the tests run it)
    HBTRIO_AOS_WASM=/path/to/aos.wasm python benchmarks/wasm_bench.py   # aos figures too
    python benchmarks/wasm_bench.py --json /tmp/wasm.json

The module is the project's own (``benchmarks/wasm/bench.wat``): the JSON
interface over memory64, a counter in memory, and a spin loop whose length is
written into the text before compiling. ``spin 0`` costs only the interface;
the ``work`` variant is calibrated at start to about 0.6 ms a call, what an
aos ``Eval`` of ``return 1+1`` costs. Every figure is measured in this run:

* ``hot``: slots per second of one process catching up N scheduled slots on a
  hot instance (``MemoryStore``, a snapshot every 100 slots), against the same
  module called the same way (malloc twice, the two JSON documents written,
  ``handle``, the NUL-terminated result read and parsed) by a bare wasmtime-py
  loop and by hbtrio's instance layer alone (``WasmInstance``, no engine):
  the ratios are the engine's overhead;
* ``cold``: after a restart on SQLite (a new engine and device; the compiled
  module read from the on-disk cache), the time from opening the engine to the
  answer for the next slot (a restore from the snapshot at the last slot and
  one slot), against a hot request for the next slot;
* ``memory``: resident memory per live WASM worker (``VmRSS`` growth over N
  processes booted and computed to slot 1, divided by N);
* ``parallel``: N processes catching up at once against one, in slots per
  second: calls run in threads and release the GIL, so on a machine with C
  cores up to min(N, C) times one;
* ``codecs``: zlib and zstd on an instance's memory (aos's, when given).

Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO / "src"))

import wasmtime  # noqa: E402
import zstandard  # noqa: E402

import hbtrio  # noqa: E402
from hbtrio._wasm._iface import Process, message_json, parse_result  # noqa: E402
from hbtrio._wasm._images import image_id  # noqa: E402
from hbtrio._wasm._instance import WasmInstance  # noqa: E402
from hbtrio._wasm._runtime import make_engine  # noqa: E402

WAT = REPO / "benchmarks" / "wasm" / "bench.wat"
DEVICE = "wasm-64@1.0"
BODY = {"action": "Tick", "data": "x"}


def bench_module(spin: int) -> bytes:
    text = WAT.read_text().replace("(i64.const 0))\n", f"(i64.const {spin}))\n", 1)
    return bytes(wasmtime.wat2wasm(text))


def definition(image: bytes | str, **extra: Any) -> dict[str, Any]:
    return {"device": "process@1.0", "execution-device": DEVICE, "image": image, **extra}


EVAL = {"action": "Eval", "data": "return 1+1"}


def documents(image: bytes, body: dict[str, Any] = BODY) -> tuple[bytes, bytes, Process]:
    """The message and environment documents hbtrio writes for ``body`` (for the bare loops)."""
    pid = hbtrio.message_id(definition(image))
    process = Process.of(definition(image), pid, image_id(image))
    assignment = {"message-id": "M" * 43, "timestamp": 1_700_000_000_000, "body": body}
    return message_json(assignment, process), process.env, process


def rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# bare loops -----------------------------------------------------------------------------------


def bare_loop(
    image: bytes, n: int, *, same_config: bool = True, body: dict[str, Any] = BODY
) -> float:
    """Seconds for ``n`` calls by plain wasmtime-py (the public API), as a user would write it.

    With ``same_config`` the engine is configured as hbtrio's (epoch interruption,
    NaN canonicalization), else with only what the module needs.
    """
    message, env, _ = documents(image, body)
    if same_config:
        engine = make_engine(fuel=False)
    else:
        config = wasmtime.Config()
        config.wasm_memory64 = True
        config.wasm_exceptions = True
        engine = wasmtime.Engine(config)
    try:
        compiled = wasmtime.Module(engine, image)
    except wasmtime.WasmtimeError:  # legacy exception handling: take hbtrio's translation
        images = hbtrio.WasmDevice(cache_dir=None).runtime().images
        images.load(image_id(image), image)
        compiled = wasmtime.Module(engine, images._translated(image_id(image), image))
    store = wasmtime.Store(engine)
    if same_config:
        store.set_epoch_deadline(2**62)
    imports = []
    for imp in compiled.imports:
        ft = imp.type
        result = (1 if imp.name == "clock_time_get" else 0) if ft.results else None
        imports.append(wasmtime.Func(store, ft, (lambda r: lambda *a: r)(result)))
    instance = wasmtime.Instance(store, compiled, imports)
    ex = instance.exports(store)
    memory, malloc, handle = ex["memory"], ex["malloc"], ex["handle"]

    def put(data: bytes) -> int:
        ptr = malloc(store, len(data) + 1)
        memory.write(store, data + b"\0", ptr)
        return ptr

    def one() -> None:
        ptr = handle(store, put(message), put(env))
        chunk = memory.read(store, ptr, ptr + 4096)
        end = chunk.find(0)
        while end < 0:
            chunk += memory.read(store, ptr + len(chunk), ptr + len(chunk) + 4096)
            end = chunk.find(0)
        json.loads(bytes(chunk[:end]))

    one()
    return timed(lambda: [one() for _ in range(n)])


async def threaded_instance_layer(
    image: bytes, n: int, body: dict[str, Any] = BODY, per_hop: int = 1
) -> float:
    """`instance_layer` with ``per_hop`` calls per thread hop (trio.to_thread), no engine."""
    _, instance = instance_layer(image, 0, body)
    _, _, process = documents(image, body)
    assignment = {"message-id": "M" * 43, "timestamp": 1_700_000_000_000, "body": body}

    def one() -> None:
        parse_result(instance.handle(message_json(assignment, process), process.env), process)

    def some() -> None:
        for _ in range(per_hop):
            one()

    gc.collect()
    start = time.perf_counter()
    for _ in range(n // per_hop):
        await trio.to_thread.run_sync(some)
    return time.perf_counter() - start


def instance_layer(image: bytes, n: int, body: dict[str, Any] = BODY) -> tuple[float, WasmInstance]:
    """Seconds for ``n`` calls through hbtrio's instance layer alone (one thread, no engine)."""
    device = hbtrio.WasmDevice(cache_dir=None)
    rt = device.runtime()
    loaded = rt.images.load(image_id(image), image)
    instance = WasmInstance(loaded, rt.engine, rt.ticker, max_memory=1 << 30, timeout=60)
    _, _, process = documents(image, body)
    assignment = {"message-id": "M" * 43, "timestamp": 1_700_000_000_000, "body": body}

    def one() -> None:
        parse_result(instance.handle(message_json(assignment, process), process.env), process)

    one()
    return timed(lambda: [one() for _ in range(n)]), instance


# through the engine ---------------------------------------------------------------------------


async def engine_catchup(
    image: bytes,
    n: int,
    *,
    cache_frequency: int = 100,
    processes: int = 1,
    body: dict[str, Any] = BODY,
    expect: str | None = None,
) -> float:
    """Seconds for ``processes`` processes to catch up ``n`` slots each, at once."""
    device = hbtrio.WasmDevice(cache_dir=None)
    async with hbtrio.open_engine(
        devices={DEVICE: device}, cache_frequency=cache_frequency
    ) as engine:
        blob = await engine.put_blob(image)
        pids = [await engine.spawn(definition(blob, name=f"p{k}")) for k in range(processes)]
        for pid in pids:
            await engine.schedule_many(pid, [body] * n)
            await engine.compute(pid, 0)  # booted: the image compiled, the instance live
        gc.collect()
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for pid in pids:
                nursery.start_soon(engine.compute, pid, n)
        elapsed = time.perf_counter() - start
        for pid in pids:
            assert (await engine.compute(pid, n))["output"] == (expect or str(n))
    return elapsed


async def cold_and_hot(
    image: bytes,
    slots: int,
    hot_requests: int = 50,
    body: dict[str, Any] = BODY,
    expect: Callable[[int], str] = str,
) -> dict[str, float]:
    """A hot request for the next slot against a restart's first answer (ms)."""
    with tempfile.TemporaryDirectory(prefix="hbtrio-wasm-bench-") as tmp:
        path, cache = Path(tmp) / "w.sqlite", Path(tmp) / "cache"
        async with hbtrio.open_engine(
            hbtrio.SQLiteStore(path),
            devices={DEVICE: hbtrio.WasmDevice(cache_dir=cache)},
            cache_frequency=100,
        ) as engine:
            pid = await engine.spawn(definition(await engine.put_blob(image)))
            await engine.schedule_many(pid, [body] * slots)
            await engine.compute(pid, slots)
            hot = []
            for k in range(1, hot_requests + 1):
                await engine.schedule(pid, body)
                start = time.perf_counter()
                await engine.compute(pid, slots + k)
                hot.append(time.perf_counter() - start)
            last = slots + hot_requests
        gc.collect()
        start = time.perf_counter()
        async with hbtrio.open_engine(
            hbtrio.SQLiteStore(path),
            devices={DEVICE: hbtrio.WasmDevice(cache_dir=cache)},
            cache_frequency=100,
        ) as engine:
            opened = time.perf_counter()
            await engine.schedule(pid, body)
            scheduled = time.perf_counter()
            state = await engine.compute(pid, last + 1)
            answered = time.perf_counter()
            assert state["output"] == expect(last + 1), state
        return {
            "hot_ms": statistics.median(hot) * 1000,
            "cold_ms": (answered - start) * 1000,
            "open_ms": (opened - start) * 1000,
            "restore_and_slot_ms": (answered - scheduled) * 1000,
            "cold_over_hot": (answered - start) / statistics.median(hot),
        }


async def memory_per_worker(
    image: bytes, processes: int, body: dict[str, Any] = BODY, expect: str = "1"
) -> dict[str, float]:
    device = hbtrio.WasmDevice(cache_dir=None)
    async with hbtrio.open_engine(devices={DEVICE: device}) as engine:
        blob = await engine.put_blob(image)
        first = await engine.spawn(definition(blob, name="warm-up"))
        await engine.schedule(first, body)
        await engine.compute(first, 1)  # the image compiled, the threads started
        pids = [await engine.spawn(definition(blob, name=f"p{k}")) for k in range(processes)]
        for pid in pids:
            await engine.schedule(pid, body)
        gc.collect()
        before = rss()
        for pid in pids:
            await engine.compute(pid, 1)
        gc.collect()
        after = rss()
        assert device.statistics().live_instances == processes + 1
        live = await engine.compute(pids[0], 1)
        assert live["output"] == expect
    return {"bytes_per_worker": (after - before) / processes, "processes": processes}


# codecs ---------------------------------------------------------------------------------------


def codecs(memory: bytes) -> list[dict[str, Any]]:
    rows = []
    cases: list[tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = [
        ("zlib-1", lambda m: zlib.compress(m, 1), zlib.decompress),
        ("zlib-6", lambda m: zlib.compress(m, 6), zlib.decompress),
    ]
    for level in (1, 3, 9):
        c = zstandard.ZstdCompressor(level=level)
        d = zstandard.ZstdDecompressor()
        cases.append((f"zstd-{level}", c.compress, lambda b, d=d: d.decompress(b)))
    for name, compress, decompress in cases:
        packed = b""

        def run_compress(compress: Callable[[bytes], bytes] = compress) -> None:
            nonlocal packed
            packed = compress(memory)

        c_s = min(timed(run_compress) for _ in range(3))
        d_s = min(timed(lambda d=decompress, p=packed: d(p)) for _ in range(3))
        rows.append(
            {
                "codec": name,
                "bytes": len(packed),
                "compress_ms": c_s * 1000,
                "decompress_ms": d_s * 1000,
            }
        )
    return rows


# the runs -------------------------------------------------------------------------------------


def calibrate(target_s: float = 0.0006) -> int:
    spin = 4_000_000
    seconds, _ = instance_layer(bench_module(spin), 5)
    per_iteration = seconds / 5 / spin
    return max(1, round(target_s / per_iteration))


def hot_rows(
    image: bytes, n: int, label: str, body: dict[str, Any] = BODY, expect: str | None = None
) -> dict[str, Any]:
    plain = bare_loop(image, n, same_config=False, body=body)
    bare = bare_loop(image, n, body=body)
    layer, _ = instance_layer(image, n, body)
    hops = trio.run(threaded_instance_layer, image, n, body)
    batched = trio.run(threaded_instance_layer, image, n, body, 100)
    engine = trio.run(lambda: engine_catchup(image, n, body=body, expect=expect))
    unsnapped = trio.run(
        lambda: engine_catchup(image, n, body=body, expect=expect, cache_frequency=10**9)
    )
    return {
        "module": label,
        "slots": n,
        "plain_config_per_s": n / plain,
        "bare_per_s": n / bare,
        "instance_per_s": n / layer,
        "threaded_per_s": n / hops,
        "batched_per_s": n / batched,
        "engine_per_s": n / engine,
        "engine_no_snapshots_per_s": n / unsnapped,
        "engine_over_bare": engine / bare,
        "engine_over_threaded": engine / hops,
    }


def aos_figures(path: Path, quick: bool) -> dict[str, Any]:
    image = path.read_bytes()
    out: dict[str, Any] = {"image_bytes": len(image)}
    with tempfile.TemporaryDirectory(prefix="hbtrio-aos-bench-") as tmp:
        device = hbtrio.WasmDevice(cache_dir=tmp)
        rt = device.runtime()
        start = time.perf_counter()
        loaded = rt.images.load(image_id(image), image)
        out["load_s"] = time.perf_counter() - start
        out["translated"] = loaded.translated
        again = hbtrio.WasmDevice(cache_dir=tmp)
        start = time.perf_counter()
        again.runtime().images.load(image_id(image), image)
        out["load_from_cache_ms"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        instance = WasmInstance(loaded, rt.engine, rt.ticker, max_memory=1 << 30, timeout=60)
        out["instantiate_ms"] = (time.perf_counter() - start) * 1000
        process = Process.of(definition(image), "P" * 43, image_id(image))

        def ev(code: str, k: int) -> bytes:
            body = {"action": "Eval", "data": code}
            return message_json({"message-id": f"{k:043d}", "timestamp": 0, "body": body}, process)

        start = time.perf_counter()
        first = parse_result(instance.handle(ev("return 1+1", 0), process.env), process)
        out["first_handle_ms"] = (time.perf_counter() - start) * 1000
        assert first["output"] == "2", first
        evals = []
        for k in range(1, 101 if quick else 1001):
            start = time.perf_counter()
            parse_result(instance.handle(ev("return 1+1", k), process.env), process)
            evals.append(time.perf_counter() - start)
        out["eval_p50_ms"] = statistics.median(evals) * 1000
        start = time.perf_counter()
        snap = instance.snapshot()
        out["snapshot_ms"] = (time.perf_counter() - start) * 1000
        out["snapshot_bytes"] = len(snap["memory"])
        out["memory_bytes"] = snap["size"]
        fresh = WasmInstance(loaded, rt.engine, rt.ticker, max_memory=1 << 30, timeout=60)
        start = time.perf_counter()
        fresh.restore(snap)
        out["restore_ms"] = (time.perf_counter() - start) * 1000
        assert fresh.snapshot()["memory"] == snap["memory"]  # restored == hot, bit for bit
        out["codecs"] = codecs(bytes(instance._memory.read(instance._store)))  # type: ignore[arg-type]
    n = 300 if quick else 3000
    out["hot"] = hot_rows(image, n, "aos return 1+1", EVAL, "2")
    out["cold"] = trio.run(cold_and_hot, image, 200 if quick else 1000, 50, EVAL, lambda _: "2")
    out["memory"] = trio.run(memory_per_worker, image, 5 if quick else 20, EVAL, "2")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    quick = args.quick
    n = 500 if quick else 5000
    results: dict[str, Any] = {
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "wasmtime": hbtrio._wasm._runtime.wasmtime_version(),
    }
    spin = calibrate()
    results["work_spin"] = spin
    trivial, work = bench_module(0), bench_module(spin)
    results["hot"] = [
        hot_rows(trivial, n, "spin 0"),
        hot_rows(work, n // 5, "work (~0.6 ms)"),
    ]
    results["cold"] = trio.run(cold_and_hot, trivial, 200 if quick else 2000)
    results["memory"] = trio.run(memory_per_worker, trivial, 20 if quick else 200)
    slots = 100 if quick else 1000
    one = trio.run(engine_catchup, work, slots)
    results["parallel"] = []
    for processes in (2, 4):
        many = trio.run(lambda p=processes: engine_catchup(work, slots, processes=p))
        results["parallel"].append(
            {
                "processes": processes,
                "one_per_s": slots / one,
                "many_per_s": processes * slots / many,
                "speedup": processes * slots / many / (slots / one),
            }
        )
    _, layer = instance_layer(trivial, 1)
    results["codecs"] = codecs(bytes(layer._memory.read(layer._store)))  # type: ignore[arg-type]
    aos = os.environ.get("HBTRIO_AOS_WASM")
    if aos and Path(aos).is_file():
        results["aos"] = aos_figures(Path(aos), quick)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict[str, Any]) -> None:
    print(f"# WASM benchmark: {r['machine']}, wasmtime {r['wasmtime']}")
    print("\n## hot slots per second (one process, snapshots every 100 slots)\n")
    print(
        "| module | bare, plain config | bare | instance layer | + a hop a call "
        "| + a hop per 100 calls | engine | engine, no snapshots | engine time / bare |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    hot = list(r["hot"]) + ([r["aos"]["hot"]] if "aos" in r else [])
    for row in hot:
        print(
            f"| {row['module']} ({row['slots']} slots) | {row['plain_config_per_s']:,.0f} | "
            f"{row['bare_per_s']:,.0f} | {row['instance_per_s']:,.0f} | "
            f"{row['threaded_per_s']:,.0f} | {row['batched_per_s']:,.0f} | "
            f"{row['engine_per_s']:,.0f} | {row['engine_no_snapshots_per_s']:,.0f} | "
            f"{row['engine_over_bare']:.2f} |"
        )
    print("\n## cold restore after a restart against a hot request\n")
    print("| module | hot ms | cold ms | of which open ms | restore + slot ms | cold/hot |")
    print("|---|---|---|---|---|---|")
    colds = [("spin 0", r["cold"])] + ([("aos", r["aos"]["cold"])] if "aos" in r else [])
    for name, c in colds:
        print(
            f"| {name} | {c['hot_ms']:.2f} | {c['cold_ms']:.1f} | {c['open_ms']:.1f} | "
            f"{c['restore_and_slot_ms']:.1f} | {c['cold_over_hot']:.0f} |"
        )
    print("\n## memory per live worker\n")
    mems = [("spin 0", r["memory"])] + ([("aos", r["aos"]["memory"])] if "aos" in r else [])
    for name, m in mems:
        print(
            f"- {name}: {m['bytes_per_worker'] / 1024:,.0f} KiB per worker "
            f"({m['processes']} workers)"
        )
    print("\n## N processes at once against one (the work module)\n")
    print("| processes | one process slots/s | N processes slots/s | speedup |")
    print("|---|---|---|---|")
    for p in r["parallel"]:
        print(
            f"| {p['processes']} | {p['one_per_s']:,.0f} | {p['many_per_s']:,.0f} | "
            f"{p['speedup']:.2f} |"
        )
    for name, rows in [("bench module", r["codecs"])] + (
        [("aos", r["aos"]["codecs"])] if "aos" in r else []
    ):
        print(f"\n## snapshot codecs on the {name}'s memory\n")
        print("| codec | bytes | compress ms | decompress ms |")
        print("|---|---|---|---|")
        for c in rows:
            print(
                f"| {c['codec']} | {c['bytes']:,} | {c['compress_ms']:.2f} | "
                f"{c['decompress_ms']:.2f} |"
            )
    if "aos" in r:
        a = r["aos"]
        print("\n## aos\n")
        print(
            f"- load {a['load_s']:.2f} s (translated: {a['translated']}), from the on-disk "
            f"cache {a['load_from_cache_ms']:.1f} ms; instantiate {a['instantiate_ms']:.2f} ms; "
            f"first handle {a['first_handle_ms']:.1f} ms; eval p50 {a['eval_p50_ms']:.3f} ms"
        )
        print(
            f"- memory {a['memory_bytes'] / 2**20:.1f} MiB; snapshot {a['snapshot_ms']:.1f} ms, "
            f"{a['snapshot_bytes'] / 1024:,.0f} KiB; restore {a['restore_ms']:.1f} ms "
            "(restored == hot, bit for bit)"
        )


if __name__ == "__main__":
    sys.exit(main())
