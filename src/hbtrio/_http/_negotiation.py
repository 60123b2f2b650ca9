"""Media types and bodies: ``Accept``, ``Content-Type``, encoding and decoding.

The node speaks JSON (``hbtrio``'s JSON wire format, ``_jsonwire``) and
canonical CBOR (``_codec``), for request bodies and for answers alike.
`negotiate` picks the answer's type from ``Accept`` (406 when neither will
do), `body_media` the body's from ``Content-Type`` (415), `decode_body` turns
a body into a read-only `Message` (400 ``invalid-message`` when it is not
one) and `encode_body` a value into bytes.

Large bodies, in threads
------------------------
Decoding a body also validates and freezes it, and a 1 MiB body takes a
tenth of a second or more: done on the event loop, every other request
would wait that long. So `decode_request` hands a body of `DECODE_IN_THREAD`
bytes or more to a worker thread, and the loop goes on serving meanwhile;
smaller bodies are decoded on the loop. At most `DECODE_THREADS` threads
decode at once (one `trio.CapacityLimiter` per app, made by
`decoder_threads`); more large bodies wait for one of them, each in its
own request's task. ``hbtrio serve`` also sets a 1 ms thread switch
interval, so the loop waits less for the GIL behind these threads; a
CBOR body, though, is one cbor2 call that holds the GIL throughout (about
60 ms for 1 MiB of small maps). With 4 clients posting 1 MiB JSON bodies,
another client's small requests answer in 6.3 ms (p50) and 43 ms (p99),
against 94 ms and 606 ms when decoding (and encoding) such a body all ran
on the loop (``docs/http.md``, Limits; figures in ``docs/reliability.md``).

Everything here but `decode_request` is a pure, synchronous function,
callable from any task or thread (`decode_body` runs in worker threads).
"""

from __future__ import annotations

from typing import Final

import trio

from .. import _codec, _jsonwire
from .._exceptions import InvalidMessage
from .._message import Message
from ._errors import HttpError
from ._types import CBOR, JSON

#: Request bodies at least this long are decoded in a worker thread, off the loop.
DECODE_IN_THREAD: Final = 64 * 1024
#: Worker threads decoding bodies at once (more wait for one of them).
DECODE_THREADS: Final = 2


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


def decoder_threads() -> trio.CapacityLimiter:
    """A limiter of `DECODE_THREADS` tokens, for one app's `decode_request` calls."""
    return trio.CapacityLimiter(DECODE_THREADS)


async def decode_request(body: bytes, media: str, threads: trio.CapacityLimiter) -> Message:
    """`decode_body`, in a worker thread (one of ``threads``) for a large body.

    A body shorter than `DECODE_IN_THREAD` is decoded at once, on the loop,
    and this is not a checkpoint. A larger one waits for a token of
    ``threads`` (a cancellation there leaves nothing behind), then is decoded
    in a thread; a cancellation then takes effect once the thread is done,
    and the decoded body is dropped. Raises what `decode_body` raises.
    """
    if len(body) < DECODE_IN_THREAD:
        return decode_body(body, media)
    return await trio.to_thread.run_sync(decode_body, body, media, limiter=threads)
