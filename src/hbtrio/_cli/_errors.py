"""How a command fails: `CliError` and the exit statuses.

A command raises `CliError` for anything the user should read as one line
(``hbtrio COMMAND: error: ...`` on stderr, then the error's exit status);
`main` prints it. `main` also turns Ctrl-C into `EXIT_INTERRUPTED` and a
reader that went away into a quiet `EXIT_ERROR`; any other exception is a
bug and keeps its traceback. No state; `require` imports a module, nothing
else here does anything.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_PENDING: Final = 3
EXIT_INTERRUPTED: Final = 130


class CliError(Exception):
    """A failure to report on stderr as ``error: ...`` with an exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def require(module: str, purpose: str) -> Any:
    """Import ``module``, or `CliError` saying in one line that it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CliError(
            f"{purpose} need the Python package {module!r}, which cannot be imported "
            f"({exc}); install it with: pip install {module}"
        ) from None
