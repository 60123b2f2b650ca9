"""Serving: `run_server` (an app on a listening socket until shutdown) and `serve` (a node).

`serve` is what ``hbtrio serve`` runs: it checks the address and the token,
opens an engine on a store, builds the app (`make_app`) and runs
`run_server` until shutdown. `run_server` binds the socket itself, hands
every connection to the accept loop of ``_connections`` and turns the
shutdown trigger (by default the first SIGINT or SIGTERM) into a drain.

Failing early and plainly
-------------------------
The usual reasons a node cannot start are found before anything is opened,
and raised as themselves, not inside an exception group: a non-loopback
address without a token (`check_bind`, `ValueError`) and an address that
cannot be listened on (`OSError`). hypercorn would find the latter too, but
from inside its nurseries and leaking the socket it made; so `serve` binds
and closes a socket the way hypercorn does before the store is created
(unless ``port=0`` asks for any free port).
`run_server` warns when the descriptor limit is below what
``max_connections`` may need.

Shutdown
--------
When the trigger fires, `run_server` stops accepting (the listener is
closed: new connections are refused by the system), tells the app to answer
503 to new requests and to end pending waits within ``grace`` seconds
(`HttpApp.begin_shutdown`), and tells hypercorn to close every connection
once its request is answered (idle ones close at once). The connections
then get ``grace`` plus one second, for the answers of waits ended at
``grace``, before they are cancelled. A second signal cancels them at once.

Everything here runs on the caller's Trio loop; signals must be caught in
the main thread (``trio.open_signal_receiver``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from contextlib import ExitStack
from typing import Any, Final

import trio

from .._store import Store
from ._app import HttpApp, make_app
from ._auth import check_bind
from ._cluster import Cluster
from ._defaults import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_GRACE,
    DEFAULT_HOST,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_WAIT,
    DEFAULT_PORT,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_WAIT,
    DEFAULT_WRITE_TIMEOUT,
)

logger: Final = logging.getLogger("hbtrio.http")


def _check_address(host: str, port: int) -> None:
    """Raise `OSError` now if ``host:port`` cannot be listened on (in use, not local).

    Binds and closes a socket the way hypercorn does (see the module docstring).
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

        from ._connections import Connections
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
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    bounds: Mapping[str, float | int | None] | None = None,
    store: str | None = None,
    node_url: str | None = None,
    lease: float = 10.0,
    redirect: bool = False,
    trust_ownership: bool = False,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node: an engine on the SQLite store at ``db`` behind the HTTP API.

    ``db=None`` uses an in-memory store. ``store``, a PostgreSQL connection
    string, makes the node one of a cluster instead (``db`` is then unused):
    a `PostgresStore` shared with the other nodes, reached by them at
    ``node_url`` (default ``http://HOST:PORT``), with ``lease`` seconds per
    heartbeat (`PostgresStore`); requests for processes owned elsewhere are
    forwarded to their owner, or redirected there with ``redirect``
    (docs/cluster.md). ``trust_ownership`` is a test hook (`PostgresStore`).
    Before opening anything it refuses
    (`ValueError`) to bind a non-loopback ``host`` without ``token``, and
    raises `OSError` if the address cannot be listened on. Runs until
    shutdown (see `run_server`), then leaves the engine's block, which stores
    every worker's snapshot. ``task_status.started()`` reports the listening
    URLs once the node accepts requests. ``slot_timeout`` and
    ``shutdown_grace`` go to `hbtrio.open_engine`; ``read_timeout``,
    ``body_timeout`` and ``max_blob_bytes`` to `make_app`; ``max_connections``, ``keep_alive`` and
    ``write_timeout`` to `run_server`. ``bounds`` are more keywords of
    `hbtrio.open_engine` (``max_workers``, ``max_memory``, ``max_waiters``,
    ``max_waiters_per_worker``, ``max_cold_starts``, ``max_replay``,
    ``snapshot_seconds``, ``snapshot_cost_ratio``).
    """
    check_bind(host, token)
    if port != 0:
        _check_address(host, port)  # before the store is created
    import hbtrio

    cluster: Cluster | None = None
    engine_store: hbtrio.Store
    if store is not None:
        if node_url is None:
            if port == 0 or host in ("0.0.0.0", "::", "[::]"):
                raise ValueError("a node of a cluster needs --node-url (how other nodes reach it)")
            node_url = f"http://{host}:{port}"
        pg = hbtrio.PostgresStore(
            store, node_url=node_url, lease=lease, trust_ownership=trust_ownership
        )
        cluster = Cluster(pg, url=node_url, redirect=redirect)
        engine_store = pg
    else:
        engine_store = hbtrio.MemoryStore() if db is None else hbtrio.SQLiteStore(db)
    try:
        await _serve_engine(
            engine_store,
            cluster,
            devices=devices,
            max_idle=max_idle,
            cache_frequency=cache_frequency,
            slot_timeout=slot_timeout,
            shutdown_grace=shutdown_grace,
            bounds=bounds,
            app_options={
                "token": token,
                "max_body": max_body,
                "default_wait": default_wait,
                "max_wait": max_wait,
                "access_log": access_log,
                "read_timeout": read_timeout,
                "body_timeout": body_timeout,
                "max_blob_bytes": max_blob_bytes,
            },
            server_options={
                "host": host,
                "port": port,
                "grace": grace,
                "max_connections": max_connections,
                "keep_alive": keep_alive,
                "write_timeout": write_timeout,
                "shutdown_trigger": shutdown_trigger,
                "task_status": task_status,
            },
        )
    finally:
        if cluster is not None:
            await cluster.aclose()


async def _serve_engine(
    store: Store,
    cluster: Cluster | None,
    *,
    devices: Mapping[str, object] | None,
    max_idle: float,
    cache_frequency: int,
    slot_timeout: float | None,
    shutdown_grace: float,
    bounds: Mapping[str, float | int | None] | None,
    app_options: dict[str, Any],
    server_options: dict[str, Any],
) -> None:
    import hbtrio

    async with hbtrio.open_engine(
        store,
        devices=devices,
        max_idle=max_idle,
        cache_frequency=cache_frequency,
        slot_timeout=slot_timeout,
        shutdown_grace=shutdown_grace,
        **dict(bounds or {}),  # type: ignore[arg-type]
    ) as engine:
        app = make_app(engine, cluster=cluster, **app_options)
        await run_server(app, **server_options)
