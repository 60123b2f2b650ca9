"""Blobs: byte strings named by their SHA-256, in every store and through the engine.

The store operations (`put_blob`, `get_blob`) for each kind of store, what
survives a restart, what a damaged SQLite row and an injected fault do; then
the engine's `put_blob` / `get_blob`: IDs, errors, checkpoints, threads and
cancellation. HTTP and the command line are in ``test_http.py`` and
``test_cli.py``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

import hbtrio
import hbtrio._engine
from hbtrio import BlobNotFound, InvalidMessage, MemoryStore, SQLiteStore, Store, StoreError
from hbtrio.testing import (
    READ_METHODS,
    WRITE_METHODS,
    FaultyStore,
    open_test_engine,
    run_with_cancel_at_each_checkpoint,
)
from helpers import COUNTER

if TYPE_CHECKING:
    from conftest import StoreFactory


def sha(data: bytes) -> str:
    """The blob ID of ``data``, computed here from the definition."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


MODULE = b"\x00asm\x01\x00\x00\x00" + bytes(range(256)) * 4
UNKNOWN = sha(b"never stored")


# --------------------------------------------------------------------------- stores


async def test_a_store_keeps_blobs_and_says_none_for_others(store: Store) -> None:
    blob_id = sha(MODULE)
    assert await store.get_blob(blob_id) is None
    await store.put_blob(blob_id, MODULE)
    assert await store.get_blob(blob_id) == MODULE
    await store.put_blob(blob_id, MODULE)  # again: idempotent
    assert await store.get_blob(blob_id) == MODULE
    await store.put_blob(sha(b""), b"")
    assert await store.get_blob(sha(b"")) == b""
    assert await store.get_blob(UNKNOWN) is None


async def test_blobs_outlive_the_store_object(store_factory: StoreFactory) -> None:
    store = await store_factory.open()
    await store.put_blob(sha(MODULE), MODULE)
    store = await store_factory.reopen(store)
    assert await store.get_blob(sha(MODULE)) == MODULE


class NoBlobs(Store):
    """A store written before blobs existed: the eight operations only."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    async def put_process(self, pid: str, definition: Any, assignment: Any) -> bool:
        return await self.inner.put_process(pid, definition, assignment)

    async def get_process(self, pid: str) -> Any:
        return await self.inner.get_process(pid)

    async def append_assignments(self, pid: str, assignments: Any) -> None:
        await self.inner.append_assignments(pid, assignments)

    async def latest_slot(self, pid: str) -> int:
        return await self.inner.latest_slot(pid)

    async def get_assignments(self, pid: str, start: int, stop: int) -> Any:
        return await self.inner.get_assignments(pid, start, stop)

    def put_results_nowait(self, pid: str, results: Any) -> None:
        self.inner.put_results_nowait(pid, results)

    async def get_result(self, pid: str, slot: int) -> Any:
        return await self.inner.get_result(pid, slot)

    async def latest_snapshot(self, pid: str, at_most: int, *, read_to: int = 0) -> Any:
        return await self.inner.latest_snapshot(pid, at_most, read_to=read_to)


async def test_a_store_without_blobs_still_runs_processes_and_refuses_blobs_plainly() -> None:
    async with open_test_engine(NoBlobs()) as engine:
        pid = await engine.spawn(COUNTER)
        await engine.schedule(pid, {"n": 2})
        assert (await engine.now(pid))["count"] == 2
        with pytest.raises(StoreError, match=r"^NoBlobs keeps no blobs$"):
            await engine.put_blob(MODULE)
        with pytest.raises(StoreError, match=r"^NoBlobs keeps no blobs$"):
            await engine.get_blob(UNKNOWN)
        assert engine.statistics().blobs_stored == 0


# --------------------------------------------------------------------------- SQLite


async def test_sqlite_blobs_survive_engine_restarts(sqlite_factory: StoreFactory) -> None:
    async with open_test_engine(sqlite_factory.new()) as engine:
        image = await engine.put_blob(MODULE)
        pid = await engine.spawn({**COUNTER, "image": image})
    async with open_test_engine(sqlite_factory.new()) as engine:
        definition = await engine.store.get_process(pid)
        assert definition is not None
        assert await engine.get_blob(definition["image"]) == MODULE
        assert await engine.put_blob(MODULE) == image  # stored already: the same ID
    with sqlite3.connect(sqlite_factory.path) as conn:
        assert conn.execute("SELECT id, data FROM blobs").fetchall() == [(image, MODULE)]


async def test_sqlite_blobs_are_not_kept_in_memory(sqlite_factory: StoreFactory) -> None:
    """Every read goes to the file: a few large blobs would otherwise fill the caches."""
    store = await sqlite_factory.open()
    await store.put_blob(sha(MODULE), MODULE)
    reads = store.statistics().reads
    for _ in range(3):
        assert await store.get_blob(sha(MODULE)) == MODULE
    assert store.statistics().reads == reads + 3


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "text"])
async def test_sqlite_refuses_a_damaged_blob_row(sqlite_factory: StoreFactory, damage: str) -> None:
    """SQLite keeps no checksums: a blob row whose bytes do not hash to its ID is refused."""
    store = await sqlite_factory.open()
    blob_id = sha(MODULE)
    await store.put_blob(blob_id, MODULE)
    await store.close()
    damaged: object = {
        "flipped-byte": MODULE[:5] + b"\xff" + MODULE[6:],
        "truncated": MODULE[:-1],
        "text": "not bytes at all",
    }[damage]
    with sqlite3.connect(sqlite_factory.path) as conn:
        conn.execute("UPDATE blobs SET data = ? WHERE id = ?", (damaged, blob_id))
    async with open_test_engine(sqlite_factory.new()) as engine:
        with pytest.raises(StoreError) as info:
            await engine.get_blob(blob_id)
        message = str(info.value)
        assert "\n" not in message
        assert f"blob {blob_id} does not match its ID (the store file is damaged)" in message
        assert sqlite_factory.path.name in message
        # Storing the blob again does not mend the row (an ID is stored once) ...
        assert await engine.put_blob(MODULE) == blob_id
        with pytest.raises(StoreError):
            await engine.get_blob(blob_id)
        # ... and other blobs are unaffected.
        assert await engine.get_blob(await engine.put_blob(b"sound")) == b"sound"


async def test_sqlite_a_version_1_file_gets_the_blobs_table(sqlite_factory: StoreFactory) -> None:
    async with open_test_engine(sqlite_factory.new()) as engine:
        pid = await engine.spawn(COUNTER)
        await engine.schedule(pid, {"n": 4})
    with sqlite3.connect(sqlite_factory.path) as conn:  # what hbtrio wrote before blobs
        conn.execute("DROP TABLE blobs")
        conn.execute("PRAGMA user_version = 1")
    async with open_test_engine(sqlite_factory.new()) as engine:
        assert (await engine.now(pid))["count"] == 4
        assert await engine.get_blob(await engine.put_blob(MODULE)) == MODULE
    with sqlite3.connect(sqlite_factory.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)


# --------------------------------------------------------------------------- FaultyStore


def test_blob_calls_are_fault_targets() -> None:
    assert "put_blob" in WRITE_METHODS
    assert "get_blob" in READ_METHODS


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_failed_put_blob_acknowledges_nothing(kind: str, tmp_path: Any) -> None:
    inner = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "s.sqlite")
    store = FaultyStore(inner)
    async with open_test_engine(store) as engine:
        full = store.disk_full(methods="put_blob", times=1)
        with full, pytest.raises(StoreError, match="database or disk is full"):
            await engine.put_blob(MODULE)
        assert engine.statistics().blobs_stored == 0
        with pytest.raises(BlobNotFound):
            await engine.get_blob(sha(MODULE))
        assert await engine.put_blob(MODULE) == sha(MODULE)  # the fault is gone
        assert engine.statistics().blobs_stored == 1
        with store.fail(methods="get_blob", times=1), pytest.raises(StoreError):
            await engine.get_blob(sha(MODULE))
        assert await engine.get_blob(sha(MODULE)) == MODULE
        assert store.calls["put_blob"] == 2 and store.calls["get_blob"] == 3


async def test_a_process_fault_does_not_hit_blobs() -> None:
    store = FaultyStore(MemoryStore())
    async with open_test_engine(store) as engine:
        pid = await engine.spawn(COUNTER)
        with store.fail(pid=pid):
            assert await engine.get_blob(await engine.put_blob(MODULE)) == MODULE
            with pytest.raises(StoreError):
                await engine.schedule(pid, {"n": 1})


async def test_a_slow_store_holds_put_blob_and_a_timeout_leaves_it_consistent() -> None:
    store = FaultyStore(MemoryStore())
    async with open_test_engine(store) as engine:
        with store.hang(methods="put_blob"), trio.move_on_after(1) as scope:
            await engine.put_blob(MODULE)
        assert scope.cancelled_caught
        with pytest.raises(BlobNotFound):
            await engine.get_blob(sha(MODULE))


# --------------------------------------------------------------------------- the engine


async def test_put_blob_names_the_bytes_by_their_sha256() -> None:
    async with open_test_engine() as engine:
        for data in (MODULE, b"", b"x"):
            blob_id = await engine.put_blob(data)
            assert blob_id == sha(data) and len(blob_id) == 43
            assert await engine.get_blob(blob_id) == data
        # The same bytes in another container are the same blob.
        assert await engine.put_blob(bytearray(MODULE)) == sha(MODULE)
        assert await engine.put_blob(memoryview(MODULE)[:10]) == sha(MODULE[:10])
        assert type(await engine.get_blob(sha(MODULE[:10]))) is bytes
        assert engine.statistics().blobs_stored == 5


async def test_blob_errors() -> None:
    async with open_test_engine() as engine:
        with pytest.raises(BlobNotFound) as info:
            await engine.get_blob(UNKNOWN)
        assert info.value.blob_id == UNKNOWN
        assert str(info.value) == f"no blob with ID {UNKNOWN!r}"
        assert isinstance(info.value, LookupError)
        for bad in ("short", UNKNOWN + "x", "!" * 43, 42, None, UNKNOWN.encode()):
            with pytest.raises(InvalidMessage, match="blob ID must be 43 base64url characters"):
                await engine.get_blob(bad)  # type: ignore[arg-type]
        for data, name in (("text", "str"), (42, "int"), (None, "NoneType"), ([1], "list")):
            with pytest.raises(InvalidMessage, match=f"^blob data must be bytes, not {name}$"):
                await engine.put_blob(data)  # type: ignore[arg-type]
        assert engine.statistics().blobs_stored == 0
    with pytest.raises(hbtrio.EngineClosed):
        await engine.put_blob(MODULE)
    with pytest.raises(hbtrio.EngineClosed):
        await engine.get_blob(UNKNOWN)


async def test_blob_calls_checkpoint() -> None:
    async with open_test_engine() as engine:
        with trio.testing.assert_checkpoints():
            blob_id = await engine.put_blob(MODULE)
        with trio.testing.assert_checkpoints():
            await engine.get_blob(blob_id)


async def test_large_blobs_are_hashed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    hashed_in: dict[int, str] = {}
    real = hbtrio._engine.id_of_bytes

    def spy(data: bytes) -> str:
        hashed_in[len(data)] = threading.current_thread().name
        return real(data)

    monkeypatch.setattr(hbtrio._engine, "id_of_bytes", spy)
    small, large = b"s" * (hbtrio._engine.HASH_IN_THREAD - 1), b"l" * hbtrio._engine.HASH_IN_THREAD
    loop = threading.current_thread().name
    async with open_test_engine() as engine:
        assert await engine.put_blob(small) == sha(small)
        assert await engine.put_blob(large) == sha(large)
    assert hashed_in[len(small)] == loop
    assert hashed_in[len(large)] != loop


@pytest.mark.parametrize(
    "size", [100, hbtrio._engine.HASH_IN_THREAD], ids=["hashed-inline", "hashed-in-a-thread"]
)
async def test_a_cancelled_put_blob_stored_it_or_not(
    sqlite_factory: StoreFactory, size: int
) -> None:
    """Cancelled at each of its checkpoints in turn, ``put_blob`` leaves either the whole blob
    or nothing, and storing it again always works."""
    attempts = itertools.count()
    data = b""

    async with open_test_engine(sqlite_factory.new()) as engine:

        async def fresh() -> Callable[[], Awaitable[str]]:
            nonlocal data
            data = next(attempts).to_bytes(4, "big") * (size // 4)  # a new blob each time
            return partial(engine.put_blob, data)

        async def check(completed: bool, result: str | None) -> None:
            blob_id = sha(data)
            try:
                stored = await engine.get_blob(blob_id)
            except BlobNotFound:
                assert not completed
            else:
                assert stored == data
            if completed:
                assert result == blob_id
            assert await engine.put_blob(data) == blob_id
            assert await engine.get_blob(blob_id) == data

        assert await run_with_cancel_at_each_checkpoint(fresh, check) >= 2
