"""Messages: canonical IDs, validation with key paths, and read-only frozen messages."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import pickle
import random
import re
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hbtrio
from hbtrio import FrozenList, InvalidMessage, Message, encode, freeze, message_id
from hbtrio._message import MAX_DEPTH, validate_slot
from strategies import messages

# -- strategies -------------------------------------------------------------------------------


def shuffled(value: Any, rnd: random.Random) -> Any:
    """A deep copy of ``value`` with every mapping's keys in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rnd) for v in value]
    return value


def independent_id(message: dict[str, Any]) -> str:
    """The message ID computed straight from the spec, without hbtrio."""
    without_priv = {k: v for k, v in message.items() if k != "priv"}
    digest = hashlib.sha256(cbor2.dumps(without_priv, canonical=True)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


ID_RE = re.compile(r"[A-Za-z0-9_-]{43}")


# -- canonical IDs ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(message=messages, rnd=st.randoms(use_true_random=False))
def test_id_and_bytes_do_not_depend_on_key_order(
    message: dict[str, Any], rnd: random.Random
) -> None:
    other = shuffled(message, rnd)
    assert message_id(other) == message_id(message)
    assert encode(freeze(other)) == encode(freeze(message))


@settings(max_examples=60, deadline=None)
@given(message=messages)
def test_id_is_sha256_of_canonical_cbor_as_unpadded_base64url(message: dict[str, Any]) -> None:
    mid = message_id(message)
    assert ID_RE.fullmatch(mid), mid
    assert mid == independent_id(message)
    assert message_id(freeze(message)) == mid


def test_id_ignores_top_level_priv_only() -> None:
    base = {"a": 1, "b": {"c": [1, 2]}}
    assert message_id({**base, "priv": {"secret": b"x"}}) == message_id(base)
    assert message_id({"priv": 1, **base}) == message_id({"priv": 2, **base})
    # "priv" below the top level is part of the message.
    assert message_id({"a": 1, "b": {"c": [1, 2], "priv": 1}}) != message_id(base)


def test_different_messages_have_different_ids() -> None:
    ids = {
        message_id(m)
        for m in [{}, {"a": 1}, {"a": 2}, {"a": "1"}, {"a": b"1"}, {"a": [1]}, {"b": 1}, {"a": 1.5}]
    }
    assert len(ids) == 8


@pytest.mark.parametrize(
    ("message", "cbor_hex"),
    [({}, "a0"), ({"a": 1}, "a1616101"), ({"b": [True, None], "a": b"x"}, "a2616141786162 82f5f6")],
)
def test_known_ids(message: dict[str, Any], cbor_hex: str) -> None:
    # Canonical CBOR written out by hand (RFC 8949 section 4.2.1), hashed with hashlib only.
    digest = hashlib.sha256(bytes.fromhex(cbor_hex)).digest()
    assert message_id(message) == base64.urlsafe_b64encode(digest).decode().rstrip("=")


# -- invalid input ----------------------------------------------------------------------------


class Opaque:
    pass


def _dict_cycle() -> dict[str, Any]:
    outer: dict[str, Any] = {"ok": 1, "inner": {}}
    outer["inner"]["back"] = outer
    return outer


def _list_cycle() -> dict[str, Any]:
    items: list[Any] = [1]
    items.append(items)
    return {"a": {"items": items}}


def _nested(depth: int) -> dict[str, Any]:
    message: dict[str, Any] = {}
    inner = message
    for _ in range(depth):
        inner["n"] = {}
        inner = inner["n"]
    return message


BAD_VALUES: list[tuple[str, Callable[[], dict[Any, Any]], str]] = [
    ("set", lambda: {"a": {"b": [1, {2, 3}]}}, "a.b[1]"),
    ("frozenset", lambda: {"a": frozenset()}, "a"),
    ("object", lambda: {"x": [0, Opaque()]}, "x[1]"),
    ("bytearray", lambda: {"raw": bytearray(b"x")}, "raw"),
    ("complex", lambda: {"z": {"w": 1j}}, "z.w"),
    ("int key", lambda: {"a": {1: "x"}}, "a: key 1"),
    ("bytes key", lambda: {b"k": 1}, "key b'k'"),
    ("key in a list", lambda: {"l": [{"ok": 1}, {None: 1}]}, "l[1]: key None"),
    ("dict cycle", _dict_cycle, "inner.back"),
    ("list cycle", _list_cycle, "a.items[1]"),
    ("too deep", lambda: _nested(MAX_DEPTH + 5), "n.n.n"),
    ("int above the range", lambda: {"n": {"big": 2**64}}, "n.big"),
    ("int below the range", lambda: {"n": [0, -(2**64) - 1]}, "n[1]"),
    ("int of 4,301 digits", lambda: {"n": 10**4300}, "n: a 14285-bit integer"),
]


@pytest.mark.parametrize(
    ("make", "where"),
    [(make, where) for _, make, where in BAD_VALUES],
    ids=[name for name, _, _ in BAD_VALUES],
)
@pytest.mark.parametrize("check", [freeze, message_id, Message], ids=lambda f: f.__name__)
def test_invalid_messages_are_rejected_naming_the_bad_key(
    make: Callable[[], dict[Any, Any]], where: str, check: Callable[[Any], object]
) -> None:
    with pytest.raises(InvalidMessage) as info:
        check(make())
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, hbtrio.HbTrioError)
    assert where in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("make", "where"),
    [(make, where) for _, make, where in BAD_VALUES],
    ids=[name for name, _, _ in BAD_VALUES],
)
def test_bad_values_are_found_when_nested(make: Callable[[], dict[Any, Any]], where: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        freeze({"good": 1, "outer": [{"ok": True}, make()]})
    assert f"outer[1].{where}" in str(info.value) or f"outer[1]: {where}" in str(info.value)


@pytest.mark.parametrize("top", [[1, 2], (), "message", b"m", None, 5, {1, 2}])
@pytest.mark.parametrize("check", [freeze, message_id], ids=lambda f: f.__name__)
def test_top_level_must_be_a_mapping(top: object, check: Callable[[Any], object]) -> None:
    with pytest.raises(InvalidMessage, match="mapping"):
        check(top)


def test_depth_limit_is_exact() -> None:
    freeze(_nested(MAX_DEPTH))
    with pytest.raises(InvalidMessage, match="deeper"):
        freeze(_nested(MAX_DEPTH + 1))


def test_shared_subvalue_is_not_a_cycle() -> None:
    shared = {"x": [1, 2]}
    frozen = freeze({"a": shared, "b": shared, "c": [shared, shared]})
    assert frozen["a"] == frozen["b"] == {"x": [1, 2]}


def test_allowed_values() -> None:
    message = {
        "bytes": b"\x00\xff",
        "str": "text",
        "int": -(2**64),
        "biggest int": 2**64 - 1,
        "float": 1.5,
        "bool": True,
        "none": None,
        "list": [1, "two", [3]],
        "tuple": (1, 2),
        "nested": {"deeper": {"deepest": []}},
    }
    frozen = freeze(message)
    assert frozen == message | {"tuple": [1, 2]}


# -- read-only messages -----------------------------------------------------------------------


def sample() -> Message:
    return freeze({"a": 1, "nested": {"x": [1, {"y": 2}]}, "list": [[1, 2], {"k": "v"}]})


MUTATORS: list[tuple[str, Callable[[Any], object]]] = [
    ("setitem", lambda m: m.__setitem__("a", 2)),
    ("setitem new", lambda m: m.__setitem__("new", 2)),
    ("delitem", lambda m: m.__delitem__("a")),
    ("update", lambda m: m.update({"a": 2})),
    ("update kwargs", lambda m: m.update(a=2)),
    ("pop", lambda m: m.pop("a")),
    ("pop default", lambda m: m.pop("missing", None)),
    ("popitem", lambda m: m.popitem()),
    ("clear", lambda m: m.clear()),
    ("setdefault", lambda m: m.setdefault("new", 1)),
    ("ior", lambda m: m.__ior__({"a": 2})),
]


@pytest.mark.parametrize("mutate", [m for _, m in MUTATORS], ids=[n for n, _ in MUTATORS])
@pytest.mark.parametrize("where", ["top", "nested", "in a list"])
def test_message_refuses_every_mutator(mutate: Callable[[Any], object], where: str) -> None:
    message = sample()
    target = {"top": message, "nested": message["nested"], "in a list": message["list"][1]}[where]
    before = copy.deepcopy(dict(message))
    with pytest.raises(TypeError):
        mutate(target)
    assert message == before == sample()


def test_augmented_or_does_not_mutate() -> None:
    message = sample()
    alias = message
    with pytest.raises(TypeError):
        alias |= {"a": 2}
    assert message == sample()
    assert alias is message


def test_nested_values_are_frozen() -> None:
    message = sample()
    assert type(message) is not dict and isinstance(message, Message)
    assert isinstance(message["nested"], Message)
    assert isinstance(message["nested"]["x"], tuple)
    assert isinstance(message["nested"]["x"], FrozenList)
    assert isinstance(message["nested"]["x"][1], Message)
    assert isinstance(message["list"][0], tuple)
    assert isinstance(message["list"][1], Message)
    with pytest.raises(TypeError):
        message["list"][0][0] = 5  # type: ignore[index]
    with pytest.raises(AttributeError):
        message["list"].append(1)


def test_freezing_copies_the_input() -> None:
    inner = [1, 2]
    original: dict[str, Any] = {"inner": inner, "d": {"k": 1}}
    frozen = freeze(original)
    inner.append(3)
    original["d"]["k"] = 2
    original["new"] = 1
    assert frozen == {"inner": [1, 2], "d": {"k": 1}}


def test_freeze_returns_a_message_unchanged() -> None:
    message = sample()
    assert freeze(message) is message
    assert copy.copy(message) is message


def test_or_gives_a_new_plain_dict() -> None:
    message = sample()
    merged = message | {"a": 2, "b": 3}
    assert type(merged) is dict
    assert merged == {**sample(), "a": 2, "b": 3}
    merged["c"] = 4  # a plain dict: the next message is built from it
    assert message == sample()
    assert "c" not in message
    assert type({"z": 0} | message) is dict


def test_frozen_message_equals_its_plain_form() -> None:
    plain = {"a": [1, [2, {"b": [3]}]], "c": {"d": []}}
    frozen = freeze(plain)
    assert frozen == plain
    assert plain == frozen
    assert frozen == plain
    assert frozen != {"a": [1, [2, {"b": [4]}]], "c": {"d": []}}
    assert frozen["a"] == [1, [2, {"b": [3]}]]
    assert frozen["a"] != [1]


def test_frozenlist_constructor_validates() -> None:
    assert FrozenList([[1], {"a": [2]}]) == [[1], {"a": [2]}]
    assert isinstance(FrozenList([[1]])[0], FrozenList)
    with pytest.raises(InvalidMessage):
        FrozenList([{1, 2}])
    # So a hand-made FrozenList cannot smuggle a mutable list into a message.
    frozen = freeze({"a": FrozenList([[1]])})
    with pytest.raises(AttributeError):
        frozen["a"][0].append(2)


def test_json_dumps_works() -> None:
    plain = {"a": 1, "nested": {"x": [1, {"y": 2}]}, "list": [[1, 2], {"k": "v"}], "n": None}
    assert json.loads(json.dumps(freeze(plain))) == plain
    assert json.dumps(freeze(plain), sort_keys=True) == json.dumps(plain, sort_keys=True)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip(protocol: int) -> None:
    message = freeze({"a": 1, "nested": {"x": [1, {"y": b"2"}]}, "priv": [[]]})
    back = pickle.loads(pickle.dumps(message, protocol=protocol))
    assert back == message
    assert message_id(back) == message_id(message)
    assert isinstance(back, Message)
    assert isinstance(back["nested"], Message)
    assert isinstance(back["nested"]["x"], FrozenList)
    with pytest.raises(TypeError):
        back["a"] = 2


def test_deepcopy_round_trip() -> None:
    message = sample()
    copied = copy.deepcopy({"wrapper": message})
    assert copied["wrapper"] == message
    assert isinstance(copied["wrapper"], Message)


def test_messages_are_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(sample())


# -- slots ------------------------------------------------------------------------------------


@pytest.mark.parametrize("slot", [0, 1, 7, 2**63 - 1])
def test_validate_slot_accepts_non_negative_ints_up_to_the_largest_slot(slot: int) -> None:
    assert validate_slot(slot) == slot


@pytest.mark.parametrize("slot", [2**63, 2**70, 10**30, pytest.param(10**5000, id="5001-digits")])
def test_validate_slot_says_too_large(slot: int) -> None:
    """Regression (issue 10.8): a slot no store can hold is refused, and said to be too large."""
    with pytest.raises(hbtrio.InvalidMessage, match="too large"):
        validate_slot(slot)


@pytest.mark.parametrize("slot", [-1, -(2**70), True, False, 1.0, 0.0, "1", None, [1]])
def test_validate_slot_rejects(slot: object) -> None:
    with pytest.raises(InvalidMessage) as info:
        validate_slot(slot)
    assert isinstance(info.value, ValueError)
    assert "slot" in str(info.value)
