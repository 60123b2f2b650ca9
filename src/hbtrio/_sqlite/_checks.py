"""Checking rows read from the file against their IDs (on the I/O thread).

Theory of operation
-------------------
SQLite keeps no checksums, so a flipped byte in the file would be computed,
or handed out, as it is. Everything a store reads that has an ID is checked
against it: an assignment's body against its message ID (and its process
and slot against the row's), a blob's bytes against its blob ID. A damaged
assignment raises `InvalidMessage` (the engine reports the slot's schedule
as unreadable); a damaged blob raises `StoreError`.

The thorough check of an assignment (`check_assignment`) encodes its body
canonically and hashes it, about 3 us for a small body. Rows read as a run
get a quick check first (`check_run`, about 1 us a row): a stored
assignment's bytes open with its body's canonical encoding (`_BODY_FIRST`),
whose end the decoded integers tell (`_TAIL`), so that run of the row's own
bytes is hashed in place, without encoding anything; only a row that fails
it gets the thorough check. A blob's check is one SHA-256 over its bytes,
which releases the GIL while it runs.

Pure functions of their arguments; callable from any thread.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
from collections.abc import Sequence
from typing import Final

from .._codec import encode
from .._exceptions import InvalidMessage, StoreError
from .._message import Message, id_of_bytes

__all__ = ["check_assignment", "check_blob", "check_run"]


def check_run(run: list[Message], rows: Sequence[bytes | memoryview], pid: str, first: int) -> None:
    """Check each assignment of a run read from the file against its message ID, quickly.

    The quick check hashes the body's bytes in place in the stored row (see
    `_BODY_FIRST`), about 1 us a row; a row that fails it gets the thorough
    `check_assignment`, which raises `InvalidMessage` for a damaged one.
    """
    sha256, b2a, head, skip = hashlib.sha256, binascii.b2a_base64, _BODY_FIRST, len(_BODY_FIRST)
    for slot, assignment, row in zip(itertools.count(first), run, rows):
        get = assignment.get
        mid, stamp = get("message-id"), get("timestamp")
        if (
            get("slot") == slot
            and get("process") == pid
            and type(mid) is str
            and type(stamp) is int
            and stamp >= 0
            and row[:skip] == head
        ):
            end = len(row) - _TAIL - _uint_size(slot) - _uint_size(stamp)
            digest = sha256(row[skip:end]).digest()
            if b2a(digest, newline=False)[:43].translate(_URLSAFE) == mid.encode():
                continue
        check_assignment(assignment, pid, slot)


#: A stored assignment's bytes open with this: a map of six entries whose first
#: key, in canonical order, is "body". So the body's canonical encoding is a run of
#: the row's bytes, after this and before the other entries, whose size the decoded
#: integers tell (`_TAIL`): hashing that run in place checks the row against its
#: message ID without encoding anything.
_BODY_FIRST: Final = b"\xa6\x64body"
#: The bytes after the body in a stored assignment, but for its two integers:
#: the keys "slot", "process", "timestamp", "hash-chain", "message-id" and the
#: three 43-character IDs.
_TAIL: Final = 5 + 8 + 45 + 10 + 11 + 45 + 11 + 45


def _uint_size(n: int) -> int:
    """Bytes of a CBOR unsigned integer's canonical encoding."""
    if n >= 1 << 32:  # every timestamp in ms since 1970-02-19
        return 9
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5


#: Standard base64 to base64url (the message-ID alphabet).
_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def check_assignment(assignment: Message, pid: str, slot: int) -> None:
    """Raise `InvalidMessage` unless a stored assignment is the one that was stored.

    Its body must hash to its message ID, and its process and slot must be the
    row's: a flipped byte in the file (SQLite keeps no checksums) is reported,
    not computed. The thorough check (one canonical encoding and one SHA-256,
    about 3 us for a small body): rows read from the file pass the quick one in
    `check_run` unless they are damaged.
    """
    body = assignment.get("body")
    if (
        assignment.get("process") != pid
        or assignment.get("slot") != slot
        or not isinstance(body, Message)
        or _id_of(body) != assignment.get("message-id")
    ):
        raise InvalidMessage(
            f"slot {slot} of process {pid}: the stored assignment does not match its message "
            "ID (the store file is damaged)"
        )


def _id_of(body: Message) -> str:
    try:
        return id_of_bytes(encode(body))
    except InvalidMessage:
        return ""


def check_blob(path: str, blob_id: str, data: object) -> bytes:
    """``data`` if it is the bytes of ``blob_id``; `StoreError` (the file is damaged) if not."""
    if type(data) is not bytes or id_of_bytes(data) != blob_id:
        raise StoreError(
            f"{path}: blob {blob_id} does not match its ID (the store file is damaged)"
        )
    return data
