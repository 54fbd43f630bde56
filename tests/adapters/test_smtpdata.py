"""The chunked DATA reader (adapters/email/smtpdata.py) against aiosmtpd's own, over real sockets.

Two servers on loopback, aiosmtpd's ``SMTP`` as it is and the same with :class:`ChunkedData`
mixed in, with a line limit of 40 bytes and a few size limits so that both refusals, and
their order, come up often. Each example sends the same bytes after DATA to both, cut into
pieces that arrive one by one (cuts inside a CRLF, inside the final ``CRLF.CRLF``, inside a
long line), and the two must give the same reply and hand the handler the same bytes; the
session must be in step afterwards (RSET, QUIT). Then the cases worth naming on their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.email.smtpdata import TOO_LONG, TOO_MUCH, ChunkedData, read_message

LINE_LIMIT = 40
SIZE_LIMITS = (None, 8, 50, 150)


class Capture:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.got.append(envelope.original_content)
        return "250 OK stored"


class Plain(SMTP):
    line_length_limit = LINE_LIMIT


class Chunked(ChunkedData, SMTP):
    line_length_limit = LINE_LIMIT


class Pair:
    """One server of each kind per size limit, on the test's loop."""

    def __init__(self) -> None:
        self.ports: dict[tuple[str, int | None], int] = {}
        self.handlers: dict[tuple[str, int | None], Capture] = {}
        self.servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for kind, cls in (("plain", Plain), ("chunked", Chunked)):
            for limit in SIZE_LIMITS:
                handler = Capture()

                def factory(cls: Any = cls, handler: Capture = handler, limit: int | None = limit) -> SMTP:
                    return cls(handler, data_size_limit=limit, loop=loop)  # type: ignore[no-any-return]

                server = await loop.create_server(factory, "127.0.0.1", 0)
                self.servers.append(server)
                self.ports[(kind, limit)] = server.sockets[0].getsockname()[1]
                self.handlers[(kind, limit)] = handler

    async def close(self) -> None:
        for s in self.servers:
            s.close()
            await s.wait_closed()

    async def deliver(self, kind: str, limit: int | None, pieces: list[bytes]) -> tuple[str, bytes | None, str]:
        """(reply to the data, bytes the handler got or None, replies to RSET and QUIT)."""
        handler = self.handlers[(kind, limit)]
        handler.got.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.ports[(kind, limit)])
        try:
            await _reply(reader)
            for command in (
                b"HELO client.example\r\n",
                b"MAIL FROM:<a@client.example>\r\n",
                b"RCPT TO:<s@x.example>\r\n",
            ):
                writer.write(command)
                assert (await _reply(reader)).startswith("250"), command
            writer.write(b"DATA\r\n")
            assert (await _reply(reader)).startswith("354")
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)  # so that each piece is a read of its own
            reply = await _reply(reader)
            writer.write(b"RSET\r\n")
            after = await _reply(reader)
            writer.write(b"QUIT\r\n")
            after += " / " + await _reply(reader)
        finally:
            writer.close()
        return reply, (handler.got[0] if handler.got else None), after


async def _reply(reader: asyncio.StreamReader) -> str:
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 5)).decode("latin-1").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    await p.start()
    try:
        yield p
    finally:
        await p.close()


_BITS = st.sampled_from(
    [b"a", b"hello world ", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b"\n.\r\n", b"\r.\r\n", b"x" * 30, b" " * 45]
)


def _ended(body: bytes) -> bytes:
    return (body + b"\r\n" if body and not body.endswith(b"\r\n") else body) + b".\r\n"


def _data() -> st.SearchStrategy[bytes]:
    # What follows DATA, ending with a lone dot, and no lone dot before it: one inside would
    # end DATA for both, and the rest would be taken as commands.
    return (
        st.lists(_BITS, max_size=40)
        .map(lambda bits: _ended(b"".join(bits)))
        .filter(lambda data: (b"\r\n" + data).find(b"\r\n.\r\n") == len(data) - 3)
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=_data(), cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=4), limit=st.sampled_from(SIZE_LIMITS)
)
async def test_the_chunked_reader_answers_and_keeps_what_aiosmtpd_does(
    pair: Pair, data: bytes, cuts: list[int], limit: int | None
) -> None:
    points = sorted({c for c in cuts if c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    plain = await pair.deliver("plain", limit, pieces)
    chunked = await pair.deliver("chunked", limit, pieces)
    assert chunked == plain, (data, pieces)
    assert plain[2] == "250 OK / 221 Bye"


async def test_named_cases(pair: Pair) -> None:
    cases = {
        "empty message": [b".\r\n"],
        "one line, the dot in a piece of its own": [b"Subject: x\r\n", b".\r\n"],
        "cut inside the final CRLF.CRLF": [b"a\r\nb\r", b"\n.", b"\r\n"],
        "stuffed dots": [b"..leading\r\n.\r\n..\r\nend.\r\n.\r\n"],
        "bare LF dot is no end": [b"a\n.\nb\r\n.\r\n"],
        "a line of exactly 40 bytes with its CRLF": [b"y" * 38 + b"\r\n.\r\n"],
        "one byte more": [b"y" * 39 + b"\r\n.\r\n"],
        "long line cut in two": [b"z" * 30, b"z" * 30 + b"\r\n.\r\n"],
        # Past the reader's limit, a read stops two bytes short ("\n."): the end spans chunks.
        "the final dot last in a piece past the reader's limit": [b"a" * 20 + b"\r\n" + b"b" * 20 + b"\r\n.", b"\r\n"],
    }
    for name, pieces in cases.items():
        for limit in SIZE_LIMITS:
            plain = await pair.deliver("plain", limit, pieces)
            chunked = await pair.deliver("chunked", limit, pieces)
            assert chunked == plain, (name, limit, plain, chunked)
    assert (await pair.deliver("chunked", None, [b".\r\n"]))[:2] == ("250 OK stored", b"")
    reply, got, _ = await pair.deliver("chunked", None, [b"..a\r\n.b\r\n...\r\n.\r\n"])
    assert (reply, got) == ("250 OK stored", b".a\r\nb\r\n..\r\n")
    assert (await pair.deliver("chunked", None, [b"y" * 39 + b"\r\n.\r\n"]))[:2] == (TOO_LONG, None)
    assert (await pair.deliver("chunked", 8, [b"a" * 20 + b"\r\n" + b"b" * 20 + b"\r\n.\r\n"]))[:2] == (TOO_MUCH, None)


async def test_a_big_message_is_read_whole_and_a_too_big_one_is_not_kept() -> None:
    line = b"A" * 76 + b"\r\n"
    big = line * 70_000  # 5.5 MB
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(big + b".\r\nQUIT\r\n")
    content, refusal = await read_message(reader, line_limit=1001, size_limit=len(big))
    assert refusal is None and content == big
    assert await reader.readline() == b"QUIT\r\n"  # what follows the dot stays for the session

    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(big + b".\r\nQUIT\r\n")
    content, refusal = await read_message(reader, line_limit=1001, size_limit=len(big) - 1)
    assert (content, refusal) == (b"", TOO_MUCH)
    assert await reader.readline() == b"QUIT\r\n"


async def test_the_end_is_found_wherever_the_message_is_cut() -> None:
    """With intake's limits, the bytes after DATA arriving in two pieces cut anywhere near the
    end, past the reader's limit or not (hypothesis found a hang: the final dot the last byte
    of a piece past the limit was not taken for the end)."""
    message = b"Subject: cut\r\n\r\n" + b"w" * 900 + b"\r\n" + b"x" * 900 + b"\r\n"
    data = message + b".\r\nQUIT\r\n"
    for cut in range(len(data) - 20, len(data)):
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(data[:cut])

        async def rest(reader: asyncio.StreamReader = reader, cut: int = cut) -> None:
            await asyncio.sleep(0)
            reader.feed_data(data[cut:])

        task = asyncio.ensure_future(rest())
        content, refusal = await asyncio.wait_for(read_message(reader, line_limit=1001, size_limit=None), 2)
        await task
        assert (content, refusal) == (message, None), cut
        assert await reader.readline() == b"QUIT\r\n", cut


async def test_the_stream_ending_before_the_dot_is_an_incomplete_read() -> None:
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(b"Subject: cut\r\n\r\nno end")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_message(reader, line_limit=1001, size_limit=None)
