"""What the commands print: messages as aligned ``key  value`` lines, tables as columns.

Bytes are shown as their length and first 16 bytes in hex, strings as they
are, anything else as compact JSON; a missing table cell is ``-``. Pure
functions returning text (the caller prints it): callable from anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import _jsonwire


def _value_text(value: object) -> str:
    if isinstance(value, bytes):
        shown = value[:16].hex()
        return f"<{len(value)} bytes: {shown}{'...' if len(value) > 16 else ''}>"
    if isinstance(value, str):
        return value
    return _jsonwire.dumps(value).decode("utf-8")


def format_message(message: Mapping[str, Any], first: Sequence[str] = ("at-slot",)) -> str:
    """A message as aligned ``key  value`` lines (``first`` keys on top)."""
    keys = [k for k in first if k in message] + sorted(k for k in message if k not in first)
    if not keys:
        return "(empty)"
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {_value_text(message[k])}" for k in keys)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns with a header row."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
