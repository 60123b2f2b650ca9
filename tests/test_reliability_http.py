"""Nothing a client sends can take the node down (issue 15): slow and stalled connections,
more connections than the bound or than descriptors, a connection whose protocol handling
fails, a client that does not read its answer.

Every test runs a real server on a loopback port (in process, or ``hbtrio serve`` in a
subprocess with a low descriptor limit) and talks to it over real sockets. The slow
clients' pace is part of what is tested; everything else waits on real state (the app's
metrics, the engine's workers, the server closing a socket), bounded by timeouts.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from test_http import (
    assert_error,
    host_port,
    node_process,
    open_node,
    parse_answer,
    read_until_closed,
    schedule,
    spawn,
    wait_until,
)

#: What a slow client sends before it stalls, by kind.
STALLS = {
    # Headers that never end: hypercorn's keep-alive timer is all that bounds them.
    "head": b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    # A GET announcing a body it never sends (no token needed).
    "get-body": b"GET /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    # A POST whose body stops after a byte.
    "post-body": (
        b"POST /processes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    ),
}


async def stall(url: str, kind: str) -> trio.SocketStream:
    """A connection that sends the start of a request of ``kind`` and then nothing."""
    stream = await trio.open_tcp_stream(*host_port(url))
    try:
        await stream.send_all(STALLS[kind])
    except trio.BrokenResourceError:  # refused at once: still a connection to close later
        pass
    return stream


@asynccontextmanager
async def stalled(url: str, kinds: dict[str, int]) -> AsyncIterator[list[trio.SocketStream]]:
    """Open ``kinds[kind]`` stalled connections of each kind, one after the other; close
    them all on exit."""
    streams: list[trio.SocketStream] = []
    try:
        with trio.fail_after(60):
            for kind, count in kinds.items():
                for _ in range(count):
                    stream = await stall(url, kind)
                    streams.append(stream)
        yield streams
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def normal_client_works(url: str, requests: int = 5) -> None:
    """A normal client's spawn, schedule and compute all answer within its timeout."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        with trio.fail_after(30):
            pid = await spawn(client, name="normal")
            for n in range(1, requests + 1):
                assert await schedule(client, pid, n=n) >= 1
            r = await client.get(f"/{pid}/now")
            assert r.status_code == 200 and r.json()["count"] >= requests


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` with its labels) in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return 0.0


# --------------------------------------------------------------------------- bodies


async def test_a_stalled_post_body_is_408_after_the_read_timeout() -> None:
    async with open_node(read_timeout=0.3, body_timeout=60) as node:
        stream = await stall(node.url, "post-body")
        async with stream:
            with trio.fail_after(10):
                answer = parse_answer(*await read_until_closed(stream))
        body = answer.error(408, "request-timeout")
        assert body["read-timeout"] == 0.3
        assert "nothing arrived for 0.3 s" in body["message"]
        assert answer.headers["connection"] == "close" and answer.closed
        await wait_until(lambda: node.app.metrics.requests["POST", "/processes", 408] == 1)
        assert (await node.client.get("/stats")).status_code == 200


async def test_a_trickling_post_body_is_cut_off_at_the_body_timeout() -> None:
    """Regression (issue 15.4): a body arriving a byte at a time, each within the read
    timeout, held its request for as long as the client liked. The whole body has a
    deadline."""
    async with open_node(read_timeout=5, body_timeout=0.5) as node:
        stream = await stall(node.url, "post-body")
        async with stream:
            received = bytearray()
            with trio.fail_after(10):
                try:
                    while not received.endswith(b"}"):  # the end of the JSON error body
                        await stream.send_all(b" ")  # one byte every 20 ms, for ever
                        with trio.move_on_after(0.02):
                            received += await stream.receive_some()
                except trio.BrokenResourceError:  # the node hung up
                    pass
        body = parse_answer(bytes(received)).error(408, "request-timeout")
        assert body["body-timeout"] == 0.5
        await wait_until(lambda: node.app.metrics.requests["POST", "/processes", 408] == 1)
        assert (await node.client.get("/stats")).status_code == 200


async def test_a_client_stalled_in_its_headers_is_closed_after_the_keep_alive_timeout() -> None:
    async with open_node() as node:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(_serve_app, node.app, {"keep_alive": 0.3}, stop)
            stream = await stall(urls[0], "head")
            async with stream:
                with trio.fail_after(5):
                    received, closed = await read_until_closed(stream)
            assert closed and received == b""  # hung up without an answer
            stop.set()


async def _serve_app(
    app: Any,
    options: dict[str, Any],
    stop: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A second server (with other limits) for ``app``, until ``stop``."""
    from hbtrio.http import run_server

    await run_server(app, port=0, shutdown_trigger=stop.wait, task_status=task_status, **options)


# --------------------------------------------------------------------------- the connection bound


async def test_a_normal_client_is_answered_while_more_slow_connections_than_the_bound_stall() -> (
    None
):
    async with open_node(read_timeout=60, body_timeout=60) as node:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            options = {"max_connections": 16, "keep_alive": 60}
            (url,) = await nursery.start(_serve_app, node.app, options, stop)
            kinds = {"head": 30, "get-body": 10, "post-body": 10}
            async with stalled(url, kinds):
                counts = node.app.metrics.connections
                await wait_until(lambda: counts.accepted == 50)
                assert counts.open <= 16
                assert counts.closed["evicted"] >= 20
                await normal_client_works(url)
                assert counts.open <= 16
            stop.set()


async def test_over_the_bound_with_every_connection_busy_a_new_one_gets_503() -> None:
    async with open_node(read_timeout=60, body_timeout=60) as node:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(_serve_app, node.app, {"max_connections": 2}, stop)
            async with stalled(url, {"post-body": 2}):  # both busy reading a body
                await wait_until(lambda: node.app.metrics.in_flight == 2)
                stream = await trio.open_tcp_stream(*host_port(url))
                async with stream:
                    await stream.send_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
                    with trio.fail_after(5):
                        answer = parse_answer(*await read_until_closed(stream))
                answer.error(503, "too-many-connections")
                assert answer.headers["retry-after"] == "1" and answer.closed
                assert node.app.metrics.connections.closed["refused"] == 1
            # The stalled clients left: room again.
            await wait_until(lambda: node.app.metrics.connections.open == 0)
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                assert (await client.get("/stats")).status_code == 200
            stop.set()


async def test_more_slow_connections_than_descriptors_leave_the_node_answering(
    tmp_path: Path,
) -> None:
    """Regression (issue 15.4): GETs announcing bodies they never send, more of them than
    the node has descriptors, made every other client time out. A real ``hbtrio serve``
    with a descriptor limit of 256 and its default limits."""
    async with node_process(tmp_path, nofile=256) as (proc, url, _):
        kinds = {"get-body": 300, "head": 300, "post-body": 20}
        async with stalled(url, kinds):
            await normal_client_works(url)
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                text = (await client.get("/metrics")).text
            assert metric(text, "hbtrio_http_connections") <= 256
            assert metric(text, 'hbtrio_http_connections_closed_total{reason="evicted"}') > 0
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0


# --------------------------------------------------------------------------- descriptors


async def test_emfile_is_logged_once_and_the_node_recovers(tmp_path: Path) -> None:
    """Regression (issue 15.4): with its descriptors used up, the node logged a traceback
    for every failed accept (ten a second). Now one warning, idle connections are closed
    to make room, and the node serves on."""
    stderr = tmp_path / "stderr.txt"
    args = ("--keep-alive", "60", "--max-connections", "1000")  # the limit comes first
    async with node_process(tmp_path, *args, nofile=64, log_level="info") as (proc, url, _):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            for _ in range(2):  # two floods: still one warning
                async with stalled(url, {"head": 100}):
                    text = (await client.get("/metrics")).text
                    assert metric(text, 'hbtrio_http_accept_errors_total{errno="EMFILE"}') > 0
                    await normal_client_works(url, requests=2)
            await normal_client_works(url)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    log = stderr.read_text()
    assert len(re.findall("cannot accept connections: accept.. failed with EMFILE", log)) == 1, log
    assert "accepting connections again" in log
    assert "Traceback" not in log, log


# --------------------------------------------------------------------------- failures


async def test_a_connection_whose_protocol_handling_fails_drops_no_request_elsewhere(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue 15.7): an exception escaping one connection's protocol code (a
    race between two sends on one socket, say) ended hypercorn's whole server, dropping
    the in-flight requests of every other connection. Now it closes that connection only."""
    from hypercorn.trio.tcp_server import TCPServer

    original = TCPServer.protocol_send
    bad: dict[str, int] = {}

    async def failing_send(self: TCPServer, event: Any) -> None:
        if self.stream.socket.getpeername()[1] == bad.get("port"):
            raise trio.BusyResourceError("another task is currently sending data on this stream")
        await original(self, event)

    async with open_node() as node:
        pid = await spawn(node.client, "gate@1.0")
        await schedule(node.client, pid)
        monkeypatch.setattr(TCPServer, "protocol_send", failing_send)
        answers: list[httpx.Response] = []

        async def in_flight() -> None:
            async with httpx.AsyncClient(base_url=node.url, timeout=30) as own:
                answers.append(await own.get(f"/{pid}/compute", params={"slot": 1, "wait": 30}))

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # three connections, each with a request in flight
                nursery.start_soon(in_flight)
            workers = node.engine.workers
            await wait_until(lambda: pid in workers and workers[pid].waiting == 3)
            stream = await trio.open_tcp_stream(*host_port(node.url))
            async with stream:
                bad["port"] = stream.socket.getsockname()[1]
                await stream.send_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
                with trio.fail_after(5):
                    received, closed = await read_until_closed(stream)
            assert closed and received == b""
            assert node.app.metrics.connections.closed["failed"] == 1
            assert node.engine.workers[pid].waiting == 3  # nobody else noticed
            node.gate.open.set()
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert all(r.json() == {"at-slot": 1, "count": 1} for r in answers)
        assert (await node.client.get("/stats")).status_code == 200
    assert "failed and was closed; the others carry on" in caplog.text


class Big:
    """``big@1.0``: a state of 24 MiB, more than the socket buffers between two processes."""

    def init(self, process: Any) -> dict[str, Any]:
        return {"blob": b""}

    def compute(self, state: Any, assignment: Any) -> dict[str, Any]:
        return {"blob": b"\x00" * (24 << 20)}


async def test_a_client_that_does_not_read_its_answer_is_dropped_after_the_write_timeout() -> None:
    async with open_node(devices={"big@1.0": Big()}) as node:
        pid = await spawn(node.client, "big@1.0")
        await schedule(node.client, pid)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(_serve_app, node.app, {"write_timeout": 0.5}, stop)
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that never reads
            await sock.connect(host_port(url))
            stream = trio.SocketStream(sock)
            async with stream:
                await stream.send_all(
                    f"GET /{pid}/compute?slot=1 HTTP/1.1\r\nHost: x\r\n"
                    "Accept: application/cbor\r\n\r\n".encode()
                )
                counts = node.app.metrics.connections
                await wait_until(lambda: counts.closed["write-timeout"] == 1, timeout=20)
                await wait_until(lambda: node.app.metrics.in_flight == 0)
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                assert_error(await client.get("/nowhere"), 404, "no-route")
            stop.set()
