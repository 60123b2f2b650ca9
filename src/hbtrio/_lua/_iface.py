"""The message a Lua process's ``handle(msg, env)`` gets, and the result made of its answer.

Theory of operation
-------------------
The forms of the WASM device's JSON interface (`hbtrio._aoiface`, HyperBEAM's
``json-iface@1.0``), given to Lua as tables instead of JSON text:

- ``msg`` (`message_fields`): its ``Module`` the ID of the process's first
  module. As aos does, each tag is a field of ``msg`` too (``msg.Action``),
  unless a field of the form has its name;
- ``env``: ``{Process = {...}}`` (`Process.of`, once per process), the
  process definition in the same form, its tags fields too; its ``module``
  key is the tag ``Module`` holding the modules' IDs (comma-separated), and
  an inline ``script`` is left out.

``handle`` returns a table with any of ``Output``, ``Messages``, ``Spawns``,
``Assignments`` and ``Error`` (in any case); `parse_result` makes the slot's
result of it (`hbtrio._aoiface`, read as Lua tables: ``{}`` is also an empty
list, tags may be ``{Name = value}``, and an ``Output`` table without
``data`` is the output itself), with ``from-module`` (the process's first
module's ID) in each outgoing message. A script that returns no output has
the lines it printed as its output. Returning ``nil`` is an empty result; a
string or number is the output. Pure and thread-safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from .._aoiface import Dialect, folded
from ._errors import LuaResultError

__all__ = ["CODE_KEYS", "TABLES", "Process", "message_fields", "parse_result"]

#: Keys of a definition that only say where the process's code is.
CODE_KEYS: Final = frozenset({"module", "script"})

#: The Lua device's reading of the interface.
TABLES: Final = Dialect(
    error=LuaResultError,
    not_utf8="bytes that are not UTF-8 cannot be a tag",
    answerer="handle's",
    origin="from-module",
    tables=True,
)


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
        d = {k: v for k, v in folded(definition).items() if k not in CODE_KEYS}
        if modules:
            d["module"] = ",".join(modules)
        fields = TABLES.process_fields(d, pid)
        module = modules[0] if modules else ""
        return cls(pid, module, fields["Owner"], {"Process": _with_tags(fields)})


def message_fields(assignment: Mapping[str, Any], process: Process) -> dict[str, Any]:
    """The ``msg`` table for one assignment (see the module), as Python values."""
    fields = TABLES.message_fields(assignment, process.id, process.owner, process.module)
    return _with_tags(fields)


def parse_result(answer: Any, printed: str, process: Process) -> dict[str, Any]:
    """The slot's result for what ``handle`` returned (as `from_lua` gave it) and printed."""
    if isinstance(answer, dict):
        result = TABLES.result(answer, process.id, process.module)
    else:
        if isinstance(answer, list):
            raise LuaResultError("handle returned a list, not a result table")
        result = TABLES.result({}, process.id, process.module)
        if answer is not None:
            result["output"] = answer
    if result["output"] == "" and printed:
        result["output"] = printed
    return result
