"""The interfaces the core needs from the outside world, defined by the core.

``storage`` implements :class:`Store` and :class:`UnitOfWork`; ``adapters`` implement the
senders. The core's decisions run *inside* one unit of work as plain synchronous code: the
store runs the whole unit in one database transaction (it may group the units of concurrent
messages into one commit) and hands the result back to the event loop. So one inbound message
is one unit of work, and a database session never appears in a core signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from intake.model import (
    Channel,
    Direction,
    InboundMessage,
    Outgoing,
    OutgoingChat,
    OutgoingEmail,
    Route,
    RuleHit,
    Severity,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class TicketFacts:
    """What the core knows of a stored ticket when it decides about a new message."""

    id: int
    reference: str
    subject: str
    channel: Channel
    requester: str
    organisation: str | None
    severity: Severity
    security: bool
    alerted: bool
    status: str
    created_at: datetime
    response_due: datetime
    participants: frozenset[str] = frozenset()
    thread_key: str | None = None
    plan: str = "standard"
    language: str = "en"
    targets: Mapping[str, datetime] = field(default_factory=dict)
    responded_at: datetime | None = None
    escalation_step: int = 0
    escalated_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate:
    ticket_id: int
    reference: str
    sender: str = ""  # the sender of the copy already stored


@dataclass(frozen=True, slots=True)
class KnownId:
    """A Message-ID stored for a ticket; ``ours`` when intake generated it (unguessable)."""

    ticket: TicketFacts
    message_id: str
    ours: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTicket:
    reference: str
    subject: str
    channel: Channel
    requester: str
    requester_name: str
    organisation: str | None
    severity: Severity
    security: bool
    created_at: datetime
    response_due: datetime
    thread_key: str | None = None
    ack_status: str = "queued"  # or why no acknowledgement was sent
    notes: tuple[str, ...] = ()
    evidence: tuple[RuleHit, ...] = ()
    plan: str = "standard"
    language: str = "en"
    targets: Mapping[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TicketChange:
    """A change to an existing ticket. None leaves a field as it is."""

    severity: Severity | None = None
    security: bool | None = None
    alerted: bool | None = None
    response_due: datetime | None = None
    add_notes: tuple[str, ...] = ()
    add_evidence: tuple[RuleHit, ...] = ()
    updated_at: datetime | None = None
    targets: Mapping[str, datetime] | None = None
    responded_at: datetime | None = None
    escalation_step: int | None = None
    escalated_at: datetime | None = None
    sla_warned_at: datetime | None = None
    sla_missed_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewMessage:
    ticket_id: int
    message: InboundMessage
    direction: Direction
    route: Route
    route_note: str
    received_at: datetime
    hits: tuple[RuleHit, ...] = ()
    automation: str | None = None  # why it counts as automated mail (auto-reply, bounce, list)
    edit_of: int | None = None  # an edit: the id of the stored message it changes
    dedup_key: str | None = None  # None: the message's own (an edit has one of its own)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredMessage:
    """A message stored on a ticket, as an edit of it needs it."""

    id: int
    ticket_id: int
    reference: str
    sender: str
    direction: Direction
    text: str  # what it reads now: the body of its latest edit, or its own


# The outbox's channels (its entries' ``channel``): each has its own sender, and is held on its
# own while it is unavailable.
CHANNELS: tuple[str, ...] = ("email", "slack")

# How the reason a note waits for its unavailable channel starts (its ``last_error``): `tickets
# show` prints it as the note's state rather than as an error of its own.
WAITING = "waiting: "


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxEntry:
    ticket_id: int | None
    kind: str  # "acknowledgement", "irt-alert", "notice", ...
    payload: Outgoing
    created_at: datetime
    # An IRT alert's or summary's organisation (intake.paging.Organisation.key): whose share of
    # the alerts it counts against. None on every other note.
    organisation_key: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PagingCounts:
    """What the IRT lead's address was sent in the last hour (intake.paging decides on it)."""

    alerts: int  # IRT alerts, every organisation's
    alerts_for_organisation: int  # of them, the organisation's at hand
    summary_sent: bool  # the global ceiling's summary
    organisation_summary_sent: bool  # the summary naming the organisation at hand


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxItem:
    """A claimed outbox entry, ready to send.

    The note is built from what was stored only when ``payload`` is read, at send time: not
    inside the claim's transaction, where decoding a batch of notes held the write lock that
    intake's listeners wait for, and where one note that can no longer be read (stored by an
    older version, say) failed every claim and stopped the whole outbox.
    """

    id: int
    ticket_id: int | None
    kind: str
    attempts: int
    load: Callable[[], Outgoing]  # builds the note from the stored value; may raise
    channel: str = "email"  # "email" or "slack": which sender delivers it

    @property
    def payload(self) -> Outgoing:
        return self.load()


@dataclass(frozen=True, slots=True, kw_only=True)
class SendResult:
    id: int
    ok: bool
    permanent: bool = False
    error: str | None = None
    retry_at: datetime | None = None
    # False: not tried, because its channel was found unavailable before its turn. Its attempts
    # stay as they were and it is due again at once (the dispatcher claims it when the channel
    # is back); ``error`` says why it waits.
    attempted: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class SlaCandidate:
    """An open, unanswered ticket whose first-response target is near or past."""

    ticket: TicketFacts
    warned_at: datetime | None
    missed_at: datetime | None


class LanguageDetector(Protocol):
    def detect(self, text: str) -> str | None:
        """ISO 639-1 code of the text's language among those we have templates for, or None."""
        ...


class UnitOfWork(Protocol):
    """Storage operations available inside one transaction. All synchronous, all in the
    same transaction: if the unit raises, none of its writes remain."""

    def find_duplicate(self, recipient: str, dedup_key: str) -> Duplicate | None: ...
    def stored_message(self, recipient: str, dedup_key: str) -> StoredMessage | None:
        """The message stored for this delivery (not an edit of one), with its latest text."""
        ...

    def ticket_by_reference(self, reference: str) -> TicketFacts | None: ...
    def tickets_by_message_ids(self, message_ids: Sequence[str]) -> list[KnownId]: ...
    def is_known_participant(self, address: str) -> bool: ...
    def create_ticket(self, ticket: NewTicket) -> TicketFacts: ...
    def update_ticket(self, ticket_id: int, change: TicketChange) -> None: ...
    def add_participant(self, ticket_id: int, address: str) -> None: ...
    def add_message(self, message: NewMessage) -> int: ...
    def index_message_id(self, ticket_id: int, message_id: str, *, ours: bool) -> None: ...
    def enqueue(self, entry: OutboxEntry) -> int: ...
    def mark_undeliverable(self, message_ids: Sequence[str], reason: str) -> list[int]: ...
    def count_outbox_since(self, *, kind: str, recipient: str | None, since: datetime) -> int: ...
    def paging_counts(self, *, recipient: str, organisation_key: str, since: datetime) -> PagingCounts:
        """The IRT alerts and summaries (intake.paging.KINDS) sent to ``recipient`` since
        ``since``, in all and for ``organisation_key``, in one read."""
        ...

    def sender_counts(self, *, sender: str, tickets_since: datetime, acks_since: datetime) -> tuple[int, int]:
        """(tickets ``sender`` opened since ``tickets_since``, acknowledgements sent to them since
        ``acks_since``): the two flood limits of a new email, in one read."""
        ...

    def latest_ticket_of(self, requester: str) -> TicketFacts | None: ...
    def sla_candidates(self, *, due_before: datetime, limit: int) -> list[SlaCandidate]: ...
    # Outbox dispatch
    def claim_outbox(
        self, *, now: datetime, owner: str, lease_until: datetime, limit: int, channels: Sequence[str] = CHANNELS
    ) -> list[OutboxItem]:
        """Lease up to ``limit`` due entries of each of ``channels``."""
        ...

    def lease_owners(self, *, now: datetime) -> list[str]:
        """The owners of pending entries whose lease still runs at ``now``."""
        ...

    def release_leases(self, owners: Sequence[str], *, now: datetime) -> int:
        """End the running leases of ``owners`` (dispatchers known to be gone), so that their
        entries are claimed again at once. Returns how many."""
        ...

    def finish_outbox(self, results: Sequence[SendResult], *, now: datetime) -> None: ...
    def explain_waiting(self, *, channel: str, why: str, due_since: datetime | None, now: datetime) -> int:
        """Record ``why`` (it starts with :data:`WAITING`) on the channel's pending entries that
        have no lease running at ``now`` and either no error yet or, due by ``now``, the error of
        their own last attempt (a note in flight when the channel went down); when ``due_since``
        is given, only those due at or after it (the ones that came since the last call).
        Returns how many."""
        ...


class Store(Protocol):
    async def transact(self, work: Callable[[UnitOfWork], T]) -> T:
        """Run ``work`` in one transaction and return its result once it is committed.

        Raises :class:`intake.errors.StorageUnavailableError` when the commit failed; then
        nothing of ``work`` was stored. ``work`` may be run more than once (after a conflict
        with a concurrent writer), so it must not have side effects outside the unit.
        """
        ...


class EmailSender(Protocol):
    async def send(self, email: OutgoingEmail) -> None:
        """Deliver or raise TransientSendError / PermanentSendError (ChannelUnavailableError
        when the relay itself cannot take mail)."""
        ...

    async def check(self) -> None:
        """Return when the relay would take mail now; raise ChannelUnavailableError if not."""
        ...


class ChatSender(Protocol):
    async def send(self, message: OutgoingChat) -> None: ...

    async def check(self) -> None:
        """Return when the chat service would take a post now; raise ChannelUnavailableError if not."""
        ...


class Clock(Protocol):
    def now(self) -> datetime: ...


LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.n += 1
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.total, self.n)


@dataclass(slots=True)
class Recorder:
    """Counters and latency histograms the core moves; adapters expose them (metrics).

    Keys are tuples: the metric name then its label values, e.g. ("messages", "email", "new").
    Plain data, no I/O.
    """

    counts: dict[tuple[str, ...], int] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def inc(self, *key: str, by: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + by

    def get(self, *key: str) -> int:
        return self.counts.get(key, 0)

    def observe(self, name: str, seconds: float) -> None:
        hist = self.histograms.get(name)
        if hist is None:
            hist = self.histograms[name] = Histogram()
        hist.observe(seconds)

    def copy(self) -> Recorder:
        return Recorder(dict(self.counts), {name: hist.copy() for name, hist in self.histograms.items()})

    def since(self, earlier: Recorder) -> Recorder:
        """What moved since ``earlier`` (a copy of this recorder taken before)."""
        delta = Recorder({k: v - earlier.counts.get(k, 0) for k, v in self.counts.items()})
        delta.counts = {k: v for k, v in delta.counts.items() if v}
        for name, hist in self.histograms.items():
            before = earlier.histograms.get(name)
            if before is None:
                delta.histograms[name] = hist.copy()
            elif hist.n != before.n:
                counts = [a - b for a, b in zip(hist.counts, before.counts, strict=True)]
                delta.histograms[name] = Histogram(hist.buckets, counts, hist.total - before.total, hist.n - before.n)
        return delta

    def add(self, other: Recorder) -> None:
        """Add what another recorder counted (another process's, see ``since``)."""
        for key, value in other.counts.items():
            self.inc(*key, by=value)
        for name, hist in other.histograms.items():
            mine = self.histograms.get(name)
            if mine is None:
                mine = self.histograms[name] = Histogram(hist.buckets)
            mine.counts = [a + b for a, b in zip(mine.counts, hist.counts, strict=True)]
            mine.total += hist.total
            mine.n += hist.n


def payload_recipient(payload: Any) -> str:
    if isinstance(payload, OutgoingEmail):
        return payload.to[0] if payload.to else ""
    if isinstance(payload, OutgoingChat):
        return payload.channel
    return ""
