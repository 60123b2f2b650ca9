"""The node's connections: hypercorn's HTTP protocol code under an accept loop of our own.

`run_server` (in ``_serve``) hands every accepted connection to hypercorn's
per-connection server (``hypercorn.trio.tcp_server.TCPServer``, which speaks
HTTP/1.1 through h11 and HTTP/2 through h2), but it does not use
``hypercorn.trio.serve``, whose accept loop has none of the limits a node
needs:

* **No connection bound.** Every connection costs a descriptor, and nothing
  stops a client from opening more than the process may have. `Connections`
  holds at most ``max_connections``. When one more arrives, the connection
  that has been idle longest (no request in progress: waiting between two
  requests, or still sending its first request's headers) is closed to make
  room; if every connection is in the middle of a request, the new one is
  answered 503 ``too-many-connections`` and closed.
* **Descriptors running out.** ``trio.serve_listeners`` logs a traceback
  every 100 ms while ``accept()`` fails with ``EMFILE``. Here a failing
  ``accept()`` is logged once (one warning, then one line when accepting
  works again, at most one warning a minute), idle connections are closed to
  free descriptors, and the loop waits for a connection to close before it
  tries again.
* **One connection's failure ends the server.** hypercorn runs every
  connection in one nursery, so an exception escaping one connection's
  protocol code (a race between two sends on one socket when a client
  pipelines garbage is one) ends every connection, in-flight requests
  included. Here each connection runs in its own task that catches, logs and
  closes only that connection.
* **Writes without a deadline.** A client that does not read its answer
  blocks hypercorn's (shielded) send for ever. Here a send still under way
  after ``write_timeout`` seconds (checked every second) closes its connection.
  Each send only stamps the time it started, and one watcher task for all
  connections compares the stamps with the clock: a deadline per send would
  cost a cancel scope per write.
* **Protocol errors with empty bodies.** hypercorn answers a request h11
  cannot parse with its own empty 400 (or 431, 501, ...); here the answer
  carries the node's JSON error body.

hypercorn's own timers still apply: ``keep_alive_timeout`` closes a
connection that has no request in progress for that long, which also bounds
how long a client may take to send a request's headers. Request bodies are
bounded by the app (``HttpApp``'s read and body timeouts), because
hypercorn's ``read_timeout`` bounds every read of a connection, including
the silence while a compute request waits for its result.

This relies on hypercorn internals (``TCPServer``, ``WorkerContext``,
``H11Protocol._send_error_response``), checked against hypercorn 0.17 and
0.18 (``pyproject.toml`` pins that range). Everything here runs on the one
Trio loop of the app; none of it is thread-safe.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from ._errors import json_error

if TYPE_CHECKING:
    from ._metrics import ConnectionCounts

__all__ = ["Connections"]

logger: Final = logging.getLogger("hbtrio.http")

#: accept() errors that mean the process or the system is out of something.
_CAPACITY: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Refusals (503 too-many-connections) under way at once; beyond that, a plain close.
_MAX_REFUSING: Final = 32
#: Seconds a refused client gets to read its 503 before the socket is closed.
_REFUSE_LINGER: Final = 1.0
#: Seconds between two warnings about accept() failing.
_WARN_EVERY: Final = 60.0

#: Codes of the statuses hypercorn's protocol code answers with.
_PROTOCOL_CODES: Final = {
    400: "bad-request",
    408: "request-timeout",
    413: "body-too-large",
    414: "uri-too-long",
    431: "headers-too-large",
    501: "not-implemented",
    505: "http-version-not-supported",
}


def _refusal(max_connections: int) -> bytes:
    body = json_error(
        503,
        "too-many-connections",
        f"the node holds its limit of {max_connections} connections, all with requests "
        "in progress; retry",
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "cache-control: no-store\r\n"
        "retry-after: 1\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _JsonErrorsH11(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, answering protocol errors with a JSON body."""

    async def _send_error_response(self, status_code: int) -> None:
        """Answer a request h11 could not parse, unless the app's answer started first.

        The whole answer is serialised before anything is sent, so the app's
        task cannot start its own answer in between (hypercorn's version awaits
        between the head and the end of its answer).
        """
        # Called from the handler of h11's RemoteProtocolError: that is the exception here.
        error = sys.exception()
        detail = str(error)[:300] if isinstance(error, h11.RemoteProtocolError) else ""
        code = _PROTOCOL_CODES.get(status_code, "protocol-error")
        message = f"malformed HTTP request: {detail}" if detail else "malformed HTTP request"
        if status_code == 431:
            limit = self.config.h11_max_incomplete_size
            message = f"the request's head is larger than {limit} bytes"
        body = json_error(status_code, code, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        connection = self.connection
        try:
            data = connection.send(h11.Response(status_code=status_code, headers=headers))
        except h11.LocalProtocolError:  # the app's answer has started: it stands
            return
        data += connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage())
        await self.send(RawData(data=data))


@attrs.define(eq=False)
class _Connection:
    """One accepted connection, as the accept loop sees it."""

    scope: trio.CancelScope
    peer: str
    stream: _TimedStream
    #: No request in progress (hypercorn's notion, the one its keep-alive timer uses).
    idle: bool = True
    #: Trio time since which it has been idle.
    idle_since: float = 0.0


class _TCPServer(TCPServer):
    """hypercorn's per-connection server, reporting idleness and with JSON protocol errors."""

    def __init__(self, connection: _Connection, *args: Any) -> None:
        super().__init__(*args)
        self._hbtrio_connection = connection

    # hypercorn builds its protocol inside ``run``; this is where its HTTP/1.1 half
    # gets the JSON error answers (HTTP/2 signals protocol errors with frames).
    @property
    def protocol(self) -> Any:
        return self._hbtrio_protocol

    @protocol.setter
    def protocol(self, wrapper: Any) -> None:
        if type(getattr(wrapper, "protocol", None)) is H11Protocol:
            wrapper.protocol.__class__ = _JsonErrorsH11
        self._hbtrio_protocol = wrapper

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):
            connection = self._hbtrio_connection
            if event.idle and not connection.idle:
                connection.idle_since = trio.current_time()
            connection.idle = event.idle
        await super().protocol_send(event)


class _TimedStream(trio.abc.HalfCloseableStream):
    """A socket stream whose sends `Connections` can time out, and whose ``send_eof``
    waits for a send in progress.

    ``sending_since`` is the Trio time the send in progress started (``None``
    when there is none); `Connections` closes the socket of a send older than
    its write timeout, and hypercorn takes the resulting error for a client that
    went away. hypercorn serialises its sends but not its ``send_eof``, and a ``send_eof``
    racing a send raised `trio.BusyResourceError` out of its connection code (a
    client pipelining garbage after an HTTP/1.0 request made that happen); here
    ``send_eof`` waits for the send, and a send after ``send_eof`` is a broken
    stream. Receiving is left to one task, as hypercorn does.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.sending_since: float | None = None
        self.timed_out = False
        self._closing = False
        self._sent: trio.Event | None = None  # set when the send in progress ends

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise trio.BrokenResourceError("the connection is being closed")
        self.sending_since = trio.current_time()
        try:
            await self._stream.send_all(data)
        except trio.ClosedResourceError:
            if self.timed_out:
                raise trio.BrokenResourceError("the client did not take its answer") from None
            raise
        finally:
            self.sending_since = None
            if self._sent is not None:
                self._sent.set()
                self._sent = None

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        self._closing = True
        while self.sending_since is not None:
            self._sent = self._sent or trio.Event()
            await self._sent.wait()
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def time_out(self) -> None:
        """Close the socket under the send in progress (it raises at once)."""
        self.timed_out = True
        self._stream.socket.close()


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


class Connections:
    """The accept loop and the open connections of one server.

    ``accept_loop`` runs until cancelled; connection tasks run in the nursery
    it is given, so that cancelling the accept loop (shutdown) leaves them to
    finish. `begin_shutdown` then tells hypercorn's code to close each
    connection once it has no request in progress. Everything must be called
    from the app's Trio loop.
    """

    def __init__(
        self,
        app: Callable[[Any, Any, Any], Awaitable[None]],
        config: Config,
        counts: ConnectionCounts,
        *,
        max_connections: int,
        write_timeout: float,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        if not write_timeout > 0:
            raise ValueError(f"write_timeout must be > 0, not {write_timeout}")
        self._app = ASGIWrapper(app)
        self._config = config
        self._context = WorkerContext(None)
        self._counts = counts
        self._max = max_connections
        self._write_timeout = write_timeout
        self._refusal = _refusal(max_connections)
        #: Open connections, oldest first (evicted ones are removed at once).
        self._open: dict[int, _Connection] = {}
        self._closed = trio.Event()  # set, and replaced, whenever a connection ends
        self._refusing = 0
        #: The failing accepts of the current run of them, and whether it was logged.
        self._failing_since: float | None = None
        self._failed_accepts = 0
        self._logged = False
        self._last_warning = -math.inf
        self._unlogged = 0  # failed accepts of runs that were not logged
        self._failure_types: set[type[BaseException]] = set()

    @property
    def open(self) -> int:
        """How many connections are open (not counting evicted ones still closing)."""
        return len(self._open)

    async def begin_shutdown(self) -> None:
        """Let hypercorn close every connection once its request (if any) is answered."""
        await self._context.terminated.set()

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> NoReturn:
        """Accept connections for ever, serving each in a task of ``nursery``.

        The write timeout is watched while this runs (not once it is cancelled
        for shutdown: the drain has a deadline of its own).
        """
        async with trio.open_nursery() as watcher:
            watcher.start_soon(self._watch_writes)
            await self._accept_for_ever(listener, nursery)

    async def _accept_for_ever(
        self, listener: trio.SocketListener, nursery: trio.Nursery
    ) -> NoReturn:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                await self._accept_failed(exc)
                continue
            if self._failing_since is not None:
                self._accepting_again()
            self._counts.accepted += 1
            if len(self._open) >= self._max and not self._evict_idle():
                self._counts.closed["refused"] += 1
                nursery.start_soon(self._refuse, stream)
                continue
            now = trio.current_time()
            connection = _Connection(
                trio.CancelScope(), _peer(stream), _TimedStream(stream), True, now
            )
            self._open[id(connection)] = connection
            self._counts.open = len(self._open)
            nursery.start_soon(self._serve, stream, connection)

    def _accepting_again(self) -> None:
        assert self._failing_since is not None
        if self._logged:
            logger.info(
                "accepting connections again (%d accepts failed in %.1f s)",
                self._failed_accepts,
                trio.current_time() - self._failing_since,
            )
        else:
            self._unlogged += self._failed_accepts
        self._failing_since = None
        self._failed_accepts = 0

    def _evict_idle(self) -> bool:
        """Close the connection idle the longest, if any is idle; whether one was."""
        idle = [c for c in self._open.values() if c.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since)
        del self._open[id(victim)]
        self._counts.open = len(self._open)
        self._counts.closed["evicted"] += 1
        victim.scope.cancel()
        return True

    async def _accept_failed(self, exc: OSError) -> None:
        """Log (at most once a minute), make room if it is a lack of descriptors, wait a bit.

        A run of failures is logged with one warning when it starts and one line
        when accepting works again; runs that start within a minute of the last
        warning are only counted (``accept_errors`` in the metrics), and the next
        warning says how many accepts failed unlogged.
        """
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._counts.accept_errors[name] += 1
        now = trio.current_time()
        if self._failing_since is None:
            self._failing_since = now
            self._logged = now - self._last_warning >= _WARN_EVERY
            if self._logged:
                self._last_warning = now
                earlier = f"; {self._unlogged} failed unlogged before" if self._unlogged else ""
                self._unlogged = 0
                logger.warning(
                    "cannot accept connections: accept() failed with %s (%s) with %d "
                    "connections open; closing idle ones and retrying as connections close "
                    "(logged at most once a minute%s)",
                    name,
                    os.strerror(exc.errno) if exc.errno else exc,
                    len(self._open),
                    earlier,
                )
        self._failed_accepts += 1
        if exc.errno in _CAPACITY:
            self._evict_idle()  # its descriptor is free once its task has ended
        with trio.move_on_after(0.1):  # try again when a connection has closed, or soon
            await self._closed.wait()

    async def _serve(self, stream: trio.SocketStream, connection: _Connection) -> None:
        try:
            with connection.scope:
                server = _TCPServer(
                    connection,
                    self._app,
                    self._config,
                    self._context,
                    ConnectionState({}),
                    connection.stream,
                )
                await server.run()
        except* Exception as group:
            self._connection_failed(connection, group)
        finally:
            if self._open.pop(id(connection), None) is not None:
                self._counts.open = len(self._open)
            self._closed.set()
            self._closed = trio.Event()
            await trio.aclose_forcefully(stream)

    async def _watch_writes(self) -> NoReturn:
        """Close every connection whose send has taken longer than the write timeout.

        Checks every second (a tenth of the timeout if that is shorter), so a
        send is cut between ``write_timeout`` and that much later.
        """
        period = min(1.0, self._write_timeout / 10)
        while True:
            await trio.sleep(period)
            oldest = trio.current_time() - self._write_timeout
            for connection in list(self._open.values()):
                since = connection.stream.sending_since
                if since is not None and since <= oldest and not connection.stream.timed_out:
                    self._counts.closed["write-timeout"] += 1
                    connection.stream.time_out()

    def _connection_failed(self, connection: _Connection, group: BaseExceptionGroup[Any]) -> None:
        """Log an exception that escaped hypercorn's code for one connection (then closed)."""
        self._counts.closed["failed"] += 1
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        kind = type(leaf)
        if kind in self._failure_types:  # a traceback the first time, a line after that
            logger.warning(
                "a connection from %s failed (%s: %s) and was closed; the others carry on",
                connection.peer,
                kind.__name__,
                leaf,
            )
        else:
            self._failure_types.add(kind)
            logger.error(
                "a connection from %s failed and was closed; the others carry on",
                connection.peer,
                exc_info=leaf,
            )

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer 503 too-many-connections and close, within a second."""
        try:
            if self._refusing >= _MAX_REFUSING:
                return
            self._refusing += 1
            try:
                with trio.move_on_after(_REFUSE_LINGER):
                    await stream.send_all(self._refusal)
                    await stream.send_eof()
                    # Read what the client sent until it closes: closing a socket with
                    # unread data would reset it, and the client could miss the answer.
                    while await stream.receive_some(65536):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._refusing -= 1
        finally:
            await trio.aclose_forcefully(stream)
