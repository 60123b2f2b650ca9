"""A PostgreSQL server of the tests' own: ``initdb`` into a temporary directory, ``pg_ctl start``.

The binaries are found with ``pg_config --bindir``, else in the newest
``/usr/lib/postgresql/*/bin``. ``initdb`` and ``pg_ctl`` refuse to run as
root, so as root they run as the ``postgres`` user (``runuser``), made if it
does not exist (``useradd``; the distribution's package makes it). The
server listens on a free loopback port (and on more addresses when a test
asks: the cluster tests' network namespace), trusts every local connection
(it holds only test data and lives for one session), and is tuned for tests:
no fsync, commit timestamps on (the fencing tests read them).

Under CI (``CI`` or ``HBTRIO_REQUIRE_POSTGRES`` set, as ``.ci/run`` sets
the latter) a missing PostgreSQL fails the tests that need it instead of
skipping them: ``.ci/run`` installs it from the distribution's packages.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import psycopg

USER = "postgres"
_counter = itertools.count()


def find_bindir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``, or ``None``."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _as_user() -> list[str]:
    """The prefix that runs a command as a user PostgreSQL accepts (``[]`` unless root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )
    return ["runuser", "-u", USER, "--"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One server in a temporary directory; `start`, `create_database`, `stop`."""

    def __init__(
        self, bindir: Path, *, listen: tuple[str, ...] = ("127.0.0.1",), fsync: bool = False
    ) -> None:
        self.bindir = bindir
        self.listen = listen
        self.fsync = fsync
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="hbtrio-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "log"
        self.prefix = _as_user()
        self.admin: psycopg.Connection[tuple[object, ...]] | None = None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *args], capture_output=True, text=True, check=check, timeout=120
        )

    def start(self) -> None:
        if self.prefix:
            shutil.chown(self.root, user=USER)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "hbtrio",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        hba = self.data / "pg_hba.conf"
        extra = "".join(
            f"host all all {address}/24 trust\n" for address in self.listen[1:]
        )  # the test's own namespaces
        if extra:  # (root may write the server's file; otherwise it is our own)
            with hba.open("a") as f:
                f.write(extra)
        for attempt in range(5):
            self.port = free_port()
            options = " ".join(
                [
                    f"-p {self.port}",
                    f"-c listen_addresses={','.join(self.listen)}",
                    f"-c unix_socket_directories={self.root}",
                    f"-c fsync={'on' if self.fsync else 'off'}",
                    f"-c full_page_writes={'on' if self.fsync else 'off'}",
                    "-c track_commit_timestamp=on",
                    "-c max_connections=300",
                    "-c shared_buffers=32MB",
                ]
            )
            result = self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
                check=False,
            )
            if result.returncode == 0:
                break
            if attempt == 4:
                raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}")
            time.sleep(0.2)
        import psycopg

        self.admin = psycopg.connect(self.dsn("postgres"), autocommit=True)

    def dsn(self, dbname: str, host: str = "127.0.0.1") -> str:
        return f"host={host} port={self.port} user=hbtrio dbname={dbname} connect_timeout=5"

    def uri(self, dbname: str, host: str = "127.0.0.1") -> str:
        """The database's URI (what ``hbtrio serve --store`` takes)."""
        return f"postgresql://hbtrio@{host}:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; its name."""
        assert self.admin is not None
        name = f"t{os.getpid()}_{next(_counter)}"
        self.admin.execute(f'CREATE DATABASE "{name}"')
        return name

    def create_database(self) -> str:
        """A fresh, empty database; its DSN."""
        return self.dsn(self.new_database())

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start_or_skip(**options: object) -> PgServer:
    """A started server, or the test skipped (failed under CI) without PostgreSQL."""
    bindir = find_bindir()
    if bindir is None:
        message = "PostgreSQL is not installed (no pg_config --bindir, no /usr/lib/postgresql)"
        if os.environ.get("CI") or os.environ.get("HBTRIO_REQUIRE_POSTGRES"):
            pytest.fail(message + ": .ci/run installs it", pytrace=False)
        pytest.skip(message)
    server = PgServer(bindir, **options)  # type: ignore[arg-type]
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
