"""What intake writes: acknowledgements, escalation replies, IRT alerts, triage and SLA notices.

Texts live in template files, one folder per language (``intake/data/templates/<lang>/``,
``$name`` placeholders), so a team can edit them and add languages. Customer-facing texts must
exist in every language folder; staff-facing ones (alerts, triage, SLA, escalation contact)
only in the default language. :meth:`TemplateBook.load` checks at start-up that every file
exists and uses only the placeholders it is given, so a typo stops start-up instead of a
customer receiving ``$refrence``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from string import Template

from intake.errors import ConfigError
from intake.headers import REPLY_PREFIX, clean_header_text
from intake.model import STAFF_NOTE_ID_PREFIX, InboundMessage, OutgoingChat, OutgoingEmail, RuleHit, Severity
from intake.policy import MISSING_LABELS, Plan, Policy, describe_target
from intake.ports import TicketFacts


@dataclass(frozen=True, slots=True)
class Spec:
    allowed: frozenset[str]
    required: frozenset[str] = frozenset()
    customer: bool = True  # needed in every language
    # Added after template folders of one's own existed: a folder without it keeps loading, and
    # the note is left out (an English note in a Spanish letter would be worse).
    optional: bool = False


def _spec(allowed: str, required: str = "", *, customer: bool = True, optional: bool = False) -> Spec:
    return Spec(frozenset(allowed.split()), frozenset(required.split()), customer, optional)


TEMPLATES: Mapping[str, Spec] = {
    "acknowledgement": _spec(
        "name reference severity severity_definition response_target security_note entitlement_note cc_note "
        "attachments_note missing_details support_address limit_note reference_note severity_note",
        "reference",
    ),
    "reference-note": _spec("typed", optional=True),
    "severity-note": _spec("", optional=True),
    "security-raised": _spec("name reference security_note", "reference", optional=True),
    "security-note": _spec("reference"),
    "cc-note": _spec("support_address"),
    "limit-note": _spec("period"),
    "attachments-note": _spec("files", "files"),
    "entitlement-note": _spec("plan channels channel"),
    "missing-details": _spec("items", "items"),
    "chat-acknowledgement": _spec(
        "reference severity severity_definition response_target alert_note security_note entitlement_note "
        "missing_details severity_note",
        "reference",
    ),
    "chat-alert-note": _spec("support_address"),
    "escalation-customer": _spec("name reference step contact_line", "reference step"),
    "chat-escalation": _spec("reference step", "reference step"),
    "irt-alert": _spec(
        "reference customer requester channel subject received_at evidence excerpt customer_note",
        "reference",
        customer=False,
    ),
    "irt-chat-alert": _spec("reference customer requester channel subject rules excerpt", "reference", customer=False),
    "triage": _spec(
        "security_banner reference severity channel customer plan requester subject response_due excerpt",
        "reference",
        customer=False,
    ),
    "escalation-contact": _spec(
        "reference step previous asked_by customer requester severity subject excerpt", "reference step", customer=False
    ),
    "sla-notice": _spec(
        "what reference severity target due customer requester subject", "reference what", customer=False
    ),
}

AUTO_SUBMITTED = ("Auto-Submitted", "auto-replied")
_RE_PREFIX = re.compile(rf"^\s*(?:{REPLY_PREFIX}\s*)+", re.I)


class Templates:
    """The templates of one language (staff-facing ones come from the default language)."""

    def __init__(
        self,
        language: str,
        texts: Mapping[str, Template],
        labels: Mapping[str, str],
        levels: Mapping[int, tuple[str, str]] | None = None,
    ) -> None:
        self.language = language
        self._texts = dict(texts)
        self.labels = dict(labels)
        self.levels = dict(levels or {})

    def render(self, template: str, /, **values: str) -> str:
        return self._texts[template].substitute(values)

    def level_text(self, policy: Policy, severity: Severity) -> tuple[str, str]:
        """(name, definition) of a severity level, translated when this language says so."""
        if int(severity) in self.levels:
            return self.levels[int(severity)]
        lvl = policy.level(severity)
        return lvl.name, lvl.definition


class TemplateBook:
    """Every language's templates; ``get`` falls back to the default language."""

    def __init__(self, by_language: Mapping[str, Templates], default: str = "en") -> None:
        self.by_language = dict(by_language)
        self.default = default

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.by_language)

    def get(self, language: str | None) -> Templates:
        return self.by_language.get(language or self.default) or self.by_language[self.default]

    @classmethod
    def load(cls, directory: str | Path | None = None, default: str = "en") -> TemplateBook:
        base = Path(directory) if directory else Path(str(resources.files("intake").joinpath("data", "templates")))
        if not base.is_dir():
            raise ConfigError(f"template directory {base} does not exist")
        languages = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if default not in languages:
            raise ConfigError(f"template directory {base} has no '{default}' folder (the default language)")
        defaults = _load_language(base / default, staff=True)
        book: dict[str, Templates] = {}
        for lang in [default, *(x for x in languages if x != default)]:
            own = defaults if lang == default else _load_language(base / lang, staff=False)
            texts = {**{k: v for k, v in defaults[0].items() if not TEMPLATES[k].customer}, **own[0]}
            book[lang] = Templates(lang, texts, own[1], own[2])
        return cls(book, default)


def _load_language(
    folder: Path, *, staff: bool
) -> tuple[dict[str, Template], dict[str, str], dict[int, tuple[str, str]]]:
    texts: dict[str, Template] = {}
    for name, spec in TEMPLATES.items():
        if not spec.customer and not staff:
            continue
        path = folder / f"{name}.txt"
        if spec.optional and not path.exists():
            texts[name] = Template("")
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"template {path}: cannot be read ({exc.strerror or exc})") from exc
        tpl = Template(source)
        if not tpl.is_valid():
            raise ConfigError(f"template {path}: invalid placeholder syntax (a lone '$'? write '$$')")
        used = set(tpl.get_identifiers())
        unknown = used - spec.allowed
        if unknown:
            raise ConfigError(
                f"template {path}: unknown placeholder(s) {', '.join('$' + u for u in sorted(unknown))}; "
                f"known: {', '.join('$' + a for a in sorted(spec.allowed)) or 'none'}"
            )
        absent = spec.required - used
        if absent:
            raise ConfigError(
                f"template {path}: missing required placeholder(s) {', '.join('$' + a for a in sorted(absent))}"
            )
        texts[name] = tpl
    labels = _key_values(folder / "missing-labels.txt", set(MISSING_LABELS), required=True)
    levels_raw = _key_values(folder / "levels.txt", {"1", "2", "3", "4"}, required=False)
    levels: dict[int, tuple[str, str]] = {}
    for key, value in levels_raw.items():
        name, _, definition = value.partition("|")
        levels[int(key)] = (name.strip(), definition.strip())
    return texts, labels, levels


def _key_values(path: Path, keys: set[str], *, required: bool) -> dict[str, str]:
    if not path.exists():
        if required:
            raise ConfigError(f"template {path}: missing (lines of 'key: text' for {', '.join(sorted(keys))})")
        return {}
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, text = line.partition(":")
        if not sep or key.strip() not in keys or not text.strip():
            raise ConfigError(f"template {path}, line {n}: expected 'key: text' with key one of {sorted(keys)}")
        out[key.strip()] = text.strip()
    if required and set(out) != keys:
        raise ConfigError(f"template {path}: missing key(s) {', '.join(sorted(keys - set(out)))}")
    return out


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

    def staff_email(self, *, to: str, subject: str, body: str, reference: str) -> OutgoingEmail:
        """A note to our own people (IRT, triage, escalation contacts): marked auto-generated."""
        return OutgoingEmail(
            to=(to,),
            subject=clean_header_text(subject, max_length=200),
            body=body,
            message_id=STAFF_NOTE_ID_PREFIX + new_message_id(reference, self.message_id_domain),
            from_address=self.from_address,
            from_name=self.from_name + " (intake)",
            envelope_from=self.envelope_from,
            headers=(("Auto-Submitted", "auto-generated"), (self.loop_header, self.loop_token)),
        )

    def reply(self, *, message: InboundMessage, subject: str, body: str, reference: str) -> OutgoingEmail:
        """An automatic reply to a customer's message, threaded under it (RFC 3834 marked)."""
        refs = tuple(message.references[-10:]) + ((message.message_id,) if message.message_id else ())
        return OutgoingEmail(
            to=(message.sender,),
            subject=subject,
            body=body,
            message_id=new_message_id(reference, self.message_id_domain),
            from_address=message.recipient or self.from_address,
            from_name=self.from_name,
            envelope_from=self.envelope_from,
            in_reply_to=message.message_id or None,
            references=refs,
            headers=(AUTO_SUBMITTED, (self.loop_header, self.loop_token), ("Precedence", "auto_reply")),
        )


def new_message_id(reference: str, domain: str) -> str:
    """Our Message-IDs name the ticket and carry 64 random bits, so they cannot be guessed."""
    return f"{reference.lower()}.{secrets.token_hex(8)}@{domain}"


def reply_subject(subject: str, tag: str) -> str:
    base = clean_header_text(subject, max_length=160)
    core = _RE_PREFIX.sub("", base)
    if tag.lower() in base.lower():
        return f"Re: {core}" if core else tag
    return f"Re: {core} {tag}" if core else f"Your support request {tag}"


def _missing_text(templates: Templates, missing: Sequence[str]) -> str:
    if not missing:
        return ""
    items = "\n".join(f"  - {templates.labels.get(m, MISSING_LABELS[m])}" for m in missing)
    return templates.render("missing-details", items=items)


def _attachments_text(templates: Templates, message: InboundMessage) -> str:
    dropped = [a for a in message.attachments if not a.kept]
    if not dropped:
        return ""
    files = "\n".join(
        f"  - {clean_header_text(a.filename, max_length=120) or '(unnamed)'} ({a.size / 1_048_576:.1f} MB)"
        for a in dropped
    )
    return templates.render("attachments-note", files=files)


def _entitlement_text(templates: Templates, plan: Plan | None, channel: str) -> str:
    if plan is None or channel in plan.channels:
        return ""
    return templates.render(
        "entitlement-note", plan=plan.name, channels=" / ".join(sorted(plan.channels)), channel=channel
    )


def render_acknowledgement(
    *,
    templates: Templates,
    outbound: Outbound,
    policy: Policy,
    message: InboundMessage,
    ticket: TicketFacts,
    missing: Sequence[str],
    support_in_cc_only: bool,
    limit_period: timedelta | None = None,
    mistyped: str | None = None,
    plan: Plan | None = None,
) -> OutgoingEmail:
    """The acknowledgement of a new ticket. ``limit_period``: given when this is the last one
    the sender gets within that period (the flood limit). ``mistyped``: a token of the subject
    written as a reference that is not a valid one (the message opened a ticket instead of
    joining one)."""
    name, definition = templates.level_text(policy, ticket.severity)
    tag = outbound.subject_tag.format(reference=ticket.reference)
    support = message.recipient or outbound.primary_address
    body = templates.render(
        "acknowledgement",
        name=_greeting_name(message),
        reference=ticket.reference,
        severity=name,
        severity_definition=definition,
        response_target=describe_target(policy.target(ticket.severity, ticket.plan), templates.language),
        security_note=templates.render("security-note", reference=ticket.reference) if ticket.security else "",
        # Only a security incident's level is the policy's own; any other is the default or a
        # rule's guess until a specialist assigns it (the policy's words).
        severity_note="" if ticket.security else templates.render("severity-note"),
        entitlement_note=_entitlement_text(templates, plan, str(message.channel)),
        cc_note=templates.render("cc-note", support_address=support) if support_in_cc_only else "",
        attachments_note=_attachments_text(templates, message),
        missing_details=_missing_text(templates, missing),
        support_address=support,
        reference_note=templates.render("reference-note", typed=mistyped) if mistyped else "",
        limit_note=(
            templates.render("limit-note", period=describe_target(limit_period, templates.language))
            if limit_period is not None
            else ""
        ),
    )
    return outbound.reply(
        message=message, subject=reply_subject(message.subject, tag), body=body, reference=ticket.reference
    )


def render_chat_acknowledgement(
    *,
    templates: Templates,
    outbound: Outbound,
    policy: Policy,
    message: InboundMessage,
    ticket: TicketFacts,
    missing: Sequence[str],
    plan: Plan | None = None,
) -> OutgoingChat:
    """The in-thread reply to a new chat ticket (Slack: ``thread_ts`` = the message's ts)."""
    name, definition = templates.level_text(policy, ticket.severity)
    alert_note = (
        templates.render("chat-alert-note", support_address=outbound.primary_address) + "\n"
        if ticket.severity <= Severity.S2
        else ""
    )
    security_note = (
        templates.render("security-note", reference=ticket.reference).strip() + "\n" if ticket.security else ""
    )
    # As in the email: a level that is not a security incident's is a first assessment.
    severity_note = "" if ticket.security else " ".join(templates.render("severity-note").split())
    text = templates.render(
        "chat-acknowledgement",
        severity_note=severity_note + "\n" if severity_note else "",
        reference=ticket.reference,
        severity=name,
        severity_definition=definition,
        response_target=describe_target(policy.target(ticket.severity, ticket.plan), templates.language),
        alert_note=alert_note,
        security_note=security_note,
        entitlement_note=_entitlement_text(templates, plan, str(message.channel)).strip(),
        missing_details=_missing_text(templates, missing),
    )
    assert message.chat_channel is not None
    # A reply in a thread that is not a ticket yet is answered at the thread's root.
    return OutgoingChat(channel=message.chat_channel, text=text, thread_ts=message.chat_thread_ts or message.chat_ts)


def render_security_raised(
    *, templates: Templates, outbound: Outbound, message: InboundMessage, reference: str
) -> OutgoingEmail | OutgoingChat | None:
    """Tells the customer whose follow-up raised ``reference`` to a security incident that it is
    now Severity 1 and that the IRT lead will reach out (the policy's promise). None when this
    language's templates have no such text (a template folder of one's own, older than it)."""
    note = templates.render("security-note", reference=reference)
    if message.chat_channel:
        return OutgoingChat(
            channel=message.chat_channel,
            text=" ".join(note.split()),
            thread_ts=message.chat_thread_ts or message.chat_ts,
        )
    body = templates.render("security-raised", name=_greeting_name(message), reference=reference, security_note=note)
    if not body.strip():
        return None
    tag = outbound.subject_tag.format(reference=reference)
    return outbound.reply(message=message, subject=reply_subject(message.subject, tag), body=body, reference=reference)


def render_escalation_reply(
    *, templates: Templates, outbound: Outbound, message: InboundMessage, reference: str, step: str, contact: str
) -> OutgoingEmail | OutgoingChat:
    """Tells the customer who now has their ticket."""
    if message.chat_channel:
        text = templates.render("chat-escalation", reference=reference, step=step)
        return OutgoingChat(
            channel=message.chat_channel, text=text, thread_ts=message.chat_thread_ts or message.chat_ts
        )
    body = templates.render(
        "escalation-customer",
        name=_greeting_name(message),
        reference=reference,
        step=step,
        contact_line=f"({contact})\n" if contact else "",
    )
    tag = outbound.subject_tag.format(reference=reference)
    return outbound.reply(message=message, subject=reply_subject(message.subject, tag), body=body, reference=reference)


def _greeting_name(message: InboundMessage) -> str:
    """ " Alice" or "": templates write "Hello$name," so that no name reads "Hello,"."""
    name = clean_header_text(message.sender_name, max_length=80)
    # Many clients write the address itself as the display name: no one to greet by name.
    return f" {name}" if name and "@" not in name else ""


def _excerpt(message: InboundMessage, limit: int = 800, prefix: str = "  > ") -> str:
    src = (message.new_text or message.body).strip()
    return "\n".join(prefix + line for line in src[:limit].splitlines()[:15]) or prefix + "(empty)"


def _customer(ticket: TicketFacts, message: InboundMessage) -> str:
    return ticket.organisation or message.sender_domain or "unknown"


def _requester(message: InboundMessage) -> str:
    return f"{message.sender_name} <{message.sender}>" if message.sender_name else message.sender


def _evidence_lines(hits: Sequence[RuleHit]) -> str:
    lines = []
    for h in hits:
        neg = "  [possibly negated]" if h.negated else ""
        # The excerpt marks its own cuts with "…" (intake.rules): no "..." around it.
        lines.append(f'  - {h.rule} ({h.field}): "{h.phrase}"{neg}\n      {h.excerpt}')
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
    told: bool | None = True,
    why_not: str = "",
) -> OutgoingEmail:
    """``told``: whether the customer was told that the IRT lead will reach out; ``why_not``
    says why not (a follow-up by staff, automated mail...). None: unknown here (the ticket was
    a security incident before this message, and no alert went then)."""
    if told:
        customer_note = "The customer was told that the IRT lead will reach out directly."
    elif told is None:
        customer_note = (
            "The ticket was a security incident before this message, and no alert went then:"
            " whether the customer was told that the IRT lead will reach out is on the ticket."
        )
    else:
        customer_note = f"The customer has not been told that the IRT lead will reach out ({why_not})."
    body = templates.render(
        "irt-alert",
        reference=ticket.reference,
        customer=_customer(ticket, message),
        requester=_requester(message),
        channel=str(message.channel),
        subject=clean_header_text(message.subject),
        received_at=received_at,
        evidence=_evidence_lines(hits),
        excerpt=_excerpt(message),
        customer_note=customer_note,
    )
    subject = f"[SECURITY] {Severity.S1.label} suspected incident {ticket.reference}: " + clean_header_text(
        message.subject or "(no subject)", max_length=120
    )
    email = outbound.staff_email(to=to, subject=subject, body=body, reference=ticket.reference)
    return replace(email, headers=(*email.headers, ("X-Priority", "1")))


def _chat_literal(text: str) -> str:
    """``text`` escaped as Slack asks (&, <, >), so that it shows as written: no links, mentions."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_irt_chat_alert(
    *, templates: Templates, user: str, message: InboundMessage, ticket: TicketFacts, hits: Sequence[RuleHit]
) -> OutgoingChat:
    """The IRT lead's direct message (Slack: chat.postMessage to the user id opens the DM).

    What the customer wrote is shown as text: chat markup in it (a link dressed as "open the
    ticket", an @channel) must not become ours."""
    excerpt = _chat_literal((message.new_text or message.body).strip()[:300])
    rules = ", ".join(dict.fromkeys(f"{h.rule}{' (possibly negated)' if h.negated else ''}" for h in hits))
    text = templates.render(
        "irt-chat-alert",
        reference=ticket.reference,
        customer=_chat_literal(_customer(ticket, message)),
        requester=_chat_literal(message.sender_name or message.sender),
        channel=str(message.channel),
        subject=_chat_literal(clean_header_text(message.subject)) or "(none)",
        rules=rules or "(none)",
        excerpt="> " + excerpt.replace("\n", "\n> ") if excerpt else "",
    )
    return OutgoingChat(channel=user, text=text)


def render_triage(
    *,
    templates: Templates,
    policy: Policy,
    message: InboundMessage,
    ticket: TicketFacts,
    plan: Plan,
    chat: bool = False,
) -> tuple[str, str]:
    """(subject, text) of the new-ticket announcement to the support team. ``chat``: for a chat
    channel, where what the customer wrote must show as text (an emailed <!channel> pinged the
    whole triage channel; a <url|label> became a link dressed as ours)."""
    literal = _chat_literal if chat else str
    banner = "*** SUSPECTED SECURITY INCIDENT ***\n" if ticket.security else ""
    text = templates.render(
        "triage",
        security_banner=banner,
        reference=ticket.reference,
        severity=policy.level(ticket.severity).name,
        channel=str(message.channel),
        customer=literal(_customer(ticket, message)),
        plan=plan.name,
        requester=literal(_requester(message) or "(unknown)"),
        subject=literal(clean_header_text(message.subject) or "(no subject)"),
        response_due=policy.show_time(ticket.response_due),
        excerpt=literal(_excerpt(message, limit=500)),
    )
    sec = "[SECURITY] " if ticket.security else ""
    subject = f"{sec}New ticket {ticket.reference} ({policy.level(ticket.severity).name}): " + clean_header_text(
        message.subject or "(no subject)", max_length=100
    )
    return subject, text


def render_escalation_contact(
    *,
    templates: Templates,
    policy: Policy,
    message: InboundMessage,
    ticket: TicketFacts,
    step: str,
    previous: str,
    from_customer: bool = True,
) -> tuple[str, str]:
    """``from_customer``: false where one of our own people asked, in a reply to a note to staff."""
    text = templates.render(
        "escalation-contact",
        asked_by="The customer" if from_customer else "One of our own people (not the customer), in a note to staff,",
        reference=ticket.reference,
        step=step,
        previous=previous,
        customer=_customer(ticket, message),
        requester=_requester(message),
        severity=policy.level(ticket.severity).name,
        subject=clean_header_text(ticket.subject) or "(no subject)",
        excerpt=_excerpt(message),
    )
    return f"Escalated to {step}: {ticket.reference} " + clean_header_text(ticket.subject, max_length=100), text


def render_sla_notice(
    *,
    templates: Templates,
    policy: Policy,
    what: str,
    ticket: TicketFacts,
    requester: str,
    target: str,
    due: datetime,
    chat: bool = False,
) -> tuple[str, str]:
    """(subject, text) of a response-clock notice; ``chat`` as in :func:`render_triage`."""
    literal = _chat_literal if chat else str
    text = templates.render(
        "sla-notice",
        what=what,
        reference=ticket.reference,
        severity=policy.level(ticket.severity).name,
        target=target.replace("_", " "),
        due=policy.show_time(due),
        customer=literal(ticket.organisation or ticket.requester.rpartition("@")[2] or "unknown"),
        requester=literal(requester),
        subject=literal(clean_header_text(ticket.subject) or "(no subject)"),
    )
    return f"{what}: {ticket.reference} {target.replace('_', ' ')} due {policy.show_time(due)}", text
