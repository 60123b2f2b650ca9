"""A real aos module on hbtrio: run only when ``HBTRIO_AOS_WASM`` names one (else skipped).

No aos module is part of this project: point ``HBTRIO_AOS_WASM`` at one you
have (an aos 2 "pure" build for memory64, such as the one HyperBEAM tests
with). A module with legacy exception handling needs a wasm-opt that has
``--translate-to-exnref`` (see docs/wasm.md); the translation is cached for
the session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import hbtrio
import hbtrio.testing
from wasm_kit import device

AOS = os.environ.get("HBTRIO_AOS_WASM")
pytestmark = pytest.mark.skipif(
    not AOS or not Path(AOS).is_file(), reason="set HBTRIO_AOS_WASM to an aos module to run"
)
OWNER = "o" * 43
WASM = "wasm-64@1.0"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wasm-cache")


def aos_device(cache: Path, **options: Any) -> hbtrio.WasmDevice:
    return device(cache_dir=cache, **options)


def aos_definition(image: str) -> dict[str, Any]:
    return {"device": "process@1.0", "execution-device": WASM, "image": image, "owner": OWNER}


def aos_image() -> bytes:
    assert AOS is not None
    return Path(AOS).read_bytes()


def ev(code: str, **extra: Any) -> dict[str, Any]:
    return {"action": "Eval", "data": code, **extra}


async def test_eval_from_the_owner(cache: Path) -> None:
    async with hbtrio.testing.open_test_engine(devices={WASM: aos_device(cache)}) as engine:
        pid = await engine.spawn(aos_definition(await engine.put_blob(aos_image())))
        await engine.schedule_many(pid, [ev("return 1+1"), ev("return 7", owner="someone else")])
        state = await engine.compute(pid, 1)
        assert state["output"] == "2" and "error" not in state
        assert "7" not in str((await engine.compute(pid, 2))["output"])  # not the owner: no eval


async def test_a_variable_lives_across_messages_and_restores(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "aos.sqlite"
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={WASM: aos_device(cache)}, cache_frequency=2
    ) as engine:
        pid = await engine.spawn(aos_definition(await engine.put_blob(aos_image())))
        await engine.schedule_many(pid, [ev("X = 42"), ev("X = X + 1"), ev("return X")])
        assert (await engine.compute(pid, 3))["output"] == "43"
    dev = aos_device(cache)
    async with hbtrio.open_engine(
        hbtrio.SQLiteStore(path), devices={WASM: dev}, cache_frequency=2
    ) as engine:
        await engine.schedule(pid, ev("return X * 2"))
        assert (await engine.compute(pid, 4))["output"] == "86"
        assert engine.statistics().slots_computed == 1  # restored at 3: only slot 4 ran
    assert dev.statistics().booted == 1


async def test_a_ping_handler_replies_into_the_outbox(cache: Path) -> None:
    handler = (
        "Handlers.add('ping', Handlers.utils.hasMatchingTag('Action', 'Ping'), "
        "function(m) ao.send({Target = m.From, Data = 'pong', Action = 'Pong'}) end)"
    )
    async with hbtrio.testing.open_test_engine(devices={WASM: aos_device(cache)}) as engine:
        pid = await engine.spawn(aos_definition(await engine.put_blob(aos_image())))
        await engine.schedule_many(pid, [ev(handler), {"action": "Ping", "owner": "caller"}])
        state = await engine.compute(pid, 2)
    [reply] = state["messages"]
    assert (reply["target"], reply["data"], reply["action"]) == ("caller", "pong", "Pong")
    assert reply["from-process"] == pid


async def test_errors_timeouts_and_the_memory_limit_do_not_wedge_the_process(
    cache: Path,
) -> None:
    dev = aos_device(cache, max_memory=64 << 20, call_timeout=1.0)
    async with hbtrio.testing.open_test_engine(devices={WASM: dev}) as engine:
        pid = await engine.spawn(aos_definition(await engine.put_blob(aos_image())))
        bodies = [
            ev("X = 1"),
            ev("error('boom')"),
            ev("while true do end"),
            ev("local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 64) .. i end"),
            ev("return X"),
        ]
        await engine.schedule_many(pid, bodies)
        assert "boom" in (await engine.compute(pid, 2))["error"]
        assert (await engine.compute(pid, 3))["error-kind"] == "timeout"
        assert "error" in await engine.compute(pid, 4)
        assert (await engine.compute(pid, 5))["output"] == "1"


async def test_hyperbeams_aos_definition_runs_unchanged(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HBTRIO_WASM_CACHE", str(cache))
    async with hbtrio.testing.open_test_engine() as engine:  # the built-in stack@1.0
        image = await engine.put_blob(aos_image())
        definition = {
            "device": "process@1.0",
            "scheduler-device": "scheduler@1.0",
            "type": "Process",
            "execution-device": "stack@1.0",
            "device-stack": ["WASI@1.0", "JSON-Iface@1.0", "WASM-64@1.0", "Multipass@1.0"],
            "image": image,
            "output-prefix": "wasm",
            "patch-from": "/results/outbox",
            "passes": 2,
            "stack-keys": ["init", "compute", "snapshot", "normalize"],
        }
        pid = await engine.spawn(definition)
        await engine.schedule_many(pid, [ev("return 1+1"), ev("return 2+2")])
        assert (await engine.compute(pid, 1))["output"] == "2"
        assert (await engine.compute(pid, 2))["output"] == "4"


async def test_an_aos_process_replays_deterministically(cache: Path) -> None:
    data = aos_image()
    bodies = [ev("X = 10"), ev("return X + 5"), ev("error('no')"), ev("return #tostring(X)")]
    states = await hbtrio.testing.assert_deterministic(
        aos_definition(data),
        bodies,
        {WASM: aos_device(cache)},  # type: ignore[arg-type]
    )
    assert states[2]["output"] == "15"
