"""Clusters of real ``hbtrio serve`` nodes on one PostgreSQL server, for the cluster tests.

`Node` is one node subprocess (``--store postgresql://... --node-url ...``,
lease 1 s, a token, the devices of ``cluster_devices``), started and stopped
by the test: killed (SIGKILL), paused (SIGSTOP / SIGCONT), stopped gracefully
(SIGTERM), restarted (a new incarnation on the same URL). A node may run in
a network namespace of the test's own (`Netns`: a veth pair, the root side
10.77.N.1, the node's side 10.77.N.2), which the test can cut and restore.

`Client` talks to the nodes over HTTP with the token, each request bounded
by a timeout. Requests poll with deadlines where they wait for something a
real process does on its own time (a lease running out, a node starting).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

import hbtrio
from helpers import node_started
from pgserver import free_port

TESTS = str(Path(__file__).parent)
SRC = str(Path(hbtrio.__file__).resolve().parents[1])
TOKEN = "cluster-test-token-0123456789"
LEASE = 1.0
DEVICES = ("slow@1.0=cluster_devices:SlowCounter",)


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, TESTS, env.get("PYTHONPATH", "")])
    env.pop("HBTRIO_TOKEN", None)
    env.update(extra or {})
    return env


class Netns:
    """A network namespace with a veth pair to the root namespace, made and removed here."""

    def __init__(self, index: int) -> None:
        self.name = f"hbtrio-t{os.getpid() % 10000}-{index}"
        self.root_if = f"hbr{os.getpid() % 10000}{index}"[:15]
        self.node_if = f"hbn{os.getpid() % 10000}{index}"[:15]
        subnet = 77 + index
        self.root_ip = f"10.{subnet}.{os.getpid() % 250}.1"
        self.node_ip = f"10.{subnet}.{os.getpid() % 250}.2"

    @staticmethod
    def available() -> str | None:
        """``None`` if network namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        try:
            subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"ip netns does not work here: {exc}"
        return None

    def _ip(self, *args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)

    def create(self) -> None:
        self.remove()
        self._ip("netns", "add", self.name)
        self._ip("link", "add", self.root_if, "type", "veth", "peer", "name", self.node_if)
        self._ip("link", "set", self.node_if, "netns", self.name)
        self._ip("addr", "add", f"{self.root_ip}/24", "dev", self.root_if)
        self._ip("link", "set", self.root_if, "up")
        self._ip("-n", self.name, "addr", "add", f"{self.node_ip}/24", "dev", self.node_if)
        self._ip("-n", self.name, "link", "set", self.node_if, "up")
        self._ip("-n", self.name, "link", "set", "lo", "up")

    def cut(self) -> None:
        """The link goes down: the node can reach nothing, and nothing reaches it."""
        self._ip("link", "set", self.root_if, "down")

    def restore(self) -> None:
        self._ip("link", "set", self.root_if, "up")

    def remove(self) -> None:
        self._ip("link", "del", self.root_if, check=False)
        self._ip("netns", "del", self.name, check=False)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


class Node:
    """One ``hbtrio serve`` node of a cluster, as a subprocess."""

    def __init__(
        self,
        index: int,
        store: str,
        logs: Path,
        *,
        host: str = "127.0.0.1",
        netns: Netns | None = None,
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.index = index
        self.store = store
        self.host = host
        self.port = free_port(host if netns is None else "127.0.0.1")
        self.url = f"http://{host}:{self.port}"
        self.netns = netns
        self.options = list(options)
        self.env = env or {}
        self.logs = logs
        self.proc: trio.Process | None = None
        self.incarnations = 0

    def __repr__(self) -> str:
        return f"<Node {self.index} {self.url}>"

    async def start(self) -> None:
        """Start it (again: a new incarnation), returning once it accepts requests."""
        cmd = [
            *(self.netns.prefix() if self.netns is not None else []),
            sys.executable,
            "-m",
            "hbtrio._cli",
            "serve",
            "--store",
            self.store,
            "--node-url",
            self.url,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--lease",
            str(LEASE),
            "--token",
            TOKEN,
            "--grace",
            "2",
            "--shutdown-grace",
            "5",
            "--log-level",
            "warning",
            *self.options,
        ]
        for device in DEVICES:
            cmd += ["--device", device]
        self.incarnations += 1
        with (self.logs / f"node{self.index}.log").open("ab") as err:
            err.write(f"--- incarnation {self.incarnations}: {' '.join(cmd)}\n".encode())
            err.flush()
            proc = await trio.lowlevel.open_process(
                cmd, stdout=subprocess.PIPE, stderr=err, env=node_env(self.env)
            )
        self.proc = proc
        assert proc.stdout is not None
        seen = await node_started(proc.stdout, 60)
        assert re.search(rb"listening on http://", seen), seen

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        with trio.fail_after(timeout):
            code = await self.proc.wait()
        if self.proc.stdout is not None:
            await self.proc.stdout.aclose()
        return code

    async def stop(self) -> None:
        """SIGTERM, then wait for it (killed if it takes too long)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            await self.wait(20)
        except trio.TooSlowError:
            self.kill()
            await self.wait()

    async def reap(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
        with trio.CancelScope(shield=True):
            await self.proc.wait()
        if self.proc.stdout is not None:
            await self.proc.stdout.aclose()


class Client:
    """HTTP to the nodes, with the token; every request bounded by ``timeout``."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.http = httpx.AsyncClient(
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=100),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def spawn(self, node: Node, definition: dict[str, Any]) -> str:
        answer = await self.http.post(f"{node.url}/processes", json=definition)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["process"])

    async def schedule(self, node: Node, pid: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post(f"{node.url}/{pid}/schedule", json=body)

    async def compute(
        self, node: Node, pid: str, slot: int, wait: float = 20.0, **kw: Any
    ) -> httpx.Response:
        return await self.http.get(
            f"{node.url}/{pid}/compute",
            params={"slot": slot, "wait": wait},
            timeout=wait + 30.0,
            **kw,
        )

    async def cluster(self, node: Node) -> dict[str, Any]:
        answer = await self.http.get(f"{node.url}/cluster")
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    async def owner(self, node: Node, pid: str) -> str | None:
        """The URL of ``pid``'s owner, as ``node`` sees the database."""
        return (await self.cluster(node))["owners"].get(pid, {}).get("url")  # type: ignore[no-any-return]


async def wait_for(what: Any, timeout: float, why: str) -> Any:
    """Poll the async ``what()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {why}")
        await trio.sleep(0.05)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
