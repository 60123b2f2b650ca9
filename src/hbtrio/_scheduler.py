"""The local scheduler: slot assignment with a verifiable hash chain.

Slot 0 of a process is its definition; each `Scheduler.schedule` assigns the
next slot. An assignment is a message::

    {"process": pid, "slot": n, "body": message, "message-id": message_id(message),
     "timestamp": unix_ms, "hash-chain": b64url(sha256(chain[n-1] + raw(message-id)))}

where ``chain[-1]`` is empty, so ``chain[0] = sha256(raw(pid))``. Replaying a
schedule and recomputing the chain (`verify_schedule`) detects any reordered,
dropped or altered assignment.

Concurrency: schedules on one process are serialised (a per-process lock held
across the durable append), so concurrent callers never get the same slot and
the store never sees a gap. Different processes proceed concurrently. A
cancelled `schedule` either returned its slot or assigned nothing. The
scheduler keeps a bounded number of tails (the last slot and chain value of a
schedule); an evicted one is read again from the store, under its new lock.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import time
from collections.abc import Sequence
from typing import Final

import attrs
import trio

from ._codec import is_large
from ._exceptions import InvalidMessage, ProcessNotFound, StoreFenced
from ._message import Message, _Frozen, freeze, message_digest, message_id
from ._store import Store

__all__ = ["Scheduler", "make_assignment", "verify_schedule"]


def _raw(mid: str) -> bytes:
    return base64.urlsafe_b64decode(mid + "=")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def next_chain(previous: bytes, digest: bytes) -> bytes:
    """The chain value after ``previous`` for a message whose raw SHA-256 ID is ``digest``."""
    return hashlib.sha256(previous + digest).digest()


def _message_ids(bodies: list[Message]) -> list[str]:
    """The IDs of ``bodies``, large ones encoded in pieces (for a thread: see `schedule`)."""
    return [_b64(message_digest(body, in_pieces=True)) for body in bodies]


def make_assignment(
    pid: str, slot: int, body: Message, previous_chain: bytes, *, mid: str | None = None
) -> tuple[Message, bytes]:
    """Build the assignment message for ``body`` at ``slot``; returns it and its chain value."""
    if mid is None:
        raw = message_digest(body)
        mid = _b64(raw)
    else:
        raw = _raw(mid)
    chain = next_chain(previous_chain, raw)
    assignment = _Frozen(
        {
            "process": pid,
            "slot": slot,
            "body": body,
            "message-id": mid,
            "timestamp": time.time_ns() // 1_000_000,
            "hash-chain": _b64(chain),
        }
    )
    return assignment, chain


def verify_schedule(pid: str, assignments: Sequence[Message]) -> None:
    """Check a schedule replayed from slot 0: slots, message IDs and the hash chain.

    Raises `InvalidMessage` naming the first slot that does not verify.
    """
    chain = b""
    for expected, a in enumerate(assignments):
        if a.get("slot") != expected or a.get("process") != pid:
            raise InvalidMessage(
                f"slot {expected}: assignment is for {a.get('process')}/{a.get('slot')}"
            )
        digest = message_digest(a["body"])
        if a.get("message-id") != _b64(digest):
            raise InvalidMessage(f"slot {expected}: message-id does not match the body")
        chain = next_chain(chain, digest)
        if a.get("hash-chain") != _b64(chain):
            raise InvalidMessage(f"slot {expected}: hash-chain does not verify")


@attrs.define(eq=False)
class _Tail:
    """What the scheduler knows of one process's schedule."""

    # Invariant: latest and chain describe the last durable assignment, once
    # latest >= 0; before that (UNREAD) they are read from the store, by the
    # first task to hold the lock.
    latest: int = -1
    chain: bytes = b""
    lock: trio.Lock = attrs.field(factory=trio.Lock)


#: Processes whose tails a `Scheduler` keeps by default.
MAX_TAILS: Final = 10_000


class Scheduler:
    """Assigns slots to messages for the processes in one store.

    Keeps the tail of at most ``max_tails`` schedules in memory (least
    recently used evicted first, never one that a schedule holds or waits
    for); an evicted tail is read again from the store.

    Concurrency: schedules on one process are serialised by its tail's lock,
    held across the durable append; a tail is evicted only while nobody holds
    or waits for its lock, so two schedules on one process never hold two
    tails at once, and each reads the store only after every append before it
    returned.
    """

    def __init__(self, store: Store, *, max_tails: int = MAX_TAILS) -> None:
        if type(max_tails) is not int or max_tails < 0:
            raise ValueError(f"max_tails must be an int >= 0, not {max_tails!r}")
        self._store = store
        self._max_tails = max_tails
        # Least recently used first.
        self._tails: collections.OrderedDict[str, _Tail] = collections.OrderedDict()

    async def spawn(self, definition: Message) -> tuple[str, bool]:
        """Store ``definition`` as slot 0. Returns ``(pid, created)``; idempotent."""
        definition = freeze(definition, what="definition")
        if is_large(definition):  # its ID takes tens of ms: off the event loop
            pid = (await trio.to_thread.run_sync(_message_ids, [definition]))[0]
        else:
            pid = message_id(definition)
        assignment, chain = make_assignment(pid, 0, definition, b"", mid=pid)
        created = await self._store.put_process(pid, definition, assignment)
        if created and pid not in self._tails:
            self._add(pid, _Tail(0, chain))
        return pid, created

    def forget(self, pid: str) -> None:
        """Read ``pid``'s tail from the store again before its next schedule. Never blocks.

        For a store shared with other nodes, when another one took the process
        over: it may have appended since. A schedule holding the tail's lock now
        fails anyway (the store refuses it); the next one reads the tail again.
        """
        tail = self._tails.get(pid)
        if tail is not None:
            tail.latest, tail.chain = -1, b""

    def latest_nowait(self, pid: str) -> int:
        """The latest slot of ``pid`` if known without I/O; `trio.WouldBlock` otherwise."""
        tail = self._tails.get(pid)
        if tail is None or tail.latest < 0:
            raise trio.WouldBlock
        return tail.latest

    async def latest(self, pid: str) -> int:
        """The latest assigned slot of ``pid``. Raises `ProcessNotFound`."""
        tail = self._tails.get(pid)
        if tail is not None and tail.latest >= 0:
            return tail.latest
        latest = await self._store.latest_slot(pid)  # the store is the truth
        if latest < 0:
            raise ProcessNotFound(pid)
        return latest

    def _add(self, pid: str, tail: _Tail) -> _Tail:
        """Keep a new tail, evicting unlocked ones beyond the bound first."""
        tails = self._tails
        excess = len(tails) + 1 - self._max_tails
        for _ in range(min(len(tails), excess + 16) if excess > 0 else 0):
            if excess <= 0:
                break
            old_pid, old = next(iter(tails.items()))
            if old.lock.locked():  # held or waited for: it stays (at the back)
                tails.move_to_end(old_pid)
            else:
                del tails[old_pid]
                excess -= 1
        tails[pid] = tail
        return tail

    async def _read_tail(self, pid: str, tail: _Tail) -> None:
        """Fill an unread tail from the store; the caller holds its lock."""
        latest = await self._store.latest_slot(pid)
        if latest < 0:
            raise ProcessNotFound(pid)
        last = await self._store.get_assignments(pid, latest, latest + 1)
        tail.latest = latest
        tail.chain = base64.urlsafe_b64decode(last[0]["hash-chain"] + "=")

    async def schedule(self, pid: str, messages: Sequence[object]) -> list[int]:
        """Durably assign the next slots to ``messages``, in order, in one write.

        Raises `InvalidMessage` before assigning anything if any message is
        malformed, `ProcessNotFound` for an unknown process and `StoreError`
        when the store fails (nothing is assigned then).
        """
        bodies = [freeze(m, what=f"message {i}") for i, m in enumerate(messages)]
        mids: list[str | None] = [None] * len(bodies)
        # The IDs of large messages take tens of ms: computed off the event loop, in
        # pieces that let the loop run in between (see `_codec.encode_in_pieces`).
        if any(is_large(body) for body in bodies):
            mids = list(await trio.to_thread.run_sync(_message_ids, bodies))
        tail = self._tails.get(pid)
        if tail is None:
            tail = self._add(pid, _Tail())
        else:
            self._tails.move_to_end(pid)
        # From here to holding (or waiting for) the lock nothing yields, so the
        # tail cannot be evicted under us.
        async with tail.lock:
            if tail.latest < 0:
                try:
                    await self._read_tail(pid, tail)
                except BaseException:
                    # Not a process (or the store failed): forget the tail unless
                    # somebody else waits to try.
                    if (
                        tail.latest < 0
                        and self._tails.get(pid) is tail
                        and tail.lock.statistics().tasks_waiting == 0
                    ):
                        del self._tails[pid]
                    raise
            slot, chain = tail.latest, tail.chain
            batch: list[Message] = []
            for body, mid in zip(bodies, mids, strict=True):
                slot += 1
                assignment, chain = make_assignment(pid, slot, body, chain, mid=mid)
                batch.append(assignment)
            if batch:
                try:
                    await self._store.append_assignments(pid, batch)
                except StoreFenced:
                    tail.latest, tail.chain = -1, b""  # another node owns it: read it again
                    raise
            # Only now, once durable, does the tail move.
            first = tail.latest + 1
            tail.latest, tail.chain = slot, chain
        return list(range(first, slot + 1))
