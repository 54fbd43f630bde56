"""The SMTP / LMTP listener: aiosmtpd's protocol engine, our handler, our session limits.

The handler translates and delegates: an SMTP transaction becomes InboundMessages (one per
accepted recipient), the service stores them, and the receipts become reply codes. Replies:

==========================  ===============================================================
250 2.0.0                   stored (committed) - or already stored, for a redelivery
451 4.3.0                   storage failed or an unexpected error: nothing half-stored, retry
421 4.3.2 / 421 4.7.0       shutting down / too many connections: retry later
452 4.5.3                   too many recipients
550 5.1.1                   not one of our support addresses
552 5.3.4                   message bigger than ``max_message_bytes``
==========================  ===============================================================

aiosmtpd answers an exception in a hook with a permanent ``500`` that carries the exception
text; we never let one escape (the sender would give up and our internals would leak).
LMTP owes one reply per recipient after DATA, which aiosmtpd does not do for you: the handler
pushes the first n-1 replies itself and returns the last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from adapters.email.parsing import parse_email
from intake.errors import StorageUnavailableError
from intake.model import InboundMessage, Route
from intake.service import IntakeService, Receipt

log = logging.getLogger("intake.smtp")

REPLY_STORED = "250 2.0.0 Ok: stored as {reference}"
REPLY_DUPLICATE = "250 2.0.0 Ok: already stored as {reference}"
REPLY_TRY_AGAIN = "451 4.3.0 Temporary failure storing the message, please try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, please try again later"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, please try again later"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_UNKNOWN_RECIPIENT = "550 5.1.1 <{address}>: not a support address here"
REPLY_TOO_BIG = "552 5.3.4 Message too big: this server accepts at most {limit} bytes"
# Messages above this size are parsed in a worker thread so the loop keeps serving.
PARSE_IN_THREAD_BYTES = 256 * 1024


@dataclass(slots=True, kw_only=True)
class ListenerConfig:
    addresses: tuple[str, ...]
    protocol: str = "smtp"
    hostname: str = "intake.local"
    max_message_bytes: int = 26_214_400
    max_recipients: int = 50
    max_attachment_bytes: int | None = None
    max_attachments_total: int | None = None
    command_timeout: float = 300.0
    max_sessions: int = 200
    max_sessions_per_client: int = 20


@dataclass(slots=True)
class SessionTracker:
    """Active sessions, in all and per client address (aiosmtpd has no such cap)."""

    active: set[Any] = field(default_factory=set)
    per_client: Counter[str] = field(default_factory=Counter)
    busy: set[Any] = field(default_factory=set)  # sessions inside a DATA hook
    closing: bool = False


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

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.tracker.closing:
            return REPLY_SHUTTING_DOWN
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() not in self.addresses:
            return REPLY_UNKNOWN_RECIPIENT.format(address=address.replace("\r", "").replace("\n", "")[:200])
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return REPLY_TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address.lower())
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

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
        try:
            first = await self._parse(raw, recipients[0], sender)
        except Exception:  # parse_email does not raise; this is belt and braces
            log.exception("parse failed unexpectedly (%d bytes from %s)", len(raw), sender or "<>")
            return REPLY_TRY_AGAIN
        messages = [first] + [dataclasses.replace(first, recipient=r) for r in recipients[1:]]
        outcomes = await asyncio.gather(*(self._store(m) for m in messages), return_exceptions=True)
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
                fmt = REPLY_DUPLICATE if receipt.route is Route.DUPLICATE else REPLY_STORED
                reply = fmt.format(reference=receipt.reference)
            replies.append(reply)
            self._log(msg, reply, receipt, time.perf_counter() - started)
        if self.config.protocol == "lmtp":
            # One reply per accepted recipient, in RCPT order: push all but the last ourselves.
            for reply in replies[:-1]:
                await server.push(reply)
            return replies[-1]
        # SMTP: one reply for the whole transaction. 250 only if every copy is committed;
        # otherwise 451 and the retry finds the committed copies as duplicates.
        failed = [r for r in replies if not r.startswith("250")]
        return failed[0] if failed else replies[0]

    async def _parse(self, raw: bytes, recipient: str, sender: str) -> InboundMessage:
        kwargs: dict[str, Any] = {
            "recipient": recipient,
            "envelope_sender": sender,
            "max_attachment_bytes": self.config.max_attachment_bytes,
            "max_attachments_total": self.config.max_attachments_total,
        }
        if len(raw) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(parse_email, raw, **kwargs)
        return parse_email(raw, **kwargs)

    async def _store(self, message: InboundMessage) -> Receipt:
        return await self.service.receive(message)

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
                "severity": int(receipt.severity) if receipt else None,
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
    """Mixed into aiosmtpd's SMTP/LMTP: session caps, clear 552 text, 421 on shutdown."""

    tracker: SessionTracker
    config: ListenerConfig
    _refused: bool = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        t = self.tracker
        if (
            t.closing
            or len(t.active) >= self.config.max_sessions
            or (t.per_client[client] >= self.config.max_sessions_per_client)
        ):
            self._refused = True
            reply = REPLY_SHUTTING_DOWN if t.closing else REPLY_TOO_MANY_CONNECTIONS
            log.warning("refused connection from %s: %s", client, reply)
            transport.write(reply.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self._client = client
        t.active.add(self)
        t.per_client[client] += 1
        super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        t = self.tracker
        if self in t.active:
            t.active.discard(self)
            t.per_client[self._client] -= 1
            if t.per_client[self._client] <= 0:
                del t.per_client[self._client]
        super().connection_lost(error)  # type: ignore[misc]

    async def push(self, status: Any) -> None:
        # aiosmtpd's own texts for an over-size message (at SIZE= in MAIL, or during DATA).
        if isinstance(status, str) and status.startswith("552 Error"):
            status = REPLY_TOO_BIG.format(limit=self.config.max_message_bytes)
        await super().push(status)  # type: ignore[misc]

    async def close_for_shutdown(self) -> None:
        try:
            await super().push(REPLY_SHUTTING_DOWN)  # type: ignore[misc]
        except Exception:  # the peer is gone already
            pass
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()


class IntakeSMTP(_Limited, SMTP):
    pass


class IntakeLMTP(_Limited, LMTP):
    pass


class EmailListener:
    """Owns the listening socket; start() and stop() on the caller's loop."""

    def __init__(self, handler: IntakeHandler, config: ListenerConfig, *, host: str, port: int) -> None:
        self.handler = handler
        self.config = config
        self.host = host
        self.port = port
        self.tracker = handler.tracker
        self._server: asyncio.AbstractServer | None = None

    def _factory(self) -> SMTP:
        cls = IntakeLMTP if self.config.protocol == "lmtp" else IntakeSMTP
        proto = cls(
            self.handler,
            hostname=self.config.hostname,
            ident="intake",
            data_size_limit=self.config.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.config.command_timeout,
            command_call_limit={"NOOP": 20, "RSET": 20, "*": 200},
            loop=asyncio.get_running_loop(),
        )
        proto.tracker = self.tracker
        proto.config = self.config
        return proto

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; let messages in DATA finish (up to ``grace`` s); 421 to the rest."""
        self.tracker.closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while self.tracker.busy and time.monotonic() < deadline:  # noqa: ASYNC110 - a set, not an event
            await asyncio.sleep(0.05)
        for proto in list(self.tracker.active):
            await proto.close_for_shutdown()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
            except TimeoutError:
                pass
            self._server = None
