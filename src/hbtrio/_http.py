"""The HTTP API: a plain ASGI app over an engine, served by hypercorn on Trio.

Usage::

    async with hbtrio.open_engine(hbtrio.SQLiteStore("node.sqlite")) as engine:
        app = make_app(engine)
        await run_server(app, port=8734)  # until SIGINT/SIGTERM

or, all in one, ``await serve("node.sqlite")`` (what ``hbtrio serve`` runs).
The endpoints, the JSON wire format and the status codes are documented in
``docs/http.md``.

Theory of operation
-------------------
Every request runs in its own task (hypercorn's). `HttpApp.__call__` decides
the answer in a fixed order, so that nothing is read or done for a request
that is refused anyway: shutting down (503), route (404, 405), a body on a
GET (400), token (401), ``Accept`` (406), ``Content-Type`` (415),
``Content-Length`` (413), body (400, 413, and 408 past the read or body
timeout), and only then the engine call. A request refused before its body
was read gets ``Connection: close``. Large bodies are decoded in worker
threads (`DECODE_THREADS` at most). Engine errors are translated into
statuses once, in `error_response`.

A compute request waits inside a cancel scope whose deadline is the request's
wait budget. When the budget runs out, only that wait is cancelled (engine
waits are cancellation-safe): the worker goes on computing and the client gets
202 with the slot reached so far. The same scope is cancelled when the client
disconnects. `HttpApp.begin_shutdown` marks the app as shutting down (new
requests get 503) and pulls every pending wait's deadline in to the end of the
grace period; a wait still pending then gets 503 with the slot reached.
`run_server` calls it when the shutdown trigger fires, once it has stopped
accepting connections; open ones then finish. Connections are accepted,
bounded and contained by ``_server.Connections`` (see its module docstring).

Nothing a client sends reaches the engine unvalidated, and no exception from a
request escapes the app: an unexpected one is logged and answered with 500.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextlib import ExitStack
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qsl

import attrs
import trio

from . import _codec, _jsonwire
from ._exceptions import (
    ComputeError,
    EngineClosed,
    HbTrioError,
    InvalidMessage,
    LeaderDied,
    ProcessNotFound,
    SlotNotScheduled,
    StoreError,
    UnknownDevice,
)
from ._message import MAX_SLOT, Message, check_ints, validate_pid

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_HOST",
    "DEFAULT_KEEP_ALIVE",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_WAIT",
    "DEFAULT_WRITE_TIMEOUT",
    "EngineLike",
    "HttpApp",
    "check_bind",
    "check_token",
    "make_app",
    "run_server",
    "serve",
]

logger: Final = logging.getLogger("hbtrio.http")
access_logger: Final = logging.getLogger("hbtrio.access")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8734
#: Largest request body accepted, in bytes (larger ones get 413).
DEFAULT_MAX_BODY: Final = 1 << 20
#: Seconds a compute request waits for its result before answering 202.
DEFAULT_WAIT: Final = 10.0
#: Largest ``wait`` a client may ask for, in seconds.
DEFAULT_MAX_WAIT: Final = 300.0
#: Seconds in-flight requests get to finish once shutdown starts.
DEFAULT_GRACE: Final = 10.0
#: Seconds a request body may pause between two reads before the request gets 408.
DEFAULT_READ_TIMEOUT: Final = 10.0
#: Seconds a whole request body may take, from the end of its headers (408 after).
DEFAULT_BODY_TIMEOUT: Final = 30.0
#: Connections held at once (see `run_server`).
DEFAULT_MAX_CONNECTIONS: Final = 512
#: Seconds a connection may go without a request in progress (hypercorn's keep-alive
#: timeout): idle between two requests, or sending a request's headers.
DEFAULT_KEEP_ALIVE: Final = 5.0
#: Seconds one write of an answer may take before the connection is closed.
DEFAULT_WRITE_TIMEOUT: Final = 30.0
#: Request bodies at least this long are decoded in a worker thread, off the loop.
DECODE_IN_THREAD: Final = 64 * 1024
#: Worker threads decoding bodies at once (more wait for one of them).
DECODE_THREADS: Final = 2

JSON: Final = "application/json"
CBOR: Final = "application/cbor"
PROMETHEUS: Final = "text/plain; version=0.0.4; charset=utf-8"

_ASGI = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[_ASGI]]
Send = Callable[[_ASGI], Awaitable[None]]
Headers = tuple[tuple[bytes, bytes], ...]

_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BUCKETS_TAIL: Final = (5.0, 10.0, 30.0, 60.0, math.inf)
BUCKETS: Final = _BUCKETS + _BUCKETS_TAIL

#: Engine statistics that only ever grow, exported as Prometheus counters.
_COUNTERS: Final = frozenset(
    {
        "slots_computed",
        "cache_hits",
        "workers_started",
        "workers_stopped",
        "deduplicated",
        "leader_deaths",
        "requests",
        "executions",
    }
)
_DOCS: Final = {
    "slots_computed": "Slots computed (device applications).",
    "cache_hits": "Compute requests answered from stored results.",
    "workers_started": "Process workers started.",
    "workers_stopped": "Process workers stopped.",
    "deduplicated": "Callers that joined a resolution already under way.",
    "leader_deaths": "Workers that died with requests waiting on them.",
    "requests": "Compute requests made to the engine.",
    "executions": "Generic resolutions executed.",
    "live_workers": "Process workers alive now.",
    "waiters": "Requests waiting on live workers now.",
}


class EngineLike(Protocol):
    """The part of the engine the HTTP layer uses (``hbtrio.open_engine``'s engine)."""

    async def spawn(self, definition: Message, /) -> str: ...

    async def schedule(self, pid: str, message: Message, /) -> int: ...

    async def compute(self, pid: str, slot: int, /) -> Mapping[str, Any]: ...

    async def now(self, pid: str, /) -> Mapping[str, Any]: ...

    async def latest_slot(self, pid: str, /) -> int: ...

    @property
    def workers(self) -> Mapping[str, Any]: ...

    def stats(self) -> Any: ...


# --------------------------------------------------------------------------- responses


@attrs.frozen
class Response:
    """A complete HTTP response, built before anything is sent."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: Headers = ()


class HttpError(Exception):
    """A request refused before or after the engine call; becomes a JSON error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        extra: Mapping[str, object] | None = None,
        *,
        headers: Headers = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers
        self.extra = dict(extra or {})

    def response(self) -> Response:
        # The message may quote what the client sent, which need not be valid Unicode.
        message = str(self).encode("utf-8", "backslashreplace").decode("utf-8")
        body = {"error": self.code, "status": self.status, "message": message, **self.extra}
        return Response(self.status, _jsonwire.dumps(body), JSON, self.headers)


_RETRY: Final = ((b"retry-after", b"1"),)
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def error_response(exc: Exception) -> Response:
    """The response for an exception raised by the engine or by request handling.

    This is the one place where engine errors become HTTP statuses.
    """
    if isinstance(exc, HttpError):
        return exc.response()
    if isinstance(exc, SlotNotScheduled):
        return HttpError(
            422,
            "slot-not-scheduled",
            str(exc),
            {
                "phase": exc.phase,
                "attempted-slot": exc.attempted_slot,
                "requested-slot": exc.requested_slot,
                "latest-slot": exc.latest,
            },
        ).response()
    if isinstance(exc, StoreError) or (
        isinstance(exc, ComputeError) and isinstance(exc.__cause__, StoreError)
    ):
        # Disk full, a locked or busy database: the node's trouble, not a bug, and passing.
        logger.warning("store error answering a request: %s", exc)
        return HttpError(
            503,
            "store-error",
            f"the node's store failed: {exc}; nothing was lost, retry",
            headers=_RETRY,
        ).response()
    if isinstance(exc, ComputeError):
        cause = exc.__cause__
        extra: dict[str, object] = {"phase": exc.phase, "attempted-slot": exc.attempted_slot}
        if cause is not None:
            extra["cause"] = f"{type(cause).__name__}: {cause}"[:1000]
        return HttpError(422, "compute-error", str(exc), extra).response()
    if isinstance(exc, InvalidMessage):
        return HttpError(400, "invalid-message", str(exc)).response()
    if isinstance(exc, UnknownDevice):
        return HttpError(400, "unknown-device", str(exc), {"device": _plain(exc.name)}).response()
    if isinstance(exc, ProcessNotFound):
        return HttpError(404, "process-not-found", str(exc), {"process": exc.pid}).response()
    if isinstance(exc, EngineClosed):
        return HttpError(
            503, "shutting-down", "the node is shutting down", headers=_RETRY
        ).response()
    if isinstance(exc, LeaderDied):
        return HttpError(503, "leader-died", str(exc), headers=_RETRY).response()
    if isinstance(exc, HbTrioError):
        logger.error("engine error answering a request", exc_info=exc)
        return HttpError(500, "engine-error", f"{type(exc).__name__}: {exc}").response()
    logger.error("unexpected error answering a request", exc_info=exc)
    return HttpError(500, "internal-error", "internal error (see the node's log)").response()


def _unwrap(exc: Exception) -> Exception:
    """The single leaf of an exception group, else the exception itself."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _plain(value: object) -> object:
    """A JSON/CBOR-safe rendering of an informational value (worker info, stats)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bytes | Mapping | list | tuple):
        try:
            _codec.encode(value)
        except InvalidMessage:
            return repr(value)
        return value
    for kind in (bool, int, float, str):  # subclasses such as enums
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def _info(info: object) -> dict[str, object]:
    """A worker-info record (``hbtrio.WorkerInfo``) as a plain mapping."""
    if attrs.has(type(info)):
        fields = attrs.asdict(info, recurse=False)  # type: ignore[arg-type]
    else:
        names = ("slot", "target", "waiting", "idle_seconds")
        fields = {name: getattr(info, name, None) for name in names}
    return {str(k): _plain(v) for k, v in fields.items()}


def _waiters(info: object) -> int:
    waiting = getattr(info, "waiting", 0)
    return waiting if type(waiting) is int else 0


# --------------------------------------------------------------------------- negotiation


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def negotiate(accept: str | None) -> str:
    """Pick JSON or CBOR for a response from an ``Accept`` header.

    The highest quality wins; on a tie the more specific range wins, then
    JSON. Raises `HttpError` 406 when neither is acceptable.
    """
    if not accept or not accept.strip():
        return JSON
    best: dict[str, tuple[float, int]] = {}  # type -> (q, specificity) of the best match
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        media = media.lower()
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        for candidate in (JSON, CBOR):
            if media == candidate:
                spec = 2
            elif media in ("*/*", "application/*"):
                spec = 0 if media == "*/*" else 1
            else:
                continue
            old = best.get(candidate)
            if old is None or spec > old[1]:  # the most specific range decides the quality
                best[candidate] = (q, spec)
    ranked = sorted(
        ((q, spec, candidate == JSON, candidate) for candidate, (q, spec) in best.items() if q > 0),
        reverse=True,
    )
    if not ranked:
        raise HttpError(
            406,
            "not-acceptable",
            f"cannot answer with any of {accept[:200]!r}; this node speaks {JSON} and {CBOR}",
        )
    return ranked[0][3]


def encode_body(value: object, media: str) -> bytes:
    """Encode a message for the wire in ``media`` (JSON or canonical CBOR)."""
    return _codec.encode(value) if media == CBOR else _jsonwire.dumps(value)


def body_media(content_type: str | None) -> str:
    """JSON or CBOR for a request's ``Content-Type`` (JSON when absent); 415 otherwise."""
    media = _media_type(content_type) if content_type else JSON
    if media not in (JSON, CBOR):
        raise HttpError(
            415,
            "unsupported-media-type",
            f"Content-Type {content_type!r:.100} is not supported; send {JSON} or {CBOR}",
        )
    return media


def decode_body(body: bytes, media: str) -> Message:
    """Decode a request body in ``media`` into a read-only `Message`.

    Raises `InvalidMessage` (400) for an empty or malformed body.
    """
    if not body:
        raise InvalidMessage("the request needs a body (a message)")
    return _codec.decode(body) if media == CBOR else _jsonwire.loads(body)


# --------------------------------------------------------------------------- metrics


@attrs.define(eq=False)
class _Histogram:
    counts: list[int] = attrs.field(factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        self.total += seconds
        self.n += 1


def _label(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(value) if isinstance(value, float) else str(value)


@attrs.define(eq=False)
class ConnectionCounts:
    """What `run_server`'s accept loop saw. Not thread-safe (one Trio loop)."""

    #: Connections open now.
    open: int = 0
    #: Connections accepted.
    accepted: int = 0
    #: Connections the node closed itself, by reason: ``evicted`` (idle, to make room
    #: under the connection bound or free a descriptor), ``refused`` (503 over the
    #: bound), ``write-timeout`` (the client did not take its answer), ``failed``.
    closed: Counter[str] = attrs.field(factory=Counter)
    #: ``accept()`` failures, by errno name (``EMFILE``, ...).
    accept_errors: Counter[str] = attrs.field(factory=Counter)


@attrs.define(eq=False)
class HttpMetrics:
    """Request counters and latency histograms of one app. Not thread-safe (one Trio loop)."""

    requests: Counter[tuple[str, str, int]] = attrs.field(factory=Counter)
    latency: dict[tuple[str, str], _Histogram] = attrs.field(factory=dict)
    in_flight: int = 0
    connections: ConnectionCounts = attrs.field(factory=ConnectionCounts)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[method, route, status] += 1
        hist = self.latency.get((method, route))
        if hist is None:
            hist = self.latency[method, route] = _Histogram()
        hist.observe(seconds)

    def render(self, engine: EngineLike, *, shutting_down: bool) -> str:
        """The Prometheus text exposition (format 0.0.4) of these and the engine's numbers."""
        lines: list[str] = []

        def family(name: str, kind: str, doc: str, samples: Iterable[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {doc}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(v)}" for labels, v in samples)

        family(
            "hbtrio_http_requests_total",
            "counter",
            "HTTP requests answered, by method, route and status.",
            (
                (f"{{method={_label(m)},route={_label(r)},status={_label(s)}}}", n)
                for (m, r, s), n in sorted(self.requests.items())
            ),
        )
        hist_samples: list[tuple[str, float]] = []
        for (m, r), hist in sorted(self.latency.items()):
            base = f"method={_label(m)},route={_label(r)}"
            cumulative = 0
            for bound, count in zip(BUCKETS, hist.counts, strict=True):
                cumulative += count
                hist_samples.append((f"_bucket{{{base},le={_label(_number(bound))}}}", cumulative))
            hist_samples.append((f"_sum{{{base}}}", hist.total))
            hist_samples.append((f"_count{{{base}}}", hist.n))
        lines.append("# HELP hbtrio_http_request_duration_seconds Time to answer HTTP requests.")
        lines.append("# TYPE hbtrio_http_request_duration_seconds histogram")
        lines.extend(
            f"hbtrio_http_request_duration_seconds{suffix} {_number(v)}"
            for suffix, v in hist_samples
        )
        family(
            "hbtrio_http_requests_in_flight",
            "gauge",
            "HTTP requests being answered.",
            [("", self.in_flight)],
        )
        family(
            "hbtrio_http_shutting_down",
            "gauge",
            "1 while the node is shutting down.",
            [("", int(shutting_down))],
        )
        conns = self.connections
        family("hbtrio_http_connections", "gauge", "HTTP connections open.", [("", conns.open)])
        family(
            "hbtrio_http_connections_accepted_total",
            "counter",
            "HTTP connections accepted.",
            [("", conns.accepted)],
        )
        family(
            "hbtrio_http_connections_closed_total",
            "counter",
            "HTTP connections the node closed itself, by reason.",
            ((f"{{reason={_label(reason)}}}", n) for reason, n in sorted(conns.closed.items())),
        )
        family(
            "hbtrio_http_accept_errors_total",
            "counter",
            "Failed accept() calls, by errno.",
            ((f"{{errno={_label(name)}}}", n) for name, n in sorted(conns.accept_errors.items())),
        )
        stats = engine.stats()
        fields = attrs.asdict(stats) if attrs.has(type(stats)) else dict(vars(stats))
        if "live_workers" not in fields:
            fields["live_workers"] = len(engine.workers)
        if "waiters" not in fields:
            fields["waiters"] = sum(_waiters(info) for info in list(engine.workers.values()))
        for name, value in fields.items():
            if type(value) not in (int, float):
                continue
            doc = _DOCS.get(name, f"Engine statistic {name}.")
            if name in _COUNTERS:
                family(f"hbtrio_{name}_total", "counter", doc, [("", value)])
            else:
                family(f"hbtrio_{name}", "gauge", doc, [("", value)])
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the app


@attrs.define(eq=False)
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    #: Trio time at which the app got the request (its headers were complete).
    started: float = 0.0
    #: HTTP/1.0 or 1.1, where a response may carry ``Connection: close``.
    http1: bool = False
    #: Set once the whole body has been read.
    body_read: bool = False

    @classmethod
    def of(cls, scope: _ASGI, started: float = 0.0) -> _Request:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return cls(
            method=scope["method"].upper(),
            path=scope.get("path", "/"),
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            started=started,
            http1=scope.get("http_version") in ("1.0", "1.1"),
        )

    @property
    def has_body(self) -> bool:
        """Whether the request announces a body (a non-zero length, or a transfer coding)."""
        if "transfer-encoding" in self.headers:
            return True
        length = self.headers.get("content-length")
        return length is not None and not (length.strip().isdigit() and int(length) == 0)

    def params(self) -> dict[str, str]:
        try:
            pairs = parse_qsl(self.query, keep_blank_values=True, strict_parsing=bool(self.query))
        except ValueError as exc:
            raise HttpError(400, "bad-parameter", f"malformed query string: {exc}") from None
        out: dict[str, str] = {}
        for name, value in pairs:
            if name in out:
                raise HttpError(400, "bad-parameter", f"parameter {name!r} is given twice")
            out[name] = value
        return out


#: Route name -> (allowed method, handler name). Process routes start with ``{pid}``.
_FIXED: Final = {
    ("processes",): ("POST", "spawn"),
    ("workers",): ("GET", "workers"),
    ("stats",): ("GET", "stats"),
    ("metrics",): ("GET", "metrics"),
}
_PROCESS: Final = {
    ("schedule",): ("POST", "schedule"),
    ("compute",): ("GET", "compute"),
    ("now",): ("GET", "now"),
    ("slot", "current"): ("GET", "slot_current"),
}


def _route(path: str) -> tuple[str, str, str, str | None] | None:
    """``(route name, allowed method, handler name, pid)`` for a path, or ``None``."""
    parts = tuple(path.split("/")[1:]) if path.startswith("/") else ()
    if parts in _FIXED:
        method, handler = _FIXED[parts]
        return "/" + "/".join(parts), method, handler, None
    if len(parts) >= 2 and parts[1:] in _PROCESS:
        method, handler = _PROCESS[parts[1:]]
        return "/{pid}/" + "/".join(parts[1:]), method, handler, parts[0]
    return None


def _slot_param(params: Mapping[str, str]) -> int:
    text = params.get("slot")
    if text is None:
        raise HttpError(400, "bad-parameter", "the 'slot' query parameter is required")
    if not (text.isascii() and text.isdigit()):
        raise HttpError(
            400, "bad-parameter", f"slot must be a non-negative integer, not {text[:40]!r}"
        )
    if len(text) > len(str(MAX_SLOT)) or int(text) > MAX_SLOT:
        raise HttpError(
            400,
            "bad-parameter",
            f"slot too large: {text[:40]}{'...' if len(text) > 40 else ''} "
            f"(the largest slot is {MAX_SLOT})",
        )
    return int(text)


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
    metrics: HttpMetrics = attrs.field(factory=HttpMetrics, init=False)
    #: Set once by `begin_shutdown`; never unset.
    shutting_down: bool = attrs.field(default=False, init=False)
    #: Trio time by which every pending wait ends (``inf`` until shutdown starts).
    _drain_deadline: float = attrs.field(default=math.inf, init=False, alias="_drain_deadline")
    #: Cancel scopes of the compute waits in progress; each removes itself when done.
    _waits: set[trio.CancelScope] = attrs.field(factory=set, init=False, alias="_waits")
    #: Threads decoding large bodies.
    _decoders: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(DECODE_THREADS), init=False, alias="_decoders"
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

    async def __call__(self, scope: _ASGI, receive: Receive, send: Send) -> None:
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

    async def _http(self, scope: _ASGI, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        self.metrics.in_flight += 1
        method, route = str(scope.get("method", "?")).upper(), "other"
        if method not in _METHODS:  # keep the metrics' label sets bounded
            method = "other"
        request: _Request | None = None
        try:
            try:
                request = _Request.of(scope, trio.current_time())
                matched = _route(request.path)
                if matched is not None:
                    route = matched[0]
                response = await self._answer(request, matched, receive)
            except Exception as exc:
                response = error_response(_unwrap(exc))
            if response is None:  # the client went away; there is no one to answer
                status = 499
            else:
                status = response.status
                if request is not None and _unread_body(request):
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
        request: _Request,
        matched: tuple[str, str, str, str | None] | None,
        receive: Receive,
    ) -> Response | None:
        if self.shutting_down:
            raise HttpError(503, "shutting-down", "the node is shutting down", headers=_RETRY)
        if matched is None:
            raise HttpError(
                404, "no-route", f"no endpoint at {request.path!r:.200} (see docs/http.md)"
            )
        route, allowed, handler_name, pid = matched
        if pid is not None:
            validate_pid(pid)  # 400 unless 43 base64url characters; unknown ones are 404 later
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
            self._check_token(request.headers.get("authorization"))
        media = negotiate(request.headers.get("accept"))
        body_type = body_media(request.headers.get("content-type")) if allowed == "POST" else JSON
        body = await self._read_body(request, receive)
        if body is None:
            return None
        message = await self._decode(body, body_type) if allowed == "POST" else None
        handler = getattr(self, "_h_" + handler_name)
        response: Response | None = await handler(pid, request, message, media, receive)
        return response

    def _check_token(self, header: str | None) -> None:
        assert self.token is not None
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise HttpError(
                401,
                "unauthorized",
                "write requests need 'Authorization: Bearer <token>' with this node's token",
                headers=((b"www-authenticate", b'Bearer realm="hbtrio"'),),
            )

    async def _read_body(self, request: _Request, receive: Receive) -> bytes | None:
        """The whole request body, or ``None`` if the client disconnected.

        Bounded in size (413), in the pause between two reads (``read_timeout``)
        and in total, from the end of the headers (``body_timeout``): 408.
        """
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.strip().isdigit()):
                raise HttpError(400, "bad-request", f"bad Content-Length {length[:40]!r}")
            if int(length) > self.max_body:
                raise self._too_large()
        if request.http1 and not request.has_body:
            # HTTP/1 without Content-Length or Transfer-Encoding: no body, and the
            # end of it is already queued (no deadline needed, none paid for).
            event = await receive()
            request.body_read = event["type"] != "http.disconnect"
            return b"" if request.body_read else None
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
                if size > self.max_body:
                    raise self._too_large()
                chunks.append(chunk)
                if not event.get("more_body", False):
                    request.body_read = True
                    return b"".join(chunks)
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

    async def _decode(self, body: bytes, media: str) -> Message:
        """`decode_body`, in a worker thread for a large body (at most `DECODE_THREADS` at once).

        A 1 MiB body takes a tenth of a second or more to decode and freeze;
        in a thread, the loop goes on serving other requests meanwhile.
        """
        if len(body) < DECODE_IN_THREAD:
            return decode_body(body, media)
        return await trio.to_thread.run_sync(decode_body, body, media, limiter=self._decoders)

    def _too_large(self) -> HttpError:
        return HttpError(
            413,
            "body-too-large",
            f"request bodies are limited to {self.max_body} bytes",
            {"max-body": self.max_body},
        )

    def _ok(self, value: object, media: str, status: int = 200, headers: Headers = ()) -> Response:
        return Response(status, encode_body(value, media), media, headers)

    def _state(self, pid: str, state: Mapping[str, Any], media: str) -> Response:
        """A state's answer; 422 ``invalid-state`` if it holds what no message may.

        Only a state that never went through validation can: one stored by an
        earlier hbtrio (an integer outside the message range), or kept by a
        device that skips validation. The JSON encoder refuses such a value on
        its own; CBOR carries a big integer as a bignum tag, whose head (byte
        0xc2 or 0xc3) must then be in the bytes: only then are they looked for.
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

    async def _h_spawn(
        self, pid: None, request: _Request, message: Message, media: str, receive: Receive
    ) -> Response:
        new_pid = await self.engine.spawn(message)
        return self._ok({"process": new_pid}, media)

    async def _h_schedule(
        self, pid: str, request: _Request, message: Message, media: str, receive: Receive
    ) -> Response:
        slot = await self.engine.schedule(pid, message)
        return self._ok({"process": pid, "slot": slot}, media)

    async def _h_compute(
        self, pid: str, request: _Request, message: None, media: str, receive: Receive
    ) -> Response | None:
        params = request.params()
        slot = _slot_param(params)
        wait = self._wait_param(params)
        return await self._wait_for_state(
            pid, partial(self.engine.compute, pid, slot), slot, wait, media, receive
        )

    async def _h_now(
        self, pid: str, request: _Request, message: None, media: str, receive: Receive
    ) -> Response | None:
        wait = self._wait_param(request.params())
        return await self._wait_for_state(
            pid, partial(self.engine.now, pid), None, wait, media, receive
        )

    async def _h_slot_current(
        self, pid: str, request: _Request, message: None, media: str, receive: Receive
    ) -> Response:
        latest = await self.engine.latest_slot(pid)
        return self._ok(
            {"process": pid, "slot": latest, "computed-slot": self._reached(pid)}, media
        )

    async def _h_workers(
        self, pid: None, request: _Request, message: None, media: str, receive: Receive
    ) -> Response:
        await trio.lowlevel.checkpoint()
        workers = {str(name): _info(info) for name, info in list(self.engine.workers.items())}
        return self._ok({"workers": workers}, media)

    async def _h_stats(
        self, pid: None, request: _Request, message: None, media: str, receive: Receive
    ) -> Response:
        await trio.lowlevel.checkpoint()
        stats = self.engine.stats()
        fields = attrs.asdict(stats) if attrs.has(type(stats)) else dict(vars(stats))
        return self._ok({str(k): _plain(v) for k, v in fields.items()}, media)

    async def _h_metrics(
        self, pid: None, request: _Request, message: None, media: str, receive: Receive
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
                headers=_RETRY,
            )
        return self._ok({**body, "status": "computing"}, media, 202, _RETRY)


def _unread_body(request: _Request) -> bool:
    """Whether an HTTP/1 request's body is (partly) unread: its connection must close."""
    return request.http1 and request.has_body and not request.body_read


def _log_access(scope: _ASGI, status: int, seconds: float) -> None:
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


async def _send(send: Send, response: Response) -> None:
    headers = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"content-length", str(len(response.body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


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

    Synchronous; the app must run on the engine's Trio loop.
    """
    if max_body < 1:
        raise ValueError(f"max_body must be >= 1, not {max_body}")
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
    )


# --------------------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only the loopback interface."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> None:
    """Refuse (`ValueError`) a token that no client could send as it is.

    A token is 1 to 4096 printable ASCII characters without spaces: a header
    carries nothing else intact (a non-ASCII token, or one with spaces around
    it, would never match what a client sends).
    """
    if token is None:
        return
    if not token:
        raise ValueError("the API token must not be empty")
    if len(token) > 4096 or not all("!" <= ch <= "~" for ch in token):
        raise ValueError(
            "the API token must be printable ASCII without spaces (at most 4096 characters)"
        )


def check_bind(host: str, token: str | None) -> None:
    """Refuse (`ValueError`) to bind a non-loopback address without an API token, or a bad token."""
    check_token(token)
    if not is_loopback(host) and token is None:
        raise ValueError(
            f"refusing to listen on {host!r} without an API token: "
            "pass --token or set HBTRIO_TOKEN (or bind to 127.0.0.1)"
        )


def _bind(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_address(host: str, port: int) -> None:
    """Raise `OSError` now if ``host:port`` cannot be listened on (in use, not local).

    Hypercorn would find out too, but from inside its nurseries (as an
    exception group) and leaking the socket it made; this binds and closes a
    socket the way hypercorn does, so the usual failures are plain and early.
    """
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)


async def _wait_for_signals(stop: trio.Event, force: trio.CancelScope, receiver: Any) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. Second one: stop waiting for requests."""
    async for signum in receiver:
        if not stop.is_set():
            logger.warning("%s: shutting down gracefully", signal.Signals(signum).name)
            stop.set()
        else:
            logger.warning(
                "%s again: not waiting for requests any longer", signal.Signals(signum).name
            )
            force.cancel()
            return


def _check_descriptors(max_connections: int) -> None:
    """Warn when the descriptor limit is below what ``max_connections`` may need."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections + 64:
        logger.warning(
            "the descriptor limit (%d, ulimit -n) is below the connection bound (%d) "
            "plus what the node needs besides: accept() may fail with EMFILE first",
            soft,
            max_connections,
        )


async def run_server(
    app: HttpApp,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    grace: float = DEFAULT_GRACE,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    keep_alive: float = DEFAULT_KEEP_ALIVE,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTP (hypercorn's HTTP/1.1 and HTTP/2 code) until shutdown, then drain.

    Shutdown starts when ``shutdown_trigger()`` returns or, without one, on the
    first SIGINT or SIGTERM (which then must be caught in the main thread; a
    second signal stops waiting for in-flight requests). Shutdown stops
    accepting connections, answers 503 to new requests on open ones and gives
    in-flight requests ``grace`` seconds to finish (compute waits still pending
    then get 503). Returns once every connection is closed; the engine is left
    open for the caller to close.

    Limits (see ``docs/http.md``, Limits): at most ``max_connections``
    connections (the one idle longest makes room for a new one, else the new
    one gets 503); ``keep_alive`` seconds without a request in progress (idle,
    or sending a request's headers) closes a connection; one write of an
    answer may take ``write_timeout`` seconds. An exception escaping one
    connection's protocol handling closes that connection only. The app's
    lifespan scope is not run (`HttpApp` has nothing to start or stop).

    ``task_status.started()`` reports the listening URLs (``port=0`` picks a
    free port). Raises `OSError` when the address cannot be listened on.
    Cancelling this call stops the server at once.
    """
    try:
        from hypercorn.config import Config
        from hypercorn.utils import repr_socket_addr

        from ._server import Connections
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(f"serving HTTP needs hypercorn, which is not installed: {exc}") from exc

    for name, value in (("keep_alive", keep_alive), ("write_timeout", write_timeout)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number of seconds, not {value}")
    bare = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    config = Config()
    config.keep_alive_timeout = keep_alive
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    connections = Connections(
        app,
        config,
        app.metrics.connections,
        max_connections=max_connections,
        write_timeout=write_timeout,
    )
    _check_descriptors(max_connections)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    urls = [f"http://{repr_socket_addr(sock.family, sock.getsockname())}"]
    stop = trio.Event()

    async def trigger_to_stop(trigger: Callable[[], Awaitable[object]]) -> None:
        await trigger()
        stop.set()

    with ExitStack() as stack:
        stack.callback(sock.close)
        async with trio.open_nursery() as nursery:
            if shutdown_trigger is None:
                receiver = stack.enter_context(
                    trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
                )
                nursery.start_soon(_wait_for_signals, stop, nursery.cancel_scope, receiver)
            else:
                nursery.start_soon(trigger_to_stop, shutdown_trigger)
            async with trio.open_nursery() as connection_tasks:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(connections.accept_loop, listener, connection_tasks)
                    task_status.started(urls)
                    await stop.wait()
                    accepting.cancel_scope.cancel()
                await listener.aclose()  # new connections are refused from here on
                app.begin_shutdown(grace)
                await connections.begin_shutdown()  # idle connections close now
                # Compute waits end at `grace`; their answers need a moment more.
                connection_tasks.cancel_scope.deadline = trio.current_time() + grace + 1.0
            nursery.cancel_scope.cancel()


async def serve(
    db: str | os.PathLike[str] | None = "hbtrio.sqlite",
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_idle: float = 300.0,
    cache_frequency: int = 1,
    max_body: int = DEFAULT_MAX_BODY,
    default_wait: float = DEFAULT_WAIT,
    max_wait: float = DEFAULT_MAX_WAIT,
    grace: float = DEFAULT_GRACE,
    devices: Mapping[str, object] | None = None,
    slot_timeout: float | None = None,
    shutdown_grace: float = 30.0,
    access_log: bool = False,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    keep_alive: float = DEFAULT_KEEP_ALIVE,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node: an engine on the SQLite store at ``db`` behind the HTTP API.

    ``db=None`` uses an in-memory store. Before opening anything it refuses
    (`ValueError`) to bind a non-loopback ``host`` without ``token``, and
    raises `OSError` if the address cannot be listened on. Runs until
    shutdown (see `run_server`), then leaves the engine's block, which stores
    every worker's snapshot. ``task_status.started()`` reports the listening
    URLs once the node accepts requests. ``slot_timeout`` and
    ``shutdown_grace`` go to `hbtrio.open_engine`; ``read_timeout`` and
    ``body_timeout`` to `make_app`; ``max_connections``, ``keep_alive`` and
    ``write_timeout`` to `run_server`.
    """
    check_bind(host, token)
    if port != 0:
        _check_address(host, port)  # before the store is created
    import hbtrio

    store = hbtrio.MemoryStore() if db is None else hbtrio.SQLiteStore(db)
    async with hbtrio.open_engine(
        store,
        devices=devices,
        max_idle=max_idle,
        cache_frequency=cache_frequency,
        slot_timeout=slot_timeout,
        shutdown_grace=shutdown_grace,
    ) as engine:
        app = make_app(
            engine,
            token=token,
            max_body=max_body,
            default_wait=default_wait,
            max_wait=max_wait,
            access_log=access_log,
            read_timeout=read_timeout,
            body_timeout=body_timeout,
        )
        await run_server(
            app,
            host=host,
            port=port,
            grace=grace,
            max_connections=max_connections,
            keep_alive=keep_alive,
            write_timeout=write_timeout,
            shutdown_trigger=shutdown_trigger,
            task_status=task_status,
        )
