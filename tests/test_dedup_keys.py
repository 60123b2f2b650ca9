"""Joining a resolution under way: the fast key, and that it never joins unequal messages.

A caller that joins an identical resolution already under way is matched by
`_fast_key` (a tuple of the messages' items, types tagged) without encoding
anything; messages without one are matched by their canonical encodings.
Equal fast keys must mean equal canonical encodings, or two different
resolutions would share one result.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import hbtrio
from hbtrio._engine import _dedup_key, _fast_key
from strategies import messages


@settings(max_examples=400)
@given(a=st.tuples(messages, messages), b=st.tuples(messages, messages))
def test_equal_fast_keys_mean_equal_canonical_keys(a: Any, b: Any) -> None:
    fa, fb = _fast_key(*a), _fast_key(*b)
    if fa is not None and fb is not None and fa == fb:
        assert _dedup_key(*a) == _dedup_key(*b)
        assert hash(fa) == hash(fb)


@settings(max_examples=200)
@given(pair=st.tuples(messages, messages))
def test_a_copy_has_the_same_fast_key_and_messages_without_priv_have_one(pair: Any) -> None:
    again = copy.deepcopy(pair)
    key = _fast_key(*pair)
    assert key == _fast_key(*again)
    if "priv" not in pair[0] and "priv" not in pair[1]:
        assert key is not None  # every message of these strategies (no NaN) has one


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"n": 1}, {"n": True}),
        ({"n": 0}, {"n": False}),
        ({"n": 1}, {"n": 1.0}),
        ({"x": 0.0}, {"x": -0.0}),
        ({"x": [1]}, {"x": [True]}),
        ({"x": {"a": 1}}, {"x": [["a", 1]]}),
        ({"x": b"a"}, {"x": "a"}),
        ({"x": None}, {"x": [None]}),
    ],
)
def test_values_equal_in_python_but_not_as_messages_have_other_keys(
    one: dict[str, Any], other: dict[str, Any]
) -> None:
    base = {"device": "d@1.0"}
    assert _dedup_key(base, one) != _dedup_key(base, other)
    assert _fast_key(base, one) != _fast_key(base, other)


def test_messages_without_a_fast_key() -> None:
    base = {"device": "d@1.0"}
    cyclic: dict[str, Any] = {"a": 1}
    cyclic["self"] = cyclic
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    for request in ({"priv": {"t": 1}, "a": 1}, cyclic, {"x": deep}, {"x": (1, 2)}, {1: "a"}):
        assert _fast_key(base, request) is None
    assert _fast_key(hbtrio.freeze({"device": "d@1.0"}), {"a": 1}) is None  # not a dict


class Gate:
    """Resolutions park until ``release``; ``runs`` counts executions by request."""

    def __init__(self) -> None:
        self.runs: list[Any] = []
        self.release = trio.Event()

    async def work(self, base: hbtrio.Message, request: hbtrio.Message) -> dict[str, Any]:
        self.runs.append(dict(request))
        await self.release.wait()
        return {"x": request.get("x")}


async def test_equal_requests_join_and_unequal_ones_run_apart() -> None:
    gate = Gate()
    base = {"device": "gate@1.0"}
    requests = [
        {"path": "work", "x": 1},
        {"path": "work", "x": True},
        {"path": "work", "x": 1.0},
        {"path": "work", "x": [1, {"a": -0.0}]},
        {"path": "work", "x": [1, {"a": 0.0}]},
    ]
    async with hbtrio.open_engine(devices={"gate@1.0": gate}) as engine:
        got: list[tuple[int, Any]] = []

        async def call(i: int, request: dict[str, Any]) -> None:
            got.append((i, await engine.resolve(dict(base), copy.deepcopy(request))))

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # each request three times, and once with its keys reversed
                for i, request in enumerate(requests):
                    nursery.start_soon(call, i, request)
            for i, request in enumerate(requests):
                nursery.start_soon(call, i, dict(reversed(list(request.items()))))
            await trio.testing.wait_all_tasks_blocked()
            assert len(gate.runs) == len(requests)  # one execution per distinct request
            assert engine.statistics().deduplicated == 3 * len(requests)
            gate.release.set()
        for i, result in got:
            assert result == {"x": requests[i]["x"]}
        assert len(got) == 4 * len(requests)
        # Everything left the tables: a new identical call executes again.
        assert not engine._executions and not engine._fast_executions
