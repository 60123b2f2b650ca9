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

__all__ = ["decode", "encode", "encode_plain"]

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
