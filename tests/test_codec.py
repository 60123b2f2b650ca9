"""Canonical CBOR: round trips, deterministic bytes (RFC 8949 section 4.2.1), garbage refused."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbtrio import FrozenList, InvalidMessage, Message, decode, encode, freeze
from hbtrio._codec import encode_in_pieces, encode_plain, is_large
from hbtrio._message import MAX_DEPTH, MAX_INT, MIN_INT, decode_trusted
from strategies import TAGS, encodings, head, messages


@settings(max_examples=50, deadline=None)
@given(message=messages)
def test_round_trip(message: dict[str, Any]) -> None:
    data = encode(freeze(message))
    back = decode(data)
    assert type(back) is not dict and isinstance(back, Message)
    assert back == message
    assert encode(back) == data


@settings(max_examples=200, deadline=None)
@given(
    message=messages
    | st.dictionaries(st.text(max_size=30), st.lists(messages, max_size=20), max_size=20),
    piece=st.integers(1, 40),
)
def test_encoding_in_pieces_gives_the_canonical_bytes(message: dict[str, Any], piece: int) -> None:
    # Large messages are encoded in pieces off the event loop (IDs, stored assignments).
    frozen = freeze(message)
    assert encode_in_pieces(frozen, piece) == encode(frozen)


def test_is_large() -> None:
    assert not is_large(freeze({"n": 5, "xs": list(range(200)), "s": "x" * 60000}))
    assert is_large(freeze({"xs": list(range(300))}))
    assert is_large(freeze({"a": [{"k": i} for i in range(130)]}))  # 261 values in all
    assert is_large(freeze({"s": "x" * 65536}))
    assert is_large(freeze({"b": {"c": b"\x00" * 65536}}))
    big = freeze({f"k{i}": {"v": [i, str(i)]} for i in range(1000)})
    assert is_large(big) and encode_in_pieces(big) == encode(big)


@settings(max_examples=50, deadline=None)
@given(message=messages)
def test_plain_encoding_decodes_to_the_same_message(message: dict[str, Any]) -> None:
    # Stored states use it: the same message back, through either decoder.
    frozen = freeze(message)
    data = encode_plain(frozen)
    assert decode(data) == decode_trusted(data) == message
    assert encode(decode_trusted(data)) == encode(frozen)


def test_plain_encoding_keeps_the_key_order_canonical_sorts() -> None:
    state = {"at-slot": 1, "count": 2}
    assert encode_plain(state) != encode(state)  # canonical puts "count" first
    assert decode(encode_plain(state)) == state
    with pytest.raises(InvalidMessage):
        encode_plain({"bad": object()})


@settings(max_examples=50, deadline=None)
@given(message=messages)
def test_map_keys_sorted_by_their_encoded_bytes(message: dict[str, Any]) -> None:
    # Build the top-level map by hand: header, then (key, value) pairs ordered by key bytes.
    n = len(message)
    header = bytes([0xA0 + n]) if n < 24 else bytes([0xB8, n])
    pairs = sorted((cbor2.dumps(k), encode(freeze({"v": v}))[3:]) for k, v in message.items())
    assert encode(freeze(message)) == header + b"".join(k + v for k, v in pairs)


def test_map_key_order_example() -> None:
    # Bytewise order of the encoded keys: "" (60) < "a" (6161) < "b" (6162) < "aa" (626161).
    data = encode(freeze({"aa": 2, "b": 1, "a": 3, "": 0}))
    assert data == bytes.fromhex("a4 60 00 6161 03 6162 01 626161 02")


# RFC 8949 Appendix A: shortest forms.
RFC_EXAMPLES: list[tuple[object, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (0.0, "f90000"),
    (-0.0, "f98000"),
    (1.0, "f93c00"),
    (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"),
    (65504.0, "f97bff"),
    (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"),
    (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"),
    (0.00006103515625, "f90400"),
    (-4.0, "f9c400"),
    (-4.1, "fbc010666666666666"),
    (math.inf, "f97c00"),
    (math.nan, "f97e00"),
    (-math.inf, "f9fc00"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("IETF", "6449455446"),
    ("\u00fc", "62c3bc"),
    ([], "80"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    ({}, "a0"),
]


@pytest.mark.parametrize(("value", "expected"), RFC_EXAMPLES, ids=[e for _, e in RFC_EXAMPLES])
def test_rfc8949_shortest_encodings(value: object, expected: str) -> None:
    assert encode(value) == bytes.fromhex(expected)
    # The same bytes inside a message: a1 61 76 ("v") then the value.
    assert encode(freeze({"v": value})) == bytes.fromhex("a16176" + expected)


@pytest.mark.parametrize(
    ("value", "tagged"),
    [(2**64, "c249010000000000000000"), (-(2**64) - 1, "c349010000000000000000")],
)
def test_rfc8949_bignums_are_outside_the_message_range(value: int, tagged: str) -> None:
    # The RFC's next integers need a bignum tag: no message holds them, either way.
    with pytest.raises(InvalidMessage, match="65-bit integer is outside the message range"):
        freeze({"v": value})
    with pytest.raises(InvalidMessage, match=r"tag [23] is not accepted"):
        decode(bytes.fromhex("a16176" + tagged))


def test_non_finite_floats_round_trip() -> None:
    back = decode(encode(freeze({"nan": math.nan, "inf": math.inf})))
    assert math.isnan(back["nan"])
    assert back["inf"] == math.inf


def test_decode_accepts_any_valid_encoding_of_a_message() -> None:
    # Not canonical (key order, long-form int), but a message: accepted.
    assert decode(bytes.fromhex("a2 6162 1b0000000000000001 6161 02")) == {"a": 2, "b": 1}
    # Buffers other than bytes.
    data = encode(freeze({"a": [1]}))
    assert decode(bytearray(data)) == decode(memoryview(data)) == {"a": [1]}


GARBAGE: list[tuple[str, object]] = [
    ("empty", b""),
    ("break byte", b"\xff"),
    ("truncated map", bytes.fromhex("a2616101")),
    ("truncated string", bytes.fromhex("6568656c")),
    ("huge length", bytes.fromhex("5bffffffffffffffff")),
    ("top-level list", bytes.fromhex("820102")),
    ("top-level int", bytes.fromhex("01")),
    ("int key", bytes.fromhex("a10102")),
    ("array key", bytes.fromhex("a1810102")),
    ("simple value 16", bytes.fromhex("a16173f0")),
    ("simple value 255", bytes.fromhex("a16173f8ff")),
    ("reserved simple value", bytes.fromhex("a16173f818")),
    ("indefinite int", bytes.fromhex("a161731f")),
    ("lone break in a map", bytes.fromhex("bf6161ff")),
    ("text chunk in a byte string", bytes.fromhex("a161735f6161ff")),
    ("set tag", bytes.fromhex("a16173d90102820102")),
    ("datetime tag", bytes.fromhex("a16174c074323032302d30312d30315430303a30303a30305a")),
    ("undefined", bytes.fromhex("a16175f7")),
    ("unknown tag", bytes.fromhex("a16174d9ffff00")),
    ("trailing bytes", bytes.fromhex("a1616101") + b"\x00"),
    ("two messages", bytes.fromhex("a1616101a1616102")),
    ("deep arrays", b"\x81" * 100_000 + b"\x00"),
    ("deep maps", bytes.fromhex("a1616e") * 150 + b"\xa0"),
    ("not bytes", "a1616101"),
]


@pytest.mark.parametrize("data", [d for _, d in GARBAGE], ids=[n for n, _ in GARBAGE])
def test_decode_refuses_garbage(data: Any) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(data)
    assert isinstance(info.value, ValueError)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), message=messages)
def test_any_encoding_of_a_message_decodes_to_it_and_is_no_smaller(
    data: st.DataObject, message: dict[str, Any]
) -> None:
    # Any widths, key orders, definite or indefinite lengths: the same message. Its canonical
    # bytes are never longer than what it came from, give or take a header byte per 256 items
    # (an indefinite container of 256+ items has a shorter header than the definite one).
    raw = data.draw(encodings(message))
    back = decode(raw)
    assert back == message
    assert len(encode(back)) <= len(raw) + len(raw) // 256


A_KEY = head(3, 1) + b"k"  # "k"


@pytest.mark.parametrize("tag", TAGS)
def test_every_tag_is_refused_when_its_head_is_read(tag: int) -> None:
    tagged = head(6, tag)
    for data in (
        tagged,  # nothing after the head: refused before cbor2 reads any content
        tagged + bytes.fromhex("a0"),
        head(5, 1) + A_KEY + tagged + b"\x00",  # a tagged value
        head(5, 1) + A_KEY + head(4, 2) + b"\x01" + tagged + b"\x40",  # in an array
        head(5, 1) + tagged + A_KEY + b"\x00",  # a tagged key
        head(5, 1) + tagged + head(2, 9) + b"\x01" + bytes(8) + b"\x00",  # a key of any tag
    ):
        with pytest.raises(InvalidMessage, match=rf"CBOR tag {tag} is not accepted"):
            decode(data)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), message=messages, tag=st.sampled_from(TAGS) | st.integers(0, 2**64 - 1))
def test_a_tag_anywhere_is_refused(data: st.DataObject, message: dict[str, Any], tag: int) -> None:
    inner = data.draw(encodings(message))
    for raw in (
        head(6, tag) + inner,
        head(5, 1) + A_KEY + head(4, 2) + b"\x00" + head(6, tag) + inner,
    ):
        with pytest.raises(InvalidMessage, match=f"CBOR tag {tag} "):
            decode(raw)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ("a2 6161 01 6161 02", "'a'"),
        ("a2 6161 01 780161 02", "'a'"),  # the same key, a longer head
        ("bf 6161 01 7f 6161 ff 02 ff", "'a'"),  # indefinite map, key in chunks
        ("a1 6178 a3 6162 01 6163 02 6162 03", "'b'"),  # nested
        ("a2 4100 01 4100 02", "b'\\x00'"),  # bytes keys (refused anyway)
    ],
)
def test_duplicate_keys_are_refused_naming_the_key(data: str, key: str) -> None:
    # cbor2 keeps the last value silently unless told otherwise; JSON's are refused too.
    with pytest.raises(InvalidMessage, match=f"[Dd]uplicate map key: {re.escape(key)}"):
        decode(bytes.fromhex(data))


@pytest.mark.parametrize(
    "data",
    [
        "a1 01 00",  # int
        "a1 20 00",  # negative int
        "a1 1bffffffffffffffff 00",  # the largest int
        "a1 f93c00 00",  # float
        "a1 f5 00",  # true
        "a1 f6 00",  # null
        "a1 80 00",  # array
        "a1 a0 00",  # map
        "a1 4161 00",  # bytes
        "a1 c2 49 010000000000000000 00",  # a bignum (a tag)
    ],
)
def test_map_keys_that_are_not_text_are_invalid(data: str) -> None:
    with pytest.raises(InvalidMessage, match=r"not accepted|key"):
        decode(bytes.fromhex(data))


@pytest.mark.parametrize("indefinite", [False, True], ids=["definite", "indefinite"])
@pytest.mark.parametrize("kind", ["maps", "arrays"])
def test_nesting_limit_is_exact_in_every_form(kind: str, indefinite: bool) -> None:
    def nested(levels: int) -> bytes:
        # The message (a map), then `levels` containers inside it, the innermost holding 0.
        one = (b"\xbf" if indefinite else b"\xa1") + A_KEY if kind == "maps" else b""
        end = b"\xff" if indefinite else b""
        if kind == "maps":
            return one * (levels + 1) + b"\x00" + end * (levels + 1)
        start = b"\x9f" if indefinite else b"\x81"
        return head(5, 1) + A_KEY + start * levels + b"\x00" + end * levels

    assert decode(nested(MAX_DEPTH))
    for levels in (MAX_DEPTH + 1, MAX_DEPTH + 2, 10_000):
        with pytest.raises(InvalidMessage, match=f"nested deeper than {MAX_DEPTH} levels"):
            decode(nested(levels))


@pytest.mark.parametrize(
    ("data", "value"),
    [
        ("1bffffffffffffffff", 2**64 - 1),
        ("3bffffffffffffffff", -(2**64)),
        ("1b0000000000000000", 0),  # not the shortest form: still the number
        ("3800", -1),
    ],
)
def test_integers_at_the_ends_of_the_range(data: str, value: int) -> None:
    assert decode(bytes.fromhex("a16176" + data)) == {"v": value}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=40))
def test_decode_of_arbitrary_bytes_is_a_message_or_invalid(data: bytes) -> None:
    try:
        message = decode(data)
    except InvalidMessage:
        return
    assert isinstance(message, Message)
    # Whatever decodes is a message: it re-encodes and decodes to itself (NaN aside).
    if "nan" not in repr(message):
        assert decode(encode(message)) == message


@settings(max_examples=50, deadline=None)
@given(message=messages, cut=st.integers(min_value=0))
def test_every_truncation_is_refused(message: dict[str, Any], cut: int) -> None:
    data = encode(freeze(message))
    with pytest.raises(InvalidMessage):
        decode(data[: cut % len(data)])


def test_encode_refuses_what_is_not_a_message_value() -> None:
    with pytest.raises(InvalidMessage):
        encode(object())


# -- decode_trusted: the store's fast path for bytes hbtrio encoded itself ----------------------


def _assert_frozen(value: Any) -> None:
    if isinstance(value, dict):
        assert isinstance(value, Message)
        for v in value.values():
            _assert_frozen(v)
    elif isinstance(value, tuple | list):
        assert isinstance(value, FrozenList)
        for v in value:
            _assert_frozen(v)


@settings(max_examples=50, deadline=None)
@given(message=messages)
def test_trusted_decode_round_trip(message: dict[str, Any]) -> None:
    frozen = freeze(message)
    back = decode_trusted(encode(frozen))
    assert back == frozen == message
    _assert_frozen(back)
    assert encode(back) == encode(frozen)


def test_trusted_decode_gives_read_only_messages() -> None:
    back = decode_trusted(encode(freeze({"a": [[1, {"b": [[2]]}], {}], "c": {"d": []}})))
    with pytest.raises(TypeError):
        back["c"]["x"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        back["a"][0].append(3)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", bytes.fromhex("a2616101"), bytes.fromhex("820102"), bytes.fromhex("01")],
    ids=["empty", "break byte", "truncated map", "list", "int"],
)
def test_trusted_decode_refuses_what_is_not_a_stored_message(data: bytes) -> None:
    with pytest.raises(InvalidMessage):
        decode_trusted(data)


DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("doc", ["http.md", "api.md"])
def test_the_docs_state_the_limits_the_code_has(doc: str) -> None:
    text = " ".join((DOCS / doc).read_text().split())
    assert (MIN_INT, MAX_INT) == (-(2**64), 2**64 - 1)
    assert "`-2**64`" in text and "`2**64-1`" in text
    assert f"at most {MAX_DEPTH} levels below the message itself" in text
