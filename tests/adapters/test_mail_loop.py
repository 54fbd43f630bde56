"""Mail loops: two intake installations that acknowledge into each other, and auto-responders.

Each installation's outbound relay is a :class:`Hop` on the test's loop that records what
passes and forwards it to the *other* installation's listener, so every acknowledgement one
sends is delivered into the other. A message that looks as if it came from A's support address,
sent to B, is the classic start of a ping-pong: B acknowledges to A, A would acknowledge to
B, and so on. What must stop it, in order:

1. our acknowledgements carry ``Auto-Submitted: auto-replied`` (RFC 3834) and the sender's
   ``X-Intake-Loop`` token; another installation's token is not its own loop, but the
   Auto-Submitted header alone keeps it from answering;
2. replies that thread (In-Reply-To, a reference in the subject) join the ticket silently;
3. when a gateway strips all of that, the per-sender acknowledgement limit ends it.

Each test waits until nothing has moved for a while, then counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from adapters.bootstrap import make_outbound
from intake.hygiene import LOOP_HEADER
from tests.adapters.harness import Harness, mail, running_intake, settings_for
from tests.conftest import free_port

A = "support@a.example"
B = "support@b.example"


@dataclass(frozen=True, slots=True)
class Passed:
    """One message a hop accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    message: EmailMessage


Transform = Callable[[bytes], bytes]


@dataclass
class Hop:
    """An SMTP server on the test's loop: records each message, then forwards it or answers it.

    ``forward_to``: the port of the listener to deliver to, with ``transform`` applied to the
    bytes first (and ``envelope_from`` as MAIL FROM, if given); the hop answers what that
    listener answered, as a relay that delivers before it replies. ``responder``: instead,
    accept, and send ``responder(message)`` (a new message, or None for no answer) back to
    ``reply_port`` a moment later, as an auto-responder would.
    """

    forward_to: int | None = None
    transform: Transform | None = None
    envelope_from: str | None = None  # forward with this MAIL FROM instead of the original
    forward_rcpt: tuple[str, ...] | None = None  # forward to these instead (an alias rewrites them)
    responder: Callable[[Passed], bytes | None] | None = None
    reply_port: int | None = None
    passed: list[Passed] = field(default_factory=list)  # as the sender sent it
    forwarded: list[bytes] = field(default_factory=list)  # as delivered onwards (transformed)
    answered: int = 0  # responder: answers delivered
    refused: list[str] = field(default_factory=list)  # responder: answers the listener refused
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    port: int = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(_HopHandler(self), hostname="hop.test", loop=loop), "127.0.0.1", 0
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def receive(self, mail_from: str, rcpt_tos: list[str], content: bytes) -> str:
        parsed = message_from_bytes(content, policy=email_policy.default)
        assert isinstance(parsed, EmailMessage)
        passed = Passed(mail_from, tuple(rcpt_tos), content, parsed)
        self.passed.append(passed)
        if self.responder is not None:
            answer = self.responder(passed)
            if answer is not None:
                task = asyncio.create_task(self._answer(answer, passed))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return "250 2.0.0 OK"
        assert self.forward_to is not None
        data = self.transform(content) if self.transform else content
        self.forwarded.append(data)
        sender = self.envelope_from if self.envelope_from is not None else mail_from.strip("<>")
        return await deliver(self.forward_to, sender, list(self.forward_rcpt or rcpt_tos), data)

    async def _answer(self, answer: bytes, to: Passed) -> None:
        await asyncio.sleep(0.05)
        assert self.reply_port is not None
        # An auto-responder answers the From of what it got, as the mailbox it got it for.
        mailbox, author = parseaddr(str(to.message["To"]))[1], parseaddr(str(to.message["From"]))[1]
        reply = await deliver(self.reply_port, mailbox, [author], answer)
        if reply.startswith("250"):
            self.answered += 1
        else:
            self.refused.append(reply)


class _HopHandler:
    def __init__(self, hop: Hop) -> None:
        self.hop = hop

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return await self.hop.receive(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))


async def deliver(port: int, mail_from: str, rcpt_tos: list[str], data: bytes) -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    try:
        await client.connect()
        _, text = await client.sendmail(mail_from, rcpt_tos, data)
        return f"250 {text}"
    except aiosmtplib.SMTPRecipientsRefused as exc:
        return f"{exc.recipients[0].code} {exc.recipients[0].message}"
    except aiosmtplib.SMTPResponseException as exc:
        return f"{exc.code} {exc.message}"
    except (OSError, aiosmtplib.SMTPException) as exc:
        return f"451 4.4.1 next hop unreachable: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


@contextlib.asynccontextmanager
async def running_hops(*hops: Hop) -> AsyncIterator[None]:
    for hop in hops:
        await hop.start()
    try:
        yield
    finally:
        for hop in hops:
            await hop.stop()


def installation(tmp: Path, *, address: str, listen_port: int, relay_port: int, limits: str = "") -> Any:
    tmp.mkdir(exist_ok=True)
    extra = f"""
[email]
listen_port = {listen_port}
support_address = "{address}"
extra_addresses = []
[outbound]
from_address = "{address}"
{limits}
"""
    return settings_for(tmp, relay_port=relay_port, extra=extra)


async def settle(harnesses: list[Harness], hops: list[Hop], *, quiet: float = 1.5, limit: float = 30.0) -> None:
    """Wait until no hop carried anything and no outbox had work for ``quiet`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last: tuple[int, ...] = ()
    since = loop.time()
    while True:
        stats = [h.stats() for h in harnesses]
        state = (*(len(hop.passed) for hop in hops), *(hop.answered for hop in hops), *(s["messages"] for s in stats))
        pending = sum(s["outbox"]["pending"] for s in stats) + sum(len(hop._tasks) for hop in hops)
        now = loop.time()
        if state != last or pending:
            last, since = state, now
        elif now - since >= quiet:
            return
        if now > deadline:
            raise AssertionError(f"still moving after {limit}s: {state}, {pending} pending (a loop?)")
        for h in harnesses:
            h.app.dispatcher.wake()
        await asyncio.sleep(0.05)


def acks(hop: Hop) -> list[Passed]:
    return [p for p in hop.passed if p.message["Auto-Submitted"] == "auto-replied"]


# ---------------------------------------------------------------------------------------------
# Two installations
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_installations(
    tmp_path: Path, transform: Transform | None = None, envelope_from: str | None = None, limits: str = ""
) -> AsyncIterator[tuple[Harness, Harness, Hop, Hop]]:
    port_a, port_b = free_port(), free_port()
    a_to_b = Hop(forward_to=port_b, transform=transform, envelope_from=envelope_from)  # A's relay: into B
    b_to_a = Hop(forward_to=port_a, transform=transform, envelope_from=envelope_from)  # B's relay: into A
    async with running_hops(a_to_b, b_to_a):
        sa = installation(tmp_path / "a", address=A, listen_port=port_a, relay_port=a_to_b.port, limits=limits)
        sb = installation(tmp_path / "b", address=B, listen_port=port_b, relay_port=b_to_a.port, limits=limits)
        async with running_intake(sa) as ha, running_intake(sb) as hb:
            yield ha, hb, a_to_b, b_to_a


def first_contact() -> EmailMessage:
    """Mail to B that looks as if A's support address wrote it: B's answer goes into A."""
    return mail(sender=f"Support A <{A}>", to=B, subject="Printer on fire", body="Our printer is on fire.\n")


async def test_two_installations_exchange_one_acknowledgement_and_stop(tmp_path: Path) -> None:
    async with two_installations(tmp_path) as (ha, hb, a_to_b, b_to_a):
        reply = await hb.send(first_contact(), mail_from=A, rcpt=(B,))
        assert reply.code == 250
        await settle([ha, hb], [a_to_b, b_to_a])

        # B acknowledged once, into A; A answered nothing.
        [ack] = b_to_a.passed
        assert a_to_b.passed == []
        token_a, token_b = make_outbound(ha.settings).loop_token, make_outbound(hb.settings).loop_token
        assert token_a != token_b
        assert ack.mail_from == "<>" and ack.rcpt_tos == (A,)
        assert ack.message["Auto-Submitted"] == "auto-replied"
        assert ack.message[LOOP_HEADER] == token_b
        # A stored B's acknowledgement (a person may need to see it) and did not answer it:
        # B's loop token is not A's own, but Auto-Submitted is enough.
        [ta] = ha.tickets()
        assert ta["requester"] == B
        assert ta["ack_status"] == "suppressed: automated mail: Auto-Submitted: auto-replied"
        [ma] = ha.detail(ta["reference"])["messages"]
        assert ma["automation"] == "Auto-Submitted: auto-replied"
        [tb] = hb.tickets()
        assert tb["requester"] == A and tb["ack_status"] == "queued"
        assert ha.stats()["messages"] + hb.stats()["messages"] == 2
        assert ha.stats()["outbox"]["sent"] == 0 and hb.stats()["outbox"]["sent"] == 1


_STRIPPED = re.compile(
    rb"^(?:auto-submitted|precedence|x-auto[\w-]*|x-intake-loop|in-reply-to|references):.*\r\n(?:[ \t].*\r\n)*",
    re.I | re.M,
)
_SUBJECT = re.compile(rb"^subject:.*\r\n(?:[ \t].*\r\n)*", re.I | re.M)


GATEWAY = "gateway@relay.example"


def careless_gateway(content: bytes) -> bytes:
    """A gateway that drops every automation and threading header and rewrites the subject.

    It also sends on with an envelope sender of its own (``GATEWAY``), hiding the null
    reverse-path that marks our acknowledgements as automatic too.
    """
    head, _, body = content.partition(b"\r\n\r\n")
    head = _STRIPPED.sub(b"", head + b"\r\n")
    head = _SUBJECT.sub(b"Subject: Message from the support desk\r\n", head)
    return head + b"\r\n" + body


async def test_without_loop_markers_the_acknowledgement_limit_ends_the_ping_pong(tmp_path: Path) -> None:
    """Nothing left to recognise a loop by: each side answers the other until its per-sender limit."""
    limits = "[limits]\nacks_per_sender = 3\ntickets_per_sender = 100\n"
    async with two_installations(tmp_path, careless_gateway, GATEWAY, limits) as (ha, hb, a_to_b, b_to_a):
        assert (await hb.send(first_contact(), mail_from=A, rcpt=(B,))).code == 250
        await settle([ha, hb], [a_to_b, b_to_a])
        # Both sides marked their acknowledgements; the gateway removed every marker...
        assert all(p.message["Auto-Submitted"] == "auto-replied" for p in [*a_to_b.passed, *b_to_a.passed])
        delivered = [message_from_bytes(d) for d in [*a_to_b.forwarded, *b_to_a.forwarded]]
        for d in delivered:
            assert [k for k in d if k.lower() not in ("from", "to", "subject", "date", "message-id")] == [
                "Content-Type",
                "Content-Transfer-Encoding",
                "MIME-Version",
            ]
        # ...three times each way (the limit), and then it stopped.
        assert len(b_to_a.passed) == 3 and len(a_to_b.passed) == 3
        assert len(hb.tickets()) == 4  # the first contact and A's three acknowledgements
        assert len(ha.tickets()) == 3
        last = [t for t in hb.tickets() if t["ack_status"].startswith("suppressed: flood limit")]
        assert len(last) == 1


# ---------------------------------------------------------------------------------------------
# Auto-responders
# ---------------------------------------------------------------------------------------------

CUSTOMER = "bob@c.example"


def marked_responder(got: Passed) -> bytes:
    """Exchange-style out-of-office: answers everything, but marks and threads its answer."""
    m = EmailMessage()
    m["From"] = f"Bob <{CUSTOMER}>"
    m["To"] = str(got.message["From"])
    m["Subject"] = f"Automatic reply: {got.message['Subject']}"
    m["In-Reply-To"] = str(got.message["Message-ID"])
    m["Auto-Submitted"] = "auto-replied"
    m["Message-ID"] = f"<oof-{len(got.content)}-{id(got)}@c.example>"
    m.set_content("I am out of the office until Monday.\n")
    return m.as_bytes()


def unmarked_responder(got: Passed) -> bytes:
    """The worst kind: no marks, no threading, a fresh subject every time."""
    m = EmailMessage()
    m["From"] = f"Bob <{CUSTOMER}>"
    m["To"] = str(got.message["From"])
    m["Subject"] = "Thanks for your email"
    m["Message-ID"] = f"<thanks-{id(got)}@c.example>"
    m.set_content("We got your email and will get back to you.\n")
    return m.as_bytes()


@pytest.mark.parametrize(
    ("responder", "tickets", "acknowledgements"),
    [(marked_responder, 1, 1), (unmarked_responder, 4, 3)],
    ids=["marked", "unmarked"],
)
async def test_auto_responder_behind_the_customer(
    tmp_path: Path, responder: Callable[[Passed], bytes], tickets: int, acknowledgements: int
) -> None:
    listen = free_port()
    relay = Hop(responder=responder, reply_port=listen)  # everything intake sends reaches Bob's responder
    async with running_hops(relay):
        limits = "[limits]\nacks_per_sender = 3\ntickets_per_sender = 100\n"
        settings = installation(tmp_path, address=A, listen_port=listen, relay_port=relay.port, limits=limits)
        async with running_intake(settings) as h:
            assert (await h.send(mail(sender=f"Bob <{CUSTOMER}>", to=A), mail_from=CUSTOMER, rcpt=(A,))).code == 250
            await settle([h], [relay])
            assert len(relay.passed) == acknowledgements
            assert relay.refused == []
            assert relay.answered == acknowledgements  # the responder answered every one
            assert len(h.tickets()) == tickets
            assert h.stats()["messages"] == 1 + acknowledgements
            if responder is marked_responder:
                [t] = h.tickets()
                routes = [(m["route"], m["automation"]) for m in h.detail(t["reference"])["messages"]]
                assert routes[0] == ("new", None)
                assert routes[1][1] is not None and routes[1][0] != "new"  # joined the ticket, recognised


async def test_our_acknowledgement_forwarded_back_joins_its_ticket(tmp_path: Path) -> None:
    """A customer's mailbox that forwards everything to support, as it is (an alias): our
    acknowledgement comes back. It carries our loop marker, which stops the loop, and our own
    Message-ID, which only its ticket's people have seen: it joins that ticket, instead of
    opening one from our own address that would wait for an answer and go overdue."""
    listen = free_port()
    mailbox = Hop(forward_to=listen, forward_rcpt=(A,))  # all intake sends goes to Bob, and back
    async with running_hops(mailbox):
        settings = installation(tmp_path, address=A, listen_port=listen, relay_port=mailbox.port)
        async with running_intake(settings) as h:
            assert (await h.send(mail(sender=f"Bob <{CUSTOMER}>", to=A), mail_from=CUSTOMER, rcpt=(A,))).code == 250
            await settle([h], [mailbox])
            [ack] = acks(mailbox)
            [t] = h.tickets()
            messages = h.detail(t["reference"])["messages"]
            assert [m["route"] for m in messages] == ["new", "header"]
            back = messages[1]
            assert back["message_id"] == ack.message["Message-ID"].strip("<>")
            own = ack.message["Message-ID"]
            assert back["route_note"] == f"intake's own message {own} for {t['reference']} came back"
            assert back["automation"] and "loop marker" in back["automation"]
            assert len(mailbox.passed) == 1  # the copy that came back is not acknowledged
