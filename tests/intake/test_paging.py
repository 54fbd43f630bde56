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
    organisation_of,
    registrable_domain,
)
from intake.policy import Policy
from intake.ports import PagingCounts

POLICY = Policy(organisations={"acme": ("acme.com", "acme-corp.de")})


def email_from(sender: str) -> InboundMessage:
    return InboundMessage(channel=Channel.EMAIL, sender=sender, recipient="support@example.com")


def of(sender: str, *, auth: AuthVerdict | None = None) -> Organisation:
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


def test_a_configured_customer_is_one_organisation_across_its_domains_and_slack() -> None:
    assert of("alice@acme.com") == of("bob@eu.mail.acme.com") == of("carol@acme-corp.de") == chat("C1", "acme")
    assert of("alice@acme.com") == Organisation("org:acme", "acme")


def test_a_domain_is_its_registrable_domain_whatever_the_subdomain_and_case() -> None:
    assert of("a@example.co.uk") == of("b@eu.mail.example.co.uk") == of("c@Mail.EXAMPLE.co.uk.")
    assert of("a@example.co.uk").label == "example.co.uk"
    # Two customers under one public suffix are two organisations, not "co.uk".
    assert of("a@example.co.uk") != of("a@other.co.uk")
    # Subdomains made without end buy no second share.
    assert len({of(f"x@host{i}.scanner.example") for i in range(5)}) == 1
    # Unicode and its xn-- form are one domain.
    assert of("a@bücher.de") == of("b@xn--bcher-kva.de")
    assert registrable_domain("[192.0.2.1]") == "[192.0.2.1]" and registrable_domain("localhost") == "localhost"
    assert registrable_domain("co.uk") == "co.uk"


def test_on_a_public_mail_domain_each_person_is_their_own_organisation() -> None:
    assert of("alice@gmail.com") != of("bob@gmail.com")
    assert of("alice@gmail.com") == Organisation("address:alice@gmail.com", "alice@gmail.com")
    # One person's aliases are one share: a +tag, Gmail's dots, googlemail.com.
    assert of("alice+scan1@gmail.com") == of("a.l.ice@googlemail.com") == of("alice@gmail.com")
    assert of("bob+x@yahoo.co.uk") == of("bob@yahoo.co.uk") != of("carol@yahoo.co.uk")
    assert of("bob@hotmail.fr").key == "address:bob@hotmail.fr"  # a provider's brand under a country


def test_mail_without_a_sender_shares_one_organisation() -> None:
    assert of("") == of("no-at-sign") == Organisation("mail:no sender", "mail without a sender address")


def test_a_slack_channel_that_names_no_customer_is_its_own_organisation() -> None:
    assert chat("C1", None) == Organisation("slack:T1/C1", "Slack channel C1")
    assert chat("C1", None) != chat("C2", None)
    assert chat("C1", "") == chat("C1", None)


def test_mail_that_failed_authentication_does_not_use_the_customer_s_share() -> None:
    forged = of("ceo@acme.com", auth=AuthVerdict(False, "spf=fail"))
    assert forged != of("ceo@acme.com", auth=AuthVerdict(True, "dkim=pass"))
    assert forged.label == "acme (unauthenticated)"
    assert of("ceo@acme.com", auth=AuthVerdict(True, "dkim=pass")) == of("ceo@acme.com")


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
    assert "acme.example" in first.summary.subject and "SUP-TEST-0001" in first.summary.body
    assert "Other organisations still page" in first.summary.body
    # One summary an hour for the organisation: the next held incident says it was sent.
    later = held(counts(7, 5, org_summary=True))
    assert later.held is Hold.ORGANISATION and later.summary is None
    assert "the lead was sent this hour's summary for acme.example" in later.note


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
