"""Whether a suspected security incident pages the IRT lead, and whose share of the pages it takes.

The policy (CaliberMind's): every suspected security incident is Severity 1, and the Incident
Response Team lead reaches out. intake pages the lead once per incident ticket (the IRT alert)
within two hourly limits, counted in the outbox (:class:`intake.ports.PagingCounts`):

* **the organisation's share** (``Limits.irt_alerts_per_organisation``, 5 by default): an
  organisation paged for that many times in the last hour pages no more this hour. Its further
  incidents stay Severity 1 on their tickets, each ticket says why it was not paged, and one
  summary an hour names the organisation to the lead. So one customer's mail loop, a scanner
  forwarding its findings to support, or twenty "we were hacked" mails from one sender no
  longer keep another customer's incident in that hour from paging.
* **the global ceiling** (``Limits.irt_alerts_per_hour``, 20), the last resort against a flood
  from many senders at once: past it nothing pages; one summary an hour says so. It is checked
  first: when it holds, other organisations do not page either, and the note says so.

Who "an organisation" is (:func:`organisation_of`), in this order:

1. a configured customer (``[organisations.NAME] domains`` for mail, a Slack channel's
   customer): one share for all of its domains and channels, email and Slack together;
2. a Slack channel that names no customer: the channel. Not the workspace: a channel intake
   reads is in our own workspace, whose team every event names, and the author's own team is
   not always given (nor, outside Slack Connect, anyone else's);
3. mail: the sender's registrable domain (the Public Suffix List's: ``eu.mail.acme.co.uk`` is
   ``acme.co.uk``), so that subdomains, which anyone with a domain can make without end, buy
   no second share, and two customers under ``co.uk`` are not one; case and a trailing dot
   do not count, and a domain written in Unicode is the same as its ``xn--`` form;
4. on a public mail domain (``intake.policy.is_public_mail_domain``: gmail.com, yahoo.co.uk,
   ...), whose users are no organisation, the address itself, without a ``+tag`` (and, at
   Gmail, without dots, which Gmail ignores), so that one person's aliases are one share.

Where the sender's authentication is checked (``email.trusted_authserv_ids``), mail that fails
it counts apart from the authenticated mail of the same organisation: anyone can write a
customer's domain into From, and a forger must not use up the customer's share.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # storage imports the kinds: the read commands load no more than types need
    from publicsuffixlist import PublicSuffixList

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

_IP_LITERAL = re.compile(r"\[.*\]|[0-9.]+")
_GMAIL = frozenset({"gmail.com", "googlemail.com"})


@functools.cache
def _suffixes() -> PublicSuffixList:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()  # the list the package ships: read once (~0.2 s), no network


def warm() -> None:
    """Read the Public Suffix List now (start-up), not inside the first incident's transaction."""
    _suffixes()


@dataclass(frozen=True, slots=True)
class Organisation:
    """Whose share of the IRT alerts a message uses."""

    key: str  # stored with the alert and the summary, and counted by equality
    label: str  # how a ticket's note and the summary name it to people


def registrable_domain(domain: str) -> str:
    """The domain a registrant holds (``eu.acme.co.uk`` -> ``acme.co.uk``), lower-case, in its
    ASCII (``xn--``) form; the domain itself where the list names none (an address literal, a
    single label, a public suffix)."""
    domain = domain.strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # not a valid IDN: counted as written
    if "." not in domain or _IP_LITERAL.fullmatch(domain):
        return domain
    return _suffixes().privatesuffix(domain) or domain


def personal_address(address: str) -> str:
    """One mailbox however it is written: lower-case, no ``+tag``; at Gmail without dots."""
    local, _, domain = address.strip().lower().rpartition("@")
    domain = domain.rstrip(".")
    local = local.split("+", 1)[0] or local
    if domain in _GMAIL:
        local, domain = local.replace(".", "") or local, "gmail.com"
    return f"{local}@{domain}"


def organisation_of(
    message: InboundMessage, *, organisation: str | None, auth: AuthVerdict | None, policy: Policy
) -> Organisation:
    """Whose share of the IRT alerts ``message`` uses (see the module's docstring).

    ``organisation``: the configured customer the message is from, if any (the assessment's);
    ``auth``: the sender's authentication, where it is checked (None: not checked).
    """
    if organisation:
        org = Organisation(f"org:{organisation}", organisation)
    elif message.chat_channel is not None:
        where = message.recipient.removeprefix("slack:") or message.chat_channel  # "T1/C1"
        org = Organisation(f"slack:{where}", f"Slack channel {message.chat_channel}")
    else:
        local, at, domain = message.sender.rpartition("@")
        if not (local and at and domain.strip(". ")):
            org = Organisation("mail:no sender", "mail without a sender address")
        else:
            base = registrable_domain(domain)
            if policy.is_public_domain(domain) or policy.is_public_domain(base):
                address = personal_address(message.sender)
                org = Organisation(f"address:{address}", address)
            else:
                org = Organisation(f"domain:{base}", base)
    if auth is not None and not auth.authenticated:
        org = Organisation(f"{org.key} (unauthenticated)", f"{org.label} (unauthenticated)")
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
        told = (
            f"the lead was sent this hour's summary for {label}"
            if counts.organisation_summary_sent
            else f"a summary naming {label} goes to the lead"
        )
        note = (
            f"IRT alert not paged: {label} has had its share ({counts.alerts_for_organisation} alerts for it "
            f"in the last hour, of {per_organisation} an hour for one organisation); other organisations "
            f"still page; {told}"
        )
        summary = None
        if not counts.organisation_summary_sent:
            summary = Summary(
                kind=ORGANISATION_SUMMARY,
                subject=(f"[SECURITY] IRT alerts for {label} held: {counts.alerts_for_organisation} in the last hour"),
                body=(
                    f"intake has paged you {counts.alerts_for_organisation} times in the last hour for suspected\n"
                    f"security incidents from {label}, its share for one organisation.\n"
                    f"Further suspected incidents from {label} in this hour are marked Severity 1 on their\n"
                    "tickets but not paged one by one. Other organisations still page, up to\n"
                    f"{per_hour} alerts an hour in all. See them with: intake tickets list\n"
                    f"The first one not paged: {reference}\n"
                ),
            )
        return Paging(held=Hold.ORGANISATION, note=note, summary=summary)
    return Paging(held=None)
