"""An intake instance on loopback for end-to-end tests: real listener, real store, real relay.

``running_intake`` builds intake from real settings (SQLite in a temporary directory unless a
URL is given), starts the SMTP/LMTP listener on a free port and the outbox dispatcher on the
test's own loop, and points outgoing mail at the relay stand-in. ``Harness.send`` delivers
bytes with aiosmtplib, as an MTA would, and returns the final reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib

from adapters import bootstrap
from adapters.settings import Settings
from intake.reference import References
from storage.repository import SqlUnitOfWork
from tests.conftest import free_port


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str


@dataclass
class Harness:
    app: bootstrap.App
    port: int
    dispatcher_task: asyncio.Task[None]

    @property
    def settings(self) -> Settings:
        return self.app.settings

    async def send(
        self,
        raw: bytes | EmailMessage,
        *,
        mail_from: str = "alice@acme.com",
        rcpt: tuple[str, ...] = ("support@example.com",),
    ) -> Reply:
        data = raw.as_bytes() if isinstance(raw, EmailMessage) else raw
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=30)
        await client.connect()
        try:
            _, text = await client.sendmail(mail_from, list(rcpt), data)
            return Reply(250, text)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            return Reply(first.code, first.message)
        except aiosmtplib.SMTPResponseException as exc:
            return Reply(exc.code, exc.message)
        finally:
            with contextlib.suppress(Exception):
                await client.quit()

    def read(self, fn: Any) -> Any:
        return self.app.store.run_sync(fn)

    def tickets(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.read(lambda uow: uow.list_tickets())
        return rows

    def detail(self, reference: str) -> dict[str, Any]:
        d: dict[str, Any] | None = self.read(lambda uow: uow.ticket_detail(reference))
        assert d is not None, f"no ticket {reference}"
        return d

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = self.read(lambda uow: SqlUnitOfWork.stats(uow))
        return s

    async def outbox_settled(self, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until nothing in the outbox is pending; returns the stats."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            s = self.stats()
            if s["outbox"]["pending"] == 0:
                return s
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"outbox still pending after {timeout}s: {s}")
            self.app.dispatcher.wake()
            await asyncio.sleep(0.05)


def settings_for(tmp: Path, *, relay_port: int, db_url: str | None = None, extra: str = "") -> Settings:
    text = f"""
[storage]
url = "{db_url or f"sqlite:///{tmp}/intake.db"}"
[email]
listen_host = "127.0.0.1"
listen_port = {free_port()}
support_address = "support@example.com"
extra_addresses = ["billing@example.com"]
hostname = "intake.test"
shutdown_grace = 2.0
[outbound]
relay_host = "127.0.0.1"
relay_port = {relay_port}
from_address = "support@example.com"
retry_base_seconds = 0.2
retry_cap_seconds = 0.5
timeout = 5
[irt]
lead_email = "irt-lead@example.com"
[organisations.acme]
domains = ["acme.com"]
"""
    data = tomllib.loads(text)
    if extra:
        _merge(data, tomllib.loads(extra))
    return Settings.model_validate(data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


@contextlib.asynccontextmanager
async def running_intake(settings: Settings, **build_kw: Any) -> AsyncIterator[Harness]:
    app = bootstrap.build(settings, **build_kw)
    app.dispatcher.idle_poll = 0.2
    await bootstrap.start(app)
    task = asyncio.create_task(app.dispatcher.run())
    assert app.email_listener is not None
    try:
        yield Harness(app=app, port=app.email_listener.port, dispatcher_task=task)
    finally:
        await bootstrap.stop(app, task)


def mail(
    *,
    subject: str = "Printer on fire",
    body: str = "Hello,\nour printer is on fire since this morning.\n",
    sender: str = "Alice Example <alice@acme.com>",
    to: str = "support@example.com",
    cc: str | None = None,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: str | None = None,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    if cc:
        m["Cc"] = cc
    m["Subject"] = subject
    m["Date"] = format_datetime(datetime(2026, 11, 21, 9, 30, tzinfo=UTC))
    m["Message-ID"] = message_id or make_msgid(domain="acme.com")
    if in_reply_to:
        m["In-Reply-To"] = in_reply_to
    if references:
        m["References"] = references
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    return m


def postfix_dsn(returned: bytes, *, recipient: str, delayed: bool = False) -> bytes:
    """A delivery status notification about ``returned`` (one of our emails), as Postfix 3.7
    writes it (the layout of one a real Postfix sent intake): a bounce (``Action: failed``),
    returning the whole message, or with ``delayed`` its warning that it is still retrying
    (``Action: delayed``), returning the headers. Sent to us with the null reverse-path."""
    boundary = "0355F16A044.1796433748/vm"
    queue_id = "D40F416A037" if delayed else "0545816A046"  # the notice's own: its Message-Id
    if delayed:
        subject, action, status = "Delayed Mail (still being retried)", "delayed", "4.2.0"
        notice = "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
        said = f"451 4.2.0 <{recipient}>: try again later"
        part = "Undelivered Message Headers\r\nContent-Type: text/rfc822-headers"
        returned = returned.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    else:
        subject, action, status = "Undelivered Mail Returned to Sender", "failed", "5.1.1"
        notice = "I'm sorry to have to inform you that your message could not\r\nbe delivered.\r\n"
        said = f"550 5.1.1 <{recipient}>: no such user here"
        part = "Undelivered Message\r\nContent-Type: message/rfc822"
    head = (
        f"Received: by vm (Postfix)\r\n\tid {queue_id}; Sat,  5 Dec 2026 01:22:28 +0000 (UTC)\r\n"
        "Date: Sat,  5 Dec 2026 01:22:28 +0000 (UTC)\r\nFrom: Mail Delivery System <MAILER-DAEMON@vm>\r\n"
        f"Subject: {subject}\r\nTo: support@example.com\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        f"Content-Transfer-Encoding: 8bit\r\nMessage-Id: <20261205012228.{queue_id}@vm>\r\n\r\n"
        f"This is a MIME-encapsulated message.\r\n\r\n--{boundary}\r\nContent-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"This is the mail system at host vm.\r\n\r\n{notice}\r\n                   The mail system\r\n\r\n"
        f"<{recipient}>: host 127.0.0.1[127.0.0.1] said: {said} (in reply to RCPT TO command)\r\n\r\n"
        f"--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; vm\r\nX-Postfix-Queue-ID: 0355F16A044\r\n"
        "X-Postfix-Sender: rfc822; support@example.com\r\nArrival-Date: Sat,  5 Dec 2026 01:22:28 +0000 (UTC)\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; 127.0.0.1\r\nDiagnostic-Code: smtp; {said}\r\n\r\n"
        f"--{boundary}\r\nContent-Description: {part}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode() + returned + f"\r\n--{boundary}--\r\n".encode()


_REFS = References()


def ref_of(text: str) -> str:
    """The first valid reference in ``text`` (an SMTP reply, a subject)."""
    found = [f.reference for f in _REFS.find(text) if f.reference]
    assert found, text
    return found[0]


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(0.02)
