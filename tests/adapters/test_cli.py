"""The command line as a user types it: tickets list/show, rules check/lint, config errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner

from adapters.cli import main
from adapters.settings import load_settings
from intake.model import Channel, OutgoingEmail, Severity
from intake.ports import NewTicket, OutboxEntry, SendResult
from intake.reference import References
from storage.store import SqlStore
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, running_intake, settings_for

REFS = References()
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


async def test_tickets_list_and_show_json(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        reply = await h.send(mail(subject="Data breach suspected", body="Our account was hacked last night."))
        ref = next(f.reference for f in REFS.find(reply.text) if f.reference)
        await h.send(mail(subject=f"Re: [{ref}]", body="More details: it started at 02:00 UTC."))
        await h.outbox_settled()
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\nurl = "{h.settings.storage.url}"\n')
        code, out = cli("--config", str(cfg), "tickets", "list", "--json")
        assert code == 0, out
        [t] = json.loads(out)
        for key in ("reference", "subject", "severity", "security", "channel", "requester", "status",
                    "message_count", "created_at", "response_due"):  # fmt: skip
            assert key in t, key
        assert t["reference"] == ref and t["severity"] == 1 and t["security"] is True and t["message_count"] == 2
        assert t["response_due"].endswith("+00:00")
        assert t["acknowledgement"] == "sent"  # the outbox's word, not "queued" as at intake
        code, out = cli("--config", str(cfg), "tickets", "show", ref.lower(), "--json")
        assert code == 0, out
        detail = json.loads(out)
        assert [m["route"] for m in detail["messages"]] == ["new", "reference"]
        assert detail["evidence"] and detail["evidence"][0]["rule"]
        assert {o["kind"] for o in detail["outbox"]} == {"acknowledgement", "irt-alert"}
        assert detail["acknowledgement"] == "sent"
        code, out = cli("--config", str(cfg), "tickets", "show", ref)
        assert code == 0 and "SECURITY INCIDENT" in out and "route: reference" in out
        assert "Acknowledgement: sent" in out
        code, out = cli("--config", str(cfg), "tickets", "list")
        assert code == 0 and ref in out
        # A mistyped reference is recognised as such.
        typo = ref[:-1] + ("0" if ref[-1] != "0" else "1")
        code, out = cli("--config", str(cfg), "tickets", "show", typo)
        assert code == 2 and "not a valid reference" in out


async def test_tickets_show_says_when_the_text_was_rendered_from_html(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """A report whose plain part is only "This message is in HTML format" is read from its
    HTML; `tickets show` says so, and says nothing of the kind for a plain message."""
    data = ROOT / "tests" / "data" / "email"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        behind = REFS.find((await h.send((data / "alt_placeholder_entourage.eml").read_bytes())).text)[0].reference
        plain = REFS.find((await h.send(mail())).text)[0].reference
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[storage]\nurl = "{h.settings.storage.url}"\n')
        code, out = cli("--config", str(cfg), "tickets", "show", str(behind))
        assert code == 0, out
        assert "text rendered from the HTML part" in out and "I think we were hacked overnight." in out
        assert "This message is in HTML format" not in out
        code, out = cli("--config", str(cfg), "tickets", "show", str(behind), "--json")
        assert [m["html"] for m in json.loads(out)["messages"]] == [True]
        code, out = cli("--config", str(cfg), "tickets", "show", str(plain))
        assert code == 0 and "rendered from the HTML" not in out
        code, out = cli("--config", str(cfg), "tickets", "show", str(plain), "--json")
        assert [m["html"] for m in json.loads(out)["messages"]] == [False]


def test_rules_check_and_lint(tmp_path: Path) -> None:
    eml = tmp_path / "m.eml"
    eml.write_bytes(
        mail(subject="Phishing", body="We received a phishing email and two users entered passwords.").as_bytes()
    )
    code, out = cli("rules", "check", str(eml), "--json")
    assert code == 0, out
    verdict = json.loads(out)
    assert verdict["severity"] == 1 and verdict["security"] and verdict["hits"]
    text = tmp_path / "t.txt"
    text.write_text("Hello, the export button does nothing.\n\n> On Monday we wrote: data breach\n")
    code, out = cli("rules", "check", str(text), "--json")
    assert code == 0 and json.loads(out)["hits"] == []  # quoted text is not looked at
    code, out = cli("rules", "lint")
    assert code == 0 and "OK: 8 rules" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\nphrases = [""]\nseverity = 1\n')
    code, out = cli("rules", "lint", str(bad))
    assert code == 2 and "bad.toml" in out


def test_invalid_configuration_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[email]\nlisten_port = 70000\nprotocol = "pop3"\n[nonsense]\nx = 1\n')
    code, out = cli("--config", str(cfg), "stats")
    assert code == 2
    assert "email.listen_port" in out and "email.protocol" in out and "nonsense" in out
    missing = cli("--config", str(tmp_path / "nope.toml"), "stats")
    assert missing[0] == 2 and "does not exist" in missing[1]


# What a read command runs, in a fresh interpreter; it prints the heavy modules it loaded.
_READ_COMMAND = """
import sys
from adapters.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = ("adapters.demo", "adapters.bootstrap", "aiosmtpd", "aiosmtplib", "mailparser", "slack_bolt", "alembic")
print("loaded:", ",".join(m for m in heavy if m in sys.modules))
"""


def test_read_commands_do_not_load_the_listener_or_the_migrations(tmp_path: Path) -> None:
    """`tickets list` and `stats` load storage and settings, not the product behind `serve`
    and `demo` nor Alembic: a support engineer runs them often, and each of those took a
    fifth or more of their start-up."""
    db = tmp_path / "intake.db"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite:///{db}"\n')
    code, out = cli("--config", str(cfg), "db", "upgrade")
    assert code == 0, out
    for command in (["tickets", "list"], ["stats"]):
        run = subprocess.run(
            [sys.executable, "-c", _READ_COMMAND, "--config", str(cfg), *command],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1] == "loaded: ", (command, run.stdout)


async def test_tickets_show_says_what_each_outgoing_note_waits_for(tmp_path: Path) -> None:
    """A note due by now is not shown with its "next attempt" (a time past), and one held with
    its channel shows why."""
    url = f"sqlite:///{tmp_path / 'intake.db'}"
    now = datetime.now(UTC)
    store = SqlStore(url, create=True)
    try:
        ticket = NewTicket(
            reference=REFS.new(), subject="printer", channel=Channel.EMAIL, requester="alice@acme.com",
            requester_name="Alice", organisation=None, severity=Severity.S3, security=False, created_at=now,
            response_due=now + timedelta(hours=8),
        )  # fmt: skip
        tid = await store.transact(lambda uow: uow.create_ticket(ticket).id)
        for n, to in enumerate(("due@acme.com", "later@acme.com")):
            note = OutgoingEmail(to=(to,), subject="s", body="b", message_id=f"m{n}@intake", from_address="s@x.org")
            await store.transact(
                lambda uow, note=note: uow.enqueue(
                    OutboxEntry(ticket_id=tid, kind="acknowledgement", payload=note, created_at=now)
                )
            )
        claimed = await store.transact(
            lambda uow: uow.claim_outbox(
                now=now, owner="t", lease_until=now + timedelta(minutes=1), limit=2, channels=["email"]
            )
        )
        retries = [now - timedelta(seconds=40), now + timedelta(hours=1)]  # one due since, one ahead
        results = [
            SendResult(id=item.id, ok=False, error="relay unreachable", retry_at=at)
            for item, at in zip(claimed, retries, strict=True)
        ]
        await store.transact(lambda uow: uow.finish_outbox(results, now=now))
    finally:
        await store.close()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nurl = "{url}"\n')
    code, out = cli("--config", str(cfg), "tickets", "show", ticket.reference)
    assert code == 0, out
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("acknowledgement to")]
    due = (now - timedelta(seconds=40)).isoformat(timespec="seconds")
    ahead = (now + timedelta(hours=1)).isoformat(timespec="seconds")
    assert lines == [
        f"acknowledgement to due@acme.com: pending after 1 attempt(s) - due since {due}, waiting for the outbox "
        "to send it, last error: relay unreachable",
        f"acknowledgement to later@acme.com: pending after 1 attempt(s) - waiting, next attempt {ahead}, "
        "last error: relay unreachable",
    ]


def test_read_commands_never_create_a_database(tmp_path: Path) -> None:
    """`tickets list` in the wrong directory (or with a mistyped path) said the schema was
    missing, and left an empty database file behind."""
    db = tmp_path / "intake.db"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite:///{db}"\n')
    for command in (["tickets", "list"], ["stats"], ["sla"], ["tickets", "show", REFS.new()]):
        code, out = cli("--config", str(cfg), *command)
        assert code == 2 and f"no database at {db}" in out, (command, out)
        assert "intake db upgrade" in out
    assert list(tmp_path.iterdir()) == [cfg]


def test_the_readme_s_configuration_loads_as_it_is(tmp_path: Path) -> None:
    """A reader copies the README's block and edits it: it must load before any edit."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "intake.toml"
    cfg.write_text(block)
    settings = load_settings(cfg, environ={})
    assert settings.email.max_message_bytes == 26214400 and settings.email.protocol == "smtp"
    assert settings.outbound.relay_ca_file is None  # the example file is commented out


def test_a_log_line_cannot_be_ended_or_forged_by_what_a_client_sent() -> None:
    """aiosmtpd logs an unknown command as the client sent it; a sender or a Message-ID comes
    from the client too. In the text log each record stays one line, control characters shown
    as escapes, and the extras come before any traceback."""
    from adapters.cli import _TextFormatter

    formatter = _TextFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.makeLogRecord(
        {
            "name": "mail.log",
            "levelname": "WARNING",
            "msg": "unrecognised: %s",
            "args": ("FOO\r\n2026-12-04 INFO intake.smtp: message received\x00",),
            "sender": "a@b.example\nforged=1",
        }
    )
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert line == (
        "WARNING mail.log: unrecognised: FOO\\x0d\\x0a2026-12-04 INFO intake.smtp: message received\\x00"
        " sender=a@b.example\\x0aforged=1"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    failed = logging.makeLogRecord({"msg": "failed", "levelname": "ERROR", "exc_info": info, "sender": "x"})
    head, _, trace = formatter.format(failed).partition("\n")
    assert head.endswith("failed sender=x") and trace.startswith("Traceback") and "ValueError: boom" in trace
