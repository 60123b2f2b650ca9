"""The ``hbtrio`` command: run a node, talk to one, or watch a demo.

::

    hbtrio demo                      # a self-contained tour, no server needed
    hbtrio serve --db node.sqlite    # a node on http://127.0.0.1:8734
    PID=$(hbtrio spawn)              # a counter@1.0 process on that node
    hbtrio schedule "$PID" n:=5      # -> its slot
    hbtrio compute "$PID" 1          # -> its state after slot 1
    hbtrio now "$PID"; hbtrio workers; hbtrio stats
    hbtrio put-blob module.wasm      # -> the file's blob ID
    hbtrio spawn --image module.wasm # a wasm-64@1.0 process naming that blob
    hbtrio spawn --module ledger.lua # a lua@5.3 process naming that module's blob
    hbtrio bench --quick             # the benchmark suite (from a source checkout)

Exit status: 0 success, 1 an error (the node's answer or no node), 2 bad
usage (including ``serve`` refusing to start), 3 a result that is not ready
yet (the node answered 202: ask again later), 130 interrupted; ``bench``
exits with the suite's status.

Each subcommand runs synchronously in the calling thread. ``serve`` and
``demo`` run their own Trio loop (``trio.run``); the client subcommands use
httpx's blocking client and no event loop at all.

The modules: ``_parser`` (the command line), ``_output`` (what is printed),
``_errors`` (`CliError`, the exit statuses), ``_client`` (the client
subcommands), ``_serve``, ``_demo`` and ``_bench`` (one command each); this
one holds `main` and the table of commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Final

from ._bench import cmd_bench
from ._client import (
    cmd_compute,
    cmd_now,
    cmd_put_blob,
    cmd_schedule,
    cmd_spawn,
    cmd_stats,
    cmd_workers,
)
from ._demo import cmd_demo
from ._errors import EXIT_ERROR as EXIT_ERROR
from ._errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from ._errors import EXIT_PENDING as EXIT_PENDING
from ._errors import EXIT_USAGE as EXIT_USAGE
from ._errors import CliError as CliError
from ._output import format_message as format_message
from ._output import format_table as format_table
from ._parser import DEFAULT_URL as DEFAULT_URL
from ._parser import build_parser as build_parser
from ._serve import cmd_serve

__all__ = ["main"]

_COMMANDS: Final = {
    "serve": cmd_serve,
    "demo": cmd_demo,
    "spawn": cmd_spawn,
    "schedule": cmd_schedule,
    "compute": cmd_compute,
    "now": cmd_now,
    "workers": cmd_workers,
    "stats": cmd_stats,
    "put-blob": cmd_put_blob,
    "bench": cmd_bench,
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
