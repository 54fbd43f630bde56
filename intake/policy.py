"""The support policy intake keeps: severity levels, their response targets, what a report needs.

Defaults come from the CaliberMind support policy (``shared/policies``): four severity levels
with initial-response targets of 30 minutes, 1 hour, 8 hours and 24 hours, and the "How to
Report a Problem" checklist. A team replaces them through configuration; nothing here reads
configuration itself. A target is calendar time or business time (``intake.businesstime``):
"2 business days" counts on the policy's :class:`BusinessCalendar`, and so does every target
of a plan whose support runs in business hours only (Mindful's Standard support).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from intake.businesstime import BusinessCalendar, BusinessTime, Target, as_business_time, describe_business_time
from intake.errors import ConfigError
from intake.model import InboundMessage, Severity


@dataclass(frozen=True, slots=True)
class Level:
    severity: Severity
    name: str
    definition: str
    # Target name -> time allowed from when the customer wrote ("initial_response" first), in
    # calendar or business time.
    targets: Mapping[str, Target]

    @property
    def initial_response(self) -> Target:
        return next(iter(self.targets.values()))


def _minutes(m: int) -> timedelta:
    return timedelta(minutes=m)


DEFAULT_LEVELS: tuple[Level, ...] = (
    Level(
        Severity.S1,
        "Severity 1",
        "Service impairment impacting all core systems and all users",
        {"initial_response": _minutes(30)},
    ),
    Level(
        Severity.S2,
        "Severity 2",
        "Service impairment impacting an entire core system or an entire organization",
        {"initial_response": _minutes(60)},
    ),
    Level(
        Severity.S3,
        "Severity 3",
        "Service impairment impacting a portion of a core system or a portion of an organization",
        {"initial_response": _minutes(8 * 60)},
    ),
    Level(
        Severity.S4,
        "Severity 4",
        "Service impairment impacting a single user or a vendor system",
        {"initial_response": _minutes(24 * 60)},
    ),
)

# Mail providers anyone can sign up to: their domain says nothing about a customer organisation.
PUBLIC_MAIL_DOMAINS: frozenset[str] = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "yahoo.es",
        "yahoo.co.uk",
        "ymail.com",
        "hotmail.com",
        "hotmail.es",
        "hotmail.co.uk",
        "outlook.com",
        "outlook.es",
        "live.com",
        "msn.com",
        "aol.com",
        "icloud.com",
        "me.com",
        "mac.com",
        "proton.me",
        "protonmail.com",
        "gmx.com",
        "gmx.net",
        "gmx.de",
        "web.de",
        "mail.com",
        "yandex.ru",
        "yandex.com",
        "zoho.com",
        "fastmail.com",
        "tutanota.com",
        "qq.com",
        "163.com",
        "126.com",
        "mail.ru",
        # Internet providers' mailboxes, and more free ones: anyone who pays for a line or signs up.
        "orange.fr",
        "wanadoo.fr",
        "free.fr",
        "sfr.fr",
        "laposte.net",
        "t-online.de",
        "freenet.de",
        "libero.it",
        "virgilio.it",
        "tiscali.it",
        "btinternet.com",
        "sky.com",
        "virginmedia.com",
        "comcast.net",
        "verizon.net",
        "att.net",
        "sbcglobal.net",
        "cox.net",
        "charter.net",
        "bigpond.com",
        "shaw.ca",
        "rogers.com",
        "naver.com",
        "daum.net",
        "rediffmail.com",
        "seznam.cz",
        "wp.pl",
        "o2.pl",
        "interia.pl",
        "rambler.ru",
        "bk.ru",
        "list.ru",
        "inbox.ru",
        "pm.me",
        "tuta.io",
        "hey.com",
        "gmx.ch",
        "gmx.at",
        # Smaller mailbox providers and forwarders, as public: their users are no organisation.
        "posteo.de",
        "posteo.net",
        "mailbox.org",
        "protonmail.ch",
        "duck.com",
        "tutanota.de",
        "tuta.com",
        "mailfence.com",
        "runbox.com",
        "hushmail.com",
        "disroot.org",
        "riseup.net",
    }
)

# Providers that give mailboxes under many country domains (hotmail.fr, yahoo.co.jp, gmx.at):
# "<brand>.<country suffix>" is theirs whatever the suffix.
PUBLIC_MAIL_BRANDS: frozenset[str] = frozenset(
    {"gmail", "googlemail", "yahoo", "ymail", "hotmail", "outlook", "live", "msn", "aol", "gmx", "yandex", "zoho"}
)
# A country suffix: "fr", "de", "co.uk", "com.br" (one or two labels of at most three letters).
_COUNTRY_SUFFIX = re.compile(r"[a-z]{2,3}(?:\.[a-z]{2,3})?")


@dataclass(frozen=True, slots=True)
class Plan:
    """A support plan and the channels it is entitled to (CaliberMind: Slack is for managed plans)."""

    name: str
    channels: frozenset[str]
    # Support in business hours only (Mindful's Standard support): every target of the plan
    # counts in business time, a calendar one read as business time (1 hour: 1 business hour).
    business_hours: bool = False


DEFAULT_PLANS: Mapping[str, Plan] = {
    "standard": Plan("standard", frozenset({"email"})),
    "managed": Plan("managed", frozenset({"email", "slack"})),
}

# The HotSchedules escalation process: Tier I -> ... -> COO.
DEFAULT_CHAIN: tuple[str, ...] = (
    "Tier I",
    "Tier II",
    "Tier III",
    "Support Manager",
    "Customer Success Manager",
    "Director, Customer Support",
    "VP, Customer Support",
    "COO",
)


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    contact: str = ""  # an email address, or "" when the step has no contact of its own


@dataclass(frozen=True, slots=True)
class Policy:
    levels: tuple[Level, ...] = DEFAULT_LEVELS
    default_severity: Severity = Severity.S3
    public_mail_domains: frozenset[str] = PUBLIC_MAIL_DOMAINS
    # Organisation name -> its mail domains.
    organisations: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    plans: Mapping[str, Plan] = field(default_factory=lambda: dict(DEFAULT_PLANS))
    organisation_plans: Mapping[str, str] = field(default_factory=dict)  # organisation -> plan name
    default_plan: str = "standard"
    chain: tuple[Step, ...] = tuple(Step(n) for n in DEFAULT_CHAIN)
    escalation_cooldown: timedelta = timedelta(hours=1)
    about_to_miss: timedelta = timedelta(minutes=10)  # lead time of the "about to miss" notice
    calendar: BusinessCalendar | None = None  # when business time counts; needed by business targets

    def __post_init__(self) -> None:
        if self.calendar is None and (
            any(p.business_hours for p in self.plans.values())
            or any(isinstance(t, BusinessTime) for lvl in self.levels for t in lvl.targets.values())
        ):
            raise ConfigError("targets count in business time, but the policy has no business calendar")

    def level(self, severity: Severity) -> Level:
        for lvl in self.levels:
            if lvl.severity == severity:
                return lvl
        raise KeyError(severity)

    def targets(self, severity: Severity, plan: str | None = None) -> dict[str, Target]:
        """The targets of a severity as they count for a plan (by name; None: calendar time as
        written)."""
        targets = self.level(severity).targets
        known = self.plans.get(plan) if plan is not None else None
        if known is not None and known.business_hours:
            return {n: t if isinstance(t, BusinessTime) else as_business_time(t) for n, t in targets.items()}
        return dict(targets)

    def target(self, severity: Severity, plan: str | None = None) -> Target:
        """The initial-response target (the first one)."""
        return next(iter(self.targets(severity, plan).values()))

    def due_after(self, since: datetime, target: Target) -> datetime:
        if isinstance(target, timedelta):
            return since + target
        assert self.calendar is not None  # __post_init__: business targets come with a calendar
        return self.calendar.add(since, target)

    def due(self, severity: Severity, since: datetime, plan: str | None = None) -> datetime:
        return self.due_after(since, self.target(severity, plan))

    def deadlines(self, severity: Severity, since: datetime, plan: str | None = None) -> dict[str, datetime]:
        """Every target the policy names for this severity, as due times from ``since``."""
        return {name: self.due_after(since, t) for name, t in self.targets(severity, plan).items()}

    def show_time(self, when: datetime) -> str:
        """A due time as staff read it: in the business calendar's zone when there is one
        ("2026-12-09T16:00+01:00 (Europe/Madrid)"), else as stored (UTC)."""
        if self.calendar is None:
            return when.isoformat(timespec="minutes")
        return f"{when.astimezone(self.calendar.zone).isoformat(timespec='minutes')} ({self.calendar.zone})"

    def organisation_of(self, address: str) -> str | None:
        """The configured organisation an address belongs to (by domain or parent domain)."""
        domain = address.rpartition("@")[2].lower()
        for org, domains in self.organisations.items():
            for d in domains:
                if domain == d or domain.endswith("." + d):
                    return org
        return None

    def is_public_domain(self, domain: str) -> bool:
        return is_public_mail_domain(domain, self.public_mail_domains)

    def plan_of(self, organisation: str | None) -> Plan:
        name = self.organisation_plans.get(organisation or "", self.default_plan)
        return self.plans.get(name) or Plan(name, frozenset({"email"}))

    def entitled(self, organisation: str | None, channel: str) -> bool:
        return channel in self.plan_of(organisation).channels


_UNITS = {
    "en": {"day": ("day", "days"), "hour": ("hour", "hours"), "minute": ("minute", "minutes")},
    "es": {"day": ("día", "días"), "hour": ("hora", "horas"), "minute": ("minuto", "minutos")},
}


def describe_target(target: Target, language: str = "en") -> str:
    """'30 minutes', '1 hour', '8 hours', '2 days', '2 business days' (or in Spanish: '30 minutos',
    '1 hora', '2 días hábiles')."""
    if isinstance(target, BusinessTime):
        return describe_business_time(target, language)
    delta = target
    minutes = int(delta.total_seconds() // 60)
    if minutes % (24 * 60) == 0 and minutes >= 48 * 60:
        n, unit = minutes // (24 * 60), "day"
    elif minutes % 60 == 0:
        n, unit = minutes // 60, "hour"
    else:
        n, unit = minutes, "minute"
    one, many = _UNITS.get(language, _UNITS["en"])[unit]
    return f"{n} {one if n == 1 else many}"


# --- "How to Report a Problem": which details a message lacks -------------------------------

_MONTHS = {
    "jan",
    "january",
    "feb",
    "february",
    "mar",
    "march",
    "apr",
    "april",
    "may",
    "jun",
    "june",
    "jul",
    "july",
    "aug",
    "august",
    "sep",
    "sept",
    "september",
    "oct",
    "october",
    "nov",
    "november",
    "dec",
    "december",
    "enero",
    "febrero",
    "marzo",
    "abril",
    "mayo",
    "junio",
    "julio",
    "agosto",
    "septiembre",
    "setiembre",
    "octubre",
    "noviembre",
    "diciembre",
}
_DAY_WORDS = {
    "today",
    "yesterday",
    "tonight",
    "morning",
    "afternoon",
    "evening",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "am",
    "pm",
    "utc",
    "gmt",
    "est",
    "pst",
    "cet",
    "hoy",
    "ayer",
    "manana",
    "tarde",
    "noche",
    "lunes",
    "martes",
    "miercoles",
    "jueves",
    "viernes",
    "sabado",
    "domingo",
}


_SCAN = 20_000  # characters of a message looked at for the checklist: the request is at the top
_WORDS = re.compile(r"[^\W_]+")
# Fixed patterns with bounded repetition: linear in the text, whatever the input.
# A phone number: an optional "+" and "(", then 7-15 digits with up to two of " ().-/" between
# them, not inside a longer run of digits. Written as
#     (?<!\d)\+?\(?\d(?:[ ().\-/]{0,2}\d){6,14}(?!\d)
# but with the first character consumed before the look-behind, so that the engine skips
# ahead to the next "+", "(" or digit instead of trying the look-behind at every position.
_PHONE = re.compile(r"(?:\+(?<!\d.)\(?\d|\((?<!\d.)\d|\d(?<!\d\d))(?:[ ().\-/]{0,2}\d){6,14}(?!\d)")
_CLOCK_OR_DATE = re.compile(r"\d{1,4}[:/.\-]\d{1,2}")
# A URL: "http://", "https://" or "www." at the start of a word, in any case. Only tried where
# a "://" or a "www." occurs (see _has_url).
_URL = re.compile(r"https?://|\bwww\.", re.IGNORECASE)
_ACCENTS = str.maketrans("áàâäãåéèêëíìîïóòôöõúùûüñç", "aaaaaaeeeeiiiiooooouuuunc")


def _fold(text: str) -> str:
    folded = text.casefold()
    return folded if folded.isascii() else folded.translate(_ACCENTS)  # accents are not ASCII


def _has_phone(text: str) -> bool:
    """A run of 7-15 digits written with spaces, dots, dashes, brackets or a leading +."""
    return _PHONE.search(text) is not None


def _has_url(text: str) -> bool:
    """Whether ``_URL`` occurs in ``text``, trying it only where it can match.

    Tried at every position, the case-insensitive alternation costs ~0.1 µs a character. A
    match holds a "://" (scheme) or starts at a "www." in some mix of case ("w" and "W" are
    the only characters that match "w" without case), so those places are found with plain
    substring searches and the pattern is tried there alone.
    """
    find = text.find
    at = find("://")
    while at >= 0:
        if _URL.search(text, max(0, at - 5), at + 3):  # "https" is five characters before
            return True
        at = find("://", at + 1)
    lower = text.lower()
    if len(lower) != len(text):  # "İ" lower-cases to two characters: positions would shift
        return _URL.search(text) is not None
    at = lower.find("www.")
    while at >= 0:
        if _URL.match(text, at):
            return True
        at = lower.find("www.", at + 1)
    return False


# A host name before a path, as people paste an address without its scheme:
# "app.example.com/settings", "acme.example.co.uk:8443/login". Labels of letters, digits and
# inner dashes; the last one (the top-level domain) letters only.
_HOST = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}", re.IGNORECASE)
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
_MAX_SLASHES = 200  # slashes looked at: a text full of dates ("03/12") stays cheap


def _has_host_path(text: str) -> bool:
    """A URL written without its scheme: a host name (and port) right before a "/".

    Tried only at slashes: the host is the run of host characters just before one (or before
    its ":port"); it must be a whole host name, not part of a longer word nor of a mail
    address (``jo@example.com/``).
    """
    find = text.find
    at = find("/", 1)  # a "/" that starts the text has no host before it
    looked = 0
    while at > 0 and looked < _MAX_SLASHES:
        looked += 1
        end = at
        while end > 0 and at - end < 5 and text[end - 1].isdigit():  # a port
            end -= 1
        if end == at or end == 0 or text[end - 1] != ":":
            end = at
        else:
            end -= 1
        start = end
        floor = max(0, end - 253)
        while start > floor and text[start - 1] in _HOST_CHARS:
            start -= 1
        while start < end and not text[start].isalnum():  # ".example.com" or "-example.com"
            start += 1
        before = text[start - 1] if start else " "
        if before != "@" and not before.isalnum() and _HOST.fullmatch(text, start, end):
            return True
        at = find("/", at + 1)
    return False


# A company named with its legal form, as signatures write it: "Globex Corporation",
# "Iberlogística S.L.", "Sakura Trading Co., Ltd.", "Contoso GmbH". Case matters (a capitalised
# name before the form; "ltd edition" is no company). The name is a bounded word that starts
# where a word starts, so that the search stays linear whatever the text.
_LEGAL_FORM = re.compile(
    r"(?<![\w&'.-])[A-Z][\w&'.-]{1,40},? (?:Inc|LLC|L\.L\.C|Ltd|Limited|Corp|Corporation|Co|Company|GmbH|AG|KG|"
    r"S\.A|SA|S\.L|SL|S\.L\.U|SLU|SAS|S\.A\.S|SARL|S\.r\.l|Srl|S\.p\.A|SpA|B\.V|BV|N\.V|NV|AB|ApS|A/S|ASA|"
    r"Oy|Oyj|K\.K|plc|PLC|LLP|Pty)(?![\w-])\.?"
)


def _has_time(folded: str) -> bool:
    if _CLOCK_OR_DATE.search(folded):
        return True
    if folded.isascii():
        # The words of ASCII text are its runs of ASCII letters and digits: split bytes with
        # everything else made a space, instead of a regex match object per word.
        words = folded.encode("ascii").translate(_ASCII_NON_WORD).split()
        return not _TIME_WORDS_ASCII.isdisjoint(words)
    return not _TIME_WORDS.isdisjoint(_WORDS.findall(folded))


_TIME_WORDS = frozenset(_MONTHS | _DAY_WORDS)
_TIME_WORDS_ASCII = frozenset(word.encode("ascii") for word in _TIME_WORDS if word.isascii())
_ASCII_NON_WORD = bytes(c if chr(c).isascii() and chr(c).isalnum() else 0x20 for c in range(256))


MISSING_LABELS: Mapping[str, str] = {
    "company": "your company name",
    "contact_name": "your name",
    "phone": "a contact phone number",
    "when": "the date and time the problem occurred (as accurately as possible)",
    "description": "a detailed description of the problem, with any error messages",
    "url": "the URL where it happened, if applicable",
}


def is_public_mail_domain(domain: str, listed: frozenset[str] = PUBLIC_MAIL_DOMAINS) -> bool:
    """A domain anyone can have a mailbox at: listed, or a listed brand under a country domain."""
    domain = domain.lower().rstrip(".")
    if domain in listed:
        return True
    brand, _, suffix = domain.partition(".")
    return brand in PUBLIC_MAIL_BRANDS and _COUNTRY_SUFFIX.fullmatch(suffix) is not None


def missing_details(message: InboundMessage, *, organisation: str | None) -> tuple[str, ...]:
    """Which items of the policy's "How to Report a Problem" list the message lacks.

    Heuristics on the message's text (its signature often carries name, company and phone):
    a person reading the acknowledgement must find the request reasonable, so anything that
    plausibly provides a detail counts as provided.
    """
    own = (message.body or message.new_text)[:_SCAN]
    text = f"{message.subject}\n{own}"
    folded = _fold(text)
    missing: list[str] = []
    if not organisation and (not message.sender_domain or is_public_mail_domain(message.sender_domain)):
        if "company" not in folded and "empresa" not in folded and not _LEGAL_FORM.search(text):
            missing.append("company")
    if not message.sender_name.strip() and "\n" not in own.strip()[-200:]:
        missing.append("contact_name")
    if not _has_phone(text):
        missing.append("phone")
    if not _has_time(folded):
        missing.append("when")
    if len(own.split(None, 24)) < 25:  # fewer than 25 words (split no further than that)
        missing.append("description")
    if not _has_url(text) and not _has_host_path(text):
        missing.append("url")
    return tuple(missing)
