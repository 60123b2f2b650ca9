"""The command line: `build_parser`, the argument types and the help texts.

Every subcommand and option of ``hbtrio`` is declared here, with its help
text and its default; the node's defaults come from ``hbtrio._http`` (the
same ones `make_app`, `run_server` and `serve` use). The argument types
refuse bad values at parse time (argparse's exit status 2). `build_parser`
reads ``$HBTRIO_URL`` and ``$HBTRIO_TOKEN`` when it is called (they are the
client commands' defaults); otherwise nothing here has side effects.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Final

#: The node the client commands talk to by default (``$HBTRIO_URL`` overrides it).
DEFAULT_URL: Final = "http://127.0.0.1:8734"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


_UNITS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def byte_size(text: str) -> int:
    """A size in bytes, ``1048576`` or with a binary unit: ``512K``, ``64M``, ``2G``."""
    digits, unit = text.strip(), ""
    if digits[-1:].upper() in _UNITS:
        digits, unit = digits[:-1], digits[-1:].upper()
    try:
        value = int(digits) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size in bytes (use 1048576, 512K, 64M or 2G)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return value


def _postgres_dsn(text: str) -> str:
    if not text.startswith(("postgresql://", "postgres://")):
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is not a PostgreSQL URI (postgresql://user@host:port/database)"
        )
    return text


def _slot(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a slot (a non-negative integer)")
    return int(text)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


FIELDS_HELP: Final = (
    "message fields: KEY=TEXT sets a string, KEY:=JSON any JSON value "
    '(bytes as {"/bytes": "<base64>"}), e.g. n:=5 (the number 5) note=hello; '
    'n=5 sends the string "5"'
)


def build_parser() -> argparse.ArgumentParser:
    """The ``hbtrio`` argument parser (every subcommand has ``--help``)."""
    from .._http import (
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

    parser = argparse.ArgumentParser(
        prog="hbtrio",
        description="AO-style process workers on Trio: run a node, talk to one, or see a demo.",
        epilog="Run 'hbtrio COMMAND --help' for a command's options. See docs/http.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run a node (SQLite or PostgreSQL store + HTTP API) until Ctrl-C or SIGTERM",
        description=(
            "Run a node: an engine on an SQLite store, served over HTTP by hypercorn on Trio. "
            "Ctrl-C or SIGTERM shuts it down gracefully: it stops accepting connections, "
            "lets in-flight requests finish (up to --grace seconds) and stores every "
            "worker's snapshot. A second signal stops waiting for requests."
        ),
    )
    serve.add_argument(
        "--db", default="hbtrio.sqlite", help="SQLite file of the store (default: %(default)s)"
    )
    cluster = serve.add_argument_group(
        "cluster",
        "nodes sharing one PostgreSQL database, one owner per process (docs/cluster.md)",
    )
    cluster.add_argument(
        "--store",
        metavar="postgresql://...",
        type=_postgres_dsn,
        help="a PostgreSQL database shared with the cluster's other nodes (instead of --db)",
    )
    cluster.add_argument(
        "--node-url",
        metavar="URL",
        help="where the other nodes reach this one (default: http://HOST:PORT)",
    )
    cluster.add_argument(
        "--lease",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds a node keeps its processes without a heartbeat; use the same on every "
        "node (default: %(default)s)",
    )
    cluster.add_argument(
        "--redirect",
        action="store_true",
        help="answer requests for processes owned elsewhere with a redirect to their owner "
        "(default: forward them there)",
    )
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default: %(default)s; any non-loopback address needs a token)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="0 picks a free port (default: %(default)s)",
    )
    serve.add_argument(
        "--token",
        default=None,
        help="API token that write requests must send as 'Authorization: Bearer TOKEN' "
        "(default: $HBTRIO_TOKEN; required off loopback)",
    )
    serve.add_argument(
        "--max-idle",
        type=_positive_float,
        default=300.0,
        metavar="S",
        help="seconds before an idle worker snapshots and exits (default: %(default)s)",
    )
    serve.add_argument(
        "--cache-frequency",
        type=_positive_int,
        default=1,
        metavar="N",
        help="store a full snapshot every N slots (default: %(default)s)",
    )
    serve.add_argument(
        "--max-body",
        type=_positive_int,
        default=DEFAULT_MAX_BODY,
        metavar="BYTES",
        help="largest request body accepted; larger ones get 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--max-blob-size",
        type=_positive_int,
        default=DEFAULT_MAX_BLOB_BYTES,
        metavar="BYTES",
        help="largest blob accepted by POST /blobs; larger ones get 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--wait",
        type=_positive_float,
        default=DEFAULT_WAIT,
        metavar="S",
        help="seconds a compute request waits before answering 202 (default: %(default)s)",
    )
    serve.add_argument(
        "--max-wait",
        type=_positive_float,
        default=DEFAULT_MAX_WAIT,
        metavar="S",
        help="largest ?wait= a client may ask for (default: %(default)s)",
    )
    serve.add_argument(
        "--grace",
        type=_positive_float,
        default=DEFAULT_GRACE,
        metavar="S",
        help="seconds in-flight requests get to finish on shutdown (default: %(default)s)",
    )
    serve.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=DEFAULT_READ_TIMEOUT,
        metavar="S",
        help="seconds a request body may pause between two reads before the request gets "
        "408 (default: %(default)s)",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=DEFAULT_BODY_TIMEOUT,
        metavar="S",
        help="seconds a whole request body may take after the headers before the request "
        "gets 408 (default: %(default)s)",
    )
    serve.add_argument(
        "--keep-alive",
        type=_positive_float,
        default=DEFAULT_KEEP_ALIVE,
        metavar="S",
        help="seconds a connection may go without a request in progress (idle, or sending "
        "a request's headers) before it is closed (default: %(default)s)",
    )
    serve.add_argument(
        "--write-timeout",
        type=_positive_float,
        default=DEFAULT_WRITE_TIMEOUT,
        metavar="S",
        help="seconds a client may take to receive one write of an answer before its "
        "connection is closed (default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections held at once; the one idle longest makes room for a new one, "
        "else the new one gets 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--slot-timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="seconds one call of an async or threaded device may take before its slot "
        "fails (default: no limit)",
    )
    bounds = serve.add_argument_group(
        "bounds", 'limits on what the engine holds (docs/api.md, "Bounds"); off by default'
    )
    bounds.add_argument(
        "--max-workers",
        type=_positive_int,
        metavar="N",
        help="most live workers; the least recently used idle one retires to make room",
    )
    bounds.add_argument(
        "--max-memory",
        type=byte_size,
        metavar="BYTES",
        help="most memory of live workers (their estimates; 512M, 2G, ...)",
    )
    bounds.add_argument(
        "--max-waiters", type=_positive_int, metavar="N", help="most requests parked at once"
    )
    bounds.add_argument(
        "--max-waiters-per-worker",
        type=_positive_int,
        metavar="N",
        help="most requests parked on one process",
    )
    bounds.add_argument(
        "--max-cold-starts", type=_positive_int, metavar="N", help="most processes booting at once"
    )
    bounds.add_argument(
        "--max-replay",
        type=_positive_int,
        metavar="SLOTS",
        help="most slots a request waits to have computed; further ones are answered 202",
    )
    bounds.add_argument(
        "--snapshot-seconds",
        type=_positive_float,
        metavar="S",
        help="also snapshot after this many seconds of device calls",
    )
    bounds.add_argument(
        "--snapshot-cost-ratio",
        type=_positive_float,
        metavar="R",
        help="also snapshot once device calls took R times what the last snapshot took",
    )
    serve.add_argument(
        "--on-failure",
        choices=["stop", "record"],
        default=None,
        help="what a failed slot of a WASM or Lua process (any live device) does: stop the "
        "process there, or record the failure as the slot's result and go on (default: the "
        "device's own choice, record for WASM and Lua); a definition's on-failure still wins",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds workers get to store their snapshots on shutdown before they are "
        "cancelled (default: %(default)s)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request (client, method, path, status, ms) on stderr",
    )
    serve.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="NAME=MODULE:ATTR",
        help="register an extra execution device (a class is instantiated; MODULE may be "
        "in the current directory); repeatable",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr (default: %(default)s)",
    )

    demo = commands.add_parser(
        "demo",
        help="a self-contained tour on a temporary store (no server needed)",
        description=(
            "Spawn a few counter@1.0 processes on an embedded engine with a temporary "
            "SQLite store, schedule messages, compute them concurrently and show what "
            "the workers did. Takes a few seconds."
        ),
    )
    demo.add_argument("--processes", type=_positive_int, default=3, help="(default: %(default)s)")
    demo.add_argument(
        "--messages",
        type=_positive_int,
        default=100,
        help="messages scheduled per process (default: %(default)s)",
    )
    demo.add_argument(
        "--waiters",
        type=_positive_int,
        default=4,
        help="concurrent compute requests per process (default: %(default)s)",
    )

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--url",
        default=os.environ.get("HBTRIO_URL", DEFAULT_URL),
        help=f"the node's URL (default: $HBTRIO_URL or {DEFAULT_URL})",
    )
    client.add_argument(
        "--token",
        default=os.environ.get("HBTRIO_TOKEN"),
        help="API token for write requests (default: $HBTRIO_TOKEN)",
    )
    client.add_argument("--json", action="store_true", help="print the node's JSON answer")

    body = argparse.ArgumentParser(add_help=False)
    body.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the request and the message sent (as JSON) on stderr",
    )
    body.add_argument(
        "--body",
        metavar="JSON",
        help="the whole message as JSON, @FILE to read a file, or - for stdin; "
        "fields given as arguments are added to it",
    )

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument(
        "--wait",
        type=_positive_float,
        metavar="S",
        help="seconds the node may wait for the result before answering 'not ready' "
        "(default: the node's)",
    )

    spawn = commands.add_parser(
        "spawn",
        parents=[client, body],
        help="spawn a process; prints its ID",
        description=(
            "Spawn a process from a definition and print its ID. The definition is "
            '{"device": "process@1.0", "execution-device": DEVICE} plus the given fields; '
            "spawning the same definition again returns the same ID. With --image FILE, "
            'the file is stored on the node as a blob first and the definition gets "image": '
            "its blob ID; with --module FILE (Lua source, repeatable) the same, as "
            '"module": a list of blob IDs, for a lua@5.3 process.'
        ),
    )
    spawn.add_argument("fields", nargs="*", metavar="FIELD", help=FIELDS_HELP)
    spawn.add_argument(
        "--execution-device",
        default=None,
        metavar="DEVICE",
        help="execution device of the process (default: counter@1.0, or wasm-64@1.0 with "
        "--image, lua@5.3 with --module)",
    )
    spawn.add_argument(
        "--image",
        metavar="FILE",
        help='store FILE on the node as a blob and name it in the definition ("image": ID)',
    )
    spawn.add_argument(
        "--module",
        metavar="FILE",
        action="append",
        help="store the Lua module FILE on the node as a blob and add it to the definition's "
        '"module" list (repeat it for several, loaded in order)',
    )
    put_blob = commands.add_parser(
        "put-blob",
        parents=[client],
        help="store a file on the node as a blob; prints its ID",
        description=(
            "Store the bytes of FILE on the node as a blob (POST /blobs) and print its ID, "
            "the SHA-256 of the bytes as 43 base64url characters. Storing the same bytes "
            "again gives the same ID."
        ),
    )
    put_blob.add_argument("file", metavar="FILE", help="the file to store")
    schedule = commands.add_parser(
        "schedule",
        parents=[client, body],
        help="schedule a message on a process; prints its slot",
        description="Schedule a message on a process and print the slot it was given.",
    )
    schedule.add_argument("pid", metavar="PID", help="the process ID")
    schedule.add_argument("fields", nargs="*", metavar="FIELD", help=FIELDS_HELP)
    compute = commands.add_parser(
        "compute",
        parents=[client, waiting],
        help="print a process's state after a slot",
        description="Print the state of a process after applying slots 0..SLOT.",
    )
    compute.add_argument("pid", metavar="PID", help="the process ID")
    compute.add_argument("slot", metavar="SLOT", type=_slot, help="the slot")
    commands.add_parser(
        "now",
        parents=[client, waiting],
        help="print a process's latest state",
        description="Print the state of a process at its latest scheduled slot.",
    ).add_argument("pid", metavar="PID", help="the process ID")
    commands.add_parser(
        "workers",
        parents=[client],
        help="list the node's live workers",
        description="List the node's live workers: slot reached, target, waiters, idle time.",
    )
    commands.add_parser(
        "stats",
        parents=[client],
        help="print the node's engine statistics",
        description="Print the node's engine statistics (slots computed, cache hits, ...).",
    )
    commands.add_parser(
        "bench",
        add_help=False,  # --help goes to the suite's own options
        help="run the benchmark suite of a source checkout (python -m benchmarks)",
        description="Run the benchmark suite; every argument goes to python -m benchmarks.",
    ).add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hbtrio")
    except PackageNotFoundError:
        return "(not installed)"
