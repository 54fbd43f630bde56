"""Protocol abuse found by attacking a running `intake serve` with a raw socket client, each
kept here as a regression test over loopback (the raw client and helpers are
test_listener_limits.py's): the reply code must be right, the session must stay in step, and
the listener must keep serving."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from adapters.email.listener import IntakeHandler
from intake.model import InboundMessage
from intake.service import Assessment
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import wait_until
from tests.adapters.test_listener_limits import (
    SUPPORT,
    RawClient,
    Reply,
    extra_listener,
    intake_with,
    message_bytes,
    still_serving,
    stored_count,
)
from tests.adapters.test_listener_processes import INTAKE, _serve
from tests.conftest import free_port

BILLING = "billing@example.com"  # the harness's second support address
SYNTAX = Reply(501, "5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]")


@pytest.mark.parametrize(
    "size", ["²".encode(), "①".encode(), "١٢".encode(), b"12x"], ids=["superscript", "circled", "arabic-indic", "x"]
)
async def test_a_size_parameter_that_is_not_ascii_digits_is_a_syntax_error(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture, size: bytes
) -> None:
    """RFC 1870: SIZE=1*20DIGIT. aiosmtpd's str.isdigit() let "²" through to int(), which
    raised: a traceback in the log and 451, a temporary failure, for a malformed command."""
    caplog.set_level(logging.INFO, logger="intake.smtp")
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        assert await client.cmd(b"MAIL FROM:<alice@acme.com> SIZE=" + size) == SYNTAX
        # The session is in step: a proper MAIL with SIZE is taken and the message stored.
        r = await client.transaction(message_bytes(), mail_from="alice@acme.com")
        assert r is not None and r.code == 250 and "stored as" in r.text, r
        await client.close()
        await still_serving(h)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


async def lmtp_data(client: RawClient, content: bytes, rcpt: tuple[str, ...]) -> list[Reply | None]:
    """LHLO done: MAIL, RCPT for each of ``rcpt``, DATA, ``content`` and the final dot; the
    replies after the dot (one per recipient, RFC 2033 4.2), then the reply to a NOOP sent
    behind them, to show that the session is still in step."""
    await client.envelope(rcpt=rcpt)
    r = await client.cmd("DATA")
    assert r is not None and r.code == 354, r
    await client.write(content + b".\r\nNOOP\r\n")
    return [await client.reply() for _ in range(len(rcpt) + 1)]


async def test_lmtp_refuses_a_message_once_per_recipient(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """A message refused after the final dot (a line too long, too big) got one reply however
    many recipients had been accepted: an LMTP client (Postfix) then waited for the others, or
    took the reply to its next command (here NOOP's 250) as a recipient's delivery."""
    async with intake_with(tmp_path, smtp_relay, 'protocol = "lmtp"\nmax_message_bytes = 2048\n') as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("LHLO client.test")
        too_long = Reply(500, "5.5.2 Line too long (see RFC5321 4.5.3.1.6)")
        too_big = Reply(552, "5.3.4 Message too big: this server accepts at most 2048 bytes")
        noop = Reply(250, "2.0.0 OK")
        rcpt = (SUPPORT, BILLING)
        assert await lmtp_data(client, message_bytes(body=b"x" * 2000 + b"\r\n"), rcpt) == [too_long, too_long, noop]
        assert await lmtp_data(client, message_bytes(body=b"y" * 70 + b"\r\n") * 40, rcpt) == [too_big, too_big, noop]
        # One recipient, one reply, as before.
        assert await lmtp_data(client, message_bytes(body=b"z" * 2000 + b"\r\n"), (SUPPORT,)) == [too_long, noop]
        assert stored_count(h) == 0
        # And a message that fits is delivered to both, a reply each.
        replies = await lmtp_data(client, message_bytes(), rcpt)
        assert [r.code if r else None for r in replies] == [250, 250, 250], replies
        assert all("stored as" in r.text for r in replies[:2] if r), replies
        assert stored_count(h) == 2
        await client.close()


class _ParseFails(IntakeHandler):
    async def _parse(self, raw: bytes, recipient: str, sender: str) -> tuple[InboundMessage, Assessment | None]:
        raise RuntimeError("parser broke")


async def test_lmtp_answers_an_unexpected_failure_once_per_recipient(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler's last resort (parsing raised, which parse_email never should) answered one
    451 for the whole transaction; in LMTP each accepted recipient is owed its own."""
    caplog.set_level(logging.ERROR, logger="intake.smtp")
    kw: dict[str, Any] = {"protocol": "lmtp"}
    async with intake_with(tmp_path, smtp_relay) as h, extra_listener(h, _ParseFails, **kw) as listener:
        client, _ = await RawClient.open(listener.port)
        await client.cmd("LHLO client.test")
        try_again = Reply(451, "4.3.0 Temporary failure storing the message, please try again later")
        replies = await lmtp_data(client, message_bytes(), (SUPPORT, BILLING))
        assert replies == [try_again, try_again, Reply(250, "2.0.0 OK")]
        await client.close()
        assert stored_count(h) == 0
    assert "parse failed unexpectedly" in caplog.text


@pytest.mark.parametrize("recipients", [(SUPPORT,), (SUPPORT, BILLING)], ids=["one", "two"])
async def test_a_message_stored_after_the_client_left_has_a_log_line(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture, recipients: tuple[str, ...]
) -> None:
    """A client that resets the connection right after the final dot cancels the session while
    the store commits its message all the same: the ticket was there, and not one log line
    said that the message had come. Every stored message's Message-ID must be in the log."""
    caplog.set_level(logging.INFO, logger="intake.smtp")
    async with intake_with(tmp_path, smtp_relay) as h:
        ids = [f"gone-{n}@acme.com" for n in range(5)]
        for message_id in ids:
            client, _ = await RawClient.open(h.port)
            await client.cmd("EHLO client.test")
            await client.envelope(rcpt=recipients)
            assert (await client.cmd("DATA")).code == 354  # type: ignore[union-attr]
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.write(message_bytes(Message_ID=f"<{message_id}>") + b".\r\n")
            client.writer.transport.abort()  # a reset, at once: no reply is read
        await wait_until(lambda: stored_count(h) == len(ids) * len(recipients))
        await still_serving(h)
    logged = {r.__dict__.get("message_id") for r in caplog.records if r.name == "intake.smtp"}
    assert set(ids) <= logged, caplog.text


async def _greetings(port: int, n: int, source: str, held: list[socket.socket]) -> list[bytes]:
    """Open ``n`` connections from ``source`` one after another, each kept open in ``held``;
    the reply code each got on connecting (220 greeted, 421 refused)."""

    def one() -> bytes:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        held.append(sock)
        return sock.recv(100)[:3]

    return [await asyncio.to_thread(one) for _ in range(n)]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="runs `intake serve` as test_listener_processes")
async def test_the_session_caps_hold_across_listener_processes(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """The caps are the service's: each listener process counted only its own sessions, so
    with two processes one client held up to twice max_sessions_per_client (36 of 60 idle
    connections greeted, per-client cap 20, against a running `intake serve`)."""
    port = free_port()
    cfg = tmp_path / "intake.toml"
    cfg.write_text(
        f'[storage]\nurl = "sqlite:///{tmp_path}/intake.db"\n'
        f"[email]\nlisten_port = {port}\nlistener_processes = 2\nparse_workers = 0\n"
        "max_sessions = 6\nmax_sessions_per_client = 4\n"
        f"[outbound]\nrelay_port = {smtp_relay.port}\n"
    )
    upgrade = [*INTAKE, "--config", str(cfg), "db", "upgrade"]
    await asyncio.to_thread(subprocess.run, upgrade, check=True, capture_output=True, timeout=60)
    proc = await _serve(cfg, port)
    held: list[socket.socket] = []
    try:
        assert await _greetings(port, 10, "127.0.0.1", held) == [b"220"] * 4 + [b"421"] * 6
        assert await _greetings(port, 4, "127.0.0.2", held) == [b"220"] * 2 + [b"421"] * 2
        for sock in held:
            sock.close()
        held.clear()
        await asyncio.sleep(0.5)  # the closes reach both processes
        assert await _greetings(port, 5, "127.0.0.1", held) == [b"220"] * 4 + [b"421"]
    finally:
        for sock in held:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def test_arguments_echoed_in_a_reply_are_made_safe(
    tmp_path: Path, smtp_relay: RelayStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd echoes some arguments: bytes that are not UTF-8 in one made the reply raise
    (a traceback, and '451 ... storing the message' to a VRFY); control characters went back
    raw, a bare CR or a NUL inside a reply line."""
    caplog.set_level(logging.INFO, logger="intake.smtp")
    async with intake_with(tmp_path, smtp_relay) as h:
        client, _ = await RawClient.open(h.port)
        await client.cmd("EHLO client.test")
        assert await client.cmd(b"VRFY .@[\xff") == Reply(502, "5.5.1 Could not VRFY .@[?")
        assert await client.cmd(b"FOO\rBAR") == Reply(500, '5.5.2 Error: command "FOO?BAR" not recognized')
        assert await client.cmd(b"NO\x00OP") == Reply(500, '5.5.2 Error: command "NO?OP" not recognized')
        r = await client.transaction(message_bytes())
        assert r is not None and r.code == 250, r
        await client.close()
        await still_serving(h)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
