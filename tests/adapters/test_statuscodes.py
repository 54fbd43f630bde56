"""Enhanced status codes (RFC 2034, RFC 3463) on the listener's replies; RFC 2033 section 5
requires them of an LMTP server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from adapters.email.statuscodes import enhance
from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, running_intake, settings_for


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("501 Syntax: DATA", "501 5.5.4 Syntax: DATA"),
        ('500 Error: command "FOO" not recognized', '500 5.5.2 Error: command "FOO" not recognized'),
        ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
        ("554 Command refused due to lack of security", "554 5.7.0 Command refused due to lack of security"),
        (
            "555 MAIL FROM parameters not recognized or not implemented",
            "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
        ),
        ("550 no", "550 5.0.0 no"),  # a code without a more precise match: its class's X.0.0
        ("451", "451 4.3.0"),
        ("250-SIZE 100", "250-2.0.0 SIZE 100"),
        # Already coded, not a 2xx/4xx/5xx reply, or not a reply line: unchanged.
        ("250 2.1.5 Ok", "250 2.1.5 Ok"),
        ("451 4.3.0 Temporary failure", "451 4.3.0 Temporary failure"),
        ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("25", "25"),
        ("250x", "250x"),
        ("2x0 OK", "2x0 OK"),
    ],
)
def test_enhance(reply: str, expected: str) -> None:
    assert enhance(reply) == expected


CODED = re.compile(rb"^([245])[0-9]{2}[ -]([245])\.[0-9]{1,3}\.[0-9]{1,3}( |\r\n)")


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
async def test_every_reply_but_the_greeting_and_hello_carries_an_enhanced_code(
    tmp_path: Path, smtp_relay: RelayStandIn, protocol: str
) -> None:
    extra = f'[email]\nprotocol = "{protocol}"\n'
    hello = b"LHLO" if protocol == "lmtp" else b"EHLO"
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)

        async def reply() -> list[bytes]:
            lines = [await asyncio.wait_for(reader.readline(), 5)]
            while lines[-1][3:4] == b"-":
                lines.append(await asyncio.wait_for(reader.readline(), 5))
            return lines

        async def cmd(line: bytes) -> list[bytes]:
            writer.write(line + b"\r\n")
            return await reply()

        greeting = await reply()
        assert greeting[0].startswith(b"220 ") and not CODED.match(greeting[0])
        hello_lines = await cmd(hello + b" mta.test")
        assert b"250-ENHANCEDSTATUSCODES\r\n" in hello_lines, hello_lines
        assert not any(CODED.match(line) for line in hello_lines)  # RFC 2034 3: none there
        replies = [
            await cmd(b"DATA"),  # 503: no MAIL yet
            await cmd(b"MAIL FROM:<alice@acme.com> FROB=1"),  # 555: unknown parameter
            await cmd(b"MAIL FROM:<alice@acme.com>"),
            await cmd(b"MAIL FROM:<alice@acme.com>"),  # 503: nested
            await cmd(b"RCPT TO:<nobody@example.com>"),  # 550: not a support address
            await cmd(b"RCPT TO:<support@example.com>"),
            await cmd(b"RCPT TO:<billing@example.com>"),
            await cmd(b"RCPT TO:"),  # 501
            await cmd(b"NOOP"),
            await cmd(b"VRFY"),  # 501: syntax
            await cmd(b"EXPN staff"),  # 502
            await cmd(b"FROB"),  # 500: unknown
        ]
        assert (await cmd(b"DATA"))[0].startswith(b"354 ")  # 3xx: no code (RFC 2034 covers 2, 4, 5)
        writer.write(mail(subject="Coded").as_bytes().replace(b"\n", b"\r\n") + b".\r\n")
        replies += [await reply() for _ in range(2 if protocol == "lmtp" else 1)]
        replies += [await cmd(b"RSET"), await cmd(b"QUIT")]
        writer.close()
        lines = [line for r in replies for line in r]
        codes = [line[:3] for line in lines]
        assert codes == [
            b"503", b"555", b"250", b"503", b"550", b"250", b"250", b"501", b"250", b"501", b"502", b"500",
            *([b"250", b"250"] if protocol == "lmtp" else [b"250"]),
            b"250", b"221",
        ], lines  # fmt: skip
        for line in lines:
            coded = CODED.match(line)
            assert coded is not None and coded.group(1) == coded.group(2), line
        assert [line[4:9] for line in lines[1:6]] == [b"5.5.4", b"2.1.0", b"5.5.1", b"5.1.1", b"2.1.5"]
        assert h.stats()["tickets"] == 2
