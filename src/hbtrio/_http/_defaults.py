"""The node's defaults and limits, in one place.

`make_app`, `run_server`, `serve` and ``hbtrio serve`` all take these as
their defaults, and ``docs/configuration.md`` lists them. Plain constants:
nothing here does anything, so nothing here has a concurrency guarantee to
state.
"""

from __future__ import annotations

from typing import Final

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8734
#: Largest request body accepted, in bytes (larger ones get 413).
DEFAULT_MAX_BODY: Final = 1 << 20
#: Largest blob accepted by ``POST /blobs``, in bytes (larger ones get 413).
DEFAULT_MAX_BLOB_BYTES: Final = 64 << 20
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
