"""The message after DATA, read in chunks instead of line by line.

aiosmtpd reads the message one line at a time (an ``await readuntil(b"\\r\\n")``, a log call
and some bookkeeping per line). :func:`read_message` asks the stream for everything up to the
next ``.\\r\\n`` at once: ``bench/bench_data.py`` (over loopback, uvloop) measured 130-250 µs
less CPU for a 4 KB message of 54 lines, and 0.16-0.20 s instead of 1.1-1.2 s for 25 MB. It
gives the same result:

* the end is a line holding a lone dot: ``\\r\\n.\\r\\n``, or ``.\\r\\n`` as the very first line
  (an empty message). A dot after a bare LF or CR ends nothing (SMTP smuggling,
  CVE-2023-51764 and aiosmtpd's CVE-2024-27305);
* the content is dot-unstuffed as aiosmtpd does it (RFC 5321 4.5.2): the first character of
  every line that starts with a dot is removed;
* the same refusals, with aiosmtpd's texts and in its order: ``500 Line too long`` for a line
  longer than ``line_limit`` bytes with its CRLF, ``552`` once the lines so far pass
  ``size_limit`` bytes (the final dot not counted), whichever aiosmtpd would have met first.
  The rest of the message is still read (so that the session stays in step) but not kept.

:func:`_first_problem` is aiosmtpd's per-line accounting, run only when the size limit is
passed (to tell which refusal comes first) and at the end for line lengths, never per line
on the way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, syntax

log = logging.getLogger("mail.log")  # aiosmtpd's own logger: these are its messages

TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
TOO_MUCH = "552 Error: Too much mail data"

_DOT = b".\r\n"
_END = b"\r\n.\r\n"
_CRLF = b"\r\n"


def _first_problem(data: bytes, line_limit: int, size_limit: int | None) -> str | None:
    """aiosmtpd's verdict on ``data`` (the message so far), line by line.

    A line whose content (CRLF excluded) passes ``line_limit`` is refused before it is counted
    (its reader overran); otherwise the line is counted first, then its whole length checked.
    A last line without its CRLF yet is refused as too long once aiosmtpd's reader would have
    overrun on it (``line_limit`` + 2 bytes without a CRLF); before that, not decided.
    """
    counted = 0
    start = 0
    while (end := data.find(_CRLF, start)) != -1:
        length = end + 2 - start
        if length - 2 > line_limit:
            return TOO_LONG
        counted += length
        if size_limit and counted > size_limit:
            return TOO_MUCH
        if length > line_limit:
            return TOO_LONG
        start = end + 2
    if len(data) - start >= line_limit + 2:
        return TOO_LONG
    return None


def _unstuff(content: bytes) -> bytes:
    content = content.replace(b"\r\n.", _CRLF)
    return content[1:] if content.startswith(b".") else content


async def read_message(
    reader: asyncio.StreamReader, *, line_limit: int, size_limit: int | None
) -> tuple[bytes, str | None]:
    """Read through the line holding a lone dot. Returns ``(content, None)``, the content
    dot-unstuffed, or ``(b"", refusal)``. The reader's own limit (aiosmtpd's ``line_limit``)
    bounds each read; a chunk is what lies before the next ``.\\r\\n`` or, past the reader's
    limit, what the reader holds (asyncio keeps back any part of the separator). Raises
    ``asyncio.IncompleteReadError`` if the stream ends first."""
    parts: list[bytes] = []
    size = 0
    problem: str | None = None
    # The last two bytes read before this chunk: at first the DATA command's CRLF (a lone dot
    # as the very first line ends an empty message). The end is looked for across chunks: a
    # read past the reader's limit stops two bytes short of what it holds, and when those
    # were "\n." of the final "\r\n.\r\n", its "\r" ended the chunk before.
    before = _CRLF
    while True:
        try:
            chunk = await reader.readuntil(_DOT)
            found = True
        except asyncio.LimitOverrunError as overrun:
            chunk = await reader.read(overrun.consumed)
            found = False
        end = found and (chunk.endswith(_END) or (len(chunk) < 5 and (before + chunk).endswith(_END)))
        piece = chunk[:-3] if end else chunk
        if problem is None:
            size += len(piece)
            parts.append(piece)
            if size_limit and size > size_limit:
                # Past the limit: which refusal would aiosmtpd have given first? Not decided
                # while the line that crosses it is still incomplete.
                problem = _first_problem(b"".join(parts), line_limit, size_limit)
            if problem is not None:
                parts.clear()  # refused: the rest is read, not kept
        if end:
            break
        before = chunk[-2:] if len(chunk) >= 2 else (before + chunk)[-2:]
    if problem is not None:
        return b"", problem
    content = b"".join(parts)
    # Line lengths, once for the whole message: within the size limit, so only a long line can refuse it.
    if max(map(len, content.split(_CRLF))) + 2 > line_limit and (
        problem := _first_problem(content, line_limit, size_limit)
    ):
        return b"", problem
    return _unstuff(content), None


class ChunkedData:
    """Mixed into aiosmtpd's ``SMTP`` (before it): its DATA command, reading with
    :func:`read_message`. Everything else is aiosmtpd's: the checks before the 354, the
    handler's ``handle_DATA`` hook, the reply, the state after DATA. Needs ``decode_data``
    off (the content stays bytes), as intake runs it."""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        smtp: Any = self  # aiosmtpd's SMTP, which this is mixed into
        if await smtp.check_helo_needed() or await smtp.check_auth_needed("DATA"):
            return
        if not smtp.envelope.rcpt_tos:
            await smtp.push("503 Error: need RCPT command")
            return
        if arg:
            await smtp.push("501 Syntax: DATA")
            return
        await smtp.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content, refusal = await read_message(
                smtp._reader, line_limit=smtp.line_length_limit, size_limit=smtp.data_size_limit
            )
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            smtp._writer.close()
            raise
        except asyncio.IncompleteReadError:  # the stream ended before the final dot
            log.info("Connection closed during DATA")
            smtp._writer.close()
            return
        if refusal is not None:
            # LMTP (RFC 2033 4.2) owes one reply per accepted recipient after the final dot, a
            # refusal included: with one reply for several recipients the client waits for the
            # rest, and reads the replies to its next commands (a 250 to RSET, NOOP...) as theirs.
            for _ in range(len(smtp.envelope.rcpt_tos) if isinstance(smtp, LMTP) else 1):
                await smtp.push(refusal)
            smtp._set_post_data_state()
            return
        smtp.envelope.content = smtp.envelope.original_content = content
        status = await smtp._call_handler_hook("DATA")
        smtp._set_post_data_state()
        await smtp.push("250 OK" if status is MISSING else status)
