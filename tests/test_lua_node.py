"""A Lua process on a real node: ``hbtrio serve`` in a subprocess, driven over HTTP (as curl
would) and by the client commands, restarted on its store file."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from helpers import node_started, reap
from lua_kit import LUA, source
from test_cli import _env, cli


@asynccontextmanager
async def serve(cwd: Path) -> AsyncIterator[str]:
    """``hbtrio serve`` on ``cwd/node.sqlite``: its URL; stopped with Ctrl-C at the end."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hbtrio._cli", "serve", "--db", "node.sqlite", "--port", "0",
         "--log-level", "warning", "--slot-timeout", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), cwd=cwd,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        seen = await node_started(proc.stdout, 30)
        found = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", seen)
        assert found is not None, seen
        yield found.group(1).decode()
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        await reap(proc)


async def test_a_lua_process_on_hbtrio_serve(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    async def run(*argv: str) -> str:
        status, out, err = await cli(capsys, *argv, "--url", url)
        assert status == 0, err
        return out

    async with serve(tmp_path) as url:
        # The CLI: the module as a blob, a process naming it, messages, results.
        pid = (await run("spawn", "--module", str(LUA / "ledger.lua"), "owner=me")).strip()
        await run("schedule", pid, "action=Mint", "quantity=1000", "owner=me")
        await run("schedule", pid, "action=Transfer", "recipient=bob", "quantity=250", "owner=me")
        await run("schedule", pid, "action=Transfer", "quantity=nope", "owner=me")
        moved = json.loads(await run("compute", pid, "2", "--json"))
        assert moved["output"] == "me -> bob: 250"
        assert [m["action"] for m in moved["messages"]] == ["Debit-Notice", "Credit-Notice"]
        failed = json.loads(await run("compute", pid, "3", "--json"))
        assert failed["error-kind"] == "failure" and "positive integer" in failed["error"]
        # HTTP, as curl would: an inline script that loops for ever on one message.
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            definition = {"device": "process@1.0", "execution-device": "lua@5.3",
                          "script": source("loop")}  # fmt: skip
            answer = await client.post("/processes", json=definition)
            loop = answer.json()["process"]
            for body in ({}, {"action": "Spin"}, {}):
                assert (await client.post(f"/{loop}/schedule", json=body)).status_code == 200
            state = (await client.get(f"/{loop}/now", params={"wait": 20})).json()
            assert state == {"output": 2, "messages": [], "spawns": [], "assignments": [],
                             "at-slot": 3}  # fmt: skip
            spun = (await client.get(f"/{loop}/compute", params={"slot": 2})).json()
            assert spun["error-kind"] == "timeout"
        before = [await run("compute", pid, str(s), "--json") for s in range(4)]
    # A new node on the same file: the same answers, and the process goes on from there.
    async with serve(tmp_path) as url:
        assert [await run("compute", pid, str(s), "--json") for s in range(4)] == before
        await run("schedule", pid, "action=Balance", "account=bob")
        assert json.loads(await run("now", pid, "--json"))["output"] == 250
