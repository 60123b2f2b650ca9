"""The JSON interface of AO modules: hbtrio messages in, results out.

Theory of operation
-------------------
For every message the module is given two JSON documents, in the form
HyperBEAM's ``json-iface@1.0`` writes:

- the message: ``Id`` (the assignment's message ID), ``Owner``, ``From``,
  ``Target``, ``Anchor``, ``Data``, ``Signature``, ``Tags`` (every other key
  of the body, as ``{"name": Header-Case-Name, "value": text}``, sorted by
  name), ``Module`` (the process's image ID), ``Block-Height`` and
  ``Timestamp`` (the assignment's, Unix milliseconds);
- the environment, ``{"Process": {...}}``, the process definition in the
  same form, its ``Id`` the process ID (and its ``Image`` tag the image's
  ID, also for a definition that holds the module's bytes).

hbtrio verifies no signatures: a body's ``owner`` is what it says, and a
body that names none is the process owner's (the definition's ``owner``,
``""`` without one), so that an unsigned message can ``Eval``. ``From`` is a
``from-process`` key or else the owner. Keys are read case-insensitively
(``Data`` and ``data`` are the same field). Values become text: strings as
they are, UTF-8 bytes decoded, ``true``/``false``, numbers in decimal, lists
and mappings as JSON.

The module answers ``{"ok": true, "response": {"Output": ..., "Messages":
[...], "Spawns": [...], "Assignments": [...], "Error": ...}}`` or ``{"ok":
false, "response": <error>}``. `parse_result` makes the slot's result of it::

    {"output": <Output's "data" (or Output itself when it is not an object)>,
     "messages": [<outbox message>, ...], "spawns": [...], "assignments": [...],
     "error": <text, only when the module reported one>}

An outbox message or spawn has its fields' names in lower case with its tags
merged in (a tag wins over a field of the same name), plus ``from-process``
(the process ID) and ``from-image``. JSON values become message values:
integers outside ``-2**64 .. 2**64-1`` become floats, and anything nested
deeper than `MAX_NESTING` levels, or a document that is not this form, is
`WasmInterfaceError` (the call failed). Everything here is pure and
thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from .._jsonwire import to_json
from .._message import MAX_INT, MIN_INT
from ._errors import WasmInterfaceError

__all__ = ["MAX_NESTING", "Process", "header_case", "message_json", "parse_result"]

#: Levels of nesting a value from the module may have (a message nests at most 100).
MAX_NESTING: Final = 90
#: Keys of a message that are fields of the JSON form, not tags (as HyperBEAM has it).
FIELDS: Final = frozenset({"id", "anchor", "owner", "data", "target", "signature", "commitments"})


def header_case(key: str) -> str:
    """``"data-protocol"`` -> ``"Data-Protocol"`` (HTTP header case, as HyperBEAM's tags)."""
    return "-".join(w[:1].upper() + w[1:] for w in key.lower().split("-") if w)


def text(value: object, what: str) -> str:
    """A message value as the text of a JSON-interface field or tag."""
    if type(value) is str:
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise WasmInterfaceError(
                f"{what}: bytes that are not UTF-8 cannot go into the JSON interface"
            ) from None
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(to_json(value), separators=(",", ":"), ensure_ascii=False)


def _folded(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message's keys in lower case; an exactly lower-case key wins over its variants."""
    out: dict[str, Any] = {}
    for key, value in message.items():
        low = key.lower()
        if low not in out or key == low:
            out[low] = value
    return out


def _tags(folded: Mapping[str, Any], what: str) -> list[dict[str, str]]:
    return [
        {"name": header_case(key), "value": text(folded[key], f"{what} {key!r}")}
        for key in sorted(folded)
        if key not in FIELDS and header_case(key)
    ]


@attrs.frozen
class Process:
    """What every message of a process shares: its IDs, its owner and its environment JSON."""

    id: str
    image: str
    owner: str
    env: bytes

    @classmethod
    def of(cls, definition: Mapping[str, Any], pid: str, image: str) -> Process:
        d = _folded(definition)
        if "image" in d:
            d["image"] = image  # the ID, also of an image given as bytes
        owner = text(d.get("owner", ""), "process owner")
        fields = {
            "Id": pid,
            "Owner": owner,
            "From": text(d.get("from-process", owner), "process from-process"),
            "Target": text(d.get("target", ""), "process target"),
            "Anchor": text(d.get("anchor", ""), "process anchor"),
            "Data": text(d.get("data", ""), "process data"),
            "Signature": text(d.get("signature", ""), "process signature"),
            "Tags": _tags(d, "process tag"),
        }
        env = json.dumps({"Process": fields}, separators=(",", ":"), ensure_ascii=False)
        return cls(id=pid, image=image, owner=owner, env=env.encode())


def message_json(assignment: Mapping[str, Any], process: Process) -> bytes:
    """The message document for one assignment (see the module)."""
    d = _folded(assignment["body"])
    owner = text(d["owner"], "owner") if "owner" in d else process.owner
    height = d.get("block-height", 0)
    fields = {
        "Id": assignment["message-id"],
        "Owner": owner,
        "From": text(d.get("from-process", owner), "from-process"),
        "Target": text(d.get("target", process.id), "target"),
        "Anchor": text(d.get("anchor", ""), "anchor"),
        "Data": text(d.get("data", ""), "data"),
        "Signature": text(d.get("signature", ""), "signature"),
        "Tags": _tags(d, "tag"),
        "Module": process.image,
        "Block-Height": height if type(height) is int else text(height, "block-height"),
        "Timestamp": assignment.get("timestamp", 0),
    }
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


# results ----------------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


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


def _outgoing(message: Any, process: Process) -> Any:
    if not isinstance(message, dict):
        return _value(message, 2)
    out: dict[str, Any] = {}
    tags = None
    for key, value in message.items():
        if key.lower() == "tags":
            tags = value
        else:
            out[key.lower()] = _value(value, 3)
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, dict) and isinstance(tag.get("name"), str):
                out[tag["name"].lower()] = _value(tag.get("value"), 3)
    out["from-process"] = process.id
    out["from-image"] = process.image
    return out


def _error_text(error: Any) -> str:
    return error if isinstance(error, str) else json.dumps(error, ensure_ascii=False)


def _list(response: Mapping[str, Any], key: str) -> list[Any]:
    value = response.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise WasmInterfaceError(f"the module's {key} is a {type(value).__name__}, not a list")
    return value


def parse_result(raw: bytes, process: Process) -> dict[str, Any]:
    """The slot's result for what ``handle`` returned (see the module)."""
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        start = raw[:80].decode(errors="replace")
        raise WasmInterfaceError(f"handle returned invalid JSON ({exc}): {start!r}") from None
    if not isinstance(doc, dict) or "ok" not in doc:
        raise WasmInterfaceError('handle returned JSON without an "ok" key')
    result: dict[str, Any] = {"output": "", "messages": [], "spawns": [], "assignments": []}
    if doc["ok"] is not True:
        error = doc.get("response", doc.get("error", "the module failed"))
        result["error"] = _error_text(error)
        return result
    response = doc.get("response")
    if not isinstance(response, dict):
        raise WasmInterfaceError('handle returned ok without a "response" object')
    output = response.get("Output")
    if isinstance(output, dict):
        output = output.get("data", "")
    result["output"] = "" if output is None else _value(output, 1)
    result["messages"] = [_outgoing(m, process) for m in _list(response, "Messages")]
    result["spawns"] = [_outgoing(m, process) for m in _list(response, "Spawns")]
    result["assignments"] = [_value(a, 2) for a in _list(response, "Assignments")]
    error = response.get("Error")
    if error is not None and error != "":
        result["error"] = _error_text(error)
    return result
