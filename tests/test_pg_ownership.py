"""The ownership decision and a node's own lease, without any server (``_postgres._ownership``)."""

from __future__ import annotations

import pytest

from hbtrio._postgres._ownership import ELSEWHERE, MINE, MISSING, TAKE, Lease, OwnerRow, decide

ME = 7


@pytest.mark.parametrize(
    ("row", "decision"),
    [
        (None, MISSING),
        (OwnerRow(proc=1, node=None, epoch=None, url=None, expired=True), TAKE),  # no owner row
        (OwnerRow(proc=1, node=None, epoch=4, url=None, expired=True), TAKE),  # released
        (OwnerRow(proc=1, node=ME, epoch=4, url="http://me", expired=False), MINE),
        # Mine even past my own lease: the epoch is unchanged, so nobody wrote meanwhile.
        (OwnerRow(proc=1, node=ME, epoch=4, url="http://me", expired=True), MINE),
        (OwnerRow(proc=1, node=3, epoch=4, url="http://b", expired=False), ELSEWHERE),
        (OwnerRow(proc=1, node=3, epoch=4, url="http://b", expired=True), TAKE),
    ],
)
def test_what_a_claim_decides(row: OwnerRow | None, decision: object) -> None:
    assert decide(ME, row) is decision


def test_a_lease_counts_from_when_the_heartbeat_was_sent() -> None:
    lease = Lease(1.0)
    assert not lease.valid(0.0)  # no heartbeat acknowledged yet
    lease.renewed(10.0)
    assert lease.valid(10.5) and lease.valid(10.999)
    assert not lease.valid(11.0)
    lease.renewed(9.0)  # an older heartbeat acknowledged late never shortens it
    assert lease.until == 11.0
    lease.expire()
    assert not lease.valid(10.5)


def test_a_lease_must_be_positive() -> None:
    for seconds in (0, -1.0):
        with pytest.raises(ValueError, match="lease"):
            Lease(seconds)
