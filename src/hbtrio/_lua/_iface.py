"""The message a Lua process's ``handle(msg, env)`` gets, and the result made of its answer.

Theory of operation
-------------------
The same form as the WASM device's JSON interface (HyperBEAM's
``json-iface@1.0``), given to Lua as tables instead of JSON text:

- ``msg``: ``Id`` (the assignment's message ID), ``Owner``, ``From``,
  ``Target``, ``Anchor``, ``Data``, ``Signature``, ``Tags`` (every other key
  of the body as ``{name = Header-Case-Name, value = text}``, sorted by
  name), ``Module`` (the ID of the process's first module), ``Block-Height``
  and ``Timestamp`` (the assignment's, Unix milliseconds). As aos does, each
  tag is a field of ``msg`` too (``msg.Action``), unless a field of the form
  has its name;
- ``env``: ``{Process = {...}}``, the process definition in the same form,
  its ``Id`` the process ID; its ``module`` key is the tag ``Module`` holding
  the modules' IDs (comma-separated), and an inline ``script`` is left out.

hbtrio verifies no signatures: a body's ``owner`` is what it says, and a body
that names none is the process owner's (the definition's ``owner``, ``""``
without one). ``From`` is a ``from-process`` key or else the owner. Keys are
read case-insensitively. Values become text: strings as they are, UTF-8
bytes decoded, ``true``/``false``, numbers in decimal, lists and mappings as
JSON.

``handle`` returns a table with any of ``Output``, ``Messages``, ``Spawns``,
``Assignments`` and ``Error`` (in any case); `parse_result` makes the slot's
result of it::

    {"output": <Output's data (or Output itself when it is no table with data)>,
     "messages": [<outbox message>, ...], "spawns": [...], "assignments": [...],
     "error": <text, only when the script reported one>}

A script that returns no output has the lines it printed as its output. An
outbox message or spawn has its fields' names in lower case with its tags
merged in (a tag wins over a field of the same name), plus ``from-process``
(the process ID) and ``from-module`` (its first module's ID). Returning
``nil`` is an empty result; a string or number is the output. Pure and
thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from .._jsonwire import to_json
from ._errors import LuaResultError

__all__ = ["FIELDS", "Process", "header_case", "message_fields", "parse_result"]

#: Keys of a message that are fields of the form, not tags (as HyperBEAM has it).
FIELDS: Final = frozenset({"id", "anchor", "owner", "data", "target", "signature", "commitments"})
#: Keys of a definition that only say where the process's code is.
CODE_KEYS: Final = frozenset({"module", "script"})


def header_case(key: str) -> str:
    """``"data-protocol"`` -> ``"Data-Protocol"`` (HTTP header case, as HyperBEAM's tags)."""
    return "-".join(w[:1].upper() + w[1:] for w in key.lower().split("-") if w)


def text(value: object, what: str) -> str:
    """A message value as the text of a field or a tag."""
    if type(value) is str:
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise LuaResultError(f"{what}: bytes that are not UTF-8 cannot be a tag") from None
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


def _with_tags(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with each tag also a field, where no field has its name (aos's habit)."""
    for tag in fields["Tags"]:
        fields.setdefault(tag["name"], tag["value"])
    return fields


@attrs.frozen
class Process:
    """What every message of a process shares: its IDs, its owner and its ``env``."""

    id: str
    module: str
    owner: str
    env: dict[str, Any]

    @classmethod
    def of(cls, definition: Mapping[str, Any], pid: str, modules: list[str]) -> Process:
        d = {k: v for k, v in _folded(definition).items() if k not in CODE_KEYS}
        if modules:
            d["module"] = ",".join(modules)
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
        module = modules[0] if modules else ""
        return cls(id=pid, module=module, owner=owner, env={"Process": _with_tags(fields)})


def message_fields(assignment: Mapping[str, Any], process: Process) -> dict[str, Any]:
    """The ``msg`` table for one assignment (see the module), as Python values."""
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
        "Module": process.module,
        "Block-Height": height if type(height) is int else text(height, "block-height"),
        "Timestamp": assignment.get("timestamp", 0),
    }
    return _with_tags(fields)


# results ----------------------------------------------------------------------------------------


def _outgoing(message: Any, process: Process) -> Any:
    if not isinstance(message, dict):
        return message
    out: dict[str, Any] = {}
    tags = None
    for key, value in message.items():
        if key.lower() == "tags":
            tags = value
        else:
            out[key.lower()] = value
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, dict) and isinstance(tag.get("name"), str):
                out[tag["name"].lower()] = tag.get("value")
    elif isinstance(tags, dict):  # {Name = value} tables: a Lua habit
        for name, value in tags.items():
            out[name.lower()] = value
    out["from-process"] = process.id
    out["from-module"] = process.module
    return out


def _error_text(error: Any) -> str:
    return error if isinstance(error, str) else text(error, "error")


def _list(response: Mapping[str, Any], key: str) -> list[Any]:
    value = response.get(key)
    if value is None or value == {}:
        return []
    if not isinstance(value, list):
        raise LuaResultError(f"handle's {key} is a {type(value).__name__}, not a list")
    return value


def parse_result(answer: Any, printed: str, process: Process) -> dict[str, Any]:
    """The slot's result for what ``handle`` returned (as `from_lua` gave it) and printed."""
    result: dict[str, Any] = {"output": "", "messages": [], "spawns": [], "assignments": []}
    if isinstance(answer, dict):
        response = _folded(answer)
        output = response.get("output")
        if isinstance(output, dict) and "data" in _folded(output):
            output = _folded(output)["data"]
        result["output"] = "" if output is None else output
        result["messages"] = [_outgoing(m, process) for m in _list(response, "messages")]
        result["spawns"] = [_outgoing(m, process) for m in _list(response, "spawns")]
        result["assignments"] = _list(response, "assignments")
        error = response.get("error")
        if error is not None and error != "":
            result["error"] = _error_text(error)
    elif answer is not None:
        if isinstance(answer, list):
            raise LuaResultError("handle returned a list, not a result table")
        result["output"] = answer
    if result["output"] == "" and printed:
        result["output"] = printed
    return result
