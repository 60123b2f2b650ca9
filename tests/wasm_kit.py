"""The WASM tests' modules (tests/wasm/*.wat, compiled at test time) and helpers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

wasmtime = pytest.importorskip("wasmtime")

import hbtrio  # noqa: E402
from hbtrio._wasm._images import image_id  # noqa: E402

WAT = Path(__file__).parent / "wasm"


@functools.cache
def module(name: str) -> bytes:
    """The binary of ``tests/wasm/<name>.wat``."""
    return bytes(wasmtime.wat2wasm((WAT / f"{name}.wat").read_text()))


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_leb(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


#: ``$probe`` with legacy exception handling: ``try (result i32) i32.const 1 throw 0
#: catch 0 end end`` (no locals): the caught 1.
LEGACY_PROBE = bytes([0x00, 0x06, 0x7F, 0x41, 0x01, 0x08, 0x00, 0x07, 0x00, 0x0B, 0x0B])


@functools.cache
def legacy_eh_module() -> bytes:
    """tests/wasm/eh.wat with its last function's body replaced by `LEGACY_PROBE`.

    The WAT parser no longer reads legacy ``try``, so the body is written in
    bytes: the code section (id 10) is rebuilt with the new last body.
    """
    data = module("eh")
    at = 8
    while at < len(data):
        section, body = data[at], at + 1
        size, start = _read_leb(data, body)
        if section == 10:
            count, pos = _read_leb(data, start)
            bodies = []
            for _ in range(count):
                n, pos2 = _read_leb(data, pos)
                bodies.append(data[pos2 : pos2 + n])
                pos = pos2 + n
            bodies[-1] = LEGACY_PROBE
            payload = _leb(count) + b"".join(_leb(len(b)) + b for b in bodies)
            return data[:at] + bytes([10]) + _leb(len(payload)) + payload + data[start + size :]
        at = start + size
    raise AssertionError("eh.wat has no code section")


def device(**options: Any) -> hbtrio.WasmDevice:
    """A `WasmDevice` with no on-disk cache (unless given one)."""
    options.setdefault("cache_dir", None)
    return hbtrio.WasmDevice(**options)


def wasm_definition(image: bytes | str, **extra: Any) -> dict[str, Any]:
    return {"device": "process@1.0", "execution-device": "wasm-64@1.0", "image": image, **extra}


__all__ = [
    "LEGACY_PROBE",
    "device",
    "image_id",
    "legacy_eh_module",
    "module",
    "wasm_definition",
]
