"""Who owns a process: the decision a claim makes, and a node's own lease. Sans-I/O.

Theory of operation
-------------------
Every process has one row in ``owners``: the node incarnation that owns it
(``NULL`` once released) and an epoch that grows by one at every takeover.
A node may write for a process only under the epoch it holds: every write
transaction first locks the process's owner row ``FOR SHARE`` and compares
the epoch (``_iothread``), so an owner that was paused or cut off and wakes
up after a takeover commits nothing (`decide` below is only the first line).

A *claim* reads the row with the owner's liveness (PostgreSQL's clock: the
owner's last heartbeat against the owner's own lease) and `decide` says what
to do:

=====================================  ==========  ===========================
the row says                           decision    then
=====================================  ==========  ===========================
no such process                        `MISSING`   the process is not stored
owned by this incarnation              `MINE`      keep the epoch held
owned by a live incarnation elsewhere  `ELSEWHERE` send requests there
released, or owner stopped or expired  `TAKE`      ``epoch + 1``, owner = me
=====================================  ==========  ===========================

A takeover is an ``UPDATE`` that checks, in its ``WHERE``, the epoch it saw
and that the owner is still released, stopped or expired: it takes the row's
``FOR NO KEY UPDATE`` lock, so it waits for every writer that holds ``FOR
SHARE`` (a writer either commits before the takeover or finds the new epoch
after it), and finding zero rows means somebody else moved first: read and
decide again. (``FOR KEY SHARE`` would not conflict with that update, and a
writer holding it would commit after the takeover: that is why writers take
``FOR SHARE``.)

A node's own *lease* (`Lease`) is the other half: a node counts its lease
from the moment it *sent* its last heartbeat that PostgreSQL acknowledged,
so it considers itself expired no later than the others do (they count from
when PostgreSQL recorded it, which is later). Past it, the node gives up
what it holds before anybody may take it over (``_pgstore``), unless a test
turns that off to show that the fence alone is enough.

Pure functions and a small class: no I/O, callable from any thread.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

__all__ = ["ELSEWHERE", "MINE", "MISSING", "TAKE", "Decision", "Lease", "OwnerRow", "decide"]


class Decision(enum.Enum):
    MISSING = "missing"
    MINE = "mine"
    ELSEWHERE = "elsewhere"
    TAKE = "take"


MISSING: Final = Decision.MISSING
MINE: Final = Decision.MINE
ELSEWHERE: Final = Decision.ELSEWHERE
TAKE: Final = Decision.TAKE


@attrs.frozen
class OwnerRow:
    """A process's owner row as a claim reads it (``None`` fields: no owner row yet)."""

    proc: int
    node: int | None
    epoch: int | None
    url: str | None
    #: The owner stopped, or its last heartbeat is older than its lease (PostgreSQL's clock).
    expired: bool


def decide(me: int, row: OwnerRow | None) -> Decision:
    """What a claim by node incarnation ``me`` does about ``row`` (see the module)."""
    if row is None:
        return MISSING
    if row.epoch is None or row.node is None:
        return TAKE
    if row.node == me:
        return MINE
    return TAKE if row.expired else ELSEWHERE


class Lease:
    """A node's own view of its lease: valid until ``lease`` seconds after the last
    acknowledged heartbeat was *sent* (monotonic clock).

    Written by the thread that heartbeats, read anywhere (plain floats).
    """

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"lease must be > 0 seconds, not {seconds!r}")
        self.seconds = seconds
        self.until = 0.0

    def renewed(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` was acknowledged."""
        self.until = max(self.until, sent_at + self.seconds)

    def valid(self, now: float) -> bool:
        return now < self.until

    def expire(self) -> None:
        """Give the lease up (the node stops, or was retired)."""
        self.until = 0.0
