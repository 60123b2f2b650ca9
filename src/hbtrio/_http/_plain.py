"""What the engine reports, as plain values that JSON and CBOR can carry.

Worker-info records, engine statistics and the values inside errors
(a device's name) are whatever the engine made them: attrs records, enums,
objects of a user's device. These turn them into wire-safe values, falling
back to ``repr``/``str`` rather than failing an answer. Pure functions of
their argument, with no state: callable from any task or thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .. import _codec
from .._exceptions import InvalidMessage


def plain(value: object) -> object:
    """A JSON/CBOR-safe rendering of an informational value (worker info, stats)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bytes | Mapping | list | tuple):
        try:
            _codec.encode(value)
        except InvalidMessage:
            return repr(value)
        return value
    for kind in (bool, int, float, str):  # subclasses such as enums
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def worker_info(info: object) -> dict[str, object]:
    """A worker-info record (``hbtrio.WorkerInfo``) as a plain mapping."""
    if attrs.has(type(info)):
        fields = attrs.asdict(info, recurse=False)  # type: ignore[arg-type]
    else:
        names = ("slot", "target", "waiting", "idle_seconds")
        fields = {name: getattr(info, name, None) for name in names}
    return {str(k): plain(v) for k, v in fields.items()}


def waiting(info: object) -> int:
    """How many requests wait on a worker, from its info record (0 if it does not say)."""
    waiting = getattr(info, "waiting", 0)
    return waiting if type(waiting) is int else 0


def stats_fields(stats: object) -> dict[str, Any]:
    """An engine-statistics record (``hbtrio.EngineStats``) as a mapping of its fields."""
    return attrs.asdict(stats) if attrs.has(type(stats)) else dict(vars(stats))  # type: ignore[arg-type]
