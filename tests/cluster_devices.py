"""Devices of the cluster tests' nodes (``--device slow@1.0=cluster_devices:SlowCounter``)."""

from __future__ import annotations

from typing import Any

import trio

import hbtrio


class SlowCounter:
    """``counter@1.0`` whose every slot takes ``body["ms"]`` milliseconds (5 by default),
    awaited: a catch-up is in flight long enough for the tests to kill its node."""

    def init(self, process: hbtrio.Message) -> dict[str, Any]:
        return {"count": 0}

    async def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        body = assignment["body"]
        await trio.sleep(body.get("ms", 5) / 1000)
        return {**state, "count": state["count"] + body.get("n", 0)}


class QuickCounter(SlowCounter):
    """`SlowCounter`'s states without its waits: what a replay of its processes compares."""

    async def compute(self, state: hbtrio.Message, assignment: hbtrio.Message) -> dict[str, Any]:
        return {**state, "count": state["count"] + assignment["body"].get("n", 0)}
