"""The ASGI app: `HttpApp` over an engine, and `make_app` to build one.

Theory of operation
-------------------
Every request runs in its own task (hypercorn's). `HttpApp.__call__` decides
the answer in a fixed order, so that nothing is read or done for a request
that is refused anyway: shutting down (503), route (404, 405), a body on a
GET (400), token (401), ``Accept`` (406), ``Content-Type`` (415),
``Content-Length`` (413), body (400, 413, and 408 past the read or body
timeout), and only then the engine call. A request refused before its body
was read gets ``Connection: close``. Large bodies are decoded in worker
threads (``_negotiation``). A blob (``POST /blobs``) is bounded by
``max_blob_bytes`` instead of ``max_body``, is not decoded (its chunks are
joined, a large one's in a worker thread) and goes to `Engine.put_blob`,
which hashes a large one in a thread too. Engine errors are translated into
statuses once, in `error_response` (``_errors``).

A compute request waits inside a cancel scope whose deadline is the request's
wait budget. When the budget runs out, only that wait is cancelled (engine
waits are cancellation-safe): the worker goes on computing and the client gets
202 with the slot reached so far. The same scope is cancelled when the client
disconnects. `HttpApp.begin_shutdown` marks the app as shutting down (new
requests get 503) and pulls every pending wait's deadline in to the end of the
grace period; a wait still pending then gets 503 with the slot reached.
`run_server` (``_serve``) calls it when the shutdown trigger fires, once it has
stopped accepting connections; open ones then finish. Connections are
accepted, bounded and contained by ``_connections.Connections`` (see its
module docstring).

Nothing a client sends reaches the engine unvalidated, and no exception from a
request escapes the app: an unexpected one is logged and answered with 500.

What a request costs
--------------------
The common requests are small, so the app pays for nothing a request does
not need. A request without a body on HTTP/1 (no ``Content-Length``, no
``Transfer-Encoding``) reads its end-of-body event without a deadline: that
event is already queued. A body is read under one cancel scope whose
deadline moves with each read, not a scope per read. A state is answered as
it is encoded: the JSON encoder refuses an integer outside the message range
on its own, and in CBOR such an integer is a bignum tag whose head (byte
0xc2 or 0xc3) must then be in the bytes, so only a CBOR answer holding one of
those bytes pays for walking the state (`check_ints`). Metrics and the
access log are recorded after the answer was sent.

`HttpApp` is not thread-safe: one instance serves any number of concurrent
requests, all on the engine's Trio loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final

import attrs
import trio

from .._exceptions import CatchingUp, HbTrioError, InvalidMessage, StoreError, StoreFenced
from .._message import Message, check_ints, validate_blob_id, validate_pid
from ._auth import check_bearer, check_token
from ._cluster import RETRY_EVERY, Cluster
from ._defaults import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_WAIT,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_WAIT,
)
from ._errors import RETRY, HttpError, error_response, retry_after, unwrap
from ._metrics import PROMETHEUS, HttpMetrics
from ._negotiation import (
    blob_media,
    body_media,
    decode_request,
    decoder_threads,
    encode_body,
    join_body,
    negotiate,
    negotiate_octets,
)
from ._plain import plain, stats_fields, worker_info
from ._request import BLOB_ROUTE, METHODS, Request, match_route, slot_param, unread_body
from ._types import CBOR, JSON, OCTETS, ASGIMessage, EngineLike, Headers, Receive, Response, Send

access_logger: Final = logging.getLogger("hbtrio.access")

#: Handlers of the requests about one process: a node of a cluster routes them.
_ROUTED: Final = frozenset({"schedule", "compute", "now", "slot_current"})


@attrs.define(eq=False)
class HttpApp:
    """The ASGI application (HTTP and lifespan scopes) over one engine.

    Build it with `make_app`. One instance serves any number of concurrent
    requests on the engine's Trio loop; its methods must be called from that
    loop. See the module docstring for the order in which requests are checked.
    """

    engine: EngineLike
    token: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    default_wait: float = DEFAULT_WAIT
    max_wait: float = DEFAULT_MAX_WAIT
    access_log: bool = False
    read_timeout: float = DEFAULT_READ_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    #: Where requests about processes go, for a node of a cluster (``None``: all here).
    cluster: Cluster | None = None
    metrics: HttpMetrics = attrs.field(factory=HttpMetrics, init=False)
    #: Set once by `begin_shutdown`; never unset.
    shutting_down: bool = attrs.field(default=False, init=False)
    #: Trio time by which every pending wait ends (``inf`` until shutdown starts).
    _drain_deadline: float = attrs.field(default=math.inf, init=False, alias="_drain_deadline")
    #: Cancel scopes of the compute waits in progress; each removes itself when done.
    _waits: set[trio.CancelScope] = attrs.field(factory=set, init=False, alias="_waits")
    #: Threads decoding large bodies.
    _decoders: trio.CapacityLimiter = attrs.field(
        factory=decoder_threads, init=False, alias="_decoders"
    )

    def begin_shutdown(self, grace: float = DEFAULT_GRACE) -> None:
        """Refuse new requests with 503 and end pending waits within ``grace`` seconds.

        Synchronous and idempotent (a later call can only shorten the grace
        period). Waits that are still pending when it ends answer 503 with
        the slot reached. Not a checkpoint.
        """
        self.shutting_down = True
        self._drain_deadline = min(self._drain_deadline, trio.current_time() + max(grace, 0.0))
        for scope in self._waits:
            scope.deadline = min(scope.deadline, self._drain_deadline)

    async def __call__(self, scope: ASGIMessage, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1003})

    async def _http(self, scope: ASGIMessage, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        self.metrics.in_flight += 1
        method, route = str(scope.get("method", "?")).upper(), "other"
        if method not in METHODS:  # keep the metrics' label sets bounded
            method = "other"
        request: Request | None = None
        try:
            try:
                request = Request.of(scope, trio.current_time())
                matched = match_route(request.path)
                if matched is not None:
                    route = matched[0]
                response = await self._answer(request, matched, receive)
            except Exception as exc:
                response = error_response(unwrap(exc))
            if response is None:  # the client went away; there is no one to answer
                status = 499
            else:
                status = response.status
                if request is not None and unread_body(request):
                    # Refused before the body was read: hang up after the answer.
                    response = attrs.evolve(
                        response, headers=(*response.headers, (b"connection", b"close"))
                    )
                await _send(send, response)
        finally:
            self.metrics.in_flight -= 1
        seconds = time.perf_counter() - start
        self.metrics.record(method, route, status, seconds)
        if self.access_log:
            _log_access(scope, status, seconds)

    async def _answer(
        self,
        request: Request,
        matched: tuple[str, str, str, str | None] | None,
        receive: Receive,
    ) -> Response | None:
        if self.shutting_down:
            raise HttpError(503, "shutting-down", "the node is shutting down", headers=RETRY)
        if matched is None:
            raise HttpError(
                404, "no-route", f"no endpoint at {request.path!r:.200} (see docs/http.md)"
            )
        route, allowed, handler_name, pid = matched
        # The path's ID: 400 unless 43 base64url characters; unknown ones are 404 later.
        if route == BLOB_ROUTE:
            validate_blob_id(pid)
        elif pid is not None:
            validate_pid(pid)
        if request.method != allowed:
            raise HttpError(
                405,
                "method-not-allowed",
                f"{route} takes {allowed}, not {request.method[:20]}",
                headers=((b"allow", allowed.encode()),),
            )
        if allowed == "GET" and request.has_body:
            # Refused before reading a byte of it (and the connection closed after):
            # a GET needs no token, so a body here could otherwise hold the connection.
            raise HttpError(
                400,
                "unexpected-body",
                f"GET {route} takes no body, and this request has one "
                "(a Content-Length other than 0, or a Transfer-Encoding)",
            )
        if allowed == "POST" and self.token is not None:
            check_bearer(request.headers.get("authorization"), self.token)
        accept = request.headers.get("accept")
        media = negotiate_octets(accept) if route == BLOB_ROUTE else negotiate(accept)
        content_type = request.headers.get("content-type")
        if handler_name == "put_blob":
            blob_media(content_type)  # 415 unless application/octet-stream (or none)
            chunks = await self._read_chunks(request, receive, blob=True)
            if chunks is None:
                return None
            return await self._h_put_blob(await join_body(chunks, self._decoders), media)
        body_type = body_media(content_type) if allowed == "POST" else JSON
        body = await self._read_body(request, receive)
        if body is None:
            return None
        if self.cluster is not None and pid is not None and handler_name in _ROUTED:
            return await self._routed(
                self.cluster, handler_name, pid, request, body, body_type, media, receive
            )
        return await self._local(handler_name, pid, request, body, body_type, media, receive)

    async def _local(
        self,
        handler_name: str,
        pid: str | None,
        request: Request,
        body: bytes,
        body_type: str,
        media: str,
        receive: Receive,
    ) -> Response | None:
        """Decode the body and answer with this node's engine."""
        message = (
            await decode_request(body, body_type, self._decoders)
            if request.method == "POST"
            else None
        )
        handler = getattr(self, "_h_" + handler_name)
        response: Response | None = await handler(pid, request, message, media, receive)
        return response

    async def _routed(
        self,
        cluster: Cluster,
        handler_name: str,
        pid: str,
        request: Request,
        body: bytes,
        body_type: str,
        media: str,
        receive: Receive,
    ) -> Response | None:
        """Answer a request about a process of a cluster: here, or at its owner (``_cluster``).

        Routed again when the local engine loses the process (`StoreFenced`) or
        the owner cannot be reached, until the request's budget runs out: the
        wait of a compute, else two leases (by then an owner that died has lost
        its lease, and the process is taken over here).
        """
        waits = handler_name in ("compute", "now")
        budget = self._wait_param(request.params()) if waits else 2 * cluster.lease + 2.0
        deadline = trio.current_time() + budget
        while True:
            owner = await cluster.owner_of(pid)
            if owner is None:
                try:
                    return await self._local(
                        handler_name, pid, request, body, body_type, media, receive
                    )
                except StoreFenced:
                    cluster.rerouted += 1
                    if trio.current_time() >= deadline:
                        raise
                    continue
            if handler_name == "compute":
                state = await cluster.store.stored_result(pid, slot_param(request.params()))
                if state is not None:
                    cluster.stored_answers += 1
                    return self._state(pid, state, media)
            if cluster.redirect:
                return cluster.redirect_to(owner, request)
            left = deadline - trio.current_time()
            if request.method == "GET":
                answer = await self._forward_read(cluster, pid, owner, request, left + 10.0)
            else:
                answer = await cluster.forward(owner, request, body, left)
            if answer is not None:
                return answer
            if trio.current_time() >= deadline:
                raise HttpError(
                    503,
                    "owner-unreachable",
                    f"the owner of {pid} ({owner}) cannot be reached, and its lease "
                    "has not run out yet",
                    headers=RETRY,
                )
            await trio.sleep(RETRY_EVERY)

    async def _read_body(self, request: Request, receive: Receive) -> bytes | None:
        """The whole request body, at most ``max_body`` bytes, or ``None`` if the client
        disconnected (see `_read_chunks`)."""
        chunks = await self._read_chunks(request, receive)
        if chunks is None:
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _read_chunks(
        self, request: Request, receive: Receive, *, blob: bool = False
    ) -> list[bytes] | None:
        """The request body as it arrived (at least one chunk), or ``None`` if the client
        disconnected.

        Bounded in size (``max_body``, or ``max_blob_bytes`` for a ``blob``:
        413), in the pause between two reads (``read_timeout``) and in total,
        from the end of the headers (``body_timeout``): 408.
        """
        limit = self.max_blob_bytes if blob else self.max_body
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.strip().isdigit()):
                raise HttpError(400, "bad-request", f"bad Content-Length {length[:40]!r}")
            if int(length) > limit:
                raise self._too_large(blob)
        if request.http1 and not request.has_body:
            # HTTP/1 without Content-Length or Transfer-Encoding: no body, and the
            # end of it is already queued (no deadline needed, none paid for).
            event = await receive()
            request.body_read = event["type"] != "http.disconnect"
            return [b""] if request.body_read else None
        chunks: list[bytes] = []
        size = 0
        end = request.started + self.body_timeout
        with trio.CancelScope() as scope:  # one scope; its deadline moves with each read
            while True:
                scope.deadline = min(end, trio.current_time() + self.read_timeout)
                event = await receive()
                if event["type"] == "http.disconnect":
                    return None
                chunk = event.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise self._too_large(blob)
                chunks.append(chunk)
                if not event.get("more_body", False):
                    request.body_read = True
                    return chunks
        if trio.current_time() < end:
            raise HttpError(
                408,
                "request-timeout",
                f"the request body stalled: nothing arrived for {self.read_timeout:g} s",
                {"read-timeout": self.read_timeout},
            )
        raise HttpError(
            408,
            "request-timeout",
            f"the request body took longer than {self.body_timeout:g} s",
            {"body-timeout": self.body_timeout},
        )

    def _too_large(self, blob: bool) -> HttpError:
        if blob:
            limit = self.max_blob_bytes
            return HttpError(
                413,
                "body-too-large",
                f"blobs are limited to {limit} bytes",
                {"max-blob-size": limit},
            )
        return HttpError(
            413,
            "body-too-large",
            f"request bodies are limited to {self.max_body} bytes",
            {"max-body": self.max_body},
        )

    def _ok(self, value: object, media: str, status: int = 200, headers: Headers = ()) -> Response:
        return Response(status, encode_body(value, media), media, headers)

    def _state(self, pid: str, state: Mapping[str, Any], media: str) -> Response:
        """A state's answer; `HttpError` 422 ``invalid-state`` if it holds what no message may.

        Only a state that never went through validation can: one stored by an
        earlier hbtrio (an integer outside the message range), or kept by a
        device that skips validation. The error names the offending key.
        """
        try:
            body = encode_body(state, media)
            if media == CBOR and (b"\xc2" in body or b"\xc3" in body):
                check_ints(state)
            return Response(200, body, media)
        except InvalidMessage as exc:
            error = exc
        try:
            check_ints(state)  # names the key, where the JSON encoder does not
        except InvalidMessage as exc:
            error = exc
        slot = state.get("at-slot")
        raise HttpError(
            422,
            "invalid-state",
            f"process {pid}: the state at slot {slot} is not a message, "
            f"so it cannot be answered: {error}",
            {"attempted-slot": slot if type(slot) is int else None},
        )

    # ------------------------------------------------------------------ handlers

    async def _forward_read(
        self, cluster: Cluster, pid: str, owner: str, request: Request, timeout: float
    ) -> Response | None:
        """A read forwarded to ``owner``, given up (``None``: route it again) as soon as the
        process has another owner (looked up every half lease while it waits)."""
        answer: list[Response | None] = []
        async with trio.open_nursery() as nursery:

            async def forward() -> None:
                answer.append(await cluster.forward(owner, request, b"", timeout))
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                while True:
                    await trio.sleep(cluster.lease / 2)
                    try:
                        moved = await cluster.owner_of(pid) != owner
                    except (HttpError, StoreError):
                        continue  # being taken over, or the database away: look again
                    if moved:
                        cluster.rerouted += 1
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(forward)
            nursery.start_soon(watch)
        return answer[0] if answer else None

    async def _h_spawn(
        self, pid: None, request: Request, message: Message, media: str, receive: Receive
    ) -> Response:
        new_pid = await self.engine.spawn(message)
        return self._ok({"process": new_pid}, media)

    async def _h_schedule(
        self, pid: str, request: Request, message: Message, media: str, receive: Receive
    ) -> Response:
        slot = await self.engine.schedule(pid, message)
        return self._ok({"process": pid, "slot": slot}, media)

    async def _h_compute(
        self, pid: str, request: Request, message: None, media: str, receive: Receive
    ) -> Response | None:
        params = request.params()
        slot = slot_param(params)
        wait = self._wait_param(params)
        return await self._wait_for_state(
            pid, partial(self.engine.compute, pid, slot), slot, wait, media, receive
        )

    async def _h_now(
        self, pid: str, request: Request, message: None, media: str, receive: Receive
    ) -> Response | None:
        wait = self._wait_param(request.params())
        return await self._wait_for_state(
            pid, partial(self.engine.now, pid), None, wait, media, receive
        )

    async def _h_put_blob(self, data: bytes, media: str) -> Response:
        blob_id = await self.engine.put_blob(data)
        return self._ok({"id": blob_id}, media, 201)

    async def _h_get_blob(
        self, blob_id: str, request: Request, message: None, media: str, receive: Receive
    ) -> Response:
        return Response(200, await self.engine.get_blob(blob_id), OCTETS)

    async def _h_slot_current(
        self, pid: str, request: Request, message: None, media: str, receive: Receive
    ) -> Response:
        latest = await self.engine.latest_slot(pid)
        return self._ok(
            {"process": pid, "slot": latest, "computed-slot": self._reached(pid)}, media
        )

    async def _h_workers(
        self, pid: None, request: Request, message: None, media: str, receive: Receive
    ) -> Response:
        await trio.lowlevel.checkpoint()
        workers = {str(name): worker_info(info) for name, info in list(self.engine.workers.items())}
        return self._ok({"workers": workers}, media)

    async def _h_stats(
        self, pid: None, request: Request, message: None, media: str, receive: Receive
    ) -> Response:
        await trio.lowlevel.checkpoint()
        stats = self.engine.stats()
        return self._ok({str(k): plain(v) for k, v in stats_fields(stats).items()}, media)

    async def _h_cluster(
        self, pid: None, request: Request, message: None, media: str, receive: Receive
    ) -> Response:
        if self.cluster is None:
            await trio.lowlevel.checkpoint()
            raise HttpError(
                404, "not-clustered", "this node is not part of a cluster (its store is its own)"
            )
        return self._ok(await self.cluster.describe(), media)

    async def _h_metrics(
        self, pid: None, request: Request, message: None, media: str, receive: Receive
    ) -> Response:
        await trio.lowlevel.checkpoint()
        text = self.metrics.render(self.engine, shutting_down=self.shutting_down)
        return Response(200, text.encode("utf-8"), PROMETHEUS)

    # ------------------------------------------------------------------ waiting

    def _wait_param(self, params: Mapping[str, str]) -> float:
        text = params.get("wait")
        if text is None:
            return self.default_wait
        try:
            wait = float(text)
        except ValueError:
            wait = math.nan
        if not 0.0 < wait <= self.max_wait:  # also refuses NaN
            raise HttpError(
                400,
                "bad-parameter",
                f"wait must be a number of seconds in (0, {self.max_wait:g}], not {text[:40]!r}",
            )
        return wait

    def _reached(self, pid: str) -> int | None:
        info = self.engine.workers.get(pid)
        slot = getattr(info, "slot", None) if info is not None else None
        return slot if type(slot) is int else None

    async def _wait_for_state(
        self,
        pid: str,
        call: Callable[[], Awaitable[Mapping[str, Any]]],
        slot: int | None,
        wait: float,
        media: str,
        receive: Receive,
    ) -> Response | None:
        """Run ``call`` within the wait budget; 200, 202, 503 or ``None`` (client gone).

        Cancelling the wait (budget, disconnect, shutdown) cancels only this
        request's wait inside the engine, never the computation.
        """
        state: Mapping[str, Any] | None = None
        error: Exception | None = None
        gone = False

        async def watch_disconnect(cancel: trio.CancelScope) -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            cancel.cancel()

        with trio.CancelScope(
            deadline=min(trio.current_time() + wait, self._drain_deadline)
        ) as scope:
            self._waits.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_disconnect, scope)
                    try:
                        state = await call()
                    except Exception as exc:  # re-raised below, outside the nursery
                        error = exc
                    nursery.cancel_scope.cancel()
            finally:
                self._waits.discard(scope)
        if isinstance(error, CatchingUp):
            # Too far to wait for: the same 202 as a wait that ran out, with its reason.
            body = {
                "process": pid,
                "requested-slot": error.slot,
                "computed-slot": self._reached(pid),
                "status": "computing",
                "reason": "catching-up",
                "message": str(error),
            }
            return self._ok(body, media, 202, retry_after(error.retry_after))
        if error is not None:
            raise error
        if state is not None:
            return self._state(pid, state, media)
        if gone:
            return None
        if slot is None:
            try:
                slot = await self.engine.latest_slot(pid)
            except HbTrioError:
                slot = None
        body = {
            "process": pid,
            "requested-slot": slot,
            "computed-slot": self._reached(pid),
        }
        if self.shutting_down:
            raise HttpError(
                503,
                "shutting-down",
                "the node is shutting down before this result was ready; "
                "its progress is saved, ask the node again once it is back",
                body,
                headers=RETRY,
            )
        return self._ok({**body, "status": "computing"}, media, 202, RETRY)


def _log_access(scope: ASGIMessage, status: int, seconds: float) -> None:
    client = scope.get("client") or ("-", 0)
    target = str(scope.get("path", ""))[:300]
    if scope.get("query_string"):
        target += "?" + scope["query_string"][:300].decode("latin-1")
    access_logger.info(
        '%s "%s %s" %d %.1fms',
        client[0],
        str(scope.get("method", "?"))[:20],
        target.encode("ascii", "backslashreplace").decode("ascii"),
        status,
        seconds * 1000,
    )


#: An answer longer than this is sent in parts of this size (a blob of many MiB): each
#: write is then bounded by the write timeout, not the whole answer.
_SEND_PART: Final = 1 << 20


async def _send(send: Send, response: Response) -> None:
    body = response.body
    headers = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if len(body) <= _SEND_PART:
        await send({"type": "http.response.body", "body": body})
        return
    for start in range(0, len(body), _SEND_PART):
        part = body[start : start + _SEND_PART]
        more = start + _SEND_PART < len(body)
        await send({"type": "http.response.body", "body": part, "more_body": more})


def make_app(
    engine: EngineLike,
    *,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    default_wait: float = DEFAULT_WAIT,
    max_wait: float = DEFAULT_MAX_WAIT,
    access_log: bool = False,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    cluster: Cluster | None = None,
) -> HttpApp:
    """The ASGI app serving ``engine`` (see ``docs/http.md`` for the endpoints).

    Args:
        engine: an open engine (``hbtrio.open_engine``); the app never closes it.
        token: when set, every write request (``POST``) must carry
            ``Authorization: Bearer <token>``; reads stay open.
        max_body: largest request body in bytes; larger ones get 413.
        default_wait: seconds a compute request waits when it names no ``wait``.
        max_wait: largest ``wait`` a client may ask for.
        access_log: log one line per request on the ``hbtrio.access`` logger
            (level INFO): client, method, path, status, milliseconds.
        read_timeout: seconds a request body may pause between two reads (408 after).
        body_timeout: seconds a whole request body may take from the end of the
            request's headers (408 after).
        max_blob_bytes: largest blob (``POST /blobs`` body) in bytes; larger
            ones get 413.
        cluster: for a node of a cluster (a `PostgresStore` shared with other
            nodes): where requests about processes go (``_cluster.Cluster``).

    Synchronous; the app must run on the engine's Trio loop.
    """
    for name, size in (("max_body", max_body), ("max_blob_bytes", max_blob_bytes)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, not {size}")
    if not 0.0 < default_wait <= max_wait:
        raise ValueError(f"need 0 < default_wait <= max_wait, not {default_wait} and {max_wait}")
    for name, value in (("read_timeout", read_timeout), ("body_timeout", body_timeout)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number of seconds, not {value}")
    check_token(token)
    return HttpApp(
        engine,
        token=token,
        max_body=max_body,
        default_wait=default_wait,
        max_wait=max_wait,
        access_log=access_log,
        read_timeout=read_timeout,
        body_timeout=body_timeout,
        max_blob_bytes=max_blob_bytes,
        cluster=cluster,
    )
