"""One engine per store file: an exclusive lock held on the file while a store is open.

Theory of operation
-------------------
`FileLock.acquire` takes an exclusive ``flock`` on the database file itself,
without waiting. The kernel releases it when the holder's descriptor closes,
so a holder that dies, even by SIGKILL, frees the file at once; nothing is
left behind to clean up (the lock is not a file of its own).

``flock`` locks belong to an open file description, so two stores of one
process conflict as two processes do. Within a process the lock is checked
in a table first, keyed by the file's device and inode: SQLite's own locks
are POSIX record locks, which a process loses on *every* descriptor of the
file when it closes *any* of them, so this module never opens (and closes) a
descriptor on a file that a store of this process holds. The holder of a
file locked by another process is named from ``/proc/locks`` where the
system has one.

Before anything is created, the path is checked: its directory must exist,
and an existing file must be a regular file that is empty or starts with
SQLite's header. A file created here is removed again if opening it fails.

Everything here blocks on the file system (briefly): call it from the
store's I/O thread, never from the event loop. Thread-safe.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Final

from ._exceptions import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: files are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileLock"]

log = logging.getLogger("hbtrio")

_HEADER: Final = b"SQLite format 3\x00"

# (device, inode) -> nothing: the files that a store of this process holds.
_held: dict[tuple[int, int], None] = {}
_held_lock = threading.Lock()


def _holder(st: os.stat_result) -> str:
    """`` (pid N)`` for the process holding an ``flock`` on the file, if the system says."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "->" in fields:  # a waiter, not a holder
                    continue
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
                    pid = fields[4]
                    return f" (pid {pid})" if pid.isdigit() and pid != "0" else ""
    except OSError:
        pass
    return ""


class FileLock:
    """An exclusive lock on a store file, held until `release`."""

    def __init__(self, path: str, fd: int, key: tuple[int, int], created: bool) -> None:
        self.path = path
        self._fd = fd
        self._key = key
        #: True when `acquire` created the file (it was not there).
        self.created = created

    @classmethod
    def acquire(cls, path: str) -> FileLock:
        """Lock ``path`` (creating it if missing), or raise `StoreError` saying why not.

        Refuses a path whose directory does not exist, a file that is not a
        regular file or not an SQLite database, and a file that another store
        holds (in this process or another: the message names the holder's pid
        where it can). Never waits for a lock. Blocks on the file system.
        """
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StoreError(f"cannot open {path}: directory {directory} does not exist")
        with _held_lock:  # one acquire at a time in this process: the table stays right
            try:
                st: os.stat_result | None = os.stat(path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
            if st is not None:
                if (st.st_dev, st.st_ino) in _held:  # checked before any descriptor is opened
                    raise StoreError(cls._in_use(path, " (in this process)"))
                cls._check_existing(path, st)
            lock = cls._lock(path)
        if not lock.created and st is not None and st.st_size == 0:
            log.warning("%s is an empty file: a new store is created in it", path)
        return lock

    @classmethod
    def _lock(cls, path: str) -> FileLock:
        created = False
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StoreError(cls._in_use(path, _holder(st))) from None
        except BaseException:
            # No store of this process held the file when it was checked (a rename in
            # between is not guarded against), so closing touches no SQLite lock.
            os.close(fd)
            raise
        _held[key] = None
        return cls(path, fd, key, created)

    @staticmethod
    def _check_existing(path: str, st: os.stat_result) -> None:
        import stat

        if stat.S_ISDIR(st.st_mode):
            raise StoreError(f"cannot open {path}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"cannot open {path}: it is not a regular file")
        if st.st_size == 0:
            return
        try:
            with open(path, "rb") as f:  # a read, no lock: SQLite's locks are not touched
                head = f.read(len(_HEADER))
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
        if head != _HEADER:
            raise StoreError(
                f"cannot open {path}: it is not an SQLite database (it starts with {head[:8]!r})"
            )

    @staticmethod
    def _in_use(path: str, holder: str) -> str:
        return f"{path} is in use by another engine{holder}: one engine at a time per store file"

    def release(self, *, remove_created: bool = False) -> None:
        """Unlock (after the store's SQLite connection has closed). Idempotent.

        ``remove_created`` removes the file (and SQLite's ``-wal`` and ``-shm``
        beside it) if this lock created it: opening it failed, so nothing in
        it is anybody's.
        """
        if self._fd < 0:
            return
        if remove_created and self.created:
            for name in (self.path, self.path + "-wal", self.path + "-shm"):
                try:
                    os.unlink(name)
                except OSError:
                    pass
        with _held_lock:
            _held.pop(self._key, None)
            os.close(self._fd)
            self._fd = -1
