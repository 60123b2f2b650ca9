"""Errors as answers: `HttpError`, the one exception-to-status mapping, JSON error bodies.

Every refusal the node makes is an `HttpError` (a status, a short code, a
message and extra fields), answered as the JSON body ``{"error": code,
"status": ..., "message": ..., ...}`` whatever the request's ``Accept``.
Engine errors become statuses in one place only, `error_response`; nothing
else maps an exception to a status (httpcore's rule: translate foreign
exceptions once, at the boundary). `json_error` builds the same body for the
connection layer, which answers before any app runs (503 over the
connection bound, hypercorn's protocol errors).

Plain synchronous functions and an exception class: no I/O, no state (but
the log lines `error_response` writes), callable from any task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Final

from .. import _jsonwire
from .._exceptions import (
    BlobNotFound,
    CatchingUp,
    ComputeError,
    EngineClosed,
    HbTrioError,
    InvalidMessage,
    LeaderDied,
    Overloaded,
    ProcessNotFound,
    SlotNotScheduled,
    StoreError,
    StoreFenced,
    UnknownDevice,
)
from ._plain import plain
from ._types import JSON, Headers, Response

logger: Final = logging.getLogger("hbtrio.http")

#: The header of an answer worth retrying soon (503, 202).
RETRY: Final = ((b"retry-after", b"1"),)


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


def json_error(status: int, code: str, message: str) -> bytes:
    """The node's JSON error body (the shape of ``HttpError.response``)."""
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return _jsonwire.dumps({"error": code, "status": status, "message": text})


def retry_after(seconds: float) -> tuple[tuple[bytes, bytes], ...]:
    """The ``Retry-After`` header for ``seconds`` (whole seconds, at least 1)."""
    return ((b"retry-after", str(max(1, math.ceil(seconds))).encode()),)


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
    if isinstance(exc, CatchingUp):
        # Accepted: the slot is being computed; come back for it.
        return HttpError(
            202,
            "catching-up",
            str(exc),
            {"process": exc.pid, "slot": exc.slot, "position": exc.position},
            headers=retry_after(exc.retry_after),
        ).response()
    if isinstance(exc, Overloaded):
        return HttpError(
            503, "overloaded", str(exc), {"bound": exc.bound}, headers=retry_after(exc.retry_after)
        ).response()
    if isinstance(exc, StoreFenced):
        # Another node owns the process now (a node without a cluster router).
        return HttpError(
            503,
            "not-owner",
            str(exc),
            {"process": exc.pid, "owner": exc.owner},
            headers=RETRY,
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
            headers=RETRY,
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
        return HttpError(400, "unknown-device", str(exc), {"device": plain(exc.name)}).response()
    if isinstance(exc, ProcessNotFound):
        return HttpError(404, "process-not-found", str(exc), {"process": exc.pid}).response()
    if isinstance(exc, BlobNotFound):
        return HttpError(404, "blob-not-found", str(exc), {"blob": exc.blob_id}).response()
    if isinstance(exc, EngineClosed):
        return HttpError(
            503, "shutting-down", "the node is shutting down", headers=RETRY
        ).response()
    if isinstance(exc, LeaderDied):
        return HttpError(503, "leader-died", str(exc), headers=RETRY).response()
    if isinstance(exc, HbTrioError):
        logger.error("engine error answering a request", exc_info=exc)
        return HttpError(500, "engine-error", f"{type(exc).__name__}: {exc}").response()
    logger.error("unexpected error answering a request", exc_info=exc)
    return HttpError(500, "internal-error", "internal error (see the node's log)").response()


def unwrap(exc: Exception) -> Exception:
    """The single leaf of an exception group, else the exception itself."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
