"""What the commands print: messages as aligned ``key  value`` lines, tables as columns.

Bytes are shown as their length and first 16 bytes in hex, strings as they
are, anything else as compact JSON; a missing table cell is ``-``. Pure
functions returning text (the caller prints it): callable from anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

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


#: The keys of a process result in the JSON interface's form (WASM and Lua processes).
RESULT_KEYS: Final = frozenset({"output", "messages"})


def is_process_result(message: Mapping[str, Any]) -> bool:
    """Whether ``message`` is a slot's result in the JSON interface's form (docs/wasm.md)."""
    return message.keys() >= RESULT_KEYS


def format_result(message: Mapping[str, Any]) -> tuple[str, list[str]]:
    """A process result as its output data, plainly, and notes for stderr.

    The output is printed as it is when it is text, else as JSON; the notes
    say the error the process reported (or the failure recorded for the
    slot) and how many outbox messages, spawns and assignments it made.
    """
    output = message.get("output")
    text = output if isinstance(output, str) else _jsonwire.dumps(output).decode()
    notes = []
    if message.get("error") is not None:
        kind = message.get("error-kind")
        notes.append(f"error{f' ({kind})' if kind else ''}: {message['error']}")
    for key in ("messages", "spawns", "assignments"):
        items = message.get(key)
        if items:
            notes.append(f"{len(items)} {key[:-1] if len(items) == 1 else key} (--json shows them)")
    return text, notes


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
