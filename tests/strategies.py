"""Hypothesis strategies for messages and their CBOR bytes, shared by the tests."""

from __future__ import annotations

import math
import struct
from typing import Any

from hypothesis import strategies as st

#: Every integer a message may hold, the ends of the range drawn often.
ints = st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.sampled_from(
    [-(2**64), -(2**64) + 1, -(2**63), 2**63, 2**64 - 2, 2**64 - 1]
)
#: Integers just outside that range and far outside it (printable: at most 4,300 digits).
big_ints = st.one_of(
    st.sampled_from([2**64, -(2**64) - 1]),
    st.integers(min_value=2**64, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-(2**64) - 1),
    st.sampled_from([1000, 4299]).map(lambda digits: -(10**digits)),
)
scalars = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
#: Keys, with the ones that mean something to hbtrio drawn often.
keys = st.text(max_size=6) | st.sampled_from(["priv", "a", "b", "slot"])
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=24,
)
messages = st.dictionaries(keys, values, max_size=6)


# -- CBOR bytes, written by hand: any well-formed encoding, not only canonical -----------------

#: Tag numbers of every size class, and every tag cbor2 would otherwise decode itself.
TAGS = [
    *(0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37, 52, 54, 100),
    *(256, 258, 260, 261, 262, 1004, 43000, 55799, 55800),
    *(65535, 65536, 2**32 - 1, 2**32, 2**64 - 1),
]


def head(major: int, n: int, width: int | None = None) -> bytes:
    """A CBOR head: major type and argument, shortest or in ``width`` bytes (0: inline)."""
    if width is None:
        width = next(w for w in (0, 1, 2, 4, 8) if n < (24 if w == 0 else 1 << (8 * w)))
    if width == 0:
        return bytes([major << 5 | n])
    return bytes([major << 5 | {1: 24, 2: 25, 4: 26, 8: 27}[width]]) + n.to_bytes(width, "big")


@st.composite
def _head(draw: st.DrawFn, major: int, n: int) -> bytes:
    widths = [w for w in (0, 1, 2, 4, 8) if n < (24 if w == 0 else 1 << (8 * w))]
    return head(major, n, draw(st.sampled_from(widths)))


def _float_widths(value: float) -> list[str]:
    out = []
    for fmt in ("e", "f", "d"):
        try:
            back = struct.unpack(">" + fmt, struct.pack(">" + fmt, value))[0]
        except (OverflowError, struct.error):
            continue
        if back == value or (math.isnan(back) and math.isnan(value)):
            out.append(fmt)
    return out


@st.composite
def _chunks(draw: st.DrawFn, major: int, data: Any) -> bytes:
    """A byte (2) or text (3) string, definite or as indefinite-length chunks."""
    raw = data.encode("utf-8") if major == 3 else data
    if not draw(st.booleans()):
        return draw(_head(major, len(raw))) + raw
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    out = bytes([major << 5 | 31])
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        part = data[start:stop]
        part_raw = part.encode("utf-8") if major == 3 else part
        out += draw(_head(major, len(part_raw))) + part_raw
    return out + b"\xff"


@st.composite
def encodings(draw: st.DrawFn, value: Any) -> bytes:
    """Some well-formed CBOR encoding of a message value: any widths, key orders, lengths."""
    if value is False or value is True or value is None:
        return {False: b"\xf4", True: b"\xf5", None: b"\xf6"}[value]
    if type(value) is int:
        return draw(_head(0, value) if value >= 0 else _head(1, -1 - value))
    if type(value) is float:
        fmt = draw(st.sampled_from(_float_widths(value)))
        return bytes([0xF9 + "efd".index(fmt)]) + struct.pack(">" + fmt, value)
    if type(value) in (bytes, str):
        return draw(_chunks(2 if type(value) is bytes else 3, value))
    if isinstance(value, dict):
        pairs = draw(st.permutations(list(value.items())))
        items = [draw(encodings(k)) + draw(encodings(v)) for k, v in pairs]
        major = 5
    else:
        items = [draw(encodings(v)) for v in value]
        major = 4
    if draw(st.booleans()):
        return bytes([major << 5 | 31]) + b"".join(items) + b"\xff"
    return draw(_head(major, len(items))) + b"".join(items)
