"""Inside valgrind, for `benchmarks.instructions`: one workload run, with callgrind's
counters dumped at the calls of ``perf_counter`` that open and close its timed span.

Usage: ``python -m benchmarks._span HELPER OPENS CLOSES -- WORKLOAD-ARGS...``. Imports
nothing beyond what ``python -m benchmarks.workloads`` does (and ctypes), so that the
garbage collector's passes inside the span cost what they cost in a benchmark run.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Sequence

from . import workloads


def main(argv: Sequence[str]) -> int:
    """Run the workload of ``argv`` (see the module docstring); its exit status."""
    lib, opens, closes, rest = argv[0], int(argv[1]), int(argv[2]), list(argv[3:])
    if rest[:1] == ["--"]:
        rest = rest[1:]
    helper = ctypes.CDLL(lib)
    names = vars(workloads)  # the module's globals: its perf_counter is looked up there
    clock: Callable[[], float] = names["perf_counter"]
    calls = 0

    def perf_counter() -> float:
        nonlocal calls
        calls += 1
        if calls in (opens, closes):
            helper.hbtrio_span()
        return clock()

    names["perf_counter"] = perf_counter
    return workloads.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
