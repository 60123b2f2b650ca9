"""The cost of the HTTP layer: the same calls made in process and over loopback HTTP.

Run::

    python benchmarks/http_bench.py                 # default: 1000 requests per case, 32 clients
    python benchmarks/http_bench.py --quick         # a few seconds
    python benchmarks/http_bench.py --store sqlite --concurrency 64 --json out.json

For each workload, ``--concurrency`` client tasks share ``--requests`` calls
against ``--processes`` counter processes, in each mode:

* ``inproc``: calling the engine directly;
* ``httpx``: through the HTTP API (hypercorn on Trio, loopback port) with one
  shared ``httpx.AsyncClient`` (a keep-alive connection per client task);
* ``raw``: the same requests from a minimal keep-alive HTTP/1.1 client, which
  costs far less than httpx and so shows the server side's cost more closely.

Workloads:

* ``schedule``: ``POST /{pid}/schedule`` vs ``engine.schedule``;
* ``compute-stored``: ``GET /{pid}/compute?slot=N`` for slots already computed
  (answered from the worker's memory or the store);
* ``compute-new``: the same for slots scheduled but not computed yet, in
  ascending order (each request moves the worker forward).

Client and server share one process and one Trio loop, so the HTTP numbers
include the client's own cost: ``httpx`` is what a Python client on the same
machine sees, ``raw`` is close to the server's share alone. "Loop time per
request" is the difference of 1/throughput: the CPU time one request adds. Each case stops
after ``--requests`` calls or ``--duration`` seconds, whichever comes first.
Prints a table, then the results as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

if __package__ in (None, ""):  # run as a script: make the src layout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hbtrio
from hbtrio.http import make_app, run_server


@attrs.frozen
class Case:
    workload: str
    mode: str
    requests: int
    seconds: float
    latencies: tuple[float, ...]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else math.nan

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile latency in milliseconds (nearest rank)."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
        return ordered[rank] * 1000

    def as_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "mode": self.mode,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 4),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p90_ms": round(self.percentile(90), 3),
            "p99_ms": round(self.percentile(99), 3),
        }


class Transport:
    """How a mode makes the two calls; ``client`` is the calling client task's index."""

    name = "?"

    async def open(self, concurrency: int) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def schedule(self, client: int, pid: str) -> bool:
        raise NotImplementedError

    async def compute(self, client: int, pid: str, slot: int) -> bool:
        raise NotImplementedError


class InProcess(Transport):
    """The engine's own methods."""

    name = "inproc"

    def __init__(self, engine: hbtrio.Engine) -> None:
        self.engine = engine

    async def schedule(self, client: int, pid: str) -> bool:
        await self.engine.schedule(pid, {"n": 1})
        return True

    async def compute(self, client: int, pid: str, slot: int) -> bool:
        return bool((await self.engine.compute(pid, slot))["count"] == slot)


class Httpx(Transport):
    """One shared ``httpx.AsyncClient``, a keep-alive connection per client task."""

    name = "httpx"

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self, concurrency: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=60)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def schedule(self, client: int, pid: str) -> bool:
        r = await self.http.post(f"/{pid}/schedule", content=BODY, headers=JSON_HEADERS)
        return r.status_code == 200

    async def compute(self, client: int, pid: str, slot: int) -> bool:
        r = await self.http.get(f"/{pid}/compute", params={"slot": slot})
        return r.status_code == 200 and r.json()["count"] == slot


BODY = b'{"n":1}'
JSON_HEADERS = {"content-type": "application/json"}
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client: the server's cost without httpx's."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.buffer = bytearray()

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {target} HTTP/1.1\r\nhost: {self.host}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        await self.stream.send_all(head.encode("ascii") + body)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        header = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        match = _LENGTH.search(header)
        length = int(match.group(1)) if match else 0
        while len(self.buffer) < length:
            await self._fill()
        content = bytes(self.buffer[:length])
        del self.buffer[:length]
        return int(header[9:12]), content

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk


class Raw(Transport):
    """A raw keep-alive connection per client task."""

    name = "raw"

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.connections: list[RawConnection] = []

    async def open(self, concurrency: int) -> None:
        for _ in range(concurrency):
            stream = await trio.open_tcp_stream(self.host, self.port)
            self.connections.append(RawConnection(stream, f"{self.host}:{self.port}"))

    async def aclose(self) -> None:
        for connection in self.connections:
            await connection.stream.aclose()

    async def schedule(self, client: int, pid: str) -> bool:
        status, _ = await self.connections[client].request("POST", f"/{pid}/schedule", BODY)
        return status == 200

    async def compute(self, client: int, pid: str, slot: int) -> bool:
        status, content = await self.connections[client].request(
            "GET", f"/{pid}/compute?slot={slot}"
        )
        return status == 200 and json.loads(content)["count"] == slot


async def drive(
    workload: str,
    mode: str,
    call: Callable[[int, int], Awaitable[bool]],
    *,
    requests: int,
    concurrency: int,
    duration: float,
) -> Case:
    """Run ``call(i, client)`` for i = 0, 1, ... from ``concurrency`` client tasks."""
    counter = itertools.count()
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def client(index: int) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= requests:
                return
            t0 = time.perf_counter()
            ok = await call(i, index)
            latencies.append(time.perf_counter() - t0)
            if not ok:
                errors += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(client, index)
    return Case(
        workload, mode, len(latencies), time.perf_counter() - start, tuple(latencies), errors
    )


async def run(args: argparse.Namespace) -> list[Case]:
    tmp = tempfile.TemporaryDirectory(prefix="hbtrio-http-bench-")
    store: hbtrio.Store
    store = (
        hbtrio.SQLiteStore(Path(tmp.name) / "bench.sqlite")
        if args.store == "sqlite"
        else hbtrio.MemoryStore()
    )
    cases: list[Case] = []
    try:
        async with hbtrio.open_engine(store) as engine:
            app = make_app(engine)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(
                    partial(run_server, app, port=0, shutdown_trigger=stop.wait)
                )
                modes = {"inproc": InProcess(engine), "httpx": Httpx(urls[0]), "raw": Raw(urls[0])}
                for name in args.modes:
                    cases += await _workloads(engine, modes[name], args)
                stop.set()
    finally:
        tmp.cleanup()
    return cases


async def _spawn_set(engine: hbtrio.Engine, tag: str, count: int) -> list[str]:
    return [
        await engine.spawn(
            {"device": "process@1.0", "execution-device": "counter@1.0", "bench": f"{tag}-{i}"}
        )
        for i in range(count)
    ]


async def _workloads(
    engine: hbtrio.Engine, transport: Transport, args: argparse.Namespace
) -> list[Case]:
    """The three workloads through one transport, each on processes of its own."""
    options = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "duration": args.duration,
    }
    mode = transport.name
    say = partial(print, file=sys.stderr, flush=True)
    per_process = math.ceil(args.requests / args.processes)
    scheduled = await _spawn_set(engine, f"schedule-{mode}", args.processes)
    stored = await _spawn_set(engine, f"stored-{mode}", args.processes)
    fresh = await _spawn_set(engine, f"fresh-{mode}", args.processes)
    for pid in (*stored, *fresh):
        for _ in range(per_process):
            await engine.schedule(pid, {"n": 1})
    for pid in stored:
        await engine.compute(pid, per_process)

    await transport.open(args.concurrency)
    try:
        async with trio.open_nursery() as nursery:  # warm up every connection
            for index in range(args.concurrency):
                nursery.start_soon(transport.compute, index, stored[0], 1)

        async def schedule(i: int, client: int) -> bool:
            return await transport.schedule(client, scheduled[i % len(scheduled)])

        async def compute(pids: list[str], stride: int, i: int, client: int) -> bool:
            slot = 1 + (i // len(pids) * stride) % per_process
            return await transport.compute(client, pids[i % len(pids)], slot)

        cases = []
        for workload, call in (
            ("schedule", schedule),
            ("compute-stored", partial(compute, stored, 7)),
            ("compute-new", partial(compute, fresh, 1)),
        ):
            say(f"{workload} {mode} ...")
            cases.append(await drive(workload, mode, call, **options))
        return cases
    finally:
        await transport.aclose()


def table(cases: list[Case]) -> str:
    """The results as a text table, then the HTTP layer's cost per workload."""
    order = {"inproc": 0, "raw": 1, "httpx": 2}
    head = (
        f"{'workload':<15} {'mode':<7} {'requests':>8} {'errors':>6} {'req/s':>9} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
    )
    lines = [head, "-" * len(head)]
    lines.extend(
        f"{c.workload:<15} {c.mode:<7} {c.requests:>8} {c.errors:>6} {c.rps:>9.0f} "
        f"{c.percentile(50):>8.3f} {c.percentile(90):>8.3f} {c.percentile(99):>8.3f}"
        for c in sorted(cases, key=lambda c: (c.workload, order.get(c.mode, 9)))
    )
    by = {(c.workload, c.mode): c for c in cases}
    lines.append("")
    for workload in dict.fromkeys(c.workload for c in cases):
        inproc = by.get((workload, "inproc"))
        for mode in ("raw", "httpx"):
            http = by.get((workload, mode))
            if inproc and http and inproc.rps > 0 and http.rps > 0:
                extra = http.percentile(50) - inproc.percentile(50)
                lines.append(
                    f"{workload:<15} over HTTP ({mode:<5}): +{extra:.3f} ms at p50, "
                    f"{1000 * (1 / http.rps - 1 / inproc.rps):.3f} ms of loop time per request"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=1000, help="calls per case (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="client tasks (default: %(default)s)"
    )
    parser.add_argument(
        "--processes", type=int, default=4, help="processes per case (default: %(default)s)"
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds cap per case (default: %(default)s)"
    )
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument(
        "--modes",
        default="inproc,httpx,raw",
        help="comma-separated: inproc (engine calls), httpx (httpx.AsyncClient), "
        "raw (a minimal keep-alive HTTP/1.1 client) (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="300 requests, 16 clients")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON results here")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"inproc", "httpx", "raw"}:
        parser.error("--modes takes inproc, httpx and raw")
    if args.quick:
        args.requests, args.concurrency = 300, 16
    if min(args.requests, args.concurrency, args.processes) < 1 or not args.duration > 0:
        parser.error("--requests, --concurrency, --processes and --duration must be positive")

    cases = trio.run(run, args)
    document = {
        "benchmark": "http_bench",
        "settings": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "processes": args.processes,
            "duration_cap_s": args.duration,
            "store": args.store,
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": [c.as_dict() for c in cases],
    }
    print(table(cases))
    print()
    print(json.dumps(document, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(c.errors for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
