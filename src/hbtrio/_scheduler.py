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
cancelled `schedule` either returned its slot or assigned nothing.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence

import attrs
import trio

from ._codec import is_large
from ._exceptions import InvalidMessage, ProcessNotFound
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

    # Invariant: latest and chain describe the last durable assignment.
    latest: int
    chain: bytes
    lock: trio.Lock = attrs.field(factory=trio.Lock)


class Scheduler:
    """Assigns slots to messages for the processes in one store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._tails: dict[str, _Tail] = {}

    async def spawn(self, definition: Message) -> tuple[str, bool]:
        """Store ``definition`` as slot 0. Returns ``(pid, created)``; idempotent."""
        definition = freeze(definition, what="definition")
        if is_large(definition):  # its ID takes tens of ms: off the event loop
            pid = (await trio.to_thread.run_sync(_message_ids, [definition]))[0]
        else:
            pid = message_id(definition)
        assignment, chain = make_assignment(pid, 0, definition, b"", mid=pid)
        created = await self._store.put_process(pid, definition, assignment)
        if created:
            self._tails[pid] = _Tail(0, chain)
        return pid, created

    def latest_nowait(self, pid: str) -> int:
        """The latest slot of ``pid`` if known without I/O; `trio.WouldBlock` otherwise."""
        tail = self._tails.get(pid)
        if tail is None:
            raise trio.WouldBlock
        return tail.latest

    async def latest(self, pid: str) -> int:
        """The latest assigned slot of ``pid``. Raises `ProcessNotFound`."""
        tail = self._tails.get(pid)
        if tail is None:
            tail = await self._load(pid)
        return tail.latest

    async def _load(self, pid: str) -> _Tail:
        latest = await self._store.latest_slot(pid)
        if latest < 0:
            raise ProcessNotFound(pid)
        last = await self._store.get_assignments(pid, latest, latest + 1)
        tail = self._tails.get(pid)  # another task may have loaded it meanwhile
        if tail is None:
            tail = self._tails[pid] = _Tail(
                latest, base64.urlsafe_b64decode(last[0]["hash-chain"] + "=")
            )
        return tail

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
        tail = self._tails.get(pid) or await self._load(pid)
        async with tail.lock:
            slot, chain = tail.latest, tail.chain
            batch: list[Message] = []
            for body, mid in zip(bodies, mids, strict=True):
                slot += 1
                assignment, chain = make_assignment(pid, slot, body, chain, mid=mid)
                batch.append(assignment)
            if batch:
                await self._store.append_assignments(pid, batch)
            # Only now, once durable, does the tail move.
            first = tail.latest + 1
            tail.latest, tail.chain = slot, chain
        return list(range(first, slot + 1))
