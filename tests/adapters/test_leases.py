"""Which lease owners are gone (adapters.leases), and the storage that ends their leases."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta

import pytest

from adapters.leases import gone, owner_id
from intake.ports import OutboxEntry
from storage.store import SqlStore
from tests.storage.test_store import NOW, email, new_ticket


@pytest.fixture(scope="module")
def ended_pid() -> int:
    """The PID of a process of this host and PID namespace that has ended."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_an_owner_of_this_host_whose_process_ended_is_gone(ended_pid: int) -> None:
    assert gone(owner_id(pid=ended_pid))


def test_a_running_process_keeps_its_leases() -> None:
    assert not gone(owner_id(pid=os.getppid()))  # alive (a PID reused by another process too)


def test_this_process_s_own_name_is_a_previous_process_s_only_at_start() -> None:
    assert gone(owner_id(), starting=True)  # this dispatcher has claimed nothing yet
    assert not gone(owner_id(), starting=False)


@pytest.mark.parametrize(
    "other",
    [
        "elsewhere:{ns}:{pid}",  # another host: its processes are not ours to see
        "{host}:1:{pid}",  # another PID namespace (another container on this host)
        "{host}::{pid}",  # a namespace that could not be read
        "{host}:{pid}",  # the format before the namespace was part of it
        "{host}:{ns}:not-a-pid",
    ],
)
def test_owners_that_cannot_be_judged_keep_their_leases(other: str, ended_pid: int) -> None:
    host, ns, _ = owner_id().rsplit(":", 2)
    assert not gone(other.format(host=host, ns=ns, pid=ended_pid))


async def test_release_ends_the_leases_of_the_owners_named(db_url: str) -> None:
    store = SqlStore(db_url, create=True)
    try:
        tid = await store.transact(lambda uow: uow.create_ticket(new_ticket()).id)
        for n in range(3):
            entry = OutboxEntry(ticket_id=tid, kind="notice", payload=email(n), created_at=NOW)
            await store.transact(lambda uow, entry=entry: uow.enqueue(entry))
        lease = NOW + timedelta(minutes=2)
        for owner, limit in (("host:1:10", 2), ("host:1:11", 1)):
            await store.transact(
                lambda uow, owner=owner, limit=limit: uow.claim_outbox(
                    now=NOW, owner=owner, lease_until=lease, limit=limit, channels=["email"]
                )
            )
        assert sorted(await store.transact(lambda uow: uow.lease_owners(now=NOW))) == ["host:1:10", "host:1:11"]
        assert await store.transact(lambda uow: uow.lease_owners(now=lease + timedelta(seconds=1))) == []
        assert await store.transact(lambda uow: uow.release_leases(["host:1:10"], now=NOW)) == 2
        assert await store.transact(lambda uow: uow.lease_owners(now=NOW)) == ["host:1:11"]
        # Released, its notes are due again at once; the other owner's stay with it.
        again = await store.transact(
            lambda uow: uow.claim_outbox(now=NOW, owner="host:1:12", lease_until=lease, limit=10, channels=["email"])
        )
        assert len(again) == 2
        assert await store.transact(lambda uow: uow.release_leases([], now=NOW)) == 0
    finally:
        await store.close()
