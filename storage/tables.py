"""The database tables, declared with SQLModel. Only ``storage`` sees them.

Timestamps are stored as UTC (naive on SQLite, which has no time zones) and always come back
as aware UTC datetimes. JSON columns hold small lists (notes, evidence, attachments).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import JSON, Column, DateTime, Index, LargeBinary, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel


@overload
def stored_utc(value: datetime) -> datetime: ...
@overload
def stored_utc(value: None) -> None: ...
def stored_utc(value: datetime | None) -> datetime | None:
    """A timestamp as the database holds it: naive UTC (aware datetimes only, never naive)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the database; use aware UTC datetimes")
    return value.astimezone(UTC).replace(tzinfo=None)


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return stored_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


def _ts(**kw: Any) -> Any:
    return Field(sa_column=Column(UTCDateTime(), **kw))


def _json() -> Any:
    return Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class TicketRow(SQLModel, table=True):
    __tablename__ = "ticket"
    __table_args__ = (
        Index("ix_ticket_requester_created", "requester", "created_at"),
        Index("ix_ticket_open_due", "status", "response_due"),
    )

    id: int | None = Field(default=None, primary_key=True)
    reference: str = Field(max_length=40, unique=True)
    subject: str = Field(sa_column=Column(Text, nullable=False))
    channel: str = Field(max_length=16)
    requester: str = Field(max_length=320)
    requester_name: str = Field(default="", max_length=200)
    organisation: str | None = Field(default=None, max_length=200)
    severity: int
    security: bool = False
    status: str = Field(default="open", max_length=16)
    alerted: bool = False
    ack_status: str = Field(default="queued", sa_column=Column(Text, nullable=False))
    thread_key: str | None = Field(default=None, max_length=200, index=True)
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)
    response_due: datetime = _ts(nullable=False)
    notes: list[Any] = _json()
    evidence: list[Any] = _json()
    plan: str = Field(default="standard", max_length=64)
    language: str = Field(default="en", max_length=8)
    targets: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    responded_at: datetime | None = _ts(nullable=True)
    sla_warned_at: datetime | None = _ts(nullable=True)
    sla_missed_at: datetime | None = _ts(nullable=True)
    escalation_step: int = 0
    escalated_at: datetime | None = _ts(nullable=True)


class ParticipantRow(SQLModel, table=True):
    __tablename__ = "participant"

    ticket_id: int = Field(foreign_key="ticket.id", primary_key=True)
    address: str = Field(max_length=320, primary_key=True, index=True)


class MessageRow(SQLModel, table=True):
    __tablename__ = "message"
    __table_args__ = (UniqueConstraint("recipient", "dedup_key", name="uq_message_delivery"),)

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    direction: str = Field(max_length=16)
    route: str = Field(max_length=16)
    route_note: str = Field(default="", sa_column=Column(Text, nullable=False))
    channel: str = Field(max_length=16)
    recipient: str = Field(max_length=320)
    dedup_key: str = Field(max_length=1000)
    message_id: str = Field(default="", max_length=1000)
    sender: str = Field(default="", max_length=320)
    sender_name: str = Field(default="", max_length=200)
    subject: str = Field(default="", sa_column=Column(Text, nullable=False))
    body: str = Field(default="", sa_column=Column(Text, nullable=False))
    new_text: str = Field(default="", sa_column=Column(Text, nullable=False))
    html: bool = False
    attachments: list[Any] = _json()
    hits: list[Any] = _json()
    automation: str | None = Field(default=None, sa_column=Column(Text))
    parse_problem: str | None = Field(default=None, sa_column=Column(Text))
    external_id: str | None = Field(default=None, max_length=200)
    received_at: datetime = _ts(nullable=False)
    sent_date: datetime | None = _ts(nullable=True)  # an edit: when it was made
    raw: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    # An edit of a message (Slack's message_changed) is a row of its own, the message's row kept
    # as it was: the id of the message it changes. No foreign key: adding one to a table SQLite
    # already has means copying the whole table (Alembic's batch mode), and rows are never deleted.
    edit_of: int | None = Field(default=None, index=True)


class MessageIdRow(SQLModel, table=True):
    """Every Message-ID known for a ticket: customers' and the ones intake generated."""

    __tablename__ = "message_id"

    message_id: str = Field(max_length=1000, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", primary_key=True)
    ours: bool = False


class OutboxRow(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (
        # The claim takes the due entries of one channel at a time (intake.dispatch holds an
        # unavailable channel's entries without reading past them).
        Index("ix_outbox_channel_due", "status", "channel", "next_attempt_at"),
        Index("ix_outbox_recent", "kind", "recipient", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    kind: str = Field(max_length=32)
    channel: str = Field(max_length=16)
    recipient: str = Field(default="", max_length=320)
    message_id: str = Field(default="", max_length=1000, index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending, sent, failed, undeliverable
    attempts: int = 0
    next_attempt_at: datetime = _ts(nullable=False)
    claimed_by: str | None = Field(default=None, max_length=100)
    claimed_until: datetime | None = _ts(nullable=True)
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = _ts(nullable=False)
    sent_at: datetime | None = _ts(nullable=True)
    # An IRT alert's or summary's organisation (intake.paging): the per-organisation share is
    # counted on it, among the lead's notes of the hour that ix_outbox_recent finds. NULL on
    # every other note, and on the alerts of a database from before it (counted in all only).
    organisation_key: str | None = Field(default=None, max_length=400)


metadata = SQLModel.metadata
ticket = TicketRow.__table__  # type: ignore[attr-defined]
participant = ParticipantRow.__table__  # type: ignore[attr-defined]
message = MessageRow.__table__  # type: ignore[attr-defined]
message_id = MessageIdRow.__table__  # type: ignore[attr-defined]
outbox = OutboxRow.__table__  # type: ignore[attr-defined]
