"""The node in a cluster: whose request is it, and sending it there.

Theory of operation
-------------------
Nodes of a cluster share one PostgreSQL database (`hbtrio.PostgresStore`),
and every process has one owner at a time. A request about a process (its
schedule, compute, now, slot) is answered by the owner's engine: `Cluster`
says where that is, and the app (``_app``) answers locally or sends the
request on:

1. *Held here* (`PostgresStore.holds`: no I/O): the engine answers.
2. Otherwise a *claim* (one trip to the database) takes the process over if
   it is free or its owner expired (then the engine answers here), or names
   the owner's URL (remembered for a quarter of a lease, and forgotten as
   soon as that owner does not answer).
3. Owned elsewhere: a compute of a slot whose result is stored is answered
   here, from the database. Anything else is *forwarded* to the owner (the
   default: the same method, path, query, body, ``Authorization``,
   ``Accept`` and ``Content-Type``, with a hop count) and its answer relayed,
   or *redirected* (307 to the owner's URL; the ``hbtrio`` client follows
   it with its token) when the node runs with ``--redirect``.
4. When the owner cannot be reached (it died, and its lease has not run out
   yet) or answers that it is shutting down, the request is routed again a
   little later, until its budget runs out (the wait of a compute, else two
   leases): by then the lease has run out, the claim takes the process over,
   and the request is answered here. A read forwarded to an owner that stops
   answering (it died mid-request, or was paused) is asked again; while it
   waits, the owner is looked up every half lease, and a new owner gets it
   at once. A write is sent again only if it never reached the owner: one
   the owner took and did not answer gets 503 ``owner-lost`` (it may have
   been done), never a second copy.

A request the local engine refuses with `StoreFenced` (the process was taken
over while it waited, or its write was refused) is routed again the same
way: waiters survive an owner change. A request forwarded more than
`MAX_HOPS` times (owners changing under it) gets 503 ``not-owner``.

`Cluster` keeps counters for ``GET /cluster`` and owns the HTTP client that
forwards (one connection pool for all owners). It runs on the app's Trio
loop; its async methods are checkpoints and cancellation-safe (a forward
that is cancelled is abandoned; the owner may still answer it).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._errors import RETRY, HttpError
from ._request import Request
from ._types import JSON, Response

if TYPE_CHECKING:
    import httpx

    from .._postgres import PostgresStore

logger: Final = logging.getLogger("hbtrio.http")

#: The header counting how many times a request was forwarded.
HOPS_HEADER: Final = "x-hbtrio-hops"
#: The header naming the node that answered a request (set on forwarded answers).
OWNER_HEADER: Final = "x-hbtrio-owner"
#: Most times one request is forwarded.
MAX_HOPS: Final = 3
#: Seconds between two attempts to route a request whose owner cannot be reached.
RETRY_EVERY: Final = 0.1
#: Most owners elsewhere remembered (see `Cluster.owner_of`).
_OWNERS_KEPT: Final = 10_000
#: Request headers sent on with a forwarded request.
_FORWARDED: Final = ("authorization", "accept", "content-type")
#: Answer headers relayed back from the owner.
_RELAYED: Final = ("retry-after",)


@attrs.define(eq=False)
class Cluster:
    """Where requests about a process go, for a node on a `PostgresStore`.

    ``url`` is this node's own (what other nodes forward to); ``redirect``
    answers 307 instead of forwarding.
    """

    store: PostgresStore
    url: str | None = None
    redirect: bool = False
    #: Counters (shown by ``GET /cluster``).
    forwarded: int = 0
    redirected: int = 0
    stored_answers: int = 0
    rerouted: int = 0
    unreachable: int = 0
    _client: httpx.AsyncClient | None = attrs.field(default=None, init=False, alias="_client")
    #: Owners elsewhere seen lately: pid -> (URL, until when, Trio time). Forgotten after
    #: a quarter of a lease, or as soon as the owner does not answer: a stale entry costs
    #: a hop (the old owner sends the request on), never a wrong answer.
    _owners: collections.OrderedDict[str, tuple[str, float]] = attrs.field(
        factory=collections.OrderedDict, init=False, alias="_owners"
    )

    @property
    def lease(self) -> float:
        return self.store.lease

    async def owner_of(self, pid: str) -> str | None:
        """``None`` when this node answers for ``pid`` (it holds it, or took it over, or
        nobody has it), else the owner's URL. Raises `HttpError` 503 while the
        database cannot say, or the process is being taken over. Checkpoints."""
        if self.store.holds(pid):
            await trio.lowlevel.checkpoint()
            return None
        seen = self._owners.get(pid)
        if seen is not None and seen[1] > trio.current_time():
            await trio.lowlevel.checkpoint()
            return seen[0]
        from .._postgres._control import OwnershipBusy  # (psycopg: only for a cluster)

        try:
            claim = await self.store.claim(pid)
        except OwnershipBusy as exc:  # (other store errors are the store's: 503 store-error)
            raise HttpError(
                503, "not-owner", f"the owner of {pid} is changing: {exc}", headers=RETRY
            ) from exc
        if claim is None or claim.mine:
            return None  # (not stored: the engine answers 404)
        if not claim.url or claim.url == self.url:
            raise HttpError(
                503,
                "not-owner",
                f"process {pid} is owned by node {claim.node}, which has no URL to send it to",
                headers=RETRY,
            )
        owners = self._owners
        owners[pid] = (claim.url, trio.current_time() + self.lease / 4)
        owners.move_to_end(pid)
        if len(owners) > _OWNERS_KEPT:
            owners.popitem(last=False)
        return claim.url

    def forget(self, pid: str) -> None:
        """Ask the database who owns ``pid`` next time (its owner did not answer)."""
        self._owners.pop(pid, None)

    def redirect_to(self, owner: str, request: Request) -> Response:
        """307 to the same path and query at ``owner``."""
        self.redirected += 1
        location = _target(owner, request)
        body = b'{"redirect": "' + location.encode("utf-8", "replace").replace(b'"', b"") + b'"}'
        return Response(307, body, JSON, ((b"location", location.encode("latin-1", "replace")),))

    async def forward(
        self, owner: str, request: Request, body: bytes, timeout: float
    ) -> Response | None:
        """The owner's answer to ``request``; ``None`` when the owner cannot be reached or
        is shutting down (route it again). Blocks up to ``timeout``; cancellable."""
        import httpx

        hops = _hops(request)
        if hops >= MAX_HOPS:
            raise HttpError(
                503,
                "not-owner",
                f"the request was forwarded {hops} times: its process keeps changing owner",
                headers=RETRY,
            )
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED}
        headers[HOPS_HEADER] = str(hops + 1)
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
            )
        try:
            answer = await self._client.request(
                request.method,
                _target(owner, request),
                content=body if request.method == "POST" else None,
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=min(timeout, max(self.lease, 1.0))),
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.unreachable += 1  # never sent: safe to route again
            self.forget(_pid_of(request))
            logger.info("the owner %s cannot be reached (%s); routing again", owner, exc)
            return None
        except httpx.HTTPError as exc:
            self.unreachable += 1
            self.forget(_pid_of(request))
            if request.method == "GET":  # reads are safe to ask again
                logger.info("the owner %s did not answer (%s); routing again", owner, exc)
                return None
            # A write that reached the owner may have been made: never send it twice.
            raise HttpError(
                503,
                "owner-lost",
                f"the owner {owner} took the request but did not answer ({type(exc).__name__}); "
                "it may have been done: look before doing it again",
                {"owner": owner},
                headers=RETRY,
            ) from exc
        if answer.status_code == 503 and _code(answer.content) in ("shutting-down", "not-owner"):
            self.forget(_pid_of(request))
            return None  # it is handing the process over: ask who owns it now
        self.forwarded += 1
        relayed = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers.items()
            if k.lower() in _RELAYED
        ]
        relayed.append((OWNER_HEADER.encode(), owner.encode("latin-1", "replace")))
        return Response(
            answer.status_code,
            answer.content,
            answer.headers.get("content-type", JSON),
            tuple(relayed),
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def describe(self) -> dict[str, Any]:
        """What ``GET /cluster`` answers: this node, the nodes, the owners. One read."""
        stats = self.store.cluster_statistics()
        view = await self.store.cluster_view()
        node = {
            "id": stats.node,
            "url": self.url,
            "lease": stats.lease,
            "lease-valid": stats.lease_valid,
            "held": stats.held,
            "heartbeats": stats.heartbeats,
            "takeovers": stats.takeovers,
            "lost": stats.lost,
            "fenced-writes": stats.fenced_writes,
            "fenced-rows": stats.fenced_rows,
            "forwarded": self.forwarded,
            "redirected": self.redirected,
            "stored-answers": self.stored_answers,
            "rerouted": self.rerouted,
            "unreachable": self.unreachable,
            "mode": "redirect" if self.redirect else "forward",
        }
        urls = {n["id"]: n["url"] for n in view["nodes"]}
        owners = {
            pid: {**info, "url": urls.get(info["node"])} for pid, info in view["owners"].items()
        }
        return {
            "node": node,
            "nodes": view["nodes"],
            "owners": owners,
            "owners-truncated": view["owners-truncated"],
        }


def _pid_of(request: Request) -> str:
    return request.path.split("/")[1]


def _target(owner: str, request: Request) -> str:
    return owner.rstrip("/") + request.path + (f"?{request.query}" if request.query else "")


def _hops(request: Request) -> int:
    text = request.headers.get(HOPS_HEADER, "0")
    return int(text) if text.isascii() and text.isdigit() and len(text) < 4 else MAX_HOPS


def _code(body: bytes) -> object:
    from .. import _jsonwire
    from .._exceptions import InvalidMessage

    try:
        value = _jsonwire.from_json(body)
    except InvalidMessage:
        return None
    return value.get("error") if isinstance(value, Mapping) else None
