"""A WASM instance's snapshot: its linear memory, compressed, and the globals it changes.

The form (a message, stored as the process's snapshot)::

    {"format": "wasm-memory@1", "image": <image ID>, "codec": "zstd",
     "size": <memory bytes>, "memory": <zstd frame of memory[0:size]>,
     "globals": {<exported mutable global>: <value bits>, ...},
     "stack-pointer": <int> or None}

zstd at level 3: on an aos memory (12 MiB) it writes 330 KB in 8 ms and
reads it back in 6 ms, where zlib takes 31 ms for 475 KB at level 1 and
78 ms for 372 KB at level 6 (benchmarks/wasm_bench.py measures it again).
Global values are kept as their bits (an ``int``), so that a float's NaN
payload survives too.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from typing import Any, Final

import zstandard

from ._errors import WasmError

__all__ = ["FORMAT", "LEVEL", "bits_of", "compress", "decompress", "value_of"]

FORMAT: Final = "wasm-memory@1"
CODEC: Final = "zstd"
LEVEL: Final = 3

#: zstd (de)compressors are not thread-safe (two threads in one crash the process): one
#: of each per thread.
_local = threading.local()


def _codecs() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    try:
        return _local.codecs  # type: ignore[no-any-return]
    except AttributeError:
        _local.codecs = (zstandard.ZstdCompressor(level=LEVEL), zstandard.ZstdDecompressor())
        return _local.codecs  # type: ignore[no-any-return]


def compress(memory: Any) -> bytes:
    """A zstd frame of ``memory`` (any buffer: the instance's memory itself, uncopied).

    Thread-safe.
    """
    return _codecs()[0].compress(memory)


def decompress(snapshot: Mapping[str, Any]) -> bytes:
    """The memory of a snapshot; `WasmError` for one that is not of this form. Thread-safe."""
    if snapshot.get("format") != FORMAT or snapshot.get("codec") != CODEC:
        raise WasmError(
            f"not a WASM memory snapshot (format {snapshot.get('format')!r}, codec "
            f"{snapshot.get('codec')!r})"
        )
    size = snapshot["size"]
    memory = _codecs()[1].decompress(snapshot["memory"], max_output_size=size)
    if len(memory) != size:
        raise WasmError(f"snapshot memory is {len(memory)} bytes, not the {size} it says")
    return memory


_PACK: Final = {"i32": "<i", "i64": "<q", "f32": "<f", "f64": "<d"}
_BITS: Final = {"i32": "<I", "i64": "<Q", "f32": "<I", "f64": "<Q"}


def bits_of(kind: str, value: Any) -> int:
    """A global's value as the unsigned integer of its bits."""
    return struct.unpack(_BITS[kind], struct.pack(_PACK[kind], value))[0]  # type: ignore[no-any-return]


def value_of(kind: str, bits: int) -> Any:
    """The value whose bits `bits_of` gave."""
    return struct.unpack(_PACK[kind], struct.pack(_BITS[kind], bits))[0]
