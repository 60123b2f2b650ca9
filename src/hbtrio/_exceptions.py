"""The public error set. Every error hbtrio raises on purpose derives from `HbTrioError`."""

from __future__ import annotations

__all__ = [
    "BlobNotFound",
    "CatchingUp",
    "ComputeError",
    "EngineClosed",
    "HbTrioError",
    "InternalError",
    "InvalidMessage",
    "LeaderDied",
    "Overloaded",
    "ProcessNotFound",
    "SlotNotScheduled",
    "StoreError",
    "StoreFenced",
    "UnknownDevice",
]


class HbTrioError(Exception):
    """Base class of every error hbtrio raises on purpose."""


class InvalidMessage(HbTrioError, ValueError):
    """A message, slot or process definition is malformed.

    The text names the offending key as a path, for example ``body.items[2]``.
    """


class ProcessNotFound(HbTrioError, LookupError):
    """A process ID that was never spawned in this engine's store."""

    def __init__(self, pid: str) -> None:
        super().__init__(f"no process with ID {pid!r}")
        self.pid = pid


class BlobNotFound(HbTrioError, LookupError):
    """A well-formed blob ID (43 base64url characters) of no blob in the engine's store."""

    def __init__(self, blob_id: str) -> None:
        super().__init__(f"no blob with ID {blob_id!r}")
        self.blob_id = blob_id


class UnknownDevice(HbTrioError, LookupError):
    """A device name that no registered device answers to."""

    def __init__(self, name: object, why: str | None = None) -> None:
        super().__init__(f"no device registered as {name!r}" + (f": {why}" if why else ""))
        self.name = name


class ComputeError(HbTrioError):
    """A device failed while computing a slot.

    Attributes:
        phase: ``"compute"`` when the device raised or returned an invalid state,
            ``"get-schedule"`` when the slot's assignment could not be had.
        attempted_slot: the slot that could not be computed (``None`` for a
            generic resolution that has no slot).
        pid: the process ID, when there is one.

    The device's own exception is ``__cause__``. The worker that raised it keeps
    its last good state and goes on serving requests.
    """

    def __init__(
        self,
        message: str,
        *,
        phase: str,
        attempted_slot: int | None,
        pid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.attempted_slot = attempted_slot
        self.pid = pid


class SlotNotScheduled(ComputeError):
    """``compute`` for a slot beyond the latest scheduled one.

    Attributes:
        attempted_slot: the first slot that has no assignment (``latest + 1``).
        requested_slot: the slot that was asked for, when known.
        latest: the latest scheduled slot.
    """

    def __init__(
        self, pid: str, attempted_slot: int, latest: int, *, requested_slot: int | None = None
    ) -> None:
        if requested_slot is None or requested_slot == attempted_slot:
            text = f"slot {attempted_slot} of process {pid} is not scheduled (latest is {latest})"
        else:
            text = (
                f"slot {requested_slot} of process {pid} is not scheduled (latest is {latest}; "
                f"slot {attempted_slot} is the first missing)"
            )
        super().__init__(
            text,
            phase="get-schedule",
            attempted_slot=attempted_slot,
            pid=pid,
        )
        self.latest = latest
        self.requested_slot = requested_slot


class LeaderDied(HbTrioError):
    """The worker a request waited on went away before answering.

    Requests re-route to a fresh worker on their own; a caller sees this only
    when the same request loses its worker several times in a row.
    """


class Overloaded(HbTrioError):
    """A request over one of the engine's bounds, refused at once instead of queued.

    Attributes:
        bound: which bound: ``"max_waiters"``, ``"max_waiters_per_worker"``,
            ``"max_cold_starts"``, ``"max_workers"`` or ``"max_memory"``
            (`CatchingUp`: ``"max_replay"``).
        retry_after: seconds after which trying again is worthwhile.

    Nothing was changed by the refused request. Over HTTP: 503 with
    ``Retry-After``.
    """

    def __init__(self, message: str, *, bound: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.bound = bound
        self.retry_after = retry_after


class CatchingUp(Overloaded):
    """A slot that more than ``max_replay`` slots of computing separate from where it can be had.

    The process's worker computes toward it in the background (it was asked
    to); stored slots keep being answered at once. Ask again later.

    Attributes:
        pid: the process.
        slot: the slot asked for.
        position: the slot computation toward it starts from (the worker's,
            or the nearest snapshot's).

    Over HTTP: 202 with ``Retry-After``.
    """

    def __init__(self, pid: str, slot: int, position: int, *, retry_after: float = 1.0) -> None:
        super().__init__(
            f"slot {slot} of process {pid} is {slot - position} slots of computing away "
            f"(from slot {position}); it is being computed in the background",
            bound="max_replay",
            retry_after=retry_after,
        )
        self.pid, self.slot, self.position = pid, slot, position


class EngineClosed(HbTrioError):
    """The engine's ``open_engine`` block has exited."""


class StoreError(HbTrioError):
    """The store failed (disk full, locked database, I/O error).

    The store's own exception is ``__cause__``. Nothing the failed call was
    asked to make durable was made durable.
    """


class StoreFenced(StoreError):
    """The store refused a write for a process that another holder owns now (fencing).

    A store shared by several nodes (`hbtrio.PostgresStore`) gives each
    process one owner at a time, with an epoch that grows at every takeover;
    a write made under an epoch that is no longer the process's is refused,
    whole. The engine handles it like a lost worker: the process's worker
    ends without storing anything more, and every request waiting on it gets
    this error, to be sent on to the owner (the node forwards it there).

    Attributes:
        pid: the process.
        epoch: the epoch the refused write was made under (``None`` if this
            store never held the process).
        owner: the URL of the node that owns the process now, when known.
    """

    def __init__(
        self, pid: str, message: str, *, epoch: int | None = None, owner: str | None = None
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.epoch = epoch
        self.owner = owner


class InternalError(HbTrioError):
    """Something that should never happen happened: please report it as a bug."""
