"""``intake demo``: the scripted story runs end to end and says what intake did at each step.

The demo is also a smoke test, so these tests check both halves of that promise: on a
healthy intake it tells the story and exits 0 (run as a real process: exit code, stdout and a
quiet stderr), its report matches what is in the database, ``--keep`` leaves a database the
other commands can open, and when intake misbehaves (here: rules without the Spanish breach
phrases) it says UNEXPECTED and exits 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapters.cli import main
from adapters.demo import FIRST_SUBJECT, run_demo
from storage.store import SqlStore

ROOT = Path(__file__).resolve().parents[2]
REF = r"SUP-[0-9A-Z]{4}-[0-9A-Z]{4}"
RUN_DEMO = "import sys; from adapters.cli import main; main(sys.argv[1:])"


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTAKE_CONFIG", raising=False)


def steps(output: str) -> dict[int | str, list[str]]:
    """Each step's lines (whitespace collapsed), the table's rows and the closing lines."""
    out: dict[int | str, list[str]] = {}
    key: int | str = "intro"
    for raw in output.splitlines():
        head = re.match(r"Step (\d)\. ", raw)
        if head:
            key = int(head.group(1))
        elif raw.startswith("Tickets now"):
            key = "table"
        elif key == "table" and not raw.strip():
            key = "end"
        out.setdefault(key, []).append(" ".join(raw.split()))
    return out


def stored_as(lines: list[str]) -> str:
    [ref] = [
        m.group(1) for line in lines if (m := re.fullmatch(rf"SMTP reply 250 2\.0\.0 Ok: stored as ({REF})", line))
    ]
    return ref


def test_the_story_as_a_newcomer_sees_it() -> None:
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "INTAKE_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_DEMO, "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""  # no log noise
    assert elapsed < 15, elapsed  # "a few seconds": nothing waits for the dispatcher's idle poll
    s = steps(proc.stdout)
    assert "UNEXPECTED" not in proc.stdout

    # 1. A new report: a ticket, an acknowledgement that carries its reference, no alert.
    first = stored_as(s[1])
    assert f"ticket {first}, new, Severity 3, organisation acme" in s[1]
    assert "acknowledgement sent to alice@acme.com" in s[1]
    assert f"Subject: Re: {FIRST_SUBJECT} [{first}]" in s[1]
    assert "IRT alert none: nothing security-related" in s[1]

    # 2. The reference in the subject joins the ticket; a follow-up is not acknowledged again.
    assert stored_as(s[2]) == first
    assert f"subject Re: {FIRST_SUBJECT} [{first}]" in s[2]
    assert f"ticket {first}, same ticket, now 2 messages, Severity 3, organisation acme" in s[2]
    assert f"why there reference {first} in the subject; sender is participant of the ticket" in s[2]
    assert "acknowledgement none: follow-up on an existing ticket" in s[2]

    # 3. No reference in the subject: In-Reply-To the acknowledgement (a Message-ID intake made).
    assert stored_as(s[3]) == first
    assert "subject still no data" in s[3]
    [irt_line] = [line for line in s[3] if line.startswith("in-reply-to ")]
    ack_id = irt_line.removeprefix("in-reply-to ")
    assert f"why there replies to {ack_id}, sent by intake for {first}" in s[3]
    assert f"ticket {first}, same ticket, now 3 messages, Severity 3, organisation acme" in s[3]
    assert "acknowledgement none: follow-up on an existing ticket" in s[3]

    # 4. The Spanish breach: Severity 1, the matching phrase, an acknowledgement and the IRT alert.
    breach = stored_as(s[4])
    assert breach != first
    assert f"ticket {breach}, new, Severity 1, SECURITY INCIDENT" in s[4]
    assert 'rule matched security-breach in the subject: "brecha de seguridad"' in s[4]
    assert "acknowledgement sent to maria@cliente.es" in s[4]
    alert = s[4].index("IRT alert sent to irt-lead@example.com")
    assert s[4][alert + 1].startswith(f"Subject: [SECURITY] Severity 1 suspected incident {breach}: Posible brecha")

    # 5. The out-of-office reply is stored on a ticket of its own and deliberately not answered.
    auto = stored_as(s[5])
    assert auto not in (first, breach)
    assert "auto-submitted auto-replied" in s[5]
    assert f"ticket {auto}, new, Severity 3" in s[5]
    assert "acknowledgement refused: automated mail: Auto-Submitted: auto-replied" in s[5]
    assert "ticket records acknowledgement suppressed: automated mail: Auto-Submitted: auto-replied" in s[5]
    assert not [line for line in s[5] if "sent to" in line]

    # 6. The stranger citing the first reference gets a ticket of their own; nothing is disclosed.
    stranger = stored_as(s[6])
    assert stranger not in (first, breach, auto)
    assert f"ticket {stranger}, new, Severity 3" in s[6]
    assert f"first ticket {first} still has 3 messages; participants: alice@acme.com" in s[6]
    assert f"note: mallory@evil.example cited {first} but is not entitled to it; it went to {stranger} instead" in s[6]
    ack = s[6].index("acknowledgement sent to mallory@evil.example")
    assert s[6][ack + 1] == f"Subject: Re: {FIRST_SUBJECT} [{stranger}]"
    assert f"disclosed {first} appears in the reply to the stranger: no" in s[6]
    assert f"outcome the stranger got a ticket of their own ({stranger}); {first} was not disclosed" in s[6]

    # The table of `intake tickets list`: four tickets, the breach first (severity order).
    header, *rows = s["table"][1:]
    assert header.split()[:6] == ["REFERENCE", "SEV", "SEC", "CHANNEL", "MSGS", "DUE"]
    table = {}
    for row in rows:
        m = re.match(rf"({REF}) (\d) (yes )?email (\d+) \S+ (\S+@\S+)", row)
        assert m, row
        table[m.group(1)] = (int(m.group(2)), bool(m.group(3)), int(m.group(4)), m.group(5))
    assert list(table) == [breach, first, auto, stranger]
    assert table == {
        breach: (1, True, 1, "maria@cliente.es"),
        first: (3, False, 3, "alice@acme.com"),
        auto: (3, False, 1, "jordan@globex.example"),
        stranger: (3, False, 1, "mallory@evil.example"),
    }
    assert s["end"][-1] == "Every step went as expected."


async def test_the_report_matches_the_database(tmp_path: Path) -> None:
    lines: list[str] = []
    result = await run_demo(tmp_path, echo=lines.append)
    assert result.ok, lines
    refs = result.references
    assert set(refs) == {"alice@acme.com", "maria@cliente.es", "jordan@globex.example", "mallory@evil.example"}
    store = SqlStore(result.settings.storage.url)
    try:
        tickets = store.run_sync(lambda uow: uow.list_tickets())
        detail = {who: store.run_sync(lambda uow, r=ref: uow.ticket_detail(r)) for who, ref in refs.items()}
    finally:
        store.dispose()
    assert {t["reference"] for t in tickets} == set(refs.values())

    alice = detail["alice@acme.com"]
    assert [m["route"] for m in alice["messages"]] == ["new", "reference", "header"]
    assert alice["participants"] == ["alice@acme.com"]
    assert [(n["kind"], n["recipient"], n["status"]) for n in alice["outbox"]] == [
        ("acknowledgement", "alice@acme.com", "sent")
    ]
    assert any("mallory@evil.example" in n["text"] for n in alice["notes"])

    maria = detail["maria@cliente.es"]
    assert (maria["severity"], bool(maria["security"])) == (1, True)
    assert sorted((n["kind"], n["recipient"], n["status"]) for n in maria["outbox"]) == [
        ("acknowledgement", "maria@cliente.es", "sent"),
        ("irt-alert", "irt-lead@example.com", "sent"),
    ]

    jordan = detail["jordan@globex.example"]
    assert jordan["outbox"] == []
    assert jordan["ack_status"] == "suppressed: automated mail: Auto-Submitted: auto-replied"
    assert jordan["messages"][0]["automation"] == "Auto-Submitted: auto-replied"

    mallory = detail["mallory@evil.example"]
    assert mallory["requester"] == "mallory@evil.example" and len(mallory["messages"]) == 1
    [(kind, to, status, subject)] = [(n["kind"], n["recipient"], n["status"], n["subject"]) for n in mallory["outbox"]]
    assert (kind, to, status) == ("acknowledgement", "mallory@evil.example", "sent")
    assert refs["alice@acme.com"] not in subject and refs["mallory@evil.example"] in subject


def test_keep_leaves_a_database_the_other_commands_open(tmp_path: Path) -> None:
    keep = tmp_path / "demo-db"
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--keep", str(keep)])
    assert result.exit_code == 0, result.output
    config = keep / "intake.toml"
    assert f"intake --config {config} tickets list" in result.output
    breach = stored_as(steps(result.output)[4])
    assert f"intake --config {config} tickets show {breach}" in result.output

    shown = runner.invoke(main, ["--config", str(config), "tickets", "show", breach])
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith(f"{breach}  Severity 1  SECURITY INCIDENT")
    assert "irt-alert to irt-lead@example.com: sent after 1 attempt(s)" in shown.output

    again = runner.invoke(main, ["demo", "--keep", str(keep)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_a_story_that_goes_wrong_says_unexpected_and_exits_1(tmp_path: Path) -> None:
    # Rules without the Spanish phrases: a real misconfiguration, not a mock.
    rules = tmp_path / "english-only.toml"
    rules.write_text(
        '[[rule]]\nname = "security-breach"\ndescription = "English only"\nseverity = 1\n'
        'tags = ["security"]\nphrases = ["data breach*"]\n',
        encoding="utf-8",
    )
    config = tmp_path / "intake.toml"
    config.write_text(f'[rules]\npath = "{rules}"\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["--config", str(config), "demo"])
    assert result.exit_code == 1, result.output
    s = steps(result.output)
    assert f"rules {rules}" in s["intro"]
    breach = stored_as(s[4])
    assert f"ticket {breach}, new, Severity 3" in s[4]
    assert "UNEXPECTED: the breach is Severity 3, security=False" in s[4]
    assert f"UNEXPECTED: expected one IRT alert to irt-lead@example.com naming {breach}, the relay got 0" in s[4]
    assert [line for line in s[5] + s[6] if "UNEXPECTED" in line] == []  # the rest of the story still ran
    assert "UNEXPECTED: 2 thing(s) did not happen as they should:" in s["end"]
    assert "Every step went as expected." not in result.output
