"""Tools to test devices and applications built on hbtrio under faults, cancellation and timeouts.

This module is public (``import hbtrio.testing``) but not re-exported by
``hbtrio`` itself. It needs nothing beyond hbtrio's own dependencies, and works
with any Trio test runner (the examples use pytest-trio).

Fault injection
    `FaultyStore` wraps any `hbtrio.Store` and makes chosen calls fail like a
    full disk, a locked database or an I/O error (`hbtrio.StoreError` with the
    kind of cause a real store would give), or makes them slow or hang.
    `FaultyDevice` wraps an execution device and raises, delays, hangs or
    returns invalid or non-deterministic data at chosen slots.

Engines for tests
    `open_test_engine` is `hbtrio.open_engine` plus the checks every test
    wants when the block exits: no task outlived the engine and no worker
    crashed.

Cancellation
    `cancel_at_checkpoint` runs a call and cancels it at its k-th checkpoint;
    `run_with_cancel_at_each_checkpoint` walks k = 0, 1, 2, ... until the
    call completes, checking the system after every cancelled attempt.

Consistency
    `replay` computes a process's states from scratch, `audit_process`
    checks everything a store holds for a process (schedule, hash chain,
    every stored result and snapshot) against such a replay, and
    `assert_deterministic` replays twice and compares message IDs.

See ``docs/reliability.md`` for what hbtrio promises under faults and for
worked examples (which the test suite runs).

The modules: ``_faultystore`` and ``_faultydevice`` (fault injection, with
``_options``, the argument checks they share), ``_engines``,
``_cancellation`` and ``_consistency``; everything public is re-exported
here, as ``hbtrio.testing``'s own.
"""

from ._cancellation import cancel_at_checkpoint as cancel_at_checkpoint
from ._cancellation import run_with_cancel_at_each_checkpoint as run_with_cancel_at_each_checkpoint
from ._consistency import AuditError as AuditError
from ._consistency import AuditReport as AuditReport
from ._consistency import assert_deterministic as assert_deterministic
from ._consistency import audit_process as audit_process
from ._consistency import replay as replay
from ._engines import open_test_engine as open_test_engine
from ._faultydevice import FaultyDevice as FaultyDevice
from ._faultystore import ALL_METHODS as ALL_METHODS
from ._faultystore import READ_METHODS as READ_METHODS
from ._faultystore import WRITE_METHODS as WRITE_METHODS
from ._faultystore import Fault as Fault
from ._faultystore import FaultKind as FaultKind
from ._faultystore import FaultyStore as FaultyStore

__all__ = [
    "ALL_METHODS",
    "READ_METHODS",
    "WRITE_METHODS",
    "AuditError",
    "AuditReport",
    "Fault",
    "FaultyDevice",
    "FaultyStore",
    "assert_deterministic",
    "audit_process",
    "cancel_at_checkpoint",
    "open_test_engine",
    "replay",
    "run_with_cancel_at_each_checkpoint",
]

# Present public names as hbtrio.testing's own (tracebacks, reprs, docs), as they were
# when this was one module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("hbtrio.testing._"):
        _obj.__module__ = "hbtrio.testing"
del _name, _obj
