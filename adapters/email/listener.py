"""The SMTP / LMTP listener: aiosmtpd's protocol engine, our handler, our session limits.

The handler translates and delegates: an SMTP transaction becomes InboundMessages (one per
accepted recipient), the service stores them, and the receipts become reply codes. Replies:

==========================  ===============================================================
250 2.0.0                   stored (committed) - or already stored, for a redelivery (the
                            reference named only to a sender entitled to its ticket)
451 4.3.0                   storage failed or an unexpected error: nothing half-stored, retry
421 4.3.2 / 421 4.7.0       shutting down / too many connections: retry later
421 4.4.2                   a time limit passed (silence, DATA phase, whole session); closed
452 4.5.3                   too many recipients
501 5.1.7                   reverse-path not valid UTF-8 or with control characters
550 5.1.1                   not one of our support addresses (``support+any@`` is ``support@``)
552 5.3.4                   message bigger than ``max_message_bytes`` (at SIZE= or after DATA)
==========================  ===============================================================

Every refusal of a command or message (a 4xx or 5xx reply, ours or aiosmtpd's) is logged at
INFO with the client's address and the reply as sent, the first 20 of a session one by one; a
message's own outcome (250, or 451) has its "message received" line instead, a 421 that closes
a session its "closing session" or "refused connection" line (at shutdown, the one "shutting
down" line).

aiosmtpd answers an exception in a hook with a permanent ``500`` that carries the exception
text; we never let one escape (the sender would give up and our internals would leak).
LMTP owes one reply per recipient after DATA, which aiosmtpd does not do for you: the handler
pushes the first n-1 replies itself and returns the last.

Every reply but the greeting and the answer to HELO/EHLO/LHLO carries an enhanced status
code (RFC 2034, offered as ENHANCEDSTATUSCODES): aiosmtpd's own replies get one by their
reply code (``statuscodes.py``; ``503 5.5.1 Error: need MAIL command``).

Limits that aiosmtpd enforces itself, with its own texts: a command line over 512 bytes
without its CRLF (``500 5.5.2 Command line too long``; the session goes on), a DATA line over 1001
bytes with its CRLF (``500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)`` after the final dot: the
whole message is refused, and so is one written with bare LF, which is one long line to
aiosmtpd), a command repeated past ``command_call_limit`` (``421 4.7.0 NOOP sent too many
times``, closed; the budget starts again after each message taken in), five unknown
commands (``502 5.5.1``, closed) and only ``<CRLF>.<CRLF>`` ending DATA (1.4.5+: no SMTP
smuggling with a bare LF or CR; the would-be second message stays inside the first one's
body). The DATA limits and the end of DATA keep aiosmtpd's rules and texts, but the message
is read in chunks, not line by line (``adapters/email/smtpdata.py``; figures in its docstring).

Time limits. aiosmtpd re-arms ``command_timeout`` after each complete command and not during
DATA, and closes without a word when it runs out; so a client could keep a session for
``command_timeout`` per command times the command budget (days), and a large message on a
slow link was cut off ``command_timeout`` after the DATA command. Here ``command_timeout`` is
silence: within DATA every chunk received re-arms it. ``data_timeout`` bounds one DATA phase
(from the DATA command to the final dot) and ``session_timeout`` the whole connection; each
ends the session with ``421 4.4.2``. Time our own handler spends storing is never counted
against the client: the silence and DATA limits wait for it, and a session limit that passes
meanwhile closes the session after the reply.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import re
import socket
import time
import types
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session, _AuthMechAttr, syntax

from adapters.email.parsing import parse_email
from adapters.email.smtpdata import ChunkedData
from adapters.email.smtploop import LeanLoop
from adapters.email.statuscodes import enhance
from adapters.email.workers import ParsePool
from intake.errors import StorageUnavailableError
from intake.model import InboundMessage, Route
from intake.service import Assessment, IntakeService, Receipt

log = logging.getLogger("intake.smtp")

REPLY_STORED = "250 2.0.0 Ok: stored as {reference}"
REPLY_DUPLICATE = "250 2.0.0 Ok: already stored as {reference}"
REPLY_DUPLICATE_UNNAMED = "250 2.0.0 Ok: already stored"  # to a sender not entitled to the ticket
REPLY_TRY_AGAIN = "451 4.3.0 Temporary failure storing the message, please try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, please try again later"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, please try again later"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_UNKNOWN_RECIPIENT = "550 5.1.1 <{address}>: not a support address here"
REPLY_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
_REFUSALS = ("4", "5")  # the first digit of a reply that refuses (RFC 5321 4.2.1)
REFUSALS_LOGGED = 20  # a session's refusals logged one by one; a client looping on bad commands gets no more
REPLY_TOO_BIG = "552 5.3.4 Message too big: this server accepts at most {limit} bytes"
REPLY_IDLE_TIMEOUT = "421 4.4.2 Timeout: nothing received for {seconds:g} s, closing connection"
REPLY_DATA_TIMEOUT = "421 4.4.2 Timeout: the message took longer than {seconds:g} s to send, closing connection"
REPLY_SESSION_TIMEOUT = "421 4.4.2 Session time limit of {seconds:g} s reached, closing connection"
# The path of MAIL FROM / RCPT TO as nearly every client writes it: <dot-atom@host.name>, then
# optional parameters. aiosmtpd reads every path with the email package's RFC 5322 parser (and
# defines a typing.Protocol class on each call): 15 % of the listener's CPU under load. This
# pattern gives the same (address, rest) for what it matches (tests/adapters/
# test_listener_limits.py compares it with aiosmtpd's on generated paths); anything else goes
# to aiosmtpd's parser. After the path, the email package skips whitespace as str.lstrip() does
# (a CR, a no-break space) and reads a "(" as a comment to its end: so does the pattern, or it
# leaves the path to aiosmtpd.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SIMPLE_PATH = re.compile(
    rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>(?:[ \t]\s*+(?!\()(.*))?\Z", re.DOTALL
)
# aiosmtpd decodes command arguments as UTF-8 with surrogateescape: bytes that are not UTF-8
# arrive as lone surrogates, which no database stores (nor NUL, in PostgreSQL).
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# Messages above this size are parsed in a worker thread so the loop keeps serving.
PARSE_IN_THREAD_BYTES = 256 * 1024


@dataclass(slots=True, kw_only=True)
class ListenerConfig:
    addresses: tuple[str, ...]
    protocol: str = "smtp"
    hostname: str = "intake.local"
    max_message_bytes: int = 26_214_400
    max_recipients: int = 50
    # Characters that start an address extension (support+billing@ is support@), as Postfix's
    # and Dovecot's recipient_delimiter; "" for none.
    recipient_delimiter: str = "+"
    max_attachment_bytes: int | None = None
    max_attachments_total: int | None = None
    command_timeout: float = 300.0  # silence: no complete command (outside DATA), no bytes (in DATA)
    data_timeout: float = 600.0  # one DATA phase, from the DATA command to the final dot
    session_timeout: float = 1800.0  # the whole connection, however busy
    max_sessions: int = 200
    max_sessions_per_client: int = 20
    # Per session and command name; "*" for each other command. Past it: 421 and closed.
    command_call_limit: dict[str, int] = field(default_factory=lambda: {"NOOP": 20, "RSET": 20, "*": 200})


class SharedSessionCounts:
    """Open sessions of every email listener process, in shared memory, for the session caps.

    ``max_sessions`` and ``max_sessions_per_client`` are caps on the service: with
    ``email.listener_processes`` above 1 each process counting only its own sessions let
    a client hold that many per process (40 instead of 20 with the default two). Each
    process has a row of its own, the only one it writes (so no lock): its open sessions,
    then its sessions per client address, hashed into buckets; a process reads the others'
    rows. Two processes admitting at the same instant may each pass a cap by one, and two
    addresses in one bucket share the per-client count of the other processes' sessions
    (a process's own count per address is exact). A restarted process clears its row:
    the sessions of the one it replaces are gone.
    """

    BUCKETS = 4096

    def __init__(self, processes: int, ctx: Any) -> None:
        self._width = 1 + self.BUCKETS
        self._rows = processes
        self._counts: Any = ctx.RawArray("i", processes * self._width)  # zeroed; passed to children
        self._row = 0
        # The bucket of an address is a keyed hash: with a known one (CRC-32) anyone could pick
        # addresses (an IPv6 /64 has plenty) that share a victim's bucket and fill its count.
        self._key = os.urandom(16)

    def claim(self, row: int) -> None:
        """This process writes row ``row`` (0: the first listener; k: listener k + 1)."""
        self._row = row
        self.clear(row)

    def clear(self, row: int) -> None:
        """Forget the sessions of row ``row``: its process is gone (the parent, on seeing a
        listener die, so that its sessions hold no capacity while it restarts, or if it cannot)."""
        base = row * self._width
        self._counts[base : base + self._width] = [0] * self._width

    def _bucket(self, client: str) -> int:
        digest = hashlib.blake2b(client.encode("utf-8", "replace"), digest_size=4, key=self._key).digest()
        return 1 + int.from_bytes(digest, "little") % self.BUCKETS

    def total(self) -> int:
        return sum(self._counts[r * self._width] for r in range(self._rows))

    def elsewhere(self, client: str) -> int:
        """Sessions of ``client`` (of its bucket) in the other processes."""
        b = self._bucket(client)
        return sum(self._counts[r * self._width + b] for r in range(self._rows) if r != self._row)

    def moved(self, client: str, delta: int) -> None:
        base = self._row * self._width
        self._counts[base] += delta
        self._counts[base + self._bucket(client)] += delta


@dataclass(slots=True)
class SessionTracker:
    """Active sessions, in all and per client address (aiosmtpd has no such cap); with
    ``shared``, the caps count every listener process's sessions (SharedSessionCounts)."""

    active: set[Any] = field(default_factory=set)
    per_client: Counter[str] = field(default_factory=Counter)
    busy: set[Any] = field(default_factory=set)  # sessions inside a DATA hook
    closing: bool = False
    shared: SharedSessionCounts | None = None

    def over_caps(self, client: str, config: ListenerConfig) -> bool:
        if self.shared is None:
            total, of_client = len(self.active), self.per_client[client]
        else:
            total, of_client = self.shared.total(), self.per_client[client] + self.shared.elsewhere(client)
        return total >= config.max_sessions or of_client >= config.max_sessions_per_client

    def opened(self, session: Any, client: str) -> None:
        self.active.add(session)
        self.per_client[client] += 1
        if self.shared is not None:
            self.shared.moved(client, 1)

    def closed(self, session: Any, client: str) -> None:
        self.active.discard(session)
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
        if self.shared is not None:
            self.shared.moved(client, -1)


class IntakeHandler:
    def __init__(
        self,
        service: IntakeService,
        config: ListenerConfig,
        tracker: SessionTracker,
        *,
        on_message: Callable[[InboundMessage, str, Receipt | None], None] | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self.tracker = tracker
        self.addresses = frozenset(a.lower() for a in config.addresses)
        self.on_message = on_message
        self.pool: ParsePool | None = None  # parsing worker processes, when serve runs them

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.tracker.closing:
            return REPLY_SHUTTING_DOWN
        if _UNSTORABLE.search(address):
            # The reverse-path may become the requester (no usable From): refuse it now, as
            # Postfix refuses malformed UTF-8, rather than answer 451 after DATA for ever.
            return REPLY_BAD_SENDER
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """EHLO (and LMTP's LHLO) offers PIPELINING (RFC 2920): senders may send MAIL, RCPT and
        DATA without waiting for each reply; and ENHANCEDSTATUSCODES (RFC 2034): every reply
        says its reason as a code too (statuscodes.py). RFC 2033 requires both of an LMTP server."""
        session.host_name = hostname  # aiosmtpd leaves this to a handler that has this hook
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        recipient = self._support_address(address.lower())
        if recipient is None:
            # Echoed back: no control characters, and no lone surrogates (push() would raise).
            return REPLY_UNKNOWN_RECIPIENT.format(address=_UNSTORABLE.sub("?", address)[:200])
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return REPLY_TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(recipient)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def _support_address(self, address: str) -> str | None:
        """The support address ``address`` (lower-cased) is, its extension dropped, or None.

        Postfix finds ``support+billing@`` under ``support@`` in its tables (recipient_delimiter,
        "+" on Debian) and hands it over as it is: refused here, it bounced after Postfix had
        accepted it, to a sender who may be forged. It is the same mailbox."""
        if address in self.addresses:
            return address
        local, at, domain = address.rpartition("@")
        cut = min((i for i in map(local.find, self.config.recipient_delimiter) if i > 0), default=-1)
        base = f"{local[:cut]}@{domain}" if at and cut > 0 else None
        return base if base in self.addresses else None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.tracker.busy.add(server)
        try:
            return await self._data(server, session, envelope)
        finally:
            self.tracker.busy.discard(server)

    async def _data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # only with decode_data=True, which we never set
            raw = raw.encode("utf-8", "surrogateescape")
        mail_from = envelope.mail_from or ""
        sender = "" if mail_from in ("<>", "") else mail_from.lower()
        recipients = list(envelope.rcpt_tos)
        started = time.perf_counter()
        assessment: Assessment | None = None
        try:
            first, assessment = await self._parse(raw, recipients[0], sender)
        except Exception:  # parse_email does not raise; this is belt and braces
            log.exception("parse failed unexpectedly (%d bytes from %s)", len(raw), sender or "<>")
            return await self._answer(server, [REPLY_TRY_AGAIN] * len(recipients))
        messages = [first] + [dataclasses.replace(first, recipient=r) for r in recipients[1:]]
        outcomes: list[Receipt | BaseException]
        try:
            if len(messages) == 1:
                # Awaited in this task: gather would wrap the store in a task of its own, and the
                # reply would wait two more turns of the loop after the commit.
                try:
                    outcomes = [await self._store(first, assessment)]
                except Exception as exc:
                    outcomes = [exc]
            else:
                outcomes = await asyncio.gather(*(self._store(m, assessment) for m in messages), return_exceptions=True)
        except asyncio.CancelledError:
            # The session was cancelled while storing: the client closed the connection after
            # the final dot, before our reply (or shutdown's grace ran out). The store commits a
            # unit already queued all the same (storage/store.py, _resolve), so without this line
            # a stored message had no log line at all. A retry is answered as a duplicate.
            for msg in messages:
                log.info(
                    "connection lost before the reply: the message may be stored all the same",
                    extra={"sender": msg.sender, "recipient": msg.recipient, "message_id": msg.message_id},
                )
            raise
        replies: list[str] = []
        for msg, outcome in zip(messages, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, StorageUnavailableError | asyncio.CancelledError):
                    log.error(
                        "unexpected error storing message %s: %s",
                        msg.message_id or "(no Message-ID)",
                        outcome,
                        exc_info=outcome,
                    )
                reply = REPLY_TRY_AGAIN
                receipt = None
            else:
                receipt = outcome
                if receipt.route is not Route.DUPLICATE:
                    reply = REPLY_STORED.format(reference=receipt.reference)
                elif receipt.disclosed:
                    reply = REPLY_DUPLICATE.format(reference=receipt.reference)
                else:
                    reply = REPLY_DUPLICATE_UNNAMED
            replies.append(reply)
            self._log(msg, reply, receipt, time.perf_counter() - started)
        return await self._answer(server, replies)

    async def _answer(self, server: SMTP, replies: list[str]) -> str:
        """The reply to DATA from one reply per accepted recipient, in RCPT order."""
        if self.config.protocol == "lmtp":
            # One reply per accepted recipient, in RCPT order: push all but the last ourselves.
            for reply in replies[:-1]:
                await server.push(reply)
            return replies[-1]
        # SMTP: one reply for the whole transaction. 250 only if every copy is committed;
        # otherwise 451 and the retry finds the committed copies as duplicates.
        failed = [r for r in replies if not r.startswith("250")]
        return failed[0] if failed else replies[0]

    async def _parse(self, raw: bytes, recipient: str, sender: str) -> tuple[InboundMessage, Assessment | None]:
        kwargs: dict[str, Any] = {
            "recipient": recipient,
            "envelope_sender": sender,
            "max_attachment_bytes": self.config.max_attachment_bytes,
            "max_attachments_total": self.config.max_attachments_total,
        }
        if self.pool is not None:
            done = await self.pool.parse(raw, **kwargs)
            if done is not None:
                return done
        if len(raw) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(parse_email, raw, **kwargs), None
        return parse_email(raw, **kwargs), None

    async def _store(self, message: InboundMessage, assessment: Assessment | None = None) -> Receipt:
        return await self.service.receive(message, assessment)

    def _log(self, msg: InboundMessage, reply: str, receipt: Receipt | None, elapsed: float) -> None:
        log.info(
            "message received",
            extra={
                "channel": "email",
                "reference": receipt.reference if receipt else None,
                "sender": msg.sender,
                "recipient": msg.recipient,
                "message_id": msg.message_id,
                "outcome": receipt.route.value if receipt else "failed",
                "acknowledgement": receipt.ack_note if receipt else None,
                "severity": receipt.known_severity if receipt else None,
                "reply": reply,
                "ms": round(elapsed * 1000, 1),
            },
        )
        if self.on_message is not None:
            self.on_message(msg, reply, receipt)

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", error, exc_info=error)
        return REPLY_TRY_AGAIN


class _Limited:
    """Mixed into aiosmtpd's SMTP/LMTP: session caps, time limits, clear 552 text, 421 on shutdown."""

    tracker: SessionTracker
    config: ListenerConfig
    _refused: bool = False
    _in_data: bool = False  # between the DATA command and its reply
    _expired: str | None = None  # a time limit passed while our handler was busy: close after the reply
    _data_timer: asyncio.TimerHandle | None = None
    _session_timer: asyncio.TimerHandle | None = None
    _continued: list[str]  # lines of a multi-line reply waiting for its last line (see push)
    _greeted: bool = False  # the greeting has gone (it carries no enhanced status code)
    _hello: bool = False  # answering HELO, EHLO or LHLO (those replies carry none either)
    _refusals: int = 0  # 4xx/5xx replies of this session so far (see _log_refusal)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parser, with a fast path for plain <local@domain> (see _SIMPLE_PATH)."""
        found = _SIMPLE_PATH.match(arg)
        if found is None:
            try:
                return super()._getaddr(arg)  # type: ignore[misc, no-any-return]
            except Exception:  # the email package's parser fails on "<", ".@[" and the like:
                return None, None  # a malformed path (553), not an internal error (451)
        address = found.group(1)
        limit = self.local_part_limit  # type: ignore[attr-defined]
        if limit and len(address.rpartition("@")[0]) > limit:
            return None, None
        return address, found.group(2) or ""

    def _getparams(self, params: list[str]) -> dict[str, str | bool] | None:
        """aiosmtpd's MAIL/RCPT parameter reader, with SIZE= held to ASCII digits (RFC 1870).

        aiosmtpd checks SIZE with ``str.isdigit()``, which is true of "²" and "①" too; its
        ``int()`` then raised (a traceback and 451, a temporary failure the client retries
        for ever) or read other scripts' digits as a number. None: the 501 syntax reply."""
        result = super()._getparams(params)  # type: ignore[misc]
        size = result.get("SIZE") if result else None
        if isinstance(size, str) and not (size.isascii() and size.isdigit()):
            return None
        return result  # type: ignore[no-any-return]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        t = self.tracker
        if t.closing or t.over_caps(client, self.config):
            self._refused = True
            reply = REPLY_SHUTTING_DOWN if t.closing else REPLY_TOO_MANY_CONNECTIONS
            log.warning("refused connection from %s: %s", client, reply)
            transport.write(reply.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self._client = client
        t.opened(self, client)
        self._continued = []
        self._greeted = False
        super().connection_made(transport)  # type: ignore[misc]
        self._session_timer = asyncio.get_running_loop().call_later(self.config.session_timeout, self._session_limit)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        for timer in (self._session_timer, self._data_timer):
            if timer is not None:
                timer.cancel()
        t = self.tracker
        if self in t.active:
            t.closed(self, self._client)
        super().connection_lost(error)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        # aiosmtpd re-arms its timer per command only; inside DATA any bytes show the client is
        # alive (a large message on a slow link), and data_timeout bounds the phase as a whole.
        if self._in_data:
            self._reset_timeout()  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]

    def _timeout_cb(self) -> None:
        """aiosmtpd's silence timer ran out (it closes without a word; we say why)."""
        if self in self.tracker.busy:
            self._reset_timeout()  # type: ignore[attr-defined]  # our handler is the slow one
            return
        self._close_with(REPLY_IDLE_TIMEOUT.format(seconds=self.config.command_timeout))

    def _session_limit(self) -> None:
        reply = REPLY_SESSION_TIMEOUT.format(seconds=self.config.session_timeout)
        if self in self.tracker.busy:
            self._expired = reply  # the message is in: answer it, then close (smtp_DATA)
            return
        self._close_with(reply)

    def _data_limit(self) -> None:
        if self in self.tracker.busy:
            return  # the final dot has arrived: the time since is ours, not the client's
        self._close_with(REPLY_DATA_TIMEOUT.format(seconds=self.config.data_timeout))

    def _close_with(self, reply: str) -> None:
        transport = getattr(self, "transport", None)
        if transport is None or transport.is_closing():
            return
        log.info("closing session of %s: %s", getattr(self, "_client", "?"), reply)
        self.flush_held()  # type: ignore[attr-defined]  # replies held for a pipelined group come first
        transport.write(reply.encode("ascii") + b"\r\n")
        transport.close()  # flushes the reply first; connection_lost cancels the session task

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        timer = self._data_timer = asyncio.get_running_loop().call_later(self.config.data_timeout, self._data_limit)
        envelope = self.envelope  # type: ignore[attr-defined]
        try:
            await super().smtp_DATA(arg)  # type: ignore[misc]
        finally:
            self._in_data = False
            timer.cancel()
            self._data_timer = None
        if self.envelope is not envelope:  # type: ignore[attr-defined]
            # A whole message read and answered (aiosmtpd starts a new envelope then): the
            # session's command budget starts again (smtploop.py), so an MTA that keeps its
            # connection for message after message is never cut off.
            self.renew_command_budget()  # type: ignore[attr-defined]
        if self._expired is not None:
            self._close_with(self._expired)

    async def _answer_hello(self, command: Callable[[str], Awaitable[None]], arg: str) -> None:
        """HELO, EHLO or LHLO: their replies carry no enhanced status code (see push)."""
        self._hello = True
        try:
            await command(arg)
        finally:
            self._hello = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, arg: str) -> None:
        await self._answer_hello(super().smtp_HELO, arg)  # type: ignore[misc]

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, arg: str) -> None:
        await self._answer_hello(super().smtp_EHLO, arg)  # type: ignore[misc]

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if not status.isprintable():
                # aiosmtpd echoes what the client sent in some replies ('502 Could not VRFY
                # <arg>', '500 Error: command "<name>" not recognized'): a lone surrogate (bytes
                # that are not UTF-8) made the reply itself raise, answered with a traceback and
                # a 451; NUL, CR and other control characters went back raw in the reply line.
                status = _UNSTORABLE.sub("?", status)
            # aiosmtpd's own texts for an over-size message (at SIZE= in MAIL, or during DATA).
            if status.startswith("552 Error"):
                status = REPLY_TOO_BIG.format(limit=self.config.max_message_bytes)
            # RFC 2034: every reply but the greeting and the answer to HELO/EHLO/LHLO carries
            # an enhanced status code; aiosmtpd's own replies have none (statuscodes.py).
            if self._greeted:
                if not self._hello:
                    status = enhance(status)
            elif status.startswith("220"):
                self._greeted = True
            # The lines of a multi-line reply (EHLO's "250-..." lines) go out with its last
            # line in one write: aiosmtpd writes each line on its own, one system call each.
            if len(status) > 3 and status[3] == "-":
                self._continued.append(status)
                return
            if self._continued:
                status = "\r\n".join([*self._continued, status])
                self._continued.clear()
            if status[:1] in _REFUSALS and status != REPLY_TRY_AGAIN:  # (the message's log line says 451)
                self._log_refusal(status)
        await super().push(status)  # type: ignore[misc]

    def _log_refusal(self, status: str) -> None:
        """Ours (550 unknown recipient, 452, 501, 552) and aiosmtpd's own (500 line too long,
        502, 503, 553...) refusals are logged as an MTA logs its rejects: the first
        REFUSALS_LOGGED of a session, then one line saying the rest are not."""
        self._refusals += 1
        if self._refusals <= REFUSALS_LOGGED:
            log.info("refused %s: %s", getattr(self, "_client", "?"), _UNSTORABLE.sub("?", status))
        elif self._refusals == REFUSALS_LOGGED + 1:
            log.info("refused %s: further refusals in this session are not logged", getattr(self, "_client", "?"))

    async def close_for_shutdown(self) -> None:
        try:
            await super().push(REPLY_SHUTTING_DOWN)  # type: ignore[misc]
        except Exception:  # the peer is gone already
            pass
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()


class IntakeSMTP(_Limited, LeanLoop, ChunkedData, SMTP):
    pass


class IntakeLMTP(_Limited, LeanLoop, ChunkedData, LMTP):
    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        await self._answer_hello(super().smtp_LHLO, arg)


class EmailListener:
    """Owns the listening socket(s); start() and stop() on the caller's loop.

    With ``socks`` it serves listening sockets made by another process instead of binding
    its own (``email.listener_processes``: every listener accepts from the same sockets).
    """

    def __init__(
        self,
        handler: IntakeHandler,
        config: ListenerConfig,
        *,
        host: str,
        port: int,
        socks: list[socket.socket] | None = None,
    ) -> None:
        self.handler = handler
        self.config = config
        self.host = host
        self.port = port
        self.socks = socks
        self.tracker = handler.tracker
        self._servers: list[asyncio.AbstractServer] = []
        self._template: SMTP | None = None

    def _factory(self) -> SMTP:
        """A protocol instance for one connection: a copy of a template built once.

        aiosmtpd's SMTP.__init__ introspects the class and the handler on every connection
        (inspect.getmembers, dir, inspect.signature): ~0.3 ms of the ~1.3 ms of CPU a whole
        session costs a bare aiosmtpd server here. The template is built by that __init__;
        each connection gets its settings, fresh stream state (StreamReaderProtocol.__init__)
        and its own bound methods. tests/adapters/test_listener_limits.py checks that a copy
        holds exactly what a normally built instance holds, so that an aiosmtpd upgrade that
        adds per-connection state fails a test instead of sharing it.
        """
        if self._template is None:
            self._template = self._build()
        return _copy_protocol(self._template)

    def _build(self) -> SMTP:
        cls = IntakeLMTP if self.config.protocol == "lmtp" else IntakeSMTP
        proto = cls(
            self.handler,
            hostname=self.config.hostname,
            ident="intake",
            data_size_limit=self.config.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.config.command_timeout,
            command_call_limit=dict(self.config.command_call_limit),
            loop=asyncio.get_running_loop(),
        )
        proto.tracker = self.tracker
        proto.config = self.config
        proto.command_size_limits = _command_size_limits(proto)
        return proto

    async def start(self) -> None:
        self._template = None  # built on the loop that serves
        loop = asyncio.get_running_loop()
        if self.socks is None:
            self._servers = [await loop.create_server(self._factory, self.host, self.port, reuse_address=True)]
        else:
            for sock in self.socks:
                self._servers.append(await loop.create_server(self._factory, sock=sock))
        self.port = int(self._servers[0].sockets[0].getsockname()[1])

    def shareable_sockets(self) -> list[socket.socket]:
        """Duplicates of the listening sockets, for listener processes to accept from."""
        return [socket.socket(fileno=os.dup(s.fileno())) for server in self._servers for s in server.sockets]

    async def stop(self, grace: float = 10.0) -> None:
        """Let messages in DATA finish (up to ``grace`` s): those being stored, and those still
        arriving after the 354; 421 to the rest (a new MAIL meanwhile gets it too), and to new
        connections while the messages finish; then stop listening."""
        self.tracker.closing = True  # from now on a new connection is answered 421 (connection_made)
        deadline = time.monotonic() + grace
        while self._finishing() and time.monotonic() < deadline:  # noqa: ASYNC110 - polled state, not an event
            await asyncio.sleep(0.05)
        # Closed only now: a connection waiting to be accepted when the socket closes is reset
        # by the kernel, where one accepted while the messages finished got a 421 to retry on.
        for server in self._servers:
            server.close()
        for proto in list(self.tracker.active):
            await proto.close_for_shutdown()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)
            except TimeoutError:
                pass
        self._servers = []

    def _finishing(self) -> bool:
        """A message is being stored, or its bytes are still arriving after DATA."""
        t = self.tracker
        return bool(t.busy) or any(getattr(proto, "_in_data", False) for proto in t.active)


def _copy_protocol(template: SMTP) -> SMTP:
    """A new instance with ``template``'s settings, fresh stream state, methods bound to it."""
    proto: Any = object.__new__(type(template))
    proto.__dict__.update(template.__dict__)
    loop = template.loop
    asyncio.StreamReaderProtocol.__init__(
        proto,
        asyncio.StreamReader(loop=loop, limit=proto.line_length_limit),
        client_connected_cb=proto._cb_client_connected,
        loop=loop,
    )
    # aiosmtpd keeps these limits in one dict on its class, cleared by every __init__ and raised
    # by every EHLO (+36 for MAIL): with one template and no __init__ per connection, MAIL's
    # limit grew with every session served. Each connection has its own, as if just built.
    proto.command_size_limits = _command_size_limits(template)
    proto._smtp_methods = {
        name: types.MethodType(method.__func__, proto) for name, method in template._smtp_methods.items()
    }
    proto._auth_methods = {
        name: _AuthMechAttr(types.MethodType(m.method.__func__, proto), True) if m.is_builtin else m
        for name, m in template._auth_methods.items()
    }
    return proto  # type: ignore[no-any-return]


def _command_size_limits(proto: SMTP) -> collections.defaultdict[str, int]:
    """A fresh per-command line limit table, as aiosmtpd's __init__ leaves its shared one."""
    return collections.defaultdict(type(proto).command_size_limits.default_factory)  # type: ignore[attr-defined]
