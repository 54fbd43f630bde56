"""Whether a suspected security incident pages the IRT lead, and whose share of the pages it takes.

The policy (CaliberMind's): every suspected security incident is Severity 1, and the Incident
Response Team lead reaches out. intake pages the lead once per incident ticket (the IRT alert)
within two hourly limits, counted in the outbox (:class:`intake.ports.PagingCounts`):

* **the organisation's share** (``Limits.irt_alerts_per_organisation``, 5 by default): an
  organisation (or sender, below) paged for that many times in the last hour pages no more
  this hour. Its further incidents stay Severity 1 on their tickets, each ticket says why it
  was not paged, and one summary an hour names it to the lead. So one customer's mail loop, a
  scanner forwarding its findings to support, or twenty "we were hacked" mails from one sender
  no longer keep another customer's incident in that hour from paging.
* **the global ceiling** (``Limits.irt_alerts_per_hour``, 20), the last resort against a flood
  from many senders at once: past it nothing pages; one summary an hour says so. It is checked
  first: when it holds, other organisations do not page either, and the note says so.

Whose share a message uses (:func:`organisation_of`) depends on who vouches for its sender,
because a share is something a sender can use up for everyone else who has it:

1. a Slack message in a customer's channel (``[slack.channels]``; Slack authenticates its
   author): the customer's share, ``org:NAME``;
2. a Slack message in a channel that names no customer: the channel. Not the workspace: a
   channel intake reads is in our own workspace, whose team every event names, and the
   author's own team is not always given (nor, outside Slack Connect, anyone else's);
3. mail whose authentication was checked and passed (``email.trusted_authserv_ids``: SPF or
   DKIM aligned with From, per our own MTA): a configured customer's domains
   (``[organisations.NAME] domains``) use the customer's share, the same as its Slack
   channels; a public mail domain (``intake.policy.is_public_mail_domain``: gmail.com,
   posteo.de, ...), whose users are no organisation, the address (:func:`personal_address`);
   any other domain, the domain exactly as written (:func:`mail_domain`: case, a trailing dot
   and Unicode against ``xn--`` do not count). Not the registrable domain: the tenants of a
   shared host (``contoso.onmicrosoft.com``, ``x.zendesk.com``) are organisations of their
   own, and the Public Suffix List names few such hosts. A domain owner who makes many
   authenticated subdomains gets a share each, and is held by the global ceiling;
4. any other mail (authentication not checked, as by default, or failed): the sender's
   address (:func:`personal_address`), never the organisation or the domain. Anyone can write
   ``x@acme.com`` into From: a forger uses up only a share of the address written (that
   address's own unauthenticated incidents are then held, and the summary names it), and at
   worst the global ceiling, as before there were shares. Mail that failed a check counts
   apart from the same address's authenticated mail; mail without a sender address is one
   share, ``mail:no sender``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # storage imports the kinds: the read commands load no more than types need
    from intake.hygiene import AuthVerdict
    from intake.model import InboundMessage
    from intake.policy import Policy
    from intake.ports import PagingCounts

# The outbox kinds the limits count (notes to the IRT lead's address).
ALERT = "irt-alert"
SUMMARY = "irt-summary"  # the global ceiling's, at most one an hour
ORGANISATION_SUMMARY = "irt-org-summary"  # one organisation's, at most one an hour for each
KINDS: tuple[str, ...] = (ALERT, SUMMARY, ORGANISATION_SUMMARY)

KEY_LENGTH = 400  # what the outbox's organisation_key column holds

_GMAIL = frozenset({"gmail.com", "googlemail.com"})
UNAUTHENTICATED = " (unauthenticated)"  # after the key and label of mail that failed its check


@dataclass(frozen=True, slots=True)
class Organisation:
    """Whose share of the IRT alerts a message uses."""

    key: str  # stored with the alert and the summary, and counted by equality
    label: str  # how a ticket's note and the summary name it to people

    @property
    def noun(self) -> str:
        """What the share is one of, in a note: an address's is a sender's."""
        return "sender" if self.key.startswith(("address:", "mail:")) else "organisation"


def mail_domain(domain: str) -> str:
    """A mail domain as one share counts it: lower-case, no trailing dot, in its ASCII
    (``xn--``) form (``Bücher.DE.`` -> ``xn--bcher-kva.de``); as written where it is no valid
    IDN."""
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def personal_address(address: str) -> str:
    """One mailbox however it is written: lower-case, no ``+tag``, its domain as
    :func:`mail_domain` has it; at Gmail without dots (which Gmail ignores)."""
    local, _, domain = address.strip().lower().rpartition("@")
    domain = mail_domain(domain)
    local = local.split("+", 1)[0] or local
    if domain in _GMAIL:
        local, domain = local.replace(".", "") or local, "gmail.com"
    return f"{local}@{domain}"


def organisation_of(
    message: InboundMessage, *, organisation: str | None, auth: AuthVerdict | None, policy: Policy
) -> Organisation:
    """Whose share of the IRT alerts ``message`` uses (see the module's docstring).

    ``organisation``: the configured customer the message is from, if any (the assessment's:
    a Slack channel's, or the one whose domain From names); ``auth``: the sender's
    authentication, where it is checked (None: not checked).
    """
    if message.chat_channel is not None:  # Slack: it authenticates who posts in a channel
        if organisation:
            org = Organisation(f"org:{organisation}", organisation)
        else:
            where = message.recipient.removeprefix("slack:") or message.chat_channel  # "T1/C1"
            org = Organisation(f"slack:{where}", f"Slack channel {message.chat_channel}")
    else:
        local, at, domain = message.sender.rpartition("@")
        domain = mail_domain(domain)
        authenticated = auth is not None and auth.authenticated
        if not (local and at and domain.strip(".")):
            org = Organisation("mail:no sender", "mail without a sender address")
        elif authenticated and organisation:
            org = Organisation(f"org:{organisation}", organisation)
        elif authenticated and not policy.is_public_domain(domain):
            org = Organisation(f"domain:{domain}", domain)
        else:  # a public mail domain's user; or anyone could have written this From
            address = personal_address(message.sender)
            org = Organisation(f"address:{address}", address)
        if auth is not None and not auth.authenticated:  # apart from the authenticated mail
            org = Organisation(org.key + UNAUTHENTICATED, org.label + UNAUTHENTICATED)
    return Organisation(org.key[:KEY_LENGTH], org.label)


class Hold(StrEnum):
    """Why an incident did not page."""

    CEILING = "ceiling"  # the global ceiling: nobody pages this hour
    ORGANISATION = "organisation"  # this organisation's share: others still page


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    kind: str  # SUMMARY or ORGANISATION_SUMMARY
    subject: str
    body: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Paging:
    """The decision for one incident: page the lead, or hold the page and say why."""

    held: Hold | None  # None: page
    note: str = ""  # for the ticket when held: why, truly
    summary: Summary | None = None  # the summary to queue with this hold (the first this hour)

    @property
    def page(self) -> bool:
        return self.held is None


def decide(
    counts: PagingCounts,
    organisation: Organisation,
    *,
    per_hour: int,
    per_organisation: int,
    reference: str,
) -> Paging:
    """Whether the incident on ticket ``reference`` pages, given what the lead was sent in the
    last hour (``counts``, for ``organisation``)."""
    label = organisation.label
    if counts.alerts >= per_hour:
        told = "the lead was sent this hour's summary" if counts.summary_sent else "one summary goes to the lead"
        note = (
            f"IRT alert not paged: the global ceiling is reached ({counts.alerts} alerts in the last hour, "
            f"of {per_hour} an hour for all organisations; {counts.alerts_for_organisation} of them for {label}); "
            f"{told}"
        )
        summary = None
        if not counts.summary_sent:
            summary = Summary(
                kind=SUMMARY,
                subject=f"[SECURITY] IRT alert ceiling reached: {counts.alerts} alerts in the last hour",
                body=(
                    f"intake has sent {counts.alerts} security alerts in the last hour, its configured ceiling.\n"
                    "Further suspected incidents in this hour, from any organisation, are marked Severity 1\n"
                    "on their tickets but not paged one by one. See them with: intake tickets list\n"
                    f"The first one not paged: {reference} (from {label})\n"
                ),
            )
        return Paging(held=Hold.CEILING, note=note, summary=summary)
    if counts.alerts_for_organisation >= per_organisation:
        paged, noun = counts.alerts_for_organisation, organisation.noun
        told = (
            f"the lead was sent this hour's summary for {label}"
            if counts.organisation_summary_sent
            else f"a summary naming {label} goes to the lead"
        )
        note = (
            f"IRT alert not paged: {label} has had its share ({paged} alerts for it "
            f"in the last hour, of {per_organisation} an hour for one {noun}); other {noun}s "
            f"still page; {told}"
        )
        summary = None
        if not counts.organisation_summary_sent:
            summary = Summary(
                kind=ORGANISATION_SUMMARY,
                # The number is the alerts that paged; those held are the ones still to come.
                subject=f"[SECURITY] IRT alerts for {label} held after {paged} paged in the last hour",
                body=(
                    f"intake has paged you {paged} times in the last hour for suspected\n"
                    f"security incidents from {label}, its share for one {noun}.\n"
                    f"Further suspected incidents from {label} in this hour are marked Severity 1 on their\n"
                    f"tickets but not paged one by one. Other {noun}s still page, up to\n"
                    f"{per_hour} alerts an hour in all. See them with: intake tickets list\n"
                    f"The first one not paged: {reference}\n"
                ),
            )
        return Paging(held=Hold.ORGANISATION, note=note, summary=summary)
    return Paging(held=None)
