"""The unit of work over one SQLAlchemy connection: maps core values to rows and back.

Statements are SQLAlchemy Core on the SQLModel tables: the hot path stores a message in a
handful of small statements, without ORM identity-map bookkeeping.

On PostgreSQL, where every statement is a network round trip, the store's writer hands the
unit of work a :class:`storage.pgwire.PgWire`: inserts are written behind (a new ticket, its
participant, message, Message-IDs and outbox entries become one statement, sent with the next
statement whose result is needed or with the COMMIT), the duplicate lookup takes an advisory
lock on the delivery and fetches ids for those inserts in the same statement, and the sender's
counts for the flood limits (tickets opened, acknowledgements sent) are one statement.
On both databases claiming outbox entries is one ``UPDATE ... RETURNING``, and recording the
sent ones one ``UPDATE``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    Insert,
    Integer,
    and_,
    bindparam,
    case,
    column,
    func,
    insert,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from intake import paging
from intake.headers import storable_text
from intake.model import Channel, Direction, Outgoing, OutgoingEmail, Severity, outgoing_from_dict
from intake.ports import (
    CHANNELS,
    WAITING,
    Duplicate,
    KnownId,
    NewMessage,
    NewTicket,
    OutboxEntry,
    OutboxItem,
    PagingCounts,
    SendResult,
    SlaCandidate,
    StoredMessage,
    TicketChange,
    TicketFacts,
    payload_recipient,
)
from storage.pgwire import NEXT_IDS, PgWire
from storage.sqlitefast import FastPath
from storage.tables import message, message_id, outbox, participant, stored_utc, ticket

_TICKET_COLS = (
    ticket.c.id,
    ticket.c.reference,
    ticket.c.subject,
    ticket.c.channel,
    ticket.c.requester,
    ticket.c.organisation,
    ticket.c.severity,
    ticket.c.security,
    ticket.c.alerted,
    ticket.c.status,
    ticket.c.created_at,
    ticket.c.response_due,
    ticket.c.thread_key,
    ticket.c.plan,
    ticket.c.language,
    ticket.c.targets,
    ticket.c.responded_at,
    ticket.c.escalation_step,
    ticket.c.escalated_at,
    ticket.c.sla_warned_at,
    ticket.c.sla_missed_at,
)


# Statements built once: SQLAlchemy then compiles each once and reuses its cache key, which
# took most of the per-message CPU when they were rebuilt with .values() for every message.
_INSERT_TICKET = insert(ticket)
_INSERT_MESSAGE = insert(message)
_INSERT_OUTBOX = insert(outbox)
_FIND_DUPLICATE = (
    select(message.c.ticket_id, ticket.c.reference, message.c.sender)
    .join(ticket, ticket.c.id == message.c.ticket_id)
    .where(message.c.recipient == bindparam("recipient"), message.c.dedup_key == bindparam("dedup_key"))
)
# The message an edit changes (by its delivery, as find_duplicate finds it) and its latest text:
# the body of its latest edit (by when the edit was made: a retried older edit can come after a
# newer one), else its own.
_STORED_MESSAGE = (
    select(message.c.id, message.c.ticket_id, ticket.c.reference, message.c.sender, message.c.direction, message.c.body)
    .join(ticket, ticket.c.id == message.c.ticket_id)
    .where(message.c.recipient == bindparam("recipient"), message.c.dedup_key == bindparam("dedup_key"))
)
_LATEST_EDIT = (
    select(message.c.body)
    .where(message.c.edit_of == bindparam("id"))
    .order_by(message.c.sent_date.desc().nulls_last(), message.c.id.desc())
    .limit(1)
)
_TICKET_BY_ID = select(*_TICKET_COLS).where(ticket.c.id == bindparam("id"))
_TICKET_BY_REFERENCE = select(*_TICKET_COLS).where(ticket.c.reference == bindparam("reference"))
_PARTICIPANTS = select(participant.c.address).where(participant.c.ticket_id == bindparam("id"))
_KNOWN_ID_COLS = (message_id.c.message_id, message_id.c.ticket_id, message_id.c.ours)
_KNOWN_ID = select(*_KNOWN_ID_COLS).where(message_id.c.message_id == bindparam("mid"))
_KNOWN_IDS = select(*_KNOWN_ID_COLS).where(message_id.c.message_id.in_(bindparam("mids", expanding=True)))
_COUNT_OUTBOX_KIND = (
    select(func.count())
    .select_from(outbox)
    .where(outbox.c.kind == bindparam("kind"), outbox.c.created_at >= bindparam("since"))
)
_COUNT_OUTBOX_TO = _COUNT_OUTBOX_KIND.where(outbox.c.recipient == bindparam("recipient"))
# The IRT lead's notes of the hour (intake.paging): the kinds written into the SQL (constants),
# so that ix_outbox_recent (kind, recipient, created_at) is searched once for each kind and only
# those rows, at most the global ceiling's worth, are read to count per organisation.
_PAGING_KINDS = "kind IN (" + ", ".join(f"'{k}'" for k in paging.KINDS) + ")"
_FOR_ORG = outbox.c.organisation_key == bindparam("org")
_PAGING_COUNTS = select(
    func.count(case((outbox.c.kind == paging.ALERT, 1))),
    func.count(case((and_(outbox.c.kind == paging.ALERT, _FOR_ORG), 1))),
    func.count(case((outbox.c.kind == paging.SUMMARY, 1))),
    func.count(case((and_(outbox.c.kind == paging.ORGANISATION_SUMMARY, _FOR_ORG), 1))),
).where(text(_PAGING_KINDS), outbox.c.recipient == bindparam("recipient"), outbox.c.created_at >= bindparam("since"))
_COUNT_TICKETS_OF = (
    select(func.count())
    .select_from(ticket)
    .where(ticket.c.requester == bindparam("requester"), ticket.c.created_at >= bindparam("since"))
)


def _insert_ignore(dialect: str, table: Any) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING, in the dialect's words."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


_IGNORING: dict[tuple[str, str], Insert] = {}


def _ignoring(dialect: str, table: Any) -> Insert:
    key = (dialect, table.name)
    stmt = _IGNORING.get(key)
    if stmt is None:
        stmt = _IGNORING[key] = _insert_ignore(dialect, table)
    return stmt


# -- PostgreSQL: fewer round trips, no deadlock between instances over one delivery -----------

# The duplicate lookup also takes a transaction-level advisory lock on the delivery (recipient,
# dedup key), without waiting. Every unit that stores a message looks for its duplicate first,
# so a transaction inserting a delivery always holds its lock: another instance storing the
# same delivery at the same moment is seen here, at once, instead of as a wait on the unique
# index of ``message`` - a wait that, with group commit, deadlocked two instances whose groups
# held each other's deliveries (PostgreSQL then aborted a whole group, every message in it
# answered 451, after deadlock_timeout).
_PG_FIND_DUPLICATE = text(
    "SELECT pg_try_advisory_xact_lock(:lock) AS free, d.ticket_id, d.reference, d.sender "
    "FROM (SELECT 1) AS one LEFT JOIN ("
    "SELECT message.ticket_id, ticket.reference, message.sender FROM message "
    "JOIN ticket ON ticket.id = message.ticket_id "
    "WHERE message.recipient = :recipient AND message.dedup_key = :dedup_key"
    ") AS d ON true"
).bindparams(bindparam("lock", type_=BigInteger))

# The same lookup as PgWire sends it, with ids for the inserts written behind (storage.pgwire).
_WIRE_FIND_DUPLICATE = (
    f"SELECT pg_try_advisory_xact_lock(%s::bigint) AS free, d.ticket_id, d.reference, d.sender, {NEXT_IDS} "
    "FROM (SELECT 1) AS one LEFT JOIN ("
    "SELECT message.ticket_id, ticket.reference, message.sender FROM message "
    "JOIN ticket ON ticket.id = message.ticket_id "
    "WHERE message.recipient = %s AND message.dedup_key = %s"
    ") AS d ON true"
)

# The flood limits of a new email (intake/service.py): the tickets its sender opened within one
# period and the acknowledgements sent to them within another, in one round trip.
_WIRE_SENDER_COUNTS = (
    "SELECT (SELECT count(*) FROM ticket WHERE requester = %s AND created_at >= %s), "
    "(SELECT count(*) FROM outbox WHERE kind = 'acknowledgement' AND recipient = %s AND created_at >= %s)"
)
_WIRE_PAGING_COUNTS = (
    f"SELECT count(*) FILTER (WHERE kind = '{paging.ALERT}'), "
    f"count(*) FILTER (WHERE kind = '{paging.ALERT}' AND organisation_key = %s), "
    f"count(*) FILTER (WHERE kind = '{paging.SUMMARY}'), "
    f"count(*) FILTER (WHERE kind = '{paging.ORGANISATION_SUMMARY}' AND organisation_key = %s) "
    f"FROM outbox WHERE {_PAGING_KINDS} AND recipient = %s AND created_at >= %s"
)
_WIRE_COUNT_OUTBOX_TO = "SELECT count(*) FROM outbox WHERE kind = %s AND created_at >= %s AND recipient = %s"
_WIRE_COUNT_OUTBOX_KIND = "SELECT count(*) FROM outbox WHERE kind = %s AND created_at >= %s"


def _error_text(error: str | None) -> str:
    """A send's error as stored: its first 500 characters, storable (a relay's reply may carry
    a NUL or a byte that was not UTF-8; either made the outcome unrecordable, and the note went
    again at every lease)."""
    return storable_text(error or "")[:500]


def _delivery_lock(recipient: str, dedup_key: str) -> int:
    """The advisory lock key of one delivery: 64 bits of a hash, as PostgreSQL's bigint."""
    digest = hashlib.blake2b(f"intake-delivery\0{recipient}\0{dedup_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _claim(locked: bool) -> Any:
    due = (
        select(outbox.c.id)
        .where(
            outbox.c.status == "pending",
            outbox.c.channel == bindparam("of_channel"),
            outbox.c.next_attempt_at <= bindparam("now"),
            or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < bindparam("now")),
        )
        .order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(bindparam("limit"))
    )
    if locked:
        due = due.with_for_update(skip_locked=True)
    return (
        update(outbox)
        .where(outbox.c.id.in_(due.scalar_subquery()))
        .values(claimed_by=bindparam("owner"), claimed_until=bindparam("lease_until"))
        .returning(
            outbox.c.id, outbox.c.ticket_id, outbox.c.kind, outbox.c.payload, outbox.c.attempts, outbox.c.channel
        )
    )


_CLAIM = _claim(locked=False)
_CLAIM_LOCKED = _claim(locked=True)  # PostgreSQL: skip the rows another claimer holds
# A note sent: recorded as sent. One a bounce has marked undeliverable meanwhile (Postfix on
# the same host bounces within milliseconds, before the outcome is recorded) keeps its status
# and the bounce's reason but counts its attempt, so that it does not read "after 0 attempts".
_PENDING = outbox.c.status == "pending"
_SENT_WHERE = or_(_PENDING, and_(outbox.c.status == "undeliverable", outbox.c.sent_at.is_(None)))
_SENT_VALUES = {
    "status": case((_PENDING, "sent"), else_=outbox.c.status),
    "attempts": outbox.c.attempts + 1,
    "claimed_until": None,
    "last_error": case((_PENDING, None), else_=outbox.c.last_error),
}
# SQLite (on the fast path): the ids of the notes sent, as one JSON array parameter.
_FINISH_SENT_SQLITE = (
    update(outbox)
    .where(outbox.c.id.in_(select(column("value", Integer)).select_from(func.json_each(bindparam("ids")))), _SENT_WHERE)
    .values(sent_at=bindparam("now"), **_SENT_VALUES)
)


def _json(value: Any) -> Any:
    """A JSON column's value: the fast path hands back the stored text, SQLAlchemy the object."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def _stored_note(value: Any) -> Outgoing:
    """An outbox entry's note from its stored payload (read at send time, not in the claim)."""
    return outgoing_from_dict(_json(value))


class DeliveryBusy(Exception):
    """Another transaction is storing this very delivery right now."""


class SqlUnitOfWork:
    """Implements :class:`intake.ports.UnitOfWork`; also the read side for the CLI and web."""

    def __init__(self, conn: Connection, wire: PgWire | None = None) -> None:
        self.conn = conn
        self.dialect = conn.dialect.name
        # SQLite: the hot statements straight through the sqlite3 cursor (storage/sqlitefast.py).
        self.fast = FastPath(conn.connection.driver_connection) if self.dialect == "sqlite" else None  # type: ignore[arg-type]
        # PostgreSQL's writer: inserts written behind, reads sent with what is queued.
        self.wire = wire

    def flush(self) -> None:
        """Queue this unit's inserts as one statement (sent with the next one that needs an answer)."""
        if self.wire is not None:
            self.wire.flush()

    def sync(self) -> None:
        """Send this unit's writes now: a conflict they meet is reported here, as this unit's."""
        if self.wire is not None:
            self.wire.sync()

    # -- helpers ---------------------------------------------------------------------------

    def _insert(self, statement: Any, values: dict[str, Any]) -> int:
        """Run a prebuilt INSERT into a table with an integer id; the new row's id."""
        if self.fast is not None and (cursor := self.fast.execute(statement, values)) is not None:
            return int(cursor.lastrowid or 0)
        result = self.conn.execute(statement, values)
        return int(result.inserted_primary_key[0]) if result.inserted_primary_key else 0

    def _all(self, statement: Any, params: dict[str, Any]) -> Sequence[Any]:
        """Run a prebuilt SELECT of plain values (no type conversion on the way back); its rows."""
        if self.fast is not None and (cursor := self.fast.execute(statement, params)) is not None:
            return cursor.fetchall()
        return self.conn.execute(statement, params).all()

    def _write(self, statement: Any, values: dict[str, Any]) -> None:
        """Run a prebuilt statement whose result nobody needs."""
        if self.fast is None or self.fast.execute(statement, values) is None:
            self.conn.execute(statement, values)

    def _first(self, statement: Any, params: dict[str, Any]) -> Any:
        """Run a prebuilt SELECT of plain values (no type conversion on the way back); its first row."""
        if self.fast is not None and (cursor := self.fast.execute(statement, params)) is not None:
            return cursor.fetchone()
        return self.conn.execute(statement, params).first()

    def _facts(self, row: RowMapping) -> TicketFacts:
        parts = [r[0] for r in self._all(_PARTICIPANTS, {"id": row["id"]})]
        return TicketFacts(
            id=row["id"],
            reference=row["reference"],
            subject=row["subject"],
            channel=Channel(row["channel"]),
            requester=row["requester"],
            organisation=row["organisation"],
            severity=Severity(row["severity"]),
            security=bool(row["security"]),
            alerted=bool(row["alerted"]),
            status=row["status"],
            created_at=row["created_at"],
            response_due=row["response_due"],
            participants=frozenset(parts),
            thread_key=row["thread_key"],
            plan=row["plan"],
            language=row["language"],
            targets={k: datetime.fromisoformat(v) for k, v in (row["targets"] or {}).items()},
            responded_at=row["responded_at"],
            escalation_step=row["escalation_step"],
            escalated_at=row["escalated_at"],
        )

    # -- lookups -----------------------------------------------------------------------------

    def find_duplicate(self, recipient: str, dedup_key: str) -> Duplicate | None:
        if self.dialect == "postgresql":
            return self._pg_find_duplicate(recipient, dedup_key)
        row = self._first(_FIND_DUPLICATE, {"recipient": recipient, "dedup_key": dedup_key})
        return Duplicate(ticket_id=row[0], reference=row[1], sender=row[2]) if row else None

    def _pg_find_duplicate(self, recipient: str, dedup_key: str) -> Duplicate | None:
        params = {"lock": _delivery_lock(recipient, dedup_key), "recipient": recipient, "dedup_key": dedup_key}
        if self.wire is not None:
            # One round trip with BEGIN and whatever the units before this one wrote.
            ids = self.wire.ids
            free, ticket_id, reference, sender, *fresh = self.wire.query(
                _WIRE_FIND_DUPLICATE, (params["lock"], *ids.wanted(), recipient, dedup_key)
            )[0]
            ids.add(fresh)
        else:
            free, ticket_id, reference, sender = self.conn.execute(_PG_FIND_DUPLICATE, params).one()
        if ticket_id is not None:
            return Duplicate(ticket_id=ticket_id, reference=reference, sender=sender)
        if free:
            return None
        # Another transaction (another instance) is storing this delivery right now. Do not
        # wait for it while this group holds locks of its own: report a conflict, as a unique
        # violation would. The store runs the unit again (the other has usually committed by
        # then, and this is a duplicate), and answers "try again" to this copy alone if it is
        # still busy; the sender's retry then finds the duplicate.
        raise IntegrityError(
            "find_duplicate", params, DeliveryBusy(f"another transaction is storing {dedup_key} for {recipient}")
        )

    def stored_message(self, recipient: str, dedup_key: str) -> StoredMessage | None:
        row = self._first(_STORED_MESSAGE, {"recipient": recipient, "dedup_key": dedup_key})
        if row is None:
            return None
        latest = self._first(_LATEST_EDIT, {"id": row[0]})
        return StoredMessage(
            id=row[0],
            ticket_id=row[1],
            reference=row[2],
            sender=row[3],
            direction=Direction(row[4]),
            text=latest[0] if latest is not None else row[5],
        )

    def ticket_by_reference(self, reference: str) -> TicketFacts | None:
        row = self.conn.execute(_TICKET_BY_REFERENCE, {"reference": reference}).mappings().first()
        return self._facts(row) if row is not None else None

    def tickets_by_message_ids(self, message_ids: Sequence[str]) -> list[KnownId]:
        if not message_ids:
            return []
        # One id (a chat thread, a reply citing one message) is the usual case: a prebuilt
        # statement for it; several share one prebuilt "IN (...)" statement.
        if len(message_ids) == 1:
            rows = self._all(_KNOWN_ID, {"mid": message_ids[0]})
        else:
            rows = self.conn.execute(_KNOWN_IDS, {"mids": list(message_ids)[:200]}).all()
        order = {mid: i for i, mid in enumerate(message_ids)}
        found: list[KnownId] = []
        cache: dict[int, TicketFacts | None] = {}
        for mid, tid, ours in sorted(rows, key=lambda r: (order.get(r[0], 1 << 30), not r[2])):
            if tid not in cache:
                row = self.conn.execute(_TICKET_BY_ID, {"id": tid}).mappings().first()
                cache[tid] = self._facts(row) if row is not None else None
            facts = cache[tid]
            if facts is not None:
                found.append(KnownId(facts, mid, bool(ours)))
        return found

    def is_known_participant(self, address: str) -> bool:
        return (
            self.conn.execute(select(participant.c.ticket_id).where(participant.c.address == address).limit(1)).first()
            is not None
        )

    # -- writes ------------------------------------------------------------------------------

    def create_ticket(self, t: NewTicket) -> TicketFacts:
        values = _ticket_values(t)
        new_id: Any
        if self.wire is not None:  # written behind, with an id drawn ahead
            new_id = self.wire.next_id("ticket")
            self.wire.rows.tickets[new_id] = {"id": new_id, **values}
            self.wire.added(len(values))
        else:
            new_id = self._insert(_INSERT_TICKET, values)
        assert new_id
        return TicketFacts(
            id=int(new_id),
            reference=t.reference,
            subject=t.subject,
            channel=t.channel,
            requester=t.requester,
            organisation=t.organisation,
            severity=t.severity,
            security=t.security,
            alerted=False,
            status="open",
            created_at=t.created_at,
            response_due=t.response_due,
            participants=frozenset(),
            thread_key=t.thread_key,
            plan=t.plan,
            language=t.language,
            targets=dict(t.targets),
        )

    def update_ticket(self, ticket_id: int, change: TicketChange) -> None:
        values: dict[str, Any] = {}
        if change.severity is not None:
            values["severity"] = int(change.severity)
        if change.security is not None:
            values["security"] = change.security
        if change.alerted is not None:
            values["alerted"] = change.alerted
        if change.response_due is not None:
            values["response_due"] = change.response_due
        if change.updated_at is not None:
            values["updated_at"] = change.updated_at
        if change.targets is not None:
            values["targets"] = {k: v.isoformat() for k, v in change.targets.items()}
        for name in ("responded_at", "escalation_step", "escalated_at", "sla_warned_at", "sla_missed_at"):
            value = getattr(change, name)
            if value is not None:
                values[name] = value
        held = self.wire.rows.tickets.get(ticket_id) if self.wire is not None else None
        if change.add_notes or change.add_evidence:
            if held is not None:
                row: Any = (held["notes"], held["evidence"])
            else:
                row = self.conn.execute(
                    select(ticket.c.notes, ticket.c.evidence).where(ticket.c.id == ticket_id)
                ).first()
            if row is not None:
                when = change.updated_at
                if change.add_notes:
                    values["notes"] = [*(row[0] or []), *(_note(when, n) for n in change.add_notes)]
                if change.add_evidence:
                    values["evidence"] = [*(row[1] or []), *(h.to_dict() for h in change.add_evidence)][-100:]
        if held is not None:
            held.update(values)  # a ticket this transaction has yet to insert: insert it so
        elif values:
            self.conn.execute(update(ticket).where(ticket.c.id == ticket_id).values(**values))

    def add_participant(self, ticket_id: int, address: str) -> None:
        if self.wire is not None:
            self.wire.rows.participants[(ticket_id, address)] = None
            self.wire.added(2)
            return
        self._write(_ignoring(self.dialect, participant), {"ticket_id": ticket_id, "address": address})

    def add_message(self, m: NewMessage) -> int:
        values = _message_values(m)
        if self.wire is not None:
            new_id = self.wire.next_id("message")
            self.wire.rows.messages.append({"id": new_id, **values})
            self.wire.added(len(values))
            # Its own Message-ID is indexed in the same statement; the service's
            # index_message_id(..., ours=False) right after finds it held.
            if m.message.message_id:
                self.wire.rows.message_ids.setdefault((m.message.message_id, m.ticket_id), False)
            return new_id
        return self._insert(_INSERT_MESSAGE, values)

    def index_message_id(self, ticket_id: int, mid: str, *, ours: bool) -> None:
        if not mid:
            return
        if self.wire is not None:
            self.wire.rows.message_ids.setdefault((mid, ticket_id), ours)
            self.wire.added(3)
            return
        self._write(_ignoring(self.dialect, message_id), {"message_id": mid, "ticket_id": ticket_id, "ours": ours})

    def enqueue(self, entry: OutboxEntry) -> int:
        values = _outbox_values(entry)
        if self.wire is not None:
            new_id = self.wire.next_id("outbox")
            self.wire.rows.outbox.append({"id": new_id, **values})
            self.wire.added(len(values))
            return new_id
        return self._insert(_INSERT_OUTBOX, values)

    def mark_undeliverable(self, message_ids: Sequence[str], reason: str) -> list[int]:
        if not message_ids:
            return []
        ids = list(self.conn.execute(select(outbox.c.id).where(outbox.c.message_id.in_(list(message_ids)))).scalars())
        if ids:
            self.conn.execute(
                update(outbox)
                .where(outbox.c.id.in_(ids))
                .values(status="undeliverable", last_error=f"bounced: {reason}"[:500])
            )
        return ids

    def count_outbox_since(self, *, kind: str, recipient: str | None, since: datetime) -> int:
        if self.wire is not None:
            if recipient is None:
                return int(self.wire.query(_WIRE_COUNT_OUTBOX_KIND, (kind, stored_utc(since)))[0][0])
            return int(self.wire.query(_WIRE_COUNT_OUTBOX_TO, (kind, stored_utc(since), recipient))[0][0])
        if recipient is None:
            return int(self._first(_COUNT_OUTBOX_KIND, {"kind": kind, "since": since})[0])
        return int(self._first(_COUNT_OUTBOX_TO, {"kind": kind, "recipient": recipient, "since": since})[0])

    def paging_counts(self, *, recipient: str, organisation_key: str, since: datetime) -> PagingCounts:
        if self.wire is not None:
            params = (organisation_key, organisation_key, recipient, stored_utc(since))
            row = self.wire.query(_WIRE_PAGING_COUNTS, params)[0]
        else:
            row = self._first(_PAGING_COUNTS, {"org": organisation_key, "recipient": recipient, "since": since})
        alerts, for_org, summaries, org_summaries = (int(n) for n in row)
        return PagingCounts(
            alerts=alerts,
            alerts_for_organisation=for_org,
            summary_sent=summaries > 0,
            organisation_summary_sent=org_summaries > 0,
        )

    def latest_ticket_of(self, requester: str) -> TicketFacts | None:
        row = (
            self.conn.execute(
                select(*_TICKET_COLS)
                .where(ticket.c.requester == requester)
                .order_by(ticket.c.created_at.desc(), ticket.c.id.desc())
                .limit(1)
            )
            .mappings()
            .first()
        )
        return self._facts(row) if row is not None else None

    def count_tickets_since(self, *, requester: str, since: datetime) -> int:
        return int(self._first(_COUNT_TICKETS_OF, {"requester": requester, "since": since})[0])

    def sender_counts(self, *, sender: str, tickets_since: datetime, acks_since: datetime) -> tuple[int, int]:
        if self.wire is not None:  # one round trip for both
            tickets, acks = self.wire.query(
                _WIRE_SENDER_COUNTS, (sender, stored_utc(tickets_since), sender, stored_utc(acks_since))
            )[0]
            return int(tickets), int(acks)
        return (
            self.count_tickets_since(requester=sender, since=tickets_since),
            self.count_outbox_since(kind="acknowledgement", recipient=sender, since=acks_since),
        )

    def sla_candidates(self, *, due_before: datetime, limit: int) -> list[SlaCandidate]:
        rows = (
            self.conn.execute(
                select(*_TICKET_COLS)
                .where(
                    ticket.c.status == "open",
                    ticket.c.responded_at.is_(None),
                    ticket.c.response_due <= due_before,
                    ticket.c.sla_missed_at.is_(None),
                )
                .order_by(ticket.c.response_due)
                .limit(limit)
            )
            .mappings()
            .all()
        )
        return [
            SlaCandidate(ticket=self._facts(r), warned_at=r["sla_warned_at"], missed_at=r["sla_missed_at"])
            for r in rows
        ]

    # -- outbox dispatch ---------------------------------------------------------------------

    def claim_outbox(
        self, *, now: datetime, owner: str, lease_until: datetime, limit: int, channels: Sequence[str] = CHANNELS
    ) -> list[OutboxItem]:
        # One statement a channel: lease its due entries and return them. On PostgreSQL the
        # rows are locked, skipping those another claimer holds; SQLite has one writer at a
        # time (BEGIN IMMEDIATE), and its UPDATE ... RETURNING (3.35+) does the same. On SQLite
        # it goes through the fast path: the outbox process holds the write lock that intake's
        # listener waits for while it runs, and SQLAlchemy's execution was most of that time.
        # By channel, on ix_outbox_channel_due: a channel held while it is down (thousands of
        # entries waiting, say) costs the other channel's claim nothing.
        claimed: list[Any] = []
        for channel in channels:
            params = {"now": now, "limit": limit, "owner": owner, "lease_until": lease_until, "of_channel": channel}
            claimed += (
                self.conn.execute(_CLAIM_LOCKED, params).all()
                if self.dialect == "postgresql"
                else self._all(_CLAIM, params)
            )
        return [
            OutboxItem(
                id=r[0], ticket_id=r[1], kind=r[2], attempts=r[4], load=partial(_stored_note, r[3]), channel=r[5]
            )
            for r in sorted(claimed, key=lambda r: r[0])
        ]

    def finish_outbox(self, results: Sequence[SendResult], *, now: datetime) -> None:
        sent = [r.id for r in results if r.ok]
        if sent and self.dialect == "sqlite":  # the usual outcome, all in one statement
            self._write(_FINISH_SENT_SQLITE, {"ids": json.dumps(sent), "now": now})
        elif sent:
            self.conn.execute(
                update(outbox).where(outbox.c.id.in_(sent), _SENT_WHERE).values(sent_at=now, **_SENT_VALUES)
            )
        for r in sorted((r for r in results if not r.ok), key=lambda r: r.id):  # in one order: no deadlock
            base = update(outbox).where(outbox.c.id == r.id, outbox.c.status == "pending")
            if not r.attempted:  # held with its channel: as it was, due again at once
                self.conn.execute(base.values(claimed_until=None, last_error=_error_text(r.error)))
            elif r.permanent:
                self.conn.execute(
                    base.values(
                        status="failed",
                        attempts=outbox.c.attempts + 1,
                        claimed_until=None,
                        last_error=_error_text(r.error),
                    )
                )
            else:
                self.conn.execute(
                    base.values(
                        attempts=outbox.c.attempts + 1,
                        claimed_until=None,
                        next_attempt_at=r.retry_at or now,
                        last_error=_error_text(r.error),
                    )
                )

    def lease_owners(self, *, now: datetime) -> list[str]:
        query = (
            select(outbox.c.claimed_by)
            .where(outbox.c.status == "pending", outbox.c.claimed_until > now, outbox.c.claimed_by.is_not(None))
            .distinct()
        )
        return [str(owner) for owner in self.conn.execute(query).scalars()]

    def release_leases(self, owners: Sequence[str], *, now: datetime) -> int:
        if not owners:
            return 0
        statement = (
            update(outbox)
            .where(outbox.c.status == "pending", outbox.c.claimed_by.in_(list(owners)), outbox.c.claimed_until > now)
            .values(claimed_until=None)
        )
        return int(self.conn.execute(statement).rowcount or 0)

    def explain_waiting(self, *, channel: str, why: str, due_since: datetime | None, now: datetime) -> int:
        # On ix_outbox_channel_due: after the first call of an outage, only the range of the
        # entries that came since the previous one is read. Entries another dispatcher holds
        # (its lease running) are its own to record; on PostgreSQL the rows are taken with
        # SKIP LOCKED, so that this never waits for, nor deadlocks with, another instance that
        # is sending or recording them.
        where = [
            outbox.c.status == "pending",
            outbox.c.channel == channel,
            or_(
                outbox.c.last_error.is_(None),
                # Tried when the channel went down, due again since: it waits for the channel
                # too ("next attempt" would be a time past).
                and_(outbox.c.next_attempt_at <= now, not_(outbox.c.last_error.startswith(WAITING, autoescape=True))),
            ),
            or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < now),
        ]
        if due_since is not None:
            where.append(outbox.c.next_attempt_at >= due_since)
        if self.dialect == "postgresql":
            rows = select(outbox.c.id).where(*where).with_for_update(skip_locked=True).scalar_subquery()
            statement = update(outbox).where(outbox.c.id.in_(rows))
        else:
            statement = update(outbox).where(*where)
        result = self.conn.execute(statement.values(last_error=why[:500]))
        return int(result.rowcount or 0)

    # -- read side (CLI, web) ------------------------------------------------------------------

    def list_tickets(self, *, status: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        counts = (  # messages: their edits are versions of them
            select(message.c.ticket_id, func.count().label("n"))
            .where(message.c.edit_of.is_(None))
            .group_by(message.c.ticket_id)
            .subquery()
        )
        ack = outbox.alias("ack")
        last_ack = (
            select(func.max(ack.c.id))
            .where(ack.c.ticket_id == ticket.c.id, ack.c.kind == "acknowledgement")
            .correlate(ticket)
            .scalar_subquery()
        )
        ack_delivery = select(outbox.c.status).where(outbox.c.id == last_ack).scalar_subquery().label("ack_delivery")
        q = (
            select(
                ticket.c.id,
                ticket.c.reference,
                ticket.c.subject,
                ticket.c.severity,
                ticket.c.security,
                ticket.c.channel,
                ticket.c.requester,
                ticket.c.requester_name,
                ticket.c.organisation,
                ticket.c.status,
                ticket.c.created_at,
                ticket.c.updated_at,
                ticket.c.response_due,
                ticket.c.ack_status,
                ack_delivery,
                ticket.c.plan,
                ticket.c.language,
                ticket.c.targets,
                ticket.c.responded_at,
                ticket.c.escalation_step,
                func.coalesce(counts.c.n, 0).label("message_count"),
            )
            .outerjoin(counts, counts.c.ticket_id == ticket.c.id)
            .order_by(ticket.c.severity, ticket.c.created_at)
            .limit(limit)
        )
        if status:
            q = q.where(ticket.c.status == status)
        return [dict(r) for r in self.conn.execute(q).mappings()]

    def ticket_detail(self, reference: str) -> dict[str, Any] | None:
        row = self.conn.execute(select(ticket).where(ticket.c.reference == reference)).mappings().first()
        if row is None:
            return None
        detail = dict(row)
        detail["participants"] = sorted(
            self.conn.execute(select(participant.c.address).where(participant.c.ticket_id == row["id"])).scalars()
        )
        msgs = self.conn.execute(
            select(*(c for c in message.c if c.name != "raw"), func.length(message.c.raw).label("raw_size"))
            .where(message.c.ticket_id == row["id"])
            .order_by(message.c.received_at, message.c.id)
        ).mappings()
        detail["messages"] = [dict(m) for m in msgs]
        # Each message with the ids of its edits (rows of their own, in the thread by arrival).
        edits: dict[int, list[int]] = {}
        for m in detail["messages"]:
            if m["edit_of"] is not None:
                edits.setdefault(m["edit_of"], []).append(m["id"])
        for m in detail["messages"]:
            m["edits"] = edits.get(m["id"], [])
        notes = self.conn.execute(
            select(
                outbox.c.id,
                outbox.c.kind,
                outbox.c.recipient,
                outbox.c.status,
                outbox.c.attempts,
                outbox.c.next_attempt_at,
                outbox.c.last_error,
                outbox.c.created_at,
                outbox.c.sent_at,
                outbox.c.payload,
            )
            .where(outbox.c.ticket_id == row["id"])
            .order_by(outbox.c.id)
        ).mappings()
        detail["outbox"] = [
            {**{k: v for k, v in dict(n).items() if k != "payload"}, "subject": n["payload"].get("subject", "")}
            for n in notes
        ]
        # As list_tickets gives it: the status of the latest acknowledgement in the outbox.
        acks = [n["status"] for n in detail["outbox"] if n["kind"] == "acknowledgement"]
        detail["ack_delivery"] = acks[-1] if acks else None
        return detail

    def raw_message(self, message_row_id: int) -> bytes | None:
        return self.conn.execute(select(message.c.raw).where(message.c.id == message_row_id)).scalar_one_or_none()

    def stats(self) -> dict[str, Any]:
        n_tickets = self.conn.execute(select(func.count()).select_from(ticket)).scalar_one()
        n_rows = self.conn.execute(select(func.count()).select_from(message)).scalar_one()
        n_edits = self.conn.execute(
            select(func.count()).select_from(message).where(message.c.edit_of.is_not(None))
        ).scalar_one()
        by_status: dict[str, int] = {
            r[0]: r[1] for r in self.conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status))
        }
        by_kind: dict[str, int] = {
            r[0]: r[1] for r in self.conn.execute(select(outbox.c.kind, func.count()).group_by(outbox.c.kind))
        }
        oldest = self.conn.execute(
            select(func.min(outbox.c.created_at)).where(outbox.c.status == "pending")
        ).scalar_one_or_none()
        return {
            "tickets": int(n_tickets),
            "messages": int(n_rows) - int(n_edits),
            "message_edits": int(n_edits),
            "security_tickets": int(
                self.conn.execute(select(func.count()).select_from(ticket).where(ticket.c.security)).scalar_one()
            ),
            "outbox": {s: int(by_status.get(s, 0)) for s in ("pending", "sent", "failed", "undeliverable")},
            "outbox_by_kind": {k: int(v) for k, v in by_kind.items()},
            "outbox_oldest_pending": oldest,
        }


def _ticket_values(t: NewTicket) -> dict[str, Any]:
    return dict(
        reference=t.reference,
        subject=t.subject,
        channel=str(t.channel),
        requester=t.requester,
        requester_name=t.requester_name,
        organisation=t.organisation,
        severity=int(t.severity),
        security=t.security,
        status="open",
        alerted=False,
        ack_status=t.ack_status,
        thread_key=t.thread_key,
        created_at=t.created_at,
        updated_at=t.created_at,
        response_due=t.response_due,
        notes=[_note(t.created_at, n) for n in t.notes],
        evidence=[h.to_dict() for h in t.evidence],
        plan=t.plan,
        language=t.language,
        targets={k: v.isoformat() for k, v in t.targets.items()},
        escalation_step=0,
    )


def _message_values(m: NewMessage) -> dict[str, Any]:
    msg = m.message
    return dict(
        ticket_id=m.ticket_id,
        direction=str(m.direction),
        route=str(m.route),
        route_note=m.route_note,
        channel=str(msg.channel),
        recipient=msg.recipient,
        dedup_key=m.dedup_key or msg.dedup_key,
        message_id=msg.message_id,
        sender=msg.sender,
        sender_name=msg.sender_name,
        subject=msg.subject,
        body=msg.body,
        new_text=msg.new_text,
        html=msg.html,
        attachments=[
            {"filename": a.filename, "content_type": a.content_type, "size": a.size, "kept": a.kept}
            for a in msg.attachments
        ],
        hits=[h.to_dict() for h in m.hits],
        automation=m.automation,
        parse_problem=msg.parse_problem,
        external_id=msg.external_id,
        received_at=m.received_at,
        sent_date=msg.date,
        raw=msg.raw,
        edit_of=m.edit_of,
    )


def _outbox_values(entry: OutboxEntry) -> dict[str, Any]:
    payload = entry.payload
    return dict(
        ticket_id=entry.ticket_id,
        kind=entry.kind,
        channel="email" if isinstance(payload, OutgoingEmail) else "slack",
        recipient=payload_recipient(payload),
        message_id=payload.message_id if isinstance(payload, OutgoingEmail) else "",
        payload=payload.to_dict(),
        status="pending",
        attempts=0,
        next_attempt_at=entry.created_at,
        created_at=entry.created_at,
        organisation_key=entry.organisation_key,
    )


def _note(when: datetime | None, text: str) -> dict[str, Any]:
    return {"at": when.isoformat(timespec="seconds") if when else None, "text": text}
