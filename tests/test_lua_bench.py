"""Smoke test of benchmarks/lua_bench.py: it runs and reports every case. Never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_lua_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "lua.json"
    args = ["--quick", "--reps", "1", "--slots", "50", "--accounts", "50", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "benchmarks/lua_bench.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = {run["case"] for run in json.loads(out.read_text())["runs"]}
    assert "cold-start/ledger-restore+1-slot" in cases and "hot-vm/ledger" in cases
    assert len(cases) == 9
