"""`Link`: one thread's connection to PostgreSQL, made again when it breaks.

Each of the store's two threads (the data thread and the control thread)
holds one, and only that thread touches it. A lost connection shows on its
next use (psycopg marks it ``broken``) and is replaced then. The data thread's
link waits ``retry_after`` seconds between attempts, so that while the server
cannot be reached its jobs fail at once instead of each waiting out a connect;
the control thread tries again at each heartbeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from .._exceptions import StoreError

__all__ = ["Conn", "Link", "store_error"]

Conn = psycopg.Connection[Any]


class Link:
    """A thread's connection (``conn``), connected again on demand. Blocks; one thread only."""

    def __init__(self, where: str, connect: Callable[[], Conn], retry_after: float = 0.0) -> None:
        self.where = where
        self.retry_after = retry_after
        self._connect = connect
        self._next_connect = 0.0
        self.conn: Conn | None = None

    def open(self) -> Conn:
        """Connect now (the thread's start); raises psycopg's error as it is."""
        self.conn = self._connect()
        return self.conn

    def get(self) -> Conn:
        """The connection, made again if the last one broke (`StoreError` if it cannot be)."""
        conn = self.conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.close()
        if time.monotonic() < self._next_connect:
            raise StoreError(f"{self.where}: the connection was lost; connecting again shortly")
        try:
            return self.open()
        except psycopg.Error as exc:
            self._next_connect = time.monotonic() + self.retry_after
            raise StoreError(f"cannot connect to {self.where}: {exc}") from exc

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def store_error(where: str, exc: psycopg.Error) -> StoreError:
    """``exc`` as the `StoreError` a job of the store at ``where`` fails with."""
    err = StoreError(f"{where}: {exc}".strip())
    err.__cause__ = exc
    return err
