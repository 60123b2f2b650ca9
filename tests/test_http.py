"""The HTTP API against a real server on a loopback port (hypercorn on Trio, httpx clients).

Every endpoint, content negotiation, the 202 path, every error status, the API
token, graceful shutdown in process and of a real ``hbtrio serve`` subprocess
receiving SIGTERM. Waits are event-driven (`wait_until`); the subprocess tests
poll the node over HTTP with bounded retry loops.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import hbtrio
from hbtrio import _codec, _jsonwire
from hbtrio._http import HttpApp, check_bind, make_app, negotiate, run_server, serve
from helpers import Gate, reap
from strategies import ints

CBOR = "application/cbor"
SRC = str(Path(hbtrio.__file__).resolve().parents[1])


# --------------------------------------------------------------------------- test devices


class Echo:
    """``echo@1.0``: the state keeps the last body it was given."""

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"last": None}

    def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        return {**state, "last": assignment["body"]}


# --------------------------------------------------------------------------- fixtures


@attrs.define
class Node:
    engine: hbtrio.Engine
    gate: Gate
    app: HttpApp
    url: str
    client: httpx.AsyncClient
    stop: trio.Event


@asynccontextmanager
async def open_node(
    *,
    grace: float = 5.0,
    store: hbtrio.Store | None = None,
    devices: dict[str, object] | None = None,
    **app_options: Any,
) -> AsyncIterator[Node]:
    """An engine (memory store unless given one) behind a real server on a free loopback port."""
    gate = Gate()
    devices = {"gate@1.0": gate, "echo@1.0": Echo(), **(devices or {})}
    async with hbtrio.open_engine(store, devices=devices) as engine:
        app = make_app(engine, **app_options)
        stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(
                    partial(run_server, app, port=0, grace=grace, shutdown_trigger=stop.wait)
                )
                async with httpx.AsyncClient(base_url=urls[0], timeout=20) as client:
                    yield Node(engine, gate, app, urls[0], client, stop)
                stop.set()
        finally:
            gate.open.set()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(max_body=4096, default_wait=5.0) as n:
        yield n


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, event-driven, until ``predicate()`` holds (bounded)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.testing.wait_all_tasks_blocked(0.001)


def definition(device: str = "counter@1.0", **fields: Any) -> dict[str, Any]:
    return {"device": "process@1.0", "execution-device": device, **fields}


async def spawn(client: httpx.AsyncClient, device: str = "counter@1.0", **fields: Any) -> str:
    response = await client.post("/processes", json=definition(device, **fields))
    assert response.status_code == 200, response.text
    pid: str = response.json()["process"]
    return pid


async def schedule(client: httpx.AsyncClient, pid: str, **body: Any) -> int:
    response = await client.post(f"/{pid}/schedule", json=body)
    assert response.status_code == 200, response.text
    slot: int = response.json()["slot"]
    return slot


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"] == code
    assert body["status"] == status
    assert isinstance(body["message"], str) and body["message"]
    return body


# --------------------------------------------------------------------------- raw HTTP


@attrs.frozen
class RawAnswer:
    """The first HTTP/1.1 response a raw connection got, and whether the server hung up."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    closed: bool

    def error(self, status: int, code: str) -> dict[str, Any]:
        """The JSON error body, checked like `assert_error`."""
        assert self.status == status, (self.status, self.body)
        assert self.headers.get("content-type") == "application/json", self.headers
        body: dict[str, Any] = json.loads(self.body)
        assert (body["error"], body["status"]) == (code, status), body
        assert isinstance(body["message"], str) and body["message"]
        return body


def parse_answer(data: bytes, closed: bool = False) -> RawAnswer:
    """The first response in ``data`` (status ``None`` if there is none)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not sep or match is None:
        return RawAnswer(None, {}, b"", closed)
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    return RawAnswer(int(match.group(1)), headers, rest[:length], closed)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host.strip("[]"), int(port)


async def read_until_closed(stream: trio.abc.ReceiveStream) -> tuple[bytes, bool]:
    """Everything the server sends until it hangs up (bound it with a timeout)."""
    received = bytearray()
    try:
        while chunk := await stream.receive_some():
            received += chunk
    except trio.BrokenResourceError:  # a reset is a hang-up too
        pass
    return bytes(received), True


async def raw_exchange(url: str, data: bytes) -> RawAnswer:
    """Send ``data`` on a fresh connection and read until the server hangs up."""
    stream = await trio.open_tcp_stream(*host_port(url))
    async with stream:
        await stream.send_all(data)
        received, closed = await read_until_closed(stream)
    return parse_answer(received, closed)


# --------------------------------------------------------------------------- endpoints


async def test_spawn_schedule_compute_now_slot_current(node: Node) -> None:
    c = node.client
    pid = await spawn(c)
    assert pid == hbtrio.message_id(definition())
    assert await spawn(c) == pid  # same definition, same process
    assert [await schedule(c, pid, n=n) for n in (1, 2, 3)] == [1, 2, 3]

    r = await c.get(f"/{pid}/compute", params={"slot": 2})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"at-slot": 2, "count": 3}
    assert (await c.get(f"/{pid}/compute", params={"slot": 0})).json() == {"at-slot": 0, "count": 0}
    assert (await c.get(f"/{pid}/now")).json() == {"at-slot": 3, "count": 6}
    r = await c.get(f"/{pid}/slot/current")
    assert r.json() == {"process": pid, "slot": 3, "computed-slot": 3}


async def test_workers_and_stats(node: Node) -> None:
    c = node.client
    pid = await spawn(c)
    for n in range(1, 21):
        await schedule(c, pid, n=n)
    assert (await c.get(f"/{pid}/compute", params={"slot": 20})).json()["count"] == 210

    workers = (await c.get("/workers")).json()["workers"]
    assert set(workers) == {pid}
    info = workers[pid]
    assert info["slot"] == 20 and info["target"] == 20 and info["waiting"] == 0
    assert info["idle_seconds"] >= 0

    stats = (await c.get("/stats")).json()
    assert stats == attrs.asdict(node.engine.stats())
    assert stats["slots_computed"] == 20


async def test_metrics_prometheus_text(node: Node) -> None:
    c = node.client
    pid = await spawn(c)
    await schedule(c, pid, n=5)
    await c.get(f"/{pid}/compute", params={"slot": 1})
    await c.get(f"/{pid}/compute", params={"slot": 1})
    await c.get("/nowhere")

    r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.text
    sample = re.compile(
        r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*",?)*\})? '
        r"(-?[0-9.e+-]+|\+Inf|NaN)$"
    )
    for line in text.splitlines():
        if not line.startswith("#"):
            assert sample.match(line), line
    assert 'hbtrio_http_requests_total{method="GET",route="/{pid}/compute",status="200"} 2' in text
    assert 'hbtrio_http_requests_total{method="GET",route="other",status="404"} 1' in text
    assert 'hbtrio_http_requests_total{method="POST",route="/processes",status="200"} 1' in text
    assert "# TYPE hbtrio_http_request_duration_seconds histogram" in text
    bucket = "hbtrio_http_request_duration_seconds_bucket"
    assert f'{bucket}{{method="GET",route="/{{pid}}/compute",le="+Inf"}} 2' in text
    assert 'hbtrio_http_request_duration_seconds_count{method="POST",route="/processes"} 1' in text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    stats = node.engine.stats()
    assert values["hbtrio_slots_computed_total"] == stats.slots_computed == 1
    assert values["hbtrio_cache_hits_total"] == stats.cache_hits
    assert values["hbtrio_live_workers"] == 1
    assert values["hbtrio_waiters"] == 0
    assert values["hbtrio_http_requests_in_flight"] == 1  # this very request
    assert values["hbtrio_http_shutting_down"] == 0


# --------------------------------------------------------------------------- wire formats


async def test_cbor_in_and_out(node: Node) -> None:
    c = node.client
    defn = definition("echo@1.0", blob=b"\x00\xff")
    r = await c.post(
        "/processes",
        content=_codec.encode(defn),
        headers={"content-type": CBOR, "accept": CBOR},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == CBOR
    pid = _codec.decode(r.content)["process"]
    assert pid == hbtrio.message_id(defn)

    body = {"raw": b"\x01\x02\x03", "/bytes": "not bytes", "inf": math.inf, "xs": [b"", 1, "a"]}
    r = await c.post(
        f"/{pid}/schedule", content=_codec.encode(body), headers={"content-type": CBOR}
    )
    assert r.json() == {"process": pid, "slot": 1}  # JSON answer to a CBOR request

    r = await c.get(f"/{pid}/compute", params={"slot": 1}, headers={"accept": CBOR})
    assert r.headers["content-type"] == CBOR
    state = _codec.decode(r.content)
    assert state == {"at-slot": 1, "last": body | {"xs": (b"", 1, "a")}}
    assert r.content == _codec.encode(state)  # canonical

    r = await c.get(f"/{pid}/compute", params={"slot": 1})
    assert r.json() == {
        "at-slot": 1,
        "last": {
            "raw": {"/bytes": "AQID"},
            "//bytes": "not bytes",
            "inf": {"/float": "Infinity"},
            "xs": [{"/bytes": ""}, 1, "a"],
        },
    }
    assert _jsonwire.loads(r.content) == state


async def test_json_bytes_encoding_on_input(node: Node) -> None:
    c = node.client
    pid = await spawn(c, "echo@1.0")
    sent = {"b": {"/bytes": "3q2+7w=="}, "unpadded": {"/bytes": "3q2+7w"}, "//k": 1}
    assert (await c.post(f"/{pid}/schedule", json=sent)).status_code == 200
    r = await c.get(f"/{pid}/now", headers={"accept": CBOR})
    last = _codec.decode(r.content)["last"]
    assert last == {"b": b"\xde\xad\xbe\xef", "unpadded": b"\xde\xad\xbe\xef", "/k": 1}


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/cbor", CBOR),
        ("application/cbor, */*", CBOR),
        ("application/json;q=0.5, application/cbor", CBOR),
        ("application/cbor;q=0.2, application/json;q=0.9", "application/json"),
        ("application/*", "application/json"),
        ("text/html, application/cbor;q=0.1", CBOR),
    ],
)
def test_negotiate(accept: str | None, expected: str) -> None:
    assert negotiate(accept) == expected


async def test_not_acceptable(node: Node) -> None:
    for accept in ("text/html", "application/json;q=0, application/cbor;q=0"):
        r = await node.client.get("/stats", headers={"accept": accept})
        assert_error(r, 406, "not-acceptable")


# --------------------------------------------------------------------------- JSON wire unit tests

message_keys = st.sampled_from(["/bytes", "/float", "//x", "/", "", "a"]) | st.text(max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(message_keys, inner, max_size=3),
    max_leaves=12,
)
messages = st.dictionaries(message_keys, values, max_size=5)


@settings(max_examples=150, deadline=None)
@given(messages)
def test_json_wire_round_trip(message: dict[str, Any]) -> None:
    text = _jsonwire.dumps(message)
    json.loads(text)  # plain, standard JSON
    back = _jsonwire.loads(text)
    assert _codec.encode(back) == _codec.encode(message)


def test_json_wire_integer_range_is_exact() -> None:
    for n in (2**64 - 1, -(2**64), 0):
        assert _jsonwire.loads(_jsonwire.dumps({"n": n})) == {"n": n}
    assert _jsonwire.loads(b'{"n": 1e308}') == {"n": 1e308}  # the largest decades still fit
    for n in (2**64, -(2**64) - 1, 10**4300, 10**5000):
        # Out of the range: refused, never a ValueError of Python's int-to-text limit.
        with pytest.raises(hbtrio.InvalidMessage, match="outside the message range"):
            _jsonwire.dumps({"n": [n]})


def test_json_wire_encoding_examples() -> None:
    msg = {"b": b"hi", "/bytes": 1, "n": -math.inf, "nan": math.nan, "l": (1, b"")}
    assert json.loads(_jsonwire.dumps(msg)) == {
        "b": {"/bytes": "aGk="},
        "//bytes": 1,
        "n": {"/float": "-Infinity"},
        "nan": {"/float": "NaN"},
        "l": [1, {"/bytes": ""}],
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"{", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"x"', "must be a JSON object"),
        (b'{"/bytes": "AA=="}', "must be a JSON object"),
        (b'{"a": 1, "a": 2}', "appears twice"),
        (b'{"/x": 1}', "reserved"),
        (b'{"a": {"/bytes": "not base64!"}}', "not base64"),
        (b'{"a": {"/bytes": 5}}', "needs a string"),
        (b'{"a": {"/float": "nan"}}', "must be"),
        (b'{"a": NaN}', "bare NaN"),
        (b'{"a": Infinity}', "bare Infinity"),
        (b'{"a": "\\ud800"}', "surrogate|CBOR"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper than 100 levels"),
        (b'{"a":' * 102 + b"1" + b"}" * 102, "nested deeper than 100 levels"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "too many digits"),
        (b'{"a": 1' + b"0" * 4299 + b"}", r"a: a 14281-bit integer is outside the message range"),
        (b'{"a": [18446744073709551616]}', r"a\[0\]: a 65-bit integer is outside"),
        (b'{"a": -18446744073709551617}', r"a: a 65-bit integer is outside"),
        (b'{"a": 1e400}', r'1e400 is too large for a float \(send \{"/float": "Infinity"\}'),
        (b'{"a": [-1E+400]}', r"-1E\+400 is too large for a float"),
        (b'{"a": 1' + b"0" * 400 + b".0}", "too large for a float"),
    ],
)
def test_json_wire_rejects(text: bytes, match: str) -> None:
    with pytest.raises(hbtrio.InvalidMessage, match=match):
        _jsonwire.loads(text)


# --------------------------------------------------------------------------- the wait budget


async def test_compute_202_then_result(node: Node) -> None:
    c, engine = node.client, node.engine
    pid = await spawn(c, "gate@1.0")
    await schedule(c, pid)
    await schedule(c, pid)

    r = await c.get(f"/{pid}/compute", params={"slot": 2, "wait": 0.05})
    assert r.status_code == 202
    assert r.headers["retry-after"] == "1"
    assert r.json() == {
        "process": pid,
        "status": "computing",
        "requested-slot": 2,
        "computed-slot": 0,
    }
    r = await c.get(f"/{pid}/now", params={"wait": 0.05})
    assert r.status_code == 202
    assert r.json()["requested-slot"] == 2
    # The waiters left, but the worker still works towards slot 2.
    assert engine.workers[pid].target == 2
    assert engine.workers[pid].waiting == 0

    node.gate.open.set()
    await wait_until(lambda: engine.workers[pid].slot == 2)
    computed = engine.stats().slots_computed
    r = await c.get(f"/{pid}/compute", params={"slot": 2, "wait": 0.05})
    assert r.status_code == 200
    assert r.json() == {"at-slot": 2, "count": 2}
    assert engine.stats().slots_computed == computed  # nothing computed again
    assert (await c.get(f"/{pid}/slot/current")).json()["computed-slot"] == 2


async def test_a_wait_longer_than_the_read_timeout_is_not_cut() -> None:
    """The read timeout bounds request bodies only: a compute request whose client sends
    nothing while it waits (longer than the read timeout) still gets its answer.
    (hypercorn's own ``read_timeout`` would hang up on it; the node does not use it.)"""
    async with open_node(read_timeout=0.2, body_timeout=0.2) as n:
        pid = await spawn(n.client, "gate@1.0")
        await schedule(n.client, pid)
        answer: list[httpx.Response] = []

        async def in_flight() -> None:
            answer.append(await n.client.get(f"/{pid}/compute", params={"slot": 1, "wait": 30}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            await wait_until(lambda: pid in n.engine.workers and n.engine.workers[pid].waiting)
            await trio.sleep(0.6)  # three read timeouts of silence from the client
            assert not answer
            n.gate.open.set()
        assert answer[0].status_code == 200
        assert answer[0].json() == {"at-slot": 1, "count": 1}


async def test_large_bodies_are_decoded_in_threads_at_most_two_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bodies of 64 KiB or more are decoded off the event loop, by at most
    `DECODE_THREADS` threads at once; smaller ones on the loop."""
    import threading

    from hbtrio._http import _negotiation as _http

    release = threading.Event()
    lock = threading.Lock()
    seen = {"inside": 0, "most": 0, "threads": set()}
    original = _http.decode_body

    def decode(body: bytes, media: str) -> hbtrio.Message:
        with lock:
            seen["inside"] += 1
            seen["most"] = max(seen["most"], seen["inside"])
            seen["threads"].add(threading.current_thread() is threading.main_thread())
        try:
            if len(body) >= _http.DECODE_IN_THREAD:
                release.wait(10)
            return original(body, media)
        finally:
            with lock:
                seen["inside"] -= 1

    monkeypatch.setattr(_http, "decode_body", decode)
    async with open_node(max_body=1 << 20) as n:
        pid = await spawn(n.client, "echo@1.0")  # a small body: on the loop
        assert seen["threads"] == {True}
        seen["threads"].clear()
        big = json.dumps({"blob": "x" * _http.DECODE_IN_THREAD}).encode()
        slots: list[int] = []

        async def post() -> None:
            r = await n.client.post(
                f"/{pid}/schedule", content=big, headers={"content-type": "application/json"}
            )
            slots.append(r.json()["slot"])

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(post)
            await wait_until(lambda: seen["inside"] == _http.DECODE_THREADS)
            # The loop is free meanwhile, and the other two bodies wait for a thread.
            assert (await n.client.get("/stats")).status_code == 200
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert seen["inside"] == _http.DECODE_THREADS
            release.set()
        assert sorted(slots) == [1, 2, 3, 4]
        assert seen["most"] == _http.DECODE_THREADS
        assert seen["threads"] == {False}
        state = (await n.client.get(f"/{pid}/now")).json()
        assert state["last"] == {"blob": "x" * _http.DECODE_IN_THREAD}


async def test_client_disconnect_releases_the_wait(node: Node) -> None:
    c, engine = node.client, node.engine
    pid = await spawn(c, "gate@1.0")
    await schedule(c, pid)
    with trio.CancelScope() as scope:

        async def give_up_once_waiting() -> None:
            await wait_until(lambda: pid in engine.workers and engine.workers[pid].waiting == 1)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(give_up_once_waiting)
            await c.get(f"/{pid}/compute", params={"slot": 1, "wait": 60})
    assert scope.cancelled_caught
    await wait_until(lambda: node.app.metrics.in_flight == 0)
    assert engine.workers[pid].waiting == 0
    assert node.app.metrics.requests["GET", "/{pid}/compute", 499] == 1


# --------------------------------------------------------------------------- blobs

OCTETS = "application/octet-stream"


def blob_id_of(data: bytes) -> str:
    return hbtrio._message.id_of_bytes(data)


async def test_blobs_round_trip(node: Node) -> None:
    """A blob is any bytes, larger than ``max_body`` (4096 here) too, stored once."""
    c = node.client
    data = bytes(range(256)) * 40  # 10 KiB
    r = await c.post("/blobs", content=data, headers={"content-type": OCTETS})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"id": blob_id_of(data)}
    r = await c.get(f"/blobs/{blob_id_of(data)}")
    assert r.status_code == 200
    assert r.headers["content-type"] == OCTETS
    assert r.headers["content-length"] == str(len(data))
    assert r.content == data
    # Again: the same ID, nothing new; without a Content-Type; in CBOR.
    r = await c.post("/blobs", content=data, headers={"accept": CBOR})
    assert r.status_code == 201 and _codec.decode(r.content) == {"id": blob_id_of(data)}
    assert (await c.post("/blobs", content=b"")).json() == {"id": blob_id_of(b"")}
    assert (await c.get(f"/blobs/{blob_id_of(b'')}")).content == b""
    for accept in (OCTETS, "*/*", "application/*", f"{OCTETS};q=0.5, {CBOR}"):
        r = await c.get(f"/blobs/{blob_id_of(data)}", headers={"accept": accept})
        assert r.status_code == 200 and r.content == data, accept
    assert node.engine.stats().blobs_stored == 3
    stats = (await c.get("/stats")).json()
    assert stats["blobs_stored"] == 3
    assert "hbtrio_blobs_stored_total 3" in (await c.get("/metrics")).text
    # A process can name it.
    pid = await spawn(c, "echo@1.0", image=blob_id_of(data))
    definition_ = await node.engine.store.get_process(pid)
    assert definition_ is not None and definition_["image"] == blob_id_of(data)


async def test_large_blobs_round_trip_in_parts() -> None:
    """A blob of several MiB: its chunks are joined and hashed off the loop, and the answer
    goes out in parts."""
    data = bytes(range(251)) * (5 * 1024 * 1024 // 251)
    async with open_node(max_body=4096) as n:
        r = await n.client.post("/blobs", content=data, headers={"content-type": OCTETS})
        assert r.status_code == 201, r.text
        blob_id = r.json()["id"]
        assert blob_id == blob_id_of(data)
        r = await n.client.get(f"/blobs/{blob_id}")
        assert r.status_code == 200 and r.content == data


async def test_blob_errors() -> None:
    async with open_node(max_body=4096, max_blob_bytes=8000) as n:
        c = n.client
        known = (await c.post("/blobs", content=b"known")).json()["id"]
        unknown = blob_id_of(b"never stored")
        body = assert_error(await c.get(f"/blobs/{unknown}"), 404, "blob-not-found")
        assert body["blob"] == unknown
        for bad in ("short", "x" * 44, "!" * 43):
            body = assert_error(await c.get(f"/blobs/{bad}"), 400, "invalid-message")
            assert "blob ID must be 43 base64url characters" in body["message"]
        body = assert_error(await c.post("/blobs", content=b"x" * 8001), 413, "body-too-large")
        assert body["max-blob-size"] == 8000
        assert "blobs are limited to 8000 bytes" in body["message"]
        body = assert_error(await c.post("/blobs", content=_streamed(9000)), 413, "body-too-large")
        assert body["max-blob-size"] == 8000
        assert (await c.post("/blobs", content=b"x" * 8000)).status_code == 201  # at the limit
        for content_type in ("application/json", CBOR, "text/plain"):
            r = await c.post("/blobs", content=b"{}", headers={"content-type": content_type})
            assert_error(r, 415, "unsupported-media-type")
        r = await c.get(f"/blobs/{known}", headers={"accept": "application/json"})
        assert_error(r, 406, "not-acceptable")
        assert_error(await c.get("/blobs"), 405, "method-not-allowed")
        r = await c.post(f"/blobs/{known}", content=b"x")
        assert_error(r, 405, "method-not-allowed")
        assert r.headers["allow"] == "GET"
        assert_error(await c.get(f"/blobs/{known}/more"), 404, "no-route")
        r = await c.request("GET", f"/blobs/{known}", content=b"body")
        assert_error(r, 400, "unexpected-body")
        # Messages keep their own, smaller limit.
        r = await c.post("/processes", json=definition(pad="x" * 5000))
        assert assert_error(r, 413, "body-too-large")["max-body"] == 4096
        assert (await c.get(f"/blobs/{known}")).content == b"known"


def test_make_app_checks_max_blob_bytes() -> None:
    with pytest.raises(ValueError, match="max_blob_bytes must be >= 1"):
        make_app(BrokenEngine(), max_blob_bytes=0)  # type: ignore[arg-type]


async def test_token_guards_blob_writes_not_reads() -> None:
    async with open_node(token="s3cret") as n:
        c = n.client
        assert_error(await c.post("/blobs", content=b"x"), 401, "unauthorized")
        auth = {"authorization": "Bearer s3cret"}
        r = await c.post("/blobs", content=b"x", headers=auth)
        assert r.status_code == 201
        assert (await c.get(f"/blobs/{r.json()['id']}")).content == b"x"


async def test_a_failed_blob_write_is_503_and_passes(tmp_path: Any) -> None:
    from hbtrio.testing import FaultyStore

    store = FaultyStore(hbtrio.SQLiteStore(tmp_path / "node.sqlite"))
    async with open_node(store=store) as n:
        with store.disk_full(methods="put_blob"):
            r = await n.client.post("/blobs", content=b"module")
            assert assert_error(r, 503, "store-error")["message"].count("full") == 1
        assert_error(await n.client.get(f"/blobs/{blob_id_of(b'module')}"), 404, "blob-not-found")
        assert (await n.client.post("/blobs", content=b"module")).status_code == 201


# --------------------------------------------------------------------------- errors


def _streamed(size: int) -> Any:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(size // 1000):
            yield b" " * 1000

    return chunks()


async def test_error_statuses(node: Node) -> None:
    c = node.client
    pid = await spawn(c)
    await schedule(c, pid, n=1)
    unknown = hbtrio.message_id({"never": "spawned"})
    json_h = {"content-type": "application/json"}

    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/processes", {"content": b"{", "headers": json_h}, 400, "invalid-message"),
        ("POST", "/processes", {"content": b"[1]", "headers": json_h}, 400, "invalid-message"),
        ("POST", "/processes", {"content": b""}, 400, "invalid-message"),
        ("POST", "/processes", {"json": {"device": "process@1.0"}}, 400, "invalid-message"),
        (
            "POST",
            "/processes",
            {"json": {"device": "x", "n": {"/bytes": "!"}}},
            400,
            "invalid-message",
        ),
        ("POST", "/processes", {"json": definition("nope@1.0")}, 400, "unknown-device"),
        (
            "POST",
            "/processes",
            {"content": b"\xff\x00", "headers": {"content-type": CBOR}},
            400,
            "invalid-message",
        ),
        (
            "POST",
            "/processes",
            {"content": _codec.encode([1, 2]), "headers": {"content-type": CBOR}},
            400,
            "invalid-message",
        ),
        (
            "POST",
            "/processes",
            {"content": b"{}", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported-media-type",
        ),
        ("POST", "/processes", {"content": b"x" * 5000, "headers": json_h}, 413, "body-too-large"),
        ("POST", "/processes", {"content": _streamed(6000)}, 413, "body-too-large"),
        ("GET", "/processes", {}, 405, "method-not-allowed"),
        ("DELETE", f"/{pid}/now", {}, 405, "method-not-allowed"),
        ("GET", "/nowhere", {}, 404, "no-route"),
        ("GET", f"/{pid}/now/", {}, 404, "no-route"),
        ("GET", f"/{unknown}/now", {}, 404, "process-not-found"),
        ("GET", f"/{unknown}/compute?slot=0", {}, 404, "process-not-found"),
        ("GET", f"/{unknown}/slot/current", {}, 404, "process-not-found"),
        ("POST", f"/{unknown}/schedule", {"json": {"n": 1}}, 404, "process-not-found"),
        ("GET", "/not-a-process-id/now", {}, 400, "invalid-message"),
        ("GET", f"/{'x' * 43}/now", {}, 404, "process-not-found"),  # any 43 base64url chars
        ("GET", f"/{pid}/compute?slot={'9' * 31}", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot={2**63}", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot=-1", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot=1.5", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot=x", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot=1&slot=2", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot=1&wait=0", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot=1&wait=nan", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/compute?slot=1&wait=1e9", {}, 400, "bad-parameter"),
        ("GET", f"/{pid}/now?wait=soon", {}, 400, "bad-parameter"),
    ]
    for method, path, options, status, code in cases:
        r = await c.request(method, path, **options)
        if status == 200:
            assert r.status_code == 200, r.text
            continue
        body = assert_error(r, status, code)
        if status == 405:
            assert r.headers["allow"] in ("GET", "POST")
        if status == 413:
            assert body["max-body"] == 4096
        if code == "process-not-found" and "x" * 43 not in path:
            assert body["process"] == unknown
        if "slot=9999" in path or f"slot={2**63}" in path:
            assert "slot too large" in body["message"]

    r = await c.get(f"/{pid}/compute", params={"slot": 99})
    body = assert_error(r, 422, "slot-not-scheduled")
    assert body["phase"] == "get-schedule"
    assert body["attempted-slot"] == 2
    assert body["requested-slot"] == 99
    assert body["latest-slot"] == 1
    assert "slot 99 of process" in body["message"]

    # The node is fine after all that.
    assert (await c.get(f"/{pid}/now")).json() == {"at-slot": 1, "count": 1}


async def test_compute_error_is_422_and_contained(node: Node) -> None:
    c = node.client
    bad, good = await spawn(c, name="bad"), await spawn(c, name="good")
    await schedule(c, bad, n=1)
    await schedule(c, bad, n="not a number")
    await schedule(c, good, n=5)

    r = await c.get(f"/{bad}/compute", params={"slot": 2})
    body = assert_error(r, 422, "compute-error")
    assert body["phase"] == "compute"
    assert body["attempted-slot"] == 2
    assert body["cause"].startswith("TypeError")
    assert_error(await c.get(f"/{bad}/now"), 422, "compute-error")
    # The failing process keeps its last good state; the other is untouched.
    assert (await c.get(f"/{bad}/compute", params={"slot": 1})).json()["count"] == 1
    assert (await c.get(f"/{good}/now")).json() == {"at-slot": 1, "count": 5}


class BrokenEngine:
    """An `EngineLike` whose compute raises what the test says (errors a real one rarely shows)."""

    def __init__(self) -> None:
        self.error: Exception = RuntimeError("boom")
        self.workers: dict[str, Any] = {}

    async def spawn(self, definition: hbtrio.Message) -> str:
        raise AssertionError("not used")

    async def schedule(self, pid: str, message: hbtrio.Message) -> int:
        raise AssertionError("not used")

    async def compute(self, pid: str, slot: int) -> hbtrio.Message:
        await trio.lowlevel.checkpoint()
        raise self.error

    async def now(self, pid: str) -> hbtrio.Message:
        return await self.compute(pid, 0)

    async def latest_slot(self, pid: str) -> int:
        return 0

    def stats(self) -> Any:
        raise RuntimeError("stats are broken too")


def _schedule_unreadable() -> hbtrio.ComputeError:
    error = hbtrio.ComputeError("schedule unreadable", phase="get-schedule", attempted_slot=1)
    error.__cause__ = hbtrio.StoreError("database is locked")
    return error


async def test_unexpected_errors_are_mapped_and_contained(caplog: pytest.LogCaptureFixture) -> None:
    engine = BrokenEngine()
    pid = hbtrio.message_id({"any": "process"})
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            partial(run_server, make_app(engine), port=0, shutdown_trigger=stop.wait)
        )
        async with httpx.AsyncClient(base_url=urls[0]) as c:
            for error, status, code in [
                (hbtrio.LeaderDied("lost it"), 503, "leader-died"),
                (hbtrio.EngineClosed(), 503, "shutting-down"),
                (hbtrio.StoreError("disk full"), 503, "store-error"),
                (hbtrio.InternalError("a bug"), 500, "engine-error"),
                (_schedule_unreadable(), 503, "store-error"),
                (RuntimeError("secret detail"), 500, "internal-error"),
                (
                    ExceptionGroup("wrapped", [hbtrio.ProcessNotFound(pid)]),
                    404,
                    "process-not-found",
                ),
            ]:
                engine.error = error
                r = await c.get(f"/{pid}/compute", params={"slot": 0})
                body = assert_error(r, status, code)
                assert "secret detail" not in body["message"]
            assert_error(await c.get("/stats"), 500, "internal-error")
            assert (await c.get("/workers")).json() == {"workers": {}}  # still serving
        stop.set()
    assert "secret detail" in caplog.text  # the traceback went to the log


async def test_store_failures_are_503_store_error_and_pass(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue 10.6): disk full or a locked database is not a bug (500), it passes."""
    from hbtrio.testing import FaultyStore

    store = FaultyStore(hbtrio.SQLiteStore(tmp_path / "node.sqlite"))
    async with open_node(store=store) as n:
        c = n.client
        pid = await spawn(c)
        for fault in (store.disk_full, store.locked):
            with fault(methods="append_assignments"):
                r = await c.post(f"/{pid}/schedule", json={"n": 1})
                body = assert_error(r, 503, "store-error")
                assert r.headers["retry-after"] == "1"
                assert "is full" in body["message"] or "locked" in body["message"]
        assert await schedule(c, pid, n=5) == 1  # once the fault is gone, nothing was lost
        assert (await c.get(f"/{pid}/now")).json() == {"at-slot": 1, "count": 5}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks  # a one-line warning each, no traceback


async def test_token_guards_writes() -> None:
    async with open_node(token="s3cret") as n:
        c = n.client
        r = await c.post("/processes", json=definition())
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        for header in ("Bearer wrong", "s3cret", "Basic s3cret", "Bearer", "Bearer s3cret2"):
            r = await c.post("/processes", json=definition(), headers={"authorization": header})
            assert_error(r, 401, "unauthorized")
        auth = {"authorization": "Bearer s3cret"}
        r = await c.post("/processes", json=definition(), headers=auth)
        pid = r.json()["process"]
        assert_error(await c.post(f"/{pid}/schedule", json={"n": 1}), 401, "unauthorized")
        assert (await c.post(f"/{pid}/schedule", json={"n": 1}, headers=auth)).json()["slot"] == 1
        assert (await c.get(f"/{pid}/now")).json()["count"] == 1  # reads stay open
        assert (await c.get("/stats")).status_code == 200


@pytest.mark.parametrize(
    ("host", "token", "ok"),
    [
        ("127.0.0.1", None, True),
        ("127.0.0.2", None, True),
        ("::1", None, True),
        ("localhost", None, True),
        ("0.0.0.0", None, False),
        ("::", None, False),
        ("192.168.1.10", None, False),
        ("example.org", None, False),
        ("0.0.0.0", "t0ken", True),
        ("0.0.0.0", "  ", False),
    ],
)
def test_check_bind(host: str, token: str | None, ok: bool) -> None:
    if ok:
        check_bind(host, token)
    else:
        with pytest.raises(ValueError, match="token"):
            check_bind(host, token)


async def test_serve_refuses_public_address_without_token(tmp_path: Path) -> None:
    db = tmp_path / "node.sqlite"
    with pytest.raises(ValueError, match="token"):
        await serve(db, host="0.0.0.0", port=0)
    assert not db.exists()


async def test_serve_reports_an_address_in_use(tmp_path: Path) -> None:
    db = tmp_path / "node.sqlite"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            await serve(db, port=taken.getsockname()[1])
    assert not db.exists()


async def test_serve_runs_a_node_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "node.sqlite"
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(serve, db, port=0, shutdown_trigger=stop.wait))
        async with httpx.AsyncClient(base_url=urls[0]) as c:
            pid = await spawn(c)
            await schedule(c, pid, n=4)
            assert (await c.get(f"/{pid}/now")).json()["count"] == 4
        stop.set()
    assert db.exists()
    async with hbtrio.open_engine(hbtrio.SQLiteStore(db)) as engine:
        assert (await engine.now(pid))["count"] == 4
        assert engine.stats().slots_computed == 0


# --------------------------------------------------------------------------- shutting down


async def test_shutdown_answers_503_and_cuts_waits_at_the_grace_period(node: Node) -> None:
    c, engine = node.client, node.engine
    pid = await spawn(c, "gate@1.0")
    await schedule(c, pid)
    answer: list[httpx.Response] = []

    async def in_flight() -> None:
        answer.append(await c.get(f"/{pid}/compute", params={"slot": 1, "wait": 60}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_flight)
        await wait_until(lambda: pid in engine.workers and engine.workers[pid].waiting == 1)
        node.app.begin_shutdown(grace=0.1)
        async with httpx.AsyncClient(base_url=node.url) as other:
            r = await other.get("/stats")
        body = assert_error(r, 503, "shutting-down")
        assert r.headers["retry-after"] == "1"
    body = assert_error(answer[0], 503, "shutting-down")
    assert body["requested-slot"] == 1
    assert body["computed-slot"] == 0
    assert engine.workers[pid].target == 1  # the worker still goes on


async def test_run_server_lets_in_flight_requests_finish() -> None:
    async with open_node(grace=30.0) as n:
        c, engine = n.client, n.engine
        pid = await spawn(c, "gate@1.0")
        await schedule(c, pid)
        answer: list[httpx.Response] = []

        async def in_flight() -> None:
            answer.append(await c.get(f"/{pid}/compute", params={"slot": 1}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            await wait_until(lambda: pid in engine.workers and engine.workers[pid].waiting == 1)
            n.stop.set()
            await wait_until(lambda: n.app.shutting_down)
            with pytest.raises(httpx.ConnectError):  # no longer accepting connections
                async with httpx.AsyncClient(base_url=n.url) as other:
                    await other.get("/stats")
            n.gate.open.set()
        assert answer[0].status_code == 200
        assert answer[0].json() == {"at-slot": 1, "count": 1}


async def poll(check: Callable[[], Awaitable[bool]], attempts: int = 500) -> None:
    """Poll a subprocess node's state with a bounded retry loop (about 10 s at most)."""
    for _ in range(attempts):
        if await check():
            return
        await trio.sleep(0.02)
    raise AssertionError("the node never got there")


async def _read_until(stream: trio.abc.ReceiveStream, needle: bytes, seen: bytearray) -> None:
    while needle not in seen:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"process output ended before {needle!r}: {bytes(seen)!r}")
        seen += chunk


SLOW_DEVICE = """
import trio

class Slow:
    def init(self, process):
        return {"count": 0}

    async def compute(self, state, assignment):
        await trio.sleep(0.3)  # simulated work
        return {**state, "count": state["count"] + 1}

class Hang:
    def init(self, process):
        return {"count": 0}

    async def compute(self, state, assignment):
        await trio.sleep_forever()  # a device that never answers
"""

#: Runs ``hbtrio serve`` with a descriptor limit of ``argv[1]`` (soft and hard).
LIMITED = (
    "import resource, sys; n = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "from hbtrio._cli import main; sys.exit(main(sys.argv[1:]))"
)


@asynccontextmanager
async def node_process(
    tmp_path: Path, *args: str, nofile: int | None = None, log_level: str = "warning"
) -> AsyncIterator[tuple[trio.Process, str, bytearray]]:
    """A real ``hbtrio serve`` subprocess on a free port; yields (process, url, stdout so far).

    Devices ``slow@1.0`` and ``hang@1.0`` (`SLOW_DEVICE`); its stderr goes to
    ``tmp_path / "stderr.txt"``; ``nofile`` limits its descriptors.
    """
    (tmp_path / "slowdev.py").write_text(SLOW_DEVICE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, str(tmp_path), env.get("PYTHONPATH", "")])
    env.pop("HBTRIO_TOKEN", None)
    start = ["-m", "hbtrio._cli"] if nofile is None else ["-c", LIMITED, str(nofile)]
    cmd = [
        sys.executable,
        *start,
        "serve",
        "--db",
        str(tmp_path / "node.sqlite"),
        "--port",
        "0",
        "--device",
        "slow@1.0=slowdev:Slow",
        "--device",
        "hang@1.0=slowdev:Hang",
        "--log-level",
        log_level,
        *args,
    ]
    with (tmp_path / "stderr.txt").open("ab") as err:
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        assert proc.stdout is not None
        seen = bytearray()
        with trio.fail_after(30):
            await _read_until(proc.stdout, b"press Ctrl-C", seen)
        url = re.search(rb"listening on (http://\S+)", seen)
        assert url is not None, seen
        yield proc, url.group(1).decode(), seen
    finally:
        await reap(proc)


async def test_sigterm_drains_in_flight_requests_and_keeps_everything(tmp_path: Path) -> None:
    async with node_process(tmp_path) as (proc, url, seen):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            slow = await spawn(c, "slow@1.0")
            counter = await spawn(c)
            for n in (1, 2, 3):
                await schedule(c, counter, n=n)
            assert (await c.get(f"/{counter}/now")).json()["count"] == 6
            await schedule(c, slow)
            await schedule(c, slow)
            answer: list[httpx.Response] = []

            async def in_flight() -> None:
                answer.append(await c.get(f"/{slow}/compute", params={"slot": 2}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)

                async def waiting() -> bool:
                    workers = (await c.get("/workers")).json()["workers"]
                    return bool(workers.get(slow, {}).get("waiting") == 1)

                await poll(waiting)
                proc.send_signal(signal.SIGTERM)
            assert answer[0].status_code == 200, answer[0].text
            assert answer[0].json() == {"at-slot": 2, "count": 2}
        assert proc.stdout is not None
        with trio.fail_after(20):
            assert await proc.wait() == 0
            while chunk := await proc.stdout.receive_some():
                seen += chunk
        assert b"stopped" in seen

    # A new node on the same file has everything: nothing scheduled or computed is lost.
    async with node_process(tmp_path) as (proc, url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            assert (await c.get(f"/{slow}/compute", params={"slot": 2})).json()["count"] == 2
            assert (await c.get(f"/{counter}/slot/current")).json()["slot"] == 3
            assert (await c.get(f"/{counter}/now")).json() == {"at-slot": 3, "count": 6}
            assert (await c.get("/stats")).json()["slots_computed"] == 0
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0


async def test_serve_slot_timeout_makes_a_hung_device_a_422(tmp_path: Path) -> None:
    """``--slot-timeout``: a hung async device fails its slot (422), not 202 for ever."""
    async with node_process(tmp_path, "--slot-timeout", "0.5") as (proc, url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            hung = await spawn(c, "hang@1.0")
            await schedule(c, hung)
            r = await c.get(f"/{hung}/compute", params={"slot": 1, "wait": 20})
            body = assert_error(r, 422, "compute-error")
            assert body["attempted-slot"] == 1
            assert body["cause"].startswith("TooSlowError")
            counter = await spawn(c)  # the node is fine
            await schedule(c, counter, n=2)
            assert (await c.get(f"/{counter}/now")).json() == {"at-slot": 1, "count": 2}
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0


async def test_serve_shutdown_grace_bounds_the_exit_while_a_worker_is_stuck(
    tmp_path: Path,
) -> None:
    """``--shutdown-grace``: SIGTERM with a worker stuck in its device exits within the grace
    periods (``--grace`` for requests, then ``--shutdown-grace`` for workers), not the
    default 30 s; what was scheduled is kept."""
    args = ("--grace", "0.5", "--shutdown-grace", "1")
    async with node_process(tmp_path, *args) as (proc, url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            hung = await spawn(c, "hang@1.0")
            await schedule(c, hung)
            r = await c.get(f"/{hung}/compute", params={"slot": 1, "wait": 0.2})
            assert r.status_code == 202  # the worker is stuck in the device
            assert (await c.get("/workers")).json()["workers"][hung]["target"] == 1
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):  # well under the 30 s default shutdown grace
            assert await proc.wait() == 0
    async with hbtrio.open_engine(hbtrio.SQLiteStore(tmp_path / "node.sqlite")) as engine:
        assert await engine.latest_slot(hung) == 1


# --------------------------------------------------------------------------- curl


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
async def test_with_curl(node: Node, tmp_path: Path) -> None:
    async def curl(*args: str) -> bytes:
        done = await trio.run_process(
            ["curl", "-sS", "--fail-with-body", *args], capture_stdout=True, capture_stderr=True
        )
        return bytes(done.stdout)

    json_h = "Content-Type: application/json"
    out = await curl(
        "-X",
        "POST",
        f"{node.url}/processes",
        "-H",
        json_h,
        "--data-binary",
        '{"device": "process@1.0", "execution-device": "echo@1.0"}',
    )
    pid = json.loads(out)["process"]
    out = await curl(
        "-X",
        "POST",
        f"{node.url}/{pid}/schedule",
        "-H",
        json_h,
        "--data-binary",
        '{"key": {"/bytes": "aGVsbG8="}}',
    )
    assert json.loads(out) == {"process": pid, "slot": 1}
    out = await curl("-H", "Accept: application/cbor", f"{node.url}/{pid}/compute?slot=1")
    assert _codec.decode(out) == {"at-slot": 1, "last": {"key": b"hello"}}
    out = await curl(f"{node.url}/metrics")
    assert b"hbtrio_http_requests_total" in out
    with pytest.raises(subprocess.CalledProcessError) as info:
        await curl(f"{node.url}/{pid}/compute?slot=7")
    assert json.loads(info.value.stdout)["error"] == "slot-not-scheduled"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
async def test_blobs_with_curl(node: Node, tmp_path: Path) -> None:
    """The blob commands of docs/http.md, as written there."""
    module = tmp_path / "module.wasm"
    module.write_bytes(b"\x00asm\x01\x00\x00\x00" + bytes(range(256)) * 64)

    async def curl(*args: str) -> bytes:
        done = await trio.run_process(
            ["curl", "-sS", "--fail-with-body", *args],
            capture_stdout=True,
            capture_stderr=True,
            cwd=tmp_path,
        )
        return bytes(done.stdout)

    out = await curl(
        "-X",
        "POST",
        f"{node.url}/blobs",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        "@module.wasm",
    )
    blob_id = json.loads(out)["id"]
    assert blob_id == blob_id_of(module.read_bytes())
    await curl("-o", "copy.wasm", f"{node.url}/blobs/{blob_id}")
    assert (tmp_path / "copy.wasm").read_bytes() == module.read_bytes()
    with pytest.raises(subprocess.CalledProcessError) as info:
        await curl(f"{node.url}/blobs/{blob_id_of(b'nothing')}")
    assert json.loads(info.value.stdout)["error"] == "blob-not-found"


async def test_node_survives_its_http_server_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    """hypercorn can let a protocol error escape a connection (two sends racing when a
    client pipelines garbage), which ends its whole server: the node serves on."""
    from hypercorn.trio.tcp_server import TCPServer

    original = TCPServer.protocol_send
    failures = {"left": 1}

    async def racing_send(self: TCPServer, event: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise trio.BusyResourceError("another task is currently sending data on this stream")
        await original(self, event)

    async with open_node() as n:
        monkeypatch.setattr(TCPServer, "protocol_send", racing_send)
        with pytest.raises(httpx.TransportError):
            async with httpx.AsyncClient(base_url=n.url, timeout=5) as first:
                await first.get("/stats")  # its server dies answering it
        assert failures["left"] == 0
        # The same address answers again, and the engine never noticed.
        async with httpx.AsyncClient(base_url=n.url, timeout=5) as again:
            for _ in range(50):  # the server is back within a scheduler pass or two
                try:
                    answer = await again.get("/stats")
                    break
                except httpx.TransportError:
                    await trio.testing.wait_all_tasks_blocked(0.001)
            assert answer.status_code == 200
