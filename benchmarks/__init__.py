"""Benchmarks for hbtrio, with hand-written Trio and asyncio baselines.

``python -m benchmarks`` runs every workload for every implementation, each run
in a fresh subprocess, and prints medians and ratios; ``python -m
benchmarks.workloads w1 --impl trio`` runs one workload once and prints one
JSON line. See ``docs/benchmarks.md``.
"""
