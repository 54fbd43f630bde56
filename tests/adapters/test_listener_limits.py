"""The listener's hard limits, over real SMTP on loopback, each followed by proof it still serves.

smtplib and aiosmtplib refuse to misbehave (they fold long lines, stop at SIZE, never trickle,
never pipeline a smuggled transaction), so most of these tests speak SMTP through a raw
asyncio socket (:class:`RawClient`). Limits that have a settings key go through the settings
and the composition root, so the wiring is tested too; ``data_timeout`` and ``session_timeout``
have none yet and run on a second listener built on the same service (:func:`extra_listener`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import re
import time
import types
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from adapters.email.listener import (
    REFUSALS_LOGGED,
    EmailListener,
    IntakeHandler,
    ListenerConfig,
    SessionTracker,
)
from intake.model import InboundMessage
from intake.service import Assessment, Receipt
from storage.tables import message as message_table
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import Harness, mail, running_intake, settings_for

SUPPORT = "support@example.com"


# ---------------------------------------------------------------------------------------------
# A raw SMTP client: every byte is ours to choose
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str  # all lines of a multi-line reply, without the codes, joined by "\n"


class RawClient:
    """An SMTP client that sends exactly the bytes it is given and reads replies as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, source: str = "127.0.0.1") -> tuple[RawClient, Reply | None]:
        """Connect from ``source`` (any 127.0.0.0/8 address is loopback); returns the greeting."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self, timeout: float = 5.0) -> Reply | None:  # noqa: ASYNC109
        """The next reply, or None when the server closed the connection first."""
        lines: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    line = await self.reader.readline()
                except ConnectionResetError:
                    line = b""
                if not line:
                    assert not lines, f"connection closed in the middle of a reply: {lines!r}"
                    return None
                assert re.match(rb"^[2-5]\d\d[ -]", line), f"not an SMTP reply line: {line!r}"
                lines.append(line)
                if line[3:4] == b" ":
                    break
        text = "\n".join(ln[4:].decode("utf-8", "replace").rstrip("\r\n") for ln in lines)
        return Reply(int(lines[0][:3]), text)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes, timeout: float = 5.0) -> Reply | None:  # noqa: ASYNC109
        await self.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply(timeout)

    async def envelope(self, *, mail_from: str = "alice@acme.com", rcpt: tuple[str, ...] = (SUPPORT,)) -> None:
        """MAIL and RCPT, each expected to be accepted (EHLO is the caller's)."""
        for line in (f"MAIL FROM:<{mail_from}>", *(f"RCPT TO:<{r}>" for r in rcpt)):
            r = await self.cmd(line)
            assert r is not None and r.code == 250, (line, r)

    async def transaction(self, content: bytes, **envelope: Any) -> Reply | None:
        """MAIL, RCPT, DATA and ``content`` (CRLF lines, no dot-stuffing needed) ending in CRLF.CRLF."""
        await self.envelope(**envelope)
        r = await self.cmd("DATA")
        assert r is not None and r.code == 354, r
        await self.write(content + b".\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109
        """Wait for the server to close the connection; returns whatever it sent before."""
        async with asyncio.timeout(timeout):
            rest = await self.reader.read()
        return rest

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def message_bytes(subject: str = "Printer on fire", body: bytes = b"It burns.\r\n", **headers: str) -> bytes:
    head = f"From: Alice <alice@acme.com>\r\nTo: {SUPPORT}\r\nSubject: {subject}\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def intake_with(tmp_path: Path, relay: RelayStandIn, email: str = "") -> AsyncIterator[Harness]:
    extra = f"[email]\n{email}" if email else ""
    async with running_intake(settings_for(tmp_path, relay_port=relay.port, extra=extra)) as h:
        yield h


@contextlib.asynccontextmanager
async def extra_listener(
    h: Harness, handler_cls: type[IntakeHandler] = IntakeHandler, **limits: Any
) -> AsyncIterator[EmailListener]:
    """A second listener on ``h``'s service with ListenerConfig fields the settings do not have."""
    config = ListenerConfig(addresses=h.settings.email.addresses, hostname="intake.test", **limits)
    listener = EmailListener(handler_cls(h.app.service, config, SessionTracker()), config, host="127.0.0.1", port=0)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop(grace=0.5)


async def still_serving(h: Harness, port: int | None = None) -> None:
    """A well-behaved client still gets its message stored, on a fresh connection."""
    if port is None:
        reply = await h.send(mail(subject="Still there?"))
        assert reply.code == 250 and "stored as" in reply.text, reply
        return
    client, greeting = await RawClient.open(port)
    try:
        assert greeting is not None and greeting.code == 220
        assert (await client.cmd("EHLO client.test")) is not None
        r = await client.transaction(message_bytes("Still there?"))
        assert r is not None and r.code == 250 and "stored as" in r.text, r
    finally:
        await client.close()


def stored_count(h: Harness) -> int:
    return int(h.stats()["messages"])


# ---------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The listener's log lines for refused commands and messages, in order."""
    return [r.getMessage() for r in caplog.records if r.name == "intake.smtp" and r.getMessage().startswith("refused")]


async def test_message_size_is_refused_at_mail_from_and_after_data(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intake.smtp")
    async with intake_with(tmp_path, smtp_relay, "max_message_bytes = 2048\n") as h:
        client, _ = await RawClient.open(h.port)
        ehlo = await client.cmd("EHLO client.test")
        assert ehlo is not None and "SIZE 2048" in ehlo.text.splitlines()
        # Declared too big: refused before a byte of content is sent.
        r = await client.cmd(f"MAIL FROM:<alice@acme.com> SIZE={2048 + 1}")
        assert r == Reply(552, "5.3.4 Message too big: this server accepts at most 2048 bytes")
        # Declared small (or not at all) but too big after all: the answer follows the final dot.
        r = await client.transaction(message_bytes(body=b"x" * 70 + b"\r\n") * 40)
        assert r == Reply(552, "5.3.4 Message too big: this server accepts at most 2048 bytes")
        assert stored_count(h) == 0
        # The same session goes on: a message within the limit is stored.
        r = await client.transaction(message_bytes())
        assert r is not None and r.code == 250 and "stored as" in r.text
        await client.close()
        # A real client reads SIZE from EHLO and gives up at MAIL FROM.
        big = mail(body="y" * 3000 + "\n")
        assert (await h.send(big)).code == 552
        assert stored_count(h) == 1
        await still_serving(h)
    # Each refusal has its log line, with the client and the reply as sent (issue 2, item 9).
    too_big = "refused 127.0.0.1: 552 5.3.4 Message too big: this server accepts at most 2048 bytes"
    assert refusals(caplog) == [too_big] * 3


# ---------------------------------------------------------------------------------------------
# Recipients
# ---------------------------------------------------------------------------------------------


async def test_recipients_past_the_limit_get_452_and_the_rest_is_delivered(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intake.smtp")
    email = 'max_recipients = 2\nextra_addresses = ["billing@example.com", "sales@example.com"]\n'
    async with intake_with(tmp_path, smtp_relay, email) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        await client.envelope(rcpt=(SUPPORT, "billing@example.com"))
        assert await client.cmd("RCPT TO:<sales@example.com>") == Reply(452, "4.5.3 Too many recipients")
        # An unknown address is refused for what it is, not counted.
        r = await client.cmd("RCPT TO:<nobody@example.com>")
        assert r is not None and r.code == 550
        assert (await client.cmd("DATA")).code == 354  # type: ignore[union-attr]
        await client.write(message_bytes() + b".\r\n")
        r = await client.reply()
        assert r is not None and r.code == 250
        await client.close()
        # One copy per accepted recipient; the refused one is the sender's to retry.
        recipients = h.read(lambda uow: sorted(uow.conn.execute(select(message_table.c.recipient)).scalars()))
        assert recipients == ["billing@example.com", SUPPORT]
        await still_serving(h)
    assert refusals(caplog) == [
        "refused 127.0.0.1: 452 4.5.3 Too many recipients",
        "refused 127.0.0.1: 550 5.1.1 <nobody@example.com>: not a support address here",
    ]


async def test_an_address_extension_is_its_support_address(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """Postfix (recipient_delimiter "+", Debian's default) finds support+billing@ under support@
    in its tables and hands it over as it is: refused here, it bounced after Postfix had taken
    it, to a sender who may be forged. It is the support mailbox, for dedup too."""
    async with intake_with(tmp_path, smtp_relay) as h:
        first = await h.send(mail(message_id="<ext-1@acme.com>"), rcpt=("Support+Billing@example.com",))
        assert first.code == 250 and "stored as" in first.text, first
        again = await h.send(mail(message_id="<ext-1@acme.com>"), rcpt=(SUPPORT,))
        assert again.code == 250 and "already stored" in again.text
        recipients = h.read(lambda uow: list(uow.conn.execute(select(message_table.c.recipient)).scalars()))
        assert recipients == [SUPPORT]
        for other in ("nobody+support@example.com", "+support@example.com", "support+@elsewhere.example"):
            refused = await h.send(mail(), rcpt=(other,))
            assert (refused.code, refused.text) == (550, f"5.1.1 <{other}>: not a support address here")
    async with intake_with(tmp_path, smtp_relay, 'recipient_delimiter = ""\n') as h:
        refused = await h.send(mail(), rcpt=("support+billing@example.com",))
        assert refused.code == 550


async def test_a_session_s_refusals_are_logged_up_to_a_limit(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """A client looping on refused commands (a dictionary attack on RCPT) fills no log."""
    caplog.set_level(logging.INFO, logger="intake.smtp")
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<alice@acme.com>")
        for n in range(REFUSALS_LOGGED + 10):
            r = await client.cmd(f"RCPT TO:<guess{n}@example.com>")
            assert r is not None and r.code == 550
        await client.close()
        await still_serving(h)
    lines = refusals(caplog)
    assert len(lines) == REFUSALS_LOGGED + 1
    assert lines[0] == "refused 127.0.0.1: 550 5.1.1 <guess0@example.com>: not a support address here"
    assert lines[-1] == "refused 127.0.0.1: further refusals in this session are not logged"


# ---------------------------------------------------------------------------------------------
# Line length
# ---------------------------------------------------------------------------------------------


async def test_overlong_command_lines_get_500_and_the_session_goes_on(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intake.smtp")
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("HELO client.test")
        # aiosmtpd: 512 bytes without the CRLF is the most a command may have (RFC 5321 4.5.3.1.4).
        assert await client.cmd(b"NOOP " + b"a" * 507) == Reply(250, "2.0.0 OK")
        assert await client.cmd(b"NOOP " + b"a" * 508) == Reply(500, "5.5.2 Command line too long")
        too_long = Reply(500, "5.5.2 Command line too long")
        assert await client.cmd(b"MAIL FROM:<" + b"a" * 600 + b"@acme.com>") == too_long
        # Longer than the stream's 1001-byte buffer: drained to the end of the line, same answer.
        assert await client.cmd(b"RCPT TO:<" + b"b" * 5000 + b">") == Reply(500, "5.5.2 Command line too long")
        # Nothing of the long lines leaked into the command stream.
        r = await client.transaction(message_bytes())
        assert r is not None and r.code == 250
        await client.close()
        await still_serving(h)
    # aiosmtpd's own refusals are logged as ours are.
    assert refusals(caplog) == ["refused 127.0.0.1: 500 5.5.2 Command line too long"] * 3


async def test_the_mail_line_limit_is_the_same_in_every_session(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """After EHLO, MAIL may be 512 + 26 (SIZE=) + 10 (SMTPUTF8) bytes long. aiosmtpd keeps that
    limit in a dict shared by all its instances that each EHLO raises and each __init__ resets;
    with the listener's copied protocols (no __init__ per connection) it grew by 36 bytes with
    every session until a line of any length passed. Each session now starts from its own."""
    async with intake_with(tmp_path, smtp_relay) as h:
        longest = b"MAIL FROM:<" + b"a" * (548 - len(b"MAIL FROM:<@acme.com>")) + b"@acme.com>"
        assert len(longest) == 548
        for session in range(4):
            client, _ = await RawClient.open(h.port)
            await client.cmd("EHLO client.test")
            one_more = longest[:-10] + b"b" + longest[-10:]
            assert await client.cmd(one_more) == Reply(500, "5.5.2 Command line too long"), session
            r = await client.cmd(longest)
            assert r is not None and r.code == 250, (session, r)
            await client.close()


async def test_overlong_data_line_refuses_the_message_and_the_session_goes_on(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        # RFC 5321 4.5.3.1.6: 1000 bytes with the CRLF. aiosmtpd takes one byte more.
        r = await client.transaction(message_bytes(body=b"y" * 999 + b"\r\n"))
        assert r is not None and r.code == 250
        for size in (1000, 5000, 100_000):  # the last one far beyond the stream buffer
            r = await client.transaction(message_bytes(body=b"z" * size + b"\r\n"))
            assert r == Reply(500, "5.5.2 Line too long (see RFC5321 4.5.3.1.6)"), size
        assert stored_count(h) == 1
        # A message written with bare LF is one long "line" to aiosmtpd: refused the same way.
        lf_only = message_bytes(body=b"a short line\n" * 100).replace(b"\r\n", b"\n") + b"\r\n"
        assert await client.transaction(lf_only) == Reply(500, "5.5.2 Line too long (see RFC5321 4.5.3.1.6)")
        r = await client.transaction(message_bytes(subject="After the long ones"))
        assert r is not None and r.code == 250
        await client.close()
        await still_serving(h)


# ---------------------------------------------------------------------------------------------
# Time: silence, slow senders, whole sessions
# ---------------------------------------------------------------------------------------------


async def test_silence_gets_421_after_command_timeout(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with intake_with(tmp_path, smtp_relay, "command_timeout = 0.5\n") as h:
        # Between commands.
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        started = time.monotonic()
        r = await client.reply(timeout=5)
        assert r == Reply(421, "4.4.2 Timeout: nothing received for 0.5 s, closing connection")
        assert 0.4 < time.monotonic() - started < 3
        assert await client.closed() == b""
        await client.close()
        # In the middle of DATA.
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        await client.envelope()
        await client.cmd("DATA")
        await client.write(message_bytes())  # no final dot: the client went quiet
        r = await client.reply(timeout=5)
        assert r is not None and r.code == 421 and r.text.startswith("4.4.2")
        assert await client.closed() == b""
        await client.close()
        assert stored_count(h) == 0
        # A greeting and nothing else.
        client, _ = await RawClient.open(h.port)
        r = await client.reply(timeout=5)
        assert r is not None and r.code == 421
        await client.close()
        assert not h.app.email_listener.tracker.active  # type: ignore[union-attr]
        await still_serving(h)


async def trickle(client: RawClient, data: bytes, *, every: float) -> None:
    for i in range(len(data)):
        await client.write(data[i : i + 1])
        await asyncio.sleep(every)


async def test_steady_slow_message_is_not_cut_off_by_command_timeout(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """command_timeout is silence: a message that keeps coming may take longer than it."""
    async with intake_with(tmp_path, smtp_relay) as h, extra_listener(h, command_timeout=0.5, data_timeout=30) as lst:
        client, _ = await RawClient.open(lst.port)
        await client.cmd("EHLO client.test")
        await client.envelope()
        await client.cmd("DATA")
        started = time.monotonic()
        await trickle(client, message_bytes(body=b"slow\r\n") + b".\r\n", every=0.02)
        r = await client.reply()
        assert time.monotonic() - started > 1.0  # twice the command timeout
        assert r is not None and r.code == 250 and "stored as" in r.text
        await client.close()


async def test_trickling_sender_is_cut_off_at_the_data_deadline(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with (
        intake_with(tmp_path, smtp_relay) as h,
        extra_listener(h, command_timeout=0.5, data_timeout=1.5) as lst,
    ):
        client, _ = await RawClient.open(lst.port)
        await client.cmd("EHLO client.test")
        await client.envelope()
        assert (await client.cmd("DATA")).code == 354  # type: ignore[union-attr]
        started = time.monotonic()
        # A byte every 0.1 s: never silent for command_timeout, never finished.
        writer = asyncio.create_task(trickle(client, message_bytes(body=b"x" * 200 + b"\r\n"), every=0.1))
        r = await client.reply(timeout=10)
        elapsed = time.monotonic() - started
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await writer
        assert r == Reply(421, "4.4.2 Timeout: the message took longer than 1.5 s to send, closing connection")
        assert 1.4 < elapsed < 4
        assert await client.closed() == b""
        await client.close()
        assert stored_count(h) == 0
        assert not lst.tracker.active
        await still_serving(h, lst.port)


async def test_a_session_cannot_outlive_session_timeout(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with (
        intake_with(tmp_path, smtp_relay) as h,
        extra_listener(h, command_timeout=0.5, session_timeout=1.5) as lst,
    ):
        client, _ = await RawClient.open(lst.port)
        started = time.monotonic()
        await client.cmd("EHLO client.test")
        # A busy client: a valid command every 0.2 s, each re-arming aiosmtpd's own timer.
        replies: list[Reply] = []
        with contextlib.suppress(ConnectionError):
            for verb in ["NOOP", "RSET", "EHLO client.test", "HELP", "VRFY postmaster"] * 10:
                r = await client.cmd(verb)
                if r is None:
                    break
                replies.append(r)
                await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        assert replies[-1] == Reply(421, "4.4.2 Session time limit of 1.5 s reached, closing connection")
        assert all(r.code in (250, 252) for r in replies[:-1]), replies
        assert 1.4 < elapsed < 4
        await client.close()
        await still_serving(h, lst.port)


class SlowHandler(IntakeHandler):
    """Storage that takes a second: the time is ours, not the client's."""

    async def _store(self, message: InboundMessage, assessment: Assessment | None = None) -> Receipt:
        await asyncio.sleep(1.0)
        return await super()._store(message, assessment)


async def test_time_spent_storing_is_not_held_against_the_client(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with (
        intake_with(tmp_path, smtp_relay) as h,
        extra_listener(h, SlowHandler, command_timeout=0.3, data_timeout=0.5, session_timeout=0.8) as lst,
    ):
        client, _ = await RawClient.open(lst.port)
        await client.cmd("EHLO client.test")
        await client.envelope()
        await client.cmd("DATA")
        await client.write(message_bytes() + b".\r\n")
        # All three limits pass while the handler stores: the reply still comes, and is a 250;
        # then the session limit that passed meanwhile closes the connection.
        r = await client.reply(timeout=5)
        assert r is not None and r.code == 250 and "stored as" in r.text
        r = await client.reply(timeout=5)
        assert r == Reply(421, "4.4.2 Session time limit of 0.8 s reached, closing connection")
        assert await client.closed() == b""
        await client.close()
        assert stored_count(h) == 1


# ---------------------------------------------------------------------------------------------
# Concurrent sessions
# ---------------------------------------------------------------------------------------------


async def wait_active(listener: EmailListener, count: int) -> None:
    async with asyncio.timeout(5):
        while len(listener.tracker.active) != count:  # noqa: ASYNC110 - a set, not an event
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(("protocol", "taken"), [("smtp", 20), ("lmtp", 30)])
async def test_over_lmtp_its_one_client_may_have_every_session(
    tmp_path: Path, smtp_relay: RelayStandIn, protocol: str, taken: int
) -> None:
    """LMTP's one client is the MTA in front: Postfix delivers 20 messages at once by default,
    all from one address, so a per-client cap of 20 left no room for a connection still closing
    (its deliveries got 421 and waited minutes). Over LMTP the cap defaults to max_sessions."""
    async with intake_with(tmp_path, smtp_relay, f'protocol = "{protocol}"\nmax_sessions = 30\n') as h:
        held: list[RawClient] = []
        try:
            for _ in range(taken):
                c, greeting = await RawClient.open(h.port)
                held.append(c)
                assert greeting is not None and greeting.code == 220, len(held)
            c, greeting = await RawClient.open(h.port)
            held.append(c)
            assert greeting == Reply(421, "4.7.0 Too many connections, please try again later")
        finally:
            for c in held:
                await c.close()


async def test_sessions_past_the_caps_get_421_at_once(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with intake_with(tmp_path, smtp_relay, "max_sessions = 3\nmax_sessions_per_client = 2\n") as h:
        listener = h.app.email_listener
        assert listener is not None
        held: list[RawClient] = []
        for source in ("127.0.0.1", "127.0.0.1"):
            c, greeting = await RawClient.open(h.port, source=source)
            assert greeting is not None and greeting.code == 220
            held.append(c)
        # The per-client cap: the third connection from 127.0.0.1 is refused at once.
        c, greeting = await RawClient.open(h.port, source="127.0.0.1")
        assert greeting == Reply(421, "4.7.0 Too many connections, please try again later")
        assert await c.closed() == b""
        await c.close()
        # Another client is still served, with a whole transaction, while those two are held.
        c, greeting = await RawClient.open(h.port, source="127.0.0.2")
        assert greeting is not None and greeting.code == 220
        await c.cmd("EHLO other.test")
        r = await c.transaction(message_bytes(subject="From another client"))
        assert r is not None and r.code == 250
        held.append(c)
        # The overall cap: a fourth session from yet another client is refused.
        c, greeting = await RawClient.open(h.port, source="127.0.0.3")
        assert greeting == Reply(421, "4.7.0 Too many connections, please try again later")
        await c.close()
        assert len(listener.tracker.active) == 3
        # The held sessions still work, and one of them leaving makes room.
        assert await held[0].cmd("NOOP") == Reply(250, "2.0.0 OK")
        assert (await held[0].cmd("QUIT")).code == 221  # type: ignore[union-attr]
        await held.pop(0).close()
        await wait_active(listener, 2)
        c, greeting = await RawClient.open(h.port, source="127.0.0.3")
        assert greeting is not None and greeting.code == 220
        held.append(c)
        for c in held:
            await c.close()
        await wait_active(listener, 0)
        assert dict(listener.tracker.per_client) == {}
        await still_serving(h)


# ---------------------------------------------------------------------------------------------
# Repeated and bogus commands
# ---------------------------------------------------------------------------------------------


async def test_noop_forever_hits_the_command_call_limit(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        limit = ListenerConfig(addresses=()).command_call_limit["NOOP"]
        for _ in range(limit):
            assert await client.cmd("NOOP") == Reply(250, "2.0.0 OK")
        assert await client.cmd("NOOP") == Reply(421, "4.7.0 NOOP sent too many times")
        assert await client.closed() == b""
        await client.close()
        # Unknown commands have a budget of their own (aiosmtpd's, five).
        client, _ = await RawClient.open(h.port)
        replies = [await client.cmd(f"XYZZY{i}") for i in range(5)]
        assert [r.code for r in replies if r] == [500, 500, 500, 500, 502]
        assert await client.closed() == b""
        await client.close()
        await still_serving(h)


async def test_an_mta_keeping_its_connection_is_not_cut_off(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """Postfix's LMTP client keeps its connection for the next message and sends RSET before
    each reuse (the exchange below is what Postfix 3.7 sent): the 21st RSET was answered 421,
    and past 200 messages so was MAIL. The budget is per message; a loop of RSETs still ends."""
    async with intake_with(tmp_path, smtp_relay, 'protocol = "lmtp"\n') as h:
        client, _ = await RawClient.open(h.port)
        assert (await client.cmd("LHLO vm")) is not None
        limit = ListenerConfig(addresses=()).command_call_limit["RSET"]
        for i in range(limit + 5):
            content = message_bytes(f"Report {i}", Message_ID=f"<reuse-{i}@acme.com>")
            await client.write(
                f"MAIL FROM:<alice@acme.com> SIZE={len(content)}\r\nRCPT TO:<{SUPPORT}>\r\nDATA\r\n".encode()
            )
            assert [r.code if r else None for r in [await client.reply() for _ in range(3)]] == [250, 250, 354]
            await client.write(content + b".\r\n")
            stored = await client.reply()
            assert stored is not None and stored.code == 250, (i, stored)
            assert await client.cmd("RSET") == Reply(250, "2.0.0 OK"), i
        assert stored_count(h) == limit + 5
        for _ in range(limit - 1):
            assert await client.cmd("RSET") == Reply(250, "2.0.0 OK")
        assert await client.cmd("RSET") == Reply(421, "4.7.0 RSET sent too many times")
        await client.close()


# ---------------------------------------------------------------------------------------------
# SMTP smuggling (CVE-2023-51764 and kin; aiosmtpd's CVE-2024-27305)
# ---------------------------------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\n"
    b"RCPT TO:<support@example.com>\r\n"
    b"DATA\r\n"
    b"From: CEO <ceo@example.com>\r\n"
    b"To: support@example.com\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"Please wire the money.\r\n"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\r\n\x00.\r\n"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CRLF", "CRLF.CR", "CR.CR", "CRLF-NUL.CRLF"],
)
async def test_smuggled_second_message_stays_inside_the_first(
    tmp_path: Path, smtp_relay: RelayStandIn, fake_end: bytes
) -> None:
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        await client.envelope(mail_from="alice@acme.com")
        await client.cmd("DATA")
        first = message_bytes(subject="Innocent", body=b"Hello.")
        # One write, as an attacker's relay would send it: a fake end of data, a pipelined
        # second transaction, and the real end of data.
        await client.write(first + fake_end + SMUGGLED + b".\r\n")
        r = await client.reply()
        assert r is not None and r.code == 250 and "stored as" in r.text
        # Nothing more was answered: no 250 for a MAIL, RCPT or second message, no 354.
        assert await client.cmd("QUIT") == Reply(221, "2.0.0 Bye")
        assert await client.closed() == b""
        await client.close()
        [ticket] = h.tickets()
        assert ticket["subject"] == "Innocent" and ticket["requester"] == "alice@acme.com"
        [stored] = h.detail(ticket["reference"])["messages"]
        raw = h.read(lambda uow: uow.raw_message(stored["id"]))
        assert b"MAIL FROM:<ceo@example.com>" in raw and b"Please wire the money." in raw
        assert stored_count(h) == 1
        await still_serving(h)


# ---------------------------------------------------------------------------------------------
# Envelope addresses that cannot be stored or echoed (found by tests/adapters/test_fuzz.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reverse_path",
    [b"<\xff\xfe@x.example>", b"<caf\xe9@x.example>", b"<a\x00b@x.example>", b"<a\x1bb@x.example>"],
    ids=["not-utf8", "latin1", "nul", "escape"],
)
async def test_reverse_path_that_cannot_be_stored_is_refused_at_mail_from(
    tmp_path: Path, smtp_relay: RelayStandIn, reverse_path: bytes
) -> None:
    """It becomes the requester when the message has no usable From: refused at MAIL, not 451 for ever."""
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        assert await client.cmd(b"MAIL FROM:" + reverse_path) == Reply(501, "5.1.7 Bad sender address syntax")
        assert (await client.cmd(f"RCPT TO:<{SUPPORT}>")).code == 503  # type: ignore[union-attr]
        # UTF-8 is fine (SMTPUTF8), and becomes the requester of a message without From.
        assert await client.cmd("MAIL FROM:<jürgen@exämple.de> SMTPUTF8".encode()) == Reply(250, "2.1.0 Ok")
        assert await client.cmd(f"RCPT TO:<{SUPPORT}>") == Reply(250, "2.1.5 Ok")
        assert (await client.cmd("DATA")).code == 354  # type: ignore[union-attr]
        await client.write(b"Subject: no From header\r\n\r\nhello\r\n.\r\n")
        r = await client.reply()
        assert r is not None and r.code == 250
        await client.close()
        [ticket] = h.tickets()
        assert ticket["requester"] == "jürgen@exämple.de"
        await still_serving(h)


async def test_unknown_recipient_is_echoed_safely(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """Bytes that are not UTF-8 used to make the 550 itself fail (451 and an ERROR log)."""
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        await client.envelope(rcpt=())
        for rcpt, shown in [
            (b"<\xff\xfe@x.example>", "??@x.example"),
            (b"<a\x00b@x.example>", "a?b@x.example"),
            ("<jürgen@x.example>".encode(), "jürgen@x.example"),
        ]:
            r = await client.cmd(b"RCPT TO:" + rcpt)
            assert r == Reply(550, f"5.1.1 <{shown}>: not a support address here"), rcpt
        assert await client.cmd(f"RCPT TO:<{SUPPORT}>") == Reply(250, "2.1.5 Ok")
        assert (await client.cmd("DATA")).code == 354  # type: ignore[union-attr]
        await client.write(message_bytes() + b".\r\n")
        r = await client.reply()
        assert r is not None and r.code == 250
        await client.close()
        await still_serving(h)


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
async def test_a_copied_protocol_holds_what_a_normally_built_one_holds(
    tmp_path: Path, smtp_relay: RelayStandIn, protocol: str
) -> None:
    """The listener copies one template per connection instead of running aiosmtpd's
    introspecting __init__ each time: the copy must hold the same state, none of it shared
    where it belongs to one connection (an aiosmtpd upgrade that adds such state fails here)."""
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra=f'[email]\nprotocol = "{protocol}"\n')
    async with running_intake(settings) as h:
        listener = h.app.email_listener
        normal, copy = listener._build(), listener._factory()
        template = listener._template
        assert type(copy) is type(normal) and template is not None
        assert set(vars(copy)) == set(vars(normal))
        for name, value in vars(normal).items():
            copied = vars(copy)[name]
            if isinstance(value, types.MethodType):  # bound to its own instance
                assert copied.__self__ is copy and copied.__func__ is value.__func__, name
            elif name == "_smtp_methods":
                assert copied.keys() == value.keys()
                assert all(m.__self__ is copy and m.__func__ is value[k].__func__ for k, m in copied.items())
            elif name == "_auth_methods":
                assert copied.keys() == value.keys()
                for k, mech in copied.items():
                    owner = copy if value[k].is_builtin else h.app.email_listener.handler
                    assert mech.method.__self__ is owner and mech.is_builtin == value[k].is_builtin, k
            elif name == "_handle_hooks":  # bound to the one handler, which every session shares
                assert copied == value
            elif name == "command_size_limits":  # raised by EHLO: each session's own
                assert copied == value and copied is not vars(template)[name]
            elif isinstance(value, (asyncio.Future, weakref.ref, collections.deque, asyncio.StreamReader)):
                assert copied is not vars(template)[name], f"{name} is shared with the template"
            elif name == "_strong_reader":
                assert isinstance(copied, asyncio.StreamReader) and copied is not vars(template)[name]
            else:
                assert copied == value, name
        if protocol == "smtp":  # and a copy serves a session (LMTP sessions: the LMTP tests)
            reply = await h.send(mail(subject="Copied protocol"))
            assert reply.code == 250


_PATH_PIECES = [
    "<", ">", "@", ".", " ", "\t", "a", "Z", "0", "-", "+", "_", "'", '"', "\\\\", ",", ":", ";", "[", "]",
    "(", ")", "é", "example", "com", "x.y", "SIZE=100", "BODY=8BITMIME", "\r", "\n", "=",
    "\x0b", "\x1c", "\x85", "\xa0", "\u2003",  # what str.lstrip() takes too, as the email package does
]  # fmt: skip


@settings(max_examples=3000, deadline=None, database=None)
@given(st.lists(st.sampled_from(_PATH_PIECES), max_size=14))
def test_the_fast_path_parser_agrees_with_aiosmtpds(pieces: list[str]) -> None:
    """The listener reads plain <local@domain> paths itself; where it does, it must give what
    aiosmtpd's own (slow) parser gives, and leave everything else to it."""
    arg = "".join(pieces)
    for candidate in (arg, f"<{arg}>", f"<a{arg}@example.com> {arg}", f" <{arg}@x.example>"):
        _compare_paths(candidate)


def test_the_fast_path_parser_on_paths_clients_send() -> None:
    for arg in [
        "<alice@acme.com>", "<a.b+tag@mail.acme.co.uk> SIZE=4096", "<A@B.C>  BODY=8BITMIME SMTPUTF8",
        " <x@y.z>", "<x@y.z>\t SIZE=1", "<>", "<a..b@c.d>", "<.a@c.d>", "<a@b.c.>", "<a@-b.c>",
        "<a@[127.0.0.1]>", '<"a b"@c.d>', "<@relay.example:a@b.c>", "a@b.c", "<a@b.c", "<a@b.c>x",
        "<" + "l" * 80 + "@b.c>",
    ]:  # fmt: skip
        _compare_paths(arg)


def _compare_paths(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    from adapters.email.listener import _SIMPLE_PATH, IntakeSMTP

    loop = asyncio.new_event_loop()
    try:
        ours = IntakeSMTP(object(), hostname="x", loop=loop)
        theirs = SMTP(object(), hostname="x", loop=loop)
        for limit in (0, 64):
            ours.local_part_limit = theirs.local_part_limit = limit
            try:
                expected = theirs._getaddr(arg)
            except Exception:  # aiosmtpd's parser fails on "<", ".@[" and the like...
                expected = (None, None)  # ...where ours answers "malformed" (553), not 451
            assert ours._getaddr(arg) == expected, (arg, limit, bool(_SIMPLE_PATH.match(arg)))
    finally:
        loop.close()


async def test_a_path_the_email_parser_chokes_on_is_malformed_not_a_failure(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    import smtplib

    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:

        def talk() -> list[tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", h.port, timeout=10) as client:
                client.ehlo("client.example")
                replies = [client.docmd("MAIL FROM:<"), client.docmd("MAIL FROM:<.@[>")]
                replies.append(client.docmd("MAIL FROM:<alice@acme.com> SIZE=100"))
                return replies

        first, second, good = await asyncio.to_thread(talk)
    assert first[0] == 553 and second[0] == 553, (first, second)  # not 451: retrying cannot help
    assert good[0] == 250


def test_a_gone_listeners_sessions_hold_no_capacity() -> None:
    """The parent clears the row of a listener process it found dead: behind Postfix every
    session comes from one address, and a dead child's 20 would otherwise hold that address at
    its cap until the child was back (or for good, if it could not be restarted)."""
    import multiprocessing

    from adapters.email.listener import SharedSessionCounts

    counts = SharedSessionCounts(2, multiprocessing.get_context("spawn"))
    counts.claim(1)  # as listener 2 does in its process
    for _ in range(3):
        counts.moved("127.0.0.1", 1)
    counts.claim(0)  # the first listener's view (its own row is empty)
    assert counts.total() == 3 and counts.elsewhere("127.0.0.1") == 3
    counts.clear(1)  # ListenerProcesses._forget, on seeing listener 2 dead
    assert counts.total() == 0 and counts.elsewhere("127.0.0.1") == 0
    # Buckets are keyed per service: nobody outside can pick addresses that share one.
    other = SharedSessionCounts(2, multiprocessing.get_context("spawn"))
    addresses = [f"2001:db8::{i:x}" for i in range(64)]
    assert [counts._bucket(a) for a in addresses] != [other._bucket(a) for a in addresses]


async def test_the_parent_clears_a_dead_listeners_row_as_it_forgets_it(tmp_path: Path) -> None:
    import multiprocessing

    from adapters.bootstrap import ListenerProcesses
    from adapters.email.listener import SharedSessionCounts
    from intake.ports import Recorder
    from tests.adapters.harness import settings_for

    ctx = multiprocessing.get_context("spawn")
    counts = SharedSessionCounts(2, ctx)
    counts.claim(1)
    for _ in range(20):  # listener 2 held Postfix's 20 sessions when it died
        counts.moved("127.0.0.1", 1)
    counts.claim(0)
    listeners = ListenerProcesses(settings_for(tmp_path, relay_port=25), [], lambda: None, Recorder(), counts)
    reader, writer = ctx.Pipe(duplex=False)
    writer.close()
    listeners._children[0] = (ctx.Process(target=print), reader)  # listener 2, row 1
    assert counts.elsewhere("127.0.0.1") == 20
    listeners._forget(0)
    assert counts.total() == 0 and counts.elsewhere("127.0.0.1") == 0


@pytest.mark.parametrize("steady", [False, True], ids=["dies-as-it-starts", "had-been-serving"])
async def test_a_listener_that_dies_as_it_starts_is_restarted_ever_more_slowly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steady: bool
) -> None:
    """A listener that crashes at every start (a broken plugin, a port it cannot use) was
    restarted every second for ever; one that dies soon after starting now waits 1 s, 2 s,
    4 s... (up to a minute) before the next try."""
    import multiprocessing

    from adapters import bootstrap
    from adapters.bootstrap import ListenerProcesses
    from intake.ports import Recorder
    from tests.adapters.harness import settings_for

    class Dead:
        exitcode = 1

        def is_alive(self) -> bool:
            return False

    ctx = multiprocessing.get_context("spawn")
    listeners = ListenerProcesses(settings_for(tmp_path, relay_port=25), [], lambda: None, Recorder())
    listeners.watch_every = 0.05
    if steady:  # one that had served longer than this is restarted at the next look, every time
        monkeypatch.setattr(bootstrap, "_STEADY_SECONDS", 0.0)
    spawns: list[float] = []

    async def spawn(k: int) -> None:  # it starts, and is dead at the next look
        spawns.append(time.monotonic())
        reader, writer = ctx.Pipe(duplex=False)
        writer.close()
        listeners._children[k] = (Dead(), reader)  # type: ignore[assignment]

    listeners._spawn = spawn  # type: ignore[method-assign]
    await spawn(0)
    watch = asyncio.create_task(listeners._watch_children())
    await asyncio.sleep(3.2)
    listeners._stopping = True
    await watch
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(spawns)]
    if steady:
        assert len(spawns) > 20 and max(gaps) < 0.5, gaps
        return
    assert len(spawns) == 3, gaps  # the first start, then after about 1 s and 2 s more: not 60 starts
    assert 1.0 <= gaps[0] < 1.5 and 2.0 <= gaps[1] < 2.5, gaps
