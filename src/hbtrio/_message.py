"""Messages: validation, read-only (frozen) messages and message IDs.

A message is a mapping from ``str`` keys to values, where a value is ``bytes``,
``str``, ``int`` (from ``MIN_INT`` to ``MAX_INT``: what CBOR carries without a
tag), ``float``, ``bool``, ``None``, a list (or tuple) of values, or a nested
message, nested at most ``MAX_DEPTH`` levels deep. `freeze` checks a candidate
once and returns a `Message`: a read-only ``dict`` whose lists became tuples and
whose nested mappings are `Message` too, so nothing reachable from it can be
mutated through the normal mapping and sequence APIs. A `Message` is trusted as
it is: freezing one again costs nothing, and freezing a mapping built from
frozen parts only looks at its top level. That is what keeps read-only states
cheap on the per-slot hot path.

Nothing here blocks or checkpoints.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, NoReturn

import cbor2

from ._codec import MAX_DEPTH, encode, encode_in_pieces
from ._exceptions import InvalidMessage

__all__ = ["FrozenList", "Message", "freeze", "message_id", "validate_slot"]

#: The integers a message may hold: CBOR's major types 0 and 1, no bignum tags.
MIN_INT: Final = -(2**64)
MAX_INT: Final = 2**64 - 1


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError(f"{type(self).__name__} is read-only; build a new message instead")


class Message(dict[str, Any]):
    """A read-only message: a ``dict`` that refuses every mutation.

    ``Message(mapping)`` validates and deep-freezes its argument (raising
    `InvalidMessage` naming the bad key). Reading is as fast as a ``dict``;
    ``msg | {"k": v}`` returns a new plain ``dict`` to build the next message
    from. It is a ``dict`` so that ``json``, ``cbor2`` and equality with plain
    dicts just work.
    """

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        dict.__init__(self, _freeze_map(dict(*args, **kwargs), "", set(), 0))

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only
    __ior__ = _read_only

    def __repr__(self) -> str:
        return f"Message({dict.__repr__(self)})"

    def __copy__(self) -> Message:
        return self

    def __deepcopy__(self, memo: object) -> Message:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Message, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        raise TypeError("unhashable type: 'Message' (use message_id for identity)")


class _Frozen(Message):
    """A `Message` built from already-frozen parts: no validation pass."""

    __slots__ = ()
    __init__ = dict.__init__


_Frozen.__name__ = _Frozen.__qualname__ = "Message"


class FrozenList(tuple[Any, ...]):
    """A list value inside a `Message`: a tuple whose items are frozen too.

    ``FrozenList(items)`` validates and freezes ``items`` like `freeze` does. A
    `FrozenList` equals a ``list`` with equal items, so a frozen message equals
    the plain ``dict`` it was made from.
    """

    __slots__ = ()

    def __new__(cls, items: Iterable[object] = ()) -> FrozenList:
        return _freeze_list(list(items), "", set(), 0)

    def __repr__(self) -> str:
        return repr(list(self))

    def __eq__(self, other: object) -> bool:
        if type(other) is list:
            other = tuple(other)
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = tuple.__hash__


#: Makes a `FrozenList` of already-frozen items without checking them again.
_new_list = tuple.__new__


_SCALARS: frozenset[type] = frozenset({str, bytes, int, float, bool, type(None)})
_TRUSTED: frozenset[type] = frozenset({_Frozen, Message, FrozenList}) | _SCALARS
_NO_INTS: frozenset[type] = _SCALARS - {int}


def _where(path: str) -> str:
    """``path`` for an error message, printable even if a key is not valid Unicode."""
    if not path:
        return "the message"
    return path if path.isascii() else path.encode("utf-8", "backslashreplace").decode("utf-8")


def _show(value: object) -> str:
    """``repr(value)`` for an error message; an integer too long to print is described."""
    if type(value) is int and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    return repr(value)


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_text(text: str, path: str) -> None:
    """Reject text that is not valid Unicode (lone surrogates): CBOR cannot carry it."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage(
                f"{_where(path)}: text {text!r:.40} is not valid Unicode (a lone surrogate)"
            ) from None


def int_out_of_range(value: int, path: str | None = None) -> InvalidMessage:
    """The error for an integer outside ``MIN_INT..MAX_INT`` (never printing it: it may be huge)."""
    text = f"a {value.bit_length()}-bit integer is outside the message range (-2**64 to 2**64-1)"
    return InvalidMessage(text if path is None else f"{_where(path)}: {text}")


def _freeze_value(value: object, path: str, active: set[int], depth: int) -> object:
    t = type(value)
    if t is str:
        _check_text(value, path)  # type: ignore[arg-type]
        return value
    if t is int:
        if not MIN_INT <= value <= MAX_INT:  # type: ignore[operator]
            raise int_out_of_range(value, path)  # type: ignore[arg-type]
        return value
    if t in _TRUSTED:
        return value
    if isinstance(value, Mapping):
        return _freeze_map(value, path, active, depth + 1)
    if t is list or t is tuple:
        return _freeze_list(value, path, active, depth + 1)  # type: ignore[arg-type]
    raise InvalidMessage(
        f"{_where(path)}: a {t.__name__} is not a message value "
        "(use bytes, str, int, float, bool, None, a list or a mapping with str keys)"
    )


def _enter(obj: object, path: str, active: set[int], depth: int) -> int:
    if depth > MAX_DEPTH:
        raise InvalidMessage(f"{_where(path)}: nested deeper than {MAX_DEPTH} levels")
    oid = id(obj)
    if oid in active:
        raise InvalidMessage(f"{_where(path)}: the message contains itself (a cycle)")
    active.add(oid)
    return oid


def _freeze_list(items: Iterable[object], path: str, active: set[int], depth: int) -> FrozenList:
    oid = _enter(items, path, active, depth)
    out: FrozenList = _new_list(
        FrozenList, [_freeze_value(v, f"{path}[{i}]", active, depth) for i, v in enumerate(items)]
    )
    active.discard(oid)
    return out


def _freeze_map(m: Mapping[Any, Any], path: str, active: set[int], depth: int) -> Message:
    oid = _enter(m, path, active, depth)
    out: dict[str, object] = {}
    for key, value in m.items():
        if type(key) is not str:
            raise InvalidMessage(
                f"{_where(path)}: key {_show(key):.60} is a {type(key).__name__}; "
                "message keys must be str"
            )
        _check_text(key, _child(path, key))
        t = type(value)
        if t is str:
            _check_text(value, _child(path, key))
            out[key] = value
        elif t is int:
            if not MIN_INT <= value <= MAX_INT:
                raise int_out_of_range(value, _child(path, key))
            out[key] = value
        elif t in _TRUSTED:
            out[key] = value
        else:
            out[key] = _freeze_value(value, _child(path, key), active, depth)
    active.discard(oid)
    frozen: Message = _Frozen(out)
    return frozen


def freeze(message: object, *, what: str = "message") -> Message:
    """Validate ``message`` and return it as a read-only `Message`.

    A `Message` is returned as it is. Otherwise ``message`` must be a mapping
    with ``str`` keys whose values are message values; anything else raises
    `InvalidMessage` whose text names the bad key (``what`` names the whole).
    """
    if isinstance(message, Message):
        return message
    if not isinstance(message, Mapping):
        raise InvalidMessage(
            f"{what} must be a mapping with str keys, not {type(message).__name__}"
        )
    try:
        return _freeze_map(message, "", set(), 0)
    except InvalidMessage as exc:
        raise InvalidMessage(f"{what}: {exc}") from None
    except RecursionError:
        raise InvalidMessage(f"{what}: nested too deeply") from None


def hand_out(state: Mapping[str, Any]) -> Message:
    """The read-only form of a state the engine holds, for giving to a caller.

    States from the built-in devices are kept as plain dicts of atomic values
    (which the garbage collector does not track, and which nothing mutates);
    they are frozen here, when a caller gets one. Every other state already is
    a `Message` and is returned as it is.
    """
    if type(state) is dict:
        frozen: Message = _Frozen(state)
        return frozen
    return state  # type: ignore[return-value]


def private_copy(message: Message) -> Message:
    """A copy of a frozen message that shares no ``dict`` with it. Never blocks.

    A `Message` refuses every mutation through its own methods, but
    ``dict.__setitem__(msg, k, v)`` (or a C extension) still changes it in
    place. What the engine keeps (states in memory, cached assignments) must
    not change after it is stored, so a device the engine does not trust is
    handed these copies instead. Scalars and tuples without maps in them are
    shared (they are immutable); maps, and tuples that hold maps, are copied:
    about 0.15 us for a flat message plus 0.05 us a key.
    """
    copied: Message = _Frozen(message)
    for key, value in message.items():
        if type(value) in _CONTAINERS:
            _set_item(copied, key, _private_value(value))
    return copied


def _private_value(value: Any) -> Any:
    if type(value) is not FrozenList:
        return private_copy(value)
    if all(type(v) not in _CONTAINERS for v in value):
        return value  # a tuple of scalars: immutable as it is
    items: FrozenList = _new_list(
        FrozenList, [_private_value(v) if type(v) in _CONTAINERS else v for v in value]
    )
    return items


def private_assignment(assignment: Message) -> Message:
    """`private_copy` of an assignment, whose only map is its ``"body"`` (the engine made it)."""
    copied: Message = _Frozen(assignment)
    _set_item(copied, "body", private_copy(assignment["body"]))
    return copied


_CONTAINERS: frozenset[type] = frozenset({_Frozen, Message, FrozenList})
_set_item = dict.__setitem__


def _adopt_list(items: list[Any]) -> FrozenList:
    return FrozenList([_adopt_list(v) if type(v) is list else v for v in items])


def _adopt_map(first: Any, second: Any) -> Message:
    # cbor2 documents object_hook(decoder, dict); 6.x calls object_hook(dict, immutable).
    mapping: dict[str, Any] = first if type(first) is dict else second
    for key, value in mapping.items():
        if type(value) is list:
            mapping[key] = _adopt_list(value)
    frozen: Message = _Frozen(mapping)
    return frozen


def decode_trusted(data: bytes) -> Message:
    """Decode CBOR that hbtrio itself encoded from a `Message`, without re-validating it.

    For the store's own rows: about three times faster than `decode`, which
    checks everything (use `decode` for bytes from outside).
    """
    try:
        value = cbor2.loads(data, object_hook=_adopt_map)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidMessage(f"stored bytes are not valid CBOR: {exc}") from exc
    if type(value) is not _Frozen:
        raise InvalidMessage(f"stored bytes are not a message but a {type(value).__name__}")
    frozen: Message = value
    return frozen


def check_ints(value: object) -> None:
    """Raise `InvalidMessage` naming the first integer in ``value`` outside the message range.

    For values that never went through `freeze`: states read back from a store
    written by an earlier hbtrio, or kept by a device that skips validation.
    """
    found = _bad_int(value)
    if found is not None:
        parts, bad = found
        raise int_out_of_range(bad, "".join(reversed(parts)).removeprefix("."))


def _bad_int(value: object) -> tuple[list[str], int] | None:
    """(reversed path parts, the integer) of the first out-of-range integer, or ``None``."""
    if type(value) is int:
        return None if MIN_INT <= value <= MAX_INT else ([], value)
    if type(value) in _SCALARS:
        return None
    if isinstance(value, Mapping):
        items: Iterable[tuple[object, object]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if type(item) in _NO_INTS:
            continue
        found = _bad_int(item)
        if found is not None:
            found[0].append(f"[{key}]" if type(key) is int else f".{key}")
            return found
    return None


def message_id(message: Mapping[str, Any]) -> str:
    """The ID of ``message``: SHA-256 of its canonical CBOR without ``"priv"``.

    Returned as unpadded base64url (43 characters). Equal messages have equal
    IDs whatever their key order. Raises `InvalidMessage` for a bad message.
    """
    return base64.urlsafe_b64encode(message_digest(message)).rstrip(b"=").decode("ascii")


def message_digest(message: Mapping[str, Any], *, in_pieces: bool = False) -> bytes:
    """The raw 32-byte SHA-256 behind `message_id`.

    ``in_pieces``: encode with `_codec.encode_in_pieces` (the same bytes), for a
    large message hashed in a thread while the event loop runs.
    """
    frozen = freeze(message)
    if "priv" in frozen:
        frozen = _Frozen({k: v for k, v in frozen.items() if k != "priv"})
    return hashlib.sha256(encode_in_pieces(frozen) if in_pieces else encode(frozen)).digest()


def id_of_bytes(data: bytes | memoryview) -> str:
    """Unpadded base64url SHA-256 of ``data``."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


#: The largest slot there can be: SQLite's largest integer (a store row key).
MAX_SLOT: Final = 2**63 - 1


def validate_slot(slot: object, *, what: str = "slot") -> int:
    """``slot`` if it is an ``int`` (not a bool) in ``0..MAX_SLOT``; else `InvalidMessage`."""
    if type(slot) is not int:
        raise InvalidMessage(f"{what} must be an int, not {type(slot).__name__}")
    if slot < 0:
        raise InvalidMessage(f"{what} must be >= 0, not {_show(slot)}")
    if slot > MAX_SLOT:
        raise InvalidMessage(
            f"{what} is too large (a {slot.bit_length()}-bit number; the largest slot is 2**63 - 1)"
        )
    return slot


#: Any 43 base64url characters: the form of a message ID (unpadded SHA-256).
_PID_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def validate_pid(pid: object) -> str:
    """Return ``pid`` if it is a well-formed process ID, else raise `InvalidMessage`.

    Well-formed means 43 base64url characters, the form of a message ID; any
    such string may name a process (an unknown one is `ProcessNotFound`).
    """
    if type(pid) is not str or _PID_RE.fullmatch(pid) is None:
        raise InvalidMessage(f"process ID must be 43 base64url characters, not {_show(pid):.60}")
    return pid


def validate_blob_id(blob_id: object) -> str:
    """Return ``blob_id`` if it is a well-formed blob ID, else raise `InvalidMessage`.

    The form of a message ID (43 base64url characters: the unpadded SHA-256 of
    the blob's bytes); any such string may name a blob (an unknown one is
    `BlobNotFound`).
    """
    if type(blob_id) is not str or _PID_RE.fullmatch(blob_id) is None:
        raise InvalidMessage(f"blob ID must be 43 base64url characters, not {_show(blob_id):.60}")
    return blob_id
