"""Where a Lua process's code is: the definition's ``module`` and ``script`` keys.

Theory of operation
-------------------
A definition names its Lua code in one or both of:

- ``"module"``: one module or a list of them, loaded in order. A module is a
  blob ID (a 43-character string: ``engine.put_blob(source)``,
  ``hbtrio put-blob FILE``), or a message whose ``body`` (or ``data``) is the
  source, with an optional ``name`` and an optional ``content-type``
  (``application/lua`` or ``text/x-lua``), as HyperBEAM's ``lua@5.3a``
  processes name theirs;
- ``"script"``: Lua source inline (text or bytes), loaded after the modules.

Every module has an ID, the SHA-256 of its source as unpadded base64url (the
ID the same source has as a blob, whichever way it is given), and a name,
which error messages show as the chunk's (``ledger:12: ...``): the module
message's ``name``, ``"script"`` for the inline script, else its ID.
`modules_of` reads the definition without fetching anything; the device gets
the blobs. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from .._message import id_of_bytes
from ._errors import LuaModuleError

__all__ = ["ModuleRef", "modules_of"]

_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
CONTENT_TYPES: Final = frozenset({"application/lua", "text/x-lua"})


@attrs.frozen
class ModuleRef:
    """One module: its name, its ID, and its source unless it is still to be read as a blob."""

    name: str
    id: str
    source: bytes | None


def _source(value: object, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise LuaModuleError(f"{what} must be Lua source (text or bytes), not {type(value).__name__}")


def _module(item: object, what: str) -> ModuleRef:
    if isinstance(item, str):
        if _ID_RE.fullmatch(item) is None:
            raise LuaModuleError(
                f"{what}: {item[:60]!r} is not a blob ID (43 base64url characters); "
                'give inline source as {"body": source} or as the definition\'s "script"'
            )
        return ModuleRef(name=item, id=item, source=None)
    if isinstance(item, Mapping):
        kind = item.get("content-type")
        if kind is not None and kind not in CONTENT_TYPES:
            raise LuaModuleError(f"{what}: content-type {kind!r} is not Lua")
        body = item.get("body", item.get("data"))
        if body is None:
            raise LuaModuleError(f'{what}: a module message needs its source as "body"')
        source = _source(body, f"{what}.body")
        ident = id_of_bytes(source)
        name = item.get("name", ident)
        if not isinstance(name, str) or not name:
            raise LuaModuleError(f"{what}.name must be a non-empty str")
        return ModuleRef(name=name, id=ident, source=source)
    raise LuaModuleError(f"{what} must be a blob ID or a module message, not {type(item).__name__}")


def modules_of(definition: Mapping[str, Any]) -> list[ModuleRef]:
    """The modules a definition names, in the order they are loaded. Raises `LuaModuleError`."""
    named = definition.get("module")
    items = [] if named is None else list(named) if isinstance(named, list | tuple) else [named]
    out = [
        _module(item, f"module[{i}]" if len(items) > 1 else "module")
        for i, item in enumerate(items)
    ]
    script = definition.get("script")
    if script is not None:
        source = _source(script, "script")
        out.append(ModuleRef(name="script", id=id_of_bytes(source), source=source))
    if not out:
        raise LuaModuleError(
            'a lua@5.3 process needs its code: "module" (blob IDs or module messages) '
            'or "script" (Lua source)'
        )
    return out
