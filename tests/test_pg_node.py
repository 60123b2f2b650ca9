"""The node's side of a cluster without a cluster: options, errors, ``GET /cluster``.

The cluster itself (nodes forwarding to each other, takeovers) is in
``test_pg_cluster.py``, with real node subprocesses.
"""

from __future__ import annotations

import subprocess
import sys

import hbtrio
from hbtrio._http import error_response
from pgcluster import node_env
from test_http import open_node


async def test_a_node_without_a_cluster_answers_404_to_get_cluster() -> None:
    async with open_node() as node:
        answer = await node.client.get("/cluster")
        assert answer.status_code == 404
        assert answer.json()["error"] == "not-clustered"


def test_a_fenced_write_is_a_503_naming_the_owner() -> None:
    exc = hbtrio.StoreFenced("p" * 43, "owned by another node", epoch=3, owner="http://b:1")
    answer = error_response(exc)
    assert answer.status == 503
    assert (b"retry-after", b"1") in answer.headers
    body = hbtrio._jsonwire.loads(answer.body)
    assert (body["error"], body["owner"], body["process"]) == ("not-owner", "http://b:1", "p" * 43)
    assert isinstance(exc, hbtrio.StoreError)


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hbtrio._cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=node_env(),
    )


def test_serve_refuses_a_store_that_is_not_a_postgresql_uri() -> None:
    done = serve("--store", "mysql://x/y")
    assert done.returncode == 2
    assert "not a PostgreSQL URI" in done.stderr


def test_a_node_of_a_cluster_on_port_0_needs_its_url() -> None:
    done = serve("--store", "postgresql://nobody@127.0.0.1:1/none", "--port", "0")
    assert done.returncode == 2
    assert "--node-url" in done.stderr


def test_a_node_whose_database_cannot_be_reached_exits_1_in_one_line() -> None:
    done = serve("--store", "postgresql://nobody@127.0.0.1:1/none", "--port", "0", "--node-url",
                 "http://127.0.0.1:1")  # fmt: skip
    assert done.returncode == 1
    assert "cannot connect" in done.stderr and "Traceback" not in done.stderr
