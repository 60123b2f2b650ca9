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

Blobs (``POST /blobs``, ``GET /blobs/{id}``) travel as raw bytes,
``application/octet-stream`` (`blob_media`, `negotiate_octets`); a large
one's chunks are joined in one of the same threads (`join_body`), and the
engine hashes it in a thread of its own.

Everything here but `decode_request` and `join_body` is a pure, synchronous
function, callable from any task or thread (`decode_body` runs in worker
threads).
"""

from __future__ import annotations

from typing import Final

import trio

from .. import _codec, _jsonwire
from .._exceptions import InvalidMessage
from .._message import Message
from ._errors import HttpError
from ._types import CBOR, JSON, OCTETS

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
    best = _qualities(accept, (JSON, CBOR))
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


def negotiate_octets(accept: str | None) -> str:
    """`OCTETS` if an ``Accept`` header allows it (a blob's answer); `HttpError` 406 if not."""
    if not accept or not accept.strip():
        return OCTETS
    q, _ = _qualities(accept, (OCTETS,)).get(OCTETS, (0.0, 0))
    if q <= 0:
        raise HttpError(
            406,
            "not-acceptable",
            f"cannot answer with any of {accept[:200]!r}; a blob is {OCTETS}",
        )
    return OCTETS


def _qualities(accept: str, candidates: tuple[str, ...]) -> dict[str, tuple[float, int]]:
    """Each candidate type -> (quality, specificity) of the most specific range matching it."""
    best: dict[str, tuple[float, int]] = {}
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
        for candidate in candidates:
            if media == candidate:
                spec = 2
            elif media in ("*/*", "application/*"):
                spec = 0 if media == "*/*" else 1
            else:
                continue
            old = best.get(candidate)
            if old is None or spec > old[1]:  # the most specific range decides the quality
                best[candidate] = (q, spec)
    return best


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


def blob_media(content_type: str | None) -> str:
    """`OCTETS` for a blob's ``Content-Type`` (also when absent); 415 otherwise."""
    if content_type and _media_type(content_type) != OCTETS:
        raise HttpError(
            415,
            "unsupported-media-type",
            f"Content-Type {content_type!r:.100} is not supported for a blob; send {OCTETS}",
        )
    return OCTETS


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


async def join_body(chunks: list[bytes], threads: trio.CapacityLimiter) -> bytes:
    """The chunks of a body joined, in a worker thread (one of ``threads``) for a large body.

    For a blob: a few MiB copied at once would hold the loop. A body shorter
    than `DECODE_IN_THREAD` is joined at once, on the loop, and this is not a
    checkpoint; a cancellation of a larger one takes effect once the thread
    is done.
    """
    if len(chunks) == 1:
        return chunks[0]
    if sum(map(len, chunks)) < DECODE_IN_THREAD:
        return b"".join(chunks)
    return await trio.to_thread.run_sync(b"".join, chunks, limiter=threads)


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
