"""Settings: one TOML file, every key with an embedded default.

The file is named by ``--config PATH`` or the ``INTAKE_CONFIG`` environment variable; with
neither, the defaults alone run intake. Validation is pydantic's: an invalid file stops
start-up with a message that names the key (``email.listen_port``) and what is wrong. Only
the composition root (``adapters.bootstrap``) and the CLI read settings.
"""

from __future__ import annotations

import os
import ssl
import tomllib
import zoneinfo
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from intake.businesstime import WEEKDAYS, BusinessCalendar, BusinessTime, as_business_time, parse_hours, parse_target
from intake.errors import ConfigError

ENV_CONFIG = "INTAKE_CONFIG"


def _default_listeners() -> int:
    """2 where this process may run on 2 cores or more (its CPU affinity), else 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def relay_tls_context(ca_file: str) -> ssl.SSLContext:
    """A client TLS context that trusts the certificates in ``ca_file`` (PEM) and no other."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load CA certificates from {ca_file!r}: {exc}") from None


def _address(value: str) -> str:
    v = value.strip().lower()
    local, at, domain = v.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in v):
        raise ValueError(f"{value!r} is not an email address")
    return v


Address = Annotated[str, AfterValidator(_address)]


class StorageSettings(_Section):
    url: str = "sqlite:///intake.db"
    max_batch: int = Field(256, ge=1, le=10_000)
    # Seconds to wait for a database lock or connection before answering "try again" (451).
    lock_timeout: float = Field(5.0, gt=0, le=120)
    # Seconds a message waits for its commit before the sender is told to retry (451 / 503).
    commit_timeout: float = Field(10.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("sqlite") or v.startswith("postgres")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return v


class EmailSettings(_Section):
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(2525, ge=1, le=65535)
    protocol: Literal["smtp", "lmtp"] = "smtp"
    support_address: Address = "support@example.com"
    # Further addresses intake answers for (each copy to a different one is its own delivery).
    extra_addresses: list[Address] = Field(default_factory=list)
    hostname: str = "intake.local"  # our name in the SMTP greeting
    # Characters that start an address extension: support+billing@ is support@ (as Postfix's and
    # Dovecot's recipient_delimiter, which Postfix uses to route it here); "" for none.
    recipient_delimiter: str = "+"
    max_message_bytes: int = Field(26_214_400, ge=1024)
    max_recipients: int = Field(50, ge=1, le=1000)
    max_attachment_bytes: int = Field(10_485_760, ge=0)
    max_attachments_total: int = Field(20_971_520, ge=0)
    command_timeout: float = Field(300.0, gt=0)  # seconds of silence before 421
    data_timeout: float = Field(600.0, gt=0)  # one DATA phase, DATA to the final dot
    session_timeout: float = Field(1800.0, gt=0)  # a whole connection, however busy
    # Worker processes that parse and assess messages beside the listener (0: in the listener,
    # the default: a worker took no more messages per second and cost CPU in hand-offs).
    parse_workers: int = Field(0, ge=0, le=16)
    # Processes that take mail in on listen_port (the first one's listening socket, shared: a
    # connection goes to whichever is free to accept it). Each parses, assesses and commits on
    # its own; the first also runs the outbox, Slack, the web page and the response clocks.
    # Default: 2 where this process may run on 2 cores or more, else 1. On 2 cores, two took
    # 21 % more messages per second than one listener with a parsing worker at 10 SMTP
    # sessions and 24 % more at 50, for the same memory (docs/benchmarks.md, fifth session).
    listener_processes: int = Field(default_factory=_default_listeners, ge=1, le=64)
    # Pin each listener process to a CPU of its own (Linux; adapters/cpus.py). "auto", the
    # default: pinned where the listener processes are as many as the CPUs intake may use (each
    # CPU has a listener either way; pinned, none moves away from its caches), else not.
    pin_listeners: bool | Literal["auto"] = "auto"
    max_sessions: int = Field(200, ge=1)
    # Default: 20 over SMTP; over LMTP max_sessions, as LMTP's one client is the MTA in front.
    # Postfix delivers 20 messages at once by default, all from one address: at a cap of 20 a
    # connection still closing got the next one "421 Too many connections", deferred minutes.
    max_sessions_per_client: int | None = Field(None, ge=1)
    shutdown_grace: float = Field(10.0, ge=0)
    reference_prefix: str = "SUP"
    subject_tag: str = "[{reference}]"
    # authserv-ids of our own MTA's Authentication-Results headers (copies from outside are ignored).
    trusted_authserv_ids: list[str] = Field(default_factory=list)
    # Acknowledge only authenticated senders or known customers. Default: on when
    # trusted_authserv_ids is set.
    require_authentication: bool | None = None

    @field_validator("pin_listeners", mode="before")
    @classmethod
    def _pin(cls, v: object) -> object:
        if v is True or v is False or v == "auto":
            return v
        raise ValueError('must be true, false or "auto"')

    @field_validator("recipient_delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        if any(c == "@" or c.isspace() or not c.isprintable() for c in v):
            raise ValueError("must be printable characters other than @ and spaces")
        return v

    @field_validator("subject_tag")
    @classmethod
    def _tag(cls, v: str) -> str:
        if "{reference}" not in v:
            raise ValueError("must contain {reference}")
        try:
            v.format(reference="SUP-0000-0000")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid format: {exc}") from None
        return v

    @property
    def sessions_per_client(self) -> int:
        """``max_sessions_per_client``, or its default for the protocol."""
        if self.max_sessions_per_client is not None:
            return self.max_sessions_per_client
        return self.max_sessions if self.protocol == "lmtp" else 20

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.support_address, *[a for a in self.extra_addresses if a != self.support_address])


class OutboundSettings(_Section):
    relay_host: str = "127.0.0.1"
    relay_port: int = Field(25, ge=1, le=65535)
    relay_username: str | None = None
    relay_password: str | None = None
    relay_starttls: bool = False
    # PEM file of the CA certificate(s) the relay's certificate must chain to, instead of the
    # system's (a relay with a private CA). Used with relay_starttls.
    relay_ca_file: str | None = None
    from_address: Address = "support@example.com"
    from_name: str = "Support"
    bounce_address: str = ""  # "" sends with the null reverse-path <> (RFC 3834)
    message_id_domain: str = ""  # default: the from_address domain
    timeout: float = Field(30.0, gt=0)
    # "process": the outbox is delivered by a child process (its own interpreter, so sending
    # acknowledgements does not compete with intake for one GIL); "inline": on the serve loop.
    dispatcher: Literal["process", "inline"] = "process"
    # The dispatcher process's niceness (0-19): under load the listener, whose senders wait
    # for its answer (an SMTP session, Slack's 3-second clock), gets the CPU first, and
    # acknowledgements go out a few milliseconds later. 0 shares the CPU equally.
    process_nice: int = Field(10, ge=0, le=19)
    retry_base_seconds: float = Field(5.0, gt=0)
    retry_cap_seconds: float = Field(3600.0, gt=0)

    @field_validator("bounce_address")
    @classmethod
    def _bounce(cls, v: str) -> str:
        return _address(v) if v else ""

    @field_validator("relay_ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is not None:
            relay_tls_context(v)  # raises ValueError with the reason
        return v


class IrtSettings(_Section):
    lead_email: Address = "irt-lead@example.com"
    slack_user: str | None = None


class RulesSettings(_Section):
    path: str | None = None  # default: the rules shipped with intake


class LevelSettings(_Section):
    severity: int = Field(ge=1, le=4)
    name: str
    definition: str = ""
    # Target name -> minutes from when the customer wrote (calendar time), or a text: "1 day",
    # "2 business days", "4 business hours". The first is the initial response.
    targets: dict[str, StrictInt | str] = Field(min_length=1)  # strict: `true` is no 1 minute

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: dict[str, int | str]) -> dict[str, int | str]:
        for name, value in v.items():
            try:
                parse_target(value)
            except ValueError as exc:
                raise ValueError(f"target {name!r}: {exc}") from None
        return v

    def in_business_time(self) -> list[str]:
        """Names of the targets given in business time."""
        return [name for name, value in self.targets.items() if isinstance(parse_target(value), BusinessTime)]


def public_holidays(country: str, subdivision: str | None, years: range) -> frozenset[date]:
    """A country's (and subdivision's) public holidays in ``years``, observed days included,
    from the ``holidays`` package (imported only here: only a calendar that names a country pays
    for it). Raises ValueError when the package does not know the country or subdivision."""
    import holidays

    try:
        return frozenset(holidays.country_holidays(country, subdiv=subdivision, years=years))
    except NotImplementedError as exc:  # its answer to an unknown country or subdivision
        raise ValueError(str(exc)) from None


class CalendarSettings(_Section):
    """When business time counts: "2 business days" targets and business-hours plans."""

    timezone: str  # an IANA name, such as "Europe/Madrid" (the tz database, through zoneinfo)
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=lambda: ["mon", "tue", "wed", "thu", "fri"], min_length=1
    )
    # The same every working day; a split day is two ranges: ["09:00-13:00", "14:00-18:00"].
    hours: list[str] = Field(default_factory=lambda: ["09:00-17:00"], min_length=1)
    holidays: list[date] = Field(default_factory=list)  # 2026-12-24 or "2026-12-24", in the zone
    # Public holidays of a country (ISO 3166 code: "ES", "US") and subdivision ("MD", "CA") too,
    # from the holidays package.
    holiday_country: str | None = None
    holiday_subdivision: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f'{v!r} is not a time zone known here: an IANA name such as "Europe/Madrid" or '
                '"America/New_York" (the tz database: the system\'s tzdata or the tzdata package)'
            ) from None
        return v

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a day is named twice")
        return v

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: list[str]) -> list[str]:
        ranges = [parse_hours(text) for text in v]  # ValueError names the range
        for (_, closing), (opening, _), text in zip(ranges, ranges[1:], v[1:], strict=False):
            if opening < closing:
                raise ValueError(f"{text!r} starts before the range before it closes (give ranges in order)")
        return v

    @field_validator("holiday_country")
    @classmethod
    def _country(cls, v: str | None) -> str | None:
        if v is not None:
            public_holidays(v, None, range(0))  # no year: only whether the package knows it
        return v

    @field_validator("holiday_subdivision")
    @classmethod
    def _subdivision(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            country = info.data.get("holiday_country")
            if not country:
                raise ValueError("needs holiday_country")
            public_holidays(country, v, range(0))
        return v

    @property
    def weekdays(self) -> frozenset[int]:
        return frozenset(WEEKDAYS.index(d) for d in self.days)


class PolicySettings(_Section):
    default_severity: int = Field(3, ge=1, le=4)
    templates: str | None = None  # a directory with <language>/<name>.txt; default: shipped ones
    default_language: str = "en"
    detect_language: bool = True
    default_plan: str = "standard"
    about_to_miss_minutes: int = Field(10, ge=1)
    escalation_cooldown_minutes: int = Field(60, ge=0)
    escalation_phrases: list[str] = Field(default_factory=list)  # added to the built-in ones
    # Replaces the built-in CaliberMind table when given (all four severities).
    levels: list[LevelSettings] = Field(default_factory=list)
    # Needed (its timezone, at least) when a target or a plan counts in business time.
    calendar: CalendarSettings | None = None

    @field_validator("levels")
    @classmethod
    def _all_four(cls, v: list[LevelSettings]) -> list[LevelSettings]:
        if v and sorted(lvl.severity for lvl in v) != [1, 2, 3, 4]:
            raise ValueError("give each severity 1, 2, 3 and 4 exactly once")
        return v


class PlanSettings(_Section):
    channels: list[Literal["email", "slack"]] = Field(default_factory=lambda: ["email"])
    # "business": support in business hours only, every target counts in business time
    # (policy.calendar): 60 minutes is 1 business hour, 1440 is 1 business day.
    support_hours: Literal["24x7", "business"] = "24x7"


class OrganisationSettings(_Section):
    domains: list[str] = Field(default_factory=list)
    plan: str | None = None
    slack_channels: list[str] = Field(default_factory=list)


class TriageSettings(_Section):
    email: Address | None = None
    slack_channel: str | None = None


class StepSettings(_Section):
    name: str
    contact: Address | None = None


class EscalationSettings(_Section):
    # Default: the HotSchedules chain, Tier I -> ... -> COO, with no contact addresses.
    chain: list[StepSettings] = Field(default_factory=list)


class StaffSettings(_Section):
    addresses: list[Address] = Field(default_factory=list)  # their email replies are staff replies


# One organisation's hourly share of the IRT alerts when not configured: a real incident at one
# customer is reported by a few people in its first hour (each report pages); past five, the
# lead is on it, and a flood takes at most a quarter of the default ceiling of 20.
DEFAULT_IRT_SHARE = 5


class LimitSettings(_Section):
    """What one sender (the From address) can make intake do; counted in the database."""

    acks_per_sender: int = Field(5, ge=1)
    ack_period_minutes: int = Field(60, ge=1)
    tickets_per_sender: int = Field(10, ge=1)
    ticket_period_minutes: int = Field(60, ge=1)
    irt_alerts_per_hour: int = Field(20, ge=1)
    # One organisation's share of those (intake.paging says who is one organisation). Unset: 5,
    # or irt_alerts_per_hour where that is less. As many as irt_alerts_per_hour: no share.
    irt_alerts_per_organisation_per_hour: int | None = Field(None, ge=1)

    @field_validator("irt_alerts_per_organisation_per_hour")
    @classmethod
    def _share(cls, v: int | None, info: ValidationInfo) -> int | None:
        ceiling = info.data.get("irt_alerts_per_hour")
        if v is not None and ceiling is not None and v > ceiling:
            raise ValueError(
                f"{v} is more than irt_alerts_per_hour ({ceiling}): an organisation's share is part of "
                "that hourly ceiling (set both, or this one at most as high)"
            )
        return v

    @property
    def irt_alerts_per_organisation(self) -> int:
        share = self.irt_alerts_per_organisation_per_hour
        return share if share is not None else min(DEFAULT_IRT_SHARE, self.irt_alerts_per_hour)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"  # "json": one JSON object per line


class ServerSettings(_Section):
    # "uvloop": libuv's event loop (the asyncio API in C); "asyncio": the standard library's.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


class SlackSettings(_Section):
    enabled: bool = False
    mode: Literal["http", "socket"] = "http"
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(3000, ge=0, le=65535)
    events_path: str = "/slack/events"
    api_url: str = "https://slack.com/api/"  # the Web API base URL; tests point it at a local stand-in
    # Secrets: from the file, or SLACK_BOT_TOKEN / SLACK_SIGNING_SECRET / SLACK_APP_TOKEN.
    bot_token: SecretStr | None = None
    signing_secret: SecretStr | None = None
    app_token: SecretStr | None = None
    channels: dict[str, str] = Field(default_factory=dict)  # channel id -> customer organisation
    staff_users: list[str] = Field(default_factory=list)  # support team members' user ids
    home_team: str | None = None  # our workspace id: in a Slack Connect channel its members are staff
    timeout: float = Field(10.0, gt=0)

    @field_validator("events_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        return v

    @model_validator(mode="after")
    def _secrets(self) -> SlackSettings:
        if not self.enabled:
            return self
        missing = [] if self.bot_token else ["bot_token (or SLACK_BOT_TOKEN)"]
        if self.mode == "http" and not self.signing_secret:
            missing.append("signing_secret (or SLACK_SIGNING_SECRET)")
        if self.mode == "socket":
            if not self.app_token:
                missing.append("app_token (or SLACK_APP_TOKEN)")
            elif not self.app_token.get_secret_value().startswith("xapp-"):
                raise ValueError("app_token must be an app-level token (xapp-...)")
        if missing:
            raise ValueError("Slack is enabled but these are not set: " + ", ".join(missing))
        return self


class WebSettings(_Section):
    enabled: bool = False
    listen_host: str = "127.0.0.1"  # loopback unless configured
    listen_port: int = Field(8025, ge=0, le=65535)
    # Either a bearer token (also accepted as ?token=) or basic-auth credentials; one is required.
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    public_url: str = ""  # how people reach the page (used in alert texts); default http://host:port

    @model_validator(mode="after")
    def _auth(self) -> WebSettings:
        if self.enabled and not self.token and not (self.username and self.password):
            raise ValueError("the triage page needs web.token or web.username and web.password")
        return self


class Settings(_Section):
    storage: StorageSettings = StorageSettings()
    email: EmailSettings = EmailSettings()
    outbound: OutboundSettings = OutboundSettings()
    irt: IrtSettings = IrtSettings()
    rules: RulesSettings = RulesSettings()
    policy: PolicySettings = PolicySettings()
    organisations: dict[str, OrganisationSettings] = Field(default_factory=dict)
    plans: dict[str, PlanSettings] = Field(
        default_factory=lambda: {
            "standard": PlanSettings(channels=["email"]),
            "managed": PlanSettings(channels=["email", "slack"]),
        }
    )
    triage: TriageSettings = TriageSettings()
    escalation: EscalationSettings = EscalationSettings()
    staff: StaffSettings = StaffSettings()
    slack: SlackSettings = SlackSettings()
    web: WebSettings = WebSettings()
    limits: LimitSettings = LimitSettings()
    log: LogSettings = LogSettings()
    server: ServerSettings = ServerSettings()


def _check_references(settings: Settings) -> list[str]:
    problems = []
    for name, org in settings.organisations.items():
        if org.plan and org.plan not in settings.plans:
            problems.append(
                f"  organisations.{name}.plan: unknown plan {org.plan!r} (plans: {', '.join(settings.plans)})"
            )
    if settings.policy.default_plan not in settings.plans:
        problems.append(f"  policy.default_plan: unknown plan {settings.policy.default_plan!r}")
    if settings.policy.calendar is not None:
        problems += _check_business_spans(settings)
    if settings.policy.calendar is None:
        # Refused rather than a guessed calendar: a zone guessed wrong (UTC for a team in
        # Madrid or Chicago) would put every due time hours off, silently.
        business = [
            f"policy.levels severity {lvl.severity} target {name!r}"
            for lvl in settings.policy.levels
            for name in lvl.in_business_time()
        ] + [f"plans.{name}.support_hours" for name, p in settings.plans.items() if p.support_hours == "business"]
        if business:
            problems.append(
                "  policy.calendar.timezone: not set, but business time is asked for by "
                + ", ".join(business[:3])
                + (" and more" if len(business) > 3 else "")
                + ' (add [policy.calendar] with timezone = "Europe/Madrid", say)'
            )
    return problems


def _check_business_spans(settings: Settings) -> list[str]:
    """Business targets that the calendar's working weeks stretch past five years (a few working
    minutes a week, say): their due times would take a walk of decades per ticket. Counted as
    the policy counts them (``BusinessCalendar.duration``; a business-hours plan reads calendar
    targets as business time, ``as_business_time``)."""
    settings_calendar = settings.policy.calendar
    assert settings_calendar is not None
    calendar = BusinessCalendar(
        zone=zoneinfo.ZoneInfo(settings_calendar.timezone),
        days=settings_calendar.weekdays,
        hours=tuple(parse_hours(h) for h in settings_calendar.hours),
    )
    weekly = calendar.day_length * len(calendar.days)
    business_plans = any(p.support_hours == "business" for p in settings.plans.values())
    problems = []
    for lvl in settings.policy.levels:
        for name, value in lvl.targets.items():
            target = parse_target(value)
            if isinstance(target, timedelta):
                if not business_plans:
                    continue
                target = as_business_time(target)
            if calendar.duration(target) > weekly * 5 * 52:
                problems.append(
                    f"  policy.levels severity {lvl.severity} target {name!r}: {value!r} takes more than five "
                    f"years of this calendar's working weeks ({weekly.total_seconds() / 60:g} working minutes a week)"
                )
    return problems


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None, *, environ: dict[str, str] | None = None) -> Settings:
    """Read the TOML file named by ``path`` or $INTAKE_CONFIG; no file means all defaults."""
    env = os.environ if environ is None else environ
    chosen = path or env.get(ENV_CONFIG) or None
    data = _read(Path(chosen)) if chosen else {}
    # Slack secrets may come from the environment instead of the file.
    slack = data.setdefault("slack", {})
    if isinstance(slack, dict):
        for key, var in (
            ("bot_token", "SLACK_BOT_TOKEN"),
            ("signing_secret", "SLACK_SIGNING_SECRET"),
            ("app_token", "SLACK_APP_TOKEN"),
        ):
            if not slack.get(key) and env.get(var):
                slack[key] = env[var]
    source = str(chosen or "the built-in defaults")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    problems = _check_references(settings)
    if problems:
        raise ConfigError("\n".join([f"invalid configuration in {source}:", *problems]))
    return settings


def _read(p: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {p} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from None
    return data
