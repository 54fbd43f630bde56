"""Protocol abuse found by attacking a running `intake serve` with a raw socket client, each
kept here as a regression test over loopback (the raw client and helpers are
test_listener_limits.py's): the reply code must be right, the session must stay in step, and
the listener must keep serving."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.adapters.conftest import RelayStandIn
from tests.adapters.test_listener_limits import (
    RawClient,
    Reply,
    intake_with,
    message_bytes,
    still_serving,
)

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
