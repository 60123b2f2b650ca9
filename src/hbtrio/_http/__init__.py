"""The HTTP API: a plain ASGI app over an engine, served by hypercorn on Trio.

Usage::

    async with hbtrio.open_engine(hbtrio.SQLiteStore("node.sqlite")) as engine:
        app = make_app(engine)
        await run_server(app, port=8734)  # until SIGINT/SIGTERM

or, all in one, ``await serve("node.sqlite")`` (what ``hbtrio serve`` runs;
``serve(store="postgresql://...", node_url=...)`` for a node of a cluster).
The endpoints, the JSON wire format and the status codes are documented in
``docs/http.md``; the public names are re-exported by `hbtrio.http`.

The modules, each importing only those above it:

* ``_defaults``: every default and limit of the node;
* ``_types``: `EngineLike`, the ASGI callables, `Response`, the media types;
* ``_plain``: what the engine reports, as values JSON and CBOR can carry;
* ``_errors``: `HttpError`, `error_response` (the one exception-to-status
  mapping) and the JSON error body;
* ``_auth``: the API token, and where a node may listen without one;
* ``_negotiation``: ``Accept``, ``Content-Type``, encoding and decoding
  bodies, large ones in worker threads;
* ``_metrics``: request and connection counts, Prometheus text;
* ``_request``: a request's headers, parameters and route (sans-I/O);
* ``_cluster``: for a node of a cluster, where a request about a process
  goes (here, or forwarded or redirected to its owner);
* ``_app``: `HttpApp`, the request order, handlers, waits, 202 and the drain;
* ``_connections``: the accept loop over hypercorn's per-connection server
  (imported when a server starts: it needs hypercorn);
* ``_serve``: `run_server` and `serve`, signals and shutdown.
"""

from ._app import HttpApp as HttpApp
from ._app import make_app as make_app
from ._auth import check_bind as check_bind
from ._auth import check_token as check_token
from ._auth import is_loopback as is_loopback
from ._defaults import DEFAULT_BODY_TIMEOUT as DEFAULT_BODY_TIMEOUT
from ._defaults import DEFAULT_GRACE as DEFAULT_GRACE
from ._defaults import DEFAULT_HOST as DEFAULT_HOST
from ._defaults import DEFAULT_KEEP_ALIVE as DEFAULT_KEEP_ALIVE
from ._defaults import DEFAULT_MAX_BLOB_BYTES as DEFAULT_MAX_BLOB_BYTES
from ._defaults import DEFAULT_MAX_BODY as DEFAULT_MAX_BODY
from ._defaults import DEFAULT_MAX_CONNECTIONS as DEFAULT_MAX_CONNECTIONS
from ._defaults import DEFAULT_MAX_WAIT as DEFAULT_MAX_WAIT
from ._defaults import DEFAULT_PORT as DEFAULT_PORT
from ._defaults import DEFAULT_READ_TIMEOUT as DEFAULT_READ_TIMEOUT
from ._defaults import DEFAULT_WAIT as DEFAULT_WAIT
from ._defaults import DEFAULT_WRITE_TIMEOUT as DEFAULT_WRITE_TIMEOUT
from ._errors import HttpError as HttpError
from ._errors import error_response as error_response
from ._metrics import BUCKETS as BUCKETS
from ._metrics import PROMETHEUS as PROMETHEUS
from ._metrics import ConnectionCounts as ConnectionCounts
from ._metrics import HttpMetrics as HttpMetrics
from ._negotiation import DECODE_IN_THREAD as DECODE_IN_THREAD
from ._negotiation import DECODE_THREADS as DECODE_THREADS
from ._negotiation import body_media as body_media
from ._negotiation import decode_body as decode_body
from ._negotiation import encode_body as encode_body
from ._negotiation import negotiate as negotiate
from ._serve import run_server as run_server
from ._serve import serve as serve
from ._types import CBOR as CBOR
from ._types import JSON as JSON
from ._types import EngineLike as EngineLike
from ._types import Headers as Headers
from ._types import Receive as Receive
from ._types import Response as Response
from ._types import Send as Send

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_HOST",
    "DEFAULT_KEEP_ALIVE",
    "DEFAULT_MAX_BLOB_BYTES",
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
