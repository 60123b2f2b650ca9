"""The message and result forms of HyperBEAM's JSON interface, shared by the WASM and Lua devices.

Theory of operation
-------------------
For every message an AO process's code is given two documents, in the form
HyperBEAM's ``json-iface@1.0`` writes, and it answers with a third. This
module makes the first two of an assignment and reads the third, as Python
values; the WASM device encodes them as JSON text (`hbtrio._wasm._iface`),
the Lua device hands them to the VM as tables (`hbtrio._lua._iface`).

- the message (`Dialect.message_fields`): ``Id`` (the assignment's message
  ID), ``Owner``, ``From``, ``Target``, ``Anchor``, ``Data``, ``Signature``,
  ``Tags`` (every other key of the body, as ``{"name": Header-Case-Name,
  "value": text}``, sorted by name), ``Module`` (the ID of the process's
  code), ``Block-Height`` and ``Timestamp`` (the assignment's, Unix
  milliseconds);
- the environment's ``Process`` (`Dialect.process_fields`): the process
  definition in the same form, its ``Id`` the process ID.

hbtrio verifies no signatures: a body's ``owner`` is what it says, and a
body that names none is the process owner's (the definition's ``owner``,
``""`` without one), so that an unsigned message can ``Eval``. ``From`` is a
``from-process`` key or else the owner. Keys are read case-insensitively
(``Data`` and ``data`` are the same field: an exactly lower-case key wins).
Values become text: strings as they are, UTF-8 bytes decoded,
``true``/``false``, numbers in decimal, lists and mappings as JSON; bytes that
are not UTF-8 are the device's error.

The answer's response has ``Output``, ``Messages``, ``Spawns``,
``Assignments`` and ``Error``; `Dialect.result` makes the slot's result of
it::

    {"output": <Output's "data" (or Output itself when it is no mapping)>,
     "messages": [<outbox message>, ...], "spawns": [...], "assignments": [...],
     "error": <text, only when the code reported one>}

An outbox message or spawn has its fields' names in lower case with its tags
merged in (a tag wins over a field of the same name), plus ``from-process``
(the process ID) and the ID of the process's code (``from-image`` for WASM,
``from-module`` for Lua).

A `Dialect` holds what tells the devices apart: their error, that key, how
the answer's values become message values, and whether the answer is Lua
tables, which aos writes more loosely than HyperBEAM reads JSON (keys in any
case, ``{}`` for an empty list, ``{Name = value}`` tags, an ``Output`` table
without ``data`` as the output itself). Everything here is pure and
thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from ._jsonwire import to_json

__all__ = ["FIELDS", "RESPONSE_KEYS", "Dialect", "folded", "header_case"]

#: Keys of a message that are fields of the form, not tags (as HyperBEAM has it).
FIELDS: Final = frozenset({"id", "anchor", "owner", "data", "target", "signature", "commitments"})
#: The keys of an answer's response, as HyperBEAM's JSON interface reads them.
RESPONSE_KEYS: Final = ("Output", "Messages", "Spawns", "Assignments", "Error")


def header_case(key: str) -> str:
    """``"data-protocol"`` -> ``"Data-Protocol"`` (HTTP header case, as HyperBEAM's tags)."""
    return "-".join(w[:1].upper() + w[1:] for w in key.lower().split("-") if w)


def folded(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message's keys in lower case; an exactly lower-case key wins over its variants."""
    out: dict[str, Any] = {}
    for key, value in message.items():
        low = key.lower()
        if low not in out or key == low:
            out[low] = value
    return out


def _as_is(value: Any, depth: int) -> Any:
    return value


@attrs.frozen
class Dialect:
    """One device's reading of the interface (see the module)."""

    #: What a value that cannot be text, or an answer that is not the form, raises.
    error: type[Exception]
    #: What that error says of bytes that are not UTF-8, after the value's name.
    not_utf8: str
    #: Whose answer the error names: ``"the module's"``, ``"handle's"``.
    answerer: str
    #: The key of an outgoing message that names its sender's code.
    origin: str
    #: The answer is Lua tables (see the module); else JSON as HyperBEAM reads it.
    tables: bool = False
    #: A message value of an answer's value, ``depth`` levels into the answer.
    value: Callable[[Any, int], Any] = _as_is

    def text(self, value: object, what: str) -> str:
        """A message value as the text of a field or a tag."""
        if type(value) is str:
            return value
        if isinstance(value, bytes):
            try:
                return value.decode()
            except UnicodeDecodeError:
                raise self.error(f"{what}: {self.not_utf8}") from None
        if value is True or value is False:
            return "true" if value else "false"
        if value is None:
            return ""
        if isinstance(value, int | float):
            return json.dumps(value)
        return json.dumps(to_json(value), separators=(",", ":"), ensure_ascii=False)

    # messages ---------------------------------------------------------------------------------

    def process_fields(self, definition: Mapping[str, Any], pid: str) -> dict[str, Any]:
        """The environment's ``Process`` of a definition whose keys are `folded` already."""
        owner = self.text(definition.get("owner", ""), "process owner")
        return self._form(definition, pid, owner, "", "process ")

    def message_fields(
        self, assignment: Mapping[str, Any], pid: str, owner: str, code: str
    ) -> dict[str, Any]:
        """The message of one assignment to process ``pid`` of ``owner``, whose code is ``code``."""
        d = folded(assignment["body"])
        owner = self.text(d["owner"], "owner") if "owner" in d else owner
        height = d.get("block-height", 0)
        return {
            **self._form(d, assignment["message-id"], owner, pid, ""),
            "Module": code,
            "Block-Height": height if type(height) is int else self.text(height, "block-height"),
            "Timestamp": assignment.get("timestamp", 0),
        }

    def _form(
        self, d: Mapping[str, Any], mid: str, owner: str, target: str, of: str
    ) -> dict[str, Any]:
        """The fields and tags of ``d``; ``of`` starts what each value is called in errors."""
        text = self.text
        return {
            "Id": mid,
            "Owner": owner,
            "From": text(d.get("from-process", owner), f"{of}from-process"),
            "Target": text(d.get("target", target), f"{of}target"),
            "Anchor": text(d.get("anchor", ""), f"{of}anchor"),
            "Data": text(d.get("data", ""), f"{of}data"),
            "Signature": text(d.get("signature", ""), f"{of}signature"),
            "Tags": [
                {"name": header_case(key), "value": text(d[key], f"{of}tag {key!r}")}
                for key in sorted(d)
                if key not in FIELDS and header_case(key)
            ],
        }

    # results ----------------------------------------------------------------------------------

    def result(self, response: Mapping[str, Any], pid: str, code: str) -> dict[str, Any]:
        """The slot's result of an answer's response (see the module)."""
        keys: tuple[str, ...] = RESPONSE_KEYS
        if self.tables:
            response, keys = folded(response), tuple(k.lower() for k in keys)
        output, messages, spawns, assignments, error = (response.get(k) for k in keys)
        value = self.value
        result: dict[str, Any] = {
            "output": self._output(output),
            "messages": [self._outgoing(m, pid, code) for m in self._list(messages, keys[1])],
            "spawns": [self._outgoing(m, pid, code) for m in self._list(spawns, keys[2])],
            "assignments": [value(a, 2) for a in self._list(assignments, keys[3])],
        }
        if error is not None and error != "":
            result["error"] = self.error_text(error)
        return result

    def error_text(self, error: Any) -> str:
        """The text of an error the code reported."""
        if isinstance(error, str):
            return error
        return self.text(error, "error") if self.tables else json.dumps(error, ensure_ascii=False)

    def _output(self, output: Any) -> Any:
        if isinstance(output, dict):
            if not self.tables:
                output = output.get("data", "")
            elif "data" in (table := folded(output)):
                output = table["data"]
        return "" if output is None else self.value(output, 1)

    def _list(self, value: Any, key: str) -> list[Any]:
        if value is None or (self.tables and value == {}):
            return []
        if not isinstance(value, list):
            raise self.error(f"{self.answerer} {key} is a {type(value).__name__}, not a list")
        return value

    def _outgoing(self, message: Any, pid: str, code: str) -> Any:
        value = self.value
        if not isinstance(message, dict):
            return value(message, 2)
        out: dict[str, Any] = {}
        tags = None
        for key, v in message.items():
            if key.lower() == "tags":
                tags = v
            else:
                out[key.lower()] = value(v, 3)
        if isinstance(tags, list):
            for tag in tags:
                if isinstance(tag, dict) and isinstance(tag.get("name"), str):
                    out[tag["name"].lower()] = value(tag.get("value"), 3)
        elif self.tables and isinstance(tags, dict):  # {Name = value} tables: a Lua habit
            for name, v in tags.items():
                out[name.lower()] = v
        out["from-process"] = pid
        out[self.origin] = code
        return out
