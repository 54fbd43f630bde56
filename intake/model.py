"""Channel-neutral values of the domain: messages in, tickets, outgoing notes.

Every adapter turns what it receives (an SMTP transaction, a Slack event) into an
:class:`InboundMessage`; the core decides on that value alone. Everything here is a frozen
value object: decisions are values, side effects come later in the service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Any


class Channel(StrEnum):
    EMAIL = "email"
    SLACK = "slack"


class Severity(IntEnum):
    """Support severity: 1 is the most urgent (all core systems, all users)."""

    S1 = 1
    S2 = 2
    S3 = 3
    S4 = 4

    @property
    def label(self) -> str:
        return f"Severity {int(self)}"


# Our Message-IDs on notes to our own people (IRT alert, triage, escalation contact) start
# with this: a reply to one joins its ticket, but is no customer's, so no customer text
# (security notice, escalation reply) answers it.
STAFF_NOTE_ID_PREFIX = "staff."


class Route(StrEnum):
    """Why a stored message went where it went (kept on every message row)."""

    NEW = "new"  # opened a new ticket
    REFERENCE = "reference"  # joined by the reference in its subject / text
    HEADER = "header"  # joined by In-Reply-To / References
    THREAD = "thread"  # joined by its chat thread (Slack thread_ts)
    FLOOD = "flood"  # joined the sender's latest ticket: too many new tickets from one sender
    DUPLICATE = "duplicate"  # a redelivery; nothing changed
    EDIT = "edit"  # its author's edit of a message stored on the ticket (the message stays as it was)
    IGNORED = "ignored"  # not for a ticket (a staff message outside any ticket's thread)


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    STAFF = "staff"


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    kept: bool = True  # False when a size cap made us drop its bytes


def _frozen_headers(headers: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType({k.lower(): v for k, v in (headers or {}).items()})


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundMessage:
    """One message as the core sees it, whatever channel it came from.

    Addresses are lower-cased bare addresses (``alice@example.com``). ``message_id`` and the
    entries of ``in_reply_to`` / ``references`` carry no angle brackets. ``body`` is the whole
    plain text (HTML-only mail already turned into readable text); ``new_text`` is the part the
    author wrote now: the body without quoted history and signature.
    """

    channel: Channel
    sender: str  # the author's identity: the From address (never Reply-To)
    sender_name: str = ""
    reply_to: tuple[str, ...] = ()
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    recipient: str = ""  # the support address this copy was delivered to (envelope RCPT)
    envelope_sender: str | None = None  # MAIL FROM; "" is the null reverse-path <>
    subject: str = ""
    body: str = ""
    new_text: str = ""
    quoted: str = ""  # quoted history (looked at only by rules that ask for it)
    # Some of the body is text rendered from HTML: an HTML-only part, or the HTML of an
    # alternative whose plain part did not stand for it (a placeholder, cut short).
    html: bool = False
    attachments: tuple[Attachment, ...] = ()
    message_id: str = ""
    in_reply_to: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    date: datetime | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    raw: bytes = b""
    parse_problem: str | None = None  # set when the message could not be parsed fully
    # Chat channels (Slack): where the message was posted and the thread it belongs to.
    chat_channel: str | None = None  # channel id, e.g. "C0123ABCD"
    chat_ts: str | None = None  # this message's ts
    chat_thread_ts: str | None = None  # the thread root's ts when this is a thread reply
    thread_key: str | None = None  # "T1/C1/<root ts>": the ticket of a chat thread
    external_id: str | None = None  # platform id of this very message ("T1/C1/ts")
    event_id: str | None = None
    organisation: str | None = None  # known from the channel (a Slack channel's customer)
    staff: bool = False  # written by the support team itself (a staff reply, never a new ticket)
    author_team: str | None = None  # the author's workspace, when the chat platform says (Slack)
    shared_channel: bool = False  # a chat channel shared with another organisation (Slack Connect)

    def __post_init__(self) -> None:
        if not isinstance(self.headers, MappingProxyType):
            object.__setattr__(self, "headers", _frozen_headers(self.headers))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mapping proxy cannot be pickled; a plain dict travels and is frozen again on arrival
        # (messages cross to and from parsing worker processes).
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["headers"] = dict(self.headers)
        return (_inbound_from_dict, (values,))

    @property
    def dedup_key(self) -> str:
        """What makes two deliveries "the same message" (together with ``recipient``)."""
        if self.external_id:
            return f"ext:{self.external_id}"
        if self.message_id:
            return f"mid:{self.message_id}"
        return "sha256:" + hashlib.sha256(self.raw or self.body.encode("utf-8", "replace")).hexdigest()

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2] if "@" in self.sender else ""

    @property
    def related_ids(self) -> tuple[str, ...]:
        """Message-IDs this message answers, nearest first."""
        seen: dict[str, None] = {}
        for mid in (*self.in_reply_to, *reversed(self.references)):
            if mid:
                seen.setdefault(mid, None)
        return tuple(seen)


def _inbound_from_dict(values: dict[str, Any]) -> InboundMessage:
    return InboundMessage(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundEdit:
    """Its author changed the text of a message already posted (Slack's ``message_changed``).

    ``message`` is the message as it reads now, with the ids of the message edited (its
    ``external_id`` and ``dedup_key`` are that message's); ``previous`` is the same message with
    the texts it had before the change, when the platform says (what intake takes in when it
    never had the message). ``edit_id`` tells this change from the message's other ones (Slack:
    the ts of the ``message_changed`` event, one per change, kept by its retries), so that a
    redelivered edit is known again and two edits are two, also within one second;
    ``edited_at`` is when it was made.
    """

    message: InboundMessage
    edit_id: str
    edited_at: datetime | None = None
    previous: InboundMessage | None = None

    @property
    def dedup_key(self) -> str:
        """What makes two deliveries "the same edit" (with the message's ``recipient``)."""
        return f"edit:{self.message.dedup_key}@{self.edit_id}"

    @property
    def text_unchanged(self) -> bool:
        """The platform says the text did not change (a link preview added, a bot's update, a
        thread's reply count): no edit by anyone, whatever else changed."""
        return self.previous is not None and self.previous.body == self.message.body


@dataclass(frozen=True, slots=True)
class RuleHit:
    """One rule that matched, with the evidence a person needs to judge it."""

    rule: str
    phrase: str
    field: str  # "subject", "body", "quoted", "attachment"
    excerpt: str  # the matched text with a little context
    negated: bool = False  # a negation word stood shortly before the phrase
    severity: Severity = Severity.S1
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "phrase": self.phrase,
            "field": self.field,
            "excerpt": self.excerpt,
            "negated": self.negated,
            "severity": int(self.severity),
            "tags": list(self.tags),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuleHit:
        return cls(
            rule=str(d["rule"]),
            phrase=str(d["phrase"]),
            field=str(d["field"]),
            excerpt=str(d["excerpt"]),
            negated=bool(d.get("negated", False)),
            severity=Severity(int(d.get("severity", 1))),
            tags=tuple(d.get("tags", ())),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the keyword rules say of a message. ``severity`` is None when no rule set one."""

    severity: Severity | None = None
    security: bool = False
    hits: tuple[RuleHit, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingEmail:
    """A fully rendered email, stored in the outbox before it is sent."""

    to: tuple[str, ...]
    subject: str
    body: str
    message_id: str  # without angle brackets; fixed at intake so a resend folds in clients
    from_address: str
    from_name: str = ""
    envelope_from: str = ""  # "" sends with the null reverse-path <>
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "email",
            "to": list(self.to),
            "subject": self.subject,
            "body": self.body,
            "message_id": self.message_id,
            "from_address": self.from_address,
            "from_name": self.from_name,
            "envelope_from": self.envelope_from,
            "in_reply_to": self.in_reply_to,
            "references": list(self.references),
            "headers": [list(h) for h in self.headers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutgoingEmail:
        return cls(
            to=tuple(d["to"]),
            subject=d["subject"],
            body=d["body"],
            message_id=d["message_id"],
            from_address=d["from_address"],
            from_name=d.get("from_name", ""),
            envelope_from=d.get("envelope_from", ""),
            in_reply_to=d.get("in_reply_to"),
            references=tuple(d.get("references", ())),
            headers=tuple((str(k), str(v)) for k, v in d.get("headers", ())),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingChat:
    """A chat message to post (a thread reply, a direct message, a channel notice)."""

    channel: str  # channel id, or a user id for a direct message
    text: str
    thread_ts: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "chat", "channel": self.channel, "text": self.text, "thread_ts": self.thread_ts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutgoingChat:
        return cls(channel=d["channel"], text=d["text"], thread_ts=d.get("thread_ts"))


Outgoing = OutgoingEmail | OutgoingChat


def outgoing_from_dict(d: Mapping[str, Any]) -> Outgoing:
    if d.get("kind") == "chat":
        return OutgoingChat.from_dict(d)
    return OutgoingEmail.from_dict(d)
