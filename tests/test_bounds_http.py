"""The engine's bounds on the node: `hbtrio serve` options, 503 `overloaded`, 202 `catching-up`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from hbtrio._cli._parser import build_parser
from hbtrio._cli._serve import BOUNDS
from hbtrio._http import serve
from helpers import Gate


@asynccontextmanager
async def node(bounds: dict[str, Any], gate: Gate) -> AsyncIterator[httpx.AsyncClient]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(
                serve,
                None,
                port=0,
                devices={"gate@1.0": gate},
                bounds=bounds,
                shutdown_trigger=stop.wait,
            )
        )
        try:
            async with httpx.AsyncClient(base_url=urls[0], timeout=20) as client:
                yield client
        finally:
            gate.open.set()
            stop.set()


async def spawn(client: httpx.AsyncClient, device: str, slots: int) -> str:
    r = await client.post("/processes", json={"device": "process@1.0", "execution-device": device})
    pid: str = r.json()["process"]
    for n in range(1, slots + 1):
        assert (await client.post(f"/{pid}/schedule", json={"n": n})).status_code == 200
    return pid


async def test_a_slot_too_far_away_is_202_catching_up_then_200() -> None:
    gate = Gate()
    gate.open.set()
    async with node({"max_replay": 5}, gate) as client:
        pid = await spawn(client, "gate@1.0", 20)
        r = await client.get(f"/{pid}/compute", params={"slot": 20})
        assert r.status_code == 202
        assert r.headers["retry-after"] == "1"
        body = r.json()
        assert body["status"] == "computing" and body["reason"] == "catching-up"
        assert body["requested-slot"] == 20
        for _ in range(200):  # what a client does: ask again after Retry-After (here sooner)
            r = await client.get(f"/{pid}/compute", params={"slot": 20})
            if r.status_code == 200:
                break
            assert r.status_code == 202
            await trio.sleep(0.01)
        assert r.status_code == 200 and r.json()["count"] == 20
        stats = (await client.get("/stats")).json()
        assert stats["refused"] >= 1


async def test_a_waiter_over_the_bound_is_503_overloaded() -> None:
    gate = Gate()
    async with node({"max_waiters_per_worker": 1}, gate) as client:
        pid = await spawn(client, "gate@1.0", 2)
        async with trio.open_nursery() as nursery:
            first: list[httpx.Response] = []

            async def wait_for_it() -> None:
                first.append(await client.get(f"/{pid}/compute", params={"slot": 1, "wait": 10}))

            nursery.start_soon(wait_for_it)
            for _ in range(500):  # until the first request parks on the worker
                workers = (await client.get("/workers")).json()["workers"]
                if workers and next(iter(workers.values()))["waiting"] == 1:
                    break
                await trio.sleep(0.01)
            r = await client.get(f"/{pid}/compute", params={"slot": 2, "wait": 10})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"] == "overloaded"
            assert r.json()["bound"] == "max_waiters_per_worker"
            gate.open.set()
        assert first[0].status_code == 200


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max-memory", "2G"], {"max_memory": 2 * 1024**3}),
        (["--max-memory", "1048576"], {"max_memory": 1048576}),
        (
            ["--max-workers", "100", "--max-replay", "5000"],
            {"max_workers": 100, "max_replay": 5000},
        ),
        (
            ["--snapshot-seconds", "0.5", "--snapshot-cost-ratio", "3"],
            {"snapshot_seconds": 0.5, "snapshot_cost_ratio": 3.0},
        ),
    ],
)
def test_serve_options_become_engine_bounds(argv: list[str], expected: dict[str, Any]) -> None:
    args = build_parser().parse_args(["serve", *argv])
    bounds = {name: getattr(args, name) for name in BOUNDS}
    assert {k: v for k, v in bounds.items() if v is not None} == expected


@pytest.mark.parametrize("value", ["2GB", "-1", "0", "lots", "1.5G"])
def test_bad_sizes_are_usage_errors(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--max-memory", value])
    assert info.value.code == 2
    assert "--max-memory" in capsys.readouterr().err
