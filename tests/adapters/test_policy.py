"""The support policy kept: targets, plans, response-clock notices, escalation, Spanish."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapters.bootstrap import build, make_calendar, make_policy
from adapters.cli import main
from adapters.settings import CalendarSettings, load_settings
from intake.acknowledgement import TemplateBook
from intake.businesstime import BusinessTime
from intake.errors import ConfigError
from intake.model import Severity
from intake.reference import References
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, running_intake, settings_for

REFS = References()


class DrivenClock:
    """Time driven by the test, not by sleeping."""

    def __init__(self) -> None:
        self.t = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)


def ref_of(text: str) -> str:
    return next(f.reference for f in REFS.find(text) if f.reference)


MINDFUL = """
[[policy.levels]]
severity = 1
name = "Critical"
definition = "production software is down"
targets = { response = 60, restore = 1440, resolve = 21600 }
[[policy.levels]]
severity = 2
name = "High"
targets = { response = 240, restore = 2880, resolve = 43200 }
[[policy.levels]]
severity = 3
name = "Medium"
targets = { response = 1440, restore = 2880, resolve = 43200 }
[[policy.levels]]
severity = 4
name = "Low"
targets = { response = 2880, restore = 5760 }
"""


async def test_every_target_of_a_custom_table_is_computed(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    clock = DrivenClock()
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra=MINDFUL)
    async with running_intake(settings, clock=clock) as h:
        ref = ref_of((await h.send(mail(subject="Reports are slow"))).text)
        t = h.detail(ref)
        assert t["severity"] == 3
        assert t["targets"] == {
            "response": (clock.t + timedelta(minutes=1440)).isoformat(),
            "restore": (clock.t + timedelta(minutes=2880)).isoformat(),
            "resolve": (clock.t + timedelta(minutes=43200)).isoformat(),
        }
        assert t["response_due"] == clock.t + timedelta(minutes=1440)
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)
        assert "Medium" in ack.message.get_content() and "1 day" not in ack.message.get_content()
        # A breach raises it to the custom level 1 and brings every target closer.
        clock.advance(minutes=10)
        await h.send(mail(subject=f"Re: [{ref}]", body="We now suspect a data breach."))
        t = h.detail(ref)
        assert t["severity"] == 1
        assert t["targets"]["response"] == (clock.t + timedelta(minutes=60)).isoformat()


async def test_default_targets_are_the_calibermind_table(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    clock = DrivenClock()
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port), clock=clock) as h:
        ref = ref_of((await h.send(mail(subject="Breach?", body="Our account was hacked."))).text)
        assert h.detail(ref)["response_due"] == clock.t + timedelta(minutes=30)
        ref3 = ref_of((await h.send(mail(subject="Typo on a page"))).text)
        assert h.detail(ref3)["response_due"] == clock.t + timedelta(hours=8)


PLANS = """
[organisations.acme]
domains = ["acme.com"]
plan = "standard"
[organisations.bigco]
domains = ["bigco.example"]
plan = "managed"
"""


async def test_entitlements_per_plan(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=PLANS)) as h:
        r = await h.send(mail(sender="alice@acme.com"))
        t = h.detail(ref_of(r.text))
        assert t["plan"] == "standard"
        r2 = await h.send(mail(sender="bob@bigco.example"))
        assert h.detail(ref_of(r2.text))["plan"] == "managed"
        r3 = await h.send(mail(sender="someone@unknown.example"))
        assert h.detail(ref_of(r3.text))["plan"] == "standard"  # unknown senders: the default plan
        await h.outbox_settled()
        acks = await smtp_relay.wait_for(3)
        # Email is covered by every plan: no entitlement note.
        assert all("plan covers" not in a.message.get_content() for a in acks)


async def test_unentitled_channel_is_taken_in_and_told(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    from intake.model import Channel, InboundMessage

    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=PLANS)) as h:
        msg = InboundMessage(
            channel=Channel.SLACK,
            sender="U1",
            recipient="slack:T1/C1",
            body="The sync job fails every night",
            new_text="The sync job fails every night",
            chat_channel="C1",
            chat_ts="1700000000.000100",
            thread_key="T1/C1/1700000000.000100",
            external_id="T1/C1/1700000000.000100",
            organisation="acme",
        )
        receipt = await h.app.service.receive(msg)
        assert receipt.created and receipt.acknowledged
        detail = h.detail(receipt.reference)
        assert any("does not include slack" in n["text"] for n in detail["notes"])
        payloads = h.read(lambda uow: uow.conn.exec_driver_sql("select payload from outbox").scalars().all())
        text = json.loads(payloads[0])["text"] if isinstance(payloads[0], str) else payloads[0]["text"]
        assert "standard plan covers support by email, not by slack" in " ".join(text.split())


TRIAGE = '[triage]\nemail = "triage@example.com"\n[policy]\nabout_to_miss_minutes = 10\n'


async def test_triage_notice_and_response_clock_notices_once_each(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    clock = DrivenClock()
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=TRIAGE), clock=clock) as h:
        ref = ref_of((await h.send(mail(subject="Hacked?", body="I think our account was hacked."))).text)
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(3)  # acknowledgement, IRT alert, triage notice
        triage = [m for m in msgs if m.rcpt_tos == ("triage@example.com",)]
        assert len(triage) == 1
        body = triage[0].message.get_content()
        assert body.startswith("*** SUSPECTED SECURITY INCIDENT ***") and ref in body and "plan: standard" in body
        # 30-minute target: nothing at +5 min, "about to miss" at +21, "missed" at +31, once each.
        for minutes, expected in ((5, 0), (16, 1), (1, 0), (9, 1), (30, 0)):
            clock.advance(minutes=minutes)
            assert await h.app.sla.run_once() == expected, minutes
        await h.outbox_settled()
        notes = [m for m in smtp_relay.messages if m.rcpt_tos == ("triage@example.com",)][1:]
        assert [n.message["Subject"].split(":")[0] for n in notes] == [
            "About to miss the response target",
            "Response target missed",
        ]


async def test_a_staff_reply_stops_the_clock(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    clock = DrivenClock()
    extra = TRIAGE + '[staff]\naddresses = ["agent@example.com"]\n'
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra), clock=clock) as h:
        ref = ref_of((await h.send(mail(subject="Export broken"))).text)
        clock.advance(minutes=5)
        r = await h.send(mail(sender="agent@example.com", subject=f"Re: [{ref}]", body="Looking into it."))
        assert ref in r.text
        detail = h.detail(ref)
        assert detail["responded_at"] == clock.t and detail["messages"][1]["direction"] == "staff"
        clock.advance(hours=9)
        assert await h.app.sla.run_once() == 0
        runner = CliRunner()
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\nurl = "{h.settings.storage.url}"\n')
        out = runner.invoke(main, ["--config", str(cfg), "sla", "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output) == []


async def test_sla_lists_overdue_first(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    clock = DrivenClock()
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port), clock=clock) as h:
        clock.t = datetime.now(UTC) - timedelta(hours=2)
        late = ref_of((await h.send(mail(subject="old one"))).text)  # S3, due in 8h from 2h ago
        clock.t = datetime.now(UTC) - timedelta(hours=1)
        overdue = ref_of((await h.send(mail(subject="hacked", body="account compromised"))).text)  # S1, 30 min
        clock.t = datetime.now(UTC)
        fresh = ref_of((await h.send(mail(subject="new one"))).text)
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\nurl = "{h.settings.storage.url}"\n')
        out = CliRunner().invoke(main, ["--config", str(cfg), "sla"])
        assert out.exit_code == 0, out.output
        lines = [line for line in out.output.splitlines()[1:] if line.strip()]
        assert [line.split()[0] for line in lines] == [overdue, late, fresh]
        assert "OVERDUE" in lines[0]


ESCALATION = """
[policy]
escalation_cooldown_minutes = 60
[[escalation.chain]]
name = "Tier I"
[[escalation.chain]]
name = "Tier II"
contact = "tier2@example.com"
[[escalation.chain]]
name = "Support Manager"
contact = "manager@example.com"
"""


async def test_escalation_moves_one_step_and_notifies(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    clock = DrivenClock()
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra=ESCALATION)
    async with running_intake(settings, clock=clock) as h:
        ref = ref_of((await h.send(mail(subject="Sync fails"))).text)
        await h.outbox_settled()
        await smtp_relay.wait_for(1)
        clock.advance(minutes=5)
        await h.send(mail(subject=f"Re: Sync fails [{ref}]", body="Still broken. Please escalate this."))
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(3)
        to_tier2 = next(m for m in msgs if m.rcpt_tos == ("tier2@example.com",))
        assert ref in to_tier2.message["Subject"] and "Tier I -> Tier II" in to_tier2.message.get_content()
        to_customer = msgs[-1] if msgs[-1].rcpt_tos == ("alice@acme.com",) else msgs[-2]
        assert "It is now with: Tier II" in to_customer.message.get_content()
        assert h.detail(ref)["escalation_step"] == 1
        # Asked again within the cooldown: no skipping.
        clock.advance(minutes=10)
        await h.send(mail(subject=f"Re: [{ref}]", body="please escalate!!"))
        await h.outbox_settled()
        await smtp_relay.wait_for(3)
        assert h.detail(ref)["escalation_step"] == 1
        # After the cooldown, one more step; at the end of the chain it stays.
        clock.advance(minutes=61)
        await h.send(mail(subject=f"Re: [{ref}]", body="Escalate this to your manager please."))
        clock.advance(minutes=61)
        await h.send(mail(subject=f"Re: [{ref}]", body="please escalate"))
        await h.outbox_settled()
        await smtp_relay.wait_for(5)
        detail = h.detail(ref)
        assert detail["escalation_step"] == 2
        assert any("already at the last step" in n["text"] for n in detail["notes"])


async def test_spanish_escalation_reply(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail(subject="No funciona la exportación", body="Desde ayer no funciona."))).text)
        await h.send(mail(subject=f"Re: [{ref}]", body="Por favor, necesito escalar el ticket, sigue sin funcionar."))
        await h.outbox_settled()
        msgs = await smtp_relay.wait_for(2)
        assert "Nos pidió escalar el ticket" in " ".join(msgs[1].message.get_content().split())
        assert "Tier II" in msgs[1].message.get_content()


@pytest.mark.parametrize(
    ("subject", "body", "expected"),
    [
        ("No puedo acceder", "Hola, desde esta mañana no puedo acceder a los informes. ¿Pueden ayudarme?", "es"),
        ("Cannot log in", "Hello, since this morning I cannot open the reports. Can you help?", "en"),
        ("Problema", "Buenos días, el panel de control muestra un error al guardar los turnos de la semana.", "es"),
        ("Re: Problema", "Thanks, but the schedule still does not save. Any update on this?", "en"),
    ],
)
async def test_acknowledgement_language(
    tmp_path: Path, smtp_relay: RelayStandIn, subject: str, body: str, expected: str
) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        await h.send(mail(subject=subject, body=body))
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)
        text = ack.message.get_content()
        assert text.startswith("Hola") if expected == "es" else text.startswith("Hello"), text[:80]
        assert h.tickets()[0]["language"] == expected


def test_template_with_missing_placeholder_is_rejected_at_start_up(tmp_path: Path) -> None:
    import shutil
    from importlib import resources

    src = Path(str(resources.files("intake").joinpath("data", "templates")))
    dst = tmp_path / "templates"
    shutil.copytree(src, dst)
    ack = dst / "es" / "acknowledgement.txt"
    without = re.sub(r"\$reference\b", "REF", ack.read_text(encoding="utf-8"))  # not $reference_note
    ack.write_text(without, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"es/acknowledgement.txt: missing required placeholder\(s\) \$reference"):
        TemplateBook.load(dst)
    ack.write_text("Hola $nombre", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \$nombre"):
        TemplateBook.load(dst)
    (dst / "es" / "acknowledgement.txt").unlink()
    with pytest.raises(ConfigError, match="cannot be read"):
        TemplateBook.load(dst)


def test_start_up_names_the_bad_template_directory(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, relay_port=25, extra=f'[policy]\ntemplates = "{tmp_path}/nowhere"\n')
    with pytest.raises(ConfigError, match="nowhere"):
        build(settings)


@pytest.mark.parametrize(
    ("body", "note"),
    [
        ("Hello, the nightly export still fails. Can you look again?", "which is not a valid reference"),
        ("Hola, la exportación nocturna sigue fallando. ¿Pueden revisarlo?", "que no es una referencia válida"),
    ],
)
async def test_a_mistyped_reference_is_told_to_the_customer(
    tmp_path: Path, smtp_relay: RelayStandIn, body: str, note: str
) -> None:
    """The check character catches a mistyped reference: the message opens a ticket of its own,
    and its acknowledgement says why, in the customer's language (staff saw it, they did not)."""
    code = REFS.new()[4:].replace("-", "")
    typo = f"SUP-{code[:4]}-{code[4:7]}{'0' if code[7] != '0' else '1'}"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        await h.send(mail(subject=f"Re: export [{typo}]", body=body))
        await h.send(mail(sender="bob@acme.com", subject="Re: export", body=body))
        await h.outbox_settled()
        acks = {a.rcpt_tos[0]: " ".join(a.message.get_content().split()) for a in await smtp_relay.wait_for(2)}
        assert note in acks["alice@acme.com"] and typo in acks["alice@acme.com"]
        assert note not in acks["bob@acme.com"]
        [t] = [t for t in h.tickets() if t["requester"] == "alice@acme.com"]
        assert any("fails its check" in n["text"] for n in h.detail(t["reference"])["notes"])


def test_a_template_folder_of_one_s_own_without_the_newer_notes_still_loads(tmp_path: Path) -> None:
    import shutil
    from importlib import resources

    src = Path(str(resources.files("intake").joinpath("data", "templates")))
    dst = tmp_path / "templates"
    shutil.copytree(src, dst)
    for lang in ("en", "es"):
        (dst / lang / "reference-note.txt").unlink()
    book = TemplateBook.load(dst)
    assert book.get("es").render("reference-note", typed="SUP-XXXX-XXXX") == ""


async def test_a_display_name_that_is_an_address_is_no_name_to_greet(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    # Many clients put the address itself in the display name: the acknowledgement read
    # "Hello laura.k@northwind-traders.com,".
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        await h.send(mail(sender='"laura.k@acme.com" <laura.k@acme.com>'))
        await h.send(mail(sender="'bob@acme.com' <bob@acme.com>", subject="Second"))
        await h.outbox_settled()
        acks = await smtp_relay.wait_for(2)
        for ack in acks:
            first_line = ack.message.get_content().splitlines()[0]
            assert first_line == "Hello,", first_line


async def test_an_escalation_asked_from_an_address_that_cannot_be_answered_gets_no_reply(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """The escalation moves on, but its reply to the customer goes only where an acknowledgement
    would: not to an address the relay sender refuses (8-bit: a note queued to fail), nor to
    our own support address."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail(subject="Sync fails"))).text)
        await smtp_relay.wait_for(1)
        raw = (
            f"From: Jürgen <jürgen@acme.com>\r\nTo: support@example.com\r\nSubject: Re: Sync fails [{ref}]\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "Still broken. Please escalate this.\r\n"
        ).encode()
        assert (await h.send(raw, mail_from="alice@acme.com")).code == 250
        stats = await h.outbox_settled()
        detail = h.detail(ref)
        assert detail["escalation_step"] == 1 and len(detail["messages"]) == 2
        assert stats["outbox"]["failed"] == 0, detail["outbox"]
        assert "escalation-reply" not in [o["kind"] for o in detail["outbox"]]


# --- business time ------------------------------------------------------------------------------

# Mindful's table as its words go, Low first assessed (the default severity here).
MINDFUL_BUSINESS = """
[policy]
default_severity = 4
[policy.calendar]
timezone = "Europe/Madrid"
holidays = [2026-12-08]
[[policy.levels]]
severity = 1
name = "Critical"
targets = { response = "1 hour", restore = "24 hours", resolve = "15 days" }
[[policy.levels]]
severity = 2
name = "High"
targets = { response = "4 hours", restore = "48 hours", resolve = "30 days" }
[[policy.levels]]
severity = 3
name = "Medium"
targets = { response = "1 day", restore = "2 business days", resolve = "30 days" }
[[policy.levels]]
severity = 4
name = "Low"
targets = { response = "2 business days", restore = "4 business days" }
[triage]
email = "triage@example.com"
"""


async def test_a_business_time_target_over_a_weekend_and_a_holiday(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """Friday 4 December 2026, 16:00 in Madrid (15:00 UTC); Tuesday the 8th is a holiday. "2
    business days": Friday's last hour, Monday, then Wednesday until 16:00, told to the customer
    as the contract says it, in English and in Spanish; no notice to triage over the weekend."""
    clock = DrivenClock()
    clock.t = datetime(2026, 12, 4, 15, 0, tzinfo=UTC)
    due = datetime(2026, 12, 9, 15, 0, tzinfo=UTC)  # Wednesday 16:00 in Madrid
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra=MINDFUL_BUSINESS)
    async with running_intake(settings, clock=clock) as h:
        ref = ref_of((await h.send(mail(subject="Question about report filters"))).text)
        es = ref_of(
            (
                await h.send(
                    mail(
                        sender="Bea <bea@acme.com>",
                        subject="No puedo acceder",
                        body="Hola, desde esta mañana no puedo acceder a los informes. ¿Pueden ayudarme?",
                    )
                )
            ).text
        )
        t = h.detail(ref)
        assert t["severity"] == 4 and t["response_due"] == due
        # 4 business days: Friday 1 hour, Monday, Wednesday, Thursday, Friday until 16:00.
        assert t["targets"] == {"response": due.isoformat(), "restore": "2026-12-11T15:00:00+00:00"}
        await h.outbox_settled()
        sent = await smtp_relay.wait_for(4)
        acks = {m.rcpt_tos[0]: m.message.get_content() for m in sent}  # and 2 to triage
        assert "Initial response: within 2 business days" in acks["alice@acme.com"]
        # Triage reads the due time in the team's own zone.
        assert "2026-12-09T16:00+01:00 (Europe/Madrid)" in acks["triage@example.com"], acks["triage@example.com"]
        assert "en menos de 2 días hábiles" in acks["bea@acme.com"]
        # tickets list --json: the same due time, ISO 8601.
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\nurl = "{h.settings.storage.url}"\n')
        out = CliRunner().invoke(main, ["--config", str(cfg), "tickets", "list", "--json"])
        assert out.exit_code == 0, out.output
        assert {t["reference"]: t["response_due"] for t in json.loads(out.output)} == {
            ref: "2026-12-09T15:00:00+00:00",
            es: "2026-12-09T15:00:00+00:00",
        }
        # The response clock: quiet all weekend and on the holiday; "about to miss" ten minutes
        # before Wednesday 16:00, "missed" at it.
        for t_utc, expected in (
            (datetime(2026, 12, 6, 15, 0, tzinfo=UTC), 0),  # Sunday: "2 days" in calendar time
            (datetime(2026, 12, 8, 15, 0, tzinfo=UTC), 0),
            (due - timedelta(minutes=9), 2),
            (due, 2),
        ):
            clock.t = t_utc
            assert await h.app.sla.run_once() == expected, t_utc
        await h.outbox_settled()
        subjects = [str(m.message["Subject"]) for m in await smtp_relay.wait_for(8)]
        assert sum("due 2026-12-09T16:00+01:00 (Europe/Madrid)" in s for s in subjects) == 4, subjects


def _settings_file(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "intake.toml"
    cfg.write_text(text, encoding="utf-8")
    return cfg


LEVELS_WITH = """
[[policy.levels]]
severity = 1
name = "Critical"
targets = {{ response = 60 }}
[[policy.levels]]
severity = 2
name = "High"
targets = {{ response = 240 }}
[[policy.levels]]
severity = 3
name = "Medium"
targets = {{ response = "1 day" }}
[[policy.levels]]
severity = 4
name = "Low"
targets = {{ response = {low} }}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[policy.calendar]\ntimezone = "Europe/Madird"\n',
            "policy.calendar.timezone: Value error, 'Europe/Madird' is not a time zone known here",
        ),
        ('[policy.calendar]\nhours = ["09:00-17:00"]\n', "policy.calendar.timezone: Field required"),
        (
            '[policy.calendar]\ntimezone = "UTC"\nhours = ["9-17"]\n',
            "policy.calendar.hours: Value error, '9-17' is not a range of hours",
        ),
        (
            '[policy.calendar]\ntimezone = "UTC"\nhours = ["17:00-09:00"]\n',
            "policy.calendar.hours: Value error, '17:00-09:00' closes before it opens",
        ),
        (
            '[policy.calendar]\ntimezone = "UTC"\nhours = ["14:00-18:00", "09:00-13:00"]\n',
            "policy.calendar.hours: Value error, '09:00-13:00' starts before the range before it closes",
        ),
        ('[policy.calendar]\ntimezone = "UTC"\ndays = ["monday"]\n', "policy.calendar.days.0: Input should be 'mon'"),
        ('[policy.calendar]\ntimezone = "UTC"\ndays = []\n', "policy.calendar.days: List should have at least 1"),
        ('[policy.calendar]\ntimezone = "UTC"\ndays = ["mon", "mon"]\n', "policy.calendar.days: Value error, a day is"),
        (
            '[policy.calendar]\ntimezone = "UTC"\nholiday_country = "XX"\n',
            "policy.calendar.holiday_country: Value error, Country XX not available",
        ),
        (
            '[policy.calendar]\ntimezone = "UTC"\nholiday_country = "ES"\nholiday_subdivision = "ZZ"\n',
            "policy.calendar.holiday_subdivision: Value error, Entity `ES` does not have subdivision ZZ",
        ),
        (
            LEVELS_WITH.format(low='"2 bussiness days"'),
            "policy.levels.3.targets: Value error, target 'response': '2 bussiness days' is not a time",
        ),
        (
            LEVELS_WITH.format(low='"2 business days"'),
            "policy.calendar.timezone: not set, but business time is asked for by policy.levels severity 4 "
            "target 'response'",
        ),
        (
            '[plans.standard]\nsupport_hours = "business"\n',
            "policy.calendar.timezone: not set, but business time is asked for by plans.standard.support_hours",
        ),
        # `true` is no 1 minute; a typo of decades is no target (its due time overflowed, and
        # every message of that severity was answered 451).
        (LEVELS_WITH.format(low="true"), "policy.levels.3.targets.response.int: Input should be a valid integer"),
        (LEVELS_WITH.format(low='"999999 business days"'), "'999999 business days': a target of more than five years"),
        (
            LEVELS_WITH.format(low='"1000 business days"')
            + '[policy.calendar]\ntimezone = "Europe/Madrid"\ndays = ["mon"]\nhours = ["09:00-09:30"]\n',
            "policy.levels severity 4 target 'response': '1000 business days' takes more than five years",
        ),
    ],
)
def test_a_bad_calendar_or_target_stops_start_up_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(_settings_file(tmp_path, text), environ={})


def test_the_calendar_and_business_hours_plans_reach_the_policy(tmp_path: Path) -> None:
    text = (
        LEVELS_WITH.format(low='"2 business days"')
        + '[policy.calendar]\ntimezone = "Europe/Madrid"\nhours = ["09:00-13:00", "14:00-18:00"]\n'
        + 'holidays = [2026-12-24, "2026-12-31"]\n'
        + '[plans.standard]\nsupport_hours = "business"\n[plans.enterprise]\nchannels = ["email", "slack"]\n'
    )
    policy = make_policy(load_settings(_settings_file(tmp_path, text), environ={}))
    assert policy.calendar is not None
    assert policy.calendar.hours == ((540, 780), (840, 1080)) and policy.calendar.days == frozenset(range(5))
    assert policy.calendar.holidays == {date(2026, 12, 24), date(2026, 12, 31)}
    assert policy.plans["standard"].business_hours and not policy.plans["enterprise"].business_hours
    friday = datetime(2026, 11, 27, 16, 30, tzinfo=UTC)  # 17:30 in Madrid: half an hour before closing
    assert policy.due(Severity.S1, friday, "standard") == datetime(2026, 11, 30, 8, 30, tzinfo=UTC)
    assert policy.due(Severity.S1, friday, "enterprise") == friday + timedelta(hours=1)


def test_public_holidays_of_a_country_come_from_the_holidays_package() -> None:
    cal = make_calendar(
        CalendarSettings(timezone="Europe/Madrid", holiday_country="ES", holiday_subdivision="MD", holidays=[]),
        today=date(2026, 12, 1),
    )
    assert {date(2026, 12, 8), date(2027, 1, 1), date(2027, 1, 6), date(2036, 12, 25)} <= cal.holidays
    assert date(2025, 12, 25) in cal.holidays and date(2037, 12, 25) not in cal.holidays  # -1 to +10 years
    # Thursday 31 December, 15:00 in Madrid: New Year's Day and Epiphany are not working days.
    since = datetime(2026, 12, 31, 14, 0, tzinfo=UTC)
    assert cal.add(since, BusinessTime(4, "day")) == datetime(2027, 1, 8, 14, 0, tzinfo=UTC)


def test_existing_configurations_in_minutes_load_unchanged(tmp_path: Path) -> None:
    policy = make_policy(load_settings(_settings_file(tmp_path, MINDFUL), environ={}))
    assert policy.calendar is None
    assert policy.level(Severity.S4).targets == {
        "response": timedelta(minutes=2880),
        "restore": timedelta(minutes=5760),
    }
