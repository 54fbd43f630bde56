"""adapters.email.sender: rendering (pure) and delivery to a real aiosmtpd relay on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.email.sender import MAX_REFERENCES, SmtpRelaySender, build_message
from intake.errors import ChannelUnavailableError, PermanentSendError, TransientSendError
from intake.headers import ELLIPSIS
from intake.model import OutgoingEmail

BODY = "Bonjour Zoë,\n\nWe received your message — ticket INC-42 (Severity 2).\n\nGrüße, 日本語 ✓\n"

EXPECTED_HEADERS = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "auto-submitted",
    "x-intake-loop",
    "content-type",
    "content-transfer-encoding",
    "mime-version",
]


def outgoing(**changes: Any) -> OutgoingEmail:
    base = OutgoingEmail(
        to=("alice@customer.example",),
        subject="[INC-42] Re: Login broken",
        body=BODY,
        message_id="ack.inc-42.1@intake.example",
        from_address="support@intake.example",
        from_name="Support Desk",
        envelope_from="",
        in_reply_to="orig-1@customer.example",
        references=("root-0@customer.example", "orig-1@customer.example"),
        headers=(("Auto-Submitted", "auto-replied"), ("X-Intake-Loop", "loop-token-7f3a")),
    )
    return dataclasses.replace(base, **changes)


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=email_policy.default)


def text_of(msg: EmailMessage) -> str:
    """The decoded body with the wire's CRLF line endings turned back into "\\n"."""
    return str(msg.get_content()).replace("\r\n", "\n")


def header_names(data: bytes) -> list[str]:
    return [name.lower() for name in parse(data).keys()]


def header_lines(data: bytes) -> list[bytes]:
    return data.partition(b"\r\n\r\n")[0].split(b"\r\n")


def header_block(data: bytes, name: bytes) -> list[bytes]:
    """The wire lines of one header: its field line and its continuation lines."""
    lines = header_lines(data)
    start = next(i for i, line in enumerate(lines) if line.lower().startswith(name.lower() + b":"))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line[:1].isspace():
            break
        block.append(line)
    return block


# ---------------------------------------------------------------------------------------------
# build_message: pure rendering


def test_build_message_writes_every_header_once_in_order() -> None:
    data = build_message(outgoing(), date=datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC))
    msg = parse(data)

    assert header_names(data) == EXPECTED_HEADERS
    assert msg["From"] == "Support Desk <support@intake.example>"
    assert msg["To"] == "alice@customer.example"
    assert msg["Subject"] == "[INC-42] Re: Login broken"
    assert msg["Date"] == "Mon, 06 May 2024 07:08:09 +0000"
    assert msg["Message-ID"] == "<ack.inc-42.1@intake.example>"
    assert msg["In-Reply-To"] == "<orig-1@customer.example>"
    assert msg["References"] == "<root-0@customer.example> <orig-1@customer.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Intake-Loop"] == "loop-token-7f3a"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"


def test_build_message_is_crlf_7bit_and_round_trips_a_non_ascii_body() -> None:
    data = build_message(outgoing())

    assert data.isascii()
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] in {"quoted-printable", "base64"}
    assert text_of(msg) == BODY


def test_ascii_body_stays_7bit_and_readable() -> None:
    data = build_message(outgoing(body="Thanks, we are on it.\n"))
    assert parse(data)["Content-Transfer-Encoding"] == "7bit"
    assert data.endswith(b"\r\n\r\nThanks, we are on it.\r\n")


def test_long_body_lines_are_wrapped_under_the_line_limits() -> None:
    body = "é" + "x" * 5000 + "\n" + "y" * 2000 + "\n"
    data = build_message(outgoing(body=body))

    assert max(len(line) for line in data.split(b"\r\n")) <= 78
    assert text_of(parse(data)) == body


def test_body_controls_and_lone_surrogates_are_removed() -> None:
    data = build_message(outgoing(body="nul\x00 esc\x1b del\x7f bad\udce9 tab\tok\n"))
    assert text_of(parse(data)) == "nul esc del bad\ufffd tab\tok\n"


def test_non_ascii_names_and_subjects_become_encoded_words() -> None:
    data = build_message(outgoing(from_name="Zoë Ünïcode Support", subject="Réf: accès refusé 日本語"))

    assert b"=?utf-8?" in b"".join(header_block(data, b"From"))
    assert b"=?utf-8?" in b"".join(header_block(data, b"Subject"))
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "Zoë Ünïcode Support"
    assert msg["From"].addresses[0].addr_spec == "support@intake.example"
    assert msg["Subject"] == "Réf: accès refusé 日本語"


def test_ascii_display_name_with_specials_is_quoted() -> None:
    data = build_message(outgoing(from_name='Bob "the" Builder, <Ops>'))
    address = parse(data)["From"].addresses[0]
    assert address.display_name == 'Bob "the" Builder, <Ops>'
    assert address.addr_spec == "support@intake.example"


INJECTIONS = [
    "Hi\r\nBcc: victim@example.com",
    "\nX-Evil: 1",
    "Hi\rX-Evil: 1",
    "Hi\u2028X-Evil: 1",
    "Hi\u2029Bcc: victim@example.com",
    "Hi\x85X-Evil: 1",
    # An encoded word whose text is a CRLF: the stdlib would decode it and, before Python
    # 3.11.10 (CVE-2024-6923), write the CRLF back raw.
    "Re: =?utf-8?q?=0D=0ABcc:_victim@example.com?=",
    "=?utf-8?b?DQpYLUV2aWw6IDE=?=",
]


@pytest.mark.parametrize("subject", INJECTIONS)
def test_header_injection_in_the_subject_adds_no_header(subject: str) -> None:
    data = build_message(outgoing(subject=subject))

    assert header_names(data) == EXPECTED_HEADERS
    assert parse(data).get("Bcc") is None
    assert parse(data).get("X-Evil") is None
    decoded = parse(data)["Subject"]
    assert "\r" not in decoded and "\n" not in decoded and "\u2028" not in decoded


@pytest.mark.parametrize("name", INJECTIONS)
def test_header_injection_in_the_display_name_adds_no_header(name: str) -> None:
    data = build_message(outgoing(from_name=name))

    assert header_names(data) == EXPECTED_HEADERS
    addresses = parse(data)["From"].addresses
    assert [a.addr_spec for a in addresses] == ["support@intake.example"]


def test_encoded_word_syntax_from_a_customer_stays_literal_text() -> None:
    data = build_message(outgoing(subject="Re: =?utf-8?q?hello?= world", from_name="=?utf-8?q?CEO?="))
    msg = parse(data)

    assert msg["Subject"] == "Re: =?utf-8?q?hello?= world"
    assert msg["From"].addresses[0].display_name == "=?utf-8?q?CEO?="


def test_a_thousand_character_non_ascii_subject_is_folded_and_capped() -> None:
    subject = ("Störung im Rechenzentrum – 日本語 " * 40)[:1000]
    data = build_message(outgoing(subject=subject))

    block = header_block(data, b"Subject")
    assert len(block) > 1  # folded
    assert all(len(line) <= 78 for line in block)
    assert all(line.startswith(b" ") for line in block[1:])
    decoded = parse(data)["Subject"]
    assert len(decoded) == 200
    assert decoded.endswith(ELLIPSIS)
    assert decoded == " ".join(subject.split())[:199].rstrip() + ELLIPSIS


def test_a_long_ascii_subject_is_folded_by_the_policy_at_spaces() -> None:
    subject = " ".join(f"word{i}" for i in range(30))
    data = build_message(outgoing(subject=subject))

    block = header_block(data, b"Subject")
    assert len(block) > 1
    assert all(len(line) <= 78 for line in block)
    assert b"=?" not in b"".join(block)  # plain text, no encoding needed
    assert parse(data)["Subject"] == subject


def test_every_header_line_fits_78_columns_with_long_references() -> None:
    references = tuple(f"thread-{i}.{'x' * 20}@mail.customer.example" for i in range(8))
    data = build_message(outgoing(references=references, from_name="Ü" * 80, to=("a@x.example",) * 5))

    assert all(len(line) <= 78 for line in header_lines(data))
    assert parse(data)["References"] == " ".join(f"<{r}>" for r in references)


def test_references_keep_the_root_and_the_nearest_and_drop_malformed_ids() -> None:
    ids = [f"m{i}@customer.example" for i in range(40)]
    data = build_message(outgoing(references=(ids[0], "not an id", "<bad<id>", *ids[1:], "<m39@customer.example>")))

    kept = re.findall(r"<([^>]+)>", parse(data)["References"])
    assert len(kept) == MAX_REFERENCES
    assert kept == [ids[0], *ids[-(MAX_REFERENCES - 1) :]]


def test_in_reply_to_accepts_brackets_and_is_left_out_when_malformed() -> None:
    assert parse(build_message(outgoing(in_reply_to="<x@y>")))["In-Reply-To"] == "<x@y>"
    data = build_message(outgoing(in_reply_to="evil\r\nBcc: a@b", references=()))
    assert "in-reply-to" not in header_names(data)
    assert "references" not in header_names(data)


def test_extra_header_values_are_cleaned() -> None:
    data = build_message(outgoing(headers=(("X-Intake-Loop", "tok\r\nBcc: victim@example.com"),)))

    assert parse(data)["X-Intake-Loop"] == "tok Bcc: victim@example.com"
    assert parse(data).get("Bcc") is None


@pytest.mark.parametrize(
    "name",
    ["", "X Evil", "X-Evil:", "X-Evil\r\nBcc", "Ünï", "X-\x7f", "Bcc", "subject", "Content-Type", "MIME-Version"],
)
def test_extra_header_names_that_are_invalid_or_owned_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="header"):
        build_message(outgoing(headers=((name, "1"),)))


@pytest.mark.parametrize(
    "changes",
    [
        {"to": ()},
        {"to": ("alice@customer.example\r\nBcc: victim@example.com",)},
        {"to": ("alice smith@customer.example",)},
        {"to": ("<alice@customer.example>",)},
        {"to": ("no-at-sign",)},
        {"from_address": "support@intake.example, victim@example.com"},
        {"message_id": "<ack@intake.example>"},
        {"message_id": "no-at-sign"},
        {"message_id": "ack@intake.example\r\nBcc: x"},
    ],
)
def test_invalid_addresses_and_message_ids_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_message(outgoing(**changes))


def test_date_must_be_timezone_aware_and_keeps_its_offset() -> None:
    with pytest.raises(ValueError, match="timezone"):
        build_message(outgoing(), date=datetime(2024, 1, 1))
    cet = timezone(timedelta(hours=1))
    assert parse(build_message(outgoing(), date=datetime(2024, 1, 1, 12, tzinfo=cet)))["Date"].endswith("+0100")


# ---------------------------------------------------------------------------------------------
# SmtpRelaySender against the relay stand-in


def sender_for(relay: Any, **kwargs: Any) -> SmtpRelaySender:
    return SmtpRelaySender(host=relay.host, port=relay.port, timeout=5.0, local_hostname="intake.test", **kwargs)


async def test_delivers_with_the_null_reverse_path_and_every_header(smtp_relay: Any) -> None:
    await sender_for(smtp_relay).send(outgoing())

    [captured] = await smtp_relay.wait_for(1)
    # aiosmtpd reports "<>" only when the client sent MAIL FROM:<> (a bare "MAIL FROM:" gets 501).
    assert captured.mail_from == "<>"
    assert captured.rcpt_tos == ("alice@customer.example",)
    msg = captured.message
    assert [name.lower() for name in msg.keys()] == EXPECTED_HEADERS
    assert msg["From"] == "Support Desk <support@intake.example>"
    assert msg["To"] == "alice@customer.example"
    assert msg["Subject"] == "[INC-42] Re: Login broken"
    assert msg["Message-ID"] == "<ack.inc-42.1@intake.example>"
    assert msg["In-Reply-To"] == "<orig-1@customer.example>"
    assert msg["References"] == "<root-0@customer.example> <orig-1@customer.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Intake-Loop"] == "loop-token-7f3a"
    assert text_of(msg) == BODY


async def test_delivers_with_a_bounce_address_to_every_recipient(smtp_relay: Any) -> None:
    email = outgoing(
        envelope_from="bounces+inc-42@intake.example",
        to=("alice@customer.example", "bob@customer.example"),
    )
    await sender_for(smtp_relay).send(email)

    [captured] = await smtp_relay.wait_for(1)
    assert captured.mail_from == "bounces+inc-42@intake.example"
    assert captured.rcpt_tos == ("alice@customer.example", "bob@customer.example")
    assert captured.message["To"] == "alice@customer.example, bob@customer.example"


async def test_what_the_relay_receives_is_exactly_what_build_message_renders(
    smtp_relay: Any,
) -> None:
    body = "A line\n.\n..two dots\nFrom the start\n"  # SMTP dot-stuffing must be transparent
    email = outgoing(body=body, subject="Grüße")
    await sender_for(smtp_relay).send(email)

    [captured] = await smtp_relay.wait_for(1)
    expected = build_message(email, date=captured.message["Date"].datetime)
    assert captured.content == expected
    assert text_of(captured.message) == body


@pytest.mark.parametrize("subject", INJECTIONS)
async def test_injection_through_the_relay_adds_no_header_and_no_recipient(smtp_relay: Any, subject: str) -> None:
    await sender_for(smtp_relay).send(outgoing(subject=subject, from_name=subject))

    [captured] = await smtp_relay.wait_for(1)
    assert captured.rcpt_tos == ("alice@customer.example",)
    assert [name.lower() for name in captured.message.keys()] == EXPECTED_HEADERS


async def test_relay_down_is_transient_and_delivery_resumes_when_it_is_back(smtp_relay: Any) -> None:
    sender = sender_for(smtp_relay)
    smtp_relay.stop()

    with pytest.raises(ChannelUnavailableError) as failure:  # the relay's state, not this note's
        await sender.send(outgoing())
    assert f"{smtp_relay.host}:{smtp_relay.port}" in str(failure.value)
    with pytest.raises(ChannelUnavailableError, match="unreachable"):
        await sender.check()

    smtp_relay.start()
    await sender.check()  # connects and greets, and keeps the connection for the send
    assert smtp_relay.transactions == 0
    await sender.send(outgoing())
    [captured] = await smtp_relay.wait_for(1)
    assert captured.message["Message-ID"] == "<ack.inc-42.1@intake.example>"


async def test_530_authentication_required_is_the_relay_unavailable_not_the_message(smtp_relay: Any) -> None:
    smtp_relay.fail_next("530 5.7.0 Authentication required", stage="MAIL")

    with pytest.raises(ChannelUnavailableError, match="530"):  # our account: held, not failed for good
        await sender_for(smtp_relay).send(outgoing())


async def test_a_kept_connection_the_relay_closes_with_421_is_replaced_at_once(smtp_relay: Any) -> None:
    sender = sender_for(smtp_relay, max_idle=1)
    await sender.send(outgoing())  # its connection is kept
    smtp_relay.fail_next("421 4.4.2 idle for too long, closing", stage="MAIL")

    await sender.send(outgoing(message_id="ack.inc-42.2@intake.example"))  # a fresh connection, no error
    assert len(await smtp_relay.wait_for(2)) == 2
    assert smtp_relay.transactions == 3
    await sender.close()


async def test_421_closing_is_the_relay_unavailable_not_the_message(smtp_relay: Any) -> None:
    smtp_relay.fail_next("421 4.3.2 service shutting down", stage="MAIL")

    with pytest.raises(ChannelUnavailableError, match="421"):
        await sender_for(smtp_relay).send(outgoing())
    await sender_for(smtp_relay).send(outgoing())
    await smtp_relay.wait_for(1)


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
async def test_a_4xx_reply_is_transient_and_the_next_attempt_succeeds(smtp_relay: Any, stage: str) -> None:
    sender = sender_for(smtp_relay)
    smtp_relay.fail_next("451 4.3.0 try later", stage=stage)

    with pytest.raises(TransientSendError) as failure:
        await sender.send(outgoing())
    assert not isinstance(failure.value, ChannelUnavailableError)  # this message's, for now
    message = str(failure.value)
    assert "451" in message
    assert f"{smtp_relay.host}:{smtp_relay.port}" in message
    assert smtp_relay.messages == []

    await sender.send(outgoing())
    await smtp_relay.wait_for(1)
    assert smtp_relay.transactions == 2


async def test_550_on_rcpt_is_permanent(smtp_relay: Any) -> None:
    smtp_relay.fail_next("550 5.1.1 no such user", stage="RCPT")

    with pytest.raises(PermanentSendError) as failure:
        await sender_for(smtp_relay).send(outgoing(to=("alice@customer.example", "bob@customer.example")))
    assert "550" in str(failure.value)
    assert f"{smtp_relay.host}:{smtp_relay.port}" in str(failure.value)
    assert smtp_relay.messages == []


@pytest.mark.parametrize(("stage", "reply"), [("MAIL", "553 5.7.1 sender rejected"), ("DATA", "554 5.7.1 spam")])
async def test_5xx_on_mail_or_data_is_permanent(smtp_relay: Any, stage: str, reply: str) -> None:
    smtp_relay.fail_next(reply, stage=stage)

    with pytest.raises(PermanentSendError, match=reply[:3]):
        await sender_for(smtp_relay).send(outgoing())
    assert smtp_relay.messages == []


async def test_some_recipients_refused_is_success_for_the_others(
    smtp_relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_relay.reject_recipient("gone@customer.example")

    with caplog.at_level(logging.WARNING, logger="adapters.email.sender"):
        await sender_for(smtp_relay).send(outgoing(to=("gone@customer.example", "alice@customer.example")))

    [captured] = await smtp_relay.wait_for(1)
    assert captured.rcpt_tos == ("alice@customer.example",)
    assert "gone@customer.example (550)" in caplog.text


async def test_all_recipients_refused_with_a_4xx_among_them_is_transient(smtp_relay: Any) -> None:
    smtp_relay.reject_recipient("gone@customer.example", "550 5.1.1 no such user")
    smtp_relay.reject_recipient("full@customer.example", "452 4.2.2 mailbox full")

    with pytest.raises(TransientSendError, match="550, 452"):
        await sender_for(smtp_relay).send(outgoing(to=("gone@customer.example", "full@customer.example")))


async def test_errors_never_carry_the_message_body(smtp_relay: Any) -> None:
    secret = "SECRET-BODY-MARKER"
    smtp_relay.fail_next("554 5.7.1 rejected", stage="DATA")
    with pytest.raises(PermanentSendError) as failure:
        await sender_for(smtp_relay).send(outgoing(body=f"{secret}\n" * 50))
    assert secret not in str(failure.value)
    assert len(str(failure.value)) < 250


async def test_an_email_that_cannot_be_rendered_is_permanent_without_contacting_the_relay(
    smtp_relay: Any,
) -> None:
    sender = sender_for(smtp_relay)
    with pytest.raises(PermanentSendError, match="field name"):
        await sender.send(outgoing(headers=(("Bad Name", "x"),)))
    with pytest.raises(PermanentSendError, match="envelope_from"):
        await sender.send(outgoing(envelope_from="bounce@intake.example> NOTIFY=NEVER"))
    assert smtp_relay.transactions == 0


async def test_a_relay_that_never_answers_times_out_as_transient(silent_listener: tuple[str, int]) -> None:
    host, port = silent_listener
    sender = SmtpRelaySender(host=host, port=port, timeout=0.3, local_hostname="intake.test")

    with pytest.raises(ChannelUnavailableError, match=f"{host}:{port}"):
        await sender.send(outgoing())
    with pytest.raises(ChannelUnavailableError, match=f"{host}:{port}"):
        await sender.check()


class StallingRelay:
    """A hand-written SMTP server that answers everything but the final dot of the first
    ``stall`` transactions (it reads on and says nothing), and counts connections."""

    def __init__(self, stall: int, delay: float = 0.0) -> None:
        self.stall = stall
        self.delay = delay  # before each reply within a transaction (MAIL, RCPT, DATA, the dot)
        self.connections = 0
        self.closed_by_client = 0
        self.delivered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 stall.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if self.delay and verb in (b"MAIL", b"RCPT", b"DATA"):
                    await asyncio.sleep(self.delay)
                if verb == b"EHLO":
                    writer.write(b"250-stall.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while (body := await reader.readline()) and body != b".\r\n":
                        pass
                    if self.stall > 0:
                        self.stall -= 1
                        continue  # silence
                    await asyncio.sleep(self.delay)
                    self.delivered += 1
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
            else:
                self.closed_by_client += 1
        finally:
            writer.close()


async def test_a_relay_that_stalls_after_the_data_times_out_the_transaction_and_the_next_one_goes_out() -> None:
    relay = StallingRelay(stall=1)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = SmtpRelaySender(host="127.0.0.1", port=port, timeout=0.3, local_hostname="intake.test", max_idle=2)
    try:
        started = time.monotonic()
        with pytest.raises(TransientSendError, match=r"took longer than 0\.3 s") as failure:
            await sender.send(outgoing())
        assert time.monotonic() - started < 2.0
        assert f"127.0.0.1:{port}" in str(failure.value)
        await sender.send(outgoing())  # a new connection: the stalled one was dropped, not pooled
        assert (relay.connections, relay.delivered) == (2, 1)
        await sender.close()
    finally:
        server.close()
        await server.wait_closed()
    assert relay.closed_by_client == 1  # the stalled connection, closed by the sender


async def test_a_relay_that_dribbles_its_replies_is_bounded_by_the_transaction_not_each_reply() -> None:
    relay = StallingRelay(stall=0, delay=0.15)  # each of the four replies well within 0.4 s
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = SmtpRelaySender(host="127.0.0.1", port=port, timeout=0.4, local_hostname="intake.test")
    try:
        with pytest.raises(TransientSendError, match=r"took longer than 0\.4 s"):
            await sender.send(outgoing())
        assert relay.delivered == 0
    finally:
        server.close()
        await server.wait_closed()


def test_sender_repr_hides_the_password() -> None:
    sender = SmtpRelaySender(host="relay.example", port=587, username="intake", password="hunter2")
    assert "hunter2" not in repr(sender)
    assert "relay.example" in repr(sender)


@pytest.mark.parametrize(
    "body",
    ["short ascii body\n", "line\n" * 50, "x" * 300 + "\nwrapped\n", "café crème\nnon-ascii body\n"],
)
def test_the_plain_fast_path_writes_what_the_stdlib_path_writes(body: str) -> None:
    """Plain ASCII headers take a direct path; a non-ASCII subject takes EmailMessage's."""
    plain = parse(build_message(outgoing(body=body)))
    rich = parse(build_message(outgoing(body=body, subject="[INC-42] Re: Login broken ✓")))
    for name in ("From", "To", "Date", "Message-ID", "In-Reply-To", "References", "Auto-Submitted"):
        if name != "Date":
            assert str(plain[name]) == str(rich[name]), name
    assert plain.get_content().replace("\r\n", "\n") == rich.get_content().replace("\r\n", "\n") == body
    assert plain["Subject"] == "[INC-42] Re: Login broken" and rich["Subject"].endswith("✓")
    assert plain.defects == [] and rich.defects == []


# -- the wire-format check: regular expressions, judged against the line loop they replaced --


def _wire_format_by_lines(data: bytes) -> str | None:
    """The check as it was first written (a loop over the lines): the reference."""
    if not data.isascii():
        return "7-bit"
    head, blank, _ = data.partition(b"\r\n\r\n")
    if not blank:
        return "separator"
    for line in data.split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            return "bare"
        if len(line) > 998:
            return f"line of {len(line)} octets"
    for line in head.split(b"\r\n"):
        if not line[:1].isspace() and not re.match(rb"[\x21-\x39\x3b-\x7e]+:", line):
            return "neither"
    return None


def _wire_format_now(data: bytes) -> str | None:
    from adapters.email.sender import _check_wire_format

    try:
        _check_wire_format(data)
    except ValueError as exc:
        text = str(exc)
        for key in ("7-bit", "separator", "bare", "neither"):
            if key in text:
                return key
        found = re.search(r"line of \d+ octets", text)
        assert found is not None, text
        return found.group()
    return None


_PIECES = [b"\r\n", b"\r", b"\n", b"\r\n\r\n", b"Subject: hi", b" folded", b"\tx", b"no colon", b":", b"X-A:", b"\x0b",
           b"\xc3\xa9", b"a" * 500, b"b" * 999, b"", b"To: a@b.example"]  # fmt: skip


@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_the_wire_format_check_agrees_with_the_line_loop(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    now, before = _wire_format_now(data), _wire_format_by_lines(data)
    assert (now is None) == (before is None), (now, before)  # the same messages pass
    if now in ("7-bit", "separator"):  # checked first by both; later defects may be named in another order
        assert now == before


def test_every_rendered_acknowledgement_passes_the_wire_format_check() -> None:
    email = OutgoingEmail(
        to=["c@client.example"], from_address="support@example.com", subject="Re: help [SUP-1234-567X]",
        body="line\n" * 50 + "x" * 2000, message_id="ack.1@example.com",
    )  # fmt: skip
    data = build_message(email)  # the long body line is quoted-printable, so this one passes
    assert _wire_format_by_lines(data) is None
    assert data.count(b"\r\nDate: ") == 1


# ---------------------------------------------------------------------------------------------
# PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, then the message


@pytest.fixture(params=[True, False], ids=["pipelining", "one-command-at-a-time"])
def smtp_relay(request: pytest.FixtureRequest, smtp_relay_factory: Any) -> Any:
    """Every relay test of this module runs against a relay that offers PIPELINING (the
    pipelined transaction) and one that does not (aiosmtplib's own)."""
    return smtp_relay_factory(pipelining=request.param)


class PipeliningRelay:
    """A hand-written SMTP server that offers PIPELINING and answers MAIL, RCPT and DATA only
    once it has read all three: a client that waited for each reply before its next command
    would get no reply at all, and its deadline would fail the test.

    ``replies`` maps ``MAIL``, ``RCPT``, ``DATA`` and ``DOT`` (the final dot) to the raw reply
    (CRLFs included), or to ``None``: close the connection instead of answering. Records the
    commands of each transaction and its message as received (dot-unstuffed).
    """

    def __init__(self, **replies: bytes | None) -> None:
        self.replies: dict[str, bytes | None] = {
            "MAIL": b"250-sender\r\n250 ok\r\n",  # a multi-line reply
            "RCPT": b"250 ok\r\n",
            "DATA": b"354 go ahead\r\n",
            "DOT": b"250 2.0.0 queued\r\n",
        }
        self.replies.update(replies)
        self.connections = 0
        self.commands: list[list[bytes]] = []
        self.messages: list[bytes] = []
        self.open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}  # closed at the end of the test

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open[writer] = asyncio.current_task()  # type: ignore[assignment]
        writer.write(b"220 pipe.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-pipe.test\r\n250-SIZE 1000000\r\n250 PIPELINING\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                elif verb != b"MAIL":
                    writer.write(b"250 ok\r\n")
                elif not await self._transaction(line, reader, writer):
                    return
        finally:
            writer.close()

    async def _transaction(self, mail: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        commands = [mail.rstrip(b"\r\n")]
        while not commands[-1].upper().startswith(b"DATA"):
            commands.append((await reader.readline()).rstrip(b"\r\n"))
        self.commands.append(commands)
        replies = [self.replies["MAIL"], *[self.replies["RCPT"]] * (len(commands) - 2), self.replies["DATA"]]
        if any(reply is None for reply in replies):
            return False
        writer.write(b"".join(r for r in replies if r is not None))
        if not (self.replies["DATA"] or b"").startswith(b"354"):
            return True
        body = []
        while (line := await reader.readline()) and line != b".\r\n":
            body.append(line[1:] if line.startswith(b"..") else line)
        self.messages.append(b"".join(body))
        final = self.replies["DOT"]
        if final is None:
            return False
        writer.write(final)
        return True


@contextlib.asynccontextmanager
async def pipelining_relay(**replies: bytes | None) -> AsyncIterator[tuple[PipeliningRelay, int]]:
    relay = PipeliningRelay(**replies)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    try:
        yield relay, int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
        await _close_all(relay.open)


async def _close_all(connections: dict[asyncio.StreamWriter, asyncio.Task[Any]]) -> None:
    """Close the server's side of every connection and let its handler end (no ResourceWarning
    from a transport still open when the test's loop closes)."""
    for writer, task in connections.items():
        writer.close()
        task.cancel()
    await asyncio.gather(*connections.values(), return_exceptions=True)


def pipelining_sender(port: int, **kwargs: Any) -> SmtpRelaySender:
    return SmtpRelaySender(host="127.0.0.1", port=port, timeout=2.0, local_hostname="intake.test", **kwargs)


async def test_with_pipelining_the_envelope_goes_in_one_round_trip_on_a_kept_connection() -> None:
    body = "A line\n.\n..two dots\nFrom the start\n"  # dot-stuffing must be transparent
    email = outgoing(body=body, to=("alice@customer.example", "bob@customer.example"))
    async with pipelining_relay() as (relay, port):
        sender = pipelining_sender(port, max_idle=1)
        await sender.send(email)
        await sender.send(email)
        await sender.close()

    assert relay.connections == 1
    size = len(build_message(email, date=parse(relay.messages[0])["Date"].datetime))
    assert (
        relay.commands
        == [
            [
                f"MAIL FROM:<> SIZE={size}".encode(),
                b"RCPT TO:<alice@customer.example>",
                b"RCPT TO:<bob@customer.example>",
                b"DATA",
            ]
        ]
        * 2
    )
    for received in relay.messages:
        assert received == build_message(email, date=parse(received)["Date"].datetime)
        assert text_of(parse(received)) == body


async def test_with_pipelining_every_recipient_refused_ends_the_empty_message_and_is_permanent() -> None:
    # RFC 2920 3.1: a server may answer DATA with 354 although no recipient was accepted; the
    # client then sends the final dot alone.
    async with pipelining_relay(RCPT=b"550 5.1.1 no such user\r\n", DOT=b"554 5.5.1 no valid recipients\r\n") as (
        relay,
        port,
    ):
        with pytest.raises(PermanentSendError, match="refused every recipient"):
            await pipelining_sender(port).send(outgoing())
    assert relay.messages == [b""]


@pytest.mark.parametrize(
    ("replies", "error", "text"),
    [
        ({"MAIL": b"553 5.7.1 sender rejected\r\n", "RCPT": b"503 5.5.1 no MAIL\r\n", "DATA": b"503 5.5.1 no\r\n"},
         PermanentSendError, "553 to MAIL"),
        ({"RCPT": b"451 4.3.0 try later\r\n", "DATA": b"503 5.5.1 no valid recipients\r\n"},
         TransientSendError, "451"),
        ({"DATA": b"451 4.3.0 not now\r\n"}, TransientSendError, "451 to DATA"),
        ({"DOT": b"554 5.7.1 spam\r\n"}, PermanentSendError, "554 to DATA"),
        ({"MAIL": b"hello there\r\n"}, TransientSendError, "malformed reply"),
        ({"DATA": None}, TransientSendError, "unreachable"),
        ({"DOT": None}, TransientSendError, "unreachable"),
    ],
)  # fmt: skip
async def test_with_pipelining_each_refusal_and_breakage_maps_like_the_plain_transaction(
    replies: dict[str, bytes | None], error: type[Exception], text: str
) -> None:
    async with pipelining_relay(**replies) as (relay, port):
        sender = pipelining_sender(port, max_idle=1)
        with pytest.raises(error, match=text) as failure:
            await sender.send(outgoing())
        assert "127.0.0.1" in str(failure.value)
        relay.replies = PipeliningRelay().replies  # the relay recovers...
        await sender.send(outgoing())  # ...and the next send goes out on a fresh connection
        await sender.close()
    assert relay.connections == 2
    assert len(relay.commands) == 2
    last = relay.messages[-1]
    assert last == build_message(outgoing(), date=parse(last)["Date"].datetime)


async def test_with_pipelining_a_relay_that_stops_answering_is_bounded_by_the_deadline() -> None:
    connections: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}

    async def silent_after_commands(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[writer] = asyncio.current_task()  # type: ignore[assignment]
        writer.write(b"220 pipe.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250-pipe.test\r\n250 PIPELINING\r\n")
        writer.close()

    server = await asyncio.start_server(silent_after_commands, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(TransientSendError, match=r"took longer than 0\.3 s"):
            await SmtpRelaySender(host="127.0.0.1", port=port, timeout=0.3, local_hostname="intake.test").send(
                outgoing()
            )
        assert time.monotonic() - started < 2.0
    finally:
        server.close()
        await server.wait_closed()
        await _close_all(connections)


async def test_with_starttls_the_transaction_is_pipelined_inside_tls(
    smtp_relay_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STARTTLS, EHLO again inside TLS (RFC 3207), then the pipelined transaction on the TLS
    transport, twice on one kept connection; aiosmtplib's own commands work after it."""
    import trustme

    from adapters.email import sender as sender_module

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    relay = smtp_relay_factory(tls_context=server_context)  # refuses MAIL before STARTTLS
    pipelined = 0
    original = sender_module._pipelined

    async def counting(*args: Any) -> Any:
        nonlocal pipelined
        pipelined += 1
        return await original(*args)

    monkeypatch.setattr(sender_module, "_pipelined", counting)
    sender = sender_for(relay, starttls=True, tls_context=client_context, max_idle=1)
    await sender.send(outgoing())
    await sender.send(outgoing(message_id="ack.inc-42.2@intake.example"))
    await sender.close()  # QUIT through aiosmtplib, on the same connection

    captured = await relay.wait_for(2)
    assert [c.tls for c in captured] == [True, True]
    assert pipelined == 2
    assert [c.message["Message-ID"] for c in captured] == [
        "<ack.inc-42.1@intake.example>",
        "<ack.inc-42.2@intake.example>",
    ]


async def test_the_pipelined_reply_reader_takes_replies_split_anywhere_and_refuses_garbage() -> None:
    from adapters.email.sender import _Replies

    replies = _Replies()
    for byte in b"250-first\r\n250 second\r\n354 go ahead\n":  # one byte per segment; a bare LF too
        replies.data_received(bytes([byte]))
    assert [await replies.next(), await replies.next()] == [(250, "first\nsecond"), (354, "go ahead")]

    for garbage, why in [
        (b"hello\r\n", "malformed"),
        (b"250-one\r\n550 two\r\n", "changed within"),
        (b"250 " + b"x" * 3000, "too long"),
    ]:
        broken = _Replies()
        broken.data_received(garbage)
        with pytest.raises(aiosmtplib.SMTPResponseException, match=why):
            await broken.next()

    gone = _Replies()
    gone.data_received(b"250 ok\r\n")
    gone.connection_lost(None)
    assert await gone.next() == (250, "ok")  # what arrived before the loss is still read
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await gone.next()


async def test_an_envelope_address_no_command_may_carry_is_refused_before_any_command(smtp_relay: Any) -> None:
    # A CR or LF in an envelope address would be a command injection on either path (the
    # pipelined one writes the address as it is): send() refuses it before any command.
    with pytest.raises(PermanentSendError, match="addr-spec"):
        await sender_for(smtp_relay).send(outgoing(to=("alice@customer.example\r\nRCPT TO:<x@evil.example>",)))
    assert smtp_relay.messages == []
    assert smtp_relay.transactions == 0


async def test_the_relay_ca_file_setting_verifies_the_relay_and_a_bad_file_stops_start_up(
    tmp_path: Any, smtp_relay_factory: Any
) -> None:
    """`outbound.relay_ca_file`: the relay's certificate must chain to that CA (a private CA),
    checked by a sender built from settings; a file that is not a CA certificate is refused
    when the settings load, with the key's name."""
    import trustme

    from adapters.bootstrap import build
    from intake.errors import ConfigError
    from tests.adapters.harness import settings_for

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    relay = smtp_relay_factory(tls_context=server_context)
    ca_file = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    extra = f'[outbound]\nrelay_starttls = true\nrelay_ca_file = "{ca_file}"\n'
    app = build(settings_for(tmp_path, relay_port=relay.port, extra=extra), create_tables=True)
    try:
        await app.dispatcher.email.send(outgoing())
        [captured] = await relay.wait_for(1)
        assert captured.tls
        await app.dispatcher.email.close()  # type: ignore[attr-defined]
    finally:
        app.store.dispose()

    other = trustme.CA()  # a CA the relay's certificate does not chain to
    other_file = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(other_file))
    extra = f'[outbound]\nrelay_starttls = true\nrelay_ca_file = "{other_file}"\n'
    app = build(settings_for(tmp_path, relay_port=relay.port, extra=extra), create_tables=True)
    try:
        with pytest.raises(TransientSendError, match=r"unreachable \(SSLCertVerificationError\)"):
            await app.dispatcher.email.send(outgoing())
    finally:
        app.store.dispose()

    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("hello\n")
    with pytest.raises((ConfigError, ValueError), match="relay_ca_file"):
        settings_for(tmp_path, relay_port=relay.port, extra=f'[outbound]\nrelay_ca_file = "{not_pem}"\n')
