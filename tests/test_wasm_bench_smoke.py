"""Smoke test of benchmarks/wasm_bench.py: it runs and its checks pass. Never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wasmtime")

REPO = Path(__file__).resolve().parent.parent


def test_the_wasm_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "wasm.json"
    env = {k: v for k, v in os.environ.items() if k != "HBTRIO_AOS_WASM"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/wasm_bench.py", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert [row["module"] for row in results["hot"]] == ["spin 0", "work (~0.6 ms)"]
    assert all(row["engine_per_s"] > 0 for row in results["hot"])
    assert results["cold"]["cold_ms"] > 0 and results["memory"]["processes"] == 20
    assert [p["processes"] for p in results["parallel"]] == [2, 4]
    assert {c["codec"] for c in results["codecs"]} >= {"zlib-1", "zstd-3"}
    assert "## hot slots per second" in proc.stdout
