"""Values between Lua and messages: Lua tables to message values, in a fixed key order.

Theory of operation
-------------------
The VM is made with ``encoding=None``: Lua strings reach Python as `bytes`,
and what Python hands Lua must be `bytes` already (a `str` would arrive as a
host object). `lua_ready` turns a message value into that form (`str` keys and
values to UTF-8 bytes), once, and `to_lua` makes Lua tables of it in one call.

`from_lua` turns a value from the VM into a message value:

- ``nil``, booleans, integers and floats as they are (Lua 5.3 keeps the two
  kinds of number apart, and so does a message);
- a string to a `str` when it is UTF-8, else to `bytes`;
- a table whose keys are exactly ``1..n`` (n >= 1) to a list, any other
  table to a mapping. A key becomes text: strings as they are, integers in
  decimal, floats as Lua writes them (``%.14g``), booleans as
  ``"true"``/``"false"``; two keys with one text, a key that is a table or a
  function, or a string key that is not UTF-8 fails. The mapping's keys are
  sorted, so its order never depends on the VM's string hashing (which Lua
  seeds differently in every VM). An empty table is an empty mapping;
- anything else (a function, a coroutine, a host object), or nesting deeper
  than `MAX_NESTING` levels (a cycle, say), is `LuaResultError`.

Tables are read raw (``lua_next``, no metamethods run). Pure; call it from the
thread that holds the VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ._errors import LuaResultError

__all__ = ["MAX_NESTING", "from_lua", "lua_ready", "to_lua"]

#: Levels of nesting a value from the VM may have (a message nests at most 100).
MAX_NESTING: Final = 90


def lua_ready(value: object) -> object:
    """``value`` with every `str` as UTF-8 bytes and tuples as lists: what `to_lua` converts."""
    t = type(value)
    if t is str:
        return value.encode()  # type: ignore[attr-defined]
    if isinstance(value, Mapping):
        return {lua_ready(k): lua_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [lua_ready(v) for v in value]
    return value


def to_lua(runtime: Any, ready: object) -> object:
    """A Lua value for ``ready`` (what `lua_ready` returned): tables made in one call."""
    if isinstance(ready, dict | list):
        return runtime.table_from(ready, recursive=True)
    return ready


def _text(value: bytes) -> str | bytes:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def _key_text(key: object, path: str) -> str:
    t = type(key)
    if t is bytes:
        try:
            return key.decode()  # type: ignore[attr-defined, no-any-return]
        except UnicodeDecodeError:
            raise LuaResultError(f"{path}: a key that is not UTF-8 text: {key!r}") from None
    if t is bool:
        return "true" if key else "false"
    if t is int:
        return str(key)
    if t is float:
        return format(key, ".14g")
    raise LuaResultError(f"{path}: a key of a type a message cannot have ({_kind(key)})")


def _kind(value: object) -> str:
    from lupa import lua53

    return str(lua53.lua_type(value) or type(value).__name__)


def from_lua(value: object, path: str = "result", depth: int = 0) -> Any:
    """A message value for ``value`` from the VM (see the module). Raises `LuaResultError`."""
    t = type(value)
    if value is None or t is bool or t is int or t is float:
        return value
    if t is bytes:
        return _text(value)  # type: ignore[arg-type]
    if _kind(value) != "table":
        raise LuaResultError(f"{path}: a Lua {_kind(value)} is not a message value")
    if depth >= MAX_NESTING:
        raise LuaResultError(f"{path}: nests deeper than {MAX_NESTING} levels (a cycle?)")
    items = list(value.items())  # type: ignore[attr-defined]
    n = len(items)
    if n and all(type(k) is int and 1 <= k <= n for k, _ in items):
        out = [None] * n
        for k, v in items:
            out[k - 1] = from_lua(v, f"{path}[{k}]", depth + 1)
        return out
    named: dict[str, Any] = {}
    for k, v in items:
        name = _key_text(k, path)
        if name in named:
            raise LuaResultError(f"{path}: two keys read as {name!r}")
        named[name] = v
    return {name: from_lua(named[name], f"{path}.{name}", depth + 1) for name in sorted(named)}
