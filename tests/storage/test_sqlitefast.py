"""SQLite's fast path writes exactly what SQLAlchemy writes, and fails the way SQLAlchemy fails."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from intake.errors import StorageUnavailableError
from intake.model import Attachment, Channel, Direction, InboundMessage, OutgoingEmail, Route, RuleHit, Severity
from intake.ports import NewMessage, NewTicket, OutboxEntry, SendResult
from storage.repository import SqlUnitOfWork
from storage.store import SqlStore
from tests.storage.test_store import new_ticket

NOW = datetime(2026, 11, 22, 9, 30, 15, 123456, tzinfo=UTC)
HIT = RuleHit(
    rule="data-breach", phrase="data breach*", field="body", excerpt="a data breach", severity=Severity.S1,
    tags=("security",), negated=True,
)  # fmt: skip


def one_of_everything(uow: SqlUnitOfWork) -> None:
    """A unit that writes every hot statement's row, with every kind of value (None, JSON,
    booleans, timestamps, non-ASCII text, bytes), and reads back what it wrote."""
    message = InboundMessage(
        channel=Channel.EMAIL,
        sender="josé@acme.com",
        sender_name="José",
        recipient="support@example.com",
        subject="Fuite",
        body="Hola\nwe had a data breach\x00?",
        new_text="we had a data breach",
        html=True,
        attachments=(Attachment(filename="log.txt", content_type="text/plain", size=12),),
        message_id="<m1@acme.com>",
        date=NOW - timedelta(minutes=3),
        raw=b"Subject: Fuite\r\n\r\n\xff\x00",
        parse_problem=None,
    )
    assert uow.find_duplicate("support@example.com", message.dedup_key) is None
    ticket = uow.create_ticket(
        NewTicket(
            reference="SUP-7K3M-9Q2X",
            subject="Fuite de données ? ¿Brecha?",
            channel=Channel.EMAIL,
            requester="josé@acme.com",
            requester_name="José Pérez",
            organisation=None,
            severity=Severity.S1,
            security=True,
            created_at=NOW,
            response_due=NOW + timedelta(hours=1),
            thread_key=None,
            notes=("first note",),
            evidence=(HIT,),
            language="es",
            targets={"response": NOW + timedelta(hours=1)},
        )
    )
    uow.add_participant(ticket.id, "josé@acme.com")
    uow.add_participant(ticket.id, "josé@acme.com")  # ignored, not an error
    uow.add_message(
        NewMessage(
            ticket_id=ticket.id,
            message=message,
            direction=Direction.INBOUND,
            route=Route.NEW,
            route_note="new ticket",
            received_at=NOW,
            hits=(HIT,),
            automation=None,
        )
    )
    uow.index_message_id(ticket.id, "<m1@acme.com>", ours=False)
    uow.index_message_id(ticket.id, "<m1@acme.com>", ours=False)  # ignored
    ack = OutgoingEmail(
        to=("josé@acme.com",), subject="Re: Fuite [SUP-7K3M-9Q2X]", body="Gracias", message_id="ack1@intake",
        from_address="support@example.com",
    )  # fmt: skip
    uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="acknowledgement", payload=ack, created_at=NOW))
    uow.index_message_id(ticket.id, "ack1@intake", ours=True)
    # The claim (an UPDATE ... RETURNING with literals in it: 'pending', LIMIT's OFFSET 0).
    claimed = uow.claim_outbox(now=NOW, owner="outbox-1", lease_until=NOW + timedelta(minutes=2), limit=10)
    assert [(i.kind, i.payload, i.attempts) for i in claimed] == [("acknowledgement", ack, 0)]
    assert uow.claim_outbox(now=NOW, owner="outbox-2", lease_until=NOW + timedelta(minutes=2), limit=10) == []
    uow.finish_outbox([SendResult(id=claimed[0].id, ok=True)], now=NOW + timedelta(seconds=1))  # sent: JSON ids
    uow.finish_outbox([SendResult(id=claimed[0].id, ok=True)], now=NOW + timedelta(seconds=2))  # not pending: no-op
    assert uow.count_outbox_since(kind="acknowledgement", recipient="josé@acme.com", since=NOW) == 1
    assert uow.count_outbox_since(kind="acknowledgement", recipient=None, since=NOW + timedelta(seconds=1)) == 0
    assert uow.count_tickets_since(requester="josé@acme.com", since=NOW - timedelta(days=1)) == 1
    dup = uow.find_duplicate("support@example.com", message.dedup_key)
    assert dup is not None and dup.ticket_id == ticket.id and dup.reference == "SUP-7K3M-9Q2X"


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, as SQLite holds it (values and their storage classes)."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out = {}
        for table in tables:
            columns = [r[1] for r in db.execute(f'PRAGMA table_info("{table}")')]
            typed = ", ".join(f'"{c}", typeof("{c}")' for c in columns)
            out[table] = db.execute(f'SELECT {typed} FROM "{table}" ORDER BY rowid').fetchall()
        return out
    finally:
        db.close()


async def test_the_fast_path_writes_what_sqlalchemy_writes(tmp_path: Path) -> None:
    dumps = []
    for fast in (True, False):
        path = tmp_path / f"{'fast' if fast else 'sqlalchemy'}.db"
        store = SqlStore(f"sqlite:///{path}", create=True)

        def unit(uow: SqlUnitOfWork, fast: bool = fast) -> None:
            assert uow.fast is not None  # SQLite always has it...
            if not fast:
                uow.fast = None  # ...and this store goes through SQLAlchemy instead
            one_of_everything(uow)

        await store.transact(unit)
        await store.close()
        dumps.append(dump(path))
    fast_rows, sqlalchemy_rows = dumps
    assert fast_rows["ticket"] and fast_rows["message"] and fast_rows["outbox"] and fast_rows["message_id"]
    assert fast_rows == sqlalchemy_rows


async def test_a_conflict_on_the_fast_path_is_sqlalchemys_integrity_error(tmp_path: Path) -> None:
    """The store tells a conflict (run the unit again, then answer "try again") from a bug by
    SQLAlchemy's exception classes: the fast path must raise those, not sqlite3's."""
    store = SqlStore(f"sqlite:///{tmp_path / 'i.db'}", create=True)
    raised: list[type[BaseException]] = []

    def same_reference(uow: SqlUnitOfWork) -> None:
        ticket = uow.create_ticket(
            NewTicket(
                reference="SUP-AAAA-AAAA", subject="ok", channel=Channel.EMAIL, requester="a@acme.com",
                requester_name="", organisation=None, severity=Severity.S3, security=False, created_at=NOW,
                response_due=NOW,
            )
        )  # fmt: skip
        uow.add_participant(ticket.id, "a@acme.com")
        try:
            uow.create_ticket(  # the reference is unique: this ticket cannot be stored
                NewTicket(
                    reference="SUP-7K3M-9Q2X", subject="again", channel=Channel.EMAIL, requester="b@acme.com",
                    requester_name="", organisation=None, severity=Severity.S3, security=False, created_at=NOW,
                    response_due=NOW,
                )
            )  # fmt: skip
        except BaseException as exc:
            raised.append(type(exc))
            raise

    try:
        await store.transact(one_of_everything)
        with pytest.raises(StorageUnavailableError, match="conflicting"):
            await store.transact(same_reference)
        assert raised and all(issubclass(kind, IntegrityError) for kind in raised), raised
        stats = store.run_sync(lambda uow: uow.stats())
        assert stats["tickets"] == 1 and stats["messages"] == 1  # nothing of the failed unit
        assert store.run_sync(lambda uow: uow.ticket_by_reference("SUP-AAAA-AAAA")) is None
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def store_and_blocker(
    path: Path, *, lock_timeout: float, create: bool = True
) -> AsyncIterator[tuple[SqlStore, sqlite3.Connection]]:
    """A store on ``path`` and a plain connection beside it, standing for another process
    that takes the write lock (``BEGIN IMMEDIATE``); both closed afterwards."""
    store = SqlStore(f"sqlite:///{path}", create=create, lock_timeout=lock_timeout)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        yield store, blocker
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await store.close()


async def test_a_writer_waits_for_another_processs_write_lock_then_commits(tmp_path: Path) -> None:
    """The writer's connection does not use SQLite's busy handler (busy_timeout 0) but waits
    for the lock itself, in short pauses: it must still wait, not fail, while another process
    writes, and fail cleanly only after lock_timeout."""
    path = tmp_path / "i.db"
    async with store_and_blocker(path, lock_timeout=5.0) as (store, blocker):
        blocker.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(store.transact(one_of_everything))
        await asyncio.sleep(0.3)
        assert not pending.done()  # waiting for the lock, not failed
        blocker.execute("ROLLBACK")
        await asyncio.wait_for(pending, timeout=2)
        assert store.run_sync(lambda uow: uow.stats())["tickets"] == 1

    async with store_and_blocker(path, lock_timeout=0.2, create=False) as (quick, blocker):
        blocker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError, match="locked"):
            await quick.transact(lambda uow: uow.count_tickets_since(requester="x", since=NOW))
        assert 0.15 < time.monotonic() - started < 3


def a_ticket(uow: SqlUnitOfWork) -> int:
    """A unit that opens a ticket of its own (a new reference each time)."""
    return uow.create_ticket(new_ticket()).id


async def test_units_queued_while_another_process_writes_join_the_waiting_group(tmp_path: Path) -> None:
    """The group is taken once the write lock is ours: the units that queued while the outbox
    (here a plain connection) held it commit together, once, instead of one commit each."""
    async with store_and_blocker(tmp_path / "g.db", lock_timeout=5.0) as (store, blocker):
        await store.transact(lambda uow: uow.stats())  # the writer's connection is open
        batches = store.batches
        blocker.execute("BEGIN IMMEDIATE")
        first = asyncio.ensure_future(store.transact(a_ticket))
        await asyncio.sleep(0.1)  # the first unit's group now waits for the lock
        later = [asyncio.ensure_future(store.transact(a_ticket)) for _ in range(5)]
        await asyncio.sleep(0.1)
        assert not first.done() and not any(f.done() for f in later)
        blocker.execute("ROLLBACK")
        await asyncio.wait_for(asyncio.gather(first, *later), timeout=5)
        assert store.batches == batches + 1  # one group, one commit, for all six
        assert store.run_sync(lambda uow: uow.stats())["tickets"] == 6


async def test_every_unit_waiting_for_a_lock_that_never_comes_fails_and_the_store_recovers(tmp_path: Path) -> None:
    async with store_and_blocker(tmp_path / "n.db", lock_timeout=0.3) as (store, blocker):
        blocker.execute("BEGIN IMMEDIATE")
        first = asyncio.ensure_future(store.transact(a_ticket))
        await asyncio.sleep(0.1)
        later = [asyncio.ensure_future(store.transact(a_ticket)) for _ in range(3)]
        outcomes = await asyncio.wait_for(asyncio.gather(first, *later, return_exceptions=True), timeout=5)
        assert all(isinstance(o, StorageUnavailableError) for o in outcomes), outcomes  # 451, none hangs
        blocker.execute("ROLLBACK")
        await store.transact(a_ticket)
        assert store.run_sync(lambda uow: uow.stats())["tickets"] == 1
