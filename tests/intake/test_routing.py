"""Which ticket a message joins, and who is entitled to join one."""

from __future__ import annotations

from datetime import UTC, datetime

from intake.model import Channel, InboundMessage, Route, Severity
from intake.policy import Policy
from intake.ports import KnownId, TicketFacts
from intake.reference import References
from intake.routing import place

REFS = References()
NOW = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = Policy(organisations={"acme": ("acme.com",)})


def ticket(ref: str, requester: str = "alice@acme.com", org: str | None = "acme", tid: int = 1) -> TicketFacts:
    return TicketFacts(
        id=tid,
        reference=ref,
        subject="printer",
        channel=Channel.EMAIL,
        requester=requester,
        organisation=org,
        severity=Severity.S3,
        security=False,
        alerted=False,
        status="open",
        created_at=NOW,
        response_due=NOW,
        participants=frozenset({requester}),
    )


def msg(sender: str, subject: str = "", **kw: object) -> InboundMessage:
    return InboundMessage(channel=Channel.EMAIL, sender=sender, subject=subject, **kw)  # type: ignore[arg-type]


def test_no_evidence_is_a_new_ticket() -> None:
    p = place(msg("bob@x.org", "hello"), policy=POLICY)
    assert p.route is Route.NEW and p.ticket is None and p.refusals == ()


def test_reference_joins_for_participant_org_and_domain() -> None:
    r = REFS.new()
    t = ticket(r)
    for sender, why in [
        ("alice@acme.com", "participant"),
        ("carol@acme.com", "same organisation"),
        ("dave@eu.acme.com", "same organisation"),
    ]:
        m = msg(sender, f"Re: printer [{r}]")
        p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r: t})
        assert p.route is Route.REFERENCE and p.ticket == t, sender
        assert why in p.note
    t2 = ticket(r, requester="erin@small.io", org=None)
    m = msg("frank@small.io", f"Re: [{r}]")
    p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r: t2})
    assert p.route is Route.REFERENCE and "same domain as the requester" in p.note


def test_stranger_citing_a_reference_gets_a_new_ticket_and_a_refusal() -> None:
    r = REFS.new()
    t = ticket(r)
    m = msg("mallory@evil.example", f"Re: printer [{r}]")
    p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r: t})
    assert p.route is Route.NEW and p.ticket is None
    assert [x.ticket for x in p.refusals] == [t]
    assert "mallory@evil.example" in p.refusals[0].why


def test_public_mail_domains_do_not_make_colleagues() -> None:
    # Mailbox providers anyone can sign up to, also the smaller ones (posteo.de, mailbox.org,
    # protonmail.ch, duck.com): two of their users are no colleagues.
    for domain in ("gmail.com", "posteo.de", "mailbox.org", "protonmail.ch", "duck.com"):
        r = REFS.new()
        t = ticket(r, requester=f"alice@{domain}", org=None)
        m = msg(f"mallory@{domain}", f"[{r}]")
        p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r: t})
        assert p.route is Route.NEW and p.refusals, domain


def test_header_threading_by_our_message_id_is_entitled() -> None:
    r = REFS.new()
    t = ticket(r)
    m = msg("newperson@elsewhere.org", "Re: printer", in_reply_to=("ack-1@intake",))
    p = place(m, policy=POLICY, known_ids=[KnownId(t, "ack-1@intake", ours=True)])
    assert p.route is Route.HEADER and p.ticket == t


def test_header_threading_by_customer_id_needs_entitlement() -> None:
    r = REFS.new()
    t = ticket(r)
    ok = place(msg("alice@acme.com", "Re: x"), policy=POLICY, known_ids=[KnownId(t, "c1@acme", ours=False)])
    assert ok.route is Route.HEADER
    bad = place(msg("eve@evil.example", "Re: x"), policy=POLICY, known_ids=[KnownId(t, "c1@acme", ours=False)])
    assert bad.route is Route.NEW and bad.refusals[0].ticket == t


def test_mistyped_and_unknown_references_are_remarked() -> None:
    r = REFS.new()
    code = r[4:].replace("-", "")
    typo = "SUP-" + code[:4] + "-" + code[4:7] + ("0" if code[7] != "0" else "1")
    m = msg("alice@acme.com", f"Re: [{typo}]")
    p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={})
    assert p.route is Route.NEW
    assert any("fails its check" in x for x in p.remarks)
    unknown = REFS.new()
    m2 = msg("alice@acme.com", f"Re: [{unknown}]")
    p2 = place(m2, policy=POLICY, cited=REFS.find(m2.subject), by_reference={})
    assert any("not a known ticket" in x for x in p2.remarks)
    # Without its dashes a reference may also be a word that passed the check by chance: when
    # no ticket has it, nothing is said; when one does, it joins as the dashed form would.
    m3 = msg("alice@acme.com", f"Re: printer {unknown.replace('-', '')}")
    p3 = place(m3, policy=POLICY, cited=REFS.find(m3.subject), by_reference={})
    assert p3.route is Route.NEW and p3.remarks == ()
    p4 = place(m3, policy=POLICY, cited=REFS.find(m3.subject), by_reference={unknown: ticket(unknown)})
    assert p4.route is Route.REFERENCE and p4.ticket is not None and p4.ticket.reference == unknown


def test_reference_wins_over_headers() -> None:
    r1, r2 = REFS.new(), REFS.new()
    t1, t2 = ticket(r1, tid=1), ticket(r2, tid=2)
    m = msg("alice@acme.com", f"Re: [{r2}]", in_reply_to=("a@x",))
    p = place(
        m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r2: t2}, known_ids=[KnownId(t1, "a@x", ours=True)]
    )
    assert p.ticket == t2 and p.route is Route.REFERENCE


def test_chat_thread_first() -> None:
    r = REFS.new()
    t = ticket(r)
    m = InboundMessage(channel=Channel.SLACK, sender="U1", organisation="acme", thread_key="T/C/1")
    p = place(m, policy=POLICY, by_thread=t)
    assert p.route is Route.THREAD and p.ticket == t


def test_a_reference_refused_then_joined_by_our_message_id_leaves_no_refusal() -> None:
    """The IRT lead (or a vendor the customer forwarded our acknowledgement to) cites the
    reference, which alone does not entitle them, and replies to our Message-ID, which does:
    the message joins, and the ticket is not told that its sender was refused."""
    r = REFS.new()
    t = ticket(r)
    m = msg("irt-lead@example.com", f"RE: [SECURITY] {r}", in_reply_to=("alert-1@intake",))
    p = place(
        m,
        policy=POLICY,
        cited=REFS.find(m.subject),
        by_reference={r: t},
        known_ids=[KnownId(t, "alert-1@intake", True)],
    )
    assert p.route is Route.HEADER and p.ticket == t
    assert p.refusals == ()
    # A refusal of another ticket it cited stays.
    r2 = REFS.new()
    t2 = ticket(r2, tid=2)
    m2 = msg("irt-lead@example.com", f"RE: {r2} and {r}", in_reply_to=("alert-1@intake",))
    p2 = place(
        m2,
        policy=POLICY,
        cited=REFS.find(m2.subject),
        by_reference={r: t, r2: t2},
        known_ids=[KnownId(t, "alert-1@intake", True)],
    )
    assert p2.ticket == t and [x.ticket for x in p2.refusals] == [t2]


def test_our_own_people_join_any_ticket_as_a_note_to_staff() -> None:
    """The IRT lead forwarding the alert by hand (a new Message-ID, the reference in the
    subject), or an escalation contact answering from their own mail: our own people, who
    join the ticket without becoming its customers; anyone else citing it is refused."""
    r = REFS.new()
    t = ticket(r)
    internal = frozenset({"irt-lead@example.com"})
    m = msg("irt-lead@example.com", f"Fwd: [SECURITY] Severity 1 [{r}]")
    p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r: t}, internal=internal)
    assert (p.route, p.ticket, p.staff_note, p.refusals) == (Route.REFERENCE, t, True, ())
    # By a customer's Message-ID in its References (a forward that kept them).
    h = place(
        msg("irt-lead@example.com", "Fwd: x", references=("c1@acme",)),
        policy=POLICY,
        known_ids=[KnownId(t, "c1@acme", ours=False)],
        internal=internal,
    )
    assert (h.route, h.ticket, h.staff_note) == (Route.HEADER, t, True)
    stranger = msg("mallory@evil.example", f"Fwd: [SECURITY] Severity 1 [{r}]")
    s = place(stranger, policy=POLICY, cited=REFS.find(stranger.subject), by_reference={r: t}, internal=internal)
    assert s.route is Route.NEW and s.refusals
    # An entitled sender who is also one of ours (a colleague at the customer's domain) stays a customer.
    both = msg("alice@acme.com", f"Re: [{r}]")
    b = place(
        both, policy=POLICY, cited=REFS.find(both.subject), by_reference={r: t}, internal=frozenset({"alice@acme.com"})
    )
    assert b.ticket == t and not b.staff_note
