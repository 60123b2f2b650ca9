"""Small requests' latency while other clients post ~1 MiB JSON bodies, this node vs a baseline.

Run::

    python benchmarks/big_bodies.py --baseline-rev 052e249      # the base, checked out for you
    python benchmarks/big_bodies.py --baseline-src /tmp/base/src --seconds 10 --rounds 3
    python benchmarks/big_bodies.py --quick                     # this node only, a few seconds

Each node is a real ``hbtrio serve`` subprocess (its defaults, SQLite in a
temporary directory) started from a source tree: this checkout's ``src``, and
with ``--baseline-src`` (or ``--baseline-rev``, extracted with ``git archive``
into a temporary directory) another one, run in the same invocation,
alternating round by round. In every round and for every node:

* ``idle``: one client sends small GETs (``GET /{pid}/compute?slot=1``, answered
  from the worker's memory) back to back on a keep-alive connection;
* ``loaded``: the same, while ``--big-clients`` clients (default 4) each post a
  ~1 MiB JSON message (a list of small maps, the costliest shape to decode) to
  ``POST /{pid}/schedule`` back to back, on connections of their own.

Reports the small GETs' p50/p99/max latency and count, the big posts answered
(and their p50), per node and phase, with every round pooled, then the ratios
of this node over the baseline. The clients run in this process (one Trio loop,
minimal raw HTTP/1.1 clients), the node in its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from benchmarks.http_bench import RawConnection  # noqa: E402

COUNTER = {"device": "process@1.0", "execution-device": "counter@1.0"}


def big_body(size: int) -> bytes:
    """A JSON message of about ``size`` bytes: ``n`` and a list of small maps."""
    item = len(json.dumps({"k": 0, "v": "abcdefgh"}, separators=(",", ":"))) + 6
    items = [{"k": i, "v": "abcdefgh"} for i in range(max(1, size // item))]
    body = json.dumps({"n": 1, "items": items}, separators=(",", ":")).encode()
    while len(body) > size:
        items = items[: len(items) * size // len(body) - 1]
        body = json.dumps({"n": 1, "items": items}, separators=(",", ":")).encode()
    return body


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values`` in milliseconds."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000


@attrs.define
class Phase:
    node: str
    phase: str
    seconds: float = 0.0
    small: list[float] = attrs.field(factory=list)
    big: list[float] = attrs.field(factory=list)
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "phase": self.phase,
            "seconds": round(self.seconds, 2),
            "small_requests": len(self.small),
            "small_p50_ms": round(percentile(self.small, 50), 2),
            "small_p99_ms": round(percentile(self.small, 99), 2),
            "small_max_ms": round(max(self.small, default=math.nan) * 1000, 2),
            "big_posts": len(self.big),
            "big_p50_ms": round(percentile(self.big, 50), 1),
            "errors": self.errors,
        }


@contextmanager
def node(src: Path, workdir: Path) -> Iterator[str]:
    """An ``hbtrio serve`` subprocess from the source tree ``src``; yields its URL."""
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("HBTRIO_TOKEN", None)
    cmd = [sys.executable, "-m", "hbtrio._cli", "serve", "--db", str(workdir / "node.sqlite")]
    cmd += ["--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=workdir)
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url = match.group(1)
            if "press Ctrl-C" in line:
                break
        if url is None:
            raise RuntimeError(f"the node from {src} did not start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def connect(url: str) -> RawConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return RawConnection(await trio.open_tcp_stream(host, int(port)), host)


async def measure(
    url: str, name: str, phase: str, seconds: float, big: bytes | None, clients: int
) -> Phase:
    """One phase against the node at ``url``: small GETs, with big posts if ``big``."""
    setup = await connect(url)
    _, content = await setup.request("POST", "/processes", json.dumps(COUNTER).encode())
    small_pid = json.loads(content)["process"]
    defn = {**COUNTER, "big": phase, "t": time.time()}
    _, content = await setup.request("POST", "/processes", json.dumps(defn).encode())
    big_pid = json.loads(content)["process"]
    await setup.request("POST", f"/{small_pid}/schedule", b'{"n":1}')
    await setup.request("GET", f"/{small_pid}/compute?slot=1")
    await setup.stream.aclose()
    result = Phase(name, phase)
    deadline = trio.current_time() + seconds

    async def client(method: str, target: str, body: bytes, into: list[float]) -> None:
        conn = await connect(url)
        while trio.current_time() < deadline:
            start = time.perf_counter()
            try:
                status, content = await conn.request(method, target, body)
            except (ConnectionError, trio.BrokenResourceError):
                # hypercorn closes a connection after 1,000 requests: open another.
                await conn.stream.aclose()
                conn = await connect(url)
                status, content = await conn.request(method, target, body)
            into.append(time.perf_counter() - start)
            if status != 200 or (method == "GET" and b'"count":1' not in content):
                result.errors += 1
        await conn.stream.aclose()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, "GET", f"/{small_pid}/compute?slot=1", b"", result.small)
        if big is not None:
            for _ in range(clients):
                nursery.start_soon(client, "POST", f"/{big_pid}/schedule", big, result.big)
    result.seconds = time.perf_counter() - started
    return result


def pooled(phases: list[Phase]) -> Phase:
    out = Phase(phases[0].node, phases[0].phase)
    for p in phases:
        out.seconds += p.seconds
        out.small += p.small
        out.big += p.big
        out.errors += p.errors
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path, help="a source tree (its src/) to compare")
    parser.add_argument("--baseline-rev", help="a git revision to compare (extracted for you)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per loaded phase")
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="seconds per idle phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--big-clients", type=int, default=4)
    parser.add_argument("--body-bytes", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="this node, 1 round of 3 s")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.idle_seconds, args.rounds = 3.0, 1.0, 1
    body = big_body(args.body_bytes)
    with tempfile.TemporaryDirectory(prefix="hbtrio-big-bodies-") as tmp:
        nodes = {"this": REPO / "src"}
        if args.baseline_rev:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", args.baseline_rev],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            nodes = {"baseline": base / "src", **nodes}
        elif args.baseline_src:
            nodes = {"baseline": args.baseline_src.resolve(), **nodes}
        runs: dict[tuple[str, str], list[Phase]] = {}
        for round_ in range(args.rounds):
            for name, src in nodes.items():
                workdir = Path(tmp) / f"{name}-{round_}"
                workdir.mkdir()
                with node(src, workdir) as url:
                    for phase, seconds, big in (
                        ("idle", args.idle_seconds, None),
                        ("loaded", args.seconds, body),
                    ):
                        result = trio.run(measure, url, name, phase, seconds, big, args.big_clients)
                        runs.setdefault((name, phase), []).append(result)
                        summary = result.summary()
                        print(f"round {round_ + 1} {name:8} {phase:6}", summary, flush=True)
                for path in workdir.iterdir():  # hundreds of MiB of bodies
                    path.unlink()
    summaries = [pooled(phases).summary() for phases in runs.values()]
    print()
    header = f"{'node':9}{'phase':8}{'GETs':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    print(header + f"{'posts':>7}{'post p50':>10}{'errors':>7}")
    for s in summaries:
        print(
            f"{s['node']:9}{s['phase']:8}{s['small_requests']:7}{s['small_p50_ms']:9.2f}"
            f"{s['small_p99_ms']:9.2f}{s['small_max_ms']:9.2f}{s['big_posts']:7}"
            f"{s['big_p50_ms']:10.1f}{s['errors']:7}"
        )
    by = {(s["node"], s["phase"]): s for s in summaries}
    ratios: dict[str, float] = {}
    if ("baseline", "loaded") in by:
        for key in ("small_p50_ms", "small_p99_ms", "small_max_ms", "big_posts", "big_p50_ms"):
            ratios[key] = round(by["this", "loaded"][key] / by["baseline", "loaded"][key], 3)
        print("\nloaded, this node / baseline:", ratios)
    document = {
        "body_bytes": len(body),
        "big_clients": args.big_clients,
        "rounds": args.rounds,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "results": summaries,
        "ratios_loaded": ratios,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 0 if all(s["errors"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
