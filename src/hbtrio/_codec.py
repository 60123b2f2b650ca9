"""Canonical CBOR: the one place where messages become bytes and back.

Encoding follows RFC 8949 deterministic encoding (cbor2's ``canonical=True``:
shortest-form integers and floats, map keys sorted by their encoded bytes), so
equal messages encode to equal bytes whatever their key order. Decoding
returns read-only messages. Nothing here blocks or checkpoints; callers that
encode large states off the event loop do so from a thread.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import cbor2

from ._exceptions import InvalidMessage

if TYPE_CHECKING:
    from ._message import Message

__all__ = ["decode", "encode", "encode_plain"]


def encode(value: Any) -> bytes:
    """Canonical CBOR bytes of a frozen message (or any message value)."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise InvalidMessage(f"cannot encode as CBOR: {exc}") from exc


def encode_plain(value: Any) -> bytes:
    """CBOR bytes of a message in its own key order: not canonical, same message.

    For states written to storage, where nothing hashes or compares the bytes:
    about three times faster than `encode`, whose key sorting dominates small
    maps. Anything whose bytes are hashed (IDs) or compared uses `encode`.
    """
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise InvalidMessage(f"cannot encode as CBOR: {exc}") from exc


def decode(data: bytes) -> Message:
    """Decode canonical CBOR bytes into a read-only `Message`.

    Raises `InvalidMessage` when the bytes are not CBOR or not a message.
    """
    from ._message import freeze

    try:
        fp = io.BytesIO(data)
        value = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidMessage(f"not valid CBOR: {exc}") from exc
    # cbor2.loads ignores whatever follows the first data item; such bytes are not one message.
    end, size = fp.tell(), fp.seek(0, io.SEEK_END)
    if end != size:
        raise InvalidMessage(f"not valid CBOR: {size - end} bytes follow the message")
    return freeze(value, what="decoded CBOR")
