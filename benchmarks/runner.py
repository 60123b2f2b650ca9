"""The benchmark runner: every workload, every implementation, interleaved, in subprocesses.

Usage::

    python -m benchmarks [--quick] [--reps N] [--json PATH]
                         [--workloads w1,w2-sqlite,...] [--impl hbtrio,trio,asyncio]

For each workload it runs repetition 1 of every implementation (hbtrio, trio,
asyncio), then repetition 2, and so on, each run in a fresh
``python -m benchmarks.workloads`` subprocess. Progress goes to stderr; the
table of medians, min-max and hbtrio/baseline ratios goes to stdout; all raw
result lines and the summary go to ``benchmarks/results/latest.json`` (and to
``--json PATH``). The exit status is non-zero when any run failed its checks,
crashed or timed out. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .workloads import IMPLS, WORKLOADS

__all__ = ["CASES", "Case", "main"]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results" / "latest.json"


@dataclass(frozen=True)
class Case:
    """One row group of the table: a workload, maybe a variant, and its extra metrics."""

    name: str
    key: str
    args: tuple[str, ...] = ()
    #: Extra fields of the result line summarised like the main value: ``(field, unit)``.
    extras: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        workload = WORKLOADS[self.key].name
        variant = self.name.partition("-")[2]
        return f"{workload}[{variant}]" if variant else workload


CASES: tuple[Case, ...] = (
    Case("w1", "w1"),
    Case("w2", "w2"),
    Case(
        "w2-sqlite",
        "w2",
        ("--store", "sqlite"),
        (("us_per_slot", "us_per_slot"), ("commits", "commits")),
    ),
    Case("w3", "w3"),
    Case("w3-parked", "w3", ("--order", "parked")),
    Case("w4", "w4", extras=(("bytes_per_worker", "bytes_per_worker"),)),
    Case("w5", "w5", extras=(("executions", "executions"),)),
    Case("w6", "w6", extras=(("warm_ms", "ms_warm"), ("cold_over_warm", "cold/warm"))),
)


def _env(src: Path | None = None) -> dict[str, str]:
    """The environment of a run: hbtrio from ``src`` (default this checkout's ``src/``)."""
    env = dict(os.environ)
    paths = [str(REPO), str(src or REPO / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def hbtrio_available() -> str | None:
    """``None`` if ``hbtrio.open_engine`` imports in a subprocess, else the error."""
    proc = subprocess.run(
        [sys.executable, "-c", "import hbtrio; hbtrio.open_engine"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        check=False,
    )
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def run_one(
    case: Case, impl: str, *, quick: bool, timeout: float, src: Path | None = None
) -> dict[str, Any]:
    """Run one workload once in a subprocess, with hbtrio from ``src`` (default this
    checkout's); returns its result line (``ok`` added)."""
    cmd = [sys.executable, "-m", "benchmarks.workloads", case.key, "--impl", impl, *case.args]
    if quick:
        cmd.append("--quick")
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=_env(src),
            cwd=REPO,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {
            "case": case.name,
            "impl": impl,
            "ok": False,
            "error": f"timed out after {timeout}s",
        }
    wall = time.perf_counter() - started
    line: dict[str, Any] = {}
    for text in reversed(proc.stdout.strip().splitlines()):
        try:
            line = json.loads(text)
            break
        except json.JSONDecodeError:
            continue
    line.update(case=case.name, impl=impl, wall_s=wall, returncode=proc.returncode)
    ok = proc.returncode == 0 and bool(line.get("check", {}).get("ok")) and "value" in line
    line["ok"] = ok
    if not ok:
        tail = proc.stderr.strip().splitlines()[-5:]
        line.setdefault("error", tail[-1] if tail else f"exit status {proc.returncode}")
        line["stderr_tail"] = tail
    return line


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) < 1000:
        return str(int(value))
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.1f}"
    if a >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def summarize(
    runs: Sequence[dict[str, Any]], cases: Sequence[Case], impls: Sequence[str]
) -> list[dict[str, Any]]:
    """Median, min and max per (case, impl, metric), with hbtrio/baseline ratios of medians."""
    rows: list[dict[str, Any]] = []
    for case in cases:
        metrics = [("value", None), *case.extras]
        for metric, unit in metrics:
            medians: dict[str, float] = {}
            group: list[dict[str, Any]] = []
            for impl in impls:
                good = [r for r in runs if r["case"] == case.name and r["impl"] == impl and r["ok"]]
                failed = sum(
                    1 for r in runs if r["case"] == case.name and r["impl"] == impl and not r["ok"]
                )
                values = [float(r[metric]) for r in good if r.get(metric) is not None]
                row: dict[str, Any] = {
                    "case": case.name,
                    "workload": case.label,
                    "metric": metric,
                    "impl": impl,
                    "unit": unit or (good[0]["unit"] if good else None),
                    "runs": len(values),
                    "failed": failed,
                    "median": statistics.median(values) if values else None,
                    "min": min(values) if values else None,
                    "max": max(values) if values else None,
                }
                if row["median"] is not None:
                    medians[impl] = row["median"]
                group.append(row)
            for row in group:
                row["ratios"] = {}
                if row["impl"] == "hbtrio" and "hbtrio" in medians:
                    for base in impls:
                        if base != "hbtrio" and medians.get(base):
                            row["ratios"][f"hbtrio/{base}"] = medians["hbtrio"] / medians[base]
            rows.extend(group)
    return rows


def _better(unit: str | None) -> str:
    if unit is None:
        return ""
    if unit.endswith("per_second"):
        return "higher"
    if unit in ("executions", "commits"):
        return ""
    return "lower"


def print_table(rows: Sequence[dict[str, Any]], impls: Sequence[str], out: TextIO) -> None:
    """The summary as a fixed-width text table."""
    baselines = [i for i in impls if i != "hbtrio"]
    header = ["workload", "impl", "median", "min-max", "unit", "better"]
    header += [f"hbtrio/{b}" for b in baselines if "hbtrio" in impls]
    table = [header]
    for row in rows:
        name = row["workload"] if row["metric"] == "value" else f"  {row['metric']}"
        spread = f"{_fmt(row['min'])}-{_fmt(row['max'])}" if row["min"] is not None else "-"
        median = _fmt(row["median"])
        if row["failed"]:
            median += f" ({row['failed']} failed)"
        cells = [name, row["impl"], median, spread, row["unit"] or "", _better(row["unit"])]
        if "hbtrio" in impls:
            cells += [
                f"{row['ratios'][f'hbtrio/{b}']:.2f}x" if f"hbtrio/{b}" in row["ratios"] else ""
                for b in baselines
            ]
        table.append(cells)
    print_cells(table, out)


def print_cells(table: Sequence[Sequence[str]], out: TextIO) -> None:
    """Rows of cells in aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for n, cells in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


class Progress:
    """One status line per run on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total, self.done, self.out = total, 0, out
        self.tty = out.isatty()
        self.started = time.perf_counter()

    def begin(self, text: str) -> None:
        if self.tty:
            self.out.write(f"\r\x1b[K[{self.done + 1:>3}/{self.total}] {text} ...")
            self.out.flush()

    def end(self, text: str, line: dict[str, Any]) -> None:
        self.done += 1
        if line["ok"]:
            status = f"{_fmt(line['value'])} {line.get('unit', '')}"
        else:
            status = f"FAILED: {line.get('error', '?')}"
        elapsed = time.perf_counter() - self.started
        msg = (
            f"[{self.done:>3}/{self.total}] {text}: {status}"
            f"  ({line.get('wall_s', 0):.1f}s, total {elapsed:.0f}s)"
        )
        self.out.write(("\r\x1b[K" if self.tty else "") + msg + "\n")
        self.out.flush()


def _select(names: str | None) -> list[Case]:
    if not names:
        return list(CASES)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    chosen = [c for c in CASES if any(c.name == w or c.name.startswith(w + "-") for w in wanted)]
    unknown = [
        w for w in wanted if not any(c.name == w or c.name.startswith(w + "-") for c in CASES)
    ]
    if unknown:
        raise SystemExit(
            f"unknown workloads: {', '.join(unknown)} (known: {', '.join(c.name for c in CASES)})"
        )
    return chosen


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test in seconds")
    p.add_argument("--reps", type=int, help="repetitions per implementation (default 5, quick 3)")
    p.add_argument("--json", type=Path, help="also write the JSON results here")
    p.add_argument(
        "--no-latest", action="store_true", help=f"do not write {RESULTS.relative_to(REPO)}"
    )
    p.add_argument(
        "--workloads", help="comma-separated: w1,w2,w2-sqlite,w3,w3-parked,w4,w5,w6 (default all)"
    )
    p.add_argument("--impl", help="comma-separated implementations (default hbtrio,trio,asyncio)")
    p.add_argument("--timeout", type=float, help="seconds per run (default 900, quick 120)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit status (1 if any run failed)."""
    args = _parser().parse_args(argv)
    cases = _select(args.workloads)
    impls = [i.strip() for i in (args.impl or ",".join(IMPLS)).split(",") if i.strip()]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"unknown implementation {impl!r} (known: {', '.join(IMPLS)})")
    reps = args.reps or (3 if args.quick else 5)
    timeout = args.timeout or (120.0 if args.quick else 900.0)
    problems: list[str] = []
    if "hbtrio" in impls:
        error = hbtrio_available()
        if error is not None:
            problems.append(f"hbtrio is not importable ({error}); ran the baselines only")
            print(f"warning: {problems[-1]}", file=sys.stderr)
            impls.remove("hbtrio")

    runs: list[dict[str, Any]] = []
    progress = Progress(len(cases) * reps * len(impls))
    for case in cases:
        for rep in range(1, reps + 1):
            for impl in impls:
                text = f"{case.label} rep {rep}/{reps} {impl}"
                progress.begin(text)
                line = run_one(case, impl, quick=args.quick, timeout=timeout)
                line["rep"] = rep
                runs.append(line)
                progress.end(text, line)

    summary = summarize(runs, cases, impls)
    print_table(summary, impls, sys.stdout)
    failures = [r for r in runs if not r["ok"]]
    for r in failures:
        print(
            f"FAILED: {r['case']} {r['impl']} rep {r.get('rep')}: {r.get('error')}", file=sys.stderr
        )
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)

    document = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "quick": args.quick,
            "reps": reps,
            "impls": impls,
            "sizes": {
                c.name: dict(WORKLOADS[c.key].quick if args.quick else WORKLOADS[c.key].full)
                for c in cases
            },
            "problems": problems,
        },
        "summary": summary,
        "runs": runs,
        "failures": len(failures),
    }
    text = json.dumps(document, indent=1, default=str)
    if not args.no_latest:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 1 if failures or problems else 0
