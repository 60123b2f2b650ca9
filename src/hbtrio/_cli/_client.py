"""The client commands: ``spawn``, ``schedule``, ``compute``, ``now``, ``workers``, ``stats``,
``put-blob``.

Each command makes one request to a node over HTTP with httpx's blocking
client, in the calling thread and without an event loop, and prints the
answer (``--json``: the node's JSON as it came); ``spawn --image FILE``
makes two, the upload of the file as a blob and then the spawn (``--module
FILE``: one upload per module). A message
is built from ``--body`` (JSON, ``@FILE`` or ``-`` for stdin) and
``KEY=TEXT`` / ``KEY:=JSON`` arguments. A transport failure or an error status is a
`CliError` carrying the node's error code and message; a 202 (the result
is not ready yet) is exit status 3. httpx is imported on the first request,
so the other commands do not pay for it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .. import _jsonwire
from .._exceptions import InvalidMessage
from ._errors import EXIT_PENDING, EXIT_USAGE, CliError, require
from ._output import format_message, format_result, format_table, is_process_result

if TYPE_CHECKING:
    import httpx

#: The execution device of a process spawned with ``--image`` whose definition names none.
IMAGE_DEVICE: Final = "wasm-64@1.0"
#: The execution device of a process spawned with ``--module``, whose definition names none.
MODULE_DEVICE: Final = "lua@5.3"
#: The execution device of any other process whose definition names none.
DEFAULT_DEVICE: Final = "counter@1.0"
#: Most redirects a client command follows (a cluster's node run with ``--redirect``).
_MAX_REDIRECTS: Final = 5


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
    blob: bytes | None = None,
) -> httpx.Response:
    """One request to the node; `CliError` for transport failures and error statuses.

    ``body`` is a message sent as JSON, ``blob`` bytes sent as they are.
    """
    require("httpx", "the client commands")
    import httpx

    from .._http import check_token

    headers = {"accept": "application/json"}
    content = None
    if body is not None:
        headers["content-type"] = "application/json"
        try:
            content = _jsonwire.dumps(body)
        except InvalidMessage as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    elif blob is not None:
        headers["content-type"] = "application/octet-stream"
        content = blob
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
        if blob is not None:
            print(f"<{len(blob)} bytes>", file=sys.stderr)
        elif content is not None:
            print(content.decode("utf-8"), file=sys.stderr)
    query = {k: str(v) for k, v in (params or {}).items()}
    try:
        response = httpx.request(
            method, url, params=query, content=content, headers=headers, timeout=timeout
        )
        # A node of a cluster run with --redirect sends requests for processes owned
        # elsewhere to their owner: follow, with the same method, body and token (httpx
        # would drop the token on a redirect to another host).
        for _ in range(_MAX_REDIRECTS):
            location = response.headers.get("location")
            if response.status_code not in (307, 308) or not location:
                break
            url = str(response.url.join(location))
            if getattr(args, "verbose", False):
                print(f"-> {method} {url}", file=sys.stderr)
            response = httpx.request(method, url, content=content, headers=headers, timeout=timeout)
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


def _decoded(response: httpx.Response) -> dict[str, Any]:
    value = _jsonwire.from_json(response.content)
    if not isinstance(value, dict):
        raise CliError(f"the node answered something that is not a JSON object: {value!r:.200}")
    return value


def _print_json(response: httpx.Response) -> None:
    print(response.text)


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def _put_blob(args: argparse.Namespace, data: bytes) -> httpx.Response:
    return _client_call(args, "POST", "/blobs", blob=data)


def cmd_put_blob(args: argparse.Namespace) -> int:
    response = _put_blob(args, _read_file(args.file))
    if args.json:
        _print_json(response)
    else:
        print(_decoded(response)["id"])
    return 0


def cmd_spawn(args: argparse.Namespace) -> int:
    device = args.execution_device
    if device is None:
        device = (
            IMAGE_DEVICE
            if args.image is not None
            else MODULE_DEVICE
            if args.module
            else DEFAULT_DEVICE
        )
    base = {"device": "process@1.0", "execution-device": device}
    definition = _message_from_args(args, base)  # bad usage is found before any upload
    modules = [_read_file(path) for path in args.module or ()]
    if args.image is not None:
        definition["image"] = _decoded(_put_blob(args, _read_file(args.image)))["id"]
    if modules:
        definition["module"] = [_decoded(_put_blob(args, data))["id"] for data in modules]
    response = _client_call(args, "POST", "/processes", body=definition)
    if args.json:
        _print_json(response)
    else:
        print(_decoded(response)["process"])
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
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
        if is_process_result(body):  # a WASM or Lua process: its output, plainly
            text, notes = format_result(body)
            print(text)
            for note in notes:
                print(note, file=sys.stderr)
        else:
            print(format_message(body))
    return 0


def cmd_compute(args: argparse.Namespace) -> int:
    params: dict[str, object] = {"slot": args.slot}
    if args.wait is not None:
        params["wait"] = args.wait
    return _show_state(args, _client_call(args, "GET", f"/{args.pid}/compute", params=params))


def cmd_now(args: argparse.Namespace) -> int:
    params = {"wait": args.wait} if args.wait is not None else {}
    return _show_state(args, _client_call(args, "GET", f"/{args.pid}/now", params=params))


def cmd_workers(args: argparse.Namespace) -> int:
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


def cmd_stats(args: argparse.Namespace) -> int:
    response = _client_call(args, "GET", "/stats")
    if args.json:
        _print_json(response)
    else:
        print(format_message(_decoded(response), ()))
    return 0
