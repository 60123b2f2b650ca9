"""`FaultyDevice`: an execution device that misbehaves at chosen slots.

It wraps a device and raises, delays, hangs, returns something that is not
a message, or returns a different state each time, at the slots a test
names, as often as it says. The default flavour is ``async def`` and waits
on Trio's clock (so ``slot_timeout`` bounds it); ``blocking=True`` gives
plain methods that block the calling thread, like a CPU-heavy device (for
`hbtrio.run_in_thread`). Counters and the hang count are safe to read from
any thread; `FaultyDevice.wait_hanging` waits for them.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Final

import trio

from .._message import Message
from ._options import check_times

__all__ = ["FaultyDevice"]


class _Invalid:
    """What a device returns at an ``invalid`` slot: not a message."""

    def __repr__(self) -> str:
        return "<invalid device output>"


class FaultyDevice:
    """An execution device wrapper that misbehaves at chosen slots.

    Args:
        inner: the device to wrap (plain or async methods).
        errors: slot -> exception (an instance, a class, or a factory taking
            the slot) raised instead of computing that slot. Slot 0 is
            ``init``.
        delays: slot -> seconds to wait before computing it (Trio's clock;
            with ``blocking=True``, ``time.sleep`` in the calling thread).
        hangs: slots whose computation never finishes (until cancelled, or,
            with ``blocking=True``, until `clear`).
        invalid: slots at which the device returns something that is not a
            message (the engine reports a `hbtrio.ComputeError`).
        nondeterministic: slots whose state gets a random ``"noise"`` key, a
            different one each time the slot is computed.
        times: how often each error, hang or invalid output happens per slot
            (``None``: every time until `clear`).
        blocking: ``False`` (default): ``compute`` and ``init`` are
            ``async def`` and wait with `trio.sleep`, so a hang or delay is
            bounded by ``open_engine(slot_timeout=...)``. ``True``: they are
            plain functions that block the calling thread, like a CPU-heavy
            device; wrap the device in `hbtrio.run_in_thread` to keep the
            event loop free and make ``slot_timeout`` apply.

    ``calls`` counts how often each slot was computed (``init`` is slot 0).
    ``snapshot``/``restore`` are the inner device's, if it has them.
    """

    #: States from this wrapper are checked and frozen by the engine.
    hbtrio_trusted: Final = False

    def __init__(
        self,
        inner: object,
        *,
        errors: Mapping[int, BaseException | type[BaseException] | Callable[[int], BaseException]]
        | None = None,
        delays: Mapping[int, float] | None = None,
        hangs: Collection[int] = (),
        invalid: Collection[int] = (),
        nondeterministic: Collection[int] = (),
        times: int | None = None,
        blocking: bool = False,
    ) -> None:
        self.inner = inner
        self.errors = dict(errors or {})
        self.delays = dict(delays or {})
        self.hangs = set(hangs)
        self.invalid = set(invalid)
        self.nondeterministic = set(nondeterministic)
        self.times = check_times(times)
        self.blocking = blocking
        self.calls: collections.Counter[int] = collections.Counter()
        self._fired: collections.Counter[tuple[str, int]] = collections.Counter()
        #: Computations hanging right now.
        self.hanging = 0
        self._release = threading.Event()
        self._cond = threading.Condition()
        self._changed: trio.Event | None = None
        if blocking:
            self.init = self._init_blocking  # type: ignore[method-assign]
            self.compute = self._compute_blocking  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<FaultyDevice {self.inner!r}>"

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    async def wait_hanging(self, n: int = 1) -> None:
        """Return once at least ``n`` computations are hanging (a checkpoint).

        With ``blocking=True`` it waits in a thread, which an autojump clock
        sees as everything being blocked: use a plain `trio.testing.MockClock`
        (and jump it yourself) or the real clock then.
        """
        if self.blocking:

            def wait() -> None:
                with self._cond:
                    self._cond.wait_for(lambda: self.hanging >= n)

            await trio.to_thread.run_sync(wait, abandon_on_cancel=True)
            return
        await trio.lowlevel.checkpoint()
        while self.hanging < n:
            self._changed = trio.Event()
            await self._changed.wait()

    def _hang_count(self, delta: int) -> None:
        with self._cond:
            self.hanging += delta
            self._cond.notify_all()
        changed = self._changed
        if changed is not None and not self.blocking:
            changed.set()

    def clear(self) -> None:
        """Remove every fault and release computations hanging in threads (``blocking=True``)."""
        self.errors.clear()
        self.delays.clear()
        self.hangs.clear()
        self.invalid.clear()
        self.nondeterministic.clear()
        self._release.set()

    def _fires(self, what: str, slot: int) -> bool:
        if self.times is not None and self._fired[what, slot] >= self.times:
            return False
        self._fired[what, slot] += 1
        return True

    def _error(self, slot: int) -> BaseException | None:
        error = self.errors.get(slot)
        if error is None or not self._fires("error", slot):
            return None
        if isinstance(error, BaseException):
            fresh = type(error)(*error.args)
            fresh.__cause__ = error.__cause__
            return fresh
        made: BaseException = (
            error(f"injected failure at slot {slot}") if isinstance(error, type) else error(slot)
        )
        return made

    def _finish(self, slot: int, state: Any) -> Any:
        if slot in self.invalid and self._fires("invalid", slot):
            return _Invalid()
        if slot in self.nondeterministic:
            return {**state, "noise": secrets.token_hex(8)}
        return state

    # async flavour ---------------------------------------------------------------------------

    async def _before(self, slot: int) -> None:
        self.calls[slot] += 1
        delay = self.delays.get(slot)
        if delay:
            await trio.sleep(delay)
        if slot in self.hangs and self._fires("hang", slot):
            self._hang_count(1)
            try:
                await trio.sleep_forever()
            finally:
                self._hang_count(-1)
        error = self._error(slot)
        if error is not None:
            raise error

    async def init(self, process: Message) -> Any:
        await self._before(0)
        return self._finish(0, await _call(getattr(self.inner, "init"), process))  # noqa: B009

    async def compute(self, state: Message, assignment: Message) -> Any:
        slot = assignment["slot"]
        await self._before(slot)
        new = await _call(getattr(self.inner, "compute"), state, assignment)  # noqa: B009
        return self._finish(slot, new)

    # blocking flavour ------------------------------------------------------------------------

    def _before_blocking(self, slot: int) -> None:
        self.calls[slot] += 1
        delay = self.delays.get(slot)
        if delay:
            time.sleep(delay)
        if slot in self.hangs and self._fires("hang", slot):
            self._hang_count(1)
            try:
                self._release.wait()
            finally:
                self._hang_count(-1)
        error = self._error(slot)
        if error is not None:
            raise error

    def _init_blocking(self, process: Message) -> Any:
        self._before_blocking(0)
        return self._finish(0, _call_plain(getattr(self.inner, "init"), process))  # noqa: B009

    def _compute_blocking(self, state: Message, assignment: Message) -> Any:
        slot = assignment["slot"]
        self._before_blocking(slot)
        new = _call_plain(getattr(self.inner, "compute"), state, assignment)  # noqa: B009
        return self._finish(slot, new)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if isinstance(result, Awaitable):
        return await result
    return result


def _call_plain(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if isinstance(result, Awaitable):
        close = getattr(result, "close", None)
        if close is not None:
            close()  # a coroutine that will never be awaited
        raise TypeError("FaultyDevice(blocking=True) needs an inner device with plain methods")
    return result
