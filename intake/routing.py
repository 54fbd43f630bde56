"""Which ticket a message belongs to, and who may join a ticket. The one place that decides it.

:func:`place` is a pure function of the message and what storage found for it (tickets its
references cite, tickets its In-Reply-To/References point at, the ticket of its chat thread).
Order of evidence:

1. the chat thread it was posted in (Slack ``thread_ts``);
2. a valid reference in its subject (any case, any ``Re:``/``Fwd:`` prefix, anywhere);
3. In-Reply-To / References pointing at any message of a ticket (ours included: the
   acknowledgement, the IRT alert, the triage and escalation notes);
4. otherwise a new ticket.

A reference or a header joins a ticket only for someone entitled to it: a participant of the
ticket, someone of the same customer organisation (configured domains, or the requester's own
domain unless it is a public mail provider), or a reply to a Message-ID intake generated for
that ticket (unguessable). Everyone else gets a new ticket, and the mismatch is recorded on
both tickets (Zammad still has open bugs for exactly this). A sender whose reference is
refused but who replies to one of our Message-IDs of that very ticket joins it, unrefused.
The addresses intake itself writes to about tickets (the IRT lead, triage, escalation
contacts) may join any ticket by its reference or headers; what they write is a note to
staff (``Placement.staff_note``), not the customer's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from intake.model import STAFF_NOTE_ID_PREFIX, InboundMessage, Route
from intake.policy import Policy
from intake.ports import KnownId, TicketFacts
from intake.reference import Found


@dataclass(frozen=True, slots=True)
class Refusal:
    ticket: TicketFacts
    why: str


@dataclass(frozen=True, slots=True)
class Placement:
    route: Route
    ticket: TicketFacts | None  # None: open a new ticket
    note: str  # why it went there, stored with the message
    refusals: tuple[Refusal, ...] = ()  # tickets it cited but may not join
    remarks: tuple[str, ...] = ()  # e.g. a mistyped reference
    staff_note: bool = False  # joined as a reply to one of our notes to our own people


def entitlement(message: InboundMessage, ticket: TicketFacts, policy: Policy) -> str | None:
    """Why the sender may join ``ticket``, or None when they may not."""
    sender = message.sender
    if message.staff:
        return "support staff"
    if sender and sender in ticket.participants:
        return "participant of the ticket"
    org = message.organisation or (policy.organisation_of(sender) if sender else None)
    if org and ticket.organisation and org == ticket.organisation:
        return f"same organisation ({org})"
    domain = message.sender_domain
    req_domain = ticket.requester.rpartition("@")[2]
    if domain and domain == req_domain and not policy.is_public_domain(domain):
        return f"same domain as the requester ({domain})"
    return None


def may_be_told(message: InboundMessage, ticket: TicketFacts, policy: Policy) -> bool:
    """Whether intake's answer to ``message`` may name ``ticket`` (a redelivery's "already stored
    as REF"): only to someone entitled to it. A Message-ID is no secret (everyone on the Cc
    line has it), so a stranger re-sending one must not learn which ticket has it.
    """
    return entitlement(message, ticket, policy) is not None


def place(
    message: InboundMessage,
    *,
    policy: Policy,
    cited: Sequence[Found] = (),
    by_reference: Mapping[str, TicketFacts] | None = None,
    known_ids: Sequence[KnownId] = (),
    by_thread: TicketFacts | None = None,
    internal: frozenset[str] = frozenset(),
) -> Placement:
    """``internal``: the addresses intake itself writes to about tickets (the IRT lead, triage,
    escalation contacts). They may join any ticket, as staff answering a note to staff do."""
    placement = _place(
        message,
        policy=policy,
        cited=cited,
        by_reference=by_reference,
        known_ids=known_ids,
        by_thread=by_thread,
        internal=bool(message.sender) and message.sender in internal,
    )
    # In a thread that one of our notes to staff began (its id stays in References, whichever
    # id or reference the message joined by), the sender is one of our own people answering;
    # unless the ticket's customer may write there (a participant, a colleague at the
    # customer): the note's id reaches customers too, when staff answer them with support in Cc.
    joined = placement.ticket
    if (
        joined is not None
        and not placement.staff_note
        and any(
            k.ours and k.ticket.id == joined.id and k.message_id.startswith(STAFF_NOTE_ID_PREFIX) for k in known_ids
        )
        and entitlement(message, joined, policy) is None
    ):
        return replace(placement, staff_note=True)
    return placement


def _place(
    message: InboundMessage,
    *,
    policy: Policy,
    cited: Sequence[Found],
    by_reference: Mapping[str, TicketFacts] | None,
    known_ids: Sequence[KnownId],
    by_thread: TicketFacts | None,
    internal: bool,
) -> Placement:
    by_reference = by_reference or {}
    refusals: list[Refusal] = []
    remarks: list[str] = []
    who = message.sender or "an unknown sender"
    ours = "one of our own (a note to staff answered)"

    if by_thread is not None:
        why = entitlement(message, by_thread, policy)
        if why or message.organisation is None or message.organisation == by_thread.organisation:
            return Placement(Route.THREAD, by_thread, f"reply in the thread of {by_thread.reference}")
        refusals.append(Refusal(by_thread, f"{who} posted in its thread but is not entitled to it"))

    for found in cited:
        if found.reference is None:
            remarks.append(f"'{found.text}' looks like a reference but fails its check (mistyped?)")
            continue
        ticket = by_reference.get(found.reference)
        if ticket is None:
            if not found.loose:  # a loose one is as likely a word that passed the check
                remarks.append(f"cites {found.reference}, which is not a known ticket")
            continue
        why = entitlement(message, ticket, policy)
        if why or internal:
            return Placement(
                Route.REFERENCE,
                ticket,
                f"reference {ticket.reference} in the subject; sender is {why or ours}",
                tuple(refusals),
                tuple(remarks),
                staff_note=not why,
            )
        refusals.append(Refusal(ticket, f"{who} cited {ticket.reference} but is not entitled to it"))

    def others(joined: TicketFacts) -> tuple[Refusal, ...]:
        # Refused by its reference, entitled by its headers: not refused after all.
        return tuple(r for r in refusals if r.ticket.id != joined.id)

    for known in known_ids:
        if known.ours:
            ref = known.ticket.reference
            if known.message_id == message.message_id:  # our own mail come back (a forwarding mailbox)
                note = f"intake's own message <{known.message_id}> for {ref} came back"
            else:
                note = f"replies to <{known.message_id}>, sent by intake for {ref}"
            return Placement(
                Route.HEADER,
                known.ticket,
                note,
                others(known.ticket),
                tuple(remarks),
                staff_note=(known.message_id.startswith(STAFF_NOTE_ID_PREFIX) or internal)
                and entitlement(message, known.ticket, policy) is None,
            )
        why = entitlement(message, known.ticket, policy)
        if why or internal:
            return Placement(
                Route.HEADER,
                known.ticket,
                f"replies to <{known.message_id}> of {known.ticket.reference}; sender is {why or ours}",
                others(known.ticket),
                tuple(remarks),
                staff_note=not why,
            )
        if all(r.ticket.id != known.ticket.id for r in refusals):
            refusals.append(
                Refusal(known.ticket, f"{who} replied to a message of {known.ticket.reference} but is not entitled")
            )

    note = "new ticket"
    if refusals:
        note += "; refused to join " + ", ".join(r.ticket.reference for r in refusals)
    return Placement(Route.NEW, None, note, tuple(refusals), tuple(remarks))
