"""The ``hbtrio`` command: run a node, talk to one, or watch a demo.

::

    hbtrio demo                      # a self-contained tour, no server needed
    hbtrio serve --db node.sqlite    # a node on http://127.0.0.1:8734
    PID=$(hbtrio spawn)              # a counter@1.0 process on that node
    hbtrio schedule "$PID" n:=5      # -> its slot
    hbtrio compute "$PID" 1          # -> its state after slot 1
    hbtrio now "$PID"; hbtrio workers; hbtrio stats
    hbtrio bench --quick             # the benchmark suite (from a source checkout)

Exit status: 0 success, 1 an error (the node's answer or no node), 2 bad
usage (including ``serve`` refusing to start), 3 a result that is not ready
yet (the node answered 202: ask again later), 130 interrupted.

Each subcommand runs synchronously in the calling thread. ``serve`` and
``demo`` run their own Trio loop (``trio.run``); the client subcommands use
httpx's blocking client and no event loop at all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from . import _jsonwire
from ._exceptions import InvalidMessage

if TYPE_CHECKING:
    import httpx

    from ._engine import Engine

__all__ = ["main"]

DEFAULT_URL: Final = "http://127.0.0.1:8734"
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_PENDING: Final = 3
EXIT_INTERRUPTED: Final = 130
#: Seconds a thread holds the GIL while another wants it, in ``hbtrio serve``.
SWITCH_INTERVAL: Final = 0.001


class CliError(Exception):
    """A failure to report on stderr as ``error: ...`` with an exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- parsing


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
    from ._http import (
        DEFAULT_BODY_TIMEOUT,
        DEFAULT_GRACE,
        DEFAULT_HOST,
        DEFAULT_KEEP_ALIVE,
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
        help="run a node (SQLite store + HTTP API) until Ctrl-C or SIGTERM",
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
            "spawning the same definition again returns the same ID."
        ),
    )
    spawn.add_argument("fields", nargs="*", metavar="FIELD", help=FIELDS_HELP)
    spawn.add_argument(
        "--execution-device",
        default="counter@1.0",
        metavar="DEVICE",
        help="execution device of the process (default: %(default)s)",
    )
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


# --------------------------------------------------------------------------- output


def _value_text(value: object) -> str:
    if isinstance(value, bytes):
        shown = value[:16].hex()
        return f"<{len(value)} bytes: {shown}{'...' if len(value) > 16 else ''}>"
    if isinstance(value, str):
        return value
    return _jsonwire.dumps(value).decode("utf-8")


def format_message(message: Mapping[str, Any], first: Sequence[str] = ("at-slot",)) -> str:
    """A message as aligned ``key  value`` lines (``first`` keys on top)."""
    keys = [k for k in first if k in message] + sorted(k for k in message if k not in first)
    if not keys:
        return "(empty)"
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {_value_text(message[k])}" for k in keys)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns with a header row."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


# --------------------------------------------------------------------------- client


def _message_from_args(args: argparse.Namespace, base: Mapping[str, Any]) -> dict[str, Any]:
    """The message given by ``--body`` and ``FIELD=...`` arguments, over ``base``."""
    message: dict[str, Any] = dict(base)
    if args.body is not None:
        if args.body == "-":
            text = sys.stdin.read()
        elif args.body.startswith("@"):
            try:
                text = Path(args.body[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise CliError(f"cannot read {args.body[1:]}: {exc}") from None
        else:
            text = args.body
        try:
            message.update(_jsonwire.loads(text, what="--body"))
        except InvalidMessage as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    for field in args.fields:
        key, sep, value = field.partition("=")
        if not sep or not key or key == ":":
            raise CliError(f"{field!r}: fields are KEY=TEXT or KEY:=JSON", EXIT_USAGE)
        if key.endswith(":"):
            try:
                message[key[:-1]] = _jsonwire.from_json(value)
            except InvalidMessage as exc:
                raise CliError(f"{field!r}: {exc}", EXIT_USAGE) from None
        else:
            message[key] = value
            if _looks_like_json_scalar(value):
                print(
                    f"note: {field} sends the string {_jsonwire.dumps(value).decode()}; "
                    f"write {key}:={value} for the JSON value {value}",
                    file=sys.stderr,
                )
    return message


def _looks_like_json_scalar(text: str) -> bool:
    """True for text that is a JSON number, ``true``, ``false`` or ``null``."""
    if text in ("true", "false", "null"):
        return True
    try:
        value = _jsonwire.from_json(text)
    except InvalidMessage:
        return False
    return type(value) in (int, float)


def _client_call(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    params: Mapping[str, object] | None = None,
    body: Mapping[str, Any] | None = None,
) -> httpx.Response:
    """One request to the node; `CliError` for transport failures and error statuses."""
    _require("httpx", "the client commands")
    import httpx

    from ._http import check_token

    headers = {"accept": "application/json"}
    content = None
    if body is not None:
        headers["content-type"] = "application/json"
        try:
            content = _jsonwire.dumps(body)
        except InvalidMessage as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    if args.token:
        try:
            check_token(args.token)
        except ValueError as exc:
            raise CliError(f"--token: {exc}", EXIT_USAGE) from None
        headers["authorization"] = f"Bearer {args.token}"
    wait = getattr(args, "wait", None)
    timeout = 30.0 + (wait or 0.0)
    url = args.url.rstrip("/") + path
    if getattr(args, "verbose", False):
        print(f"{method} {url}", file=sys.stderr)
        if content is not None:
            print(content.decode("utf-8"), file=sys.stderr)
    try:
        response = httpx.request(
            method,
            url,
            params={k: str(v) for k, v in (params or {}).items()},
            content=content,
            headers=headers,
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the node at {args.url}: {exc}") from None
    if response.status_code >= 400:
        try:
            info = _jsonwire.from_json(response.content)
            detail = f"{info['error']}: {info['message']}"
            extra = {k: v for k, v in info.items() if k not in ("error", "message", "status")}
            if extra:
                detail += "\n" + format_message(extra, ())
        except (InvalidMessage, KeyError, TypeError):
            detail = response.text[:500]
        raise CliError(f"{response.status_code} {detail}")
    return response


def _require(module: str, purpose: str) -> Any:
    """Import ``module``, or `CliError` saying in one line that it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CliError(
            f"{purpose} need the Python package {module!r}, which cannot be imported "
            f"({exc}); install it with: pip install {module}"
        ) from None


def _decoded(response: httpx.Response) -> dict[str, Any]:
    value = _jsonwire.from_json(response.content)
    if not isinstance(value, dict):
        raise CliError(f"the node answered something that is not a JSON object: {value!r:.200}")
    return value


def _print_json(response: httpx.Response) -> None:
    print(response.text)


def _cmd_spawn(args: argparse.Namespace) -> int:
    base = {"device": "process@1.0", "execution-device": args.execution_device}
    response = _client_call(args, "POST", "/processes", body=_message_from_args(args, base))
    if args.json:
        _print_json(response)
    else:
        print(_decoded(response)["process"])
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    message = _message_from_args(args, {})
    if not message:
        raise CliError("give the message: FIELD arguments or --body", EXIT_USAGE)
    response = _client_call(args, "POST", f"/{args.pid}/schedule", body=message)
    if args.json:
        _print_json(response)
    else:
        print(_decoded(response)["slot"])
    return 0


def _show_state(args: argparse.Namespace, response: httpx.Response) -> int:
    if args.json:
        _print_json(response)
    body = _decoded(response)
    if response.status_code == 202:
        if not args.json:
            reached = body.get("computed-slot")
            print(
                f"not ready yet: the worker reached slot "
                f"{'-' if reached is None else reached} of {body.get('requested-slot')}; "
                "it keeps computing, ask again later",
                file=sys.stderr,
            )
        return EXIT_PENDING
    if not args.json:
        print(format_message(body))
    return 0


def _cmd_compute(args: argparse.Namespace) -> int:
    params: dict[str, object] = {"slot": args.slot}
    if args.wait is not None:
        params["wait"] = args.wait
    return _show_state(args, _client_call(args, "GET", f"/{args.pid}/compute", params=params))


def _cmd_now(args: argparse.Namespace) -> int:
    params = {"wait": args.wait} if args.wait is not None else {}
    return _show_state(args, _client_call(args, "GET", f"/{args.pid}/now", params=params))


def _cmd_workers(args: argparse.Namespace) -> int:
    response = _client_call(args, "GET", "/workers")
    if args.json:
        _print_json(response)
        return 0
    workers = _decoded(response)["workers"]
    if not workers:
        print("no live workers")
        return 0
    columns = ("slot", "target", "waiting", "computed", "idle_seconds", "phase")
    rows = [[pid, *(info.get(c) for c in columns)] for pid, info in sorted(workers.items())]
    print(format_table(["process", *columns], rows))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    response = _client_call(args, "GET", "/stats")
    if args.json:
        _print_json(response)
    else:
        print(format_message(_decoded(response), ()))
    return 0


# --------------------------------------------------------------------------- serve


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


def _cmd_serve(args: argparse.Namespace) -> int:
    _require("hypercorn", "the node's HTTP server and its dependencies")
    from ._exceptions import StoreError
    from ._http import check_bind, serve

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
    # Threads (large bodies decoding, the SQLite store, threaded devices) hand the GIL back
    # to the event loop after 1 ms instead of Python's 5: small requests wait less behind
    # them (docs/http.md, Limits).
    sys.setswitchinterval(SWITCH_INTERVAL)
    if args.access_log:
        logging.getLogger("hbtrio.access").setLevel(logging.INFO)
    db = Path(args.db).resolve()

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
                )
            )
            for url in urls:
                print(f"hbtrio node listening on {url} (store: {db})", flush=True)
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
        raise
    return 0


def _only_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# --------------------------------------------------------------------------- demo


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.3f}s] {text}", flush=True)

    def step(self, title: str, what: str) -> None:
        """A numbered heading: what the next lines show."""
        print(f"\n== {title}\n   {what}", flush=True)


def _stats_line(engine: Engine) -> str:
    s = engine.statistics()
    return (
        f"slots_computed={s.slots_computed} cache_hits={s.cache_hits} "
        f"workers_started={s.workers_started} workers_stopped={s.workers_stopped} "
        f"requests={s.requests}"
    )


class _Digest:
    """``digest@1.0``, the demo's resolution device: a slow SHA-256 of ``request["data"]``."""

    def __init__(self) -> None:
        self.runs = 0

    async def sha256(self, base: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, str]:
        import hashlib

        self.runs += 1
        await trio.sleep(0.05)  # an expensive call, worth running once for everyone
        return {"sha256": hashlib.sha256(request["data"]).hexdigest()}


#: Show every compute answer up to this many per process; beyond, a summary per process.
_SHOW_ANSWERS: Final = 4


async def _demo(processes: int, messages: int, waiters: int, out: _Clock) -> None:
    import attrs

    import hbtrio

    with tempfile.TemporaryDirectory(prefix="hbtrio-demo-") as tmp:
        path = Path(tmp) / "demo.sqlite"
        out.say(f"temporary SQLite store: {path}")
        digest = _Digest()
        async with hbtrio.open_engine(
            hbtrio.SQLiteStore(path), devices={"digest@1.0": digest}
        ) as engine:
            out.step(
                "1. spawn",
                "a process is a definition naming its execution device; its ID is the "
                "SHA-256 of the definition, and spawning it again changes nothing",
            )
            names: dict[str, str] = {}
            for i in range(processes):
                definition = {
                    "device": "process@1.0",
                    "execution-device": "counter@1.0",
                    "name": f"counter-{i}",
                }
                pid = await engine.spawn(definition)
                names[pid] = f"counter-{i}"
                out.say(f"spawned counter-{i} (counter@1.0) as process {pid}")

            out.step(
                "2. schedule",
                "each message gets the next slot, durable in SQLite before schedule() returns",
            )
            total, done = processes * messages, 0
            every = max(1, total // 10)

            async def schedule_all(pid: str) -> None:
                nonlocal done
                for n in range(1, messages + 1):
                    await engine.schedule(pid, {"n": n})
                    done += 1
                    if total >= 2000 and done % every == 0:
                        out.say(f"  scheduled {done:,} of {total:,} messages")

            async with trio.open_nursery() as nursery:
                for pid in names:
                    nursery.start_soon(schedule_all, pid)
            out.say(
                f"scheduled {messages} messages {{'n': 1..{messages}}} on each process "
                f"(slots 1..{messages})"
            )

            out.step(
                "3. compute, concurrently",
                f"{waiters} requests per process for different slots, all at once: one worker "
                "per process computes each slot once and hands every waiter its own slot",
            )
            targets = sorted({max(1, messages * (k + 1) // waiters) for k in range(waiters)})
            wrong: list[str] = []

            async def ask(pid: str, slot: int, show: bool) -> None:
                t0 = time.perf_counter()
                state = await engine.compute(pid, slot)
                ms = (time.perf_counter() - t0) * 1000
                expected = slot * (slot + 1) // 2
                check = "ok" if state["count"] == expected else f"EXPECTED {expected}"
                if check != "ok":
                    wrong.append(f"{names[pid]} slot {slot}")
                if show or check != "ok":
                    out.say(
                        f"  {names[pid]} slot {slot:>4} -> count {state['count']:>6} "
                        f"({check}, {ms:6.1f} ms)"
                    )

            show = len(targets) <= _SHOW_ANSWERS
            async with trio.open_nursery() as nursery:
                for pid in names:
                    for slot in reversed(targets):
                        nursery.start_soon(ask, pid, slot, show)
            if not show:
                out.say(
                    f"  {len(targets) * processes} answers, "
                    f"{'all right' if not wrong else f'{len(wrong)} WRONG'}"
                )
            out.say(f"done: {_stats_line(engine)}")

            print()
            rows = [
                [names[pid], info.slot, info.target, info.waiting, info.computed, info.phase]
                for pid, info in sorted(engine.workers.items(), key=lambda kv: names[kv[0]])
            ]
            print(format_table(["worker", "slot", "target", "waiting", "computed", "phase"], rows))

            out.step(
                "4. stored results",
                "every computed slot is stored: asking again is answered from the store",
            )
            first = next(iter(names))
            half = max(1, messages // 2)
            before = engine.statistics().cache_hits
            state = await engine.compute(first, half)
            out.say(
                f"{names[first]} slot {half} again -> count {state['count']} "
                f"(from its stored result: cache_hits {before} -> "
                f"{engine.statistics().cache_hits})"
            )

            out.step(
                "5. a failing message",
                "the device raises: the caller gets ComputeError; the worker keeps its "
                "last good state",
            )
            bad_slot = await engine.schedule(first, {"n": "not a number"})
            try:
                await engine.compute(first, bad_slot)
            except hbtrio.ComputeError as exc:
                out.say(
                    f"{names[first]} slot {bad_slot} has n='not a number': ComputeError "
                    f"phase={exc.phase!r} attempted_slot={exc.attempted_slot} "
                    f"({type(exc.__cause__).__name__})"
                )
            state = await engine.compute(first, messages)
            out.say(
                f"the worker kept its last good state: slot {messages} -> count {state['count']}"
            )

            out.step(
                "6. deduplicated resolution",
                "identical concurrent resolve() calls run once, and every caller gets the result",
            )
            callers = 10
            base, request = {"device": "digest@1.0"}, {"path": "sha256", "data": b"hbtrio"}
            results: list[Any] = []

            async def resolve() -> None:
                results.append(await engine.resolve(base, request))

            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(resolve)
            stats = engine.statistics()
            out.say(
                f"{callers} callers of digest@1.0 sha256 -> {len({r['sha256'] for r in results})} "
                f"answer, the device ran {digest.runs} time(s) (deduplicated={stats.deduplicated})"
            )
            first_stats = attrs.asdict(engine.statistics())
        out.step(
            "7. restart",
            "leaving the engine's block stores every worker's snapshot; a new engine on the "
            "same file continues where it stopped",
        )
        out.say("engine closed: every worker stored a snapshot of its state")

        async with hbtrio.open_engine(hbtrio.SQLiteStore(path)) as engine:
            states = [await engine.compute(pid, messages) for pid in names]
            again = engine.statistics()
            out.say(
                f"reopened the same file: slot {messages} of each process -> counts "
                f"{[s['count'] for s in states]}, computed again: "
                f"{again.slots_computed} slots ({again.cache_hits} cache hits)"
            )
        print()
        print("engine.statistics() of the first engine:")
        print(format_message(first_stats, ()))


def _cmd_demo(args: argparse.Namespace) -> int:
    out = _Clock()
    print(
        f"hbtrio demo: {args.processes} counter processes x {args.messages} messages, "
        f"{args.waiters} concurrent waiters each",
        flush=True,
    )
    trio.run(_demo, args.processes, args.messages, args.waiters, out)
    out.say("demo finished")
    print("next: 'hbtrio serve' runs a node; see docs/http.md for its HTTP API", flush=True)
    return 0


# --------------------------------------------------------------------------- bench


def _cmd_bench(args: argparse.Namespace) -> int:
    """``python -m benchmarks`` of the checkout this package runs from."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "runner.py").is_file():
        raise CliError(
            "the benchmark suite comes with a source checkout of hbtrio, not with the "
            "installed package: install from a clone (pip install -e '.[bench]')",
            status=EXIT_USAGE,
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    runner = importlib.import_module("benchmarks.runner")
    status: int = runner.main(list(args.bench_args))
    return status


# --------------------------------------------------------------------------- main

_COMMANDS: Final = {
    "serve": _cmd_serve,
    "demo": _cmd_demo,
    "spawn": _cmd_spawn,
    "schedule": _cmd_schedule,
    "compute": _cmd_compute,
    "now": _cmd_now,
    "workers": _cmd_workers,
    "stats": _cmd_stats,
    "bench": _cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hbtrio`` command with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every argument after it is the suite's
        args = argparse.Namespace(command="bench", bench_args=argv[1:])
    else:
        args, extra = parser.parse_known_args(argv)
        # Message fields may also come after options ("schedule PID --json n:=1").
        if extra and hasattr(args, "fields") and not any(e.startswith("-") for e in extra):
            args.fields += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _COMMANDS[args.command](args)
    except CliError as exc:
        print(f"hbtrio {args.command}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"hbtrio {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`hbtrio demo | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
