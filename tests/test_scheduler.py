"""The scheduler: consecutive slots under concurrency, a verifiable hash chain, durability."""

from __future__ import annotations

import base64
import hashlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hbtrio import (
    InvalidMessage,
    MemoryStore,
    Message,
    ProcessNotFound,
    Scheduler,
    SQLiteStore,
    Store,
    freeze,
    message_id,
    open_engine,
    verify_schedule,
)

if TYPE_CHECKING:
    from conftest import StoreFactory

DEFINITION = {"device": "process@1.0", "execution-device": "counter@1.0"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw(mid: str) -> bytes:
    return base64.urlsafe_b64decode(mid + "=")


async def schedule_one(scheduler: Scheduler, pid: str, message: Any) -> int:
    (slot,) = await scheduler.schedule(pid, [message])
    return slot


async def spawned(store: Store, **extra: Any) -> tuple[Scheduler, str]:
    scheduler = Scheduler(store)
    pid, created = await scheduler.spawn(freeze({**DEFINITION, **extra}))
    assert created
    return scheduler, pid


async def test_spawn_is_slot_zero_and_idempotent(store: Store) -> None:
    scheduler = Scheduler(store)
    definition = {**DEFINITION, "name": "x"}
    pid, created = await scheduler.spawn(definition)  # type: ignore[arg-type]
    assert created
    assert pid == message_id(definition)
    assert await scheduler.spawn(freeze(definition)) == (pid, False)
    assert await Scheduler(store).spawn(freeze(definition)) == (pid, False)
    assert await scheduler.latest(pid) == 0
    (first,) = await store.get_assignments(pid, 0, 1)
    assert first["slot"] == 0
    assert first["body"] == definition
    assert first["message-id"] == pid
    assert first["hash-chain"] == b64(hashlib.sha256(raw(pid)).digest())
    # The stored definition is the caller's no longer: changing the dict changes nothing.
    definition["name"] = "changed"
    assert (await store.get_process(pid))["name"] == "x"  # type: ignore[index]


async def test_slots_are_consecutive(store: Store) -> None:
    scheduler, pid = await spawned(store)
    assert [await schedule_one(scheduler, pid, {"n": i}) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    assert await scheduler.schedule(pid, [{"n": 6}, {"n": 7}]) == [6, 7]
    assert await scheduler.schedule(pid, []) == []
    assert await scheduler.latest(pid) == 7
    assignments = await store.get_assignments(pid, 0, 100)
    assert [a["slot"] for a in assignments] == list(range(8))
    assert [a["body"]["n"] for a in assignments[1:]] == list(range(1, 8))
    verify_schedule(pid, assignments)


async def test_assignment_fields(store: Store) -> None:
    scheduler, pid = await spawned(store)
    body = {"n": 3, "note": ["a", {"b": b"c"}]}
    slot = await schedule_one(scheduler, pid, body)
    (zero, one) = await store.get_assignments(pid, 0, 2)
    assert one["process"] == pid
    assert one["slot"] == slot == 1
    assert one["body"] == body
    assert one["message-id"] == message_id(body)
    assert type(one["timestamp"]) is int
    chain = hashlib.sha256(raw(zero["hash-chain"]) + raw(message_id(body))).digest()
    assert one["hash-chain"] == b64(chain)


async def test_unknown_process(store: Store) -> None:
    scheduler = Scheduler(store)
    pid = message_id({"never": "spawned"})
    with pytest.raises(ProcessNotFound) as info:
        await scheduler.schedule(pid, [{"n": 1}])
    assert info.value.pid == pid
    with pytest.raises(ProcessNotFound):
        await scheduler.latest(pid)
    assert await store.latest_slot(pid) == -1


@pytest.mark.parametrize("bad_at", [0, 1, 2])
async def test_invalid_message_assigns_nothing(store: Store, bad_at: int) -> None:
    scheduler, pid = await spawned(store)
    await schedule_one(scheduler, pid, {"n": 1})
    batch: list[Any] = [{"n": 2}, {"n": 3}, {"n": 4}]
    batch[bad_at] = {"n": {"bad": {1, 2}}}
    with pytest.raises(InvalidMessage, match=rf"message {bad_at}: n\.bad"):
        await scheduler.schedule(pid, batch)
    with pytest.raises(InvalidMessage):
        await scheduler.schedule(pid, ["not a mapping"])
    assert await scheduler.latest(pid) == 1
    assert await store.latest_slot(pid) == 1
    # No gap and no damage: the next message takes the next slot, and the chain holds.
    assert await schedule_one(scheduler, pid, {"n": 2}) == 2
    verify_schedule(pid, await store.get_assignments(pid, 0, 10))


async def test_processes_have_their_own_slots(store: Store) -> None:
    scheduler = Scheduler(store)
    a, _ = await scheduler.spawn(freeze({**DEFINITION, "name": "a"}))
    b, _ = await scheduler.spawn(freeze({**DEFINITION, "name": "b"}))
    assert await schedule_one(scheduler, a, {"n": 1}) == 1
    assert await schedule_one(scheduler, a, {"n": 1}) == 2
    assert await schedule_one(scheduler, b, {"n": 1}) == 1
    verify_schedule(a, await store.get_assignments(a, 0, 10))
    verify_schedule(b, await store.get_assignments(b, 0, 10))


# -- concurrency ------------------------------------------------------------------------------


async def run_concurrent_schedules(store: Store, delays: list[int], batch_sizes: list[int]) -> None:
    """Many tasks schedule on one process at once; every message gets its own slot, in a row."""
    scheduler, pid = await spawned(store)
    got: dict[int, Message] = {}

    async def client(i: int, delay: int, size: int) -> None:
        for _ in range(delay):
            await trio.lowlevel.checkpoint()
        messages = [{"client": i, "k": k} for k in range(size)]
        slots = await scheduler.schedule(pid, messages)
        assert slots == list(range(slots[0], slots[0] + size)) if size else slots == []
        for slot, message in zip(slots, messages, strict=True):
            assert slot not in got
            got[slot] = freeze(message)

    async with trio.open_nursery() as nursery:
        for i, (delay, size) in enumerate(zip(delays, batch_sizes, strict=True)):
            nursery.start_soon(client, i, delay, size)

    total = sum(batch_sizes)
    assert sorted(got) == list(range(1, total + 1))
    assignments = await store.get_assignments(pid, 0, total + 10)
    assert len(assignments) == total + 1
    assert {a["slot"]: a["body"] for a in assignments[1:]} == got
    verify_schedule(pid, assignments)
    assert await scheduler.latest(pid) == total


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    plan=st.lists(
        st.tuples(st.integers(min_value=0, max_value=5), st.integers(min_value=0, max_value=3)),
        min_size=2,
        max_size=16,
    ),
    use_sqlite=st.booleans(),
)
async def test_concurrent_schedules_get_distinct_consecutive_slots(
    plan: list[tuple[int, int]], use_sqlite: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    store: Store
    if use_sqlite:
        store = SQLiteStore(tmp_path_factory.mktemp("sched") / "s.sqlite")
    else:
        store = MemoryStore()
    await store.open()
    try:
        await run_concurrent_schedules(store, [d for d, _ in plan], [n for _, n in plan])
    finally:
        await store.close()


@pytest.mark.parametrize("seed", range(5))
async def test_many_concurrent_single_schedules(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    await run_concurrent_schedules(store, [rng.randrange(8) for _ in range(40)], [1] * 40)


async def test_a_cancelled_schedule_assigned_nothing_or_returned(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory.open()
    scheduler, pid = await spawned(store)
    told: dict[int, Message] = {}
    rng = random.Random(7)
    for i in range(40):
        message = freeze({"i": i})
        before = await scheduler.latest(pid)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def attempt(message: Message = message) -> None:
                    (slot,) = await scheduler.schedule(pid, [message])
                    told[slot] = message

                nursery.start_soon(attempt)
                for _ in range(rng.randrange(4)):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
        after = await scheduler.latest(pid)
        assert after in (before, before + 1)
        assert (after == before + 1) == (before + 1 in told)
    assignments = await store.get_assignments(pid, 0, 1000)
    assert {a["slot"]: a["body"] for a in assignments[1:]} == told
    verify_schedule(pid, assignments)
    # A scheduler reading the store afresh continues the same chain.
    store = await store_factory.reopen(store)
    again = Scheduler(store)
    assert await again.latest(pid) == len(told)
    await again.schedule(pid, [{"after": "reopen"}])
    verify_schedule(pid, await store.get_assignments(pid, 0, 1000))


# -- the hash chain ---------------------------------------------------------------------------


async def _schedule_of(n: int) -> tuple[str, list[Message]]:
    store = MemoryStore()
    scheduler, pid = await spawned(store)
    await scheduler.schedule(pid, [{"n": i} for i in range(1, n + 1)])
    return pid, await store.get_assignments(pid, 0, n + 1)


def _replace(assignment: Message, **changes: Any) -> Message:
    return freeze({**assignment, **changes})


async def test_verify_schedule_accepts_an_untouched_schedule() -> None:
    pid, assignments = await _schedule_of(5)
    verify_schedule(pid, assignments)
    verify_schedule(pid, assignments[:3])  # any prefix from slot 0 verifies


@attrs.frozen
class Tamper:
    name: str
    expect: str

    def apply(self, pid: str, a: list[Message]) -> list[Message]:
        out = list(a)
        if self.name == "changed body":
            out[2] = _replace(out[2], body={"n": 99})
        elif self.name == "changed body with matching message-id":
            out[2] = _replace(out[2], body={"n": 99}, **{"message-id": message_id({"n": 99})})
        elif self.name == "swapped order":
            out[2], out[3] = out[3], out[2]
        elif self.name == "swapped bodies, slots renumbered":
            out[2], out[3] = _replace(out[3], slot=2), _replace(out[2], slot=3)
        elif self.name == "dropped slot":
            del out[2]
        elif self.name == "dropped slot, renumbered":
            out = out[:2] + [_replace(x, slot=x["slot"] - 1) for x in out[3:]]
        elif self.name == "other process":
            out[1] = _replace(out[1], process=message_id({"other": 1}))
        elif self.name == "changed definition":
            out[0] = _replace(out[0], body={**out[0]["body"], "extra": 1})
        elif self.name == "forged chain":
            out[4] = _replace(out[4], **{"hash-chain": b64(b"\x00" * 32)})
        return out


TAMPERS = [
    Tamper("changed body", "slot 2: message-id"),
    Tamper("changed body with matching message-id", "slot 2: hash-chain"),
    Tamper("swapped order", "slot 2: assignment is for"),
    Tamper("swapped bodies, slots renumbered", "slot 2: hash-chain"),
    Tamper("dropped slot", "slot 2: assignment is for"),
    Tamper("dropped slot, renumbered", "slot 2: hash-chain"),
    Tamper("other process", "slot 1: assignment is for"),
    Tamper("changed definition", "slot 0: message-id"),
    Tamper("forged chain", "slot 4: hash-chain"),
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.name for t in TAMPERS])
async def test_verify_schedule_detects_tampering(tamper: Tamper) -> None:
    pid, assignments = await _schedule_of(5)
    with pytest.raises(InvalidMessage, match=tamper.expect):
        verify_schedule(pid, tamper.apply(pid, assignments))


# -- durability -------------------------------------------------------------------------------


async def test_schedule_survives_reopening_sqlite(sqlite_factory: StoreFactory) -> None:
    store = await sqlite_factory.open()
    scheduler, pid = await spawned(store)
    await scheduler.schedule(pid, [{"n": i} for i in range(1, 6)])
    tail = (await store.get_assignments(pid, 5, 6))[0]["hash-chain"]
    store = await sqlite_factory.reopen(store)

    fresh = Scheduler(store)  # knows nothing: it must reload the tail from the file
    assert await fresh.latest(pid) == 5
    assert await fresh.spawn(freeze(DEFINITION)) == (pid, False)
    assert await schedule_one(fresh, pid, {"n": 6}) == 6
    assignments = await store.get_assignments(pid, 0, 100)
    assert [a["slot"] for a in assignments] == list(range(7))
    verify_schedule(pid, assignments)
    expected = hashlib.sha256(raw(tail) + raw(message_id({"n": 6}))).digest()
    assert assignments[6]["hash-chain"] == b64(expected)

    # And once more, through a third store object on the same file.
    store = await sqlite_factory.reopen(store)
    assert await Scheduler(store).schedule(pid, [{"n": 7}, {"n": 8}]) == [7, 8]
    verify_schedule(pid, await store.get_assignments(pid, 0, 100))


async def test_concurrent_first_use_after_reopen(sqlite_factory: StoreFactory) -> None:
    """Many tasks hit a scheduler that has not loaded the process yet."""
    store = await sqlite_factory.open()
    scheduler, pid = await spawned(store)
    await scheduler.schedule(pid, [{"n": 1}])
    store = await sqlite_factory.reopen(store)
    fresh = Scheduler(store)
    slots: list[int] = []

    async def one(i: int) -> None:
        slots.append(await schedule_one(fresh, pid, {"i": i}))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert sorted(slots) == list(range(2, 22))
    verify_schedule(pid, await store.get_assignments(pid, 0, 100))


def test_tmp_path_is_a_path(tmp_path: Path) -> None:
    # SQLiteStore takes os.PathLike as well as str.
    assert SQLiteStore(tmp_path / "a.sqlite").path == str(tmp_path / "a.sqlite")
    assert SQLiteStore(str(tmp_path / "a.sqlite")).path == str(tmp_path / "a.sqlite")


async def test_large_messages_get_the_same_ids_computed_off_the_loop(store: Store) -> None:
    """Large definitions and messages are hashed in a thread, in pieces: same IDs, same chain."""
    import threading

    from hbtrio import _message

    threads: set[bool] = set()
    original = _message.encode_in_pieces

    def spy(value: Any, piece: int = 256) -> bytes:
        threads.add(threading.current_thread() is threading.main_thread())
        return original(value, piece)

    big_definition = {**DEFINITION, "blob": [{"k": i, "v": str(i)} for i in range(2000)]}
    big_body = {"n": 1, "items": [{"k": i} for i in range(5000)]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_message, "encode_in_pieces", spy)
        async with open_engine(store) as engine:
            pid = await engine.spawn(big_definition)
            assert pid == message_id(big_definition)
            assert await engine.schedule_many(pid, [{"n": 2}, big_body, {"n": 3}]) == [1, 2, 3]
            assignments = await store.get_assignments(pid, 0, 4)
            assert [a["message-id"] for a in assignments[1:]] == [
                message_id(m) for m in ({"n": 2}, big_body, {"n": 3})
            ]
            verify_schedule(pid, assignments)
            assert (await engine.now(pid))["count"] == 6
    assert threads == {False}
