"""``intake demo``: the whole product on this machine, nothing configured, as a short story.

The demo builds intake through the one composition root (``adapters.bootstrap``) with settings
of its own: a SQLite database in a temporary directory, the SMTP listener on a free loopback
port, and a built-in relay that captures outgoing mail (aiosmtpd's protocol engine on our loop,
like the listener; nothing leaves the machine). It then plays six scripted emails to the
listener over real SMTP, as a customer's mail server would, waits after each for the outbox
to settle, and prints what intake did: the SMTP reply, the ticket, the acknowledgement and the
IRT alert that went out, and what it refused to acknowledge and why.

The demo is also a smoke test: every step states what must happen; a step that does not
prints an ``UNEXPECTED: ...`` line and the command exits 1.

1. a new problem report from a customer at acme.com (a configured organisation);
2. her follow-up, keeping the reference (read from the acknowledgement) in the subject;
3. a follow-up whose subject lost the reference, In-Reply-To the acknowledgement;
4. a suspected data breach, in Spanish, from another customer: Severity 1 and an IRT alert;
5. an out-of-office auto-reply: stored, never acknowledged (RFC 3834: no mail loops);
6. a stranger citing the first customer's reference: a ticket of their own, nothing disclosed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import click
from aiosmtpd.smtp import SMTP, Envelope, Session

from adapters import bootstrap
from adapters.settings import Settings
from intake.errors import IntakeError
from intake.model import InboundMessage, Route
from intake.reference import References
from intake.service import Receipt, SystemClock

SUPPORT = "support@example.com"
IRT_LEAD = "irt-lead@example.com"
ALICE = "alice@acme.com"
MARIA = "maria@cliente.es"
JORDAN = "jordan@globex.example"
MALLORY = "mallory@evil.example"
SETTLE_TIMEOUT = 10.0  # seconds for the outbox to drain after a step
WIDTH = 18  # label column of the step report


class DemoAbortedError(Exception):
    """A step could not even be played (e.g. no reference to reply with): the story stops."""


# -- the built-in relay --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapturedMail:
    """One message intake handed to the relay."""

    rcpt_tos: tuple[str, ...]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    @property
    def message_id(self) -> str:
        return str(self.message.get("Message-ID", ""))

    @property
    def text(self) -> str:
        """Decoded headers and body, to check what was disclosed (encoded words could hide it)."""
        headers = "\n".join(f"{name}: {value}" for name, value in self.message.items())
        body = self.message.get_body(preferencelist=("plain",))
        return f"{headers}\n\n{body.get_content() if body is not None else ''}"


class CapturingRelay:
    """The demo's outbound relay: aiosmtpd's protocol engine on our loop, keeping every message.

    aiosmtpd calls ``handle_DATA`` (its hook name) once per transaction; every recipient is
    accepted, nothing is forwarded.
    """

    def __init__(self) -> None:
        self.messages: list[CapturedMail] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="relay.demo", ident="intake demo relay", loop=loop), "127.0.0.1", 0
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
            self._server = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        message = message_from_bytes(content, policy=email_policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(CapturedMail(rcpt_tos=tuple(envelope.rcpt_tos), message=message))
        return "250 2.0.0 Ok: captured by the demo relay"


# -- settings and the scripted emails --------------------------------------------------------


def demo_settings(directory: Path, *, relay_port: int, base: Settings | None = None) -> Settings:
    """The demo's own database, addresses and ports; rules and policy from ``base`` if given.

    Taking the user's rules and templates makes the demo a smoke test of them too; nothing
    else is read (their database, listener and relay are never touched).
    """
    base = base or Settings()
    settings = Settings.model_validate(
        {
            "rules": base.rules.model_dump(),
            "policy": base.policy.model_dump(),
            "storage": {"url": f"sqlite:///{directory.resolve() / 'intake.db'}"},
            "email": {
                "listen_host": "127.0.0.1",
                "support_address": SUPPORT,
                "hostname": "intake.demo",
                "shutdown_grace": 1.0,
            },
            "outbound": {
                "relay_host": "127.0.0.1",
                "relay_port": relay_port,
                "from_address": SUPPORT,
                "timeout": 5.0,
                "retry_base_seconds": 0.2,
                "retry_cap_seconds": 1.0,
            },
            "irt": {"lead_email": IRT_LEAD},
            "organisations": {"acme": {"domains": ["acme.com"]}},
            "log": {"level": "WARNING"},
        }
    )
    # Port 0: the OS picks a free port when the listener binds, and EmailListener reads it back
    # (no probe-then-bind race). Validation wants a configured port (1-65535), so set it after.
    return settings.model_copy(update={"email": settings.email.model_copy(update={"listen_port": 0})})


def kept_config(settings: Settings) -> str:
    """A settings file that points the other commands at the demo's database."""
    url = json.dumps(settings.storage.url)  # a JSON string is a valid TOML basic string
    return (
        "# Written by `intake demo --keep`: the demo's database, for `intake --config THIS_FILE tickets ...`.\n"
        f'[storage]\nurl = {url}\n\n[organisations.acme]\ndomains = ["acme.com"]\n'
    )


def _mail(
    *,
    sender: str,
    subject: str,
    body: str,
    in_reply_to: str | None = None,
    references: str | None = None,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = SUPPORT
    m["Subject"] = subject
    m["Date"] = format_datetime(SystemClock().now())
    m["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2].rstrip(">"))
    if in_reply_to:
        m["In-Reply-To"] = in_reply_to
    if references:
        m["References"] = references
    for name, value in (headers or {}).items():
        m[name] = value
    m.set_content(body)
    return m


FIRST_SUBJECT = "Dashboard shows no data since this morning"
FIRST_BODY = """Hello,

since 09:30 today the revenue dashboard at https://app.example.com/d/7 shows no data for any
of our 40 users, and the CSV export fails with error E1042. We changed nothing on our side.

Alice Martin
Acme Corp, +1 555 010 2030
"""
BREACH_SUBJECT = "Posible brecha de seguridad: acceso no autorizado a nuestra cuenta"
BREACH_BODY = """Hola,

esta mañana detectamos inicios de sesión desde direcciones IP desconocidas en nuestra cuenta
y varios informes de clientes fueron exportados sin nuestro permiso. Creemos que se trata de
una brecha de seguridad. Por favor, contacten con nosotros cuanto antes.

María García
Cliente S.L., +34 910 000 000
"""


# -- the story ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Delivery:
    """One scripted email: the SMTP answer, intake's receipt, the mail that went out."""

    reply: str
    receipt: Receipt | None
    sent: list[CapturedMail]

    def to(self, address: str) -> list[CapturedMail]:
        return [m for m in self.sent if address in m.rcpt_tos]


@dataclass(slots=True)
class DemoResult:
    settings: Settings
    problems: list[str] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)  # who -> their ticket's reference

    @property
    def ok(self) -> bool:
        return not self.problems


class Story:
    def __init__(self, app: bootstrap.App, relay: CapturingRelay, echo: Callable[[str], None]) -> None:
        self.app = app
        self.relay = relay
        self.echo = echo
        self.refs = References(app.settings.email.reference_prefix)
        self.result = DemoResult(settings=app.settings)
        self.receipts: list[Receipt | None] = []
        assert app.email_listener is not None
        self.port = app.email_listener.port
        app.email_listener.handler.on_message = self._received

    def _received(self, message: InboundMessage, reply: str, receipt: Receipt | None) -> None:
        self.receipts.append(receipt)

    # -- output --------------------------------------------------------------------------------

    def heading(self, number: int, title: str) -> None:
        self.echo("")
        self.echo(f"Step {number}. {title}")

    def line(self, label: str, value: str, *more: str) -> None:
        self.echo(f"   {label:<{WIDTH}}{value}")
        for extra in more:
            self.echo(f"   {'':<{WIDTH}}{extra}")

    def expect(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.result.problems.append(problem)
            self.echo(f"   UNEXPECTED: {problem}")
        return condition

    # -- plumbing --------------------------------------------------------------------------------

    async def read(self, fn: Callable[[Any], Any]) -> Any:
        # run_sync blocks: keep it off the loop that serves the listener and the relay.
        return await asyncio.to_thread(self.app.store.run_sync, fn)

    async def detail(self, reference: str) -> dict[str, Any]:
        found: dict[str, Any] | None = await self.read(lambda uow: uow.ticket_detail(reference))
        if found is None:
            raise DemoAbortedError(f"ticket {reference} is not in the database")
        return found

    async def settle(self) -> None:
        """Wait until the dispatcher has delivered (or given up on) everything queued."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT
        while True:
            stats = await self.read(lambda uow: uow.stats())
            if stats["outbox"]["pending"] == 0:
                return
            if loop.time() > deadline:
                raise DemoAbortedError(f"the outbox did not settle within {SETTLE_TIMEOUT:.0f}s: {stats['outbox']}")
            self.app.dispatcher.wake()
            await asyncio.sleep(0.02)

    async def deliver(self, message: EmailMessage, *, mail_from: str) -> Delivery:
        """Hand ``message`` to the listener as a mail server would, then let the outbox settle."""
        before_mail, before_receipts = len(self.relay.messages), len(self.receipts)
        self.line("from", str(message["From"]))
        self.line("subject", str(message["Subject"]))
        for name in ("In-Reply-To", "Auto-Submitted"):
            if message[name]:
                self.line(name.lower(), str(message[name]))
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, timeout=10)
        await client.connect()
        try:
            _, text = await client.sendmail(mail_from, [SUPPORT], message.as_bytes())
            reply = f"250 {text}"
        except aiosmtplib.SMTPResponseException as exc:
            reply = f"{exc.code} {exc.message}"
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
        await self.settle()
        receipts = self.receipts[before_receipts:]
        delivery = Delivery(
            reply=reply, receipt=receipts[0] if receipts else None, sent=self.relay.messages[before_mail:]
        )
        self.line("SMTP reply", reply)
        if not reply.startswith("250") or delivery.receipt is None:
            raise DemoAbortedError(f"the listener answered {reply!r}: the message was not stored")
        return delivery

    def show_outgoing(self, d: Delivery, customer: str) -> None:
        acks = d.to(customer)
        if acks:
            self.line("acknowledgement", f"sent to {', '.join(acks[0].rcpt_tos)}", f"Subject: {acks[0].subject}")
        else:
            assert d.receipt is not None
            self.line("acknowledgement", f"none: {d.receipt.ack_note}")
        alerts = d.to(IRT_LEAD)
        if alerts:
            self.line("IRT alert", f"sent to {IRT_LEAD}", f"Subject: {alerts[0].subject}")
        else:
            self.line("IRT alert", "none: nothing security-related")

    def ticket_line(self, r: Receipt, detail: dict[str, Any]) -> None:
        count = len(detail["messages"])
        if r.created:
            what = f"{r.reference}, new, {r.severity.label}"
        else:
            what = f"{r.reference}, same ticket, now {count} messages, {r.severity.label}"
        if r.security:
            what += ", SECURITY INCIDENT"
        org = detail.get("organisation")
        self.line("ticket", what + (f", organisation {org}" if org else ""))
        self.line("why there", r.note)

    # -- the six steps ---------------------------------------------------------------------------

    async def play(self) -> DemoResult:
        ack = await self.step1_new_report()
        ref = self.result.references[ALICE]
        await self.step2_reference_in_subject(ref)
        await self.step3_headers_only(ref, ack)
        await self.step4_breach_in_spanish()
        await self.step5_out_of_office()
        await self.step6_stranger(ref)
        tickets = await self.read(lambda uow: uow.list_tickets())
        self.expect(
            len(tickets) == 4,
            f"expected 4 tickets (Alice's, María's, the auto-reply's, Mallory's), found {len(tickets)}",
        )
        return self.result

    async def step1_new_report(self) -> CapturedMail | None:
        self.heading(1, "A customer at acme.com reports a problem")
        d = await self.deliver(
            _mail(sender=f"Alice Martin <{ALICE}>", subject=FIRST_SUBJECT, body=FIRST_BODY), mail_from=ALICE
        )
        r = d.receipt
        assert r is not None
        detail = await self.detail(r.reference)
        self.ticket_line(r, detail)
        self.show_outgoing(d, ALICE)
        acks = d.to(ALICE)
        self.expect(r.created and r.route is Route.NEW, "the report did not open a new ticket")
        self.expect(len(acks) == 1, f"expected one acknowledgement to {ALICE}, the relay got {len(acks)}")
        self.expect(not d.to(IRT_LEAD), "an IRT alert went out for an ordinary problem")
        self.expect(detail.get("organisation") == "acme", "the ticket was not filed under organisation acme")
        # Like the customer's mail client: the reference comes from the acknowledgement she got.
        cited = [f.reference for f in self.refs.find(acks[0].subject) if f.reference] if acks else []
        if acks and self.expect(cited == [r.reference], f"the acknowledgement's subject lacks {r.reference}"):
            self.result.references[ALICE] = cited[0]
            return acks[0]
        self.result.references[ALICE] = r.reference
        return None

    async def step2_reference_in_subject(self, ref: str) -> None:
        self.heading(2, "She writes again, keeping the reference in the subject")
        d = await self.deliver(
            _mail(
                sender=f"Alice Martin <{ALICE}>",
                subject=f"Re: {FIRST_SUBJECT} [{ref}]",
                body="Any news? The export still fails with E1042.\n",
            ),
            mail_from=ALICE,
        )
        await self._follow_up(d, ref, Route.REFERENCE, messages=2)

    async def step3_headers_only(self, ref: str, ack: CapturedMail | None) -> None:
        self.heading(3, "A follow-up whose subject lost the reference; In-Reply-To names the acknowledgement")
        if ack is None:
            raise DemoAbortedError("no acknowledgement to reply to")
        d = await self.deliver(
            _mail(
                sender=f"Alice Martin <{ALICE}>",
                subject="still no data",
                body="It is still empty. Our finance team is waiting for the numbers.\n",
                in_reply_to=ack.message_id,
                references=ack.message_id,
            ),
            mail_from=ALICE,
        )
        await self._follow_up(d, ref, Route.HEADER, messages=3)

    async def _follow_up(self, d: Delivery, ref: str, route: Route, *, messages: int) -> None:
        r = d.receipt
        assert r is not None
        detail = await self.detail(ref)
        self.ticket_line(r, detail)
        self.show_outgoing(d, ALICE)
        self.expect(r.reference == ref and r.route is route, f"it went to {r.reference} by {r.route.value}")
        self.expect(len(detail["messages"]) == messages, f"{ref} has {len(detail['messages'])} messages")
        self.expect(not d.sent, f"a follow-up triggered outgoing mail: {[m.subject for m in d.sent]}")

    async def step4_breach_in_spanish(self) -> None:
        self.heading(4, "Another customer reports a suspected data breach, in Spanish")
        d = await self.deliver(
            _mail(sender=f"María García <{MARIA}>", subject=BREACH_SUBJECT, body=BREACH_BODY), mail_from=MARIA
        )
        r = d.receipt
        assert r is not None
        detail = await self.detail(r.reference)
        self.result.references[MARIA] = r.reference
        self.ticket_line(r, detail)
        for hit in detail["evidence"][:3]:
            self.line("rule matched", f'{hit["rule"]} in the {hit["field"]}: "{hit["phrase"]}"')
        self.show_outgoing(d, MARIA)
        self.expect(
            r.created and r.reference != self.result.references[ALICE], "the breach did not open its own ticket"
        )
        self.expect(int(r.severity) == 1 and r.security, f"the breach is {r.severity.label}, security={r.security}")
        self.expect(len(d.to(MARIA)) == 1, f"expected one acknowledgement to {MARIA}, the relay got {len(d.to(MARIA))}")
        alerts = d.to(IRT_LEAD)
        self.expect(
            r.alerted and len(alerts) == 1 and r.reference in alerts[0].subject,
            f"expected one IRT alert to {IRT_LEAD} naming {r.reference}, the relay got {len(alerts)}",
        )

    async def step5_out_of_office(self) -> None:
        self.heading(5, "An out-of-office auto-reply arrives")
        d = await self.deliver(
            _mail(
                sender=f"Jordan Lee <{JORDAN}>",
                subject="Out of office: Quarterly review",
                body="I am out of the office until Monday with limited access to email.\n",
                headers={"Auto-Submitted": "auto-replied"},
            ),
            mail_from=JORDAN,
        )
        r = d.receipt
        assert r is not None
        detail = await self.detail(r.reference)
        self.result.references[JORDAN] = r.reference
        self.ticket_line(r, detail)
        if d.sent:
            self.show_outgoing(d, JORDAN)
        else:
            why = "(answering automated mail can start a mail loop: RFC 3834)"
            self.line("acknowledgement", f"refused: {r.ack_note}", why)
        self.line("ticket records", f"acknowledgement {detail['ack_status']}")
        self.expect(not r.acknowledged and not d.sent, f"the auto-reply was answered: {[m.subject for m in d.sent]}")
        self.expect(
            r.ack_note.startswith("automated mail") and str(detail["ack_status"]).startswith("suppressed"),
            f"the auto-reply was not recognised as automated mail ({r.ack_note})",
        )

    async def step6_stranger(self, ref: str) -> None:
        self.heading(6, f"A stranger forges a follow-up citing {ref}")
        before = await self.detail(ref)
        d = await self.deliver(
            _mail(
                sender=f"Mallory <{MALLORY}>",
                subject=f"Re: {FIRST_SUBJECT} [{ref}]",
                body="Please send me the exported reports and the list of users on this account.\n",
            ),
            mail_from=MALLORY,
        )
        r = d.receipt
        assert r is not None
        after = await self.detail(ref)
        self.result.references[MALLORY] = r.reference
        self.ticket_line(r, await self.detail(r.reference))
        acks = d.to(MALLORY)
        leaked = [m for m in acks if ref in m.text]
        refusal = [n["text"] for n in after["notes"] if MALLORY in n["text"]]
        count = len(after["messages"])
        still = "still has" if count == len(before["messages"]) else "now has"
        self.line(
            "first ticket",
            f"{ref} {still} {count} messages; participants: {', '.join(after['participants'])}",
            *(f"note: {text}" for text in refusal),
        )
        self.show_outgoing(d, MALLORY)
        self.line("disclosed", f"{ref} appears in the reply to the stranger: {'YES' if leaked else 'no'}")
        if r.created and r.reference != ref and not leaked:
            self.line("outcome", f"the stranger got a ticket of their own ({r.reference}); {ref} was not disclosed")
        self.expect(r.created and r.reference != ref, f"the stranger joined {ref}")
        self.expect(len(after["messages"]) == len(before["messages"]), f"the stranger's message was added to {ref}")
        self.expect(MALLORY not in after["participants"], f"the stranger became a participant of {ref}")
        self.expect(bool(refusal), f"{ref} carries no note about the refused stranger")
        self.expect(len(acks) == 1, f"expected one acknowledgement to {MALLORY}, the relay got {len(acks)}")
        self.expect(not leaked, f"the reply to the stranger mentions {ref}")


# -- running it --------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Warnings and errors only, without timestamps: the story is the output."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    if not handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("intake demo: %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


async def run_demo(
    directory: Path,
    *,
    base: Settings | None = None,
    temporary: bool = False,
    echo: Callable[[str], None] = click.echo,
) -> DemoResult:
    """Play the story against a fresh intake whose database lives in ``directory``.

    ``base``: the user's settings, for their rules and templates (see :func:`demo_settings`).
    Raises IntakeError (ConfigError) when those rules or templates are invalid.
    """
    relay = CapturingRelay()
    await relay.start()
    try:
        settings = demo_settings(directory, relay_port=relay.port, base=base)
        app = bootstrap.build(settings)
        return await _play(app, relay, temporary=temporary, echo=echo)
    finally:
        await relay.stop()


async def _play(
    app: bootstrap.App, relay: CapturingRelay, *, temporary: bool, echo: Callable[[str], None]
) -> DemoResult:
    settings = app.settings
    app.dispatcher.idle_poll = 0.2
    task: asyncio.Task[None] | None = None
    try:
        try:
            await bootstrap.start(app)
        except OSError as exc:
            echo(f"UNEXPECTED: intake cannot listen on 127.0.0.1: {exc.strerror or exc}")
            return DemoResult(settings=settings, problems=[f"cannot listen: {exc.strerror or exc}"])
        task = asyncio.create_task(app.dispatcher.run(), name="demo-outbox-dispatcher")
        assert app.email_listener is not None
        echo("intake demo: the whole product on this machine, nothing configured")
        database = settings.storage.url.removeprefix("sqlite:///")
        echo(f"   {'database':<{WIDTH}}{database}{' (temporary)' if temporary else ''}")
        echo(f"   {'listener':<{WIDTH}}SMTP on 127.0.0.1:{app.email_listener.port} for {SUPPORT}")
        echo(f"   {'relay':<{WIDTH}}built in, 127.0.0.1:{relay.port}: captures outgoing mail, sends nothing on")
        echo(f"   {'IRT lead':<{WIDTH}}{IRT_LEAD}")
        echo(f"   {'organisations':<{WIDTH}}acme = acme.com")
        echo(f"   {'rules':<{WIDTH}}{settings.rules.path or 'shipped with intake'}")
        story = Story(app, relay, echo)
        try:
            return await story.play()
        except (DemoAbortedError, OSError, aiosmtplib.SMTPException) as exc:
            story.result.problems.append(str(exc) or type(exc).__name__)
            echo(f"UNEXPECTED: {exc}; the story stopped here")
            return story.result
    finally:
        await bootstrap.stop(app, task)


def _print_table(settings: Settings) -> None:
    """The ticket table exactly as ``intake tickets list`` prints it: by running that command."""
    from adapters.cli import tickets_list  # adapters.cli loads this module: no import cycle at start-up

    with click.Context(tickets_list, obj={"settings": settings}) as ctx:
        ctx.invoke(tickets_list)


def main(ctx: click.Context, keep: Path | None) -> None:
    """``intake demo`` (declared in adapters/cli.py, which loads this module only to run it)."""
    if keep is not None and (keep / "intake.db").exists():
        raise click.UsageError(f"{keep / 'intake.db'} already exists: choose an empty directory")
    with contextlib.ExitStack() as stack:
        if keep is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="intake-demo-")))
        else:
            keep.mkdir(parents=True, exist_ok=True)
            directory = keep
        with _quiet_logging():
            try:
                result = asyncio.run(run_demo(directory, base=ctx.obj["settings"], temporary=keep is None))
            except IntakeError as exc:  # the configured rules or templates are invalid
                click.echo(f"intake: {exc}", err=True)
                ctx.exit(2)
            click.echo("")
            click.echo("Tickets now (as `intake tickets list` shows them):")
            _print_table(result.settings)
        click.echo("")
        if keep is not None:
            config = keep.resolve() / "intake.toml"
            config.write_text(kept_config(result.settings), encoding="utf-8")
            click.echo(f"The database is kept in {keep.resolve() / 'intake.db'}. Look around with:")
            click.echo(f"   intake --config {config} tickets list")
            for reference in result.references.values():
                click.echo(f"   intake --config {config} tickets show {reference}")
        else:
            click.echo("The temporary database is gone now; `intake demo --keep DIR` keeps it.")
    if not result.ok:
        click.echo(f"UNEXPECTED: {len(result.problems)} thing(s) did not happen as they should:")
        for problem in result.problems:
            click.echo(f"   - {problem}")
        ctx.exit(1)
    click.echo("Every step went as expected.")
