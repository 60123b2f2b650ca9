"""Instructions: what each workload's timed span costs, counted by valgrind, here and in REF.

Usage::

    python -m benchmarks.instructions [REF] [--workloads w1,w4,...] [--runs 3]
                                      [--impl hbtrio|trio] [--quick] [--json PATH]

Wall-clock time on a shared machine moves by 10-50% from one run to the
next; the work a workload does does not. Each case runs ``--runs`` times per
tree under valgrind's callgrind, which counts the instructions executed, in
every thread, between the start and the end of the workload's timed span: a
helper library, compiled here from two lines of C against valgrind's
``callgrind.h``, has callgrind dump its counters at the workload's
``perf_counter()`` calls that open and close the span (`SPANS`).

The table gives the fewest instructions per unit (a request, a slot, a
waiter...) in each tree, this tree against REF (``0.90x``: this tree does
10% fewer), the same for the medians, and how many more the costliest run of
each tree took. A count repeats to about 1%, or falls in one of two modes:
w3 in slot order (trio's scheduler picks the order a batch of tasks runs
in), w6 (whether a full collection falls inside the span), w1 by a few
percent (the collector's timing). Compare the fewest, or the medians where
one tree's fewest is its rare mode. Instructions are not time: cache
misses, the GIL's hand-overs between the event loop and a store's thread,
and system calls are not in them. The workload runs in ``benchmarks._span``,
which imports no more than ``python -m benchmarks.workloads`` does: the
collector's passes cost what they cost in a benchmark run.

REF is exported as `benchmarks.ab` exports it, and both trees run this
checkout's workloads. With ``--impl trio`` the trio baseline runs instead of
hbtrio (in this tree only). Needs valgrind and a C compiler (Debian:
``apt-get install valgrind gcc``); about 15 seconds a run (W2[sqlite] and W6
30), 13 minutes for every case in both trees. Progress goes to stderr; the
exit status is 1 when a run failed its checks, 2 when the tools or REF are
missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ab import export
from .runner import REPO, _env, _fmt, _select, print_cells
from .workloads import _positive

__all__ = ["SPANS", "Span", "count", "main"]

THIS = "this"

_HELPER_C = "#include <valgrind/callgrind.h>\nvoid hbtrio_span(void) { CALLGRIND_DUMP_STATS; }\n"


@dataclass(frozen=True)
class Span:
    """Where a case's timed span is: between the ``opens``-th and the ``closes``-th call
    of ``perf_counter`` in `benchmarks.workloads`, over ``units`` of ``unit``."""

    args: tuple[str, ...]
    quick: tuple[str, ...]
    opens: int
    closes: int
    units: int
    quick_units: int
    unit: str


#: Each case of `benchmarks.runner.CASES`: its sizes here and where its span is.
SPANS: dict[str, Span] = {
    "w1": Span(("w1", "--n", "2000"), ("w1", "--n", "200"), 1, 2, 2000, 200, "request"),
    "w2": Span(("w2", "--n", "5000"), ("w2", "--n", "500"), 1, 2, 5000, 500, "slot"),
    "w2-sqlite": Span(
        ("w2", "--n", "5000", "--store", "sqlite"),
        ("w2", "--n", "500", "--store", "sqlite"),
        1,
        3,  # until durable, as its figure
        5000,
        500,
        "slot",
    ),
    # One perf_counter call opens the span and one per waiter: the last one closes it.
    "w3": Span(("w3", "--n", "1000"), ("w3", "--n", "100"), 1, 1001, 1000, 100, "waiter"),
    "w3-parked": Span(
        ("w3", "--n", "1000", "--order", "parked"),
        ("w3", "--n", "100", "--order", "parked"),
        1,
        1001,
        1000,
        100,
        "waiter",
    ),
    "w4": Span(("w4", "--n", "200"), ("w4", "--n", "20"), 1, 2, 200, 20, "process"),
    "w5": Span(("w5", "--n", "1000"), ("w5", "--n", "100"), 1, 2, 1000, 100, "call"),
    # The warm span is the first two calls; the cold one opens at the third.
    "w6": Span(("w6",), ("w6", "--n", "500", "--every", "100"), 3, 5, 1, 1, "restore"),
}


def _tools() -> str | None:
    """Why the counts cannot be taken here, or ``None``."""
    if shutil.which("valgrind") is None:
        return "needs valgrind (Debian: apt-get install valgrind)"
    if shutil.which("cc") is None:
        return "needs a C compiler as cc (Debian: apt-get install gcc)"
    return None


def build_helper(into: Path) -> Path:
    """Compile the helper library into ``into``; raises `SystemExit` with a one-line reason."""
    source, lib = into / "span.c", into / "span.so"
    source.write_text(_HELPER_C)
    proc = subprocess.run(
        ["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["cc failed"])[0]
        raise SystemExit(f"cannot build the helper (valgrind's headers missing?): {why}")
    return lib


def count(
    case: str,
    *,
    lib: Path,
    out_dir: Path,
    src: Path | None = None,
    impl: str = "hbtrio",
    quick: bool = False,
    timeout: float = 900.0,
    run: int = 1,
) -> dict[str, Any]:
    """Run ``case`` once under callgrind (the ``run``-th time); its instructions per unit
    and the run's details.

    ``src`` is the hbtrio to import (default this checkout's). Never raises
    for a failed run: ``ok`` is False and ``error`` says why.
    """
    span = SPANS[case]
    args = span.quick if quick else span.args
    units = span.quick_units if quick else span.units
    stem = out_dir / f"{case}.{impl}.{'ref' if src else THIS}.{run}"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={stem}.%p",
        sys.executable,
        "-m",
        "benchmarks._span",
        str(lib),
        str(span.opens),
        str(span.closes),
        "--",
        *args,
        "--impl",
        impl,
    ]
    line: dict[str, Any] = {"case": case, "impl": impl, "unit": span.unit, "units": units}
    line["run"] = run
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command, env=_env(src), cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return line | {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    line["wall_s"] = time.perf_counter() - started
    result = _last_json(proc.stdout)
    if proc.returncode != 0 or result is None or not result.get("check", {}).get("ok"):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return line | {"ok": False, "error": f"exit status {proc.returncode}: {tail}"}
    dumps = sorted(out_dir.glob(f"{stem.name}.*.2"))
    instructions = _summary(dumps[0]) if dumps else None
    if instructions is None:
        return line | {"ok": False, "error": "callgrind wrote no dump for the span"}
    return line | {"ok": True, "instructions": instructions, "value": instructions / units}


def _last_json(text: str) -> dict[str, Any] | None:
    for row in reversed(text.strip().splitlines()):
        try:
            value = json.loads(row)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _summary(dump: Path) -> int | None:
    """The instructions a callgrind dump counts (its ``summary:`` line)."""
    for row in dump.read_text(errors="replace").splitlines():
        if row.startswith("summary:"):
            return int(row.split()[1])
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("ref", nargs="?", help="a commit, tag or branch to compare against")
    p.add_argument("--workloads", help="comma-separated cases, as python -m benchmarks takes")
    p.add_argument("--impl", choices=["hbtrio", "trio"], default="hbtrio")
    p.add_argument("--runs", type=_positive, default=3, help="runs per case and tree (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--json", type=Path, help="also write the counts here")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run (default 900)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Count, print the table; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.ref and args.impl != "hbtrio":
        print("error: --impl trio runs in this tree only (no REF)", file=sys.stderr)
        return 2
    try:
        cases = [c.name for c in _select(args.workloads)]
    except SystemExit as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    why = _tools()
    if why is not None:
        print(f"error: python -m benchmarks.instructions {why}", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hbtrio-instructions-") as tmp:
        try:
            lib = build_helper(Path(tmp))
            trees: dict[str, Path | None] = {THIS: None}
            if args.ref:
                trees["ref"] = export(args.ref, Path(tmp) / "ref")
        except SystemExit as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        total = len(cases) * len(trees) * args.runs
        for case in cases:
            for run in range(1, args.runs + 1):
                for tree, src in trees.items():
                    name = args.ref if tree == "ref" else THIS
                    line = count(
                        case,
                        lib=lib,
                        out_dir=Path(tmp),
                        src=src,
                        impl=args.impl,
                        quick=args.quick,
                        timeout=args.timeout,
                        run=run,
                    ) | {"tree": tree}
                    runs.append(line)
                    status = (
                        f"{_fmt(line['value'])} instructions/{line['unit']}"
                        if line["ok"]
                        else f"FAILED: {line['error']}"
                    )
                    print(
                        f"[{len(runs):>2}/{total}] {case} {name} {run}/{args.runs}: {status}",
                        file=sys.stderr,
                    )
    _print(runs, cases, args.ref, args.impl)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"ref": args.ref, "impl": args.impl, "quick": args.quick, "runs": runs}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 1 if any(not r["ok"] for r in runs) else 0


def _print(runs: list[dict[str, Any]], cases: list[str], ref: str | None, impl: str) -> None:
    def values(case: str, tree: str) -> list[float]:
        return [
            float(r["value"]) for r in runs if r["case"] == case and r["tree"] == tree and r["ok"]
        ]

    def costliest(counts: list[float]) -> str:
        return f"+{max(counts) / min(counts) - 1:.0%}" if counts else "-"

    head = ["case", "per", THIS if impl == "hbtrio" else impl]
    table = [head + ([ref, "this/ref", "medians", "costliest"] if ref else ["costliest"])]
    for case in cases:
        this = values(case, THIS)
        row = [case, SPANS[case].unit, _fmt(min(this) if this else None)]
        if ref:
            other = values(case, "ref")
            both = bool(this and other)
            row += [
                _fmt(min(other) if other else None),
                f"{min(this) / min(other):.3f}x" if both else "-",
                f"{statistics.median(this) / statistics.median(other):.3f}x" if both else "-",
                f"{costliest(this)}/{costliest(other)}",
            ]
        else:
            row.append(costliest(this))
        table.append(row)
    print_cells(table, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
