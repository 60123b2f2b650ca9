"""What the HTTP modules share: the engine they drive, the ASGI callables, a response.

`EngineLike` is the part of the engine the app calls, `Receive` and `Send`
are the ASGI callables hypercorn hands the app, and `Response` is a whole
answer, built before a byte of it is sent (so a failure while building it
can still become an error answer). `JSON` and `CBOR` are the two media
types the node speaks for messages, `OCTETS` the one of blobs. Types and
frozen values only: safe to share between tasks and threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final, Protocol

import attrs

from .._message import Message

JSON: Final = "application/json"
CBOR: Final = "application/cbor"
OCTETS: Final = "application/octet-stream"

ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
Headers = tuple[tuple[bytes, bytes], ...]


class EngineLike(Protocol):
    """The part of the engine the HTTP layer uses (``hbtrio.open_engine``'s engine)."""

    async def spawn(self, definition: Message, /) -> str: ...

    async def schedule(self, pid: str, message: Message, /) -> int: ...

    async def compute(self, pid: str, slot: int, /) -> Mapping[str, Any]: ...

    async def now(self, pid: str, /) -> Mapping[str, Any]: ...

    async def latest_slot(self, pid: str, /) -> int: ...

    async def put_blob(self, data: bytes, /) -> str: ...

    async def get_blob(self, blob_id: str, /) -> bytes: ...

    @property
    def workers(self) -> Mapping[str, Any]: ...

    def stats(self) -> Any: ...


@attrs.frozen
class Response:
    """A complete HTTP response, built before anything is sent."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: Headers = ()
