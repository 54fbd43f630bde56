"""The store on SQLite and PostgreSQL: group commit, isolation of failing units, the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from intake.errors import StorageUnavailableError
from intake.model import Channel, Direction, InboundMessage, OutgoingChat, OutgoingEmail, Route, Severity
from intake.ports import NewMessage, NewTicket, OutboxEntry, SendResult
from intake.reference import References
from storage.repository import SqlUnitOfWork
from storage.store import SqlStore
from storage.tables import outbox
from storage.tables import ticket as ticket_table

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
REFS = References()


def new_ticket(ref: str | None = None, requester: str = "alice@acme.com") -> NewTicket:
    return NewTicket(
        reference=ref or REFS.new(),
        subject="printer",
        channel=Channel.EMAIL,
        requester=requester,
        requester_name="Alice",
        organisation=None,
        severity=Severity.S3,
        security=False,
        created_at=NOW,
        response_due=NOW + timedelta(hours=8),
    )


def email(n: int) -> OutgoingEmail:
    return OutgoingEmail(
        to=(f"c{n}@x.org",), subject=f"s{n}", body="b", message_id=f"m{n}@intake", from_address="support@example.com"
    )


def store_message(uow: SqlUnitOfWork, mid: str, recipient: str = "support@example.com") -> int:
    t = uow.create_ticket(new_ticket())
    msg = InboundMessage(channel=Channel.EMAIL, sender="alice@acme.com", recipient=recipient, message_id=mid)
    uow.add_message(
        NewMessage(
            ticket_id=t.id, message=msg, direction=Direction.INBOUND, route=Route.NEW, route_note="new", received_at=NOW
        )
    )
    return t.id


@pytest.fixture
async def store(db_url: str):  # type: ignore[no-untyped-def]
    s = SqlStore(db_url, create=True)
    yield s
    await s.close()


async def test_outbox_claims_by_channel_and_a_held_note_keeps_its_attempts(store: SqlStore) -> None:
    tid = await store.transact(lambda uow: uow.create_ticket(new_ticket()).id)
    chat = OutgoingChat(channel="C0A", text="hello")
    for payload in (email(0), chat, email(1)):
        await store.transact(
            lambda uow, p=payload: uow.enqueue(OutboxEntry(ticket_id=tid, kind="notice", payload=p, created_at=NOW))
        )
    lease = NOW + timedelta(minutes=2)
    [only_chat] = await store.transact(
        lambda uow: uow.claim_outbox(now=NOW, owner="a", lease_until=lease, limit=10, channels=["slack"])
    )
    assert only_chat.channel == "slack" and only_chat.payload == chat
    emails = await store.transact(lambda uow: uow.claim_outbox(now=NOW, owner="a", lease_until=lease, limit=10))
    assert [(i.channel, i.attempts) for i in emails] == [("email", 0), ("email", 0)]
    # One tried and failed, one held back untried (its channel found down before its turn).
    later = NOW + timedelta(seconds=5)
    results = [
        SendResult(id=emails[0].id, ok=False, error="relay down", retry_at=later + timedelta(seconds=30)),
        SendResult(id=emails[1].id, ok=False, attempted=False, error="waiting: email unavailable"),
    ]
    await store.transact(lambda uow: uow.finish_outbox(results, now=later))
    [held] = await store.transact(
        lambda uow: uow.claim_outbox(now=later, owner="b", lease_until=later + timedelta(minutes=2), limit=10)
    )
    assert held.id == emails[1].id and held.attempts == 0  # due again at once, attempts as they were


async def test_explain_waiting_tells_the_held_channel_s_new_notes_only(store: SqlStore) -> None:
    tid = await store.transact(lambda uow: uow.create_ticket(new_ticket()).id)
    later = NOW + timedelta(minutes=1)
    entries = [(email(0), NOW), (email(1), later), (OutgoingChat(channel="C0A", text="hi"), later)]
    for payload, at in entries:
        await store.transact(
            lambda uow, p=payload, at=at: uow.enqueue(
                OutboxEntry(ticket_id=tid, kind="notice", payload=p, created_at=at)
            )
        )

    def explain(why: str, due_since: datetime | None) -> Any:
        return lambda uow: uow.explain_waiting(channel="email", why=why, due_since=due_since, now=later)

    assert await store.transact(explain("waiting: A", later)) == 1  # due since then: not the older, not Slack's
    assert await store.transact(explain("waiting: B", None)) == 1  # the older; the other keeps its reason
    # A note another dispatcher has claimed (its lease running) is left to it.
    await store.transact(
        lambda uow: uow.enqueue(OutboxEntry(ticket_id=tid, kind="notice", payload=email(2), created_at=later))
    )
    claimed = await store.transact(
        lambda uow: uow.claim_outbox(
            now=later, owner="b", lease_until=later + timedelta(minutes=2), limit=10, channels=["email"]
        )
    )
    assert len(claimed) == 3
    assert await store.transact(explain("waiting: C", None)) == 0
    query = select(outbox.c.last_error).order_by(outbox.c.id)
    errors = store.run_sync(lambda uow: list(uow.conn.execute(query).scalars()))
    assert errors == ["waiting: B", "waiting: A", None, None]


async def one_claimed_note(store: SqlStore) -> Any:
    """One email note on a new ticket, queued and claimed (a minute's lease)."""
    tid = await store.transact(lambda uow: uow.create_ticket(new_ticket()).id)
    await store.transact(
        lambda uow: uow.enqueue(OutboxEntry(ticket_id=tid, kind="notice", payload=email(0), created_at=NOW))
    )
    [item] = await store.transact(
        lambda uow: uow.claim_outbox(
            now=NOW, owner="a", lease_until=NOW + timedelta(minutes=1), limit=1, channels=["email"]
        )
    )
    return item


async def test_explain_waiting_takes_a_tried_note_once_it_is_due_again(store: SqlStore) -> None:
    """A note tried as its channel went down keeps its own error until it is due again; then
    it waits for the channel like the rest, and says so."""
    item = await one_claimed_note(store)
    retry_at = NOW + timedelta(seconds=5)
    failed = SendResult(id=item.id, ok=False, permanent=False, error="relay unreachable", retry_at=retry_at)
    await store.transact(lambda uow: uow.finish_outbox([failed], now=NOW))

    def explain(now: datetime) -> Any:
        return lambda uow: uow.explain_waiting(
            channel="email", why="waiting: email unavailable", due_since=None, now=now
        )

    query = select(outbox.c.last_error)
    assert await store.transact(explain(NOW + timedelta(seconds=1))) == 0  # its own retry is still ahead
    assert store.run_sync(lambda uow: uow.conn.execute(query).scalar_one()) == "relay unreachable"
    assert await store.transact(explain(retry_at)) == 1
    assert store.run_sync(lambda uow: uow.conn.execute(query).scalar_one()) == "waiting: email unavailable"
    assert await store.transact(explain(retry_at + timedelta(seconds=1))) == 0  # said once


async def test_concurrent_units_commit_in_groups(store: SqlStore) -> None:
    ids = await asyncio.gather(*(store.transact(lambda uow, i=i: store_message(uow, f"m{i}@x")) for i in range(200)))
    assert len(set(ids)) == 200
    assert store.run_sync(lambda uow: uow.stats())["tickets"] == 200
    assert store.batches < 200  # concurrent units shared commits


async def test_a_failing_unit_rolls_back_alone(store: SqlStore) -> None:
    def bad(uow: SqlUnitOfWork) -> None:
        store_message(uow, "bad@x")
        raise ValueError("boom")

    results = await asyncio.gather(
        store.transact(lambda uow: store_message(uow, "good1@x")),
        store.transact(bad),
        store.transact(lambda uow: store_message(uow, "good2@x")),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert all(isinstance(r, int) for r in (results[0], results[2]))
    stats = store.run_sync(lambda uow: uow.stats())
    assert stats["tickets"] == 2 and stats["messages"] == 2


async def test_duplicate_delivery_is_a_constraint_not_a_memory(store: SqlStore) -> None:
    await store.transact(lambda uow: store_message(uow, "same@x"))
    # The same message to another support address is its own delivery.
    await store.transact(lambda uow: store_message(uow, "same@x", recipient="billing@example.com"))
    dup = await store.transact(lambda uow: uow.find_duplicate("support@example.com", "mid:same@x"))
    assert dup is not None
    attempts = []

    def blind(uow: SqlUnitOfWork) -> int:
        attempts.append(1)
        return store_message(uow, "same@x")  # ignores find_duplicate: the constraint must stop it

    with pytest.raises(StorageUnavailableError):
        await store.transact(blind)
    assert 3 <= len(attempts) <= 4  # run again after each conflict (optimistic group run + 3), then gave up
    assert store.run_sync(lambda uow: uow.stats())["messages"] == 2


async def test_commit_failure_fails_the_group_and_stores_nothing(store: SqlStore) -> None:
    await store.transact(lambda uow: store_message(uow, "before@x"))

    def breaks_connection(uow: SqlUnitOfWork) -> None:
        store_message(uow, "lost@x")
        uow.conn.exec_driver_sql("SELECT * FROM no_such_table")  # an OperationalError / DBAPIError

    results = await asyncio.gather(
        store.transact(breaks_connection),
        store.transact(lambda uow: store_message(uow, "neighbour@x")),
        return_exceptions=True,
    )
    assert isinstance(results[0], StorageUnavailableError)
    # The store keeps serving afterwards.
    await store.transact(lambda uow: store_message(uow, "after@x"))
    stats = store.run_sync(lambda uow: uow.stats())
    assert stats["messages"] == 2 + (0 if isinstance(results[1], Exception) else 1)


async def test_outbox_claim_lease_and_finish(store: SqlStore) -> None:
    tid = await store.transact(lambda uow: uow.create_ticket(new_ticket()).id)
    for n in range(5):
        await store.transact(
            lambda uow, n=n: uow.enqueue(
                OutboxEntry(ticket_id=tid, kind="acknowledgement", payload=email(n), created_at=NOW)
            )
        )
    lease = NOW + timedelta(minutes=2)
    first = await store.transact(lambda uow: uow.claim_outbox(now=NOW, owner="a", lease_until=lease, limit=3))
    second = await store.transact(lambda uow: uow.claim_outbox(now=NOW, owner="b", lease_until=lease, limit=10))
    assert len(first) == 3 and len(second) == 2
    assert {i.id for i in first}.isdisjoint({i.id for i in second})
    assert isinstance(first[0].payload, OutgoingEmail) and first[0].payload.subject == "s0"
    # "a" dies; after its lease anyone may take its items again.
    later = lease + timedelta(seconds=1)
    again = await store.transact(
        lambda uow: uow.claim_outbox(now=later, owner="b", lease_until=later + timedelta(minutes=2), limit=10)
    )
    assert {i.id for i in again} == {i.id for i in first} | {i.id for i in second}
    results = [
        SendResult(id=again[0].id, ok=True),
        SendResult(id=again[1].id, ok=False, permanent=True, error="550 no such user"),
        SendResult(id=again[2].id, ok=False, error="relay down", retry_at=later + timedelta(minutes=5)),
    ]
    await store.transact(lambda uow: uow.finish_outbox(results, now=later))
    stats = store.run_sync(lambda uow: uow.stats())
    assert stats["outbox"] == {"pending": 3, "sent": 1, "failed": 1, "undeliverable": 0}
    # The retried one is not due before its retry time.
    soon = await store.transact(
        lambda uow: uow.claim_outbox(
            now=later + timedelta(minutes=3), owner="c", lease_until=later + timedelta(minutes=10), limit=10
        )
    )
    assert again[2].id not in {i.id for i in soon}


async def test_two_stores_claim_each_item_once(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("two writers on one SQLite file serialise on its lock; the PostgreSQL case is the real test")
    a, b = SqlStore(db_url, create=True), SqlStore(db_url)
    try:
        tid = await a.transact(lambda uow: uow.create_ticket(new_ticket()).id)
        for chunk in range(10):
            await a.transact(
                lambda uow, c=chunk: [
                    uow.enqueue(
                        OutboxEntry(ticket_id=tid, kind="acknowledgement", payload=email(c * 20 + k), created_at=NOW)
                    )
                    for k in range(20)
                ]
            )
        claimed: list[int] = []
        lease = NOW + timedelta(minutes=2)

        async def drain(s: SqlStore, owner: str) -> None:
            while True:
                items = await s.transact(lambda uow: uow.claim_outbox(now=NOW, owner=owner, lease_until=lease, limit=7))
                if not items:
                    return
                claimed.extend(i.id for i in items)

        await asyncio.gather(drain(a, "a"), drain(b, "b"), drain(a, "a2"), drain(b, "b2"))
        assert len(claimed) == 200 and len(set(claimed)) == 200
    finally:
        await a.close()
        await b.close()


async def test_timestamps_round_trip_as_aware_utc(store: SqlStore) -> None:
    t = await store.transact(lambda uow: uow.create_ticket(new_ticket()))
    back = store.run_sync(lambda uow: uow.ticket_by_reference(t.reference))
    assert back is not None and back.created_at == NOW and back.created_at.tzinfo is not None


def test_migrations_match_the_tables(db_url: str) -> None:
    """The head migration creates exactly what storage/tables.py declares (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage import schema
    from storage.store import make_engine
    from storage.tables import metadata

    engine = make_engine(db_url)
    try:
        assert schema.current(engine) is None
        before, after = schema.upgrade(engine)
        assert before is None and after == schema.head() == schema.HEAD  # a new migration updates HEAD
        assert schema.upgrade(engine) == (after, after)  # idempotent
        schema.check(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        engine.dispose()


async def test_a_database_from_before_edits_upgrades_with_its_messages_as_they_were(db_url: str) -> None:
    """Migration 0003 adds ``message.edit_of`` to a database that has messages: they stay
    messages (no edits), and an edit stored afterwards is what the message then reads."""
    from storage import schema
    from storage.repository import _message_values, _ticket_values
    from storage.store import make_engine
    from storage.tables import message, ticket

    engine = make_engine(db_url)
    try:
        schema.upgrade(engine, "0002")
        msg = InboundMessage(channel=Channel.EMAIL, sender="alice@acme.com", recipient="support@example.com",
                             message_id="old@acme.com", body="Printer on fire")  # fmt: skip
        with engine.begin() as conn:  # as an intake of revision 0002 stored it: no edit_of column
            tid = conn.execute(ticket.insert().values(**_ticket_values(new_ticket()))).inserted_primary_key[0]
            values = _message_values(NewMessage(ticket_id=tid, message=msg, direction=Direction.INBOUND,
                                                route=Route.NEW, route_note="new", received_at=NOW))  # fmt: skip
            del values["edit_of"]
            conn.execute(message.insert().values(**values))
        assert schema.upgrade(engine) == ("0002", schema.HEAD)
        schema.check(engine)
    finally:
        engine.dispose()
    store = SqlStore(db_url)
    try:
        old = store.run_sync(lambda uow: uow.stored_message("support@example.com", "mid:old@acme.com"))
        assert old is not None and (old.text, old.direction, old.sender) == ("Printer on fire", Direction.INBOUND,
                                                                           "alice@acme.com")  # fmt: skip
        [row] = store.run_sync(lambda uow: uow.list_tickets())
        assert row["message_count"] == 1 and store.run_sync(lambda uow: uow.stats())["message_edits"] == 0

        def edit(uow: SqlUnitOfWork, text: str, at: datetime) -> None:
            changed = replace(msg, body=text, date=at)
            uow.add_message(NewMessage(ticket_id=old.ticket_id, message=changed, direction=Direction.INBOUND,
                                       route=Route.EDIT, route_note="edit", received_at=NOW, edit_of=old.id,
                                       dedup_key=f"edit:mid:old@acme.com@{at.timestamp()}"))  # fmt: skip

        # Two edits, the later one stored first: the message reads as the later one.
        await store.transact(lambda uow: edit(uow, "Printer on fire, floor 2", NOW + timedelta(minutes=2)))
        await store.transact(lambda uow: edit(uow, "Printer smoking", NOW + timedelta(minutes=1)))
        now = store.run_sync(lambda uow: uow.stored_message("support@example.com", "mid:old@acme.com"))
        assert now is not None and now.id == old.id and now.text == "Printer on fire, floor 2"
        detail = store.run_sync(lambda uow: uow.ticket_detail(row["reference"]))
        assert [(m["route"], m["edit_of"], len(m["edits"])) for m in detail["messages"]] == [
            ("new", None, 2), ("edit", old.id, 0), ("edit", old.id, 0)
        ]  # fmt: skip
        [row] = store.run_sync(lambda uow: uow.list_tickets())
        assert row["message_count"] == 1 and store.run_sync(lambda uow: uow.stats())["message_edits"] == 2
    finally:
        await store.close()


async def test_a_database_from_before_the_alerts_organisations_upgrades_and_counts_its_alerts(db_url: str) -> None:
    """0004 adds the outbox's organisation_key: an existing database keeps its notes, and the
    alerts it sent within the hour still count towards the global ceiling (for no organisation)."""
    from intake.paging import ALERT
    from intake.ports import PagingCounts
    from storage import schema
    from storage.store import make_engine

    engine = make_engine(db_url)
    try:
        assert schema.upgrade(engine, "0002") == (None, "0002")
        with engine.begin() as conn:
            conn.execute(
                ticket_table.insert().values(
                    id=1, reference="SUP-OLD0-0001", subject="s", channel="email", requester="a@acme.com",
                    requester_name="", severity=1, security=True, status="open", alerted=True, ack_status="queued",
                    created_at=NOW, updated_at=NOW, response_due=NOW, notes=[], evidence=[], plan="standard",
                    language="en", targets={}, escalation_step=0,
                )
            )  # fmt: skip
            conn.exec_driver_sql(
                "INSERT INTO outbox (ticket_id, kind, channel, recipient, message_id, payload, status, attempts, "
                "next_attempt_at, created_at) VALUES (1, 'irt-alert', 'email', 'irt-lead@example.com', 'old@x', "
                "'{}', 'sent', 1, '2026-11-21 11:50:00', '2026-11-21 11:50:00')"
            )
        assert schema.upgrade(engine) == ("0002", schema.HEAD)
    finally:
        engine.dispose()
    store = SqlStore(db_url)
    try:
        schema.check(store.engine)

        lead = OutgoingEmail(
            to=("irt-lead@example.com",), subject="a", body="b", message_id="new@x", from_address="support@example.com"
        )

        def counted(uow: SqlUnitOfWork) -> PagingCounts:
            uow.enqueue(
                OutboxEntry(ticket_id=1, kind=ALERT, payload=lead, created_at=NOW, organisation_key="domain:acme.com")
            )
            return uow.paging_counts(
                recipient="irt-lead@example.com", organisation_key="domain:acme.com", since=NOW - timedelta(hours=1)
            )

        # The old alert counts in all, for no organisation; the new one for its own too.
        assert await store.transact(counted) == PagingCounts(
            alerts=2, alerts_for_organisation=1, summary_sent=False, organisation_summary_sent=False
        )
    finally:
        await store.close()


def test_serve_refuses_a_schema_that_is_behind(sqlite_url: str) -> None:
    from intake.errors import SchemaBehindError
    from storage import schema
    from storage.store import make_engine

    engine = make_engine(sqlite_url)
    try:
        with pytest.raises(SchemaBehindError, match="intake db upgrade"):
            schema.check(engine)
    finally:
        engine.dispose()


async def test_commit_runs_on_the_loop_until_the_disk_is_slow(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path}/commits.db", create=True)
    threads: list[str] = []
    event.listen(store.engine, "commit", lambda conn: threads.append(threading.current_thread().name))
    try:
        await store.transact(lambda uow: uow.stats())  # this disk syncs in well under 3 ms
        store.commit_seconds = 0.05  # as after a run of 50 ms fsyncs
        await store.transact(lambda uow: uow.stats())
    finally:
        await store.close()
    assert threads[0] == threading.current_thread().name  # the event loop's own thread
    assert threads[1].startswith("intake-db-io")  # the loop served sessions meanwhile
    assert store.commit_seconds < 0.05  # measured again there: back on the loop once fast


async def test_a_commit_slower_than_commit_timeout_answers_try_again_and_still_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/slow.db"
    store = SqlStore(url, create=True, commit_timeout=0.3, lock_timeout=10)
    holder = sqlite3.connect(tmp_path / "slow.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process writing, for longer than commit_timeout
        started = asyncio.get_running_loop().time()
        with pytest.raises(StorageUnavailableError, match=r"no commit within 0\.3s"):
            await store.transact(lambda uow: store_message(uow, "late@x"))
        assert 0.3 <= asyncio.get_running_loop().time() - started < 2
        # A caller that gives up (its session closed) does not take its unit back either.
        gave_up = asyncio.ensure_future(store.transact(lambda uow: store_message(uow, "cancelled@x")))
        await asyncio.sleep(0.05)
        gave_up.cancel()
        holder.execute("ROLLBACK")
        # Both units are committed once the lock is free; a redelivery finds them as duplicates.
        for _ in range(100):
            if store.run_sync(lambda uow: uow.stats())["messages"] == 2:
                break
            await asyncio.sleep(0.02)
        assert store.run_sync(lambda uow: uow.stats())["messages"] == 2
        assert gave_up.cancelled()
        dup = await store.transact(lambda uow: uow.find_duplicate("support@example.com", "mid:late@x"))
        assert dup is not None
    finally:
        holder.close()
        await store.close()


def _messages_on_disk(path: Path) -> int:
    """Messages as another process sees them (its own connection, nothing shared)."""
    with contextlib.closing(sqlite3.connect(path)) as other:
        return int(other.execute("SELECT count(*) FROM message").fetchone()[0])


async def test_the_log_is_synced_after_commit_and_before_the_caller_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import storage.store

    db = tmp_path / "synced.db"
    store = SqlStore(f"sqlite:///{db}", create=True)
    answered: list[str] = []
    syncs: list[tuple[int, int, list[str]]] = []  # (inode synced, messages committed, callers answered)
    real = os.fdatasync

    def spy(fd: int) -> None:  # the real sync, watched
        syncs.append((os.fstat(fd).st_ino, _messages_on_disk(db), list(answered)))
        real(fd)

    monkeypatch.setattr(storage.store.os, "fdatasync", spy)
    try:
        await store.transact(lambda uow: store_message(uow, "first@x"))
        answered.append("first")
        await asyncio.gather(*(store.transact(lambda uow, i=i: store_message(uow, f"g{i}@x")) for i in range(3)))
        answered.append("group")
        conn = store._connection()
        mode = conn.exec_driver_sql("PRAGMA synchronous").scalar()
        wal = os.stat(f"{db}-wal").st_ino  # while open: the last connection to close removes the log
    finally:
        await store.close()
    # One sync of the log per group, each after its COMMIT and before its callers heard back.
    assert syncs == [(wal, 1, []), (wal, 4, ["first"])]
    assert mode == 1  # NORMAL: COMMIT itself does not sync; the store does, outside the lock
    from storage.store import make_engine

    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: tools, readers
    finally:
        engine.dispose()


async def test_a_failed_sync_of_the_log_answers_try_again_and_the_store_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import storage.store

    db = tmp_path / "failing.db"
    store = SqlStore(f"sqlite:///{db}", create=True)
    real = os.fdatasync
    failures = [OSError(errno.EIO, "Input/output error")]

    def disk(fd: int) -> None:
        """A disk whose sync fails once: that cannot be produced for real here."""
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(storage.store.os, "fdatasync", disk)
    try:
        with pytest.raises(StorageUnavailableError, match="sync of the write-ahead log failed"):
            await store.transact(lambda uow: store_message(uow, "unsure@x"))
        # COMMIT had happened: the message is stored, though its sender was told to try again.
        # The retry finds it, and the store serves on (a new connection, the log synced again).
        assert _messages_on_disk(db) == 1
        dup = await store.transact(lambda uow: uow.find_duplicate("support@example.com", "mid:unsure@x"))
        assert dup is not None
        await store.transact(lambda uow: store_message(uow, "after@x"))
        assert _messages_on_disk(db) == 2
    finally:
        await store.close()


async def test_any_error_text_is_recorded_with_its_outcome(store: SqlStore) -> None:
    """A send's error is whatever a relay or an exception said: a NUL (PostgreSQL refuses it in
    text) or a lone surrogate (a byte that was not UTF-8, kept by surrogateescape; no database
    takes it) made the outcome unrecordable, and the note went again at every lease."""
    item = await one_claimed_note(store)
    failed = SendResult(id=item.id, ok=False, permanent=True, error="550 bo\udceete\x00 inconnue " + "x" * 600)
    await store.transact(lambda uow: uow.finish_outbox([failed], now=NOW))
    query = select(outbox.c.status, outbox.c.last_error)
    status, error = store.run_sync(lambda uow: uow.conn.execute(query).one())
    assert (status, error) == ("failed", ("550 bo\ufffdte inconnue " + "x" * 600)[:500])


async def test_a_note_bounced_before_its_sending_was_recorded_counts_its_attempt(store: SqlStore) -> None:
    """Postfix on the same host bounces an acknowledgement within milliseconds, before the
    dispatcher records it sent: the note stays undeliverable, with the bounce's reason, but counts
    its attempt ("undeliverable after 0 attempts" said it was never sent)."""
    tid = await store.transact(lambda uow: uow.create_ticket(new_ticket()).id)
    for n in (1, 2):
        await store.transact(
            lambda uow, n=n: uow.enqueue(
                OutboxEntry(ticket_id=tid, kind="acknowledgement", payload=email(n), created_at=NOW)
            )
        )
    lease = NOW + timedelta(minutes=2)
    claimed = await store.transact(lambda uow: uow.claim_outbox(now=NOW, owner="a", lease_until=lease, limit=10))
    await store.transact(lambda uow: uow.mark_undeliverable(["m1@intake"], "Action: failed"))
    later = NOW + timedelta(seconds=1)
    for _ in range(2):  # recorded twice (a lease run out): one attempt all the same
        await store.transact(lambda uow: uow.finish_outbox([SendResult(id=i.id, ok=True) for i in claimed], now=later))
    columns = (outbox.c.message_id, outbox.c.status, outbox.c.attempts, outbox.c.last_error)
    rows = store.run_sync(lambda uow: uow.conn.execute(select(*columns).order_by(outbox.c.id)).all())
    assert [tuple(r) for r in rows] == [
        ("m1@intake", "undeliverable", 1, "bounced: Action: failed"),
        ("m2@intake", "sent", 1, None),
    ]
    sent_at = store.run_sync(lambda uow: list(uow.conn.execute(select(outbox.c.sent_at)).scalars()))
    assert all(t is not None for t in sent_at)
