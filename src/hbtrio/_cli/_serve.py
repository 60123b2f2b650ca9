"""``hbtrio serve``: a node in the foreground until Ctrl-C or SIGTERM.

The command checks what it can before it opens anything (the token and the
address, ``--device`` modules), configures logging on stderr, then runs
`hbtrio.http.serve` under its own ``trio.run`` and prints the listening
URLs once the node accepts requests. The first signal starts a graceful
shutdown, a second one stops waiting for requests (`run_server`). An
address that cannot be listened on and a store that cannot be opened are
one-line errors (exit status 1), a refused token or device exit status 2.

The thread switch interval
--------------------------
The node runs threads beside its event loop: large bodies being decoded,
the SQLite store's I/O thread, threaded devices. When one of them holds the
GIL, the loop asks for it and may wait the interpreter's switch interval
for it, 5 ms by default, and every small request waits that long with it.
The command sets the interval to `SWITCH_INTERVAL` (1 ms), so small requests
wait less behind the threads (``docs/http.md``, Limits). It is a setting of
the whole process, so the command sets it and `serve` does not: a program
that embeds the node sets it itself.

Runs in the calling thread, which must be the main thread (signals).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Final

import trio

from ._errors import EXIT_USAGE, CliError, require

#: `hbtrio.open_engine` keywords of the bounds, as `hbtrio serve` options.
BOUNDS: Final = (
    "max_workers",
    "max_memory",
    "max_waiters",
    "max_waiters_per_worker",
    "max_cold_starts",
    "max_replay",
    "snapshot_seconds",
    "snapshot_cost_ratio",
)

#: Seconds a thread holds the GIL while another wants it, in ``hbtrio serve``.
SWITCH_INTERVAL: Final = 0.001


def _load_device(spec: str) -> tuple[str, object]:
    name, sep, target = spec.partition("=")
    module_name, colon, attr = target.partition(":")
    if not (sep and colon and name and module_name and attr):
        raise CliError(f"--device {spec!r}: expected NAME=MODULE:ATTR", EXIT_USAGE)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules beside the user
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return name, obj() if isinstance(obj, type) else obj
    except Exception as exc:  # anything the user's module raises on import or construction
        raise CliError(f"--device {spec!r}: {type(exc).__name__}: {exc}", EXIT_USAGE) from None


def cmd_serve(args: argparse.Namespace) -> int:
    require("hypercorn", "the node's HTTP server and its dependencies")
    from .._exceptions import StoreError
    from .._http import check_bind, serve

    token = args.token if args.token is not None else os.environ.get("HBTRIO_TOKEN") or None
    try:
        check_bind(args.host, token)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    devices = dict(_load_device(spec) for spec in args.device)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("hypercorn").setLevel(max(logging.WARNING, logging.getLogger().level))
    sys.setswitchinterval(SWITCH_INTERVAL)  # see the module docstring
    if args.access_log:
        logging.getLogger("hbtrio.access").setLevel(logging.INFO)
    db = Path(args.db).resolve()
    if args.store is not None:
        require("psycopg", "a node on PostgreSQL (pip install 'hbtrio[postgres]')")
    # A test hook (docs/cluster.md): the node never gives up its processes on its own.
    trust = os.environ.get("HBTRIO_TEST_TRUST_OWNERSHIP") == "1"
    where = _safe_dsn(args.store) if args.store is not None else str(db)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                partial(
                    serve,
                    db,
                    host=args.host,
                    port=args.port,
                    token=token,
                    max_idle=args.max_idle,
                    cache_frequency=args.cache_frequency,
                    max_body=args.max_body,
                    max_blob_bytes=args.max_blob_size,
                    default_wait=args.wait,
                    max_wait=max(args.max_wait, args.wait),
                    grace=args.grace,
                    devices=devices,
                    slot_timeout=args.slot_timeout,
                    shutdown_grace=args.shutdown_grace,
                    access_log=args.access_log,
                    read_timeout=args.read_timeout,
                    body_timeout=args.body_timeout,
                    max_connections=args.max_connections,
                    keep_alive=args.keep_alive,
                    write_timeout=args.write_timeout,
                    bounds={
                        **{name: getattr(args, name) for name in BOUNDS},
                        "on_failure": args.on_failure,
                    },
                    store=args.store,
                    node_url=args.node_url,
                    lease=args.lease,
                    redirect=args.redirect,
                    trust_ownership=trust,
                )
            )
            for url in urls:
                print(f"hbtrio node listening on {url} (store: {where})", flush=True)
            print("press Ctrl-C to stop", flush=True)
        print("hbtrio node stopped; every worker stored its snapshot", flush=True)

    try:
        trio.run(run)
    except Exception as exc:
        leaf = _only_leaf(exc)  # serve() raises it plainly, the nursery above wraps it
        if isinstance(leaf, OSError):  # e.g. the address is in use
            raise CliError(f"cannot serve on {args.host}:{args.port}: {leaf}") from None
        if isinstance(leaf, StoreError):  # the file is in use, not a database, ...
            raise CliError(str(leaf)) from None
        if isinstance(leaf, ValueError):  # a node of a cluster without --node-url
            raise CliError(str(leaf), EXIT_USAGE) from None
        raise
    return 0


def _safe_dsn(dsn: str) -> str:
    """A PostgreSQL URI without its password, for printing."""
    head, at, tail = dsn.rpartition("@")
    if not at:
        return dsn
    scheme, sep, user = head.partition("://")
    return f"{scheme}{sep}{user.partition(':')[0]}@{tail}"


def _only_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
