"""Outbound email: render an :class:`OutgoingEmail` as RFC 5322 bytes and hand it to the relay.

:func:`build_message` is pure: it turns the stored, fully rendered email into the bytes the
relay receives. :class:`SmtpRelaySender` delivers them with aiosmtplib (connection, EHLO,
STARTTLS, AUTH; the transaction itself is pipelined when the relay offers PIPELINING, which
aiosmtplib cannot do: see :func:`_pipelined`) and maps every failure onto the send errors of
:mod:`intake.errors`::

    ValueError                     build_message: the email can never be a valid message
    SendError
     ├── TransientSendError        try again later: a 4xx to MAIL, RCPT (every recipient) or
     │    │                        DATA for this message
     │    └── ChannelUnavailableError  the relay itself: unreachable or timing out, connection
     │                             lost, 421 (closing; on a kept connection, the send goes again
     │                             on a fresh one first), 530 to MAIL, any reply refusing the
     │                             greeting, EHLO, STARTTLS or AUTH (a relay or credentials problem, not this
     │                             message's: the outbox holds every email until
     │                             :meth:`SmtpRelaySender.check` finds the relay back)
     └── PermanentSendError        retrying cannot help: 5xx to MAIL, RCPT (every recipient) or
                                   DATA, or an email build_message refuses

Header safety. Customers control the subject and the display name we copy into our headers.
Both go through :func:`intake.headers.clean_header_text` (again here: defence in depth), so no
CR, LF or other control character reaches a header. One more trap stays: the stdlib parses a
header value assigned as a string and *decodes* RFC 2047 encoded words in it. On Python before
3.11.10 / 3.12.5 a customer subject ``=?utf-8?q?=0D=0ABcc:_x?=`` is then written back as a raw
CRLF and a new ``Bcc:`` header (CVE-2024-6923); on later versions the literal text still turns
into something else. So free text that is not plain ASCII, or that contains ``=?``, is encoded
here with :class:`email.header.Header` (which treats its input as literal text), and so are the
address and Message-ID headers; the resulting lines are handed to the message as a prefolded
header object, which ``EmailPolicy`` writes as it is. Plain ASCII text is folded by
``email.policy.SMTP`` itself.

Transfer encoding. The policy is ``policy.SMTP`` with ``cte_type="7bit"``: a non-ASCII or long-lined
body becomes quoted-printable (or base64 when that is shorter), never 8bit, so the message is
7-bit clean and needs no 8BITMIME from the relay (aiosmtplib would not announce BODY=8BITMIME for
raw bytes anyway). Every line is at most 78 characters except an unbreakable Message-ID, and
:func:`build_message` checks the 998-octet limit before returning.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import functools
import logging
import re
import ssl
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email import policy as email_policy
from email.header import Header
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime, formataddr
from typing import cast

import aiosmtplib

from intake.errors import ChannelUnavailableError, PermanentSendError, TransientSendError
from intake.headers import answerable, clean_header_text, display_name
from intake.model import OutgoingEmail

__all__ = ["POLICY", "SmtpRelaySender", "build_message"]

log = logging.getLogger(__name__)

POLICY = email_policy.SMTP.clone(cte_type="7bit")

MAX_LINE = 78  # RFC 5322 2.1.1: SHOULD
MAX_LINE_OCTETS = 998  # RFC 5322 2.1.1: MUST, without the CRLF
MAX_REFERENCES = 20  # the thread root and the 19 nearest: enough for every client to thread
MAX_MSG_ID = 250
EXTRA_VALUE_MAX = 500
REPLY_EXCERPT_MAX = 120  # of a relay's reply text, in error messages

# RFC 5322 3.6.8: field-name = 1*ftext, printable US-ASCII except ":".
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# A bare addr-spec as we send it: dot-atom local part, host name domain, ASCII only (no SMTPUTF8).
# msg-id content without its angle brackets: printable ASCII except "<" and ">".
_MSG_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")

# Headers build_message writes itself; an extra header must not add a second one or override.
_OWNED_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "return-path",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
    }
)
# Body characters that have no business in text/plain: C0 controls except TAB, LF, CR; DEL.
_BODY_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _PrefoldedHeader(str):
    """A header folded here. ``EmailPolicy`` writes a value with ``.name`` and ``.fold()`` as is.

    The string value is the readable text; ``fold`` returns the wire lines.
    """

    name: str
    _lines: tuple[str, ...]

    def __new__(cls, name: str, value: str, lines: Sequence[str]) -> _PrefoldedHeader:
        header = super().__new__(cls, value)
        header.name = name
        header._lines = tuple(lines)
        return header

    def fold(self, *, policy: Policy) -> str:
        return policy.linesep.join(self._lines) + policy.linesep


def build_message(email: OutgoingEmail, *, date: datetime | None = None) -> bytes:
    """Render ``email`` as RFC 5322 bytes with CRLF line endings, 7-bit clean.

    ``date`` (timezone-aware) defaults to now. Raises ValueError when the email can never be a
    valid message: no recipient, an invalid address or Message-ID, an extra header whose name
    is not an RFC 5322 field name or is one this function writes itself. In-Reply-To and
    References entries that are not valid msg-ids (they come from the customer) are dropped.
    """
    if not email.to:
        raise ValueError("an email needs at least one recipient")
    from_address = _address(email.from_address, "from_address")
    to = [_address(addr, "to") for addr in email.to]
    message_id = _own_message_id(email.message_id)
    if date is None:
        date = datetime.now(UTC)
    elif date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")

    fast = _plain_message(email, from_address, to, message_id, date)
    if fast is not None:
        return fast

    msg = EmailMessage(policy=POLICY)
    msg["From"] = _mailbox_header("From", display_name(email.from_name), from_address)
    msg["To"] = _list_header("To", to, separator=",")
    _set_text(msg, "Subject", clean_header_text(email.subject))
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = _list_header("Message-ID", [f"<{message_id}>"])
    in_reply_to = _foreign_ids([email.in_reply_to] if email.in_reply_to else [])
    if in_reply_to:
        msg["In-Reply-To"] = _list_header("In-Reply-To", [f"<{in_reply_to[0]}>"])
    references = _foreign_ids(email.references)
    if len(references) > MAX_REFERENCES:
        references = [references[0], *references[-(MAX_REFERENCES - 1) :]]
    if references:
        msg["References"] = _list_header("References", [f"<{mid}>" for mid in references])
    for name, value in email.headers:
        _check_extra_name(name)
        _set_text(msg, name, clean_header_text(value, max_length=EXTRA_VALUE_MAX))
    msg.set_content(_clean_body(email.body), subtype="plain", charset="utf-8")

    data = msg.as_bytes()
    _check_wire_format(data)
    return data


def _plain_message(
    email: OutgoingEmail, from_address: str, to: list[str], message_id: str, date: datetime
) -> bytes | None:
    """The common case written directly: every header text plain printable ASCII.

    Acknowledgements are this case almost always, and the stdlib's EmailMessage took 1.7 ms to
    render one (its header registry parses each value it was just given), as much CPU as a
    whole SMTP session. Anything else (non-ASCII names or subjects, encoded-word look-alikes)
    goes the EmailMessage way above. The result passes the same wire-format check.
    """
    name = display_name(email.from_name)
    subject = clean_header_text(email.subject)
    extras = []
    for field_name, value in email.headers:
        _check_extra_name(field_name)
        extras.append((field_name, clean_header_text(value, max_length=EXTRA_VALUE_MAX)))
    if not all(_plain(t) for t in (name, subject, *(v for _, v in extras))):
        return None
    lines: list[str] = []
    lines += _fold("From", formataddr((name, from_address)) if name else from_address)
    lines += _fold("To", ", ".join(to))
    lines += _fold("Subject", subject)
    lines += _fold("Date", _date_header(date.replace(microsecond=0)))
    lines += _fold("Message-ID", f"<{message_id}>")
    in_reply_to = _foreign_ids([email.in_reply_to] if email.in_reply_to else [])
    if in_reply_to:
        lines += _fold("In-Reply-To", f"<{in_reply_to[0]}>")
    references = _foreign_ids(email.references)
    if len(references) > MAX_REFERENCES:
        references = [references[0], *references[-(MAX_REFERENCES - 1) :]]
    if references:
        lines += _fold("References", " ".join(f"<{mid}>" for mid in references))
    for field_name, value in extras:
        lines += _fold(field_name, value)
    body = _clean_body(email.body).replace("\r\n", "\n").replace("\r", "\n")
    if not body.endswith("\n"):
        body += "\n"
    raw_body = body.encode("utf-8")
    if raw_body.isascii() and max(map(len, raw_body.split(b"\n"))) <= MAX_LINE:
        cte, encoded = "7bit", raw_body
    else:
        cte, encoded = "quoted-printable", binascii.b2a_qp(raw_body, istext=True)
    # The order EmailMessage.set_content gives, so both paths write the same message.
    lines += ['Content-Type: text/plain; charset="utf-8"', f"Content-Transfer-Encoding: {cte}", "MIME-Version: 1.0"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + encoded.replace(b"\n", b"\r\n")
    _check_wire_format(data)
    return data


@functools.lru_cache(maxsize=4)
def _date_header(date: datetime) -> str:
    """The Date header of a second: acknowledgements sent in the same second share it."""
    return format_datetime(date)


def _plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and "=?" not in text


def _fold(name: str, value: str) -> list[str]:
    """RFC 5322 folding at spaces: lines of at most 78 characters where the words allow."""
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(current) + 1 + len(word) > MAX_LINE and current.strip() and current != f"{name}:":
            lines.append(current)
            current = f" {word}"
        else:
            current += f" {word}"
    lines.append(current)
    return lines


class SmtpRelaySender:
    """Delivers outgoing emails to one SMTP relay through aiosmtplib.

    Connections are reused: after a successful transaction the connection goes back to a small
    idle pool (``max_idle``), so a burst of acknowledgements costs one EHLO per connection, not
    per message (a fresh connection per message was a large share of intake's CPU under load).
    A reused connection that turns out dead (the relay restarted, or closed it for idling) is
    replaced by a fresh one once, at once; any failure closes the connection it happened on.
    ``local_hostname`` is the EHLO name; set it, or aiosmtplib asks
    ``socket.getfqdn()`` on every connection. ``starttls=True`` requires the upgrade (certificate
    verified); ``False`` never upgrades, not even when the relay offers it (aiosmtplib's own
    default would upgrade opportunistically). ``username``/``password`` log in after EHLO.

    MAIL, RCPT and DATA go in one write when the relay offers
    PIPELINING (RFC 2920; Postfix, Exim and the big providers do): two round trips for an
    acknowledgement instead of four.

    ``timeout`` bounds connecting (with the greeting and EHLO) and, separately, each whole
    transaction (MAIL to the reply after the final dot), not each reply: a relay that dribbles
    its replies cannot hold a send for four timeouts, and aiosmtplib's per-reply timer and
    ``wait_for`` (3-4 % of the outbox's CPU under load, by py-spy) are not armed.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        timeout: float = 30.0,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        local_hostname: str | None = None,
        max_idle: int = 0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.tls_context = tls_context  # for STARTTLS: trust (a private CA) beyond the system's
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self._idle: list[aiosmtplib.SMTP] = []
        self.timeout = timeout
        self.starttls = starttls
        self.local_hostname = local_hostname
        self._username = username
        self._password = password

    def __repr__(self) -> str:  # never shows the password
        return f"SmtpRelaySender(host={self.host!r}, port={self.port}, starttls={self.starttls})"

    @property
    def relay(self) -> str:
        return f"{self.host}:{self.port}"

    async def send(self, email: OutgoingEmail) -> None:
        """Deliver ``email``; return when the relay accepted it for at least one recipient.

        The envelope sender is ``email.envelope_from``; "" sends the null reverse-path
        ``MAIL FROM:<>`` (aiosmtplib quotes an empty sender as ``<>``). Raises
        TransientSendError or PermanentSendError (see the module docstring).
        """
        try:
            data = build_message(email)
            envelope_from = _address(email.envelope_from, "envelope_from") if email.envelope_from else ""
        except ValueError as exc:
            raise PermanentSendError(f"cannot send {email.message_id!r}: {exc}") from exc

        try:
            refused = await self._transaction(envelope_from, list(email.to), data)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise self._all_refused(email, exc) from exc
        except aiosmtplib.SMTPSenderRefused as exc:
            raise self._refused(email, "MAIL", exc) from exc
        except aiosmtplib.SMTPRecipientRefused as exc:
            raise self._refused(email, "RCPT", exc) from exc
        except aiosmtplib.SMTPDataError as exc:
            raise self._refused(email, "DATA", exc) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        if refused:
            log.warning(
                "relay %s refused %d of %d recipients of %s: %s",
                self.relay,
                len(refused),
                len(email.to),
                email.message_id,
                ", ".join(f"{rcpt} ({reply.code})" for rcpt, reply in refused.items()),
            )

    async def check(self) -> None:
        """Return when the relay would take mail now: connect, greet, STARTTLS and log in as a
        send would, and keep the connection for the next send. Raises ChannelUnavailableError
        (the outbox's check of a relay it found down)."""
        try:
            client = await self._connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        self._release(client)

    def _unavailable(self, exc: BaseException) -> ChannelUnavailableError:
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            # Greeting, EHLO, STARTTLS, AUTH: the relay (or our account there) is the problem.
            return ChannelUnavailableError(
                f"relay {self.relay} answered {exc.code} before the transaction: {_excerpt(exc.message)}"
            )
        # Connection refused or reset, timeouts, disconnects, TLS failures.
        return ChannelUnavailableError(f"relay {self.relay} unreachable ({type(exc).__name__}): {_excerpt(str(exc))}")

    async def _connect(self) -> aiosmtplib.SMTP:
        """A new connection, greeted (STARTTLS and AUTH as configured); closed if any step fails."""
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
            start_tls=self.starttls,
            tls_context=self.tls_context,
            username=self._username,
            password=self._password,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await _greet(client)  # so that the first transaction knows whether it may pipeline
        except BaseException:
            _drop(client)
            raise
        return client

    async def _transaction(self, sender: str, recipients: list[str], data: bytes) -> dict[str, object]:
        while self._idle:
            client = self._idle.pop()
            if not client.is_connected:
                continue
            try:
                refused = await self._sendmail(client, sender, recipients, data)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                _drop(client)  # a stale pooled connection: try the next or a fresh one
                continue
            except aiosmtplib.SMTPResponseException as exc:
                _drop(client)
                if exc.code == 421:  # the relay closing a connection it had kept idle: the same
                    continue
                raise
            except BaseException:
                _drop(client)
                raise
            self._release(client)
            return dict(refused)
        client = await self._connect()
        try:
            refused = await self._sendmail(client, sender, recipients, data)
        except BaseException:
            _drop(client)
            raise
        self._release(client)
        return dict(refused)

    async def _sendmail(
        self, client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes
    ) -> dict[str, aiosmtplib.SMTPResponse]:
        """One transaction under one deadline (the caller drops the connection if it passes).

        The addresses are plain addr-specs: send() checked them (build_message every To,
        send the envelope sender). Neither path may get any other: aiosmtplib would send what
        ``parseaddr`` finds in a malformed one ("a@b\r\nRCPT TO:<x@evil>" becomes x@evil), and
        the pipelined path writes it as it is.
        """
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                if client.supports_extension("pipelining"):
                    return await _pipelined(client, sender, recipients, data)
                refused, _ = await client.sendmail(sender, recipients, data, timeout=None)
        except TimeoutError:
            if deadline.expired():
                raise aiosmtplib.SMTPReadTimeoutError(f"the transaction took longer than {self.timeout:g} s") from None
            raise
        return refused

    def _release(self, client: aiosmtplib.SMTP) -> None:
        if len(self._idle) < self.max_idle and client.is_connected:
            self._idle.append(client)
        else:
            _drop(client)

    async def close(self) -> None:
        """QUIT the pooled connections (at shutdown)."""
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await asyncio.wait_for(client.quit(), timeout=2.0)
            except Exception:  # the relay is gone already
                _drop(client)

    def _refused(
        self, email: OutgoingEmail, stage: str, exc: aiosmtplib.SMTPResponseException
    ) -> TransientSendError | PermanentSendError:
        text = f"relay {self.relay} answered {exc.code} to {stage} for {email.message_id}: {_excerpt(exc.message)}"
        # 421 "service not available, closing transmission channel", 530 "authentication
        # required" (RFC 4954: our account, not this message): the relay's state or ours.
        if exc.code in (421, 530):
            return ChannelUnavailableError(text)
        return PermanentSendError(text) if 500 <= exc.code <= 599 else TransientSendError(text)

    def _all_refused(
        self, email: OutgoingEmail, exc: aiosmtplib.SMTPRecipientsRefused
    ) -> TransientSendError | PermanentSendError:
        codes = [refusal.code for refusal in exc.recipients]
        first = exc.recipients[0].message if exc.recipients else ""
        text = (
            f"relay {self.relay} refused every recipient of {email.message_id} "
            f"({', '.join(map(str, codes))}): {_excerpt(first)}"
        )
        # One 4xx among them and a retry may still reach someone.
        if codes and all(500 <= code <= 599 for code in codes):
            return PermanentSendError(text)
        if 421 in codes:
            return ChannelUnavailableError(text)
        return TransientSendError(text)


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO now, or HELO where EHLO is refused, as aiosmtplib's first transaction would (its
    connect leaves the greeting to it when there is no STARTTLS and no login)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


class _Replies(asyncio.Protocol):
    """Reads the replies to pipelined commands, in order, for :func:`_pipelined`.

    aiosmtplib parses one reply per command it wrote, and drops what arrives while it expects
    none, so it cannot read the several replies that answer a pipelined group. While a
    transaction runs, this protocol stands in for aiosmtplib's on the same transport.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []  # the lines of the reply being read
        self._code = 0
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > _MAX_REPLY_LINE or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed reply line: {_excerpt(repr(line))}"))
                return
            code = int(line[:3])
            if self._lines and code != self._code:
                self._fail(aiosmtplib.SMTPResponseException(-1, "reply code changed within a multi-line reply"))
                return
            self._code = code
            self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                self._replies.append(aiosmtplib.SMTPResponse(code, "\n".join(self._lines)))
                self._lines = []
                self._wake()
        if len(self._buffer) > _MAX_REPLY_LINE:
            self._fail(aiosmtplib.SMTPResponseException(-1, "reply line too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc}" if exc else "connection lost"))

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("unexpected EOF"))
        return False

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> aiosmtplib.SMTPResponse:
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._replies.popleft()


_MAX_REPLY_LINE = 2048  # RFC 5321 4.5.3.1.5: 512 octets; be lenient, not unbounded


async def _pipelined(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes
) -> dict[str, aiosmtplib.SMTPResponse]:
    """One transaction in two round trips (RFC 2920): MAIL, every RCPT and DATA in one write,
    then the message. aiosmtplib writes each command and waits for its reply: four round
    trips, four writes and four wake-ups for an acknowledgement, which made them the largest
    share of the outbox's CPU (py-spy, bench_intake at 10 sessions: the outbox's CPU per
    message 0.8-1.0 ms with aiosmtplib's transaction, 0.63 ms pipelined; one connection to
    Postfix's smtp-sink, 0.33 ms a transaction against 0.77). aiosmtplib still connects,
    says EHLO, upgrades to TLS and logs in; the caller closes the connection after any
    failure, so no RSET is needed. The addresses were checked (see ``_sendmail``).

    Raises aiosmtplib's exceptions, as ``sendmail`` does, for the caller to map.
    """
    # uvloop's transports are not registered as asyncio.Transport: no isinstance check.
    transport = cast(asyncio.Transport | None, client.transport)
    own = client.protocol
    if transport is None or transport.is_closing() or own is None:
        raise aiosmtplib.SMTPServerDisconnected("not connected")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    mail = f"MAIL FROM:<{sender}>"
    if client.supports_extension("size"):
        mail += f" SIZE={len(data)}"
    commands = [mail, *(f"RCPT TO:<{rcpt}>" for rcpt in recipients), "DATA"]
    replies = _Replies()
    transport.set_protocol(replies)
    try:
        transport.write("".join(c + "\r\n" for c in commands).encode("ascii"))
        mailed = await replies.next()
        rcpt_replies = [await replies.next() for _ in recipients]
        started = await replies.next()
        if mailed.code != 250:
            raise aiosmtplib.SMTPSenderRefused(mailed.code, mailed.message, sender)
        refused = {r: reply for r, reply in zip(recipients, rcpt_replies, strict=True) if reply.code not in (250, 251)}
        if len(refused) == len(recipients):
            if started.code == 354:  # RFC 2920 3.1: end the empty message the server expects
                transport.write(b".\r\n")
                await replies.next()
            raise aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, r) for r, reply in refused.items()]
            )
        if started.code != 354:
            raise aiosmtplib.SMTPDataError(started.code, started.message)
        transport.write(_DOT_LINE.sub(b"..", data) + b".\r\n")
        done = await replies.next()
        if done.code != 250:
            raise aiosmtplib.SMTPDataError(done.code, done.message)
        return refused
    finally:
        transport.set_protocol(own)


_DOT_LINE = re.compile(rb"(?m)^\.")


def _drop(client: aiosmtplib.SMTP) -> None:
    try:
        client.close()
    except Exception:  # already closed
        pass


def _set_text(msg: EmailMessage, name: str, text: str) -> None:
    """Set a free-text header: plain ASCII folded by the policy, anything else encoded here."""
    if text.isascii() and text.isprintable() and "=?" not in text:
        msg[name] = text
    else:
        msg[name] = _PrefoldedHeader(name, text, _encoded_words(name, text))


def _encoded_words(name: str, text: str) -> list[str]:
    """``text`` as RFC 2047 encoded words, folded to MAX_LINE, the first line with ``name: ``."""
    encoded = Header(text, "utf-8", maxlinelen=MAX_LINE, header_name=name).encode(linesep="\n")
    first, *rest = encoded.split("\n")
    return [f"{name}: {first}", *rest]


def _mailbox_header(name: str, display: str, address: str) -> _PrefoldedHeader:
    readable = f"{display} <{address}>" if display else address
    if not display:
        return _PrefoldedHeader(name, readable, [f"{name}: {address}"])
    if display.isascii() and display.isprintable() and "=?" not in display:
        line = f"{name}: {formataddr((display, address))}"  # quotes the name if it needs it
        if len(line) <= MAX_LINE:
            return _PrefoldedHeader(name, readable, [line])
    lines = _encoded_words(name, display)
    angle = f"<{address}>"
    if len(lines[-1]) + 1 + len(angle) <= MAX_LINE:
        lines[-1] += " " + angle
    else:
        lines.append(" " + angle)
    return _PrefoldedHeader(name, readable, lines)


def _list_header(name: str, items: Sequence[str], *, separator: str = "") -> _PrefoldedHeader:
    """Items joined by ``separator`` and a space, folded between items (never inside one)."""
    lines = [f"{name}:"]
    for index, item in enumerate(items):
        token = item + (separator if index < len(items) - 1 else "")
        if lines[-1] == f"{name}:" or len(lines[-1]) + 1 + len(token) <= MAX_LINE:
            lines[-1] += " " + token
        else:
            lines.append(" " + token)
    return _PrefoldedHeader(name, f"{separator} ".join(items), lines)


def _address(address: str, what: str) -> str:
    if not answerable(address):
        raise ValueError(f"{what}: not a plain ASCII addr-spec: {address[:80]!r}")
    return address


def _own_message_id(message_id: str) -> str:
    if len(message_id) > MAX_MSG_ID or "@" not in message_id or not _MSG_ID.fullmatch(message_id):
        raise ValueError(f"message_id must be id-left@id-right without angle brackets: {message_id[:80]!r}")
    return message_id


def _foreign_ids(ids: Iterable[str]) -> list[str]:
    """Valid msg-ids among ``ids`` (angle brackets tolerated), without repeats, in order."""
    kept: dict[str, None] = {}
    for raw in ids:
        mid = raw.strip()
        if mid.startswith("<") and mid.endswith(">"):
            mid = mid[1:-1]
        if len(mid) <= MAX_MSG_ID and _MSG_ID.fullmatch(mid):
            kept.setdefault(mid, None)
        else:
            log.info("dropping a malformed message id from the thread headers: %r", raw[:80])
    return list(kept)


def _check_extra_name(name: str) -> None:
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"not an RFC 5322 header field name: {name[:80]!r}")
    if name.lower() in _OWNED_HEADERS:
        raise ValueError(f"header {name!r} is written by build_message and cannot be given as extra")


def _clean_body(body: str) -> str:
    return _BODY_CONTROLS.sub("", _SURROGATE.sub("\ufffd", body))


# A header line: a field name and its colon, or a continuation (folded: starts with white space).
_HEADER_LINE = rb"(?:[\x21-\x39\x3b-\x7e]+:|[ \t\x0b\x0c])[^\r\n]*"
_HEADER = re.compile(rb"%s(?:\r\n%s)*" % (_HEADER_LINE, _HEADER_LINE))


def _check_wire_format(data: bytes) -> None:
    """The invariants the rest of the docstring promises; a failure here is a bug in this module.

    Counts and one regular expression over the whole message, not a loop over its lines: this
    runs for every acknowledgement the outbox sends, and the loop was 10 % of the outbox
    process's CPU (80 -> 30 us for a 2.3 KB acknowledgement).
    """
    if not data.isascii():
        raise ValueError("rendered message is not 7-bit clean")
    head, blank, _ = data.partition(b"\r\n\r\n")
    if not blank:
        raise ValueError("rendered message has no header/body separator")
    pairs = data.count(b"\r\n")
    if data.count(b"\r") != pairs or data.count(b"\n") != pairs:  # a CR or LF outside a CRLF
        raise ValueError("rendered message has a bare CR or LF")
    if (longest := max(map(len, data.split(b"\r\n")))) > MAX_LINE_OCTETS:
        raise ValueError(f"rendered message has a line of {longest} octets")
    if not _HEADER.fullmatch(head):
        bad = next((line for line in head.split(b"\r\n") if not re.fullmatch(_HEADER_LINE, line)), head)
        raise ValueError(f"rendered header line is neither a field nor a continuation: {bad[:40]!r}")


def _excerpt(text: str) -> str:
    return clean_header_text(text, max_length=REPLY_EXCERPT_MAX)
