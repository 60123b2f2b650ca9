"""The node's HTTP API, to embed in your own Trio program.

::

    import hbtrio
    from hbtrio.http import make_app, run_server, serve

    await serve("node.sqlite", port=8734)  # what `hbtrio serve` runs

    async with hbtrio.open_engine(hbtrio.SQLiteStore("node.sqlite")) as engine:
        await run_server(make_app(engine), port=8734)  # your own engine and devices

`make_app` builds a plain ASGI 3 application over an engine; `run_server`
serves one with hypercorn's HTTP code (under the node's own accept loop and
limits) until shutdown; `serve` does both on
an engine of its own. The endpoints, wire formats and statuses are in
``docs/http.md``.
"""

from ._http._app import HttpApp as HttpApp
from ._http._app import make_app as make_app
from ._http._auth import check_bind as check_bind
from ._http._auth import check_token as check_token
from ._http._defaults import DEFAULT_BODY_TIMEOUT as DEFAULT_BODY_TIMEOUT
from ._http._defaults import DEFAULT_GRACE as DEFAULT_GRACE
from ._http._defaults import DEFAULT_HOST as DEFAULT_HOST
from ._http._defaults import DEFAULT_KEEP_ALIVE as DEFAULT_KEEP_ALIVE
from ._http._defaults import DEFAULT_MAX_BLOB_BYTES as DEFAULT_MAX_BLOB_BYTES
from ._http._defaults import DEFAULT_MAX_BODY as DEFAULT_MAX_BODY
from ._http._defaults import DEFAULT_MAX_CONNECTIONS as DEFAULT_MAX_CONNECTIONS
from ._http._defaults import DEFAULT_MAX_WAIT as DEFAULT_MAX_WAIT
from ._http._defaults import DEFAULT_PORT as DEFAULT_PORT
from ._http._defaults import DEFAULT_READ_TIMEOUT as DEFAULT_READ_TIMEOUT
from ._http._defaults import DEFAULT_WAIT as DEFAULT_WAIT
from ._http._defaults import DEFAULT_WRITE_TIMEOUT as DEFAULT_WRITE_TIMEOUT
from ._http._serve import run_server as run_server
from ._http._serve import serve as serve
from ._http._types import EngineLike as EngineLike

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_HOST",
    "DEFAULT_KEEP_ALIVE",
    "DEFAULT_MAX_BLOB_BYTES",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_WAIT",
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

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("hbtrio._"):
        _obj.__module__ = "hbtrio.http"
del _name, _obj
