"""Canonical CBOR: round trips, deterministic bytes (RFC 8949 section 4.2.1), garbage refused."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbtrio import FrozenList, InvalidMessage, Message, decode, encode, freeze
from hbtrio._codec import encode_plain
from hbtrio._message import decode_trusted
from strategies import messages


@settings(max_examples=50, deadline=None)
@given(message=messages)
def test_round_trip(message: dict[str, Any]) -> None:
    data = encode(freeze(message))
    back = decode(data)
    assert type(back) is not dict and isinstance(back, Message)
    assert back == message
    assert encode(back) == data


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
    (18446744073709551616, "c249010000000000000000"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-18446744073709551617, "c349010000000000000000"),
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
