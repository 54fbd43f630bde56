"""The intake service: one inbound message in, one committed unit of work out.

Every channel adapter calls :meth:`IntakeService.receive` with an :class:`InboundMessage`.
The pure work (keyword rules, automation checks, references, language, the report checklist)
happens first, on the caller's loop, into an :class:`Assessment`. Then one unit of work runs
inside one transaction of the store: deduplicate, place the message (``intake.routing``),
open or update the ticket, store the message, queue the acknowledgement, the triage notice,
the IRT alert and escalation notes in the outbox. The caller answers its peer (SMTP 250,
HTTP 200) only after :meth:`receive` returned, that is after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from intake import paging
from intake.acknowledgement import (
    Outbound,
    TemplateBook,
    render_acknowledgement,
    render_chat_acknowledgement,
    render_escalation_contact,
    render_escalation_reply,
    render_irt_alert,
    render_irt_chat_alert,
    render_security_raised,
    render_triage,
)
from intake.headers import answerable
from intake.hygiene import (
    AuthVerdict,
    Automation,
    AutomationKind,
    authentication,
    bounced_message_ids,
    delivery_failed,
    detect_automation,
)
from intake.model import Direction, InboundEdit, InboundMessage, OutgoingChat, Route, Severity, Verdict
from intake.policy import Plan, Policy, missing_details
from intake.ports import (
    Clock,
    LanguageDetector,
    NewMessage,
    NewTicket,
    OutboxEntry,
    Recorder,
    Store,
    StoredMessage,
    TicketChange,
    TicketFacts,
    UnitOfWork,
)
from intake.reference import Found, References
from intake.routing import Placement, may_be_told, place
from intake.rules import PhraseMatcher, RuleSet

log = logging.getLogger("intake.service")

_HOUR = timedelta(hours=1)  # the IRT alert limits' window

# Both policies let a customer ask for escalation at any time; configuration adds phrases.
DEFAULT_ESCALATION_PHRASES: tuple[str, ...] = (
    "please escalate",
    "escalate this",
    "escalate the ticket",
    "escalate this ticket",
    "escalate my ticket",
    "escalate the issue",
    "escalate to your manager",
    "i want to escalate",
    "we want to escalate",
    "request an escalation",
    "requesting escalation",
    "escalation please",
    "speak to a manager",
    "speak with a manager",
    "escalar",
    "escalen",
    "escalarlo",
    "escalar el ticket",
    "solicito escalar",
    "hablar con un supervisor",
    "hablar con el gerente",
)


# An edit is answered by nothing: the customer was answered when the message came in.
NO_EDIT_ACK = "an edit gets no acknowledgement"


def _period(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60} hour(s)" if minutes % 60 == 0 else f"{minutes} minutes"


def language_sample(message: InboundMessage) -> str:
    """The text whose language is the message's: its subject and new text, 300 characters.

    A few hundred characters decide the language as well as the whole text, at a fraction of
    the cost (lingua is linear in the text: 4 KB took 1.4 ms).
    """
    return f"{message.subject}\n{message.new_text or message.body}".strip()[:300]


def thread_id(thread_key: str) -> str:
    """How a chat thread is indexed beside Message-IDs: one lookup finds either."""
    return f"thread:{thread_key}"


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """How much automatic mail one sender can cause, and when senders must be authenticated."""

    acks_per_sender: int = 5
    ack_period: timedelta = timedelta(hours=1)
    tickets_per_sender: int = 10
    ticket_period: timedelta = timedelta(hours=1)
    # Pages to the IRT lead in any hour: at most this many in all, and at most
    # ``irt_alerts_per_organisation`` for one organisation (intake.paging says why and whose).
    irt_alerts_per_hour: int = 20
    irt_alerts_per_organisation: int = 5
    trusted_authserv_ids: tuple[str, ...] = ()
    # No acknowledgement to a sender that neither authenticated (SPF / aligned DKIM per a trusted
    # Authentication-Results) nor is a known customer: forged senders must not get backscatter.
    require_authentication: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Team:
    """Where the support team wants to hear about things."""

    triage_email: str | None = None
    triage_chat: str | None = None  # a Slack channel id
    staff_addresses: frozenset[str] = frozenset()  # their replies by email are staff replies
    staff_chat_users: frozenset[str] = frozenset()  # their chat user ids (Slack)
    home_team: str | None = None  # our own chat workspace: in a shared channel its members are staff
    escalation_contacts: tuple[str, ...] = ()  # one per step of the policy's chain ("" = none)


@dataclass(frozen=True, slots=True, kw_only=True)
class Assessment:
    """Everything decided about a message before the transaction (pure, on the caller's loop)."""

    verdict: Verdict
    automation: Automation | None
    bounced: tuple[str, ...]  # our messages a bounce reports on
    undelivered: bool  # ...and says will not arrive (not a delay warning): marked undeliverable
    cited: tuple[Found, ...]
    received_at: datetime
    missing: tuple[str, ...]
    auth: AuthVerdict | None
    language: str
    organisation: str | None
    plan: Plan
    escalation: str | None  # the phrase that asked for escalation


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What happened to one message; adapters turn it into their protocol's answer."""

    route: Route
    ack_note: str  # "queued", or why no acknowledgement was sent
    note: str  # why the message went where it went
    ticket_id: int = 0  # 0 and "": the message is on no ticket
    reference: str = ""
    severity: Severity = Severity.S4  # the ticket's, after this message (a duplicate does not read it)
    security: bool = False
    created: bool = False  # this message opened the ticket
    acknowledged: bool = False
    alerted: bool = False  # this message queued the IRT alert
    escalated_to: str | None = None
    disclosed: bool = True  # the sender may be told ``reference`` (see routing.may_be_told)

    @property
    def known_severity(self) -> int | None:
        """The ticket's severity as a number, for a log line; None for a duplicate delivery,
        whose unit stops at the duplicate and never reads the ticket, and for a message on no
        ticket (a staff message outside any)."""
        return None if self.route is Route.DUPLICATE or not self.ticket_id else int(self.severity)


@dataclass(slots=True, kw_only=True)
class IntakeService:
    store: Store
    rules: RuleSet
    policy: Policy
    templates: TemplateBook
    outbound: Outbound
    references: References
    irt_email: str | None = None
    irt_chat_user: str | None = None  # the IRT lead's Slack user id, for direct messages
    limits: Limits = field(default_factory=Limits)
    team: Team = field(default_factory=Team)
    detector: LanguageDetector | None = None
    escalation_phrases: Sequence[str] = DEFAULT_ESCALATION_PHRASES
    clock: Clock = field(default_factory=SystemClock)
    recorder: Recorder = field(default_factory=Recorder)
    on_commit: Callable[[], None] | None = None  # wakes the outbox dispatcher
    _escalation: PhraseMatcher | None = None
    _internal_addresses: frozenset[str] | None = None
    _own_addresses: frozenset[str] | None = None

    @property
    def _own(self) -> frozenset[str]:
        """Our own support addresses and the one we send from (mail from them is a loop)."""
        if self._own_addresses is None:
            self._own_addresses = frozenset({*self.outbound.support_addresses, self.outbound.from_address})
        return self._own_addresses

    @property
    def _internal(self) -> frozenset[str]:
        """The addresses intake writes to about tickets (the IRT lead, triage, escalation
        contacts): our own people, who may add to any ticket (forwarding an alert by hand, say)."""
        if self._internal_addresses is None:
            chain = (step.contact for step in self.policy.chain)
            found = (self.irt_email, self.team.triage_email, *self.team.escalation_contacts, *chain)
            self._internal_addresses = frozenset(a.lower() for a in found if a)
        return self._internal_addresses

    def classify(self, message: InboundMessage) -> Verdict:
        return self.rules.classify(
            subject=message.subject,
            body=message.new_text,
            quoted=message.quoted,
            attachments=[a.filename for a in message.attachments if a.filename],
        )

    def is_staff(self, message: InboundMessage) -> bool:
        """Written by the support team: from a staff address; in chat, by a staff user, or by a
        member of our own workspace in a channel shared with the customer (Slack Connect)."""
        team = self.team
        if message.staff or (message.sender and message.sender in team.staff_addresses):
            return True
        if message.chat_channel is None:
            return False
        return message.sender in team.staff_chat_users or bool(
            team.home_team and message.shared_channel and message.author_team == team.home_team
        )

    def language_of(self, message: InboundMessage) -> str:
        default = self.templates.default
        if self.detector is None:
            return default
        text = language_sample(message)
        lang = self.detector.detect(text) if text else None
        return lang if lang in self.templates.languages else default

    def escalation_requested(self, message: InboundMessage) -> str | None:
        if self._escalation is None:
            self._escalation = PhraseMatcher(list(self.escalation_phrases))
        found = self._escalation.find(message.new_text[:20_000])
        return self.escalation_phrases[found[0].index] if found else None

    def assess(self, message: InboundMessage) -> Assessment:
        started = time.perf_counter()
        verdict = self.classify(message)
        self.recorder.observe("classification", time.perf_counter() - started)
        automation = detect_automation(message, loop_token=self.outbound.loop_token)
        bounced = bounced_message_ids(message) if automation and automation.kind is AutomationKind.BOUNCE else ()
        undelivered = bool(bounced) and delivery_failed(message)
        cited = self.references.find(message.subject)
        if message.chat_thread_ts is None and not cited and message.channel != "email":
            cited = self.references.find(message.body[:2000])
        organisation = message.organisation or self.policy.organisation_of(message.sender)
        # Checked wherever our MTA's verdict is trusted, whether acknowledgements need it or
        # not: whose share of the IRT alerts a message uses depends on it (intake.paging). Mail
        # without an Authentication-Results header costs a dictionary lookup, a typical header
        # some 40 us to read (of the 2 ms or more a message takes); nothing when unset.
        lim = self.limits
        auth = (
            authentication(message, trusted_authserv_ids=lim.trusted_authserv_ids)
            if (lim.trusted_authserv_ids or lim.require_authentication) and message.channel == "email"
            else None
        )
        return Assessment(
            verdict=verdict,
            automation=automation,
            bounced=tuple(bounced),
            undelivered=undelivered,
            cited=tuple(cited),
            received_at=self.clock.now(),
            missing=missing_details(message, organisation=organisation),
            auth=auth,
            language=self.language_of(message),
            organisation=organisation,
            plan=self.policy.plan_of(organisation),
            escalation=self.escalation_requested(message) if automation is None else None,
        )

    async def receive(self, message: InboundMessage, assessment: Assessment | None = None) -> Receipt:
        """Store one message. ``assessment`` when :meth:`assess` already ran (e.g. in a worker
        process next to the parser); otherwise it runs here."""
        if not message.staff and self.is_staff(message):
            message = replace(message, staff=True)
        a = assessment or self.assess(message)  # pure work stays out of the transaction
        stored = time.perf_counter()
        try:
            receipt = await self.store.transact(lambda uow: self._unit(uow, message, a))
        except Exception:
            self.recorder.inc("messages", str(message.channel), "failed")
            raise
        finally:
            self.recorder.observe("storage", time.perf_counter() - stored)
        self._committed(message, receipt)
        return receipt

    def _committed(self, message: InboundMessage, receipt: Receipt) -> None:
        """Count what became of a message whose unit committed; wake the outbox."""
        self.recorder.inc("messages", str(message.channel), receipt.route.value)
        if receipt.created:
            self.recorder.inc("tickets_created", str(message.channel))
        if receipt.alerted:
            self.recorder.inc("security_incidents", str(message.channel))
        if receipt.acknowledged:
            self.recorder.inc("acknowledgements_queued")
        elif receipt.route is not Route.DUPLICATE:
            self.recorder.inc("acknowledgements_suppressed", receipt.ack_note.split(":")[0])
        if self.on_commit is not None:
            self.on_commit()

    async def receive_edit(self, edit: InboundEdit) -> Receipt:
        """Take in its author's edit of a message (Slack's ``message_changed``).

        An edit that changes no text (a link preview, a bot's update, a thread's reply count)
        changes nothing, without a transaction. Otherwise, in one unit of work: an edit already
        stored (a redelivery: the same ``edit_id``) changes nothing either; an edit of a stored
        message is stored beside it (the message's row kept as it was: nothing said is lost)
        and, if the message was the customer's, assessed as a follow-up is (severity raised,
        never lowered; a security incident pages the IRT lead once per ticket and the customer
        is told in the thread), without an acknowledgement.

        An edit of a message intake never stored (posted before intake was in the channel, or
        while its delivery kept failing) brings that message in, on :meth:`receive`'s path (a
        ticket or a follow-up) under the message's own key, so that its own event coming late
        is a duplicate: its words are addressed to support and may report an incident. When the
        platform says how it read before the edit, it is taken in as it read so, and the edit
        stored beside it and assessed as above: what it said is kept, whatever the edit says
        now. A new ticket's acknowledgement then waits for the edit, so that it gives the ticket
        as it stands after both and asks only for what the message, as it now reads beside it,
        lacks (the edit's own notice that the ticket became a security incident is in it).
        Otherwise it is taken in as it now reads, and the edit's key recorded on its ticket so
        that the edit's retry is a duplicate after a later edit too.
        """
        message = edit.message
        channel = str(message.channel)
        if edit.text_unchanged:
            self.recorder.inc("message_edits", channel, "unchanged")
            return Receipt(route=Route.IGNORED, ack_note=NO_EDIT_ACK, note="an edit that changed no text")
        if not message.staff and self.is_staff(message):
            message = replace(message, staff=True)
            previous = replace(edit.previous, staff=True) if edit.previous is not None else None
            edit = replace(edit, message=message, previous=previous)
        a = self.assess(message)
        # How it read before: what tells the edit's new evidence, or the message itself, assessed
        # as any message is, for when intake never had it (known only inside the unit).
        first = replace(self.assess(edit.previous), received_at=a.received_at) if edit.previous is not None else None
        stored = time.perf_counter()
        try:
            outcome, receipt = await self.store.transact(lambda uow: self._edit_unit(uow, edit, a, first))
        except Exception:
            self.recorder.inc("message_edits", channel, "failed")
            raise
        finally:
            self.recorder.observe("storage", time.perf_counter() - stored)
        self.recorder.inc("message_edits", channel, outcome)
        if outcome == "taken_in":  # as a message: counted as one
            self._committed(message, receipt)
            return receipt
        if receipt.alerted:
            self.recorder.inc("security_incidents", channel)
        if self.on_commit is not None:
            self.on_commit()
        return receipt

    # -- the unit of work: runs inside the store's transaction ----------------------------

    def _unit(
        self, uow: UnitOfWork, message: InboundMessage, a: Assessment, *, note: str = "", acknowledge: bool = True
    ) -> Receipt:
        """``note``: added to why the message went where it went (an edit taken in as a message).
        ``acknowledge=False``: a new ticket's acknowledgement is the caller's to queue (the
        receipt's ``acknowledged`` says whether it is due)."""
        now = a.received_at
        dup = uow.find_duplicate(message.recipient, message.dedup_key)
        if dup is not None:
            # A redelivery comes from the sender of the copy stored: it hears the reference at no
            # extra cost. Anyone else re-sending that Message-ID only if entitled to the ticket.
            told = bool(message.sender) and message.sender == dup.sender
            if not told:
                ticket = uow.ticket_by_reference(dup.reference)
                told = ticket is not None and may_be_told(message, ticket, self.policy)
            return Receipt(
                route=Route.DUPLICATE,
                ticket_id=dup.ticket_id,
                reference=dup.reference,
                ack_note="duplicate delivery",
                note="duplicate of a message already stored",
                disclosed=told,
            )
        placement = self._place(uow, message, a)
        if note:
            placement = replace(placement, note=placement.note + note)
        # Staff answering a ticket are recorded as staff replies; a staff member writing to
        # support by email about something new is a customer like any other.
        if message.staff and (placement.ticket is not None or message.chat_channel):
            return self._staff_reply(uow, message, placement, now)
        acks_sent: int | None = None  # to this sender within the acknowledgement limit's period
        if placement.ticket is None and message.sender and not message.chat_channel:
            lim = self.limits
            opened, acks_sent = uow.sender_counts(
                sender=message.sender, tickets_since=now - lim.ticket_period, acks_since=now - lim.ack_period
            )
            placement = self._flood_placement(uow, message, placement, opened)

        last_before_limit = False
        escalated_to: str | None = None
        if placement.ticket is None:
            ticket, ack_note, last_before_limit = self._open_ticket(uow, message, a, placement, acks_sent)
            created = True
        else:
            ticket = self._update_ticket(uow, placement.ticket, message, a.verdict, now)
            ack_note = "follow-up on an existing ticket"
            created = False
        if self._takes_part(message, a, placement):
            uow.add_participant(ticket.id, message.sender)
        if message.thread_key:
            uow.index_message_id(ticket.id, thread_id(message.thread_key), ours=False)
        uow.add_message(
            NewMessage(
                ticket_id=ticket.id,
                message=message,
                direction=Direction.INBOUND,
                route=placement.route,
                route_note=placement.note,
                received_at=now,
                hits=a.verdict.hits,
                automation=a.automation.reason if a.automation else None,
            )
        )
        if message.message_id:
            uow.index_message_id(ticket.id, message.message_id, ours=False)
        for refusal in placement.refusals:
            uow.update_ticket(
                refusal.ticket.id,
                TicketChange(add_notes=(f"{refusal.why}; it went to {ticket.reference} instead",), updated_at=now),
            )
        if a.undelivered and uow.mark_undeliverable(a.bounced, a.automation.reason if a.automation else "bounce"):
            uow.update_ticket(
                ticket.id,
                TicketChange(add_notes=("a bounce reports our outgoing message(s) undeliverable",), updated_at=now),
            )

        acknowledged = created and ack_note == "queued"
        if acknowledged and acknowledge:
            self._acknowledge(uow, message, a, ticket, last_before_limit)
        if created and a.automation is None:
            self._announce(uow, message, ticket, a.plan, now)
        if not created and a.escalation:
            escalated_to = self._escalate(uow, message, a, ticket, now, from_customer=not placement.staff_note)
        if a.verdict.security and not ticket.alerted:
            customer_told, why_not = self._customer_told(uow, message, a, placement, ticket, ack_note)
            alerted = self._alert(uow, message, a, ticket, now, told=customer_told, why_not=why_not)
        else:
            alerted = False
        return Receipt(
            route=placement.route,
            ticket_id=ticket.id,
            reference=ticket.reference,
            created=created,
            severity=ticket.severity,
            security=ticket.security,
            acknowledged=acknowledged,
            ack_note=ack_note,
            alerted=alerted,
            note=placement.note,
            escalated_to=escalated_to,
        )

    def _edit_unit(
        self, uow: UnitOfWork, edit: InboundEdit, a: Assessment, first: Assessment | None
    ) -> tuple[str, Receipt]:
        """The unit of :meth:`receive_edit`; (what became of the edit, the receipt). ``first``:
        the assessment of the message as it read before the edit, when the platform said."""
        message = edit.message
        dup = uow.find_duplicate(message.recipient, edit.dedup_key)
        if dup is not None:
            return "duplicate", self._edit_duplicate(message, dup.ticket_id, dup.reference, dup.sender)
        stored = uow.stored_message(message.recipient, message.dedup_key)
        if stored is None:
            return self._take_in(uow, edit, a, first)
        # What the message already reads: an unfurl Slack sent without how it read before, the
        # retry of an edit that brought the message in as it read after it (``_take_in``).
        if stored.text == message.body:
            return "unchanged", Receipt(
                route=Route.IGNORED,
                ticket_id=stored.ticket_id,
                reference=stored.reference,
                ack_note=NO_EDIT_ACK,
                note="an edit that leaves the text as stored",
            )
        # The edit that brought the message in as it read after it, retried after a later edit.
        taken_by = uow.tickets_by_message_ids([edit.dedup_key])
        if taken_by:
            ticket = taken_by[0].ticket
            return "duplicate", self._edit_duplicate(message, ticket.id, ticket.reference, stored.sender)
        receipt, _ = self._record_edit(uow, edit, a, first.verdict if first else None, stored)
        return "recorded", receipt

    def _edit_duplicate(self, message: InboundMessage, ticket_id: int, reference: str, sender: str) -> Receipt:
        return Receipt(
            route=Route.DUPLICATE,
            ticket_id=ticket_id,
            reference=reference,
            ack_note="duplicate delivery",
            note="duplicate of an edit already stored",
            disclosed=bool(message.sender) and message.sender == sender,
        )

    def _take_in(
        self, uow: UnitOfWork, edit: InboundEdit, a: Assessment, first: Assessment | None
    ) -> tuple[str, Receipt]:
        """An edit of a message intake never stored brings the message in (see
        :meth:`receive_edit`)."""
        message = edit.message
        if edit.previous is None or first is None:
            note = "; intake first saw it as an edit: this is how it read after it (how it read before is unknown)"
            receipt = self._unit(uow, message, a, note=note)
            if receipt.ticket_id and receipt.route is not Route.DUPLICATE:
                # The message's row has the message's key (its own event, late, is a duplicate);
                # the edit's is noted on its ticket, where its retry finds it (``_edit_unit``).
                uow.index_message_id(receipt.ticket_id, edit.dedup_key, ours=False)
            return "taken_in", receipt
        note = "; intake first saw it as an edit: this is how it read before it, the edit is stored beside it"
        taken = self._unit(uow, edit.previous, first, note=note, acknowledge=False)
        stored = uow.stored_message(message.recipient, message.dedup_key)
        if stored is None:  # not stored (staff's words outside any ticket): nor is its edit
            return "taken_in", taken
        if taken.route is Route.DUPLICATE:  # stored meanwhile by another instance: an edit of it
            receipt, _ = self._record_edit(uow, edit, a, first.verdict, stored)
            return "recorded", receipt
        receipt, ticket = self._record_edit(uow, edit, a, first.verdict, stored, acknowledging=taken.acknowledged)
        if taken.acknowledged:
            # Under the message as it now reads, posted after both: the ticket as it now stands,
            # and the details the message, as it now reads, lacks. Edits come from chat, where
            # no flood limit applies (hence no "last before the limit").
            self._acknowledge(uow, message, a, ticket, last_before_limit=False)
        return "taken_in", replace(
            taken, severity=receipt.severity, security=receipt.security, alerted=taken.alerted or receipt.alerted
        )

    def _record_edit(
        self,
        uow: UnitOfWork,
        edit: InboundEdit,
        a: Assessment,
        before: Verdict | None,
        stored: StoredMessage,
        *,
        acknowledging: bool = False,
    ) -> tuple[Receipt, TicketFacts]:
        """Store the edit of ``stored`` beside it and, if the message was the customer's, assess
        it as a follow-up; the receipt and the ticket as it then stands. ``before``: the verdict
        on the text before the edit (its hits are no new evidence). ``acknowledging``: the
        ticket's acknowledgement is queued after this and tells the customer what it became."""
        message = edit.message
        now = a.received_at
        ticket = uow.ticket_by_reference(stored.reference)
        assert ticket is not None, "a stored message's ticket"
        inbound = stored.direction is Direction.INBOUND
        note = f"edit of message {stored.id}"
        if message.sender != stored.sender:
            note += f" (of {stored.sender or 'no one'}, by {message.sender or 'no one'})"
        uow.add_message(
            NewMessage(
                ticket_id=ticket.id,
                message=replace(message, date=edit.edited_at or message.date),
                direction=stored.direction,
                route=Route.EDIT,
                route_note=note,
                received_at=now,
                hits=a.verdict.hits if inbound else (),
                edit_of=stored.id,
                dedup_key=edit.dedup_key,
            )
        )
        receipt = Receipt(
            route=Route.EDIT,
            ticket_id=ticket.id,
            reference=ticket.reference,
            severity=ticket.severity,
            security=ticket.security,
            ack_note=NO_EDIT_ACK,
            note=note,
        )
        if not inbound:  # our own people's words: recorded, never assessed
            uow.update_ticket(ticket.id, TicketChange(updated_at=now))
            return receipt, ticket
        # As a follow-up: the rules' verdict on the whole text as it now reads raises the ticket;
        # its evidence gains only the hits the text before did not have already.
        seen = {(h.rule, h.phrase, h.field, h.negated) for h in before.hits} if before is not None else set()
        fresh = tuple(h for h in a.verdict.hits if (h.rule, h.phrase, h.field, h.negated) not in seen)
        raised = self._update_ticket(uow, ticket, message, replace(a.verdict, hits=fresh), now, by="an edit")
        alerted = False
        if a.verdict.security and not raised.alerted:
            told: bool | None
            if acknowledging:  # the acknowledgement of a security incident says the lead will call
                told, why_not = True, ""
            else:
                placement = Placement(Route.EDIT, ticket, note)
                told, why_not = self._customer_told(uow, message, a, placement, raised, NO_EDIT_ACK)
            alerted = self._alert(uow, message, a, raised, now, told=told, why_not=why_not)
        receipt = replace(receipt, severity=raised.severity, security=raised.security, alerted=alerted)
        return receipt, raised

    def _place(self, uow: UnitOfWork, message: InboundMessage, a: Assessment) -> Placement:
        by_reference: dict[str, TicketFacts] = {}
        for found in a.cited:
            if found.reference and found.reference not in by_reference:
                ticket = uow.ticket_by_reference(found.reference)
                if ticket is not None:
                    by_reference[found.reference] = ticket
        # Our own mail come back (forwarded by a customer's mailbox, say) keeps our Message-ID,
        # 64 random bits that only its ticket's people have seen: it goes back to that ticket
        # rather than opening one from our own address (the loop marker alone is no proof: every
        # acknowledgement shows it).
        own = (message.message_id,) if a.automation and a.automation.kind is AutomationKind.OWN_LOOP else ()
        ids = tuple(i for i in dict.fromkeys((*own, *message.related_ids, *a.bounced)) if i)
        known = uow.tickets_by_message_ids(ids) if ids else []
        by_thread = None
        if message.thread_key:
            in_thread = uow.tickets_by_message_ids([thread_id(message.thread_key)])
            by_thread = in_thread[0].ticket if in_thread else None
        return place(
            message,
            policy=self.policy,
            cited=a.cited,
            by_reference=by_reference,
            known_ids=known,
            by_thread=by_thread,
            internal=self._internal,
        )

    def _takes_part(self, message: InboundMessage, a: Assessment, placement: Placement) -> bool:
        """Whether the sender becomes a participant of the ticket (entitled to it from then on).

        Not our own people answering, who are no customers; not a machine: a bounce comes from
        the MTA's one daemon address (MAILER-DAEMON@ our own Postfix, for every bounce of every
        acknowledgement), our own acknowledgement come back from our own address. Either made
        participant let anyone writing under that address join the ticket by its reference.
        """
        if not message.sender or placement.staff_note or a.automation is not None:
            return False
        return message.sender not in self._own

    def _why_not_acknowledge(self, message: InboundMessage, automation: Automation | None) -> str | None:
        if message.chat_channel:
            return None  # a chat reply goes to the thread it came from
        if automation is not None:
            return f"automated mail: {automation.reason}"
        if not message.sender or "@" not in message.sender:
            return "no sender address to answer"
        if not answerable(message.sender):
            return "sender address cannot be answered (not a plain ASCII address)"
        if message.sender in self._own:
            return "sent from our own support address (loop)"
        if message.sender in self._internal:
            return "sent by one of our own people (the IRT lead, triage or an escalation contact)"
        return None

    def _staff_reply(self, uow: UnitOfWork, message: InboundMessage, placement: Placement, now: datetime) -> Receipt:
        """The support team's own words: stored on the ticket they answer, never a new ticket."""
        ticket = placement.ticket
        if ticket is None:
            return Receipt(
                route=Route.IGNORED,
                ack_note="staff message outside any ticket",
                note="staff message outside any ticket's thread; not stored",
            )
        uow.add_message(
            NewMessage(
                ticket_id=ticket.id,
                message=message,
                direction=Direction.STAFF,
                route=placement.route,
                route_note=placement.note + "; staff reply",
                received_at=now,
            )
        )
        if message.message_id:
            uow.index_message_id(ticket.id, message.message_id, ours=False)
        # The first staff reply is the first response the policy's clock measures.
        uow.update_ticket(ticket.id, TicketChange(updated_at=now, responded_at=ticket.responded_at or now))
        return Receipt(
            route=placement.route,
            ticket_id=ticket.id,
            reference=ticket.reference,
            severity=ticket.severity,
            security=ticket.security,
            ack_note="staff reply",
            note=placement.note + "; staff reply",
        )

    def _open_ticket(
        self, uow: UnitOfWork, message: InboundMessage, a: Assessment, placement: Placement, acks_sent: int | None
    ) -> tuple[TicketFacts, str, bool]:
        """``acks_sent``: acknowledgements sent to an email's sender within the limit's period
        (None for chat, and for mail without a sender address)."""
        now = a.received_at
        severity = a.verdict.severity or self.policy.default_severity
        if a.verdict.security:
            severity = Severity.S1
        # 35 random bits: a collision is improbable, and the unique constraint turns one into a
        # conflict that makes the store run this unit again with a fresh reference.
        reference = self.references.new()
        why_not = self._why_not_acknowledge(message, a.automation)
        if why_not is None and self.limits.require_authentication and a.auth is not None and not a.auth.authenticated:
            if not (a.organisation or uow.is_known_participant(message.sender)):
                why_not = f"sender not authenticated ({a.auth.reason}) and not a known customer"
        last_before_limit = False
        # acks_sent was counted for every email with a sender address (the only mail that can
        # be acknowledged); chat replies go to the thread, with no flood limit.
        if why_not is None and acks_sent is not None:
            lim, sent = self.limits, acks_sent
            if sent >= lim.acks_per_sender:
                why_not = f"flood limit: {sent} acknowledgements to this sender within {_period(lim.ack_period)}"
            last_before_limit = sent == lim.acks_per_sender - 1
        notes = [*placement.remarks, *(f"{r.why}; opened as a new ticket" for r in placement.refusals)]
        if message.parse_problem:
            notes.append(f"the message could not be parsed fully: {message.parse_problem}")
        if not self.policy.entitled(a.organisation, str(message.channel)):
            notes.append(f"the {a.plan.name} plan does not include {message.channel}; taken in all the same")
        if why_not:
            notes.append(f"no acknowledgement sent: {why_not}")
        targets = self.policy.deadlines(severity, now, a.plan.name)
        ticket = uow.create_ticket(
            NewTicket(
                reference=reference,
                subject=message.subject,
                channel=message.channel,
                requester=message.sender,
                requester_name=message.sender_name,
                organisation=a.organisation,
                severity=severity,
                security=a.verdict.security,
                created_at=now,
                response_due=next(iter(targets.values())),  # the first target is the initial response
                thread_key=message.thread_key,
                ack_status="queued" if why_not is None else f"suppressed: {why_not}",
                notes=tuple(notes),
                evidence=a.verdict.hits,
                plan=a.plan.name,
                language=a.language,
                targets=targets,
            )
        )
        return ticket, why_not or "queued", last_before_limit

    def _acknowledge(
        self, uow: UnitOfWork, message: InboundMessage, a: Assessment, ticket: TicketFacts, last_before_limit: bool
    ) -> None:
        templates = self.templates.get(a.language)
        if message.chat_channel:
            chat = render_chat_acknowledgement(
                templates=templates,
                outbound=self.outbound,
                policy=self.policy,
                message=message,
                ticket=ticket,
                missing=a.missing,
                plan=a.plan,
            )
            uow.enqueue(
                OutboxEntry(ticket_id=ticket.id, kind="acknowledgement", payload=chat, created_at=a.received_at)
            )
            return
        email = render_acknowledgement(
            templates=templates,
            outbound=self.outbound,
            policy=self.policy,
            message=self._without_foreign_tags(message, a.cited, ticket.reference),
            ticket=ticket,
            missing=a.missing,
            support_in_cc_only=message.recipient in message.cc and message.recipient not in message.to,
            limit_period=self.limits.ack_period if last_before_limit else None,
            mistyped=next((found.text for found in a.cited if found.reference is None), None),
            plan=a.plan,
        )
        uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="acknowledgement", payload=email, created_at=a.received_at))
        uow.index_message_id(ticket.id, email.message_id, ours=True)

    def _announce(
        self, uow: UnitOfWork, message: InboundMessage, ticket: TicketFacts, plan: Plan, now: datetime
    ) -> None:
        """Every new ticket is announced to the support team's triage address and channel."""
        team = self.team
        if not (team.triage_email or team.triage_chat):
            return
        templates = self.templates.get(None)
        if team.triage_email:
            subject, text = render_triage(
                templates=templates, policy=self.policy, message=message, ticket=ticket, plan=plan
            )
            email = self.outbound.staff_email(
                to=team.triage_email, subject=subject, body=text, reference=ticket.reference
            )
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="triage", payload=email, created_at=now))
            # A reply to it (a colleague answering the announcement) belongs on this ticket.
            uow.index_message_id(ticket.id, email.message_id, ours=True)
        if team.triage_chat:
            _, text = render_triage(
                templates=templates, policy=self.policy, message=message, ticket=ticket, plan=plan, chat=True
            )
            chat = OutgoingChat(channel=team.triage_chat, text=text)
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="triage", payload=chat, created_at=now))

    def _escalate(
        self,
        uow: UnitOfWork,
        message: InboundMessage,
        a: Assessment,
        ticket: TicketFacts,
        now: datetime,
        *,
        from_customer: bool = True,
    ) -> str | None:
        """One step along the chain per request; repeated requests within the cooldown do not skip.
        ``from_customer``: false for one of our own people answering a note to staff, who is not
        answered and whose request is not called the customer's."""
        chain = self.policy.chain
        current = chain[min(ticket.escalation_step, len(chain) - 1)].name
        if ticket.escalated_at is not None and now - ticket.escalated_at < self.policy.escalation_cooldown:
            uow.update_ticket(
                ticket.id,
                TicketChange(
                    add_notes=(f'escalation asked again ("{a.escalation}"); stays with {current} (cooldown)',),
                    updated_at=now,
                ),
            )
            return None
        if ticket.escalation_step + 1 >= len(chain):
            uow.update_ticket(
                ticket.id,
                TicketChange(add_notes=(f"escalation asked; already at the last step ({current})",), updated_at=now),
            )
            return None
        step_no = ticket.escalation_step + 1
        step = chain[step_no]
        asked = (
            "on the customer's request" if from_customer else "on request of one of our own people, in a note to staff"
        )
        contact = step.contact or (
            self.team.escalation_contacts[step_no] if step_no < len(self.team.escalation_contacts) else ""
        )
        uow.update_ticket(
            ticket.id,
            TicketChange(
                escalation_step=step_no,
                escalated_at=now,
                add_notes=(f'escalated {asked} ("{a.escalation}"): {current} -> {step.name}',),
                updated_at=now,
            ),
        )
        templates = self.templates.get(a.language or ticket.language)
        if contact:
            subject, text = render_escalation_contact(
                templates=self.templates.get(None),
                policy=self.policy,
                message=message,
                ticket=ticket,
                step=step.name,
                previous=current,
                from_customer=from_customer,
            )
            note = self.outbound.staff_email(to=contact, subject=subject, body=text, reference=ticket.reference)
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="escalation", payload=note, created_at=now))
            uow.index_message_id(ticket.id, note.message_id, ours=True)
        if (
            from_customer and self._why_not_acknowledge(message, a.automation) is None
        ):  # where an acknowledgement would go
            reply = render_escalation_reply(
                templates=templates,
                outbound=self.outbound,
                message=message,
                reference=ticket.reference,
                step=step.name,
                contact=contact,
            )
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="escalation-reply", payload=reply, created_at=now))
            if not isinstance(reply, OutgoingChat):
                uow.index_message_id(ticket.id, reply.message_id, ours=True)
        return step.name

    def _customer_told(
        self,
        uow: UnitOfWork,
        message: InboundMessage,
        a: Assessment,
        placement: Placement,
        ticket: TicketFacts,
        ack_note: str,
    ) -> tuple[bool | None, str]:
        """Whether the customer knows that the IRT lead will reach out (None: unknown here), and
        why not, for the IRT alert. A new ticket's acknowledgement tells them; a follow-up that
        raised the ticket gets a notice of its own (once: it goes with the ticket's one alert)."""
        previous = placement.ticket
        if previous is None:  # a new ticket: its acknowledgement said so, if it went
            told = ack_note == "queued"
            return told, "" if told else ack_note
        if previous.security:  # already one (told then, or not): no second notice
            return None, ""
        if placement.staff_note:  # no customer's words: they are told nothing
            return False, "raised by one of our own people, in a note to staff"
        why_not = self._tell_security_raised(uow, message, a, ticket)
        return why_not is None, why_not or ""

    def _tell_security_raised(
        self, uow: UnitOfWork, message: InboundMessage, a: Assessment, ticket: TicketFacts
    ) -> str | None:
        """Queue the notice that a follow-up raised ``ticket`` to a security incident; None if
        it went, else why not (for the IRT alert). Once per ticket: it goes with the first
        alert, and a ticket that is a security incident is never lowered again."""
        why_not = self._why_not_acknowledge(message, a.automation)
        if why_not is not None:
            return why_not
        notice = None
        for templates in (self.templates.get(a.language or ticket.language), self.templates.get(None)):
            notice = render_security_raised(
                templates=templates, outbound=self.outbound, message=message, reference=ticket.reference
            )
            if notice is not None:
                break
        if notice is None:
            return "no security-raised template in the template folder"
        uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="security-notice", payload=notice, created_at=a.received_at))
        if not isinstance(notice, OutgoingChat):
            uow.index_message_id(ticket.id, notice.message_id, ours=True)
        return None

    def _flood_placement(
        self, uow: UnitOfWork, message: InboundMessage, placement: Placement, opened: int
    ) -> Placement:
        """Past the new-ticket limit (``opened`` by the sender within its period), a sender's
        messages join their latest ticket, silently."""
        lim = self.limits
        if opened < lim.tickets_per_sender:
            return placement
        latest = uow.latest_ticket_of(message.sender)
        if latest is None:
            return placement
        note = (
            f"flood limit: {opened} new tickets from {message.sender} within {_period(lim.ticket_period)}; "
            f"added to their latest ticket {latest.reference}"
        )
        return Placement(Route.FLOOD, latest, note, placement.refusals, placement.remarks)

    def _update_ticket(
        self,
        uow: UnitOfWork,
        ticket: TicketFacts,
        message: InboundMessage,
        verdict: Verdict,
        now: datetime,
        *,
        by: str = "a follow-up",
    ) -> TicketFacts:
        severity = ticket.severity
        if verdict.severity is not None and verdict.severity < severity:
            severity = verdict.severity
        if verdict.security:
            severity = Severity.S1
        security = ticket.security or verdict.security
        due = ticket.response_due
        targets = dict(ticket.targets)
        if severity < ticket.severity:  # never lowered; raised targets can only come sooner
            deadlines = self.policy.deadlines(severity, now, ticket.plan)
            due = min(due, next(iter(deadlines.values())))  # the first target is the initial response
            for name, when in deadlines.items():
                targets[name] = min(targets.get(name, when), when)
        change = TicketChange(
            severity=severity if severity != ticket.severity else None,
            security=True if security and not ticket.security else None,
            response_due=due if due != ticket.response_due else None,
            targets=targets if targets != dict(ticket.targets) else None,
            add_evidence=verdict.hits,
            add_notes=(f"raised to {severity.label} by {by}",) if severity < ticket.severity else (),
            updated_at=now,
        )
        uow.update_ticket(ticket.id, change)
        return replace(ticket, severity=severity, security=security, response_due=due, targets=targets)

    def _alert(
        self,
        uow: UnitOfWork,
        message: InboundMessage,
        a: Assessment,
        ticket: TicketFacts,
        now: datetime,
        *,
        told: bool | None = True,
        why_not: str = "",
    ) -> bool:
        if not self.irt_email:
            uow.update_ticket(ticket.id, TicketChange(add_notes=("security incident: no IRT lead address configured",)))
            return False
        if message.sender and message.sender == self.irt_email.lower():
            # The lead reporting it (forwarding a report that reached them directly, say) needs
            # no page about their own mail. The ticket is not marked alerted: anyone can write
            # the lead's address into From, and the customer's own report must still page.
            note = "security incident in mail from the IRT lead's address: not paged"
            uow.update_ticket(ticket.id, TicketChange(add_notes=(note,), updated_at=now))
            return False
        organisation = paging.organisation_of(message, organisation=a.organisation, auth=a.auth, policy=self.policy)
        counts = uow.paging_counts(recipient=self.irt_email, organisation_key=organisation.key, since=now - _HOUR)
        lim = self.limits
        decision = paging.decide(
            counts,
            organisation,
            per_hour=lim.irt_alerts_per_hour,
            per_organisation=lim.irt_alerts_per_organisation,
            reference=ticket.reference,
        )
        if not decision.page:
            uow.update_ticket(ticket.id, TicketChange(add_notes=(decision.note,), updated_at=now))
            if decision.summary is not None:
                summary = self.outbound.staff_email(
                    to=self.irt_email,
                    subject=decision.summary.subject,
                    body=decision.summary.body,
                    reference=ticket.reference,
                )
                uow.enqueue(
                    OutboxEntry(
                        ticket_id=ticket.id,
                        kind=decision.summary.kind,
                        payload=summary,
                        created_at=now,
                        organisation_key=organisation.key,
                    )
                )
            return False
        staff_templates = self.templates.get(None)
        hits = a.verdict.hits
        security_hits = [h for h in hits if "security" in h.tags] or list(hits)
        alert = render_irt_alert(
            templates=staff_templates,
            outbound=self.outbound,
            to=self.irt_email,
            message=message,
            ticket=ticket,
            hits=security_hits,
            received_at=now.isoformat(timespec="seconds"),
            told=told,
            why_not=why_not,
        )
        uow.enqueue(
            OutboxEntry(
                ticket_id=ticket.id, kind=paging.ALERT, payload=alert, created_at=now, organisation_key=organisation.key
            )
        )
        # The IRT lead's answer to the alert threads onto the incident's ticket: the alert's
        # Message-ID (64 random bits) went to the lead alone. And its words are a security
        # incident's: a copy that comes back (the lead's mailbox forwarding to support) must
        # join this ticket, already alerted, not open one that pages again (an alert loop).
        # (The hourly summary names many tickets, so a reply to it is no one ticket's.)
        uow.index_message_id(ticket.id, alert.message_id, ours=True)
        if self.irt_chat_user:
            dm = render_irt_chat_alert(
                templates=staff_templates, user=self.irt_chat_user, message=message, ticket=ticket, hits=security_hits
            )
            dm_entry = OutboxEntry(
                ticket_id=ticket.id, kind=paging.ALERT, payload=dm, created_at=now, organisation_key=organisation.key
            )
            uow.enqueue(dm_entry)
        uow.update_ticket(ticket.id, TicketChange(alerted=True, updated_at=now))
        return True

    def _without_foreign_tags(self, message: InboundMessage, cited: Sequence[Found], own: str) -> InboundMessage:
        """The acknowledgement of a new ticket must not carry another ticket's reference back."""
        subject = message.subject
        for found in cited:
            # A loose one may be a word that passed the check ("Supermodels"): it stays.
            if found.reference != own and not found.loose:
                subject = subject.replace(f"[{found.text}]", "").replace(found.text, "")
        if subject == message.subject:
            return message
        return replace(message, subject=" ".join(subject.split()))
