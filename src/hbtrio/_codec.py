"""Canonical CBOR: the one place where messages become bytes and back.

Encoding follows RFC 8949 deterministic encoding (cbor2's ``canonical=True``:
shortest-form integers and floats, map keys sorted by their encoded bytes), so
equal messages encode to equal bytes whatever their key order. Decoding
returns read-only messages.

`decode` is for bytes from outside, so it accepts only the CBOR that messages
need: integers (major types 0 and 1), byte and text strings, arrays and maps
(definite or indefinite length), ``false``/``true``/``null`` and floats, with
no tags at all. cbor2 is told to refuse every tag when it reads the tag's head
(``semantic_decoders`` whose lookup refuses), before the tag's content is
read, so shared and string references (tags 28/29, 256/25), bignums (2/3) and
every other tag never expand anything. Without tags every decoded value takes
at least one byte of the input, so a decoded message is never larger than the
bytes it came from. Duplicate map keys, and keys that are neither text nor
bytes, are refused as cbor2 reads them (`freeze` then refuses bytes keys),
and nesting is bounded.

Nothing here blocks or checkpoints; callers that encode large states off the
event loop do so from a thread.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn

import cbor2

from ._exceptions import InvalidMessage

if TYPE_CHECKING:
    from ._message import Message

__all__ = ["decode", "encode", "encode_in_pieces", "encode_plain", "is_large"]

#: Deepest nesting a message may have, in levels below the message itself (deeper
#: input is refused, not recursed into).
MAX_DEPTH: Final = 100


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


#: A value with more values than this inside it is large (see `is_large`, `encode_in_pieces`).
PIECE: Final = 256
#: A string or byte string at least this long is large.
_LONG: Final = 1 << 16


def _weight(value: Any, limit: int) -> int:
    """How many values ``value`` holds (itself included), counting no further than ``limit + 1``.

    A long string or byte string weighs ``limit + 1`` on its own.
    """
    stack = [value]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if isinstance(item, str | bytes):
            if len(item) >= _LONG:
                return limit + 1
        elif isinstance(item, Mapping):
            if len(item) > limit:
                return limit + 1
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            if len(item) > limit:
                return limit + 1
            stack.extend(item)
        if seen + len(stack) > limit:
            return limit + 1
    return seen


def is_large(value: Any) -> bool:
    """Whether encoding ``value`` costs more than a thread hop: more than `PIECE` values
    inside it, or a string of 64 KiB or more. Looks at no more than `PIECE` values."""
    return _weight(value, PIECE) > PIECE


def _head(major: int, length: int) -> bytes:
    """The shortest CBOR head of a major type with a length (RFC 8949 section 3)."""
    if length < 24:
        return bytes([major << 5 | length])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes([major << 5 | info]) + length.to_bytes(size, "big")
    raise InvalidMessage(f"cannot encode a container of {length} items")  # pragma: no cover


def encode_in_pieces(value: Any, piece: int = PIECE) -> bytes:
    """`encode`, one piece of at most about ``piece`` values per cbor2 call: the same bytes.

    One cbor2 call holds the GIL from start to end, and a 1 MiB message of small
    maps takes some 50 ms: that long, no other thread (the event loop) runs.
    Between two pieces it may. A map's keys are put in canonical order first
    (by their encoded bytes, cbor2's order for text keys), so that pieces of
    consecutive entries, each encoded canonically, add up to the canonical map.
    Pure; safe from any thread. Costs about as much again as `encode` in all.
    """
    out = bytearray()
    _encode_into(value, out, piece)
    return bytes(out)


def _encode_into(value: Any, out: bytearray, piece: int) -> None:
    if _weight(value, piece) <= piece or not isinstance(value, Mapping | list | tuple):
        out += encode(value)
        return
    if isinstance(value, Mapping):
        entries: list[tuple[bytes, Any]] = sorted(
            ((encode(key), key) for key in value), key=lambda entry: entry[0]
        )
        out += _head(5, len(entries))
        batch: dict[Any, Any] = {}
        weight = 0
        for encoded, key in entries:
            item = value[key]
            w = _weight(item, piece)
            if batch and weight + w > piece:
                out += encode(batch)[len(_head(5, len(batch))) :]
                batch, weight = {}, 0
            if w > piece:
                out += encoded
                _encode_into(item, out, piece)
            else:
                batch[key] = item
                weight += w
        if batch:
            out += encode(batch)[len(_head(5, len(batch))) :]
        return
    out += _head(4, len(value))
    items: list[Any] = []
    weight = 0
    for item in value:
        w = _weight(item, piece)
        if items and weight + w > piece:
            out += encode(items)[len(_head(4, len(items))) :]
            items, weight = [], 0
        if w > piece:
            _encode_into(item, out, piece)
        else:
            items.append(item)
            weight += w
    if items:
        out += encode(items)[len(_head(4, len(items))) :]


class _NoTags(Mapping[int, Any]):
    """cbor2 ``semantic_decoders`` that has every tag and refuses each one when looked up.

    cbor2 looks a tag up here as soon as it has read the tag's head, before
    its own decoders (and before the tag's content), and passes the error on.
    """

    def __getitem__(self, tag: int) -> NoReturn:
        raise InvalidMessage(f"CBOR tag {tag} is not accepted (messages carry no tags)")

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _refuse_tag(tag: cbor2.CBORTag, immutable: bool) -> NoReturn:
    # Never reached while _NoTags refuses every tag first; kept in case cbor2 ever skips it.
    raise InvalidMessage(f"CBOR tag {tag.tag} is not accepted (messages carry no tags)")


#: cbor2 decoder options for bytes from outside.
_STRICT: Final[dict[str, Any]] = {
    "semantic_decoders": _NoTags(),
    "tag_hook": _refuse_tag,
    "max_depth": MAX_DEPTH + 1,  # containers, the message itself included
    "allow_duplicate_keys": False,
    # Map keys: text or bytes (freeze refuses bytes). Keys such as arrays can be made to
    # share one hash by the thousand, which would make building the map quadratic.
    "strict_hashable_types": True,
}


def decode(data: bytes) -> Message:
    """Decode CBOR bytes from outside into a read-only `Message`.

    Accepts any well-formed encoding (not only canonical) of a message, and
    nothing else: tags, simple values other than false/true/null, duplicate or
    non-``str`` map keys, integers outside the message range and nesting deeper
    than `MAX_DEPTH` are refused, all with `InvalidMessage`.
    """
    from ._message import freeze

    try:
        fp = io.BytesIO(data)
        value = cbor2.CBORDecoder(fp, **_STRICT).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        if isinstance(exc.__cause__, InvalidMessage):  # a refused tag
            raise InvalidMessage(f"not valid CBOR: {exc.__cause__}") from None
        text = str(exc)
        if "nesting depth" in text:
            text = f"nested deeper than {MAX_DEPTH} levels"
        raise InvalidMessage(f"not valid CBOR: {text[:200]}") from exc
    # cbor2.loads ignores whatever follows the first data item; such bytes are not one message.
    end, size = fp.tell(), fp.seek(0, io.SEEK_END)
    if end != size:
        raise InvalidMessage(f"not valid CBOR: {size - end} bytes follow the message")
    return freeze(value, what="decoded CBOR")
