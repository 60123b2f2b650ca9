"""Bad input: Hypothesis throws arbitrary messages, keys, slots, IDs and bodies at the public API.

In process: `freeze`, `message_id`, `encode`/`decode`, and sequences of engine
calls (`spawn`, `schedule`, `schedule_many`, `compute`, `now`, `latest_slot`,
`stop`, `resolve`) with arbitrary arguments. Over HTTP: every endpoint of the
node's ASGI app, called directly with arbitrary methods, paths, query
strings, headers and bodies, and raw bytes at a real server on a loopback
port.

The only acceptable outcomes are a correct answer (checked against a model:
the count at slot s is the sum of the scheduled ``n``) or the documented
error: an `HbTrioError` subclass that matches a problem of the input, or a
documented 4xx status with a JSON error body. Every call is bounded with
`trio.fail_after` (a hang fails the test), and processes that no call was
allowed to touch (the sentinels) must be exactly as they were.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import attrs
import cbor2
import httpx
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hbtrio
from hbtrio import _jsonwire
from hbtrio._message import _Frozen
from hbtrio.http import make_app, run_server
from helpers import COUNTER
from strategies import TAGS, big_ints, head, ints
from test_http import assert_error, open_node, parse_answer, raw_exchange, schedule, spawn

CBOR_TYPE = "application/cbor"
JSON_TYPE = "application/json"

CALL_LIMIT = 10.0
ENGINE_ERRORS = (
    hbtrio.InvalidMessage,
    hbtrio.ProcessNotFound,
    hbtrio.UnknownDevice,
    hbtrio.ComputeError,
)


# --------------------------------------------------------------------------- strategies


class Opaque:
    """Some object that is not a message value."""


good_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | ints
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
bad_scalars = (
    st.sampled_from(
        [set(), frozenset({1}), Opaque(), 1j, bytearray(b"x"), range(3), "\ud800", object, ...]
    )
    | big_ints
)
bad_keys = (
    st.integers()
    | big_ints
    | st.binary(max_size=4)
    | st.none()
    | st.just(("t",))
    | st.just("\udc80")
)
keys = st.text(max_size=8) | st.sampled_from(["n", "priv", "device", "slot", "path", "body"])


def _cycle(d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    d["self"] = d
    return d


def _deep(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"x": out}
    return out


values = st.recursive(
    good_scalars | bad_scalars.filter(lambda _: True),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(keys | bad_keys, children, max_size=3)
    ),
    max_leaves=12,
)
messages = (
    st.dictionaries(keys, good_scalars, max_size=4)
    | st.dictionaries(keys | bad_keys, values, max_size=4)
    | st.builds(_cycle, st.dictionaries(keys, good_scalars, max_size=2))
    | st.builds(_deep, st.integers(95, 130))
    | values
)
good_bodies = st.fixed_dictionaries({"n": st.integers(-5, 50)})
bodies = st.one_of(
    good_bodies,
    good_bodies,
    good_bodies,
    st.fixed_dictionaries({"n": st.integers(-5, 50) | good_scalars}, optional={"x": values}),
    st.fixed_dictionaries({}, optional={"x": good_scalars}),
)
small_slots = st.integers(0, 12)
slots = st.one_of(
    small_slots,
    small_slots,
    small_slots,
    st.integers(-3, 30)
    | st.integers()
    | big_ints
    | st.floats()
    | st.booleans()
    | st.text(max_size=3)
    | st.none()
    | st.just([1]),
)
definitions = st.one_of(
    st.fixed_dictionaries(
        {"device": st.just("process@1.0"), "execution-device": st.just("counter@1.0")},
        optional={"nonce": good_scalars, "priv": values},
    ),
    st.fixed_dictionaries(
        {
            "device": st.just("process@1.0") | st.text(max_size=12) | good_scalars,
            "execution-device": st.sampled_from(["counter@1.0", "nope@1.0", ""]) | good_scalars,
        },
        optional={"nonce": values, "priv": values},
    ),
    messages,
)
#: ("pool", k): the k-th process the example may use; anything else is taken as it is.
pool_pids = st.tuples(st.just("pool"), st.integers(0, 20))
pids = st.one_of(
    pool_pids,
    pool_pids,
    pool_pids,
    pool_pids,
    st.builds(lambda x: hbtrio.message_id({"unknown": x}), ints)
    | st.text(max_size=50)
    | st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=43, max_size=43)
    | st.binary(max_size=43)
    | st.none()
    | st.integers()
    | big_ints
    | st.just(["x"])
    | st.just({"x": 1}),
)
paths = st.sampled_from(["compute", "now", "init", "x", "", "__class__", "hbtrio_trusted"])
requests_ = st.one_of(
    st.fixed_dictionaries(
        {"path": st.just("compute"), "slot": small_slots, "body": bodies},
        optional={"priv": good_scalars},
    ),
    st.fixed_dictionaries({"path": paths | good_scalars}, optional={"slot": slots, "body": values}),
    messages,
)
bases = st.one_of(
    st.fixed_dictionaries({"device": st.just("counter@1.0"), "count": st.integers(0, 9)}),
    st.fixed_dictionaries(
        {"device": st.sampled_from(["process@1.0", "counter@1.0", "ghost@1.0"]) | good_scalars},
        optional={"execution-device": st.just("counter@1.0"), "nonce": good_scalars},
    ),
    messages,
)

ops = st.one_of(
    st.tuples(st.just("spawn"), definitions),
    st.tuples(st.just("spawn-pool"), st.integers(0, 3)),
    st.tuples(st.just("schedule"), pool_pids, bodies),
    st.tuples(st.just("schedule"), pids, bodies | messages),
    st.tuples(st.just("schedule_many"), pool_pids, st.lists(bodies, max_size=4)),
    st.tuples(st.just("schedule_many"), pids, st.lists(bodies | messages, max_size=3) | values),
    st.tuples(st.just("compute"), pool_pids, small_slots),
    st.tuples(st.just("compute"), pids, slots),
    st.tuples(st.just("now"), pids),
    st.tuples(st.just("latest_slot"), pids),
    st.tuples(st.just("stop"), pids),
    st.tuples(st.just("resolve"), bases, requests_),
    st.tuples(st.just("resolve-pool"), pids, slots),
)


# --------------------------------------------------------------------------- the oracle


def problems_of_message(value: object) -> set[type[Exception]]:
    """What a message's validation may raise: nothing, or InvalidMessage."""
    try:
        hbtrio.message_id(hbtrio.freeze(value))
    except hbtrio.InvalidMessage:
        return {hbtrio.InvalidMessage}
    return set()


def storable(value: object) -> bool:
    """Whether the whole message encodes as CBOR, ``"priv"`` included.

    `message_id` leaves ``"priv"`` out, so a message whose ``"priv"`` holds a
    lone surrogate has an ID but no CBOR form: a `MemoryStore` keeps it, a
    `SQLiteStore` refuses it with `InvalidMessage`. Either is acceptable.
    """
    try:
        hbtrio.encode(hbtrio.freeze(value))
    except hbtrio.InvalidMessage:
        return False
    return True


def well_formed_pid(pid: object) -> bool:
    try:
        hbtrio._message.validate_pid(pid)
    except hbtrio.InvalidMessage:
        return False
    return True


def valid_slot(slot: object) -> bool:
    return type(slot) is int and 0 <= slot <= 2**63 - 1


class Model:
    """What the engine must answer: per process, the scheduled bodies (slot 0: None)."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[Any]] = {}
        self.definitions: dict[str, Any] = {}
        self.pool: list[str] = []

    def pick(self, pid: object) -> object:
        if isinstance(pid, tuple) and pid and pid[0] == "pool":
            return self.pool[pid[1] % len(self.pool)]
        return pid

    def add(self, pid: str, definition: Any) -> None:
        if pid not in self.bodies:
            self.bodies[pid] = [None]
            self.definitions[pid] = definition
            self.pool.append(pid)

    def state(self, pid: str, slot: int) -> tuple[Any, set[type[Exception]], int | None]:
        """(expected state, or problems and the slot the device fails at)."""
        bodies = self.bodies[pid]
        if slot >= len(bodies):
            return None, {hbtrio.SlotNotScheduled}, len(bodies)
        count = 0
        for s in range(1, slot + 1):
            n = bodies[s].get("n", 0)
            if type(n) is not int:
                return None, {hbtrio.ComputeError}, s
            count += n
            if not -(2**64) <= count < 2**64:  # the count must stay a message integer
                return None, {hbtrio.ComputeError}, s
        return {"count": count, "at-slot": slot}, set(), None


def spawn_problems(definition: object) -> set[type[Exception]]:
    problems = problems_of_message(definition)
    if problems:
        return problems | {hbtrio.UnknownDevice}  # the device may be checked first
    frozen = hbtrio.freeze(definition)
    if frozen.get("device") != "process@1.0" or type(frozen.get("execution-device")) is not str:
        return {hbtrio.InvalidMessage}
    if frozen["execution-device"] != "counter@1.0":
        return {hbtrio.UnknownDevice}
    return set()


async def run_op(engine: hbtrio.Engine, model: Model, op: tuple[Any, ...]) -> None:
    """Run one call and check its outcome against the model."""
    kind = op[0]
    problems: set[type[Exception]] = set()
    lenient = False  # True: the problems may or may not be raised
    check: Callable[[Any], Awaitable[None] | None] = lambda result: None  # noqa: E731
    if kind in ("spawn", "spawn-pool"):
        definition = (
            op[1]
            if kind == "spawn"
            else {"device": "process@1.0", "execution-device": "counter@1.0", "nonce": op[1]}
        )
        problems = spawn_problems(definition)
        call = partial(engine.spawn, definition)

        def check(result: Any) -> None:
            assert result == hbtrio.message_id(definition)
            model.add(result, definition)

    elif kind in ("schedule", "schedule_many"):
        pid = model.pick(op[1])
        batch = [op[2]] if kind == "schedule" else op[2]
        if not well_formed_pid(pid):
            problems.add(hbtrio.InvalidMessage)
        elif pid not in model.bodies:
            problems.add(hbtrio.ProcessNotFound)
        if not isinstance(batch, list | tuple):
            problems.add(hbtrio.InvalidMessage)
        else:
            for message in batch:
                problems |= problems_of_message(message)
            if not problems and not all(storable(m) for m in batch):
                problems, lenient = {hbtrio.InvalidMessage}, True
        call = (
            partial(engine.schedule, pid, op[2])
            if kind == "schedule"
            else partial(engine.schedule_many, pid, op[2])
        )

        def check(result: Any) -> None:
            got = [result] if kind == "schedule" else result
            first = len(model.bodies[pid])  # type: ignore[index]
            assert got == list(range(first, first + len(batch)))
            model.bodies[pid].extend(hbtrio.freeze(m) for m in batch)  # type: ignore[index]

    elif kind in ("compute", "now", "resolve-pool"):
        pid = model.pick(op[1])
        slot = op[2] if kind != "now" else None
        if kind == "compute":
            call = partial(engine.compute, pid, slot)
        elif kind == "now":
            call = partial(engine.now, pid)
        else:
            # compute through generic resolution: the base is the process definition.
            base = model.definitions.get(pid) if isinstance(pid, str) else None  # type: ignore[call-overload]
            if base is None:
                base = {"device": "process@1.0", "execution-device": "counter@1.0", "u": pid}
                if not problems_of_message(base):
                    pid = hbtrio.message_id(base)
            call = partial(engine.resolve, base, {"path": "compute", "slot": slot})
        if kind != "now" and not valid_slot(slot):
            problems.add(hbtrio.InvalidMessage)
        if kind == "resolve-pool" and problems_of_message({"slot": slot}):
            problems.add(hbtrio.InvalidMessage)  # the request is a message: 2**64 is no slot
        if not well_formed_pid(pid):
            problems.add(hbtrio.InvalidMessage)
        elif pid not in model.bodies:
            problems.add(hbtrio.ProcessNotFound)
        if not problems:
            assert isinstance(pid, str)
            at = len(model.bodies[pid]) - 1 if kind == "now" else slot
            expected, problems, failing = model.state(pid, at)  # type: ignore[arg-type]

            def check(result: Any) -> None:
                assert result == expected

            if failing is not None:
                call = _expect_attempted(call, failing)
    elif kind == "latest_slot":
        pid = model.pick(op[1])
        if not well_formed_pid(pid):
            problems.add(hbtrio.InvalidMessage)
        elif pid not in model.bodies:
            problems.add(hbtrio.ProcessNotFound)
        call = partial(engine.latest_slot, pid)

        def check(result: Any) -> None:
            assert result == len(model.bodies[pid]) - 1  # type: ignore[index]

    elif kind == "stop":
        pid = model.pick(op[1])
        if not well_formed_pid(pid):
            problems.add(hbtrio.InvalidMessage)
        call = partial(engine.stop, pid)

        def check(result: Any) -> None:
            assert result is None
            assert pid not in engine.workers

    else:
        assert kind == "resolve"
        call = partial(engine.resolve, op[1], op[2])
        problems = set(ENGINE_ERRORS)  # anything documented; a result must be a message value
        check = _check_resolved

    with trio.fail_after(CALL_LIMIT):
        try:
            result = await call()
        except hbtrio.HbTrioError as exc:
            assert isinstance(exc, tuple(problems) or ()), (
                f"{kind}: raised {exc!r}, expected {problems or 'success'}"
            )
            if isinstance(exc, hbtrio.ComputeError):
                assert exc.phase in ("compute", "get-schedule")
            return
    if (kind == "resolve" and problems) or lenient:
        pass  # a device call that happened to work; or a store that took the message
    else:
        assert not problems, f"{kind}: succeeded with {result!r}, expected one of {problems}"
    outcome = check(result)
    if outcome is not None:
        await outcome


def _expect_attempted(
    call: Callable[[], Awaitable[Any]], slot: int
) -> Callable[[], Awaitable[Any]]:
    async def wrapped() -> Any:
        try:
            return await call()
        except hbtrio.ComputeError as exc:
            assert exc.attempted_slot == slot, (exc, slot)
            raise

    return wrapped


def _check_resolved(result: Any) -> None:
    hbtrio.message_id({"result": result})  # a message value, encodable


async def snapshot_of(engine: hbtrio.Engine, pids: list[str]) -> list[tuple[int, str, list[str]]]:
    """Everything observable about the sentinel processes."""
    out = []
    for pid in pids:
        latest = await engine.latest_slot(pid)
        assignments = await engine.store.get_assignments(pid, 0, latest + 1)
        hbtrio.verify_schedule(pid, assignments)
        state = await engine.now(pid)
        out.append((latest, hbtrio.message_id(state), [a["message-id"] for a in assignments]))
    return out


# --------------------------------------------------------------------------- pure functions


@settings(max_examples=300, deadline=None)
@given(value=messages)
def test_freeze_and_message_id_accept_or_raise_invalid_message(value: Any) -> None:
    try:
        frozen = hbtrio.freeze(value)
    except hbtrio.InvalidMessage as exc:
        assert str(exc)
        return
    assert isinstance(frozen, hbtrio.Message)
    assert hbtrio.freeze(frozen) == frozen
    try:
        mid = hbtrio.message_id(value)
    except hbtrio.InvalidMessage:
        return
    assert len(mid) == 43 and mid == hbtrio.message_id(frozen)
    if storable(frozen):
        assert hbtrio.decode(hbtrio.encode(frozen)) == frozen or _has_nan(frozen)


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_nan(v) for v in value)
    return False


cbor_values = st.recursive(
    good_scalars | st.builds(cbor2.CBORTag, st.integers(0, 300), st.integers()),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(good_scalars, c, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60) | cbor_values.map(lambda v: cbor2.dumps(v)))
def test_decode_accepts_or_raises_invalid_message(data: bytes) -> None:
    try:
        message = hbtrio.decode(data)
    except hbtrio.InvalidMessage:
        return
    assert isinstance(message, hbtrio.Message)


# --------------------------------------------------------------- amplification and big numbers


def shared_dag(levels: int) -> bytes:
    """``{"x": v}``, each level ``28([level below, 29(its index)])``: 2**levels paths to ``[]``."""
    # cbor2 numbers shared values as it meets them: the outermost array is 0.
    refs = b"".join(head(6, 29) + head(0, index + 1) for index in reversed(range(levels)))
    arrays = (head(6, 28) + head(4, 2)) * levels + head(6, 28) + head(4, 0)
    return head(5, 1) + head(3, 1) + b"x" + arrays + refs


def string_ref_bomb(size: int, text_length: int = 6000) -> bytes:
    """``256({"x": [s, 25(0), 25(0), ...]})``: about ``size`` bytes, each reference is ``s``."""
    text = head(3, text_length) + b"a" * text_length
    refs = (size - len(text)) // 3  # d8 19 00: tag 25, index 0
    return (
        head(6, 256)
        + head(5, 1)
        + head(3, 1)
        + b"x"
        + head(4, refs + 1)
        + text
        + (head(6, 25) + head(0, 0)) * refs
    )


def test_a_127_byte_shared_reference_dag_is_refused() -> None:
    # Resolved by cbor2 into 2**20 paths to one empty list: 13 s of validation before the fix.
    data = shared_dag(20)
    assert len(data) <= 127
    with pytest.raises(hbtrio.InvalidMessage, match="CBOR tag 28 is not accepted"):
        hbtrio.decode(data)


@pytest.mark.parametrize("size", [306_000, 900_000])
def test_a_string_reference_bomb_is_refused(size: int) -> None:
    # 306 KB used to become a 600 MB message; 900 KB made the node abort when it was encoded.
    data = string_ref_bomb(size)
    assert size - 3 <= len(data) <= size + 16
    with pytest.raises(hbtrio.InvalidMessage, match="CBOR tag 256 is not accepted"):
        hbtrio.decode(data)
    # A reference without its namespace, or the namespace deeper inside: refused the same way.
    with pytest.raises(hbtrio.InvalidMessage, match="CBOR tag 25 is not accepted"):
        hbtrio.decode(data[3:])
    with pytest.raises(hbtrio.InvalidMessage, match="CBOR tag 256 is not accepted"):
        hbtrio.decode(head(5, 1) + head(3, 1) + b"y" + data)


def test_indefinite_length_nesting_is_bounded() -> None:
    for opener in (b"\x9f", b"\xbf\x61x"):  # arrays, maps with key "x"
        data = b"\xbf\x61x" + opener * 200_000 + b"\x00" + b"\xff" * 200_001
        with pytest.raises(hbtrio.InvalidMessage, match="nested deeper than 100 levels"):
            hbtrio.decode(data)


BIG_BODIES: list[tuple[str, str, bytes]] = [
    ("shared-reference DAG", CBOR_TYPE, shared_dag(20)),
    ("string-reference bomb", CBOR_TYPE, string_ref_bomb(306_000)),
    ("bignum value", CBOR_TYPE, bytes.fromhex("a1616ec2490100000000000000ff")),
    ("negative bignum value", CBOR_TYPE, bytes.fromhex("a1616ec3490100000000000000ff")),
    ("bignum key", CBOR_TYPE, bytes.fromhex("a1c2581001") + bytes(15) + b"\x00"),
    # A key of 4,932 digits: printing it in the error message was a 500.
    ("large bignum key", CBOR_TYPE, bytes.fromhex("a1c2590800") + b"\x01" * 2048 + b"\x00"),
    ("int key", CBOR_TYPE, bytes.fromhex("a10100")),
    ("duplicate keys", CBOR_TYPE, bytes.fromhex("a2616e01616e02")),
    ("indefinite nesting", CBOR_TYPE, b"\xa1\x61n" + b"\x9f" * 50_000 + b"\x00"),
    ("a 4,300-digit integer", JSON_TYPE, b'{"n": 1' + b"0" * 4299 + b"}"),
    ("a 5,000-digit integer", JSON_TYPE, b'{"n": 1' + b"0" * 4999 + b"}"),
    ("2**64", JSON_TYPE, b'{"n": 18446744073709551616}'),
    ("-2**64-1", JSON_TYPE, b'{"n": -18446744073709551617}'),
    ("1e400", JSON_TYPE, b'{"n": 1e400}'),
    ("-1e400 in a list", JSON_TYPE, b'{"n": 1, "x": [-1e400]}'),
]


@pytest.mark.parametrize(
    ("media", "body"), [(m, b) for _, m, b in BIG_BODIES], ids=[n for n, _, _ in BIG_BODIES]
)
async def test_big_bodies_are_400_and_the_process_reads_as_before(media: str, body: bytes) -> None:
    async with open_node(max_body=1 << 20, default_wait=5.0) as node:
        c = node.client
        pid = await spawn(c)
        await schedule(c, pid, n=7)
        r = await c.post(f"/{pid}/schedule", content=body, headers={"content-type": media})
        assert_error(r, 400, "invalid-message")
        r = await c.post("/processes", content=body, headers={"content-type": media})
        assert_error(r, 400, "invalid-message")
        assert (await c.get(f"/{pid}/now")).json() == {"at-slot": 1, "count": 7}
        assert not any(status >= 500 for (_, _, status) in node.app.metrics.requests)


async def test_every_tag_in_a_body_is_400() -> None:
    async with open_node(default_wait=5.0) as node:
        c = node.client
        pid = await spawn(c)
        for tag in TAGS:
            for body in (
                head(5, 1) + head(3, 1) + b"n" + head(6, tag) + b"\x01",  # a tagged value
                head(6, tag) + bytes.fromhex("a1616e01"),  # a tagged message
                head(5, 1) + head(6, tag) + head(3, 1) + b"n" + b"\x01",  # a tagged key
            ):
                r = await c.post(
                    f"/{pid}/schedule", content=body, headers={"content-type": CBOR_TYPE}
                )
                error = assert_error(r, 400, "invalid-message")
                assert f"CBOR tag {tag} is not accepted" in error["message"]
        assert (await c.get(f"/{pid}/slot/current")).json()["slot"] == 0


async def test_integers_at_the_ends_of_the_range_never_make_a_read_fail() -> None:
    # Two schedules of 4,300-digit integers used to make every JSON read of the process a 500.
    async with open_node(default_wait=5.0) as node:
        c = node.client
        pid = await spawn(c)
        for _ in range(2):
            r = await c.post(f"/{pid}/schedule", content=b'{"n": 9' + b"9" * 4298 + b"}")
            assert_error(r, 400, "invalid-message")
        await schedule(c, pid, n=2**64 - 1)  # the largest: accepted, and so is the count
        await schedule(c, pid, n=1)  # one more: the count would leave the range
        await schedule(c, pid, n=-(2**64))
        for accept in ("application/json", CBOR_TYPE):
            r = await c.get(f"/{pid}/compute", params={"slot": 1}, headers={"accept": accept})
            assert r.status_code == 200
            body = r.json() if accept == "application/json" else hbtrio.decode(r.content)
            assert body == {"at-slot": 1, "count": 2**64 - 1}
        for _ in range(2):  # the same clear answer every time, never a 500
            for call in (c.get(f"/{pid}/now"), c.get(f"/{pid}/compute", params={"slot": 3})):
                error = assert_error(await call, 422, "compute-error")
                assert error["attempted-slot"] == 2 and error["phase"] == "compute"
                assert error["cause"].startswith("OverflowError: counter@1.0: the count would be")
        assert not any(status >= 500 for (_, _, status) in node.app.metrics.requests)


@pytest.mark.parametrize("count", [2**64 - 1, -(2**64)])
async def test_counter_count_stays_in_the_range(count: int) -> None:
    step = 1 if count > 0 else -1
    async with hbtrio.open_engine() as engine:
        inline = await engine.spawn({**COUNTER, "nonce": "inline"})  # one slot at a time
        batch = await engine.spawn({**COUNTER, "nonce": "batch"})  # compute_batch
        for pid in (inline, batch):
            await engine.schedule_many(pid, [{"n": count}, {"n": 0}, {"n": step}, {"n": 0}])
        assert (await engine.compute(inline, 1))["count"] == count
        assert (await engine.compute(inline, 2))["count"] == count
        for pid in (inline, batch):
            with pytest.raises(hbtrio.ComputeError) as info:
                await engine.compute(pid, 4)
            assert (info.value.attempted_slot, info.value.phase) == (3, "compute")
            assert isinstance(info.value.__cause__, OverflowError)
            assert (await engine.compute(pid, 2))["count"] == count


async def test_huge_integer_arguments_are_invalid_message() -> None:
    # Python will not print an int of more than 4,300 digits: no error message may try to.
    huge = 10**5000
    with pytest.raises(hbtrio.InvalidMessage, match="key a 16610-bit integer is a int"):
        hbtrio.freeze({huge: 1})
    with pytest.raises(hbtrio.InvalidMessage, match="key a 16610-bit integer"):
        hbtrio.message_id({"a": {-huge: 1}})
    async with hbtrio.open_engine() as engine:
        pid = await engine.spawn(COUNTER)
        with pytest.raises(hbtrio.InvalidMessage, match="not a 16610-bit integer"):
            await engine.compute(pid, -huge)
        for call in (engine.compute(huge, 1), engine.schedule(huge, {"n": 1})):
            with pytest.raises(hbtrio.InvalidMessage, match="not a 16610-bit integer"):
                await call
        with pytest.raises(hbtrio.InvalidMessage, match="too large"):
            await engine.compute(pid, huge)


class BigInt:
    """A device whose states hold an integer outside the message range."""

    def __init__(self, nested: bool) -> None:
        self.nested = nested

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"x": 0}

    def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        big = 10**5000 if assignment["slot"] > 1 else 2**64
        return {"x": [big] if self.nested else big}


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "in-a-list"])
async def test_a_device_returning_a_big_int_fails_that_slot(nested: bool) -> None:
    devices = {"big@1.0": BigInt(nested)}
    async with open_node(devices=devices, default_wait=5.0) as node:
        c = node.client
        pid = await spawn(c, "big@1.0")
        for _ in range(2):
            await schedule(c, pid)
        for slot in (1, 2):
            r = await c.get(f"/{pid}/compute", params={"slot": slot})
            error = assert_error(r, 422, "compute-error")
            assert error["attempted-slot"] == 1  # the first slot whose state was refused
            assert "integer is outside the message range" in error["cause"]
        assert (await c.get(f"/{pid}/compute", params={"slot": 0})).json() == {
            "at-slot": 0,
            "x": 0,
        }
        assert not any(status >= 500 for (_, _, status) in node.app.metrics.requests)


async def test_a_stored_state_with_a_huge_int_is_a_clear_422(tmp_path: Path) -> None:
    # What a store written before the integer range existed may hold: a 5,001-digit count.
    path = tmp_path / "old.sqlite"
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:
        pid = await engine.spawn(COUNTER)
        await engine.schedule_many(pid, [{"n": 1}, {"n": 2}])
        huge = _Frozen({"count": 10**5000, "at-slot": 1})
        engine.store.put_state_nowait(pid, 1, huge, True)
    async with open_node(store=hbtrio.SQLiteStore(path), default_wait=5.0) as node:
        c = node.client
        for accept in ("application/json", CBOR_TYPE):
            headers = {"accept": accept}
            r = await c.get(f"/{pid}/compute", params={"slot": 1}, headers=headers)
            error = assert_error(r, 422, "invalid-state")
            assert error["attempted-slot"] == 1
            assert "count: a 16610-bit integer is outside the message range" in error["message"]
            r = await c.get(f"/{pid}/compute", params={"slot": 0}, headers=headers)
            assert r.status_code == 200
        for call in (c.get(f"/{pid}/now"), c.get(f"/{pid}/compute", params={"slot": 2})):
            error = assert_error(await call, 422, "compute-error")  # counting on from it
            assert error["attempted-slot"] == 2
        assert not any(status >= 500 for (_, _, status) in node.app.metrics.requests)


# --------------------------------------------------------------------------- engine calls


async def _fuzz_engine(store: hbtrio.Store, program: list[tuple[Any, ...]]) -> None:
    before = trio.lowlevel.current_statistics().tasks_living
    async with hbtrio.open_engine(store) as engine:
        sentinels = []
        for i in range(2):
            pid = await engine.spawn(
                {"device": "process@1.0", "execution-device": "counter@1.0", "sentinel": i}
            )
            await engine.schedule_many(pid, [{"n": n} for n in range(1, 6)])
            await engine.compute(pid, 2)
            sentinels.append(pid)
        untouched = await snapshot_of(engine, sentinels)
        model = Model()
        victim_definition = {"device": "process@1.0", "execution-device": "counter@1.0"}
        model.add(await engine.spawn(victim_definition), victim_definition)
        for op in program:
            await run_op(engine, model, op)
        assert await snapshot_of(engine, sentinels) == untouched
        stats = engine.stats()
        assert stats.leader_deaths == 0 and stats.waiters == 0
        assert len(engine.executions) == 0
        for pid, bodies in model.bodies.items():  # everything the model knows still holds
            await run_op(engine, model, ("latest_slot", pid))
            await run_op(engine, model, ("compute", pid, len(bodies) - 1))
    assert trio.lowlevel.current_statistics().tasks_living == before


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=st.lists(ops, min_size=3, max_size=30))
async def test_engine_calls_answer_correctly_or_raise_documented_errors(
    program: list[tuple[Any, ...]],
) -> None:
    await _fuzz_engine(hbtrio.MemoryStore(), program)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=st.lists(ops, max_size=15))
async def test_engine_calls_on_sqlite(program: list[tuple[Any, ...]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        await _fuzz_engine(hbtrio.SQLiteStore(f"{tmp}/fuzz.sqlite"), program)


async def test_calls_after_the_engine_closed_raise_engine_closed() -> None:
    async with hbtrio.open_engine() as engine:
        pid = await engine.spawn({"device": "process@1.0", "execution-device": "counter@1.0"})
    for call in (
        partial(engine.spawn, {"device": "process@1.0", "execution-device": "counter@1.0"}),
        partial(engine.schedule, pid, {"n": 1}),
        partial(engine.compute, pid, 0),
        partial(engine.compute, "junk", -1),
        partial(engine.now, pid),
        partial(engine.stop, pid),
        partial(engine.latest_slot, pid),
        partial(engine.resolve, {"device": "counter@1.0"}, {"path": "init"}),
    ):
        with trio.fail_after(CALL_LIMIT):
            try:
                await call()
            except hbtrio.EngineClosed:
                continue
            raise AssertionError(f"{call} did not raise EngineClosed")


# --------------------------------------------------------------------------- HTTP: the ASGI app

TOKEN = "s3cret"
HTTP_STATUSES = {200, 202, 400, 401, 404, 405, 406, 413, 415, 422}
latin1 = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
    max_size=20,
)


@attrs.define
class Req:
    method: str
    path: Any  # a str, or (pid, tail): "/{pid}/{tail}"
    query: bytes = b""
    body: bytes = attrs.field(default=b"", repr=lambda b: repr(b[:60]) + f"...{len(b)}B")
    accept: str | None = None
    content_type: str | None = None
    content_length: str | None = "auto"
    auth: str | None = None
    extra: list[tuple[str, str]] = attrs.field(factory=list)
    splits: list[int] = attrs.field(factory=list)


def as_json(value: Any) -> bytes:
    try:
        return _jsonwire.dumps(hbtrio.freeze(value))
    except (hbtrio.InvalidMessage, UnicodeEncodeError):  # see test_jsonwire_dumps_...
        return repr(value).encode("utf-8", "replace")


def as_cbor(value: Any) -> bytes:
    try:
        return hbtrio.encode(hbtrio.freeze(value))
    except hbtrio.InvalidMessage:
        return b"\xff"


raw_bodies = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(
        [
            b'{"n": NaN}',
            b'{"n": Infinity}',
            b'{"a":1,"a":2}',
            b'{"/x":1}',
            b'{"/bytes":"!!"}',
            b'{"/float":"nan"}',
            b'{"/bytes":"AAE"}',
            b"[1]",
            b'"s"',
            b"{}",
            b"",
            b'{"n":1e999}',
            b'{"s":"\\ud800"}',
            b'{"\\udc00":1}',
            b"[" * 3000 + b"]" * 3000,
            b'{"a":' * 500 + b"1" + b"}" * 500,
            b'{"n": 1' + b"0" * 5000 + b"}",
            b"\xef\xbb\xbf{}",
        ]
    ),
    cbor_values.map(lambda v: cbor2.dumps(v)),
    definitions.map(as_json),
    bodies.map(as_json),
    bodies.map(as_cbor),
)
tails = st.sampled_from(["schedule", "compute", "now", "slot/current", "slot", "compute/", "", "x"])
queries = st.one_of(
    st.lists(
        st.tuples(
            st.sampled_from(["slot", "wait", "x"]) | st.text(max_size=4),
            st.one_of(
                small_slots.map(str),
                st.text(max_size=6),
                st.floats().map(str),
                st.integers().map(str),
                st.sampled_from(["0.001", "1e-300", "5", "nan", "-1", "300", " 1", "01"]),
            ),
        ),
        max_size=3,
    ).map(lambda pairs: urlencode(pairs).encode()),
    st.binary(max_size=20),
)
wild_methods = st.one_of(
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "get"])
    | st.text(alphabet=string.ascii_letters, min_size=1, max_size=7),
)
wild_paths = st.one_of(
    st.tuples(pool_pids, tails),
    st.sampled_from(["/processes", "/workers", "/stats", "/metrics", "/", "", "//", "/stats/"]),
    st.tuples(pids, tails),
    st.text(max_size=30).map("/".__add__),
)
accepts = (
    st.none()
    | st.sampled_from(
        [
            "application/json",
            "application/cbor",
            "*/*",
            "text/html",
            "application/cbor;q=0.5, application/json",
            "application/*;q=0",
            "application/json;q=abc",
        ]
    )
    | latin1
)
content_types = (
    st.none()
    | st.sampled_from(
        ["application/json", "application/cbor", "text/plain", "application/json; charset=x", ""]
    )
    | latin1
)
content_lengths = st.none() | st.just("auto") | st.integers(-5, 10**12).map(str) | latin1
auths = st.none() | st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}", "Bearer x"]) | latin1
extras = st.lists(
    st.tuples(st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=10), latin1),
    max_size=2,
)
wild_requests = st.builds(
    Req,
    method=wild_methods,
    path=wild_paths,
    query=queries,
    body=raw_bodies,
    accept=accepts,
    content_type=content_types,
    content_length=content_lengths,
    auth=auths,
    extra=extras,
    splits=st.lists(st.integers(0, 100), max_size=3),
)


def _mutations(req: Req) -> st.SearchStrategy[Req]:
    """``req`` with one thing made wild."""
    return st.one_of(
        wild_methods.map(lambda v: attrs.evolve(req, method=v)),
        wild_paths.map(lambda v: attrs.evolve(req, path=v)),
        queries.map(lambda v: attrs.evolve(req, query=v)),
        raw_bodies.map(lambda v: attrs.evolve(req, body=v)),
        accepts.map(lambda v: attrs.evolve(req, accept=v)),
        content_types.map(lambda v: attrs.evolve(req, content_type=v)),
        content_lengths.map(lambda v: attrs.evolve(req, content_length=v)),
        auths.map(lambda v: attrs.evolve(req, auth=v)),
        extras.map(lambda v: attrs.evolve(req, extra=v)),
        st.lists(st.integers(0, 100), max_size=3).map(lambda v: attrs.evolve(req, splits=v)),
    )


_ok = {"auth": st.just(f"Bearer {TOKEN}"), "content_type": st.just("application/json")}
plausible_requests = st.one_of(
    st.builds(Req, st.just("POST"), st.just("/processes"), body=definitions.map(as_json), **_ok),
    st.builds(
        Req,
        st.just("POST"),
        st.tuples(pool_pids, st.just("schedule")),
        body=bodies.map(as_json),
        **_ok,
    ),
    st.builds(
        Req,
        st.just("POST"),
        st.tuples(pool_pids, st.just("schedule")),
        body=bodies.map(as_cbor),
        auth=st.just(f"Bearer {TOKEN}"),
        content_type=st.just("application/cbor"),
        accept=st.just("application/cbor"),
    ),
    st.builds(
        Req,
        st.just("GET"),
        st.tuples(pool_pids, st.just("compute")),
        query=small_slots.map(lambda s: f"slot={s}".encode()),
        accept=st.sampled_from([None, "application/cbor"]),
    ),
    st.builds(Req, st.just("GET"), st.tuples(pool_pids, st.sampled_from(["now", "slot/current"]))),
    st.builds(Req, st.just("GET"), st.sampled_from(["/workers", "/stats", "/metrics"])),
)
http_requests = st.one_of(plausible_requests, plausible_requests.flatmap(_mutations), wild_requests)


def _split(body: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(body) + 1) for p in points})
    out, last = [], 0
    for cut in cuts:
        out.append(body[last:cut])
        last = cut
    out.append(body[last:])
    return out


async def call_app(app: Any, req: Req, path: str) -> tuple[int, dict[str, str], bytes]:
    """Call the ASGI app as a server would; the client stays until the answer."""
    headers: list[tuple[bytes, bytes]] = []
    length = str(len(req.body)) if req.content_length == "auto" else req.content_length
    for name, value in (
        ("accept", req.accept),
        ("content-type", req.content_type),
        ("authorization", req.auth),
        ("content-length", length),
        *req.extra,
    ):
        if value is not None:
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogatepass"),
        "query_string": req.query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8734),
    }
    chunks = _split(req.body, req.splits)
    answered = trio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    with trio.fail_after(CALL_LIMIT):
        await app(scope, receive, send)
    assert sent and sent[0]["type"] == "http.response.start", sent
    status = sent[0]["status"]
    head = {k.decode("latin-1"): v.decode("latin-1") for k, v in sent[0]["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, head, body


async def run_request(engine: hbtrio.Engine, app: Any, model: Model, req: Req) -> int:
    if isinstance(req.path, tuple):
        pid = model.pick(req.path[0])
        pid_text = pid if isinstance(pid, str) else str(pid)
        path = f"/{pid_text}/{req.path[1]}"
    else:
        pid, path = None, req.path
    latest_before = {p: len(b) - 1 for p, b in model.bodies.items()}
    status, head, body = await call_app(app, req, path)
    assert status in HTTP_STATUSES, (status, body[:300])
    assert head["content-length"] == str(len(body))
    if status >= 400:
        assert head["content-type"] == "application/json"
        error = json.loads(body)
        assert error["status"] == status and error["error"] and error["message"]
        if status == 422 and isinstance(pid, str) and pid in model.bodies:
            params = dict(parse_qsl(req.query.decode("latin-1")))
            slot = latest_before[pid] if req.path[1] == "now" else int(params["slot"])
            _, problems, failing = model.state(pid, slot)
            assert error["attempted-slot"] == failing, (error, failing)
            code = "slot-not-scheduled" if hbtrio.SlotNotScheduled in problems else "compute-error"
            assert error["error"] == code
        return status
    route = req.path[1] if isinstance(req.path, tuple) else req.path
    if route == "/metrics":
        assert head["content-type"].startswith("text/plain")
        assert b"hbtrio_http_requests_total" in body
        return status
    answer: Any = (
        hbtrio.decode(body) if head["content-type"] == "application/cbor" else json.loads(body)
    )
    if status == 202:
        assert answer["status"] == "computing"
    elif route == "/processes":
        new = answer["process"]
        definition = await engine.store.get_process(new)
        assert definition is not None and hbtrio.message_id(definition) == new
        model.add(new, definition)
    elif route == "schedule":
        assert isinstance(pid, str)
        assert answer == {"process": pid, "slot": latest_before[pid] + 1}
        (assignment,) = await engine.store.get_assignments(pid, answer["slot"], answer["slot"] + 1)
        model.bodies[pid].append(assignment["body"])
    elif route in ("compute", "now"):
        assert isinstance(pid, str) and pid in model.bodies
        slot = answer["at-slot"]
        expected, problems, _ = model.state(pid, slot)
        assert not problems and answer == expected
        if route == "now":
            assert slot == latest_before[pid]
    elif route == "slot/current":
        assert isinstance(pid, str)
        assert answer["slot"] == latest_before[pid]
    return status


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=st.lists(http_requests, min_size=1, max_size=20))
async def test_every_http_endpoint_answers_a_documented_status(program: list[Req]) -> None:
    async with hbtrio.open_engine() as engine:
        app = make_app(engine, token=TOKEN, max_body=4096, default_wait=2.0, max_wait=5.0)
        sentinel = await engine.spawn(
            {"device": "process@1.0", "execution-device": "counter@1.0", "sentinel": 1}
        )
        await engine.schedule_many(sentinel, [{"n": n} for n in range(1, 6)])
        untouched = await snapshot_of(engine, [sentinel])
        model = Model()
        victim = {"device": "process@1.0", "execution-device": "counter@1.0"}
        model.add(await engine.spawn(victim), victim)
        for req in program:
            await run_request(engine, app, model, req)
        assert await snapshot_of(engine, [sentinel]) == untouched
        assert app.metrics.in_flight == 0
        assert engine.stats().waiters == 0 and engine.stats().leader_deaths == 0
        assert not any(status >= 500 for (_, _, status) in app.metrics.requests)


# --------------------------------------------------------------------------- HTTP: a real server


@pytest.mark.parametrize(
    "announces", ["Content-Length: 1000000", "Content-Length: 5", "Transfer-Encoding: chunked"]
)
async def test_a_get_with_a_body_is_refused_before_it_is_read(announces: str) -> None:
    """Regression (issue 15.4): a GET needs no token, and one announcing a body the client
    never sends held its connection for ever. Now: 400 at once, then the node hangs up."""
    async with open_node(read_timeout=60, body_timeout=60) as node:
        pid = await spawn(node.client)
        await schedule(node.client, pid, n=3)
        for target in ("/stats", f"/{pid}/now", f"/{pid}/compute?slot=1", "/metrics"):
            with trio.fail_after(5):  # far below the body timeouts: refused, not timed out
                answer = await raw_exchange(
                    node.url, f"GET {target} HTTP/1.1\r\nHost: x\r\n{announces}\r\n\r\n".encode()
                )
            error = answer.error(400, "unexpected-body")
            assert "takes no body" in error["message"]
            assert answer.headers["connection"] == "close" and answer.closed
        # Content-Length: 0 is no body: answered, on a connection that stays open.
        r = await node.client.get(f"/{pid}/now", headers={"content-length": "0"})
        assert r.json() == {"at-slot": 1, "count": 3}


async def test_protocol_errors_from_the_http_layer_have_json_bodies() -> None:
    """Regression (issue 15.7): hypercorn answered what h11 cannot parse with an empty 400;
    the node's answers to protocol errors carry its JSON error body."""
    async with open_node() as node:
        head = "GET /stats HTTP/1.1\r\nHost: x\r\n"
        for data, status, code in [
            (b"garbage\r\n\r\n", 400, "bad-request"),
            (b"GET /stats HTTP/1.1\r\nBad Header\r\n\r\n", 400, "bad-request"),
            (f"{head}Content-Length: -1\r\n\r\n".encode(), 400, "bad-request"),
            (f"{head}Transfer-Encoding: gzip\r\n\r\n".encode(), 501, "not-implemented"),
            (f"{head}X: {'y' * 20000}".encode(), 431, "headers-too-large"),  # never ends
        ]:
            with trio.fail_after(5):
                answer = await raw_exchange(node.url, data)
            error = answer.error(status, code)
            assert error["message"].startswith(("malformed HTTP request", "the request's head"))
            assert answer.headers["connection"] == "close" and answer.closed
        assert (await node.client.get("/stats")).status_code == 200


raw_requests = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.builds(
        lambda method, target, version, headers, body: (
            f"{method} {target} {version}\r\n".encode("latin-1", "replace")
            + b"".join(h + b"\r\n" for h in headers)
            + b"\r\n"
            + body
        ),
        st.sampled_from(["GET", "POST", "BREW", "", "G ET"]),
        st.sampled_from(["/stats", "/processes", "*", "http://x/stats", "/%zz", "/" + "a" * 9000])
        | st.text(max_size=20),
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9", ""]),
        st.lists(
            st.sampled_from(
                [
                    b"Host: x",
                    b"Content-Length: 5",
                    b"Content-Length: -1",
                    b"Content-Length: 99999999999999999999",
                    b"Transfer-Encoding: chunked",
                    b"Content-Type: application/json",
                    b"Expect: 100-continue",
                    b"X: " + b"y" * 70000,
                    b"Bad Header",
                    b": empty",
                ]
            ),
            max_size=4,
        ),
        st.sampled_from([b"", b"hello", b'{"n":1}', b"0\r\n\r\n", b"5\r\nabc\r\n"]),
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(raw_requests, min_size=1, max_size=5))
@example(data=[b"GET /stats HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"])
@example(data=[b"\x00", b"! ! HTTP/0.0\nContent-Length:1\n\n\x00\x00"])
async def test_a_real_server_survives_raw_garbage(data: list[bytes]) -> None:
    async with hbtrio.open_engine() as engine:
        pid = await engine.spawn({"device": "process@1.0", "execution-device": "counter@1.0"})
        await engine.schedule(pid, {"n": 7})
        stop = trio.Event()
        app = make_app(engine, default_wait=1.0)
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                partial(run_server, app, port=0, grace=1.0, shutdown_trigger=stop.wait)
            )
            host, port = urls[0].removeprefix("http://").rsplit(":", 1)
            for raw in data:
                stream = await trio.open_tcp_stream(host, int(port))
                try:
                    await stream.send_all(raw)
                    await stream.send_eof()  # the client is done: the server answers or hangs up
                    answer = b""
                    # hypercorn answers or hangs up at once, except on a connection that
                    # sent nothing it could parse, which it closes after its keep-alive
                    # timeout (5 s): bounded here either way.
                    with trio.move_on_after(CALL_LIMIT):
                        while chunk := await stream.receive_some():
                            answer += chunk
                    first = parse_answer(answer)
                    if first.status is not None:
                        # 501: a transfer coding the server does not implement (RFC 9112 6.1);
                        # 505: an HTTP version it does not speak. Both are the protocol's.
                        status = first.status
                        assert status < 500 or status in (501, 505), answer
                        complete = str(len(first.body)) == first.headers.get("content-length")
                        if status >= 400 and complete:  # the node's JSON body, whoever refused
                            # (Incomplete: bytes after an HTTP/1.0 request made hypercorn close
                            # the connection at once, cutting the answer short.)
                            assert first.headers["content-type"] == "application/json", answer
                            error = json.loads(first.body)
                            assert error["status"] == status and error["message"], answer
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the server hung up on garbage: fine
                finally:
                    await stream.aclose()
            # The node still works and nothing changed.
            async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
                answer = await client.get(f"/{pid}/now")
                assert answer.status_code == 200 and answer.json() == {"at-slot": 1, "count": 7}
            assert not any(s >= 500 for (_, _, s) in app.metrics.requests)
            stop.set()
