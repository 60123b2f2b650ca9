"""One engine per store (issue 10.1): a store in use is refused at open, and freed by any exit.

A second engine on an SQLite file that another engine holds (in this process
or another) raises `StoreError` naming the file and the holder; one store
object serves one engine at a time, whatever its kind. A holder that dies,
even by SIGKILL, frees the file at once. Bad paths are refused before
anything is created on disk.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import trio

import hbtrio
from helpers import COUNTER, reap

_HOLDER = """
import sys, trio, hbtrio

async def main():
    async with hbtrio.open_engine(hbtrio.SQLiteStore(sys.argv[1])) as engine:
        await engine.spawn({"device": "process@1.0", "execution-device": "counter@1.0"})
        print("holding", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_a_second_store_on_a_file_in_use_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.sqlite"
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:
        pid = await engine.spawn(COUNTER)
        for attempt in range(2):  # refusing changes nothing: the second attempt is refused too
            with pytest.raises(hbtrio.StoreError) as info:
                async with hbtrio.open_engine(hbtrio.SQLiteStore(path)):
                    raise AssertionError("opened a file in use")  # pragma: no cover
            message = str(info.value)
            assert str(path) in message and "in use" in message, (attempt, message)
            assert "this process" in message and "\n" not in message
        # The holder is unharmed by the refusals: it still reads and writes its file.
        assert await engine.schedule(pid, {"n": 4}) == 1
        assert (await engine.compute(pid, 1))["count"] == 4
    # Released on exit: the file opens again, with what the first engine stored.
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:
        assert (await engine.now(pid))["count"] == 4


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_one_store_object_serves_one_engine_at_a_time(kind: str, tmp_path: Path) -> None:
    store = hbtrio.MemoryStore() if kind == "memory" else hbtrio.SQLiteStore(tmp_path / "s.db")
    async with hbtrio.open_engine(store):
        with pytest.raises(hbtrio.StoreError, match="in use by another engine"):
            async with hbtrio.open_engine(store):
                raise AssertionError("two engines on one store")  # pragma: no cover
    async with hbtrio.open_engine(store) as engine:  # free again once the first one left
        await engine.spawn(COUNTER)


async def test_a_file_held_by_another_process_is_refused_and_freed_by_sigkill(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shared.sqlite"
    holder = await trio.lowlevel.open_process([sys.executable, "-c", _HOLDER, str(path)], stdout=-1)
    try:
        assert holder.stdout is not None
        assert b"holding" in await holder.stdout.receive_some(100)
        with pytest.raises(hbtrio.StoreError) as info:
            async with hbtrio.open_engine(hbtrio.SQLiteStore(path)):
                raise AssertionError("opened a file in use")  # pragma: no cover
        assert f"{path} is in use by another engine (pid {holder.pid})" in str(info.value)
        holder.kill()  # SIGKILL: no chance to clean up
        await holder.wait()
        async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:  # at once
            assert await engine.latest_slot(hbtrio.message_id(COUNTER)) == 0
    finally:
        await reap(holder)


async def test_a_cancelled_close_still_frees_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    store = hbtrio.SQLiteStore(path)
    await store.open()
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.close()  # cancelled: what is pending may not be written, but it stops
    async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:
        await engine.spawn(COUNTER)


@pytest.mark.parametrize("case", ["no-directory", "a-directory", "not-a-database"])
async def test_bad_paths_are_refused_in_one_line_before_anything_is_created(
    case: str, tmp_path: Path
) -> None:
    if case == "no-directory":
        path, expected = tmp_path / "missing" / "x.sqlite", "does not exist"
    elif case == "a-directory":
        path, expected = tmp_path, "it is a directory"
    else:
        path, expected = tmp_path / "notes.txt", "not an SQLite database"
        path.write_text("my notes, not a database\n")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(hbtrio.StoreError) as info:
        async with hbtrio.open_engine(hbtrio.SQLiteStore(path)):
            raise AssertionError("opened a bad path")  # pragma: no cover
    assert expected in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created, nothing changed
    if case == "not-a-database":
        assert path.read_text() == "my notes, not a database\n"


async def test_an_empty_file_is_opened_as_a_new_store_with_a_notice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "empty.sqlite"
    path.touch()
    with caplog.at_level(logging.WARNING, logger="hbtrio"):
        async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:
            await engine.spawn(COUNTER)
    notices = [r.getMessage() for r in caplog.records]
    assert any("empty file" in m and str(path) in m for m in notices), notices
    assert path.stat().st_size > 0


async def test_a_new_file_that_could_not_be_initialised_is_not_left_behind(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.sqlite"
    store = hbtrio.SQLiteStore(path)
    store._synchronous = "BOGUS; CREATE TABLE"  # an SQL error while the schema is set up
    with pytest.raises(hbtrio.StoreError):
        await store.open()
    assert not path.exists()
