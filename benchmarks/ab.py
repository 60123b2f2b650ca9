"""A/B: the workloads on this checkout's hbtrio against another commit's, interleaved.

Usage::

    python -m benchmarks.ab REF [--rounds 2] [--reps 5] [--workloads w1,w4,...]
                                [--quick] [--json PATH]

REF (a commit, tag or branch of this repository) is exported with ``git
archive`` into a temporary directory, and each run imports hbtrio either from
its ``src/`` or from this checkout's: the workloads, the harness and the
checks are this checkout's in both, so both trees run exactly the same
benchmark code (they need the same public API). In every round each case runs
``--reps`` times in each tree, run by run: this tree then REF, REF then this
tree, and so on (the tree that goes first alternates from run to run, case
to case and round to round), so that the slow and fast spells of a shared
machine, which last seconds, fall on both alike.

The table gives, per case, each tree's median over all its runs, this
checkout against REF (``1.10x`` is 10% faster, ``0.95x`` 5% slower, whatever
the unit), and each tree's spread: the interquartile range of its runs as a
share of its median. A ratio closer to 1 than the spread says nothing. Progress
goes to stderr; the exit status is 1 when a run failed its checks, 2 when REF
cannot be exported. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import REPO, Case, Progress, _better, _fmt, _select, print_cells, run_one
from .workloads import _positive

__all__ = ["export", "main", "speedup", "summarize_ab"]

THIS = "this"


def export(ref: str, into: Path) -> Path:
    """Export commit ``ref`` of this repository into ``into``; its ``src`` directory.

    Raises `SystemExit` with a one-line message when ``ref`` is not a commit
    here or has no ``src/hbtrio``.
    """
    proc = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SystemExit(f"cannot export {ref!r}: {why[-1] if why else 'git archive failed'}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(into, filter="data")
    src = into / "src"
    if not (src / "hbtrio" / "__init__.py").is_file():
        raise SystemExit(f"{ref!r} has no src/hbtrio to benchmark")
    return src


def speedup(this: float, ref: float, unit: str | None) -> float:
    """This tree against REF: above 1 when this tree is faster, whatever the unit."""
    return this / ref if _better(unit) == "higher" else ref / this


def _spread(values: Sequence[float]) -> float | None:
    """The interquartile range of ``values`` over their median."""
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    median = statistics.median(values)
    return (q3 - q1) / median if median else None


def summarize_ab(runs: Sequence[dict[str, Any]], cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Per case: each tree's median, runs and spread, and this tree against REF."""
    rows = []
    for case in cases:
        row: dict[str, Any] = {"case": case.name, "workload": case.label, "unit": None}
        for tree in (THIS, "ref"):
            good = [r for r in runs if r["case"] == case.name and r["tree"] == tree and r["ok"]]
            values = [float(r["value"]) for r in good]
            row["unit"] = row["unit"] or (good[0]["unit"] if good else None)
            row[tree] = {
                "runs": len(values),
                "failed": sum(
                    1 for r in runs if r["case"] == case.name and r["tree"] == tree and not r["ok"]
                ),
                "median": statistics.median(values) if values else None,
                "spread": _spread(values),
            }
        this, ref = row[THIS]["median"], row["ref"]["median"]
        row["speedup"] = speedup(this, ref, row["unit"]) if this and ref else None
        rows.append(row)
    return rows


def print_ab(rows: Sequence[dict[str, Any]], ref: str, out: Any = sys.stdout) -> None:
    """The summary as a fixed-width text table."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x * 100:.0f}%"

    table = [["workload", "unit", ref, "this", "this/ref", f"spread {ref}/this", "runs"]]
    for row in rows:
        speed = row["speedup"]
        table.append(
            [
                row["workload"],
                row["unit"] or "",
                _fmt(row["ref"]["median"]),
                _fmt(row[THIS]["median"]),
                "-" if speed is None else f"{speed:.3f}x",
                f"{pct(row['ref']['spread'])}/{pct(row[THIS]['spread'])}",
                f"{row['ref']['runs']}/{row[THIS]['runs']}",
            ]
        )
    print_cells(table, out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("ref", help="the commit, tag or branch to compare against")
    p.add_argument("--rounds", type=_positive, default=2, help="rounds (default 2)")
    p.add_argument("--reps", type=_positive, help="runs per tree and round (default 5, quick 1)")
    p.add_argument("--workloads", help="comma-separated cases, as python -m benchmarks takes")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--json", type=Path, help="also write the runs and the summary here")
    p.add_argument("--timeout", type=float, help="seconds per run (default 900, quick 120)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the A/B; returns the exit status."""
    args = _parser().parse_args(argv)
    cases = _select(args.workloads)
    reps = args.reps or (1 if args.quick else 5)
    timeout = args.timeout or (120.0 if args.quick else 900.0)
    with tempfile.TemporaryDirectory(prefix="hbtrio-ab-") as tmp:
        try:
            srcs = {THIS: None, "ref": export(args.ref, Path(tmp))}
        except SystemExit as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        runs: list[dict[str, Any]] = []
        progress = Progress(args.rounds * len(cases) * 2 * reps)
        for rnd in range(args.rounds):
            for i, case in enumerate(cases):
                for rep in range(1, reps + 1):
                    first = (rnd + i + rep) % 2 == 1
                    for tree in [THIS, "ref"] if first else ["ref", THIS]:
                        name = THIS if tree == THIS else args.ref
                        text = f"round {rnd + 1}/{args.rounds} {case.label} {name} {rep}/{reps}"
                        progress.begin(text)
                        line = run_one(
                            case, "hbtrio", quick=args.quick, timeout=timeout, src=srcs[tree]
                        )
                        line.update(tree=tree, round=rnd + 1, rep=rep)
                        runs.append(line)
                        progress.end(text, line)
    rows = summarize_ab(runs, cases)
    print_ab(rows, args.ref)
    failures = [r for r in runs if not r["ok"]]
    for r in failures:
        print(f"FAILED: {r['case']} ({r['tree']}): {r.get('error')}", file=sys.stderr)
    if args.json is not None:
        document = {"ref": args.ref, "rounds": args.rounds, "reps": reps, "quick": args.quick}
        document |= {"summary": rows, "runs": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
