"""The JSON interface of AO modules: hbtrio messages in, results out.

Theory of operation
-------------------
For every message the module is given two JSON documents, the forms
`hbtrio._aoiface` makes (HyperBEAM's ``json-iface@1.0``) encoded as compact
UTF-8 JSON:

- the message (`message_json`), its ``Module`` the process's image ID;
- the environment, ``{"Process": {...}}`` (`Process.of`, once per process),
  its ``Image`` tag the image's ID, also for a definition that holds the
  module's bytes.

The module answers ``{"ok": true, "response": {"Output": ..., "Messages":
[...], "Spawns": [...], "Assignments": [...], "Error": ...}}`` or ``{"ok":
false, "response": <error>}``. `parse_result` makes the slot's result of it
(`hbtrio._aoiface`, the keys read exactly as HyperBEAM does, an ``Output``
object without ``data`` an empty output), with ``from-image`` in each
outgoing message; an ``"ok": false`` answer is an empty result with its
error. JSON values become message values: integers outside ``-2**64 ..
2**64-1`` become floats, and anything nested deeper than `MAX_NESTING`
levels, or a document that is not this form, is `WasmInterfaceError` (the
call failed). Everything here is pure and thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from .._aoiface import Dialect, folded
from .._message import MAX_INT, MIN_INT
from ._errors import WasmInterfaceError

__all__ = ["JSON", "MAX_NESTING", "Process", "message_json", "parse_result"]

#: Levels of nesting a value from the module may have (a message nests at most 100).
MAX_NESTING: Final = 90


def _value(value: Any, depth: int) -> Any:
    t = type(value)
    if t is str or t is bool or t is float or value is None:
        return value
    if t is int:
        if MIN_INT <= value <= MAX_INT:
            return value
        try:
            return float(value)
        except OverflowError:
            return str(value)
    if depth >= MAX_NESTING:
        raise WasmInterfaceError(f"the module's result nests deeper than {MAX_NESTING} levels")
    if t is list:
        return [_value(v, depth + 1) for v in value]
    if t is dict:
        return {k: _value(v, depth + 1) for k, v in value.items()}
    raise WasmInterfaceError(f"the module's result holds a {t.__name__}")  # pragma: no cover


#: The WASM device's reading of the interface.
JSON: Final = Dialect(
    error=WasmInterfaceError,
    not_utf8="bytes that are not UTF-8 cannot go into the JSON interface",
    answerer="the module's",
    origin="from-image",
    value=_value,
)


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


@attrs.frozen
class Process:
    """What every message of a process shares: its IDs, its owner and its environment JSON."""

    id: str
    image: str
    owner: str
    env: bytes

    @classmethod
    def of(cls, definition: Mapping[str, Any], pid: str, image: str) -> Process:
        d = folded(definition)
        if "image" in d:
            d["image"] = image  # the ID, also of an image given as bytes
        fields = JSON.process_fields(d, pid)
        return cls(id=pid, image=image, owner=fields["Owner"], env=_dumps({"Process": fields}))


def message_json(assignment: Mapping[str, Any], process: Process) -> bytes:
    """The message document for one assignment (see the module)."""
    return _dumps(JSON.message_fields(assignment, process.id, process.owner, process.image))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_result(raw: bytes, process: Process) -> dict[str, Any]:
    """The slot's result for what ``handle`` returned (see the module)."""
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        start = raw[:80].decode(errors="replace")
        raise WasmInterfaceError(f"handle returned invalid JSON ({exc}): {start!r}") from None
    if not isinstance(doc, dict) or "ok" not in doc:
        raise WasmInterfaceError('handle returned JSON without an "ok" key')
    if doc["ok"] is not True:
        error = doc.get("response", doc.get("error", "the module failed"))
        return {**JSON.result({}, process.id, process.image), "error": JSON.error_text(error)}
    response = doc.get("response")
    if not isinstance(response, dict):
        raise WasmInterfaceError('handle returned ok without a "response" object')
    return JSON.result(response, process.id, process.image)
