"""LeanLoop (adapters/email/smtploop.py) against aiosmtpd's own command loop, over real sockets.

Two servers on loopback for each set of settings: aiosmtpd's ``SMTP`` with the chunked DATA
reader, as the listener had it, and the same with :class:`LeanLoop` mixed in. Each example
sends the same command lines to both, one at a time (the reply read before the next line) and
then all at once (pipelined, the replies read as one stream to the end), and both must
answer byte for byte the same. Then the timer and a client that does not read its replies.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.email import smtploop
from adapters.email.smtpdata import ChunkedData
from adapters.email.smtploop import LeanLoop
from tests.adapters.test_smtpdata import Capture  # the handler the DATA reader's test uses

BODY = b"Subject: a test\r\n\r\nhello\r\n.\r\n"

# Constructor settings each pair of servers runs with.
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "limits": {"command_call_limit": {"NOOP": 3, "RSET": 2, "*": 30}, "data_size_limit": 40},
    "utf8": {"enable_SMTPUTF8": True, "command_call_limit": 12},
}

_LINES = [
    b"EHLO client.example", b"HELO client.example", b"EHLO", b"ehlo mixed.Case", b"HELO",
    b"MAIL FROM:<a@b.example>", b"mail from:<a@b.example> SIZE=10", b"MAIL FROM:<a@b.example> SIZE=100000",
    b"MAIL FROM:<a@b.example> BODY=8BITMIME", b"MAIL FROM:<a@b.example> BODY=7BIT SMTPUTF8",
    b"MAIL FROM: <a@b.example>", b"MAIL FROM:<>", b"MAIL FROM:a@b.example", b"MAIL TO:<a@b.example>", b"MAIL",
    b"MAIL FROM:<\xc3\xa4@b.example>", b"MAIL FROM:<\xff@b.example>",
    b"RCPT TO:<s@x.example>", b"RCPT TO:<t@x.example> NOTIFY=NEVER", b"RCPT FROM:<s@x.example>", b"RCPT",
    b"DATA", b"DATA now", b"RSET", b"RSET x", b"NOOP", b"NOOP hello", b"VRFY a@b.example", b"VRFY", b"EXPN list",
    b"HELP", b"HELP MAIL", b"HELP NOSUCH", b"AUTH PLAIN", b"STARTTLS", b"QUIT now", b"FOO", b"", b"   ",
    b"\xff\xfe", b"NOOP " + b"a" * 508, b"NOOP " + b"a" * 507, b"MAIL FROM:<" + b"a" * 520 + b"@b.example>",
    b"RCPT TO:<" + b"b" * 1200 + b">", b"x" * 3000, b"EHLO \xc3\xa9.example", b"NOOP\t", b" NOOP",
]  # fmt: skip


class Plain(ChunkedData, SMTP):
    pass


class Lean(LeanLoop, ChunkedData, SMTP):
    pass


class Servers:
    """One server of each kind per set of settings, on the test's loop."""

    def __init__(self) -> None:
        self.ports: dict[tuple[str, str], int] = {}
        self.servers: list[asyncio.Server] = []

    async def start(self, sndbuf: int | None = None, **extra: Any) -> None:
        loop = asyncio.get_running_loop()
        for kind, cls in (("plain", Plain), ("lean", Lean)):
            for name, kwargs in SETTINGS.items():

                def factory(cls: Any = cls, kwargs: dict[str, Any] = kwargs) -> SMTP:
                    return cls(Capture(), hostname="test.local", loop=loop, **kwargs, **extra)  # type: ignore[no-any-return]

                sock = socket.socket()
                if sndbuf:  # accepted connections inherit it (Linux)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                sock.bind(("127.0.0.1", 0))
                server = await loop.create_server(factory, sock=sock)
                self.servers.append(server)
                self.ports[(kind, name)] = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for s in self.servers:
            s.close()
            await s.wait_closed()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (all its lines), or b"<closed>" when the server closed first."""
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line:
            return out + b"<closed>"
        out += line
        if line[3:4] != b"-":
            return out


async def one_at_a_time(port: int, lines: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await _reply(reader)]
    try:
        for line in [*lines, b"QUIT"]:
            writer.write(line + b"\r\n")
            reply = await _reply(reader)
            replies.append(reply)
            if reply.endswith(b"<closed>"):
                break
            if reply.startswith(b"354"):
                writer.write(BODY)
                replies.append(await _reply(reader))
    finally:
        writer.close()
    return replies


async def pipelined(port: int, lines: list[bytes]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(line + b"\r\n" for line in [*lines, b"QUIT"]) + BODY)
        # Everything the server says until it closes (QUIT, a limit, or the lines ran out and
        # the body is taken as commands: then our close ends it).
        return await asyncio.wait_for(_read_all(reader), 5)
    except TimeoutError:
        return b"<timeout>"
    finally:
        writer.close()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while chunk := await reader.read(65536):
        out += chunk
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from(_LINES), max_size=14), setting=st.sampled_from(sorted(SETTINGS)))
async def test_the_same_replies_as_aiosmtpds_loop(servers: Servers, lines: list[bytes], setting: str) -> None:
    plain, lean = servers.ports[("plain", setting)], servers.ports[("lean", setting)]
    assert await one_at_a_time(lean, lines) == await one_at_a_time(plain, lines)
    assert await pipelined(lean, lines) == await pipelined(plain, lines)


@pytest.mark.parametrize(
    "lines",
    [
        [b"EHLO c.example", b"MAIL FROM:<a@b.example>", b"RCPT TO:<s@x.example>", b"DATA"],
        [b"HELO c.example", b"MAIL FROM:<a@b.example>", b"MAIL FROM:<a@b.example>", b"DATA", b"RSET", b"NOOP"],
        [b"EHLO c.example"] * 3 + [b"MAIL FROM:<" + b"a" * 527 + b"@acme.com>"],
        [b"FOO"] * 6,  # the fifth unknown command closes the session
        [b"NOOP"] * 5,  # past NOOP's call limit in "limits": 421, closed
        [b"QUIT"],
    ],
    ids=["transaction", "out-of-order", "mail-limit-after-ehlo", "bogus", "noop-limit", "quit"],
)
@pytest.mark.parametrize("setting", sorted(SETTINGS))
async def test_named_sequences(servers: Servers, lines: list[bytes], setting: str) -> None:
    plain, lean = servers.ports[("plain", setting)], servers.ports[("lean", setting)]
    expected = await one_at_a_time(plain, lines)
    assert await one_at_a_time(lean, lines) == expected
    assert await pipelined(lean, lines) == await pipelined(plain, lines)


async def test_silence_still_closes_the_session_and_commands_keep_it_open() -> None:
    s = Servers()
    await s.start(timeout=0.4)
    try:
        for kind in ("plain", "lean"):
            port = s.ports[(kind, "defaults")]
            # A command every 0.1 s for 1.2 s: three times the timeout, never silent for it.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _reply(reader)
            for _ in range(12):
                writer.write(b"NOOP\r\n")
                assert await _reply(reader) == b"250 OK\r\n", kind
                await asyncio.sleep(0.1)
            # Then silence: closed without a word after the timeout (aiosmtpd's behaviour).
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b"", kind
            # The timeout (0.4 s) less the 0.1 s slept since the last reply: about 0.3 s; the margin
            # is for timer rounding (Python 3.13 closed it 50 us short of 0.3 s here).
            assert 0.25 < loop.time() - started < 2.0, kind
            writer.close()
    finally:
        await s.close()


async def test_a_client_that_does_not_read_its_replies_is_held_back_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """With small socket buffers and thousands of EHLOs sent without reading the replies,
    the server's transport pauses: LeanLoop's replies then go through aiosmtpd's push, which
    waits for the transport to drain. Every reply arrives, in order, as from aiosmtpd."""
    fallbacks = 0
    original = SMTP.push

    async def counting(self: Any, status: Any) -> None:
        nonlocal fallbacks
        if isinstance(self, Lean):
            fallbacks += 1
        await original(self, status)

    monkeypatch.setattr(SMTP, "push", counting)
    servers = Servers()
    await servers.start(sndbuf=4096)
    got = {}
    for kind in ("plain", "lean"):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", servers.ports[(kind, "defaults")]))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"EHLO c.example\r\n" * 6000 + b"QUIT\r\n")
        await asyncio.sleep(0.5)  # the server fills the window and its buffer meanwhile
        got[kind] = await asyncio.wait_for(_read_all(reader), 30)
        writer.close()
    await servers.close()
    assert got["lean"] == got["plain"]
    assert got["lean"].count(b"250 HELP\r\n") == 6000 and got["lean"].endswith(b"221 Bye\r\n")
    assert fallbacks > 0, "the transport never paused: the test did not test the fallback"


def test_active_only_for_the_aiosmtpd_it_was_reviewed_against(monkeypatch: pytest.MonkeyPatch) -> None:
    """If this fails, aiosmtpd's command loop (or a method LeanLoop relies on) changed: compare
    LeanLoop with the new source, then set REVIEWED to the hash below. Meanwhile the listener
    runs aiosmtpd's own loop, so nothing is wrong, only slower."""
    assert smtploop.source_hash() == smtploop.REVIEWED, f"new hash: {smtploop.source_hash()}"
    assert smtploop.active()
    smtploop.active.cache_clear()
    monkeypatch.setattr(smtploop, "REVIEWED", "something else")
    try:
        assert not smtploop.active()
    finally:
        smtploop.active.cache_clear()


async def test_an_unreviewed_aiosmtpd_gets_its_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inactive, every LeanLoop method is aiosmtpd's: the replies are still aiosmtpd's."""
    smtploop.active.cache_clear()
    monkeypatch.setattr(smtploop, "REVIEWED", "something else")
    called = []
    original = SMTP._handle_client

    async def spy(self: Any) -> None:
        called.append(self)
        await original(self)

    monkeypatch.setattr(SMTP, "_handle_client", spy)
    s = Servers()
    await s.start()
    try:
        lines = [b"EHLO c.example", b"MAIL FROM:<a@b.example>", b"RCPT TO:<s@x.example>", b"DATA"]
        assert await one_at_a_time(s.ports[("lean", "defaults")], lines) == await one_at_a_time(
            s.ports[("plain", "defaults")], lines
        )
        assert len(called) == 2  # both servers ran aiosmtpd's loop
    finally:
        await s.close()
        smtploop.active.cache_clear()


class _Transport(asyncio.Transport):
    """A transport that records each write (one write is one system call on a real socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 4321) if name == "peername" else default


async def _writes_for(chunks: list[bytes]) -> list[bytes]:
    loop = asyncio.get_running_loop()
    proto = Lean(Capture(), hostname="test.local", loop=loop)
    transport = _Transport()
    proto.connection_made(transport)
    for chunk in chunks:
        await asyncio.sleep(0.01)
        proto.data_received(chunk)
    await asyncio.sleep(0.05)
    proto.connection_lost(None)
    return transport.writes


async def test_a_pipelined_group_is_answered_in_one_write() -> None:
    """MAIL, RCPT, RCPT and DATA sent at once: their four replies leave in one write (RFC 2920
    3.2); sent one by one, one write each; RSET is groupable too, NOOP never (RFC 2920 3.2)."""
    envelope = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<s@x.example>\r\nRCPT TO:<t@x.example>\r\nDATA\r\n"
    writes = await _writes_for([b"HELO c.example\r\n", envelope, BODY, b"QUIT\r\n"])
    assert writes[2] == b"250 OK\r\n250 OK\r\n250 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    assert writes[3:] == [b"250 OK stored\r\n", b"221 Bye\r\n"]
    one_by_one = await _writes_for([b"HELO c.example\r\n", *envelope.splitlines(keepends=True)])
    assert one_by_one[2:] == [b"250 OK\r\n", b"250 OK\r\n", b"250 OK\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"]
    mixed = await _writes_for([b"HELO c.example\r\nRSET\r\nNOOP\r\nRSET\r\nRSET\r\n"])
    assert mixed[1:] == [b"250 test.local\r\n", b"250 OK\r\n250 OK\r\n", b"250 OK\r\n250 OK\r\n"]


async def test_a_held_reply_goes_out_before_the_loop_waits_for_input() -> None:
    """A MAIL whose next command line is only half there: the reply is not held back while
    the rest of that line is awaited (RFC 2920 3.2: flush when the input runs dry)."""
    writes = await _writes_for([b"HELO c.example\r\n", b"MAIL FROM:<a@b.example>\r\nRCPT TO:<s@x", b".example>\r\n"])
    assert writes[1:] == [b"250 test.local\r\n", b"250 OK\r\n", b"250 OK\r\n"]
