"""Argument checks shared by the fault injectors (`FaultyStore`, `FaultyDevice`).

Pure functions: each returns its argument, or raises `ValueError` naming it.
"""

from __future__ import annotations

__all__ = ["check_after", "check_times"]


def check_times(times: int | None) -> int | None:
    """``times``: how often a fault fires (``None``: until cleared)."""
    if times is not None and (type(times) is not int or times < 1):
        raise ValueError(f"times must be an int >= 1 or None, not {times!r}")
    return times


def check_after(after: int) -> int:
    """``after``: how many matching calls a fault lets through first."""
    if type(after) is not int or after < 0:
        raise ValueError(f"after must be an int >= 0, not {after!r}")
    return after
