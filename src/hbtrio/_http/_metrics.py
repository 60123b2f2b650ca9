"""The node's numbers: request counters, latency histograms, connection counts, Prometheus text.

`HttpMetrics` belongs to one `HttpApp`: the app records every answered
request (method, route, status, seconds), the accept loop
(``_connections``) keeps the `ConnectionCounts`, and ``GET /metrics``
renders both, with the engine's statistics, in the Prometheus text format
0.0.4 (`PROMETHEUS`). Label sets stay bounded: the app records the route
pattern (``/{pid}/compute``; ``other`` when none matches), never the path,
and an unknown method as ``other``.

Plain objects updated synchronously, without locks: they must be used from
the one Trio loop the app runs on. Recording costs a dict update and a
bucket search, done after the answer was sent.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Final

import attrs

from ._plain import stats_fields, waiting

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._types import EngineLike

#: The media type of the Prometheus text exposition.
PROMETHEUS: Final = "text/plain; version=0.0.4; charset=utf-8"

_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BUCKETS_TAIL: Final = (5.0, 10.0, 30.0, 60.0, math.inf)
BUCKETS: Final = _BUCKETS + _BUCKETS_TAIL

#: Engine statistics that only ever grow, exported as Prometheus counters.
_COUNTERS: Final = frozenset(
    {
        "slots_computed",
        "cache_hits",
        "workers_started",
        "workers_stopped",
        "deduplicated",
        "leader_deaths",
        "requests",
        "executions",
        "blobs_stored",
        "evictions",
        "refused",
    }
)
_DOCS: Final = {
    "slots_computed": "Slots computed (device applications).",
    "cache_hits": "Compute requests answered from stored results.",
    "workers_started": "Process workers started.",
    "workers_stopped": "Process workers stopped.",
    "deduplicated": "Callers that joined a resolution already under way.",
    "leader_deaths": "Workers that died with requests waiting on them.",
    "requests": "Compute requests made to the engine.",
    "executions": "Generic resolutions executed.",
    "blobs_stored": "Blobs stored (put_blob calls).",
    "live_workers": "Process workers alive now.",
    "waiters": "Requests waiting on live workers now.",
    "memory_bytes": "Memory held by live workers (their estimates), in bytes.",
    "evictions": "Idle workers retired to stay within max_workers or max_memory.",
    "refused": "Requests refused over a bound (Overloaded, CatchingUp).",
    "cold_starts": "Workers booting now.",
}


@attrs.define(eq=False)
class _Histogram:
    counts: list[int] = attrs.field(factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        self.total += seconds
        self.n += 1


def _label(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(value) if isinstance(value, float) else str(value)


@attrs.define(eq=False)
class ConnectionCounts:
    """What `run_server`'s accept loop saw. Not thread-safe (one Trio loop)."""

    #: Connections open now.
    open: int = 0
    #: Connections accepted.
    accepted: int = 0
    #: Connections the node closed itself, by reason: ``evicted`` (idle, to make room
    #: under the connection bound or free a descriptor), ``refused`` (503 over the
    #: bound), ``write-timeout`` (the client did not take its answer), ``failed``.
    closed: Counter[str] = attrs.field(factory=Counter)
    #: ``accept()`` failures, by errno name (``EMFILE``, ...).
    accept_errors: Counter[str] = attrs.field(factory=Counter)


@attrs.define(eq=False)
class HttpMetrics:
    """Request counters and latency histograms of one app. Not thread-safe (one Trio loop)."""

    requests: Counter[tuple[str, str, int]] = attrs.field(factory=Counter)
    latency: dict[tuple[str, str], _Histogram] = attrs.field(factory=dict)
    in_flight: int = 0
    connections: ConnectionCounts = attrs.field(factory=ConnectionCounts)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[method, route, status] += 1
        hist = self.latency.get((method, route))
        if hist is None:
            hist = self.latency[method, route] = _Histogram()
        hist.observe(seconds)

    def render(self, engine: EngineLike, *, shutting_down: bool) -> str:
        """The Prometheus text exposition (format 0.0.4) of these and the engine's numbers."""
        lines: list[str] = []

        def family(name: str, kind: str, doc: str, samples: Iterable[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {doc}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(v)}" for labels, v in samples)

        family(
            "hbtrio_http_requests_total",
            "counter",
            "HTTP requests answered, by method, route and status.",
            (
                (f"{{method={_label(m)},route={_label(r)},status={_label(s)}}}", n)
                for (m, r, s), n in sorted(self.requests.items())
            ),
        )
        hist_samples: list[tuple[str, float]] = []
        for (m, r), hist in sorted(self.latency.items()):
            base = f"method={_label(m)},route={_label(r)}"
            cumulative = 0
            for bound, count in zip(BUCKETS, hist.counts, strict=True):
                cumulative += count
                hist_samples.append((f"_bucket{{{base},le={_label(_number(bound))}}}", cumulative))
            hist_samples.append((f"_sum{{{base}}}", hist.total))
            hist_samples.append((f"_count{{{base}}}", hist.n))
        lines.append("# HELP hbtrio_http_request_duration_seconds Time to answer HTTP requests.")
        lines.append("# TYPE hbtrio_http_request_duration_seconds histogram")
        lines.extend(
            f"hbtrio_http_request_duration_seconds{suffix} {_number(v)}"
            for suffix, v in hist_samples
        )
        family(
            "hbtrio_http_requests_in_flight",
            "gauge",
            "HTTP requests being answered.",
            [("", self.in_flight)],
        )
        family(
            "hbtrio_http_shutting_down",
            "gauge",
            "1 while the node is shutting down.",
            [("", int(shutting_down))],
        )
        conns = self.connections
        family("hbtrio_http_connections", "gauge", "HTTP connections open.", [("", conns.open)])
        family(
            "hbtrio_http_connections_accepted_total",
            "counter",
            "HTTP connections accepted.",
            [("", conns.accepted)],
        )
        family(
            "hbtrio_http_connections_closed_total",
            "counter",
            "HTTP connections the node closed itself, by reason.",
            ((f"{{reason={_label(reason)}}}", n) for reason, n in sorted(conns.closed.items())),
        )
        family(
            "hbtrio_http_accept_errors_total",
            "counter",
            "Failed accept() calls, by errno.",
            ((f"{{errno={_label(name)}}}", n) for name, n in sorted(conns.accept_errors.items())),
        )
        stats = engine.stats()
        fields = stats_fields(stats)
        if "live_workers" not in fields:
            fields["live_workers"] = len(engine.workers)
        if "waiters" not in fields:
            fields["waiters"] = sum(waiting(info) for info in list(engine.workers.values()))
        for name, value in fields.items():
            if type(value) not in (int, float):
                continue
            doc = _DOCS.get(name, f"Engine statistic {name}.")
            if name in _COUNTERS:
                family(f"hbtrio_{name}_total", "counter", doc, [("", value)])
            else:
                family(f"hbtrio_{name}", "gauge", doc, [("", value)])
        return "\n".join(lines) + "\n"
