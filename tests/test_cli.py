"""The ``hbtrio`` command: help, demo, client subcommands against a real node, serve.

Client subcommands are synchronous (httpx's blocking client), so the async
tests run them in a worker thread while the node serves on the test's loop.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import hbtrio
from hbtrio._cli import build_parser, format_message, format_table, main
from hbtrio.http import make_app, run_server
from helpers import Gate, node_started, reap

SRC = str(Path(hbtrio.__file__).resolve().parents[1])


@asynccontextmanager
async def node(
    devices: dict[str, object] | None = None, **app_options: Any
) -> AsyncIterator[tuple[str, Gate]]:
    gate = Gate()
    async with hbtrio.open_engine(devices={"gate@1.0": gate, **(devices or {})}) as engine:
        stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(
                    partial(
                        run_server,
                        make_app(engine, **app_options),
                        port=0,
                        shutdown_trigger=stop.wait,
                    )
                )
                yield urls[0], gate
                stop.set()
        finally:
            gate.open.set()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``hbtrio ARGV`` in a thread; (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = await trio.to_thread.run_sync(main, list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- help


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    commands = (
        "serve",
        "demo",
        "spawn",
        "schedule",
        "compute",
        "now",
        "workers",
        "stats",
        "put-blob",
    )
    for command in commands:
        assert command in out
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert f"usage: hbtrio {command}" in capsys.readouterr().out


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["frobnicate"],
        ["compute", "PID"],
        ["compute", "PID", "-1"],
        ["serve", "--port", "70000"],
        ["serve", "--cache-frequency", "0"],
        ["serve", "--max-idle", "-1"],
        ["now", "PID", "--wait", "nan"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
    assert "usage:" in capsys.readouterr().err


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.db, args.host, args.port) == ("hbtrio.sqlite", "127.0.0.1", 8734)
    assert (args.max_idle, args.cache_frequency) == (300.0, 1)


def test_formatting() -> None:
    text = format_message({"count": 3, "at-slot": 2, "b": b"\x00\x01", "l": (1, "x")})
    assert text.splitlines() == [
        "at-slot  2",
        "b        <2 bytes: 0001>",
        "count    3",
        'l        [1,"x"]',
    ]
    assert format_table(["a", "bb"], [[1, None], ["long", 0.5]]).splitlines() == [
        "a     bb",
        "1     -",
        "long  0.50",
    ]


# --------------------------------------------------------------------------- demo


def test_demo_is_quick_and_informative(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--processes", "2", "--messages", "30", "--waiters", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("spawned counter-") == 2
    assert "scheduled 30 messages" in out
    assert "slot   30 -> count    465 (ok" in out
    assert "EXPECTED" not in out
    assert re.search(r"worker\s+slot\s+target\s+waiting", out)
    assert "ComputeError phase='compute' attempted_slot=31" in out
    assert "cache_hits 0 -> 1" in out
    assert "computed again: 0 slots" in out
    assert "slots_computed   60" in out
    assert "demo finished" in out
    # Each step says what it shows; identical resolutions run once.
    headings = re.findall(r"^== (\d)\. ", out, re.MULTILINE)
    assert headings == ["1", "2", "3", "4", "5", "6", "7"]
    assert "10 callers of digest@1.0 sha256 -> 1 answer, the device ran 1 time(s)" in out
    assert re.search(r"^deduplicated\s+9$", out, re.MULTILINE)


def test_demo_shows_progress_on_large_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--processes", "1", "--messages", "2000", "--waiters", "8"]) == 0
    out = capsys.readouterr().out
    progress = re.findall(r"scheduled ([\d,]+) of 2,000 messages", out)
    assert progress == [f"{n:,}" for n in range(200, 2001, 200)]
    assert "8 answers, all right" in out and "EXPECTED" not in out


# --------------------------------------------------------------------------- client commands


async def test_client_commands(capsys: pytest.CaptureFixture[str]) -> None:
    async with node() as (url, gate):
        status, out, err = await cli(capsys, "spawn", "--url", url, "name=first")
        assert status == 0, err
        pid = out.strip()
        assert pid == hbtrio.message_id(
            {"device": "process@1.0", "execution-device": "counter@1.0", "name": "first"}
        )
        assert await cli(capsys, "schedule", "--url", url, pid, "n:=5") == (0, "1\n", "")
        status, out, _ = await cli(
            capsys, "schedule", "--url", url, pid, "--body", '{"n": 2}', "note=hi", "--json"
        )
        assert json.loads(out) == {"process": pid, "slot": 2}

        status, out, _ = await cli(capsys, "compute", "--url", url, pid, "1")
        assert (status, out) == (0, "at-slot  1\ncount    5\n")
        status, out, _ = await cli(capsys, "now", "--url", url, pid, "--json")
        assert json.loads(out) == {"at-slot": 2, "count": 7}

        status, out, _ = await cli(capsys, "workers", "--url", url)
        assert status == 0
        header, row = out.splitlines()
        assert header.split() == [
            "process",
            "slot",
            "target",
            "waiting",
            "computed",
            "idle_seconds",
            "phase",
        ]
        assert row.split()[:3] == [pid, "2", "2"]
        status, out, _ = await cli(capsys, "workers", "--url", url, "--json")
        assert pid in json.loads(out)["workers"]

        status, out, _ = await cli(capsys, "stats", "--url", url)
        assert re.search(r"^slots_computed\s+2$", out, re.MULTILINE)
        status, out, _ = await cli(capsys, "stats", "--url", url, "--json")
        assert json.loads(out)["slots_computed"] == 2

        # errors from the node: exit status 1 and the node's explanation
        status, out, err = await cli(capsys, "compute", "--url", url, pid, "9")
        assert status == 1 and out == ""
        assert "422 slot-not-scheduled" in err and "attempted-slot  3" in err
        status, _, err = await cli(capsys, "spawn", "--url", url, "--execution-device", "no@1.0")
        assert status == 1 and "400 unknown-device" in err
        # bad arguments: exit status 2, nothing sent
        for argv in (["schedule", pid], ["schedule", pid, "n"], ["schedule", pid, "n:=[1"]):
            status, _, err = await cli(capsys, *argv, "--url", url)
            assert status == 2, argv
        assert (await cli(capsys, "now", "--url", url, pid))[1].startswith("at-slot  2")

        # a result that is not ready: exit status 3
        gated = (await cli(capsys, "spawn", "--url", url, "--execution-device", "gate@1.0"))[1]
        await cli(capsys, "schedule", "--url", url, gated.strip(), "n:=1")
        status, out, err = await cli(
            capsys, "compute", "--url", url, gated.strip(), "1", "--wait", "0.05"
        )
        assert status == 3 and out == ""
        assert "not ready yet: the worker reached slot 0 of 1" in err
        gate.open.set()


async def test_client_token_and_unreachable_node(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HBTRIO_TOKEN", raising=False)
    async with node(token="s3cret") as (url, _):
        status, _, err = await cli(capsys, "spawn", "--url", url)
        assert status == 1 and "401 unauthorized" in err
        status, out, _ = await cli(capsys, "spawn", "--url", url, "--token", "s3cret")
        assert status == 0 and len(out.strip()) == 43
    (tmp_path / "definition.json").write_text('{"name": "from a file"}')
    status, _, err = await cli(
        capsys, "spawn", "--url", url, "--body", f"@{tmp_path / 'definition.json'}"
    )
    assert status == 1 and "cannot reach the node" in err


# --------------------------------------------------------------------------- serve


def test_serve_refuses_public_address_without_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HBTRIO_TOKEN", raising=False)
    db = tmp_path / "node.sqlite"
    assert main(["serve", "--host", "0.0.0.0", "--db", str(db)]) == 2
    assert "without an API token" in capsys.readouterr().err
    assert not db.exists()


def test_serve_rejects_bad_device_spec(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "node.sqlite"
    for spec in ("nope", "x@1.0=no_such_module_here:Thing", "x@1.0=json:NoSuchThing"):
        assert main(["serve", "--db", str(db), "--device", spec]) == 2
        assert "--device" in capsys.readouterr().err
    assert not db.exists()


def test_serve_reports_an_address_in_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--db", str(tmp_path / "n.sqlite"), "--port", str(port)]) == 1
    assert "cannot serve on 127.0.0.1" in capsys.readouterr().err
    assert not (tmp_path / "n.sqlite").exists()


async def test_serve_subprocess_stops_on_sigint(tmp_path: Path) -> None:
    """``hbtrio serve`` prints its address, serves, and exits 0 on Ctrl-C (SIGINT)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env.pop("HBTRIO_TOKEN", None)
    cmd = [sys.executable, "-m", "hbtrio._cli", "serve", "--db", str(tmp_path / "n.sqlite")]
    proc = await trio.lowlevel.open_process(
        [*cmd, "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    try:
        seen = await node_started(proc.stdout, 30)
        url = re.search(rb"listening on (http://127\.0\.0\.1:\d+) \(store: (.*)\)", seen)
        assert url is not None, seen
        assert url.group(2).decode() == str(tmp_path / "n.sqlite")

        status = await trio.to_thread.run_sync(main, ["spawn", "--url", url.group(1).decode()])
        assert status == 0
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
            while chunk := await proc.stdout.receive_some():
                seen += chunk
        assert b"hbtrio node stopped" in seen
    finally:
        await reap(proc)


# --------------------------------------------------------------------------- first-run failures


_HOLD = """
import sys, trio, hbtrio

async def main():
    async with hbtrio.open_engine(hbtrio.SQLiteStore(sys.argv[1])):
        print("holding", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def _one_line_error(err: str, command: str = "serve") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hbtrio {command}: error: "), err
    return lines[0]


def test_serve_refuses_a_store_file_in_use_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Regression (issue 10.1, 10.4): the second node on a file exits at once, naming the holder."""
    db = tmp_path / "node.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(db)], stdout=subprocess.PIPE, env=_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        assert main(["serve", "--db", str(db), "--port", "0"]) == 1
        line = _one_line_error(capsys.readouterr().err)
        assert f"{db} is in use by another engine (pid {holder.pid})" in line
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


@pytest.mark.parametrize("case", ["no-directory", "not-a-database", "a-directory"])
def test_serve_refuses_a_bad_db_in_one_line_creating_nothing(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database")
    db = {"no-directory": tmp_path / "nope" / "n.sqlite", "not-a-database": notes}.get(
        case, tmp_path
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["serve", "--db", str(db), "--port", "0"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert str(db) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert notes.read_text() == "not a database"


def test_serve_without_its_http_server_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "hypercorn", None)  # as if it were not installed
    db = tmp_path / "node.sqlite"
    assert main(["serve", "--db", str(db)]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "'hypercorn'" in line and "pip install hypercorn" in line
    assert not db.exists()


@pytest.mark.parametrize("token", [" padded", "padded ", "naïve", "two words", "tab\there"])
async def test_tokens_no_client_could_send_are_refused_at_start(
    token: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "node.sqlite"
    status, _, err = await cli(capsys, "serve", "--db", str(db), "--token", token)
    assert status == 2
    assert "printable ASCII" in _one_line_error(err)
    assert not db.exists()
    status, _, err = await cli(capsys, "spawn", "--url", "http://127.0.0.1:9", "--token", token)
    assert status == 2 and "printable ASCII" in _one_line_error(err, "spawn")


async def test_schedule_says_what_a_text_field_sends(capsys: pytest.CaptureFixture[str]) -> None:
    """Regression (issue 10.7): ``n=5`` sends the string "5", and the command says so."""
    async with node() as (url, _):
        pid = (await cli(capsys, "spawn", "--url", url))[1].strip()
        status, out, err = await cli(capsys, "schedule", "--url", url, pid, "n=5")
        assert (status, out) == (0, "1\n")
        assert 'note: n=5 sends the string "5"; write n:=5 for the JSON value 5' in err
        status, out, err = await cli(capsys, "schedule", "--url", url, pid, "n:=5", "--verbose")
        assert (status, out) == (0, "2\n")
        assert err.splitlines() == [f"POST {url}/{pid}/schedule", '{"n":5}']
        status, _, err = await cli(capsys, "schedule", "--url", url, pid, "who=alice")
        assert (status, err) == (0, "")
        # counter@1.0 refuses the string: that slot fails, as documented.
        status, _, err = await cli(capsys, "compute", "--url", url, pid, "1")
        assert status == 1 and "422 compute-error" in err and "must be an int, not str" in err


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env.pop("HBTRIO_TOKEN", None)
    return env


_MY_DEVICE = """
class Doubler:
    def init(self, process):
        return {"value": 1}

    def compute(self, state, assignment):
        return {"value": state["value"] * 2}
"""


async def test_serve_finds_device_modules_in_the_current_directory(tmp_path: Path) -> None:
    """Regression (issue 10.8): the console script, not ``python -m``, run beside the module."""
    script = Path(sys.executable).with_name("hbtrio")
    if not script.exists():  # pragma: no cover - an installation without console scripts
        pytest.skip("no hbtrio console script beside this Python")
    (tmp_path / "mydevices.py").write_text(_MY_DEVICE)
    proc = await trio.lowlevel.open_process(
        [
            str(script),
            "serve",
            "--db",
            "n.sqlite",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--device",
            "double@1.0=mydevices:Doubler",
            "--access-log",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        seen = await node_started(proc.stdout, 30)
        found = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", seen)
        assert found is not None, seen
        url = found.group(1).decode()

        def drive() -> str:
            client = ["--url", url]
            out = (
                subprocess.run(
                    [str(script), "spawn", *client, "--execution-device", "double@1.0"],
                    capture_output=True,
                    check=True,
                    env=_env(),
                )
                .stdout.decode()
                .strip()
            )
            for _ in range(3):
                subprocess.run(
                    [str(script), "schedule", *client, out, "x:=1"],
                    check=True,
                    capture_output=True,
                    env=_env(),
                )
            return subprocess.run(
                [str(script), "now", *client, out, "--json"],
                capture_output=True,
                check=True,
                env=_env(),
            ).stdout.decode()

        assert json.loads(await trio.to_thread.run_sync(drive)) == {"at-slot": 3, "value": 8}
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        log = bytearray()
        while chunk := await proc.stderr.receive_some():
            log += chunk
        assert re.search(rb'127\.0\.0\.1 "POST /processes" 200 [\d.]+ms', log), bytes(log)
        assert re.search(rb'"GET /[\w-]{43}/now" 200', log), bytes(log)
    finally:
        await reap(proc)
        await proc.stderr.aclose()


# --------------------------------------------------------------------------- blobs


class Image:
    """A stand-in for a WASM device: its state names the image its process was spawned with."""

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"image": process.get("image")}

    def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        return dict(state)


def blob_id_of(data: bytes) -> str:
    return hbtrio._message.id_of_bytes(data)


async def test_spawn_image_fits_the_definition(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    module = tmp_path / "module.wasm"
    module.write_bytes(b"\x00asm" + bytes(100))
    image = blob_id_of(module.read_bytes())
    wasm = {"device": "process@1.0", "execution-device": "wasm-64@1.0", "image": image}
    async with node(devices={"wasm-64@1.0": Image()}) as (url, _):
        status, out, err = await cli(capsys, "spawn", "--url", url, "--image", str(module))
        assert (status, err) == (0, "")
        assert out.strip() == hbtrio.message_id(wasm)
        # A device named on the command line, or in the body, is kept; fields are added.
        status, out, _ = await cli(
            capsys, "spawn", "--url", url, "--image", str(module), "--execution-device",
            "counter@1.0", "name=x",
        )  # fmt: skip
        assert out.strip() == hbtrio.message_id(
            {**wasm, "execution-device": "counter@1.0", "name": "x"}
        )
        body = '{"execution-device": "counter@1.0", "image": "overridden"}'
        status, out, _ = await cli(
            capsys, "spawn", "--url", url, "--image", str(module), "--body", body
        )
        assert out.strip() == hbtrio.message_id({**wasm, "execution-device": "counter@1.0"})
        # Bad usage is found before anything is uploaded or spawned.
        status, _, err = await cli(
            capsys, "spawn", "--url", url, "--image", str(tmp_path / "nope.wasm")
        )
        assert status == 1
        assert f"cannot read {tmp_path / 'nope.wasm'}: No such file" in _one_line_error(
            err, "spawn"
        )
        status, _, err = await cli(capsys, "spawn", "--url", url, "--image", str(module), "n:=[")
        assert status == 2
        status, out, _ = await cli(capsys, "stats", "--url", url, "--json")
        assert json.loads(out)["blobs_stored"] == 3


async def test_put_blob_and_spawn_image_against_a_real_node(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``hbtrio serve`` (a subprocess) with a device that names its image, driven by the
    client commands: put-blob, spawn --image, now; the node's blob limit."""
    (tmp_path / "imagedevice.py").write_text(
        "class Image:\n"
        "    def init(self, process):\n"
        '        return {"image": process["image"]}\n'
        "    def compute(self, state, assignment):\n"
        "        return dict(state)\n"
    )
    module = tmp_path / "module.wasm"
    module.write_bytes(b"\x00asm\x01\x00\x00\x00" + bytes(range(256)) * 8)
    image = blob_id_of(module.read_bytes())
    (tmp_path / "big.wasm").write_bytes(bytes(4097))
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "hbtrio._cli",
            "serve",
            "--db",
            "n.sqlite",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--device",
            "wasm-64@1.0=imagedevice:Image",
            "--max-blob-size",
            "4096",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    try:
        seen = await node_started(proc.stdout, 30)
        found = re.search(rb"listening on (http://127\.0\.0\.1:\d+)", seen)
        assert found is not None, seen
        url = found.group(1).decode()

        status, out, err = await cli(capsys, "put-blob", "--url", url, str(module))
        assert (status, out, err) == (0, f"{image}\n", "")
        status, out, _ = await cli(capsys, "put-blob", "--url", url, str(module), "--json")
        assert json.loads(out) == {"id": image}  # the same bytes, the same blob
        status, out, err = await cli(capsys, "spawn", "--url", url, "--image", str(module))
        assert status == 0, err
        pid = out.strip()
        status, out, _ = await cli(capsys, "now", "--url", url, pid, "--json")
        assert json.loads(out) == {"at-slot": 0, "image": image}
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get(f"/blobs/{image}")).content == module.read_bytes()

        status, _, err = await cli(capsys, "put-blob", "--url", url, str(tmp_path / "big.wasm"))
        assert status == 1 and "413 body-too-large" in err and "max-blob-size  4096" in err
        status, _, err = await cli(capsys, "put-blob", "--url", url, str(tmp_path))
        assert status == 1 and "cannot read" in _one_line_error(err, "put-blob")
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        await reap(proc)


def test_a_process_result_prints_its_output_plainly() -> None:
    from hbtrio._cli._output import format_result, is_process_result

    result = {"at-slot": 3, "output": "2", "messages": [{"target": "x"}], "spawns": []}
    assert is_process_result(result) and not is_process_result({"at-slot": 3, "count": 1})
    assert format_result(result) == ("2", ["1 message (--json shows them)"])
    text, notes = format_result({**result, "output": {"a": 1}, "error": "bad", "messages": []})
    assert text == '{"a":1}' and notes == ["error: bad"]
