"""What a request is, before anything is done for it: its headers, parameters and route.

`Request` holds an ASGI HTTP scope's parts as the app reads them (the
method, the path, the query string, the headers joined by name) plus what
the app learns while answering (whether the body was read). `match_route`
maps a path to its endpoint: the route's name for the metrics
(``/{pid}/compute``), the one method it takes, its handler and the process
or blob ID in it. `slot_param` reads and bounds ``?slot=``.

Sans-I/O: nothing here awaits, and nothing here keeps state between
requests. A `Request` belongs to the one task answering it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qsl

import attrs

from .._message import MAX_SLOT
from ._errors import HttpError
from ._types import ASGIMessage

#: Methods recorded by name in the metrics; any other is recorded as ``other``.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@attrs.define(eq=False)
class Request:
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
    def of(cls, scope: ASGIMessage, started: float = 0.0) -> Request:
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


#: The route of one blob; its path names the blob ID where process routes name a pid.
BLOB_ROUTE: Final = "/blobs/{id}"

#: Route name -> (allowed method, handler name). Process routes start with ``{pid}``.
_FIXED: Final = {
    ("processes",): ("POST", "spawn"),
    ("blobs",): ("POST", "put_blob"),
    ("workers",): ("GET", "workers"),
    ("stats",): ("GET", "stats"),
    ("metrics",): ("GET", "metrics"),
    ("cluster",): ("GET", "cluster"),
}
_PROCESS: Final = {
    ("schedule",): ("POST", "schedule"),
    ("compute",): ("GET", "compute"),
    ("now",): ("GET", "now"),
    ("slot", "current"): ("GET", "slot_current"),
}


def match_route(path: str) -> tuple[str, str, str, str | None] | None:
    """``(route name, allowed method, handler name, ID)`` for a path, or ``None``.

    The ID is the one in the path: the process ID of a process route, the
    blob ID of `BLOB_ROUTE`, ``None`` for the others.
    """
    parts = tuple(path.split("/")[1:]) if path.startswith("/") else ()
    if parts in _FIXED:
        method, handler = _FIXED[parts]
        return "/" + "/".join(parts), method, handler, None
    if len(parts) == 2 and parts[0] == "blobs":
        return BLOB_ROUTE, "GET", "get_blob", parts[1]
    if len(parts) >= 2 and parts[1:] in _PROCESS:
        method, handler = _PROCESS[parts[1:]]
        return "/{pid}/" + "/".join(parts[1:]), method, handler, parts[0]
    return None


def slot_param(params: Mapping[str, str]) -> int:
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


def unread_body(request: Request) -> bool:
    """Whether an HTTP/1 request's body is (partly) unread: its connection must close."""
    return request.http1 and request.has_body and not request.body_read
