"""`ProcessCore`, the sans-I/O core of one process's log, driven with no Trio run at all.

These tests drive a core the way `hbtrio._driver.Driver` does (`boot_plan` then
`booted`; `step`/`apply` for inline devices; `compute_call` then
`computed_value` for awaited and threaded ones; `snapshot_call` then
`snapshotted` at snapshot points; `failure` and `discard` around every call)
and check what the core promises: where it stands, what it returns, what a
failure leaves behind, and that a device cannot change what the core keeps.

The device calls a core hands out are made here synchronously: a plain one is
called, a threaded one is called in this thread (the driver would use a
worker thread), and an ``async def`` one is run by sending ``None`` into its
coroutine, which works because these devices never wait for anything.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator
from typing import Any, Final

import pytest
import trio
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import hbtrio
from hbtrio._core import AWAIT, BYTES_SNAPSHOT, INLINE, THREAD, Call, ProcessCore
from hbtrio._devices import Counter, DeviceInfo
from hbtrio._message import Message, freeze

PID = "p" * 43


@pytest.fixture(autouse=True)
def _no_trio_run() -> Iterator[None]:
    """Every test here runs outside any Trio run: the core must not need one."""
    with pytest.raises(RuntimeError):
        trio.lowlevel.current_task()
    yield


# -- devices --------------------------------------------------------------------------------------


class Sum:
    """A state device: a running total of the bodies' ``"n"``; fails at ``fail_at``."""

    def __init__(self, *, fail_at: set[int] | None = None) -> None:
        self.fail_at = fail_at or set()
        self.seen: list[int] = []

    def init(self, process: Message) -> dict[str, Any]:
        return {"total": 0}

    def compute(self, state: Message, assignment: Message) -> dict[str, Any]:
        self.seen.append(assignment["slot"])
        if assignment["slot"] in self.fail_at:
            raise RuntimeError(f"sum fails at {assignment['slot']}")
        return {"total": state["total"] + assignment["body"]["n"]}


class AsyncSum(Sum):
    async def compute(self, state: Message, assignment: Message) -> dict[str, Any]:  # type: ignore[override]
        return Sum.compute(self, state, assignment)


class Packed(Sum):
    """A state device with ``snapshot``/``restore``: stores its total as text."""

    def __init__(self) -> None:
        super().__init__()
        self.restored: list[Message] = []

    def snapshot(self, state: Message) -> dict[str, Any]:
        return {"packed": str(state["total"])}

    def restore(self, snapshot: Message) -> dict[str, Any]:
        self.restored.append(snapshot)
        return {"total": int(snapshot["packed"])}


class Ledger:
    """A live device. Its instance keeps a running total, and corrupts itself when it fails."""

    def __init__(self, *, snapshot_bytes: bool = False) -> None:
        self.snapshot_bytes = snapshot_bytes
        self.fail_at: set[int] = set()
        self.snapshot_fail_at: set[int] = set()
        self.boots: list[Any] = []  # what each instance was booted from
        self.instances: list[LedgerInstance] = []
        self.closed = 0

    def boot(self, process: Message, snapshot: Any) -> LedgerInstance:
        self.boots.append(snapshot)
        if snapshot is None:
            total = 0
        elif isinstance(snapshot, bytes):
            total = int(snapshot.decode())
        else:
            total = snapshot["total"]
        instance = LedgerInstance(self, total)
        self.instances.append(instance)
        return instance


class LedgerInstance:
    def __init__(self, device: Ledger, total: int) -> None:
        self.device, self.total, self.at, self.failed = device, total, None, False

    def compute(self, assignment: Message) -> dict[str, Any]:
        assert not self.failed, "computed with an instance that failed before"
        slot = assignment["slot"]
        self.total += assignment["body"]["n"]  # changed before it fails: corrupted then
        self.at = slot
        if slot in self.device.fail_at:
            self.failed = True
            raise RuntimeError(f"ledger fails at {slot}")
        return {"total": self.total}

    def snapshot(self) -> Any:
        if self.at in self.device.snapshot_fail_at:
            self.failed = True
            raise RuntimeError(f"ledger cannot snapshot at {self.at}")
        if self.device.snapshot_bytes:
            return str(self.total).encode()
        return {"total": self.total}

    def close(self) -> None:
        self.device.closed += 1


class AsyncLedger(Ledger):
    async def boot(self, process: Message, snapshot: Any) -> AsyncInstance:  # type: ignore[override]
        return AsyncInstance(Ledger.boot(self, process, snapshot))


class AsyncInstance:
    def __init__(self, inner: LedgerInstance) -> None:
        self.inner = inner

    async def compute(self, assignment: Message) -> dict[str, Any]:
        return self.inner.compute(assignment)

    async def snapshot(self) -> Any:
        return self.inner.snapshot()

    async def close(self) -> None:
        self.inner.close()


# -- driving a core as the driver does ------------------------------------------------------------


def definition(device: str) -> Message:
    return freeze({"device": "process@1.0", "execution-device": device, "owner": {"name": "a"}})


def core_of(device: object, cache_frequency: int = 1, name: str = "dev@1.0") -> ProcessCore:
    return ProcessCore(PID, definition(name), DeviceInfo.of(name, device), cache_frequency)


def assignment(slot: int, n: int = 1) -> Message:
    return freeze(
        {
            "slot": slot,
            "body": {"n": n, "tags": [{"k": "v"}]},
            "process": PID,
            "message-id": f"m{slot}",
            "timestamp": 1_700_000_000_000 + slot,
            "hash-chain": "h",
        }
    )


def assignments(ns: list[int], first: int = 1) -> list[Message]:
    return [assignment(slot, n) for slot, n in enumerate(ns, first)]


def perform(call: Call) -> Any:
    """Make a device call a core asked for, in this thread, without Trio."""
    how, fn, args = call
    if how == AWAIT:
        coroutine = fn(*args)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        coroutine.close()
        raise AssertionError(f"{fn!r} waited for something")
    assert how in (INLINE, THREAD)
    return fn(*args)


def boot(core: ProcessCore, found: tuple[int, Message] | None = None) -> Message | None:
    """`Driver._boot_at` without a store: plan, call, hand the value back."""
    slot, call = core.boot_plan(found)
    value = None if call is None else perform(call)
    return core.booted(slot, value, None if found is None else found[1])


def snapshot_at(core: ProcessCore) -> Message | None:
    """`Driver._snapshot_value`: the snapshot to store at the core's position."""
    call = core.snapshot_call()
    return core.result if call is None else core.snapshotted(perform(call))


def snapshot_or_fail(core: ProcessCore) -> Message | None:
    try:
        return snapshot_at(core)
    except BaseException as exc:
        raise core.failure(core.slot, exc, "snapshot") from exc


def advance(core: ProcessCore, a: Message, snapshots: dict[int, Message]) -> Message:
    """`Driver._apply_one`: one slot through `compute_call`, with its snapshot if due.

    A slot whose snapshot fails is not kept: the core goes back before it.
    """
    slot, before = core.slot + 1, core.result
    try:
        result = core.computed_value(perform(core.compute_call(a)))
    except BaseException as exc:
        raise core.failure(slot, exc) from exc
    if not core.own_snapshots and core.is_snapshot(slot):
        try:
            snapshots[slot] = snapshot_or_fail(core)  # type: ignore[assignment]
        except hbtrio.ComputeError:
            core.slot, core.result = slot - 1, before
            raise
    return result


def step(core: ProcessCore, a: Message, snapshots: dict[int, Message]) -> Message:
    """`GroupWorker.serve_now` for the next slot: `step`, then `snapshot_now` if due.

    A slot whose snapshot fails is not kept (``Driver._undo``).
    """
    before = core.result
    result = core.step(a)
    if core.instance is not None and core.is_snapshot(core.slot):
        try:
            snapshots[core.slot] = core.snapshot_now()
        except hbtrio.ComputeError:
            core.slot, core.result = core.slot - 1, before
            raise
    return result


def totals(ns: list[int], start: int = 0) -> list[int]:
    out, total = [], start
    for n in ns:
        total += n
        out.append(total)
    return out


def results(ns: list[int], first: int = 1, start: int = 0) -> list[dict[str, int]]:
    return [{"total": t, "at-slot": s} for s, t in enumerate(totals(ns, start), first)]


# -- booting --------------------------------------------------------------------------------------


def test_a_new_process_of_a_state_device_boots_with_init_at_slot_0() -> None:
    core = core_of(Sum())
    assert (core.slot, core.ready, core.result) == (-1, False, None)
    slot, call = core.boot_plan(None)
    assert slot == 0
    assert call is not None
    how, fn, args = call
    assert (how, fn.__name__) == (INLINE, "init")
    assert args == (core.definition,)
    assert args[0] is not core.definition  # a private copy: the device is not trusted
    initial = core.booted(0, perform(call))
    assert initial == {"total": 0, "at-slot": 0}
    assert isinstance(initial, hbtrio.Message) and core.result is initial
    assert (core.slot, core.ready, core.inline, core.own_snapshots) == (0, True, True, True)


def test_a_state_device_without_restore_stands_at_its_snapshot_as_it_is() -> None:
    core = core_of(Sum())
    snapshot = freeze({"total": 42, "at-slot": 5})
    assert core.boot_plan((5, snapshot)) == (5, None)  # nothing to call: the snapshot is the state
    assert core.booted(5, None, snapshot) is None  # not a new process: nothing to store
    assert core.result is snapshot and (core.slot, core.ready) == (5, True)
    # A snapshot stored without "at-slot" gets it.
    other = core_of(Sum())
    assert other.booted(7, None, freeze({"total": 1})) is None
    assert other.result == {"total": 1, "at-slot": 7}


def test_a_state_device_with_restore_is_handed_a_copy_of_the_snapshot() -> None:
    device = Packed()
    core = core_of(device, cache_frequency=4)
    assert not core.inline and not core.own_snapshots  # its snapshots are device calls
    snapshot = freeze({"packed": "12"})
    slot, call = core.boot_plan((8, snapshot))
    assert slot == 8 and call is not None
    assert call[:2] == (INLINE, device.restore) and call[2] == (snapshot,)
    assert call[2][0] is not snapshot
    assert core.booted(slot, perform(call), snapshot) is None
    assert core.result == {"total": 12, "at-slot": 8}


def test_a_new_process_of_a_live_device_boots_without_a_snapshot() -> None:
    ledger = Ledger()
    core = core_of(ledger)
    assert not core.ready and not core.inline  # how its instance runs is known once booted
    slot, call = core.boot_plan(None)
    assert slot == 0 and call is not None
    assert call[:2] == (INLINE, ledger.boot)
    assert call[2] == (core.definition, None) and call[2][0] is not core.definition
    initial = core.booted(0, perform(call))
    assert initial == {"at-slot": 0}  # a live device's slot 0 holds nothing else
    assert isinstance(initial, hbtrio.Message)
    assert core.instance is ledger.instances[0]
    assert (core.slot, core.ready, core.inline, core.own_snapshots) == (0, True, True, False)


@pytest.mark.parametrize("snapshot_bytes", [False, True])
def test_a_live_device_boots_from_a_message_or_bytes_snapshot(snapshot_bytes: bool) -> None:
    ledger = Ledger(snapshot_bytes=snapshot_bytes)
    core = core_of(ledger, cache_frequency=3)
    boot(core)
    for a in assignments([1, 2, 3]):
        core.step(a)
    stored = snapshot_at(core)
    if snapshot_bytes:
        assert stored == {BYTES_SNAPSHOT: b"6"} and BYTES_SNAPSHOT == "hbtrio/bytes"
    else:
        assert stored == {"total": 6}
    assert stored is not None
    again = core_of(ledger, cache_frequency=3)
    slot, call = again.boot_plan((3, stored))
    assert slot == 3 and call is not None
    given = call[2][1]
    if snapshot_bytes:
        assert given == b"6" and type(given) is bytes  # unwrapped
    else:
        assert given == stored and given is not stored  # a private copy
    assert again.booted(slot, perform(call), stored) is None
    assert again.result is None  # the result there is stored, not something the instance tells
    assert (again.slot, again.ready) == (3, True)
    assert again.step(assignment(4, 10)) == {"total": 16, "at-slot": 4}


def test_a_bytes_key_among_others_is_an_ordinary_message_snapshot() -> None:
    ledger = Ledger()
    core = core_of(ledger)
    stored = freeze({BYTES_SNAPSHOT: b"1", "total": 5})
    _slot, call = core.boot_plan((2, stored))
    assert call is not None and call[2][1] == stored


def test_how_calls_are_made_follows_the_device() -> None:
    async_core = core_of(AsyncLedger())
    slot, call = async_core.boot_plan(None)
    assert call is not None and call[0] == AWAIT
    async_core.booted(slot, perform(call))
    assert (async_core.how, async_core.inline) == (AWAIT, False)
    threaded = core_of(hbtrio.run_in_thread(Ledger()))
    _slot, call = threaded.boot_plan(None)
    assert call is not None and call[0] == THREAD
    threaded.booted(0, perform(call))
    assert (threaded.how, threaded.inline) == (THREAD, False)
    assert threaded.snapshot_call() is not None
    assert threaded.snapshot_call()[0] == THREAD  # type: ignore[index]
    assert (core_of(AsyncSum()).how, core_of(AsyncSum()).inline) == (AWAIT, False)
    assert core_of(hbtrio.run_in_thread(Sum())).how == THREAD


@pytest.mark.parametrize("missing", ["compute", "snapshot"])
def test_boot_must_return_an_instance_with_compute_and_snapshot(missing: str) -> None:
    class Half:
        pass

    if missing == "snapshot":
        Half.compute = lambda self, a: {}  # type: ignore[attr-defined]
    else:
        Half.snapshot = lambda self: {}  # type: ignore[attr-defined]

    class Device:
        def boot(self, process: Message, snapshot: Any) -> Half:
            return Half()

    core = core_of(Device())
    with pytest.raises(hbtrio.InvalidMessage, match=f"no instance with {missing}"):
        boot(core)
    assert (core.slot, core.ready, core.instance) == (-1, False, None)


def test_a_boot_whose_value_is_refused_leaves_the_core_where_it_was() -> None:
    """A boot (a jump to a later snapshot) whose value is not a state moves nothing."""

    class BadRestore(Packed):
        def restore(self, snapshot: Message) -> Any:
            return ["not", "a", "state"]

    core = core_of(BadRestore(), cache_frequency=2)
    boot(core)
    core.computed_value(perform(core.compute_call(assignment(1, 5))))
    before = core.result
    with pytest.raises(hbtrio.InvalidMessage):
        boot(core, (6, freeze({"packed": "9"})))
    assert core.slot == 1 and core.result is before  # the result at its slot still
    assert before is not None and before["at-slot"] == core.slot

    live = core_of(Ledger())
    boot(live)
    live.step(assignment(1))
    at, result = live.slot, live.result
    live.instance = None  # the driver closes the instance before it jumps
    with pytest.raises(hbtrio.InvalidMessage):
        live.booted(4, object(), freeze({"total": 3}))
    assert (live.slot, live.result, live.instance) == (at, result, None)


@pytest.mark.parametrize("kind", ["state", "restore", "live"])
def test_booting_at_the_snapshot_of_slot_0_is_not_a_new_process(kind: str) -> None:
    """Only a new process has a slot 0 to store; restoring at slot 0 stores nothing again."""
    device: object = {"state": Sum(), "restore": Packed(), "live": Ledger()}[kind]
    first = core_of(device)
    initial = boot(first)
    assert initial is not None and initial["at-slot"] == 0
    stored = snapshot_at(first)
    assert stored is not None
    again = core_of(device)
    assert boot(again, (0, stored)) is None
    assert again.slot == 0 and again.ready


# -- computing inline -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", [Sum, Counter, Ledger])
def test_step_moves_the_core_and_returns_each_result(device: type) -> None:
    core = core_of(device(), name="counter@1.0" if device is Counter else "dev@1.0")
    boot(core)
    ns = [3, 1, 4, 1, 5]
    got = [core.step(a) for a in assignments(ns)]
    key = "count" if device is Counter else "total"
    assert [r[key] for r in got] == totals(ns)
    assert [r["at-slot"] for r in got] == [1, 2, 3, 4, 5]
    assert core.slot == 5 and core.result is got[-1] and core.computed == 5


def test_results_of_untrusted_devices_are_read_only_messages() -> None:
    for device in (Sum(), Ledger()):
        core = core_of(device)
        boot(core)
        result = core.step(assignment(1, 2))
        assert isinstance(result, hbtrio.Message)
        with pytest.raises(TypeError):
            result["total"] = 0  # type: ignore[index]


def test_snapshots_are_due_every_cache_frequency() -> None:
    core = core_of(Ledger(), cache_frequency=3)
    assert [s for s in range(11) if core.is_snapshot(s)] == [0, 3, 6, 9]
    boot(core)
    out: list[Message] = []
    snapshots: dict[int, Message] = {}
    assert core.apply(assignments([1] * 10), out, snapshots) is None
    assert out == results([1] * 10)
    assert snapshots == {3: {"total": 3}, 6: {"total": 6}, 9: {"total": 9}}
    # A state device without a snapshot hook: every state is its own snapshot, nothing to take.
    plain = core_of(Sum(), cache_frequency=3)
    boot(plain)
    taken: dict[int, Message] = {}
    assert plain.apply(assignments([1] * 10), [], taken) is None
    assert taken == {} and plain.own_snapshots and plain.snapshot_call() is None


def test_a_state_device_with_a_snapshot_hook_is_snapshotted_by_call() -> None:
    device = Packed()
    core = core_of(device, cache_frequency=2)
    boot(core)
    snapshots: dict[int, Message] = {}
    for a in assignments([5, 6, 7]):
        advance(core, a, snapshots)
    assert snapshots == {2: {"packed": "11"}}
    call = core.snapshot_call()
    assert call is not None and call[:2] == (INLINE, device.snapshot)
    assert call[2] == (core.result,) and call[2][0] is not core.result


# -- batches, in any split ------------------------------------------------------------------------


def _split(items: list[Message], cuts: list[int]) -> list[list[Message]]:
    bounds = sorted({c % (len(items) + 1) for c in cuts} | {0, len(items)})
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


def _make(kind: str, cache_frequency: int) -> tuple[ProcessCore, Any]:
    device: Any = {"sum": Sum, "counter": Counter, "ledger": Ledger}[kind]()
    return core_of(device, cache_frequency, "counter@1.0" if kind == "counter" else "d@1.0"), device


def _norm(result: Message) -> tuple[int, int]:
    return result.get("total", result.get("count")), result["at-slot"]  # type: ignore[return-value]


ns_strategy = st.lists(st.integers(-5, 5), min_size=1, max_size=30)
modes = st.lists(st.sampled_from(["apply", "step", "call"]), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["sum", "counter", "ledger"]),
    cache_frequency=st.integers(1, 7),
    ns=ns_strategy,
    cuts=st.lists(st.integers(0, 30), max_size=8),
    how=modes,
    fail=st.none() | st.integers(1, 30),
    in_snapshot=st.booleans(),
)
def test_any_split_into_batches_gives_the_results_of_one_by_one(
    kind: str,
    cache_frequency: int,
    ns: list[int],
    cuts: list[int],
    how: list[str],
    fail: int | None,
    in_snapshot: bool,
) -> None:
    """Applying a log in batches of any sizes, by `apply`, `step` or `compute_call`, ends
    where one slot at a time ends: the same results, snapshots, position and failure
    (a failing ``compute``, or for a live instance a failing ``snapshot``)."""
    in_snapshot = in_snapshot and kind == "ledger" and fail is not None
    if in_snapshot:
        assert fail is not None
        fail = max(cache_frequency, fail - fail % cache_frequency)  # a snapshot point

    def run(batches: list[list[Message]], ways: list[str]) -> tuple[Any, ...]:
        core, device = _make(kind, cache_frequency)
        if kind == "counter":
            bad = set() if fail is None else {fail}
            batches = [
                [a if a["slot"] not in bad else assignment(a["slot"], "x") for a in b]  # type: ignore[arg-type]
                for b in batches
            ]
        elif in_snapshot:
            device.snapshot_fail_at = {fail}
        elif fail is not None:
            device.fail_at = {fail}
        boot(core)
        out: list[Message] = []
        snapshots: dict[int, Message] = {}
        error = None
        for i, batch in enumerate(batches):
            way = ways[i % len(ways)]
            if way == "apply":
                error = core.apply(batch, out, snapshots)
            else:
                try:
                    for a in batch:
                        out.append((step if way == "step" else advance)(core, a, snapshots))  # noqa: PERF401
                except hbtrio.ComputeError as exc:
                    error = exc
            if error is not None:
                break
        failed = None if error is None else (error.phase, error.attempted_slot)
        return [_norm(r) for r in out], snapshots, core.slot, core.computed, core.ready, failed

    log = assignments(ns)
    one_by_one = run([[a] for a in log], ["step"])
    assert run(_split(log, cuts), how) == one_by_one
    stop = len(ns) if fail is None or fail > len(ns) else fail - 1
    assert one_by_one[0] == [(t, s) for s, t in enumerate(totals(ns[:stop]), 1)]
    assert one_by_one[2] == stop
    assert one_by_one[5] == (None if stop == len(ns) else ("compute", fail))
    assert one_by_one[4] == (kind != "ledger" or stop == len(ns))  # a failed instance is gone


@settings(max_examples=100, deadline=None)
@given(
    cache_frequency=st.integers(1, 6),
    ns=st.lists(st.integers(-5, 5), min_size=1, max_size=25),
    fail=st.integers(1, 25),
    snapshot_fails=st.booleans(),
    snapshot_bytes=st.booleans(),
)
def test_a_failed_instance_rebuilt_from_its_latest_snapshot_ends_where_no_failure_would(
    cache_frequency: int, ns: list[int], fail: int, snapshot_fails: bool, snapshot_bytes: bool
) -> None:
    """A failure at any slot (in ``compute`` or in ``snapshot``), then a rebuild as the
    driver does it (boot at the latest snapshot at or below the position, replay), then
    the rest of the log: the results are those of a run that never failed, and no
    instance that failed is ever called again (`LedgerInstance.compute` asserts it)."""
    fail = min(fail, len(ns))
    ledger = Ledger(snapshot_bytes=snapshot_bytes)
    if snapshot_fails:
        fail = max(cache_frequency, fail - fail % cache_frequency)  # a snapshot point
        assume(fail <= len(ns))
        ledger.snapshot_fail_at = {fail}
    else:
        ledger.fail_at = {fail}
    core = core_of(ledger, cache_frequency)
    assert boot(core) == {"at-slot": 0}
    first = snapshot_at(core)  # stored with slot 0, as the driver does
    assert first is not None
    store: dict[int, Message] = {}  # slot -> result
    stored_snapshots = {0: first}
    log = assignments(ns)
    out: list[Message] = []
    snapshots: dict[int, Message] = {}
    error = core.apply(log, out, snapshots)
    assert error is not None and error.attempted_slot == fail
    assert isinstance(error.__cause__, RuntimeError)
    assert core.slot == fail - 1 == len(out) and not core.ready
    store.update({r["at-slot"]: r for r in out})
    stored_snapshots.update(snapshots)
    broken = ledger.instances[-1]
    close = core.discard()
    assert close is not None and close[1] == broken.close
    perform(close)
    assert core.discard() is None  # handed out once
    # The rebuild (`Driver.rebuild`): latest snapshot at or below the position, then replay.
    ledger.fail_at = ledger.snapshot_fail_at = set()
    at, result = core.slot, core.result
    found = max(s for s in stored_snapshots if s <= at)
    boot(core, (found, stored_snapshots[found]))
    for a in log[found:at]:
        core.step(a)
    core.result = result
    assert core.slot == at and core.ready and core.instance is not broken
    rest: list[Message] = []
    assert core.apply(log[at:], rest, snapshots) is None
    store.update({r["at-slot"]: r for r in rest})
    assert [store[s] for s in range(1, len(ns) + 1)] == results(ns)
    assert ledger.closed == 1
    expected = stored_snapshots[found]
    assert ledger.boots[-1] == (expected[BYTES_SNAPSHOT] if snapshot_bytes else expected)


# -- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc", [RuntimeError("x"), KeyboardInterrupt(), SystemExit(3), GeneratorExit(), TypeError()]
)
def test_any_exception_from_a_device_is_a_compute_error(exc: BaseException) -> None:
    core = core_of(Sum())
    error = core.failure(7, exc, "restore")
    assert isinstance(error, hbtrio.ComputeError)
    assert (error.phase, error.attempted_slot, error.pid) == ("compute", 7, PID)
    assert error.__cause__ is exc
    assert "restore failed at slot 7" in str(error)
    assert core.failure(3, exc).args[0].startswith(f"process {PID}: compute failed at slot 3")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, ValueError])
def test_a_failing_step_leaves_a_state_device_where_it_was(exc: type[BaseException]) -> None:
    class Raises(Sum):
        failed = False

        def compute(self, state: Message, a: Message) -> dict[str, Any]:
            if a["slot"] == 3 and not self.failed:
                self.failed = True
                raise exc()
            return Sum.compute(self, state, a)

    core = core_of(Raises())
    boot(core)
    core.step(assignment(1))
    core.step(assignment(2))
    before = core.result
    with pytest.raises(hbtrio.ComputeError) as info:
        core.step(assignment(3))
    assert info.value.attempted_slot == 3 and isinstance(info.value.__cause__, exc)
    assert (core.slot, core.result, core.computed) == (2, before, 2)
    assert core.ready and core.inline and core.discard() is None  # nothing to throw away
    assert core.step(assignment(3)) == {"total": 3, "at-slot": 3}  # slot 3 again, from slot 2


def test_a_failing_step_throws_a_live_instance_away() -> None:
    ledger = Ledger()
    ledger.fail_at = {3}
    core = core_of(ledger)
    boot(core)
    core.step(assignment(1))
    core.step(assignment(2))
    instance, before = core.instance, core.result
    with pytest.raises(hbtrio.ComputeError) as info:
        core.step(assignment(3))
    assert info.value.attempted_slot == 3 and info.value.phase == "compute"
    assert (core.slot, core.result) == (2, before)
    assert core.instance is None and not core.ready and not core.inline
    assert instance.total == 3  # the instance did change before it failed: never used again
    assert core.discard() == (INLINE, instance.close, ())
    assert core.discard() is None


def test_discard_hands_out_the_close_call_of_the_device_kind() -> None:
    for device, how in ((AsyncLedger(), AWAIT), (hbtrio.run_in_thread(Ledger()), THREAD)):
        core = core_of(device)
        boot(core)
        instance = core.instance
        core.failure(1, RuntimeError())
        call = core.discard()
        assert call is not None and call[0] == how and call[1] == instance.close

    class NoClose:
        def compute(self, a: Message) -> dict[str, Any]:
            return {}

        def snapshot(self) -> dict[str, Any]:
            return {}

    class Device:
        def boot(self, process: Message, snapshot: Any) -> NoClose:
            return NoClose()

    core = core_of(Device())
    boot(core)
    core.failure(1, RuntimeError())
    assert not core.ready and core.discard() is None  # nothing to close
    unbooted = core_of(Ledger())
    unbooted.failure(0, RuntimeError(), "boot")  # the boot failed: no instance yet
    assert unbooted.discard() is None


def test_apply_stops_at_the_failing_slot_and_keeps_the_results_before_it() -> None:
    for kind in ("sum", "counter", "ledger"):
        core, device = _make(kind, 2)
        log = assignments([1, 2, 3, 4, 5])
        if kind == "counter":
            log[3] = assignment(4, "bad")  # type: ignore[arg-type]
        else:
            device.fail_at = {4}
        boot(core)
        out: list[Message] = []
        snapshots: dict[int, Message] = {}
        error = core.apply(log, out, snapshots)
        assert error is not None and error.attempted_slot == 4, kind
        assert [_norm(r) for r in out] == [(1, 1), (3, 2), (6, 3)]
        assert core.slot == 3 and core.result is out[-1] and core.computed == 3
        assert snapshots == ({2: {"total": 3}} if kind == "ledger" else {})


def test_a_failing_snapshot_fails_its_slot_and_leaves_the_core_before_it() -> None:
    """Inline (`apply`, `snapshot_now`) as awaited (`snapshot_call`): the slot whose snapshot
    failed is not kept, and the instance that took it is thrown away."""
    ledger = Ledger()
    ledger.snapshot_fail_at = {4}
    core = core_of(ledger, cache_frequency=2)
    boot(core)
    out: list[Message] = []
    snapshots: dict[int, Message] = {}
    error = core.apply(assignments([1, 1, 1, 1, 1]), out, snapshots)
    assert error is not None and error.attempted_slot == 4 and "snapshot failed" in str(error)
    assert [r["at-slot"] for r in out] == [1, 2, 3] and snapshots == {2: {"total": 2}}
    assert core.slot == 3 and core.result is out[-1]
    assert not core.ready and core.discard() is not None

    direct = core_of(ledger, cache_frequency=2)
    boot(direct)
    direct.step(assignment(1))
    direct.step(assignment(2))
    direct.step(assignment(3))
    direct.step(assignment(4))
    with pytest.raises(hbtrio.ComputeError) as info:
        direct.snapshot_now()
    assert info.value.attempted_slot == 4 and not direct.ready


def test_a_result_that_is_not_a_message_fails_the_slot() -> None:
    class Garbage:
        calls = 0

        def init(self, process: Message) -> dict[str, Any]:
            return {"n": 0}

        def compute(self, state: Message, a: Message) -> Any:
            self.calls += 1
            return {0: "non-str key"} if self.calls == 1 else {"n": 2**64}

    core = core_of(Garbage())
    boot(core)
    before = core.result
    for _ in range(2):  # a key that is not a str; an int out of range
        with pytest.raises(hbtrio.ComputeError) as info:
            core.step(assignment(1))
        assert isinstance(info.value.__cause__, hbtrio.InvalidMessage)
        assert (core.slot, core.result) == (0, before)
    # The same value through `computed_value` (an awaited device): refused before it moves.
    with pytest.raises(hbtrio.InvalidMessage):
        core.computed_value(["not", "a", "mapping"])
    assert (core.slot, core.result, core.computed) == (0, before, 0)
    live = core_of(Ledger())
    boot(live)
    with pytest.raises(hbtrio.InvalidMessage):
        live.computed_value("nope")
    error = live.failure(1, hbtrio.InvalidMessage("nope"))  # what the driver then does
    assert error.attempted_slot == 1 and live.discard() is not None and live.slot == 0


def test_any_mapping_is_a_state_and_nothing_else_is() -> None:
    class Proxy(Sum):
        def compute(self, state: Message, a: Message) -> Any:
            if a["body"]["n"] < 0:
                return [("total", 1)]
            return types.MappingProxyType({"total": a["body"]["n"], "list": [1, {"k": 2}]})

    core = core_of(Proxy())
    boot(core)
    assert repr(core) == f"<ProcessCore {PID} dev@1.0 at 0>"
    result = core.step(assignment(1, 3))
    assert result == {"total": 3, "list": [1, {"k": 2}], "at-slot": 1}
    assert isinstance(result, hbtrio.Message) and isinstance(result["list"], hbtrio.FrozenList)
    with pytest.raises(hbtrio.ComputeError) as info:
        core.step(assignment(2, -1))
    assert "must be a mapping" in str(info.value.__cause__)


def test_a_device_returning_at_slot_gets_it_replaced() -> None:
    class Liar(Sum):
        def compute(self, state: Message, a: Message) -> dict[str, Any]:
            return {"total": 1, "at-slot": 999}

    core = core_of(Liar())
    boot(core)
    assert core.step(assignment(1)) == {"total": 1, "at-slot": 1}


# -- what untrusted devices are handed ------------------------------------------------------------


def _vandalize(message: Message) -> None:
    """Change ``message`` in place, as a device reaching past the read-only API would."""
    for key, value in list(message.items()):
        if isinstance(value, dict):
            _vandalize(value)
        elif isinstance(value, tuple):
            for item in value:
                if isinstance(item, dict):
                    _vandalize(item)
        dict.__setitem__(message, key, "vandalized")
    dict.__setitem__(message, "added", True)


NESTED: Final = {"items": [{"k": 1}], "deep": {"x": [1, 2]}}


class VandalState:
    """A state device that changes in place everything it is handed, after reading it."""

    def init(self, process: Message) -> dict[str, Any]:
        _vandalize(process)
        return {"total": 0, "nested": NESTED}

    def compute(self, state: Message, a: Message) -> dict[str, Any]:
        new = {"total": state["total"] + a["body"]["n"], "nested": NESTED}
        _vandalize(state)
        _vandalize(a)
        return new


class Vandal(VandalState):
    """The same, with snapshot and restore hooks that change what they are handed."""

    def snapshot(self, state: Message) -> dict[str, Any]:
        new = {"total": state["total"]}
        _vandalize(state)
        return new

    def restore(self, snapshot: Message) -> dict[str, Any]:
        new = {"total": snapshot["total"], "nested": NESTED}
        _vandalize(snapshot)
        return new


class AsyncVandal(Vandal):
    async def compute(self, state: Message, a: Message) -> dict[str, Any]:  # type: ignore[override]
        return Vandal.compute(self, state, a)


@pytest.mark.parametrize(
    "device", [VandalState(), Vandal(), AsyncVandal(), hbtrio.run_in_thread(Vandal())]
)
def test_a_state_device_that_mutates_its_inputs_cannot_change_the_core(device: object) -> None:
    core = core_of(device, cache_frequency=1)
    boot(core)
    assert hbtrio.encode(core.definition) == hbtrio.encode(definition("dev@1.0"))
    initial = core.result
    assert initial is not None
    kept_initial = hbtrio.encode(initial)
    kept = assignment(1, 5)
    if core.inline:  # step (a plain device without hooks), else compute_call
        core.step(kept)
    else:
        advance(core, kept, {})
    assert hbtrio.encode(kept) == hbtrio.encode(assignment(1, 5))  # the driver's, the store's
    assert hbtrio.encode(initial) == kept_initial  # the state before: never handed out as is
    result = core.result
    assert result == {"total": 5, "nested": NESTED, "at-slot": 1}
    snapshot = snapshot_at(core)  # the snapshot call is handed a copy of the result
    assert snapshot is not None and result is not None
    assert hbtrio.encode(result) == hbtrio.encode({"total": 5, "nested": NESTED, "at-slot": 1})
    kept_snapshot = hbtrio.encode(snapshot)
    restored = core_of(device, cache_frequency=1)
    boot(restored, (1, snapshot))
    assert hbtrio.encode(snapshot) == kept_snapshot  # restore was handed a copy
    assert restored.result == result


class VandalLedger(Ledger):
    def boot(self, process: Message, snapshot: Any) -> VandalInstance:
        instance = VandalInstance(Ledger.boot(self, process, snapshot))
        _vandalize(process)
        if isinstance(snapshot, dict):
            _vandalize(snapshot)
        return instance


class VandalInstance:
    def __init__(self, inner: LedgerInstance) -> None:
        self.inner = inner

    def compute(self, a: Message) -> dict[str, Any]:
        result = self.inner.compute(a)
        _vandalize(a)
        return result

    def snapshot(self) -> Any:
        return self.inner.snapshot()


def test_a_live_device_that_mutates_its_inputs_cannot_change_the_core() -> None:
    ledger = VandalLedger()
    core = core_of(ledger)
    pristine = hbtrio.encode(definition("dev@1.0"))
    boot(core)
    assert hbtrio.encode(core.definition) == pristine
    kept = assignment(1, 5)
    core.step(kept)
    kept2 = assignment(2, 1)
    core.computed_value(perform(core.compute_call(kept2)))  # the awaited path's copy
    assert [hbtrio.encode(a) for a in (kept, kept2)] == [
        hbtrio.encode(assignment(1, 5)),
        hbtrio.encode(assignment(2, 1)),
    ]
    assert core.result == {"total": 6, "at-slot": 2}
    snapshot = freeze({"total": 6, "extra": {"k": [{"v": 1}]}})
    kept_snapshot = hbtrio.encode(snapshot)
    again = core_of(ledger)
    boot(again, (2, snapshot))
    assert hbtrio.encode(snapshot) == kept_snapshot
    assert hbtrio.encode(again.definition) == pristine


def test_what_a_device_returns_is_adopted_by_copy() -> None:
    """Changing a returned mapping afterwards (even a nested one) changes no result."""
    kept: list[dict[str, Any]] = []

    class Keeper(Sum):
        def compute(self, state: Message, a: Message) -> dict[str, Any]:
            inner = {"v": [1]}
            new = {"total": 1, "inner": inner}
            kept.append(new)
            return new

    core = core_of(Keeper())
    boot(core)
    result = core.step(assignment(1))
    kept[0]["total"] = 2
    kept[0]["inner"]["v"].append(2)
    assert result == {"total": 1, "inner": {"v": [1]}, "at-slot": 1}


def test_trusted_devices_are_handed_the_core_s_own_messages() -> None:
    """The built-in devices are trusted (`hbtrio_trusted`): no copies for them."""
    core = core_of(Counter(), name="counter@1.0")
    _slot, call = core.boot_plan(None)
    assert call is not None and call[2][0] is core.definition
    boot(core)
    a = assignment(1)
    _how, _fn, args = core.compute_call(a)
    assert args[0] is core.result and args[1] is a


# -- awaited and threaded calls -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "how"),
    [(AsyncSum(), AWAIT), (hbtrio.run_in_thread(Sum()), THREAD), (AsyncLedger(), AWAIT)],
)
def test_compute_call_and_computed_value_move_the_core_slot_by_slot(
    device: object, how: str
) -> None:
    core = core_of(device, cache_frequency=2)
    boot(core)
    assert not core.inline and core.how == how
    snapshots: dict[int, Message] = {}
    ns = [2, 7, 1, 8]
    got = []
    for a in assignments(ns):
        call = core.compute_call(a)
        assert call[0] == how
        if core.instance is None:  # a state device: (state, assignment), both copies
            assert call[2][0] == core.result and call[2][0] is not core.result
            assert call[2][1] == a and call[2][1] is not a
        else:
            assert call[2] == (a,) and call[2][0] is not a
        assert core.slot == a["slot"] - 1  # asking for the call moves nothing
        got.append(core.computed_value(perform(call)))
        assert core.slot == a["slot"] and core.result is got[-1]
        if core.instance is not None and core.is_snapshot(core.slot):
            snapshots[core.slot] = snapshot_at(core)  # type: ignore[assignment]
    assert got == results(ns) and core.computed == 4
    if core.instance is not None:
        assert snapshots == {2: {"total": 9}, 4: {"total": 18}}


def test_snapshotted_stores_bytes_as_a_one_key_message() -> None:
    core = core_of(Ledger())
    for value in (b"\x00ab", bytearray(b"\x00ab"), memoryview(b"\x00ab")):
        stored = core.snapshotted(value)
        assert stored == {"hbtrio/bytes": b"\x00ab"}
        assert type(stored["hbtrio/bytes"]) is bytes and isinstance(stored, hbtrio.Message)
    assert core.snapshotted({"total": [1, {"a": 2}]}) == {"total": [1, {"a": 2}]}
    with pytest.raises(hbtrio.InvalidMessage):
        core.snapshotted(["a", "list"])
    with pytest.raises(hbtrio.InvalidMessage):
        core.snapshotted({"bad": {1, 2}})
