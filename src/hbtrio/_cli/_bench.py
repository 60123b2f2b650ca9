"""``hbtrio bench``: the benchmark suite of the source checkout this package runs from."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ._errors import EXIT_USAGE, CliError


def cmd_bench(args: argparse.Namespace) -> int:
    """``python -m benchmarks`` of the checkout this package runs from."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "benchmarks" / "runner.py").is_file():
        raise CliError(
            "the benchmark suite comes with a source checkout of hbtrio, not with the "
            "installed package: install from a clone (pip install -e '.[bench]')",
            status=EXIT_USAGE,
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    runner = importlib.import_module("benchmarks.runner")
    status: int = runner.main(list(args.bench_args))
    return status
