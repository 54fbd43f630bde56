"""Storing a message on PostgreSQL in few round trips (storage/pgwire.py), and what must not change.

The round-trip tests run intake's service and store in-process against PostgreSQL through a
TCP proxy that counts client-to-server turns; the others run on SQLite and PostgreSQL alike:
written-behind inserts are seen by the reads after them, updates of a ticket not yet sent land
on it, the acknowledgements read ahead count as the database does, and a unit whose insert
conflicts stores nothing while its neighbours in the group are stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from adapters import bootstrap
from adapters.email.parsing import parse_email
from adapters.settings import Settings
from intake import paging
from intake.errors import StorageUnavailableError
from intake.model import OutgoingChat, OutgoingEmail, Route, RuleHit
from intake.ports import OutboxEntry, PagingCounts, TicketChange
from storage.repository import _PAGING_COUNTS, _WIRE_PAGING_COUNTS, SqlUnitOfWork
from storage.store import SqlStore
from storage.tables import outbox
from tests.adapters.tcp_proxy import TcpProxy
from tests.storage.test_store import NOW, email, new_ticket, store_message


def _raw(i: int, tag: str, *, in_reply_to: str = "") -> bytes:
    extra = f"In-Reply-To: {in_reply_to}\r\n" if in_reply_to else ""
    return (
        f"From: Customer {i} <customer{i}@client{i % 7}.example.net>\r\nTo: support@example.com\r\n"
        f"Subject: Nightly export {i} keeps failing\r\nMessage-ID: <{tag}.{i}@client.example.net>\r\n"
        f"Date: Sat, 21 Nov 2026 09:30:00 +0000\r\n{extra}MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\nHello,\r\nthe nightly export stops after a few minutes.\r\n"
    ).encode()


def _inbound(i: int, tag: str, **kw: Any) -> Any:
    return parse_email(
        _raw(i, tag, **kw), recipient="support@example.com", envelope_sender=f"customer{i}@client{i % 7}.example.net"
    )


class Measured:
    def __init__(self, app: bootstrap.App, proxy: TcpProxy) -> None:
        self.app = app
        self.proxy = proxy
        self.statements: list[str] = []
        app.store.statement_observers.append(self.statements.append)

    async def run(self, messages: list[Any], *, at_once: int = 1) -> tuple[list[Any], float, float]:
        """Receipts, round trips per message, transactions per message."""
        store = self.app.store
        rt0, b0 = self.proxy.round_trips, store.batches
        receipts: list[Any] = []
        for k in range(0, len(messages), at_once):
            receipts += await asyncio.gather(*(self.app.service.receive(m) for m in messages[k : k + at_once]))
        n = len(messages)
        assert self.proxy.unreadable == 0, "a connection's messages could not be followed (TLS?): not counted"
        return receipts, (self.proxy.round_trips - rt0) / n, (store.batches - b0) / n


@pytest.fixture
async def measured(pg_url: str) -> AsyncIterator[Measured]:
    proxy = TcpProxy.in_front_of(pg_url)
    settings = Settings.model_validate(
        {
            "storage": {"url": proxy.url_for(pg_url)},
            "email": {"support_address": "support@example.com"},
            "outbound": {"from_address": "support@example.com"},
            "policy": {"detect_language": False},
        }
    )
    app = bootstrap.build(settings)
    app.store.start()
    try:
        await app.service.receive(_inbound(0, "warm-up"))  # the connection, the schema check
        yield Measured(app, proxy)
    finally:
        await app.store.close()
        proxy.close()


@pytest.mark.postgres
async def test_a_new_email_costs_one_transaction_and_at_most_three_round_trips(measured: Measured) -> None:
    n = 12
    receipts, round_trips, transactions = await measured.run([_inbound(i, "one") for i in range(1, n + 1)])
    assert all(r.created and r.acknowledged for r in receipts)
    assert transactions == 1.0
    assert round_trips <= 3.0, f"{round_trips} round trips per new message, one at a time"
    # BEGIN, the duplicate lookup, the sender's counts, the inserts, COMMIT: five statements.
    assert len(measured.statements) <= 5 * n

    receipts, round_trips, transactions = await measured.run([_inbound(i, "many") for i in range(1, 21)], at_once=10)
    assert all(r.created and r.acknowledged for r in receipts)
    assert transactions <= 1.0  # group commit: usually less
    assert round_trips <= 3.0, f"{round_trips} round trips per new message, 10 at a time"

    stats = measured.app.store.run_sync(lambda uow: uow.stats())
    assert stats["tickets"] == stats["messages"] == 1 + n + 20
    assert stats["outbox_by_kind"] == {"acknowledgement": 1 + n + 20}
    ids = measured.app.store.run_sync(
        lambda uow: uow.conn.exec_driver_sql("SELECT ours, count(*) FROM message_id GROUP BY ours").all()
    )
    assert dict(ids) == {False: 1 + n + 20, True: 1 + n + 20}  # the customer's Message-ID and our acknowledgement's


@pytest.mark.postgres
async def test_duplicates_are_recognised_in_few_round_trips_and_in_one_group(measured: Measured) -> None:
    opened, _, _ = await measured.run([_inbound(i, "dup") for i in range(1, 6)])
    receipts, round_trips, _ = await measured.run([_inbound(i, "dup") for i in range(1, 6)])
    assert [r.route for r in receipts] == [Route.DUPLICATE] * 5
    assert [r.ticket_id for r in receipts] == [r.ticket_id for r in opened]
    assert round_trips <= 2.0  # BEGIN + the lookup, COMMIT

    # The same delivery several times at once, so that copies share a group: a unit's lookup is
    # sent after the inserts of the units before it, so it finds them.
    same = [_inbound(99, "again")] * 6 + [_inbound(98, "again")]
    receipts, _, transactions = await measured.run(same, at_once=7)
    assert transactions < 1.0  # some copies shared a transaction
    assert sorted(str(r.route) for r in receipts) == ["duplicate"] * 5 + ["new"] * 2
    assert len({r.ticket_id for r in receipts[:6]}) == 1
    stats = measured.app.store.run_sync(lambda uow: uow.stats())
    assert stats["tickets"] == 1 + 5 + 2 and stats["outbox_by_kind"] == {"acknowledgement": 1 + 5 + 2}


@pytest.mark.postgres
async def test_a_follow_up_joins_its_ticket(measured: Measured) -> None:
    [opened], _, _ = await measured.run([_inbound(1, "orig")])
    follow = _inbound(1, "reply", in_reply_to="<orig.1@client.example.net>")
    [joined], round_trips, _ = await measured.run([follow])
    assert joined.route is Route.HEADER and joined.ticket_id == opened.ticket_id and not joined.created
    detail = measured.app.store.run_sync(lambda uow: uow.ticket_detail(opened.reference))
    assert [m["route"] for m in detail["messages"]] == ["new", "header"]
    assert detail["participants"] == ["customer1@client1.example.net"]
    assert round_trips <= 7


def _breach(i: int, sender: str) -> Any:
    domain = sender.partition("@")[2]
    raw = (
        f"From: {sender}\r\nTo: support@example.com\r\nSubject: Data breach {i}\r\n"
        f"Message-ID: <breach.{i}@{domain}>\r\nDate: Sat, 21 Nov 2026 09:30:00 +0000\r\n\r\n"
        "We think there was a data breach: unauthorized access to our admin account last night.\r\n"
    ).encode()
    return parse_email(raw, recipient="support@example.com", envelope_sender=sender)


@pytest.mark.postgres
async def test_whether_an_incident_pages_is_one_read_whoever_it_is_from(measured: Measured) -> None:
    """The hour's alerts in all and for the incident's organisation, and both summaries, are
    one statement in the writer's pipeline, paged or held: a security incident costs what it
    cost with the one global count (6.1 round trips here, seven statements)."""
    flood = [_breach(i, "scanner@flood.net") for i in range(7)]  # one sender: 5 page, 2 are held
    others = [_breach(i, f"c{i}@client{i}.net") for i in range(7, 10)]
    receipts, round_trips, _ = await measured.run(flood + others)
    assert [r.alerted for r in receipts] == [True] * 5 + [False] * 2 + [True] * 3
    assert all(r.security and r.created for r in receipts)
    assert len(measured.statements) <= 7 * 10
    assert round_trips <= 6.5, f"{round_trips} round trips per security incident"


# -- the same answers on SQLite and PostgreSQL -------------------------------------------------------


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(db_url, create=True)
    yield s
    await s.close()


async def test_reads_see_the_inserts_before_them_in_the_unit(store: SqlStore) -> None:
    def unit(uow: SqlUnitOfWork) -> tuple[Any, ...]:
        t = uow.create_ticket(new_ticket(requester="erin@acme.com"))
        uow.add_participant(t.id, "erin@acme.com")
        uow.index_message_id(t.id, "ack-1@intake", ours=True)
        uow.enqueue(OutboxEntry(ticket_id=t.id, kind="acknowledgement", payload=email(1), created_at=NOW))
        found = uow.ticket_by_reference(t.reference)
        return (
            t.id,
            found.id if found else None,
            found.participants if found else None,
            uow.is_known_participant("erin@acme.com"),
            [k.ticket.id for k in uow.tickets_by_message_ids(["ack-1@intake"])],
            uow.count_outbox_since(kind="acknowledgement", recipient="c1@x.org", since=NOW),
            uow.count_tickets_since(requester="erin@acme.com", since=NOW),
        )

    tid, found, participants, known, by_id, acks, tickets = await store.transact(unit)
    assert found == tid and participants == frozenset({"erin@acme.com"}) and known
    assert by_id == [tid] and acks == 1 and tickets == 1


async def test_an_update_of_a_ticket_not_yet_sent_lands_on_it(store: SqlStore) -> None:
    later = NOW + timedelta(minutes=1)
    hit = RuleHit(rule="security", phrase="phishing", field="body", excerpt="a phishing mail", tags=("security",))

    def unit(uow: SqlUnitOfWork) -> str:
        t = uow.create_ticket(new_ticket())
        uow.update_ticket(t.id, TicketChange(alerted=True, add_notes=("paged the IRT",), updated_at=later))
        uow.update_ticket(t.id, TicketChange(add_evidence=(hit,), escalation_step=1, escalated_at=later))
        return t.reference

    ref = await store.transact(unit)
    detail = store.run_sync(lambda uow: uow.ticket_detail(ref))
    assert detail is not None
    assert detail["alerted"] is True and detail["escalation_step"] == 1 and detail["escalated_at"] == later
    assert detail["updated_at"] == later
    assert [n["text"] for n in detail["notes"]] == ["paged the IRT"]
    assert [e["phrase"] for e in detail["evidence"]] == ["phishing"]


@pytest.mark.parametrize("sent", [0, 3, 70])
async def test_acknowledgements_read_ahead_count_as_the_database_does(store: SqlStore, sent: int) -> None:
    tid = await store.transact(lambda uow: uow.create_ticket(new_ticket(requester="c1@x.org")).id)
    for n in range(sent):  # one a minute, the newest a minute before NOW
        await store.transact(
            lambda uow, n=n: uow.enqueue(
                OutboxEntry(
                    ticket_id=tid,
                    kind="acknowledgement",
                    payload=email(1),
                    created_at=NOW - timedelta(minutes=sent - n),
                )
            )
        )
    windows = [timedelta(minutes=m) for m in (0, 1, 2, 30, 64, 65, 69, 70, 71, 600)]

    def asked(uow: SqlUnitOfWork) -> list[int]:
        uow.count_tickets_since(requester="c1@x.org", since=NOW - timedelta(hours=1))
        return [uow.count_outbox_since(kind="acknowledgement", recipient="c1@x.org", since=NOW - w) for w in windows]

    def counted(uow: SqlUnitOfWork) -> list[int]:
        return [uow.count_outbox_since(kind="acknowledgement", recipient="c1@x.org", since=NOW - w) for w in windows]

    expected = [min(sent, int(w.total_seconds() // 60)) for w in windows]
    assert await store.transact(asked) == expected
    assert await store.transact(counted) == expected
    assert store.run_sync(counted) == expected

    def after_enqueue(uow: SqlUnitOfWork) -> tuple[int, int]:
        uow.count_tickets_since(requester="c1@x.org", since=NOW)
        before = uow.count_outbox_since(kind="acknowledgement", recipient="c1@x.org", since=NOW)
        uow.enqueue(OutboxEntry(ticket_id=tid, kind="acknowledgement", payload=email(1), created_at=NOW))
        return before, uow.count_outbox_since(kind="acknowledgement", recipient="c1@x.org", since=NOW)

    assert await store.transact(after_enqueue) == (0, 1)


async def test_a_unit_whose_insert_conflicts_stores_nothing_and_fails_alone(store: SqlStore) -> None:
    await store.transact(lambda uow: store_message(uow, "taken@x"))
    attempts: list[int] = []

    def blind(uow: SqlUnitOfWork) -> int:
        attempts.append(1)
        tid = store_message(uow, "taken@x")  # a new ticket, then its message conflicts
        uow.enqueue(OutboxEntry(ticket_id=tid, kind="acknowledgement", payload=email(7), created_at=NOW))
        return tid

    results = await asyncio.gather(
        store.transact(lambda uow: store_message(uow, "free-1@x")),
        store.transact(blind),
        store.transact(lambda uow: store_message(uow, "free-2@x")),
        return_exceptions=True,
    )
    assert isinstance(results[1], StorageUnavailableError)
    assert isinstance(results[0], int) and isinstance(results[2], int)
    stats = store.run_sync(lambda uow: uow.stats())
    assert stats["tickets"] == stats["messages"] == 3  # nothing of the conflicting unit
    assert stats["outbox"]["pending"] == 0
    assert len(attempts) >= 3


async def test_many_rows_in_one_unit_get_distinct_ids(store: SqlStore) -> None:
    def unit(uow: SqlUnitOfWork) -> tuple[list[int], list[int]]:
        tickets = [uow.create_ticket(new_ticket()).id for _ in range(20)]
        entries = [
            uow.enqueue(OutboxEntry(ticket_id=tickets[k % 20], kind="notice", payload=email(k), created_at=NOW))
            for k in range(45)
        ]
        return tickets, entries

    tickets, entries = await store.transact(unit)
    assert len(set(tickets)) == 20 and len(set(entries)) == 45
    assert tickets == sorted(tickets) and entries == sorted(entries)
    stored = store.run_sync(
        lambda uow: uow.conn.execute(
            select(outbox.c.id, outbox.c.ticket_id, outbox.c.payload).order_by(outbox.c.id)
        ).all()
    )
    assert [r[0] for r in stored] == entries
    assert [r[1] for r in stored] == [tickets[k % 20] for k in range(45)]
    assert [r[2]["subject"] for r in stored] == [f"s{k}" for k in range(45)]


async def test_a_transaction_whose_statement_failed_is_never_committed(db_url: str) -> None:
    """Even when a unit swallows the error: PostgreSQL would answer COMMIT with a silent ROLLBACK."""
    store = SqlStore(db_url, create=True)
    try:
        await store.transact(lambda uow: store_message(uow, "first@x"))

        def swallows(uow: SqlUnitOfWork) -> str:
            store_message(uow, "first@x")  # conflicts when its insert is sent
            try:
                uow.sync()  # (on SQLite the insert was sent at once, and raised there)
            except Exception:
                return "swallowed"
            return "not raised"

        with pytest.raises(StorageUnavailableError):
            await store.transact(swallows)  # the group's commit refuses; the savepoint run fails it
        assert store.run_sync(lambda uow: uow.stats())["messages"] == 1
    finally:
        await store.close()


def _to_lead(n: int) -> OutgoingEmail:
    return OutgoingEmail(
        to=("irt-lead@example.com",), subject=f"alert {n}", body="b", message_id=f"a{n}@intake", from_address="s@x.org"
    )


async def test_the_irt_lead_s_notes_are_counted_per_organisation_as_the_database_does(store: SqlStore) -> None:
    """intake.paging's counts: the hour's alerts to the lead in all and for one organisation,
    and whether each summary went; the unit's own inserts are seen (PostgreSQL writes them
    behind), and nothing else in the outbox is counted."""
    tid = await store.transact(lambda uow: uow.create_ticket(new_ticket()).id)
    hour_ago = NOW - timedelta(hours=1)

    def enqueue(uow: SqlUnitOfWork, kind: str, org: str | None, when: Any, payload: Any = None) -> None:
        uow.enqueue(
            OutboxEntry(ticket_id=tid, kind=kind, payload=payload or _to_lead(0), created_at=when, organisation_key=org)
        )

    def setup(uow: SqlUnitOfWork) -> None:
        for minutes in (1, 2, 59):
            enqueue(uow, paging.ALERT, "domain:acme.example", NOW - timedelta(minutes=minutes))
        enqueue(uow, paging.ALERT, "domain:acme.example", NOW - timedelta(minutes=61))  # too old
        enqueue(uow, paging.ALERT, "address:bob@gmail.com", NOW - timedelta(minutes=3))
        enqueue(uow, paging.ALERT, None, NOW - timedelta(minutes=4))  # stored before organisations were
        enqueue(uow, paging.ALERT, "domain:acme.example", NOW, OutgoingChat(channel="U0LEAD", text="dm"))  # a DM
        enqueue(uow, "acknowledgement", "domain:acme.example", NOW, email(1))  # not the lead's
        enqueue(uow, paging.ORGANISATION_SUMMARY, "address:bob@gmail.com", NOW - timedelta(minutes=5))

    await store.transact(setup)

    def counts(uow: SqlUnitOfWork, org: str) -> PagingCounts:
        return uow.paging_counts(recipient="irt-lead@example.com", organisation_key=org, since=hour_ago)

    acme = await store.transact(lambda uow: counts(uow, "domain:acme.example"))
    assert acme == PagingCounts(
        alerts=5, alerts_for_organisation=3, summary_sent=False, organisation_summary_sent=False
    )
    bob = store.run_sync(lambda uow: counts(uow, "address:bob@gmail.com"))
    assert bob == PagingCounts(alerts=5, alerts_for_organisation=1, summary_sent=False, organisation_summary_sent=True)

    def written_behind(uow: SqlUnitOfWork) -> tuple[PagingCounts, PagingCounts]:
        before = counts(uow, "domain:acme.example")
        enqueue(uow, paging.ALERT, "domain:acme.example", NOW)
        enqueue(uow, paging.SUMMARY, "domain:other.example", NOW)
        return before, counts(uow, "domain:acme.example")

    before, after = await store.transact(written_behind)
    assert (before.alerts, before.alerts_for_organisation, before.summary_sent) == (5, 3, False)
    assert (after.alerts, after.alerts_for_organisation, after.summary_sent) == (6, 4, True)
    assert not after.organisation_summary_sent


async def test_the_irt_lead_s_notes_are_counted_through_the_index(store: SqlStore) -> None:
    """The count reads only the lead's notes of the hour (ix_outbox_recent), never the outbox."""
    if store.dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        compiled = _PAGING_COUNTS.compile(dialect=sqlite.dialect(paramstyle="qmark"))
        values = compiled.construct_params({"org": "x", "recipient": "irt-lead@example.com", "since": "2026-11-21"})
        args = tuple(values[name] for name in compiled.positiontup or ())
        plan = store.run_sync(lambda uow: uow.conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", args).all())
        text_plan = " ".join(str(row[-1]) for row in plan)
        assert "USING INDEX ix_outbox_recent (kind=? AND recipient=? AND created_at>?)" in text_plan, text_plan
        return

    def explain(uow: SqlUnitOfWork) -> str:
        uow.conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a tiny table: would the index serve?
        sql = _WIRE_PAGING_COUNTS.replace("%s", "'x'", 2).replace("%s", "'irt-lead@example.com'", 1)
        sql = sql.replace("%s", "'2026-11-21 11:00:00'", 1)
        return " ".join(r[0] for r in uow.conn.exec_driver_sql("EXPLAIN " + sql).all())

    pg_plan = await store.transact(explain)
    assert "ix_outbox_recent" in pg_plan and "Seq Scan" not in pg_plan, pg_plan
