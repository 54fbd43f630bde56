"""Whose share of the IRT alerts a message uses, and whether an incident pages (intake.paging)."""

from __future__ import annotations

import pytest

from intake.hygiene import AuthVerdict
from intake.model import Channel, InboundMessage
from intake.paging import (
    ORGANISATION_SUMMARY,
    SUMMARY,
    Hold,
    Organisation,
    Paging,
    decide,
    mail_domain,
    organisation_of,
)
from intake.policy import Policy
from intake.ports import PagingCounts

POLICY = Policy(organisations={"acme": ("acme.com", "acme-corp.de")})
PASS = AuthVerdict(True, "dkim=pass header.d=... aligned with From")
FAIL = AuthVerdict(False, "spf=fail")


def email_from(sender: str) -> InboundMessage:
    return InboundMessage(channel=Channel.EMAIL, sender=sender, recipient="support@example.com")


def of(sender: str, *, auth: AuthVerdict | None = PASS) -> Organisation:
    """Whose share mail from ``sender`` uses; by default its authentication was checked and passed."""
    message = email_from(sender)
    return organisation_of(message, organisation=POLICY.organisation_of(sender), auth=auth, policy=POLICY)


def chat(channel: str, organisation: str | None) -> Organisation:
    message = InboundMessage(
        channel=Channel.SLACK,
        sender="U1",
        recipient=f"slack:T1/{channel}",
        chat_channel=channel,
        organisation=organisation,
        author_team="T1",
    )
    return organisation_of(message, organisation=organisation, auth=None, policy=POLICY)


def test_a_configured_customer_s_authenticated_mail_and_slack_channels_are_one_organisation() -> None:
    assert of("alice@acme.com") == of("bob@eu.mail.acme.com") == of("carol@acme-corp.de") == chat("C1", "acme")
    assert of("alice@acme.com") == Organisation("org:acme", "acme")


def test_mail_not_known_to_be_authentic_never_uses_a_customer_s_or_a_domain_s_share() -> None:
    """Anyone can write x@acme.com into From: mail whose authentication was not checked (the
    default) or failed counts by its address, so a forger uses up a share of their own, never
    the one acme's Slack channels and authenticated mail use."""
    for auth in (None, FAIL):
        assert of("x@acme.com", auth=auth) not in (of("x@acme.com"), chat("C1", "acme"))
        assert of("x@acme.com", auth=auth) != of("y@acme.com", auth=auth)  # one share an address
        assert of("a@plain.example", auth=auth) != of("b@plain.example", auth=auth)
    assert of("X+scan@ACME.com", auth=None) == Organisation("address:x@acme.com", "x@acme.com")
    # Failed mail counts apart from the same address's authenticated mail too, and says so.
    forged = of("alice@gmail.com", auth=FAIL)
    assert forged == Organisation("address:alice@gmail.com (unauthenticated)", "alice@gmail.com (unauthenticated)")
    assert forged != of("alice@gmail.com") == Organisation("address:alice@gmail.com", "alice@gmail.com")
    assert of("ceo@acme.com", auth=FAIL).label == "ceo@acme.com (unauthenticated)"
    assert of("x@acme.com", auth=FAIL).noun == of("x@acme.com", auth=None).noun == "sender"
    assert of("x@acme.com").noun == chat("C1", None).noun == "organisation"


def test_authenticated_mail_of_another_domain_is_that_exact_domain() -> None:
    assert of("a@example.co.uk") == of("b@EXAMPLE.co.uk.") == of("c@Example.Co.UK")
    assert of("a@example.co.uk") == Organisation("domain:example.co.uk", "example.co.uk")
    assert of("a@example.co.uk") != of("a@other.co.uk")
    # The tenants of a shared host are organisations of their own: one of them (any trial
    # account) must not hold the others' pages. So are a domain's subdomains; a domain owner
    # who makes many of them is held by the global ceiling.
    assert of("it@contoso.onmicrosoft.com") != of("attacker@trial123.onmicrosoft.com")
    assert of("a@x.zendesk.com") != of("b@y.zendesk.com")
    assert len({of(f"x@host{i}.scanner.example") for i in range(5)}) == 5
    # Unicode and its xn-- form are one domain.
    assert of("a@bücher.de") == of("b@xn--bcher-kva.de") == of("c@BÜCHER.de.")
    assert mail_domain("[192.0.2.1]") == "[192.0.2.1]" and mail_domain("localhost.") == "localhost"
    assert mail_domain("a..b") == "a..b"  # no valid IDN: as written


def test_on_a_public_mail_domain_each_person_is_their_own_organisation() -> None:
    assert of("alice@gmail.com") != of("bob@gmail.com")
    assert of("alice@gmail.com") == Organisation("address:alice@gmail.com", "alice@gmail.com")
    # One person's aliases are one share: a +tag, Gmail's dots, googlemail.com.
    assert of("alice+scan1@gmail.com") == of("a.l.ice@googlemail.com") == of("alice@gmail.com")
    assert of("bob+x@yahoo.co.uk") == of("bob@yahoo.co.uk") != of("carol@yahoo.co.uk")
    assert of("bob@hotmail.fr").key == "address:bob@hotmail.fr"  # a provider's brand under a country
    # Smaller providers too: one account there (anyone's) must not hold the other users' pages.
    for domain in ("posteo.de", "mailbox.org", "protonmail.ch", "duck.com"):
        assert (
            of(f"alice@{domain}")
            != of(f"attacker@{domain}")
            == Organisation(f"address:attacker@{domain}", f"attacker@{domain}")
        )


def test_mail_without_a_sender_shares_one_organisation() -> None:
    assert of("") == of("no-at-sign") == of("x@.") == Organisation("mail:no sender", "mail without a sender address")
    assert of("", auth=None) == of("")


def test_a_slack_channel_that_names_no_customer_is_its_own_organisation() -> None:
    assert chat("C1", None) == Organisation("slack:T1/C1", "Slack channel C1")
    assert chat("C1", None) != chat("C2", None)
    assert chat("C1", "") == chat("C1", None)


ACME = Organisation("domain:acme.example", "acme.example")


def counts(alerts: int, for_org: int, *, summary: bool = False, org_summary: bool = False) -> PagingCounts:
    return PagingCounts(
        alerts=alerts, alerts_for_organisation=for_org, summary_sent=summary, organisation_summary_sent=org_summary
    )


def held(c: PagingCounts) -> Paging:
    return decide(c, ACME, per_hour=20, per_organisation=5, reference="SUP-TEST-0001")


def test_below_both_limits_it_pages() -> None:
    paging = held(counts(19, 4))
    assert paging.page and paging.held is None and paging.summary is None and paging.note == ""


def test_an_organisation_past_its_share_is_held_while_the_ceiling_has_room() -> None:
    first = held(counts(7, 5))
    assert first.held is Hold.ORGANISATION and not first.page
    assert "acme.example has had its share (5 alerts for it in the last hour, of 5" in first.note
    assert "other organisations still page" in first.note
    assert "a summary naming acme.example goes to the lead" in first.note
    assert first.summary is not None and first.summary.kind == ORGANISATION_SUMMARY
    # The subject's number is the alerts that paged (5), not those held (the one held so far).
    assert first.summary.subject == "[SECURITY] IRT alerts for acme.example held after 5 paged in the last hour"
    assert "SUP-TEST-0001" in first.summary.body
    assert "Other organisations still page" in first.summary.body
    # One summary an hour for the organisation: the next held incident says it was sent.
    later = held(counts(7, 5, org_summary=True))
    assert later.held is Hold.ORGANISATION and later.summary is None
    assert "the lead was sent this hour's summary for acme.example" in later.note


def test_an_address_s_share_is_called_a_sender_s() -> None:
    """Mail not known to be authentic counts by its address: the note and the summary say
    "sender", not "organisation" (x@acme.com held does not hold acme)."""
    sender = Organisation("address:x@acme.com", "x@acme.com")
    paging = decide(counts(7, 5), sender, per_hour=20, per_organisation=5, reference="SUP-TEST-0001")
    assert paging.held is Hold.ORGANISATION and paging.summary is not None
    assert "x@acme.com has had its share (5 alerts for it in the last hour, of 5 an hour for one sender)" in paging.note
    assert "other senders still page" in paging.note and "organisation" not in paging.note
    assert paging.summary.subject == "[SECURITY] IRT alerts for x@acme.com held after 5 paged in the last hour"
    assert "its share for one sender" in paging.summary.body and "Other senders still page" in paging.summary.body


def test_the_global_ceiling_holds_every_organisation_and_is_named_as_the_reason() -> None:
    for for_org in (0, 5, 9):  # whatever this organisation's own count
        paging = held(counts(20, for_org))
        assert paging.held is Hold.CEILING
        assert "the global ceiling is reached (20 alerts in the last hour, of 20" in paging.note
        assert "other organisations still page" not in paging.note
        assert paging.summary is not None and paging.summary.kind == SUMMARY
        assert "ceiling reached" in paging.summary.subject and "from acme.example" in paging.summary.body
    again = held(counts(20, 5, summary=True, org_summary=False))
    assert again.held is Hold.CEILING and again.summary is None
    assert "the lead was sent this hour's summary" in again.note


@pytest.mark.parametrize(("per_hour", "per_org"), [(20, 5), (2, 5), (5, 5), (1, 1)])
def test_it_never_pages_more_than_either_limit(per_hour: int, per_org: int) -> None:
    """Driven as the service drives it: each page is one more alert in all and for its sender."""
    sent: dict[str, int] = {}
    summaries: set[str] = set()
    for i in range(60):
        org = Organisation(f"domain:{i % 3}.example", f"{i % 3}.example")
        c = PagingCounts(
            alerts=sum(sent.values()),
            alerts_for_organisation=sent.get(org.key, 0),
            summary_sent=SUMMARY in summaries,
            organisation_summary_sent=f"{ORGANISATION_SUMMARY}:{org.key}" in summaries,
        )
        paging = decide(c, org, per_hour=per_hour, per_organisation=per_org, reference="SUP-TEST-0001")
        if paging.page:
            sent[org.key] = sent.get(org.key, 0) + 1
        elif paging.summary is not None:
            summaries.add(SUMMARY if paging.summary.kind == SUMMARY else f"{ORGANISATION_SUMMARY}:{org.key}")
    assert sum(sent.values()) == min(per_hour, 3 * per_org)
    assert max(sent.values()) <= per_org
    # At most one summary an hour for each organisation held by its share, and one for the ceiling.
    assert len(summaries) <= 1 + 3
