"""Baseline implementations of the workloads, to compare hbtrio against.

- `benchmarks.baselines.trio_impl`: the leanest hand-written Trio version.
- `benchmarks.baselines.asyncio_impl`: a straightforward asyncio version.

Both have hbtrio's semantics for these workloads and nothing more: one worker
task per process keeps the state in memory and computes forward, every slot
gets a fresh state dict kept per slot, waiters of a slot are woken when it is
computed, identical concurrent resolutions execute once, and the SQLite
variants persist per-slot results and snapshots from a thread.
"""
