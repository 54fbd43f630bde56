"""The intake service: one inbound message in, one committed unit of work out.

Every channel adapter calls :meth:`IntakeService.receive` with an :class:`InboundMessage`.
The pure work (keyword rules, automation checks, finding references) happens first, on the
caller's loop; then one unit of work runs inside one transaction of the store: deduplicate,
place the message (``intake.routing``), open or update the ticket, store the message, queue
the acknowledgement and the IRT alert in the outbox. The caller answers its peer (SMTP 250,
HTTP 200) only after :meth:`receive` returned, that is after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from intake.acknowledgement import (
    Outbound,
    Templates,
    new_message_id,
    render_acknowledgement,
    render_chat_acknowledgement,
    render_irt_alert,
    render_irt_chat_alert,
)
from intake.hygiene import (
    AuthVerdict,
    Automation,
    AutomationKind,
    authentication,
    bounced_message_ids,
    detect_automation,
)
from intake.model import Direction, InboundMessage, OutgoingEmail, Route, RuleHit, Severity, Verdict
from intake.policy import Policy, missing_details
from intake.ports import (
    Clock,
    NewMessage,
    NewTicket,
    OutboxEntry,
    Recorder,
    Store,
    TicketChange,
    TicketFacts,
    UnitOfWork,
)
from intake.reference import Found, References
from intake.routing import Placement, place
from intake.rules import RuleSet

log = logging.getLogger("intake.service")


def _period(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60} hour(s)" if minutes % 60 == 0 else f"{minutes} minutes"


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
    irt_alerts_per_hour: int = 20
    trusted_authserv_ids: tuple[str, ...] = ()
    # No acknowledgement to a sender that neither authenticated (SPF / aligned DKIM per a trusted
    # Authentication-Results) nor is a known customer: forged senders must not get backscatter.
    require_authentication: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What happened to one message; adapters turn it into their protocol's answer."""

    route: Route
    ticket_id: int
    reference: str
    created: bool
    severity: Severity
    security: bool
    acknowledged: bool
    ack_note: str  # "queued", or why no acknowledgement was sent
    alerted: bool  # this message queued the IRT alert
    note: str  # why the message went where it went


@dataclass(slots=True, kw_only=True)
class IntakeService:
    store: Store
    rules: RuleSet
    policy: Policy
    templates: Templates
    outbound: Outbound
    references: References
    irt_email: str | None = None
    irt_chat_user: str | None = None  # the IRT lead's Slack user id, for direct messages
    limits: Limits = field(default_factory=Limits)
    clock: Clock = field(default_factory=SystemClock)
    recorder: Recorder = field(default_factory=Recorder)
    on_commit: Callable[[], None] | None = None  # wakes the outbox dispatcher

    def classify(self, message: InboundMessage) -> Verdict:
        return self.rules.classify(
            subject=message.subject,
            body=message.new_text,
            quoted=message.quoted,
            attachments=[a.filename for a in message.attachments if a.filename],
        )

    async def receive(self, message: InboundMessage) -> Receipt:
        started = time.perf_counter()
        verdict = self.classify(message)
        self.recorder.observe("classification", time.perf_counter() - started)
        automation = detect_automation(message, loop_token=self.outbound.loop_token)
        bounced = bounced_message_ids(message) if automation and automation.kind is AutomationKind.BOUNCE else ()
        cited = self.references.find(message.subject)
        if message.thread_key is None and not cited and message.channel != "email":
            cited = self.references.find(message.body[:2000])
        received_at = self.clock.now()
        # Pure work stays out of the transaction: the writer thread only does database work.
        missing = missing_details(
            message, organisation=message.organisation or self.policy.organisation_of(message.sender)
        )

        auth = (
            authentication(message, trusted_authserv_ids=self.limits.trusted_authserv_ids)
            if self.limits.require_authentication and message.channel == "email"
            else None
        )

        def unit(uow: UnitOfWork) -> Receipt:
            return self._unit(uow, message, verdict, automation, bounced, cited, received_at, missing, auth)

        stored = time.perf_counter()
        try:
            receipt = await self.store.transact(unit)
        except Exception:
            self.recorder.inc("messages", str(message.channel), "failed")
            raise
        finally:
            self.recorder.observe("storage", time.perf_counter() - stored)
        self.recorder.inc("messages", str(message.channel), receipt.route.value)
        if receipt.created:
            self.recorder.inc("tickets_created", str(message.channel))
        if receipt.alerted:
            self.recorder.inc("security_incidents", str(message.channel))
        if receipt.acknowledged:
            self.recorder.inc("acknowledgements_queued")
        elif receipt.route is not Route.DUPLICATE:
            self.recorder.inc("acknowledgements_suppressed", receipt.ack_note.split(":")[0])
        if self.on_commit is not None and (receipt.acknowledged or receipt.alerted):
            self.on_commit()
        return receipt

    # -- the unit of work: runs inside the store's transaction ----------------------------

    def _unit(
        self,
        uow: UnitOfWork,
        message: InboundMessage,
        verdict: Verdict,
        automation: Automation | None,
        bounced: Sequence[str],
        cited: Sequence[Found],
        now: datetime,
        missing: Sequence[str],
        auth: AuthVerdict | None = None,
    ) -> Receipt:
        dup = uow.find_duplicate(message.recipient, message.dedup_key)
        if dup is not None:
            return Receipt(
                route=Route.DUPLICATE,
                ticket_id=dup.ticket_id,
                reference=dup.reference,
                created=False,
                severity=Severity.S4,
                security=False,
                acknowledged=False,
                ack_note="duplicate delivery",
                alerted=False,
                note="duplicate of a message already stored",
            )

        by_reference: dict[str, TicketFacts] = {}
        for found in cited:
            if found.reference and found.reference not in by_reference:
                ticket = uow.ticket_by_reference(found.reference)
                if ticket is not None:
                    by_reference[found.reference] = ticket
        ids = tuple(dict.fromkeys((*message.related_ids, *bounced)))
        known = uow.tickets_by_message_ids(ids) if ids else []
        by_thread = None
        if message.thread_key:
            in_thread = uow.tickets_by_message_ids([thread_id(message.thread_key)])
            by_thread = in_thread[0].ticket if in_thread else None
        placement = place(
            message,
            policy=self.policy,
            cited=cited,
            by_reference=by_reference,
            known_ids=known,
            by_thread=by_thread,
        )

        if message.staff:
            return self._staff_reply(uow, message, placement, now)
        if placement.ticket is None and message.sender and not message.chat_channel:
            placement = self._flood_placement(uow, message, placement, now)
        last_before_limit = False
        if placement.ticket is None:
            ticket, ack_note, last_before_limit = self._open_ticket(
                uow, message, verdict, automation, placement, now, auth
            )
            created = True
        else:
            ticket = self._update_ticket(uow, placement.ticket, message, verdict, now)
            ack_note = "follow-up on an existing ticket"
            created = False
        if message.sender:
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
                hits=verdict.hits,
                automation=automation.reason if automation else None,
            )
        )
        if message.message_id:
            uow.index_message_id(ticket.id, message.message_id, ours=False)
        for refusal in placement.refusals:
            uow.update_ticket(
                refusal.ticket.id,
                TicketChange(add_notes=(f"{refusal.why}; it went to {ticket.reference} instead",), updated_at=now),
            )
        if bounced:
            hit = uow.mark_undeliverable(bounced, automation.reason if automation else "bounce")
            if hit:
                uow.update_ticket(
                    ticket.id,
                    TicketChange(add_notes=("a bounce reports our outgoing message(s) undeliverable",), updated_at=now),
                )

        acknowledged = False
        if created and ack_note == "queued" and message.chat_channel:
            chat = render_chat_acknowledgement(
                templates=self.templates,
                outbound=self.outbound,
                policy=self.policy,
                message=message,
                ticket=ticket,
                missing=missing,
            )
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="acknowledgement", payload=chat, created_at=now))
            acknowledged = True
        elif created and ack_note == "queued":
            support_in_cc_only = message.recipient in message.cc and message.recipient not in message.to
            email = render_acknowledgement(
                templates=self.templates,
                outbound=self.outbound,
                policy=self.policy,
                message=self._without_foreign_tags(message, cited, ticket.reference),
                ticket=ticket,
                missing=missing,
                support_in_cc_only=support_in_cc_only,
                last_before_limit=last_before_limit,
            )
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="acknowledgement", payload=email, created_at=now))
            uow.index_message_id(ticket.id, email.message_id, ours=True)
            acknowledged = True

        alerted = False
        if verdict.security and not ticket.alerted:
            alerted = self._alert(uow, message, ticket, verdict.hits, now)

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
        )

    def _why_not_acknowledge(self, message: InboundMessage, automation: Automation | None) -> str | None:
        if message.chat_channel:
            return None  # a chat reply goes to the thread it came from
        if automation is not None:
            return f"automated mail: {automation.reason}"
        if not message.sender or "@" not in message.sender:
            return "no sender address to answer"
        own = {*self.outbound.support_addresses, self.outbound.from_address}
        if message.sender in own:
            return "sent from our own support address (loop)"
        return None

    def _staff_reply(self, uow: UnitOfWork, message: InboundMessage, placement: Placement, now: datetime) -> Receipt:
        """The support team's own words: stored on the ticket they answer, never a new ticket."""
        ticket = placement.ticket
        if ticket is None:
            return Receipt(
                route=Route.IGNORED,
                ticket_id=0,
                reference="",
                created=False,
                severity=Severity.S4,
                security=False,
                acknowledged=False,
                ack_note="staff message outside any ticket",
                alerted=False,
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
        uow.update_ticket(ticket.id, TicketChange(updated_at=now))
        return Receipt(
            route=placement.route,
            ticket_id=ticket.id,
            reference=ticket.reference,
            created=False,
            severity=ticket.severity,
            security=ticket.security,
            acknowledged=False,
            ack_note="staff reply",
            alerted=False,
            note=placement.note + "; staff reply",
        )

    def _open_ticket(
        self,
        uow: UnitOfWork,
        message: InboundMessage,
        verdict: Verdict,
        automation: Automation | None,
        placement: Placement,
        now: datetime,
        auth: AuthVerdict | None,
    ) -> tuple[TicketFacts, str, bool]:
        severity = verdict.severity or self.policy.default_severity
        if verdict.security:
            severity = Severity.S1
        # 35 random bits: a collision is improbable, and the unique constraint turns one into a
        # conflict that makes the store run this unit again with a fresh reference.
        reference = self.references.new()
        why_not = self._why_not_acknowledge(message, automation)
        if why_not is None and auth is not None and not auth.authenticated:
            known = self.policy.organisation_of(message.sender) or uow.is_known_participant(message.sender)
            if not known:
                why_not = f"sender not authenticated ({auth.reason}) and not a known customer"
        last_before_limit = False
        if why_not is None and not message.chat_channel:
            lim = self.limits
            sent = uow.count_outbox_since(kind="acknowledgement", recipient=message.sender, since=now - lim.ack_period)
            if sent >= lim.acks_per_sender:
                why_not = f"flood limit: {sent} acknowledgements to this sender within {_period(lim.ack_period)}"
            last_before_limit = sent == lim.acks_per_sender - 1
        notes = [*placement.remarks, *(f"{r.why}; opened as a new ticket" for r in placement.refusals)]
        if message.parse_problem:
            notes.append(f"the message could not be parsed fully: {message.parse_problem}")
        if why_not:
            notes.append(f"no acknowledgement sent: {why_not}")
        ticket = uow.create_ticket(
            NewTicket(
                reference=reference,
                subject=message.subject,
                channel=message.channel,
                requester=message.sender,
                requester_name=message.sender_name,
                organisation=message.organisation or self.policy.organisation_of(message.sender),
                severity=severity,
                security=verdict.security,
                created_at=now,
                response_due=self.policy.due(severity, now),
                thread_key=message.thread_key,
                ack_status="queued" if why_not is None else f"suppressed: {why_not}",
                notes=tuple(notes),
                evidence=verdict.hits,
            )
        )
        return ticket, why_not or "queued", last_before_limit

    def _flood_placement(
        self, uow: UnitOfWork, message: InboundMessage, placement: Placement, now: datetime
    ) -> Placement:
        """Past the new-ticket limit, a sender's messages join their latest ticket, silently."""
        lim = self.limits
        opened = uow.count_tickets_since(requester=message.sender, since=now - lim.ticket_period)
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
        self, uow: UnitOfWork, ticket: TicketFacts, message: InboundMessage, verdict: Verdict, now: datetime
    ) -> TicketFacts:
        severity = ticket.severity
        if verdict.severity is not None and verdict.severity < severity:
            severity = verdict.severity
        if verdict.security:
            severity = Severity.S1
        security = ticket.security or verdict.security
        due = ticket.response_due
        if severity < ticket.severity:
            due = min(due, self.policy.due(severity, now))
        change = TicketChange(
            severity=severity if severity != ticket.severity else None,
            security=True if security and not ticket.security else None,
            response_due=due if due != ticket.response_due else None,
            add_evidence=verdict.hits,
            add_notes=(f"raised to {severity.label} by a follow-up",) if severity < ticket.severity else (),
            updated_at=now,
        )
        uow.update_ticket(ticket.id, change)
        return TicketFacts(
            id=ticket.id,
            reference=ticket.reference,
            subject=ticket.subject,
            channel=ticket.channel,
            requester=ticket.requester,
            organisation=ticket.organisation,
            severity=severity,
            security=security,
            alerted=ticket.alerted,
            status=ticket.status,
            created_at=ticket.created_at,
            response_due=due,
            participants=ticket.participants,
            thread_key=ticket.thread_key,
        )

    def _alert(
        self, uow: UnitOfWork, message: InboundMessage, ticket: TicketFacts, hits: Sequence[RuleHit], now: datetime
    ) -> bool:
        if not self.irt_email:
            uow.update_ticket(ticket.id, TicketChange(add_notes=("security incident: no IRT lead address configured",)))
            return False
        hour_ago = now - timedelta(hours=1)
        paged = uow.count_outbox_since(kind="irt-alert", recipient=self.irt_email, since=hour_ago)
        if paged >= self.limits.irt_alerts_per_hour:
            uow.update_ticket(
                ticket.id,
                TicketChange(
                    add_notes=(f"IRT alert ceiling reached ({paged} alerts in the last hour): not paged",),
                    updated_at=now,
                ),
            )
            if uow.count_outbox_since(kind="irt-summary", recipient=self.irt_email, since=hour_ago) == 0:
                summary = OutgoingEmail(
                    to=(self.irt_email,),
                    subject=f"[SECURITY] IRT alert ceiling reached: {paged} alerts in the last hour",
                    body=(
                        f"intake has sent {paged} security alerts in the last hour, its configured ceiling.\n"
                        "Further suspected incidents in this hour are marked Severity 1 on their tickets but\n"
                        "not paged one by one. See them with: intake tickets list\n"
                        f"The first one not paged: {ticket.reference}\n"
                    ),
                    message_id=new_message_id(ticket.reference, self.outbound.message_id_domain),
                    from_address=self.outbound.from_address,
                    from_name=self.outbound.from_name + " (intake)",
                    envelope_from=self.outbound.envelope_from,
                    headers=(
                        ("Auto-Submitted", "auto-generated"),
                        (self.outbound.loop_header, self.outbound.loop_token),
                    ),
                )
                uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="irt-summary", payload=summary, created_at=now))
            return False
        alert = render_irt_alert(
            templates=self.templates,
            outbound=self.outbound,
            to=self.irt_email,
            message=message,
            ticket=ticket,
            hits=[h for h in hits if "security" in h.tags] or list(hits),
            received_at=now.isoformat(timespec="seconds"),
        )
        uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="irt-alert", payload=alert, created_at=now))
        if self.irt_chat_user:
            dm = render_irt_chat_alert(
                templates=self.templates, user=self.irt_chat_user, message=message, ticket=ticket, hits=hits
            )
            uow.enqueue(OutboxEntry(ticket_id=ticket.id, kind="irt-alert", payload=dm, created_at=now))
        uow.update_ticket(ticket.id, TicketChange(alerted=True, updated_at=now))
        return True

    def _without_foreign_tags(self, message: InboundMessage, cited: Sequence[Found], own: str) -> InboundMessage:
        """The acknowledgement of a new ticket must not carry another ticket's reference back."""
        subject = message.subject
        for found in cited:
            if found.reference != own:
                subject = subject.replace(f"[{found.text}]", "").replace(found.text, "")
        if subject == message.subject:
            return message
        return replace(message, subject=" ".join(subject.split()))
