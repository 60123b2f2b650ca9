"""Consistency: replaying a process from scratch, and auditing what a store holds.

`replay` computes a process's states with a fresh driver and an in-memory
store, no engine; `assert_deterministic` replays twice and compares message
IDs; `audit_process` checks a store's schedule (IDs and hash chain),
every stored result and every snapshot of one process against a replay.
They only read the store given to them, and block (on it, and on the
device) as the engine would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .._core import ProcessCore
from .._devices import DeviceHost, Devices
from .._driver import Driver
from .._exceptions import BlobNotFound
from .._message import Message, freeze, message_id, validate_blob_id
from .._process import validate_definition
from .._scheduler import make_assignment, verify_schedule
from .._store import MemoryStore, Store

__all__ = ["AuditError", "AuditReport", "assert_deterministic", "audit_process", "replay"]


class AuditError(AssertionError):
    """`audit_process` or `assert_deterministic` found something inconsistent."""


@attrs.frozen
class AuditReport:
    """What `audit_process` checked for one process."""

    pid: str
    #: The latest scheduled slot.
    latest_slot: int
    #: Slots that have a stored result (each equal to the replayed state).
    results: int
    #: Scheduled slots without a stored result (computed later, or never).
    missing_results: int
    #: Stored snapshots (each restoring to the replayed state).
    snapshots: int


def _registry(
    devices: Mapping[str, object] | Devices | None, store: Store | None = None
) -> Devices:
    """The devices as an engine would have them: attached (`DeviceHost`) to blobs of ``store``."""
    if isinstance(devices, Devices):
        return devices
    registry = Devices(devices)

    async def get_blob(blob_id: str) -> bytes:
        validate_blob_id(blob_id)
        data = None if store is None else await store.get_blob(blob_id)
        if data is None:
            raise BlobNotFound(blob_id)
        return data

    registry.attach(DeviceHost(None, get_blob))
    return registry


async def _replay_assignments(
    registry: Devices,
    definition: Message,
    assignments: Sequence[Message],
    cache_frequency: int,
    found: tuple[int, Message] | None = None,
) -> list[Message | None]:
    """The results of a replay (from ``found``, else slot 0) of ``assignments`` (after it)."""
    device = registry.get(definition["execution-device"])
    pid = assignments[0]["process"] if assignments else message_id(definition)
    driver = Driver(ProcessCore(pid, definition, device, cache_frequency), MemoryStore())
    try:
        return await driver.replay(list(assignments), found)
    finally:
        await driver.close()


async def replay(
    definition: Mapping[str, Any],
    bodies: Iterable[Mapping[str, Any]],
    devices: Mapping[str, object] | None = None,
    *,
    blobs: Store | None = None,
) -> list[Message]:
    """The states of a process at slots 0, 1, ... computed from scratch, without any engine.

    ``bodies`` are the messages scheduled at slots 1, 2, ...; ``devices`` are
    the extra devices as for `hbtrio.open_engine` (attached to the blobs of
    the store ``blobs``, for a process that names its module by blob ID).
    Device failures raise `hbtrio.ComputeError` as in the engine. The
    reference to compare an engine's answers with (by value or by
    `hbtrio.message_id`).
    """
    registry = _registry(devices, blobs)
    defn = validate_definition(definition, registry)
    pid = message_id(defn)
    assignment, chain = make_assignment(pid, 0, defn, b"", mid=pid)
    assignments = [assignment]
    for slot, body in enumerate(bodies, start=1):
        assignment, chain = make_assignment(pid, slot, freeze(body, what="body"), chain)
        assignments.append(assignment)
    states = await _replay_assignments(registry, defn, assignments[1:], 1)
    return states  # type: ignore[return-value]  # from slot 0: every result is there


async def assert_deterministic(
    definition: Mapping[str, Any],
    bodies: Sequence[Mapping[str, Any]],
    devices: Mapping[str, object] | None = None,
    *,
    runs: int = 2,
    blobs: Store | None = None,
) -> list[Message]:
    """Replay a process ``runs`` times; raise `AuditError` at the first slot whose states differ.

    Compares states by `hbtrio.message_id`, which is what a worker restarted
    on another node would be checked against. Returns the states of the
    first run.
    """
    first = await replay(definition, bodies, devices, blobs=blobs)
    ids = [message_id(s) for s in first]
    for run in range(1, runs):
        again = await replay(definition, bodies, devices, blobs=blobs)
        for slot, (a, b) in enumerate(zip(ids, again, strict=True)):
            if a != message_id(b):
                raise AuditError(
                    f"the device is not deterministic: slot {slot} differs between run 1 and "
                    f"run {run + 1}: {first[slot]!r} != {b!r}"
                )
    return first


async def audit_process(
    store: Store,
    pid: str,
    devices: Mapping[str, object] | None = None,
    *,
    require_results: bool = False,
) -> AuditReport:
    """Check everything ``store`` holds for ``pid`` against a replay from scratch.

    - the schedule is gap-free from slot 0 and its IDs and hash chain verify
      (`hbtrio.verify_schedule`);
    - every stored result equals the state replayed at its slot (by
      `hbtrio.message_id`) and says ``"at-slot": slot``;
    - every stored snapshot restores to the state replayed at its slot;
    - with ``require_results``, every scheduled slot has a result.

    Raises `AuditError` naming the first problem; returns an `AuditReport`.
    The store must be open; this only reads. ``devices`` are the extra
    devices as for `hbtrio.open_engine` (attached to the store's blobs).
    """
    registry = _registry(devices, store)
    definition = await store.get_process(pid)
    if definition is None:
        raise AuditError(f"process {pid} is not in the store")
    latest = await store.latest_slot(pid)
    assignments = await store.get_assignments(pid, 0, latest + 1)
    if len(assignments) != latest + 1:
        raise AuditError(
            f"process {pid}: {len(assignments)} assignments stored for slots 0..{latest}"
        )
    try:
        verify_schedule(pid, assignments)
    except Exception as exc:
        raise AuditError(f"process {pid}: the schedule does not verify: {exc}") from exc
    if message_id(definition) != pid or assignments[0]["body"] != definition:
        raise AuditError(f"process {pid}: slot 0 is not the process definition")
    expected = await _replay_assignments(registry, definition, assignments[1:], 1)
    ids = [message_id(s) for s in expected]  # type: ignore[arg-type]  # none is None
    results = missing = 0
    for slot in range(latest + 1):
        stored = await store.get_result(pid, slot)
        if stored is None:
            missing += 1
            if require_results:
                raise AuditError(f"process {pid}: slot {slot} has no stored result")
            continue
        if stored.get("at-slot") != slot or message_id(stored) != ids[slot]:
            raise AuditError(
                f"process {pid}: the stored result at slot {slot} is {stored!r}, "
                f"a replay gives {expected[slot]!r}"
            )
        results += 1
    # Any slots beyond the schedule must not have results.
    beyond = await store.get_result(pid, latest + 1)
    if beyond is not None:
        raise AuditError(f"process {pid}: a result is stored for unscheduled slot {latest + 1}")
    snapshots = 0
    at_most = checked_from = latest
    while at_most >= 0:
        found = await store.latest_snapshot(pid, at_most)
        if found is None:
            break
        slot = found[0]
        if not 0 <= slot <= at_most:
            raise AuditError(f"process {pid}: latest_snapshot(<= {at_most}) gave slot {slot}")
        # Restored, the snapshot gives the state there (a state device), or the same
        # results as the replay up to the next snapshot (a live instance).
        upto = min(latest, checked_from) + 1
        replayed = await _replay_assignments(
            registry, definition, assignments[slot + 1 : upto], 1, found
        )
        for s, state in enumerate(replayed, slot):
            if state is not None and message_id(state) != ids[s]:
                raise AuditError(
                    f"process {pid}: the snapshot at slot {slot} restores to {state!r} at slot "
                    f"{s}, a replay gives {expected[s]!r}"
                )
        snapshots += 1
        checked_from = slot
        at_most = slot - 1
    return AuditReport(pid, latest, results, missing, snapshots)
