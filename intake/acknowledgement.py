"""What intake writes back: the customer's acknowledgement and the IRT lead's alert.

Texts live in template files (``intake/data/templates/<language>/*.txt``, ``$name``
placeholders) so a team can edit them; :class:`Templates` checks at start-up that every file
exists and uses only the placeholders it is given, so a typo stops start-up instead of a
customer receiving ``$refrence``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from intake.errors import ConfigError
from intake.headers import clean_header_text
from intake.model import InboundMessage, OutgoingChat, OutgoingEmail, RuleHit, Severity
from intake.policy import MISSING_LABELS, Policy, describe_target
from intake.ports import TicketFacts

# Template name -> placeholders it may use (and must use, for the starred ones).
TEMPLATE_FIELDS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = {
    "acknowledgement": (
        frozenset(
            {
                "name",
                "reference",
                "severity",
                "severity_definition",
                "response_target",
                "security_note",
                "cc_note",
                "missing_details",
                "support_address",
                "limit_note",
            }
        ),
        frozenset({"reference"}),
    ),
    "security-note": (frozenset({"reference"}), frozenset()),
    "cc-note": (frozenset({"support_address"}), frozenset()),
    "limit-note": (frozenset(), frozenset()),
    "missing-details": (frozenset({"items"}), frozenset({"items"})),
    "irt-alert": (
        frozenset({"reference", "customer", "requester", "channel", "subject", "received_at", "evidence", "excerpt"}),
        frozenset({"reference"}),
    ),
    "chat-acknowledgement": (
        frozenset(
            {
                "reference",
                "severity",
                "severity_definition",
                "response_target",
                "alert_note",
                "security_note",
                "missing_details",
            }
        ),
        frozenset({"reference"}),
    ),
    "chat-alert-note": (frozenset({"support_address"}), frozenset()),
    "irt-chat-alert": (
        frozenset({"reference", "customer", "requester", "channel", "subject", "rules", "excerpt"}),
        frozenset({"reference"}),
    ),
}

AUTO_SUBMITTED = ("Auto-Submitted", "auto-replied")
_RE_PREFIX = re.compile(r"^\s*(?:(?:re|aw|sv|vs|antw|r|rif|tr|fw|fwd|wg|rv|enc)\s*(?:\[\d+\])?\s*:\s*)+", re.I)


class Templates:
    def __init__(self, texts: Mapping[str, Template]) -> None:
        self._texts = dict(texts)

    @classmethod
    def load(cls, directory: str | Path | None = None, language: str = "en") -> Templates:
        base = (
            Path(directory) / language
            if directory
            else Path(str(resources.files("intake").joinpath("data", "templates", language)))
        )
        texts: dict[str, Template] = {}
        for name, (allowed, required) in TEMPLATE_FIELDS.items():
            path = base / f"{name}.txt"
            try:
                source = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"template {path}: cannot be read ({exc.strerror or exc})") from exc
            tpl = Template(source)
            if not tpl.is_valid():
                raise ConfigError(f"template {path}: invalid placeholder syntax (a lone '$'? write '$$')")
            used = set(tpl.get_identifiers())
            unknown = used - allowed
            if unknown:
                raise ConfigError(
                    f"template {path}: unknown placeholder(s) {', '.join('$' + u for u in sorted(unknown))}; "
                    f"known: {', '.join('$' + a for a in sorted(allowed))}"
                )
            absent = required - used
            if absent:
                raise ConfigError(
                    f"template {path}: missing required placeholder(s) {', '.join('$' + a for a in sorted(absent))}"
                )
            texts[name] = tpl
        return cls(texts)

    def render(self, template: str, /, **values: str) -> str:
        return self._texts[template].substitute(values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbound:
    """How outgoing mail is addressed and marked (from the composition root)."""

    support_addresses: tuple[str, ...]
    from_address: str
    from_name: str = "Support"
    envelope_from: str = ""  # "" = null reverse-path (RFC 3834); or a dedicated bounce address
    message_id_domain: str = "intake.invalid"
    loop_header: str = "X-Intake-Loop"
    loop_token: str = "intake"
    subject_tag: str = "[{reference}]"

    @property
    def primary_address(self) -> str:
        return self.support_addresses[0] if self.support_addresses else self.from_address


def new_message_id(reference: str, domain: str) -> str:
    """Our Message-IDs name the ticket and carry 64 random bits, so they cannot be guessed."""
    return f"{reference.lower()}.{secrets.token_hex(8)}@{domain}"


def reply_subject(subject: str, tag: str) -> str:
    base = clean_header_text(subject, max_length=160)
    if tag.lower() in base.lower():
        core = _RE_PREFIX.sub("", base)
        return f"Re: {core}" if core else tag
    core = _RE_PREFIX.sub("", base)
    return f"Re: {core} {tag}" if core else f"Your support request {tag}"


def render_acknowledgement(
    *,
    templates: Templates,
    outbound: Outbound,
    policy: Policy,
    message: InboundMessage,
    ticket: TicketFacts,
    missing: Sequence[str],
    support_in_cc_only: bool,
    last_before_limit: bool = False,
) -> OutgoingEmail:
    level = policy.level(ticket.severity)
    tag = outbound.subject_tag.format(reference=ticket.reference)
    security_note = templates.render("security-note", reference=ticket.reference) if ticket.security else ""
    cc_note = (
        templates.render("cc-note", support_address=message.recipient or outbound.primary_address)
        if support_in_cc_only
        else ""
    )
    missing_text = (
        templates.render("missing-details", items="\n".join(f"  - {MISSING_LABELS[m]}" for m in missing))
        if missing
        else ""
    )
    body = templates.render(
        "acknowledgement",
        name=clean_header_text(message.sender_name, max_length=80) or "there",
        reference=ticket.reference,
        severity=level.name,
        severity_definition=level.definition,
        response_target=describe_target(level.initial_response),
        security_note=security_note,
        cc_note=cc_note,
        missing_details=missing_text,
        support_address=message.recipient or outbound.primary_address,
        limit_note=templates.render("limit-note") if last_before_limit else "",
    )
    refs = tuple(message.references[-10:]) + ((message.message_id,) if message.message_id else ())
    return OutgoingEmail(
        to=(message.sender,),
        subject=reply_subject(message.subject, tag),
        body=body,
        message_id=new_message_id(ticket.reference, outbound.message_id_domain),
        from_address=message.recipient or outbound.from_address,
        from_name=outbound.from_name,
        envelope_from=outbound.envelope_from,
        in_reply_to=message.message_id or None,
        references=refs,
        headers=(AUTO_SUBMITTED, (outbound.loop_header, outbound.loop_token), ("Precedence", "auto_reply")),
    )


def _evidence_lines(hits: Sequence[RuleHit]) -> str:
    lines = []
    for h in hits:
        neg = "  [possibly negated]" if h.negated else ""
        lines.append(f'  - {h.rule} ({h.field}): "{h.phrase}"{neg}\n      ...{h.excerpt}...')
    return "\n".join(lines) or "  (none)"


def render_irt_alert(
    *,
    templates: Templates,
    outbound: Outbound,
    to: str,
    message: InboundMessage,
    ticket: TicketFacts,
    hits: Sequence[RuleHit],
    received_at: str,
) -> OutgoingEmail:
    excerpt_src = (message.new_text or message.body).strip()
    excerpt = "\n".join("  > " + line for line in excerpt_src[:800].splitlines()[:15])
    body = templates.render(
        "irt-alert",
        reference=ticket.reference,
        customer=ticket.organisation or message.sender_domain or "unknown",
        requester=f"{message.sender_name} <{message.sender}>" if message.sender_name else message.sender,
        channel=str(message.channel),
        subject=clean_header_text(message.subject),
        received_at=received_at,
        evidence=_evidence_lines(hits),
        excerpt=excerpt or "  (empty)",
    )
    subject = f"[SECURITY] {Severity.S1.label} suspected incident {ticket.reference}: " + clean_header_text(
        message.subject or "(no subject)", max_length=120
    )
    return OutgoingEmail(
        to=(to,),
        subject=subject,
        body=body,
        message_id=new_message_id(ticket.reference, outbound.message_id_domain),
        from_address=outbound.from_address,
        from_name=outbound.from_name + " (intake)",
        envelope_from=outbound.envelope_from,
        headers=(
            ("Auto-Submitted", "auto-generated"),
            (outbound.loop_header, outbound.loop_token),
            ("X-Priority", "1"),
        ),
    )


def render_chat_acknowledgement(
    *,
    templates: Templates,
    outbound: Outbound,
    policy: Policy,
    message: InboundMessage,
    ticket: TicketFacts,
    missing: Sequence[str],
) -> OutgoingChat:
    """The in-thread reply to a new chat ticket (Slack: ``thread_ts`` = the message's ts)."""
    level = policy.level(ticket.severity)
    alert_note = (
        templates.render("chat-alert-note", support_address=outbound.primary_address) + "\n"
        if ticket.severity <= Severity.S2
        else ""
    )
    missing_text = (
        templates.render("missing-details", items="\n".join(f"  - {MISSING_LABELS[m]}" for m in missing))
        if missing
        else ""
    )
    text = templates.render(
        "chat-acknowledgement",
        reference=ticket.reference,
        severity=level.name,
        severity_definition=level.definition,
        response_target=describe_target(level.initial_response),
        alert_note=alert_note,
        security_note=templates.render("security-note", reference=ticket.reference).strip() + "\n"
        if ticket.security
        else "",
        missing_details=missing_text,
    )
    assert message.chat_channel is not None
    return OutgoingChat(channel=message.chat_channel, text=text, thread_ts=message.chat_ts)


def render_irt_chat_alert(
    *, templates: Templates, user: str, message: InboundMessage, ticket: TicketFacts, hits: Sequence[RuleHit]
) -> OutgoingChat:
    """The IRT lead's direct message (Slack: chat.postMessage to the user id opens the DM)."""
    excerpt = (message.new_text or message.body).strip()[:300]
    rules = ", ".join(dict.fromkeys(f"{h.rule}{' (possibly negated)' if h.negated else ''}" for h in hits))
    text = templates.render(
        "irt-chat-alert",
        reference=ticket.reference,
        customer=ticket.organisation or message.sender_domain or "unknown",
        requester=message.sender_name or message.sender,
        channel=str(message.channel),
        subject=clean_header_text(message.subject) or "(none)",
        rules=rules or "(none)",
        excerpt="> " + excerpt.replace("\n", "\n> ") if excerpt else "",
    )
    return OutgoingChat(channel=user, text=text)
