"""Email intake end to end: real SMTP in, real store, acknowledgements through a real relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path

import pytest

from intake.model import Verdict
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, postfix_dsn, ref_of, running_intake, settings_for
from tests.corpus import CORPUS, corpus_files, needs_corpus


@pytest.fixture
async def intake(tmp_path: Path, smtp_relay: RelayStandIn):  # type: ignore[no-untyped-def]
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        yield h


async def test_new_ticket_and_its_acknowledgement(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    original = mail(message_id="<first@acme.com>", subject="Dashboard shows no data")
    reply = await intake.send(original)
    assert reply.code == 250
    ref = ref_of(reply.text)
    [t] = intake.tickets()
    assert t["reference"] == ref and t["requester"] == "alice@acme.com" and t["message_count"] == 1
    [ack] = await smtp_relay.wait_for(1)
    m = ack.message
    assert ack.mail_from == "<>"  # RFC 3834: null reverse-path
    assert ack.rcpt_tos == ("alice@acme.com",)
    assert m["Subject"] == f"Re: Dashboard shows no data [{ref}]"
    assert m["In-Reply-To"] == "<first@acme.com>"
    assert "<first@acme.com>" in m["References"]
    assert m["Auto-Submitted"] == "auto-replied"
    assert m["X-Intake-Loop"]
    assert "support@example.com" in m["From"]
    body = m.get_content()
    assert ref in body and "8 hours" in body
    assert "  Assessed as:      Severity 3 (" in body  # not "Severity: Severity 3"
    assert "keep " + ref + " in the subject" in body
    # The ack's own Message-ID is stored as ours, so replies to it thread.
    await intake.outbox_settled()
    detail = intake.detail(ref)
    assert detail["outbox"][0]["status"] == "sent"
    assert detail["messages"][0]["route"] == "new"


async def test_missing_details_and_cc_note(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    reply = await intake.send(
        mail(sender="bob@gmail.com", to="someone@acme.com", cc="support@example.com", body="It broke.\n")
    )
    assert reply.code == 250
    [ack] = await smtp_relay.wait_for(1)
    body = ack.message.get_content()
    assert "Cc" in body and "To recipient" in body
    for item in ("company name", "phone number", "date and time", "detailed description", "URL"):
        assert item in body, item
    # A complete report asks for nothing.
    await intake.send(
        mail(
            sender="Carol Jones <carol@acme.com>",
            body=(
                "Hello, since 10:30 today (2026-11-21) the revenue dashboard at https://app.example.com/d/7 "
                "shows no data for any of our 40 users, and the export fails with error E1042 every time we "
                "try it. We changed nothing on our side.\n\nCarol Jones\nAcme Corp\n+1 555 010 2030\n"
            ),
        )
    )
    acks = await smtp_relay.wait_for(2)
    assert "please reply with" not in acks[1].message.get_content()


@pytest.mark.parametrize(
    "subject_form",
    [
        "Re: Printer on fire [{ref}]",
        "RE: AW: printer [{lower}]",
        "SV: [{ref}] still burning",
        "Fwd: {ref} update",
        "Re: Printer on fire [{compact}]",  # retyped without the dashes
    ],
)
async def test_follow_up_by_reference(intake, smtp_relay: RelayStandIn, subject_form: str) -> None:  # type: ignore[no-untyped-def]
    ref = ref_of((await intake.send(mail())).text)
    await smtp_relay.wait_for(1)
    subject = subject_form.format(ref=ref, lower=ref.lower(), compact=ref.replace("-", ""))
    reply = await intake.send(mail(subject=subject, body="Any news?\n"))
    assert reply.code == 250 and ref in reply.text
    [t] = intake.tickets()
    assert t["message_count"] == 2
    msgs = intake.detail(ref)["messages"]
    assert msgs[1]["route"] == "reference"
    await asyncio.sleep(0.3)
    await smtp_relay.wait_for(1)  # no second acknowledgement


async def test_follow_up_by_headers_when_the_subject_lost_the_reference(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref = ref_of((await intake.send(mail(message_id="<orig@acme.com>"))).text)
    [ack] = await smtp_relay.wait_for(1)
    ack_id = ack.message["Message-ID"]
    # A reply to the acknowledgement, subject rewritten by the client.
    r1 = await intake.send(mail(subject="printer", in_reply_to=ack_id, references=f"<orig@acme.com> {ack_id}"))
    # A colleague's reply to the customer's own first message.
    r2 = await intake.send(mail(sender="carol@acme.com", subject="same issue here", in_reply_to="<orig@acme.com>"))
    assert ref in r1.text and ref in r2.text
    routes = [m["route"] for m in intake.detail(ref)["messages"]]
    assert routes == ["new", "header", "header"]
    assert len(intake.tickets()) == 1


async def test_other_systems_tags_are_kept(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    await intake.send(mail(subject="[JIRA-123] [Ticket#2024010110000012] Sync fails"))
    [ack] = await smtp_relay.wait_for(1)
    assert "[JIRA-123] [Ticket#2024010110000012] Sync fails" in ack.message["Subject"]


async def test_a_word_shaped_like_a_compact_reference_stays_in_the_subject(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    # "SUPERMODELS" reads as SUP-ERM0-DE1S, whose check passes by chance: no ticket has it, and
    # it is a word of the customer's subject, kept in the acknowledgement's.
    reply = await intake.send(mail(subject="Supermodels photo shoot invoice"))
    [ack] = await smtp_relay.wait_for(1)
    assert ack.message["Subject"] == f"Re: Supermodels photo shoot invoice [{ref_of(reply.text)}]"
    assert not any("not a known ticket" in n["text"] for n in intake.detail(ref_of(reply.text))["notes"])


async def test_redelivery_is_not_a_duplicate_but_another_address_is(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intake.smtp")
    m = mail(message_id="<again@acme.com>")
    first = await intake.send(m)
    second = await intake.send(m)
    assert first.code == second.code == 250
    assert "already stored" in second.text and ref_of(first.text) == ref_of(second.text)
    # The log says what it knows: the duplicate's unit never read the ticket's severity.
    logged = [(r.outcome, r.severity) for r in caplog.records if r.getMessage() == "message received"]  # type: ignore[attr-defined]
    assert logged == [("new", 3), ("duplicate", None)]
    # No Message-ID: the same raw bytes are the same message.
    raw = b"From: dave@acme.com\r\nTo: support@example.com\r\nSubject: no id\r\n\r\nhello\r\n"
    a, b = await intake.send(raw), await intake.send(raw)
    assert ref_of(a.text) == ref_of(b.text)
    # The same message to a second support address is its own delivery (Zammad/osTicket lost mail to this).
    other = await intake.send(m, rcpt=("billing@example.com",))
    assert other.code == 250 and "already" not in other.text
    assert len(intake.tickets()) == 3
    await smtp_relay.wait_for(3)


async def test_storage_failure_answers_451_and_stores_nothing(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra="[storage]\nlock_timeout = 0.3\n")
    async with running_intake(settings) as h:
        # Another process holds the write lock: a real database failure, not a mock.
        blocker = sqlite3.connect(tmp_path / "intake.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            reply = await h.send(mail(message_id="<during-outage@acme.com>"))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert reply.code == 451 and reply.text.startswith("4.3.0")
        assert "Error" not in reply.text and "sqlite" not in reply.text.lower()
        assert h.stats()["tickets"] == 0 and h.stats()["messages"] == 0
        # The sender retries: exactly one ticket, one acknowledgement.
        retry = await h.send(mail(message_id="<during-outage@acme.com>"))
        assert retry.code == 250
        assert h.stats()["tickets"] == 1
        await smtp_relay.wait_for(1)


async def test_a_failed_sync_of_the_log_answers_451_and_the_retry_is_a_duplicate(
    tmp_path: Path, smtp_relay: RelayStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import storage.store

    real = os.fdatasync
    failures = [OSError(errno.EIO, "Input/output error")]

    def disk(fd: int) -> None:
        """A disk whose sync fails once, for the commit that stored the message (not for the
        outbox's turns before it): that cannot be produced for real here."""
        with contextlib.closing(sqlite3.connect(tmp_path / "intake.db")) as other:
            stored = other.execute("SELECT count(*) FROM message").fetchone()[0]
        if stored and failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(storage.store.os, "fdatasync", disk)
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        # COMMIT went through but the disk did not confirm it: no 250 for what may be lost.
        reply = await h.send(mail(message_id="<unsynced@acme.com>"))
        assert reply.code == 451 and reply.text.startswith("4.3.0")
        assert "Input/output" not in reply.text and "sync" not in reply.text
        # The sender retries: the message was stored after all, so no second ticket or acknowledgement.
        retry = await h.send(mail(message_id="<unsynced@acme.com>"))
        assert retry.code == 250 and "already stored" in retry.text
        assert (h.stats()["tickets"], h.stats()["messages"]) == (1, 1)
        await smtp_relay.wait_for(1)
        assert (await h.send(mail())).code == 250  # and the listener serves on


async def test_unexpected_exception_answers_451_neutrally(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:

        class BrokenRules:
            """A bug cannot be produced for real: stand in for a rule set that raises."""

            def classify(self, **_: object) -> Verdict:
                raise RuntimeError("secret internal detail")

        rules = h.app.service.rules
        h.app.service.rules = BrokenRules()  # type: ignore[assignment]
        reply = await h.send(mail())
        assert reply.code == 451 and reply.text.startswith("4.3.0")
        assert "secret" not in reply.text and "RuntimeError" not in reply.text
        # The listener keeps serving.
        h.app.service.rules = rules
        assert (await h.send(mail())).code == 250


async def test_relay_down_then_up_delivers_once(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    smtp_relay.stop()
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        ref = ref_of((await h.send(mail())).text)
        await asyncio.sleep(0.6)
        detail = h.detail(ref)
        [note] = detail["outbox"]
        assert note["status"] == "pending" and note["attempts"] >= 1 and note["last_error"]
        smtp_relay.start()
        await h.outbox_settled()
        await smtp_relay.wait_for(1)
        await asyncio.sleep(0.5)
        await smtp_relay.wait_for(1)  # still exactly one
        assert h.detail(ref)["outbox"][0]["status"] == "sent"


async def test_acknowledgements_survive_a_restart(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    smtp_relay.stop()
    settings = settings_for(tmp_path, relay_port=smtp_relay.port)
    async with running_intake(settings) as h:
        await h.send(mail())
    smtp_relay.start()
    async with running_intake(settings) as h2:
        await h2.outbox_settled()
    await smtp_relay.wait_for(1)


async def test_limits_and_bad_recipients(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = "[email]\nmax_message_bytes = 20000\nmax_recipients = 2\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        big = mail(body="x" * 30000)
        reply = await h.send(big)
        assert reply.code == 552 and "20000" in reply.text
        unknown = await h.send(mail(), rcpt=("nobody@example.com",))
        assert unknown.code == 550
        assert (await h.send(mail())).code == 250
        assert h.stats()["tickets"] == 1


async def test_malformed_input_gets_an_answer(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    cases = [
        b"",  # empty
        b"no headers at all, just text\r\n",
        b"Subject: =?utf-8?q?broken\r\nFrom: x@acme.com\r\n\r\n\xff\xfe\x00 bytes\r\n",
        b"From: x@acme.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nContent-Type: text/plain;"
        b" charset=no-such-charset\r\n\r\nhi\r\n",  # no closing boundary, unknown charset
        b"From: x@acme.com\r\nContent-Type: text/plain; charset=uft-8\r\nSubject: \xe9t\xe9\r\n\r\ncaf\xe9\r\n",
    ]
    for raw in cases:
        reply = await intake.send(raw, mail_from="x@acme.com")
        assert reply.code == 250, (raw[:40], reply)
    assert intake.stats()["messages"] == len(cases)


@needs_corpus
async def test_every_corpus_file_is_taken_in_or_refused_clearly(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    files = corpus_files()
    assert len(files) > 100
    outcomes: dict[int, list[str]] = {}
    replies: dict[str, str] = {}
    for f in files:
        reply = await intake.send(f.read_bytes(), mail_from="sender@corpus.example")
        outcomes.setdefault(reply.code, []).append(f.name)
        replies[str(f)] = reply.text
        assert reply.code in (250, 552), (f, reply)
    stored = [n for n, text in replies.items() if "stored as" in text and "already" not in text]
    duplicates = [n for n, text in replies.items() if "already stored" in text]
    assert len(stored) + len(duplicates) + len(outcomes.get(552, [])) == len(files)
    stats = intake.stats()
    assert stats["messages"] == len(stored)
    assert len(duplicates) <= 3  # files that really share a Message-ID (msg_12 / msg_12a ...)
    # Bounces and auto-replies among them are stored, never acknowledged.
    bounces = sorted((CORPUS / "flufl-bounce").glob("*.eml"))
    await intake.outbox_settled(timeout=30)
    acked_to = {m.rcpt_tos[0] for m in smtp_relay.messages}
    assert all("mailer-daemon" not in a.lower() and "postmaster" not in a.lower() for a in acked_to)
    assert len(smtp_relay.messages) < len(files) - len(bounces) + 5


DATA = Path(__file__).resolve().parent.parent / "data" / "email"

BEHIND_A_PLACEHOLDER = [
    # (file: the plain part is a placeholder or cut short, the report is in the HTML; its words)
    ("alt_placeholder_entourage.eml", "I think we were hacked overnight."),
    ("alt_placeholder_es.eml", "nos hackearon la cuenta de administración"),
    ("alt_plain_truncated.eml", "We believe we were hacked"),
]


@pytest.mark.parametrize(("name", "report"), BEHIND_A_PLACEHOLDER, ids=[n for n, _ in BEHIND_A_PLACEHOLDER])
async def test_a_breach_reported_only_in_the_html_pages_the_irt_lead(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, name: str, report: str
) -> None:
    """The plain part says "This message is in HTML format" (or stops mid-word): the keyword
    rules read the HTML's text, so the ticket is a security incident and the IRT lead is paged,
    and what staff read is the report."""
    reply = await intake.send((DATA / name).read_bytes())
    assert reply.code == 250, reply
    ref = ref_of(reply.text)
    detail = intake.detail(ref)
    assert (detail["severity"], detail["security"]) == (1, True)
    [stored] = detail["messages"]
    assert report in stored["body"] and stored["html"]
    assert "HTML" not in stored["body"]
    [alert] = [n for n in detail["outbox"] if n["kind"] == "irt-alert"]
    assert alert["recipient"] == "irt-lead@example.com"
    sent = {m.rcpt_tos[0]: m.message for m in await smtp_relay.wait_for(2)}
    assert ref in str(sent["irt-lead@example.com"]["Subject"])


async def test_the_checklist_reads_the_report_in_the_html(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """The report behind Entourage's placeholder gives a phone number, a time and a full
    description: the acknowledgement asks for none of them."""
    reply = await intake.send((DATA / "alt_placeholder_entourage.eml").read_bytes())
    ref = ref_of(reply.text)
    await intake.outbox_settled()
    [ack] = [m for m in smtp_relay.messages if m.rcpt_tos == ("dana.whitfield@acme.com",)]
    text = " ".join(ack.message.get_content().split())
    assert ref in text
    for detail in ("phone number", "date and time", "detailed description"):
        assert detail not in text, detail


async def test_an_ordinary_alternative_keeps_its_plain_part(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """Outlook's pair whose HTML alone carries a confidentiality notice and a tracking pixel:
    the stored body is the plain part, as the customer wrote it."""
    reply = await intake.send((DATA / "alt_html_footer.eml").read_bytes())
    assert reply.code == 250, reply
    detail = intake.detail(ref_of(reply.text))
    [stored] = detail["messages"]
    assert not stored["html"]
    assert stored["body"].startswith("Hello,\n\nsince 10:30 today the revenue dashboard")
    assert stored["body"].endswith("Acme Corp | +1 555 010 2030")
    assert "CONFIDENTIALITY" not in stored["body"]
    assert (detail["severity"], detail["security"]) == (3, False)


async def test_auto_replies_and_bounces_are_stored_not_acknowledged(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    r1 = await intake.send(mail(subject="Out of office", headers={"Auto-Submitted": "auto-replied"}))
    r2 = await intake.send(mail(headers={"Precedence": "bulk", "List-Id": "<news.acme.com>"}))
    r3 = await intake.send(mail(sender="MAILER-DAEMON@mx.acme.com", subject="Undelivered Mail"), mail_from="")
    for r in (r1, r2, r3):
        assert r.code == 250
    await asyncio.sleep(0.3)
    assert smtp_relay.messages == []
    for t in intake.tickets():
        assert t["ack_status"].startswith("suppressed"), t


async def test_a_bounce_of_our_acknowledgement_marks_it_undeliverable(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref = ref_of((await intake.send(mail(sender="gone@acme.com"))).text)
    [ack] = await smtp_relay.wait_for(1)
    ack_id = ack.message["Message-ID"]
    dsn = (
        "From: Mail Delivery System <MAILER-DAEMON@mx.acme.com>\r\nTo: support@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nThe mail system: <gone@acme.com>: user unknown\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.acme.com\r\n\r\n"
        "Final-Recipient: rfc822; gone@acme.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: support@example.com\r\nTo: gone@acme.com\r\nMessage-ID: {ack_id}\r\n"
        f"Subject: {ack.message['Subject']}\r\n"
        "--b1--\r\n"
    ).encode()
    reply = await intake.send(dsn, mail_from="")
    assert reply.code == 250 and ref in reply.text
    detail = intake.detail(ref)
    assert detail["outbox"][0]["status"] == "undeliverable"
    assert any("undeliverable" in n["text"] for n in detail["notes"])
    await asyncio.sleep(0.3)
    await smtp_relay.wait_for(1)


async def test_a_delay_warning_leaves_the_acknowledgement_sent(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """Postfix as the relay warns a non-null reverse-path (outbound.bounce_address) that our
    message is still being retried (delay_warning_time): the warning joins the ticket, is not
    answered, and the acknowledgement stays sent, for it may well arrive. Postfix's bounce,
    when it gives up, marks it undeliverable."""
    ref = ref_of((await intake.send(mail(sender="slow@acme.com"))).text)
    [ack] = await smtp_relay.wait_for(1)
    await intake.outbox_settled()
    warning = await intake.send(postfix_dsn(ack.content, recipient="slow@acme.com", delayed=True), mail_from="")
    assert warning.code == 250 and ref_of(warning.text) == ref
    detail = intake.detail(ref)
    assert len(detail["messages"]) == 2 and detail["outbox"][0]["status"] == "sent"
    bounce = await intake.send(postfix_dsn(ack.content, recipient="slow@acme.com"), mail_from="")
    assert bounce.code == 250 and ref_of(bounce.text) == ref
    assert intake.detail(ref)["outbox"][0]["status"] == "undeliverable"
    await asyncio.sleep(0.3)
    await smtp_relay.wait_for(1)


async def test_a_stranger_citing_a_reference_gets_a_ticket_of_their_own(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref = ref_of((await intake.send(mail(subject="Our invoices"))).text)
    reply = await intake.send(
        mail(sender="mallory@evil.example", subject=f"Re: Our invoices [{ref}]", body="send me the invoices")
    )
    other = ref_of(reply.text)
    assert other != ref
    assert len(intake.detail(ref)["messages"]) == 1
    assert any("mallory@evil.example" in n["text"] for n in intake.detail(ref)["notes"])
    acks = await smtp_relay.wait_for(2)
    to_mallory = next(a for a in acks if a.rcpt_tos == ("mallory@evil.example",))
    assert ref not in to_mallory.content.decode() and other in to_mallory.message["Subject"]


async def test_lmtp_answers_once_per_recipient(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    extra = '[email]\nprotocol = "lmtp"\n'
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)

        async def line() -> bytes:
            return await asyncio.wait_for(reader.readline(), 5)

        async def cmd(text: str) -> bytes:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()
            resp = await line()
            while resp[3:4] == b"-":
                resp = await line()
            return resp

        assert (await line()).startswith(b"220")
        assert (await cmd("LHLO mta.test")).startswith(b"250")
        assert (await cmd("MAIL FROM:<alice@acme.com>")).startswith(b"250")
        assert (await cmd("RCPT TO:<support@example.com>")).startswith(b"250")
        assert (await cmd("RCPT TO:<billing@example.com>")).startswith(b"250")
        assert (await cmd("DATA")).startswith(b"354")
        writer.write(mail().as_bytes().replace(b"\n", b"\r\n") + b".\r\n")
        await writer.drain()
        replies = [await line(), await line()]
        assert all(r.startswith(b"250") for r in replies), replies
        writer.write(b"QUIT\r\n")
        await writer.drain()
        writer.close()
        assert h.stats()["tickets"] == 2


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
async def test_a_pipelined_transaction_is_taken_in(tmp_path: Path, smtp_relay: RelayStandIn, protocol: str) -> None:
    """EHLO (LHLO) offers PIPELINING, as Postfix, Exim and Dovecot's LMTP do (RFC 2033 requires
    it of an LMTP server): a sender sends MAIL, both RCPTs and DATA in one write and reads the
    replies together, in order; then the message, and QUIT right behind its final dot."""
    extra = f'[email]\nprotocol = "{protocol}"\n'
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)

        async def reply() -> bytes:
            lines = [await asyncio.wait_for(reader.readline(), 5)]
            while lines[-1][3:4] == b"-":
                lines.append(await asyncio.wait_for(reader.readline(), 5))
            return b"".join(lines)

        assert (await reply()).startswith(b"220")
        writer.write(b"LHLO mta.test\r\n" if protocol == "lmtp" else b"EHLO mta.test\r\n")
        assert b"250-PIPELINING\r\n" in await reply()
        writer.write(
            b"MAIL FROM:<alice@acme.com>\r\nRCPT TO:<support@example.com>\r\n"
            b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<billing@example.com>\r\nDATA\r\n"
        )
        replies = [await reply() for _ in range(5)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"550", b"250", b"354"], replies
        writer.write(mail(subject="Pipelined").as_bytes().replace(b"\n", b"\r\n") + b".\r\nQUIT\r\n")
        finals = [await reply() for _ in range(2 if protocol == "lmtp" else 1)]
        assert all(r.startswith(b"250 2.0.0") for r in finals), finals
        assert (await reply()).startswith(b"221")
        writer.close()
        assert h.stats()["tickets"] == 2


async def test_shutdown_mid_session_gets_421_and_loses_nothing(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        await reader.readline()
        writer.write(b"EHLO mta.test\r\nMAIL FROM:<alice@acme.com>\r\n")
        await writer.drain()
        stored = await h.send(mail())
        assert stored.code == 250
        stop = asyncio.create_task(h.app.email_listener.stop(grace=1.0))  # type: ignore[union-attr]
        data = await asyncio.wait_for(reader.read(4096), 5)
        while b"421" not in data:
            more = await asyncio.wait_for(reader.read(4096), 5)
            if not more:
                break
            data += more
        assert b"421 4.3.2" in data
        await stop
        writer.close()
        # New connections are refused once stopped.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", h.port), timeout=1).close()
        assert h.stats()["tickets"] == 1


async def test_shutdown_lets_a_message_still_arriving_finish(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """A message whose bytes are still arriving after the 354 when intake is told to stop is
    waited for (up to the grace), stored and answered 250, rather than cut off with 421."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        await reader.readline()
        writer.write(b"EHLO mta.test\r\nMAIL FROM:<alice@acme.com>\r\nRCPT TO:<support@example.com>\r\nDATA\r\n")
        await writer.drain()
        replies = b""
        while b"354" not in replies:
            replies += await asyncio.wait_for(reader.read(4096), 5)
        raw = mail(subject="Sent slowly").as_bytes().replace(b"\n", b"\r\n")
        writer.write(raw[:100])
        await writer.drain()
        stop = asyncio.create_task(h.app.email_listener.stop(grace=5.0))  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        assert not stop.done()  # waiting for the rest of the message
        # Meanwhile a new connection is answered 421, not reset: its sender retries later.
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", h.port)
        assert (await asyncio.wait_for(late_reader.readline(), 5)).startswith(b"421 4.3.2")
        late_writer.close()
        writer.write(raw[100:] + b"\r\n.\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), 5)
        assert answer.startswith(b"250 2.0.0") and b"stored as" in answer, answer
        writer.write(b"MAIL FROM:<alice@acme.com>\r\n")  # and nothing more, now
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"421 4.3.2")
        await asyncio.wait_for(stop, 5)
        writer.close()
        assert h.stats()["tickets"] == 1


def test_acknowledgement_headers_parse_cleanly() -> None:
    from adapters.email.sender import build_message
    from intake.model import OutgoingEmail

    raw = build_message(
        OutgoingEmail(
            to=("a@b.c",),
            subject="Re: x [SUP-0000-0000]",
            body="hi",
            message_id="m@x",
            from_address="support@example.com",
            headers=(("Auto-Submitted", "auto-replied"),),
        )
    )
    m = message_from_bytes(raw, policy=email_policy.default)
    assert m["Auto-Submitted"] == "auto-replied" and m.defects == []


async def test_an_attachment_over_the_cap_is_not_kept_and_the_customer_is_told(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    extra = "[email]\nmax_attachment_bytes = 100000\n"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        m = mail(subject="Logs attached")
        m.add_attachment(b"x" * 300_000, maintype="application", subtype="zip", filename="huge-logs.zip")
        m.add_attachment(b"small log line\n" * 10, maintype="text", subtype="plain", filename="small.txt")
        reply = await h.send(m)
        assert reply.code == 250
        ref = ref_of(reply.text)
        msg = h.detail(ref)["messages"][0]
        kept = {a["filename"]: a["kept"] for a in msg["attachments"]}
        assert kept == {"huge-logs.zip": False, "small.txt": True}
        assert msg["raw_size"] < 100_000  # the big file's bytes were cut out of what is stored
        raw = h.read(lambda uow: uow.raw_message(msg["id"]))
        assert b"huge-logs.zip" in raw and b"not kept" in raw and b"small.txt" in raw
        await h.outbox_settled()
        [ack] = await smtp_relay.wait_for(1)
        body = ack.message.get_content()
        assert "huge-logs.zip" in body and "small.txt" not in body


@pytest.mark.parametrize("date", ["Fri, 31 Dec 9999 23:59:59 -1200", "Mon, 1 Jan 0001 00:00:00 +1400"])
async def test_a_date_past_the_calendars_end_in_utc_is_no_date(intake, date: str) -> None:  # type: ignore[no-untyped-def]
    """A Date is stored in UTC: "31 Dec 9999 23:59:59 -1200" is past datetime's last day there,
    and the conversion raised, so every delivery of the message got 451 (on SQLite and
    PostgreSQL alike). Such a Date is no date, as an unreadable one is."""
    raw = f"From: alice@acme.com\r\nTo: support@example.com\r\nSubject: Export\r\nDate: {date}\r\n\r\nIt fails.\r\n"
    reply = await intake.send(raw.encode(), mail_from="alice@acme.com")
    assert reply.code == 250, reply
    [m] = intake.detail(ref_of(reply.text))["messages"]
    assert m["sender"] == "alice@acme.com"


async def test_the_acknowledgement_says_an_automatic_severity_is_a_first_assessment(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """The policy: "Once a support specialist analyzes the issue, he or she will assign a
    severity level." Keyword rules only raise security incidents (Severity 1 by policy, final);
    every other report gets the default level, so "Production is down for all users" read
    "Severity 3 ... within 8 hours" with nothing to say that a person would look again."""
    await intake.send(mail(subject="Production is down", body="Production is down for all our users since 09:10.\n"))
    await intake.send(
        mail(
            subject="No puedo exportar",
            body="Hola, desde esta mañana no podemos exportar los informes de la plataforma. ¿Pueden ayudarnos?\n",
            sender="Lucía <lucia@acme.com>",
        )
    )
    await intake.send(mail(subject="Data breach", body="We had a data breach last night.\n", sender="bob@acme.com"))
    by_recipient = {m.rcpt_tos[0]: m.message.get_content() for m in await smtp_relay.wait_for(4)}
    english, spanish = by_recipient["alice@acme.com"], by_recipient["lucia@acme.com"]
    assert "This first assessment is automatic: a support specialist confirms" in english
    assert "Esta primera clasificación es automática: un especialista de soporte" in spanish
    security = by_recipient["bob@acme.com"]
    assert "Severity 1" in security and "first assessment" not in security
