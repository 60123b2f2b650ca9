"""``hbtrio bench``: the benchmark suite of the source checkout this package runs from.

The suite (``benchmarks/``) is not part of the package: it sits beside
``src/`` in a source checkout, and an installed hbtrio has none. The command
finds the checkout from this file's location (the directory holding
``benchmarks/runner.py``) and runs ``python -m benchmarks ARGS...`` there, in
a subprocess of the same interpreter, with stdin, stdout and stderr
inherited; nothing of the suite is imported into this process. Its exit
status is the suite's (128 + N if the suite was killed by signal N, as a
shell reports it). Relative paths among ARGS (``--json run.json``) are
relative to the checkout's root, where the suite runs.

Ctrl-C reaches the suite too (it is in the terminal's process group).
`subprocess.Popen.wait` gives it a quarter of a second to stop on that
signal; if it has not (the signal was sent to this process alone, say), the
command interrupts it itself, kills it if it still runs `STOP_GRACE` seconds
later (at once on another Ctrl-C meanwhile), and then reports the
interruption as every command does (exit status 130). The command never
leaves the suite running behind it.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final

from ._errors import EXIT_USAGE, CliError

#: Seconds an interrupted suite gets to stop before it is killed.
STOP_GRACE: Final = 5.0


def checkout_root() -> Path:
    """The source checkout this package runs from; `CliError` if there is none."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "benchmarks" / "runner.py").is_file():
        raise CliError(
            "the benchmark suite comes with a source checkout of hbtrio, not with the "
            "installed package: install from a clone (pip install -e '.[bench]')",
            status=EXIT_USAGE,
        )
    return root


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``python -m benchmarks ARGS...`` in the checkout; its exit status."""
    root = checkout_root()
    suite = subprocess.Popen([sys.executable, "-m", "benchmarks", *args.bench_args], cwd=root)
    try:
        status = suite.wait()
    except KeyboardInterrupt:
        _stop(suite)
        raise
    finally:
        if suite.poll() is None:  # interrupted again, or anything else: never an orphan
            suite.kill()
            suite.wait()
    return status if status >= 0 else 128 - status


def _stop(suite: subprocess.Popen[bytes]) -> None:
    """Interrupt a suite that is still running, and kill it if it does not stop."""
    if suite.poll() is not None:
        return
    suite.send_signal(signal.SIGINT)
    try:
        suite.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        suite.kill()
        suite.wait()
