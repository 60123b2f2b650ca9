"""Smoke tests for the benchmark suite: it runs and its result checks pass. Never timings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = [
    "W1_roundtrip",
    "W2_catchup",
    "W3_fanout",
    "W4_many_groups",
    "W5_dedup",
    "W6_cold_restore",
]
CASES = {"w1", "w2", "w2-sqlite", "w3", "w3-parked", "w4", "w5", "w6"}

try:
    from hbtrio import open_engine  # noqa: F401

    HAVE_ENGINE = True
except ImportError:
    HAVE_ENGINE = False


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _run_suite(impls: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "results.json"
    proc = _run(
        "benchmarks", "--quick", "--reps", "1", "--impl", impls, "--no-latest", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document: dict[str, Any] = json.loads(out.read_text())
    runs = document["runs"]
    assert document["failures"] == 0
    assert {(r["case"], r["impl"]) for r in runs} == {
        (case, impl) for case in CASES for impl in impls.split(",")
    }
    for run in runs:
        assert run["ok"], run
        assert run["check"]["ok"], run
        assert run["check"]["bad_responses"] == 0, run
        assert run["gc_enabled"], run
    for run in runs:
        if run["workload"] == "W5_dedup":
            assert run["executions"] == 1, run
    # The table names every workload.
    for name in WORKLOADS:
        assert name in proc.stdout
    return document


def test_baselines_quick(tmp_path: Path) -> None:
    _run_suite("trio,asyncio", tmp_path)


@pytest.mark.skipif(not HAVE_ENGINE, reason="hbtrio.open_engine cannot be imported yet")
def test_hbtrio_quick(tmp_path: Path) -> None:
    document = _run_suite("hbtrio", tmp_path)
    by_case = {r["case"]: r for r in document["runs"]}
    assert by_case["w2-sqlite"]["variant"] == "sqlite"
    assert by_case["w4"]["live_workers"] == by_case["w4"]["params"]["n"]


@pytest.mark.parametrize("impl", ["trio", "asyncio"])
def test_one_workload_prints_one_json_line(impl: str) -> None:
    proc = _run("benchmarks.workloads", "w1", "--n", "50", "--impl", impl)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["impl"] == impl
    assert line["workload"] == "W1_roundtrip"
    assert line["unit"] == "us_per_request"
    assert isinstance(line["value"], float)
    assert line["check"] == {
        "responses": 50,
        "expected_responses": 50,
        "bad_responses": 0,
        "final_count": 50 * 51 // 2,
        "expected_final_count": 50 * 51 // 2,
        "ok": True,
    }


@pytest.mark.skipif(not HAVE_ENGINE, reason="hbtrio.open_engine cannot be imported yet")
def test_hbtrio_bench_runs_the_suite_from_anywhere(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    suite_args = ["--quick", "--reps", "1", "--workloads", "w1", "--impl", "hbtrio"]
    proc = subprocess.run(
        [sys.executable, "-m", "hbtrio", "bench", *suite_args, "--no-latest", "--json", str(out)],
        cwd=tmp_path,  # not the checkout: the command finds the suite itself
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["workload"], run["impl"], run["check"]["ok"]) == ("W1_roundtrip", "hbtrio", True)
    assert "W1_roundtrip" in proc.stdout


def test_wire_bench_runs_and_its_decoders_agree(tmp_path: Path) -> None:
    out = tmp_path / "wire.json"
    args = ["--quick", "--reps", "1", "--mib", "0.01", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "benchmarks/wire_bench.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["case"], r["body"]) for r in rows} >= {
        ("cbor-decode", "schedule-body"),
        ("json-decode", "floats"),
        ("cbor-answer", "maps"),
    }
    assert all(r["ok"] for r in rows)


def test_big_bodies_bench_runs_against_a_baseline_tree(tmp_path: Path) -> None:
    out = tmp_path / "big.json"
    args = ["--rounds", "1", "--seconds", "0.5", "--idle-seconds", "0.2", "--big-clients", "1"]
    args += ["--body-bytes", "100000", "--baseline-src", str(REPO / "src"), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "benchmarks/big_bodies.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    rows = {(r["node"], r["phase"]): r for r in document["results"]}
    assert set(rows) == {(n, p) for n in ("baseline", "this") for p in ("idle", "loaded")}
    assert all(r["errors"] == 0 and r["small_requests"] > 0 for r in rows.values())
    assert rows["this", "loaded"]["big_posts"] > 0
    assert set(document["ratios_loaded"]) >= {"small_p50_ms", "small_p99_ms"}


_IS_CHECKOUT = (REPO / ".git").exists()


@pytest.mark.skipif(not (HAVE_ENGINE and _IS_CHECKOUT), reason="needs hbtrio and a git checkout")
def test_ab_runs_both_trees_interleaved(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    proc = _run(
        "benchmarks.ab", "HEAD", "--quick", "--rounds", "2", "--reps", "2",
        "--workloads", "w1,w5", "--json", str(out), timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    runs = document["runs"]
    # Run by run, case by case and round by round, the tree that goes first alternates.
    order = [(r["round"], r["case"], r["rep"], r["tree"]) for r in runs]
    this_first = [(1, "w1", 1), (1, "w5", 2), (2, "w1", 2), (2, "w5", 1)]
    assert order == [
        (rnd, case, rep, tree)
        for rnd in (1, 2)
        for case in ("w1", "w5")
        for rep in (1, 2)
        for tree in (["this", "ref"] if (rnd, case, rep) in this_first else ["ref", "this"])
    ]
    assert all(r["ok"] and r["check"]["ok"] for r in runs)
    for row in document["summary"]:
        assert row["this"]["runs"] == row["ref"]["runs"] == 4
        assert row["speedup"] > 0
    table = proc.stdout.splitlines()
    assert table[0].split()[:5] == ["workload", "unit", "HEAD", "this", "this/ref"]
    assert [line.split()[0] for line in table[2:]] == ["W1_roundtrip", "W5_dedup"]


def test_ab_refuses_a_ref_that_is_not_a_commit_in_one_line() -> None:
    proc = _run("benchmarks.ab", "no-such-ref-anywhere", "--quick", "--workloads", "w1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot export 'no-such-ref-anywhere'")
    assert proc.stderr.count("\n") == 1


def test_ab_speedup_reads_every_unit_the_same_way() -> None:
    from benchmarks.ab import speedup

    assert speedup(2.0, 4.0, "us_per_request") == 2.0  # half the time: twice as fast
    assert speedup(200.0, 100.0, "requests_per_second") == 2.0
    assert speedup(5.0, 4.0, "ms") == 0.8


def test_instructions_cover_every_case_of_the_suite() -> None:
    from benchmarks.instructions import SPANS
    from benchmarks.runner import CASES as RUNNER_CASES

    assert set(SPANS) == {c.name for c in RUNNER_CASES} == CASES
    for name, span in SPANS.items():
        assert 1 <= span.opens < span.closes, name
        assert span.args[0] == span.quick[0] == name.partition("-")[0]


def test_instructions_say_in_one_line_what_they_need() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}  # neither valgrind nor cc on it
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--workloads", "w1"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "error: python -m benchmarks.instructions needs valgrind " \
        "(Debian: apt-get install valgrind)\n"  # fmt: skip
    proc = _run("benchmarks.instructions", "--workloads", "w9")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown workloads: w9")


@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("cc") is None,
    reason="needs valgrind and cc",
)
def test_instructions_count_the_timed_span_in_both_trees(tmp_path: Path) -> None:
    out = tmp_path / "counts.json"
    proc = _run(
        "benchmarks.instructions", "HEAD", "--quick", "--workloads", "w1,w6", "--runs", "2",
        "--json", str(out), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(r["case"], r["run"], r["tree"]) for r in runs] == [
        (case, run, tree) for case in ("w1", "w6") for run in (1, 2) for tree in ("this", "ref")
    ]
    assert all(r["ok"] and r["instructions"] > 0 for r in runs), runs
    # The span alone: 200 requests, far less than the interpreter's start-up (40 million).
    assert all(r["instructions"] < 20_000_000 for r in runs if r["case"] == "w1")
    table = proc.stdout.splitlines()
    assert table[0].split() == ["case", "per", "this", "HEAD", "this/ref", "medians", "costliest"]
    assert [line.split()[0] for line in table[2:]] == ["w1", "w6"]
