"""WASM processes on the node: blobs, spawn, results over JSON and CBOR, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hbtrio
from test_cli import cli
from test_cli import node as cli_node
from test_http import open_node
from wasm_kit import device, image_id, module

OCTETS = "application/octet-stream"


async def test_a_wasm_process_over_http() -> None:
    async with open_node(devices={"wasm-64@1.0": device()}, default_wait=10.0) as n:
        c = n.client
        r = await c.post("/blobs", content=module("counter"), headers={"content-type": OCTETS})
        assert r.status_code == 201
        image = r.json()["id"]
        assert image == image_id(module("counter"))
        r = await c.post(
            "/processes",
            json={"device": "process@1.0", "execution-device": "wasm-64@1.0", "image": image},
        )
        pid = r.json()["process"]
        for body in ({"data": "one"}, {"data": "@trap"}, {"data": "@error"}, {}):
            assert (await c.post(f"/{pid}/schedule", json=body)).status_code == 200
        r = await c.get(f"/{pid}/compute", params={"slot": 1})
        assert r.json() == {
            "assignments": [],
            "at-slot": 1,
            "messages": [],
            "output": {"calls": 1, "count": 1},
            "spawns": [],
        }
        failed = (await c.get(f"/{pid}/compute", params={"slot": 2})).json()
        assert failed["error-kind"] == "failure" and "unreachable" in failed["error"]
        assert (await c.get(f"/{pid}/compute", params={"slot": 3})).json()["error"] == (
            "error on purpose"
        )
        r = await c.get(f"/{pid}/now", headers={"accept": "application/cbor"})
        state = hbtrio.decode(r.content)
        assert state["output"] == {"count": 3, "calls": 3} and state["at-slot"] == 4


async def test_spawn_with_an_image_from_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    wasm = tmp_path / "counter.wasm"
    wasm.write_bytes(module("counter"))
    async with cli_node({"wasm-64@1.0": device()}) as (url, _):
        status, out, err = await cli(capsys, "spawn", "--url", url, "--image", str(wasm))
        assert status == 0, err
        pid = out.strip()
        assert (await cli(capsys, "schedule", "--url", url, pid, "data=hi"))[0] == 0
        status, out, _ = await cli(capsys, "now", "--url", url, pid, "--json")
        assert json.loads(out)["output"] == {"count": 1, "calls": 1}
        # Without --json: the output data alone, plainly (JSON, as it is not text).
        status, out, err = await cli(capsys, "now", "--url", url, pid)
        assert status == 0 and json.loads(out) == {"count": 1, "calls": 1}
        status, out, err = await cli(capsys, "compute", "--url", url, pid, "1")
        assert status == 0 and json.loads(out) == {"count": 1, "calls": 1} and err == ""
