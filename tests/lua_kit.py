"""Helpers of the Lua device's tests: the project's scripts under tests/lua, definitions, and
instances driven without an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hbtrio
from hbtrio._lua import LiveLua, LuaDevice
from hbtrio._lua._device import _parts
from hbtrio._lua._modules import modules_of

LUA = Path(__file__).parent / "lua"


def source(name: str) -> str:
    """The text of tests/lua/NAME.lua."""
    return (LUA / f"{name}.lua").read_text()


def lua_process(script: str | None, **extra: Any) -> dict[str, Any]:
    """A lua@5.3 definition with ``script`` inline (a script's name, or Lua source; ``None``:
    none, the code is in ``extra``'s ``module``)."""
    definition = {"device": "process@1.0", "execution-device": "lua@5.3", **extra}
    if script is not None:
        definition["script"] = source(script) if "\n" not in script else script
    return definition


def instance(
    script: str, device: LuaDevice | None = None, snapshot: Any = None, **extra: Any
) -> LiveLua:
    """A live instance of a process with ``script``, booted in this thread (no engine)."""
    device = device or LuaDevice(call_timeout=10.0)
    process = hbtrio.freeze(lua_process(script, **extra))
    modules = modules_of(process)
    sources = [(m.name, m.source) for m in modules if m.source is not None]
    heap, replay = _parts(snapshot)
    return device._boot(process, [m.id for m in modules], sources, heap, replay)


def assignment(slot: int, body: dict[str, Any], timestamp: int = 1_700_000_000_000) -> Any:
    """An assignment as the engine hands it: slot, body, message-id, timestamp."""
    return hbtrio.freeze(
        {
            "slot": slot,
            "body": body,
            "message-id": hbtrio.message_id({"slot": slot, **body}),
            "timestamp": timestamp + slot,
        }
    )


def run(live: LiveLua, bodies: list[dict[str, Any]], first: int = 1) -> list[dict[str, Any]]:
    """The results of ``bodies`` as slots ``first``, ``first + 1``, ... of ``live``."""
    return [live.compute_sync(assignment(first + i, b)) for i, b in enumerate(bodies)]
