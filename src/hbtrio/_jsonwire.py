"""JSON wire format for messages: the JSON twin of canonical CBOR.

JSON has no byte strings and no non-finite floats, so a message needs a small,
unambiguous encoding to travel as JSON. The rules (documented in
``docs/http.md``):

* ``bytes`` becomes ``{"/bytes": "<base64>"}``: standard base64 (RFC 4648
  section 4) with padding on output; on input the padding may be left off.
* a non-finite ``float`` becomes ``{"/float": "NaN"}``, ``{"/float":
  "Infinity"}`` or ``{"/float": "-Infinity"}``. Bare ``NaN``/``Infinity``
  tokens are rejected on input, and so is a number too large for a float
  (``1e400``), which Python would read as infinity.
* integers are those of a message (``-2**64`` to ``2**64-1``), both ways.
* keys starting with ``"/"`` are reserved for these two forms. A message key
  that starts with ``"/"`` is sent with one more ``"/"`` in front (``"/x"``
  travels as ``"//x"``) and loses it again on input. Any other key starting
  with a single ``"/"`` is rejected.
* tuples (how lists live inside a read-only `Message`) become JSON arrays.

Input is strict: the body must be UTF-8 JSON whose top level is an object, no
object may repeat a key, and everything else a `Message` refuses is refused
too, always with `InvalidMessage`. ``loads(dumps(m)) == m`` for every message.

Nothing here blocks or checkpoints; it is pure, synchronous code that is safe
to call from any task or thread.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any, Final

from ._codec import MAX_DEPTH
from ._exceptions import InvalidMessage
from ._message import MAX_INT, MIN_INT, Message, freeze, int_out_of_range

__all__ = ["dumps", "from_json", "loads", "to_json"]

BYTES_KEY: Final = "/bytes"
FLOAT_KEY: Final = "/float"

_NON_FINITE: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_SCALARS: Final = frozenset({str, bool, type(None)})


def _float_name(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def to_json(value: object) -> Any:
    """A JSON-ready Python value (dicts, lists, scalars) for a message value.

    Raises `InvalidMessage` for a value that is not a message value.
    """
    t = type(value)
    if t in _SCALARS:
        return value
    if t is int:
        if MIN_INT <= value <= MAX_INT:  # type: ignore[operator]
            return value
        raise int_out_of_range(value)  # type: ignore[arg-type]
    if t is float:
        return value if math.isfinite(value) else {FLOAT_KEY: _float_name(value)}  # type: ignore[arg-type]
    if t is bytes:
        return {BYTES_KEY: base64.b64encode(value).decode("ascii")}  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidMessage(f"key {key!r} is not a str")
            out["/" + key if key.startswith("/") else key] = to_json(item)
        return out
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    raise InvalidMessage(f"a {t.__name__} is not a message value")


def dumps(value: object) -> bytes:
    """UTF-8 JSON bytes of a message (or message value), keys sorted.

    Raises `InvalidMessage` for a value that is not a message value, and
    nothing else, whatever ``value`` holds.
    """
    try:
        text = json.dumps(
            to_json(value),
            ensure_ascii=False,
            allow_nan=False,
            sort_keys=True,
            separators=(",", ":"),
        )
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not a message value
        raise InvalidMessage(f"text that is not valid Unicode: {exc.reason}") from None
    except RecursionError:
        raise InvalidMessage("nested too deeply") from None


def _object_hook(pairs: list[tuple[str, Any]]) -> Any:
    """Build one JSON object, turning the reserved ``/``-forms back into values."""
    if len(pairs) == 1 and pairs[0][0] in (BYTES_KEY, FLOAT_KEY):
        key, text = pairs[0]
        if type(text) is not str:
            raise InvalidMessage(f'{{"{key}": ...}} needs a string, not {type(text).__name__}')
        if key == BYTES_KEY:
            try:
                return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise InvalidMessage(
                    f'{{"{BYTES_KEY}": ...}}: {text[:40]!r} is not base64'
                ) from None
        try:
            return _NON_FINITE[text]
        except KeyError:
            raise InvalidMessage(
                f'{{"{FLOAT_KEY}": ...}} must be "NaN", "Infinity" or "-Infinity", '
                f"not {text[:40]!r}"
            ) from None
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key.startswith("/"):
            if not key.startswith("//"):
                raise InvalidMessage(
                    f"key {key[:40]!r}: keys starting with '/' are reserved "
                    f'(send a message key "/x" as "//x")'
                )
            key = key[1:]
        if key in out:
            raise InvalidMessage(f"key {key[:40]!r} appears twice in one object")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise InvalidMessage(f'bare {name} is not JSON (send {{"{FLOAT_KEY}": "{name}"}})')


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent; one too large for a float is refused."""
    value = float(text)
    if value - value == 0.0:  # finite
        return value
    name = "Infinity" if value > 0 else "-Infinity"
    raise InvalidMessage(
        f"the number {text[:40]} is too large for a float "
        f'(send {{"{FLOAT_KEY}": "{name}"}} for {name})'
    )


def from_json(text: str | bytes) -> Any:
    """Decode JSON text into a message value (not necessarily a mapping).

    Raises `InvalidMessage` for anything that is not valid JSON in this format.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidMessage(f"body is not UTF-8: {exc}") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_object_hook,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not JSON: {exc}") from None
    except RecursionError:  # far deeper than freeze would take
        raise InvalidMessage(f"body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        if isinstance(exc, InvalidMessage):
            raise
        # The one other ValueError: an int with more digits than Python converts
        # (sys.get_int_max_str_digits(), 4300 by default), far outside the range.
        raise InvalidMessage(
            "body has an integer with too many digits: messages hold integers "
            "from -2**64 to 2**64-1"
        ) from None


def loads(data: str | bytes, *, what: str = "body") -> Message:
    """Decode a JSON message into a read-only `Message`.

    The top level must be an object. Raises `InvalidMessage` (naming the bad
    key) for anything else.
    """
    value = from_json(data)
    if not isinstance(value, dict):
        raise InvalidMessage(f"{what} must be a JSON object, not {_json_type(value)}")
    # freeze refuses what CBOR cannot carry, such as a lone surrogate from a "\ud800"
    # escape (the only way one gets in: the bytes must be UTF-8).
    return freeze(value, what=what)


def _json_type(value: object) -> str:
    if isinstance(value, bytes):
        return "a /bytes value"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
