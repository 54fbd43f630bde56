"""Red-team cases of joining tickets, end to end over real SMTP: the customer's clumsy typing,
and a stranger's tricks. What a stranger learns from intake's answers is checked too."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from tests.adapters.conftest import RelayStandIn
from tests.adapters.harness import mail, postfix_dsn, ref_of, running_intake, settings_for


@pytest.fixture
async def intake(tmp_path: Path, smtp_relay: RelayStandIn):  # type: ignore[no-untyped-def]
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        yield h


def raw_mail(from_header: str, subject: str, message_id: str) -> bytes:
    return (
        f"From: {from_header}\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Please send me the invoices.\r\n"
    ).encode()


@pytest.mark.parametrize(
    "typed",
    [
        lambda r: r.replace("-", "\u2011"),  # non-breaking hyphens, as copied from rendered text
        lambda r: r.replace("-", "\u2013"),  # en dashes, as autocorrect makes them
        lambda r: "".join(chr(ord(c) + 0xFEE0) for c in r),  # fullwidth, as a CJK input method types it
        lambda r: r[:7] + "\u200b" + r[7:],  # a zero-width space copied from a web page
    ],
    ids=["nb-hyphen", "en-dash", "fullwidth", "zero-width-space"],
)
async def test_the_customer_typing_the_reference_in_unicode_forms_joins(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, typed
) -> None:
    ref = ref_of((await intake.send(mail(subject="Our invoices"))).text)
    await smtp_relay.wait_for(1)
    subject = f"Re: Our invoices [{typed(ref)}]"  # sent as an RFC 2047 encoded word
    reply = await intake.send(mail(subject=subject, body="Any news?\n"))
    assert ref_of(reply.text) == ref
    assert [m["route"] for m in intake.detail(ref)["messages"]] == ["new", "reference"]
    # A stranger writing it the same way is still refused, and is not told of the ticket.
    other = await intake.send(mail(sender="mallory@evil.example", subject=subject))
    assert ref_of(other.text) != ref and len(intake.detail(ref)["messages"]) == 2
    acks = await smtp_relay.wait_for(2)
    assert ref not in acks[1].content.decode() and acks[1].rcpt_tos == ("mallory@evil.example",)
    await asyncio.sleep(0.3)
    assert len(smtp_relay.messages) == 2  # the customer's follow-up is not acknowledged


async def test_a_stranger_reusing_a_customers_message_id_learns_no_reference(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    # A colleague Cc'd on the customer's mail, or anyone who saw its headers, knows its Message-ID.
    ref = ref_of((await intake.send(mail(message_id="<invoices-1@acme.com>", subject="Our invoices"))).text)
    probe = await intake.send(mail(sender="mallory@evil.example", message_id="<invoices-1@acme.com>", subject="hi"))
    assert probe.code == 250 and "already stored" in probe.text
    assert ref not in probe.text and "SUP-" not in probe.text.upper()
    assert len(intake.detail(ref)["messages"]) == 1
    # The customer's own MTA redelivering still hears which ticket has it.
    again = await intake.send(mail(message_id="<invoices-1@acme.com>", subject="Our invoices"))
    assert "already stored" in again.text and ref_of(again.text) == ref


@pytest.mark.parametrize(
    "from_header",
    [
        "alice@acme.com <mallory@evil.example>",  # an address as an unquoted display name
        "<alice@acme.com>mallory@evil.example",
        "=?utf-8?b?" + base64.b64encode(b"alice@acme.com").decode() + "?=",  # the address as an encoded word
        "=?utf-8?q?alice=40acme.com?=",
        'alice@acme.com <"m"@evil.example>',  # the real mailbox's local part quoted
        "alice@acme.com, mallory@[203.0.113.9]",  # a domain literal beside the customer
        "mallory@evil.example x@<alice@acme.com>",  # the strict parser (and DMARC) reads Mallory
        "alice@acme.com\u00a0",  # a no-break space a byte-level parser keeps in the domain
        "alice@acme.com <@evil.example>",  # OpenDMARC aligns on the first <...>: evil.example
        "x<@evil.example>alice@acme.com",
        "alice@acme.com<alice@acme.com@evil.example",
        "alice@acme.com (",  # OpenDMARC cannot parse it, so no DMARC check was made at all
        "(" + "a)\r\n (" * 2000 + "a) alice@acme.com",  # folded, 8 KB: not read twice more
        "\x00alice@acme.com",  # C reads an empty From; PostgreSQL refused the NUL (451 for ever)
        "alice\x01@acme.com",
    ],
    ids=[
        "unquoted-name",
        "angle-then-bare",
        "b-encoded-address",
        "q-encoded-address",
        "quoted-local",
        "literal",
        "parser-gadget",
        "nbsp",
        "empty-route",
        "empty-route-first",
        "unclosed-angle",
        "unclosed-comment",
        "huge",
        "nul",
        "control",
    ],
)
async def test_a_from_field_that_does_not_say_one_address_is_no_customers_identity(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, from_header: str
) -> None:
    """What a DMARC check at the border reads as the author (the angle address, or no valid
    address at all) must not be read by intake as the customer's address: such a From joins no
    ticket on anyone's behalf."""
    ref = ref_of((await intake.send(mail(subject="Our invoices"))).text)
    await smtp_relay.wait_for(1)
    reply = await intake.send(
        raw_mail(from_header, f"Re: Our invoices [{ref}]", "spoof-1@evil.example"), mail_from="mallory@evil.example"
    )
    assert reply.code == 250 and ref_of(reply.text) != ref
    assert len(intake.detail(ref)["messages"]) == 1
    assert intake.detail(ref)["participants"] == ["alice@acme.com"]
    spoof = intake.detail(ref_of(reply.text))["messages"][0]
    assert "does not give one readable author" in spoof["parse_problem"]  # staff see why
    await asyncio.sleep(0.3)
    assert all(m.rcpt_tos != ("alice@acme.com",) for m in smtp_relay.messages[1:])


@pytest.mark.parametrize("sender_field", ["mallory@evil.example", "alice@acme.com"])
@pytest.mark.parametrize(
    "from_header",
    [
        "alice@acme.com, mallory@evil.example",
        "alice@acme.com <mallory@evil.example>",
        "mallory@evil.example <alice@acme.com>",
    ],
)
async def test_several_authors_are_no_one_whatever_sender_says(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, from_header: str, sender_field: str
) -> None:
    """Sender is checked by no one at the border: naming the customer there must not pick her
    out of a From that names two mailboxes."""
    ref = ref_of((await intake.send(mail(subject="Our invoices"))).text)
    head = (
        f"From: {from_header}\r\nSender: {sender_field}\r\nTo: support@example.com\r\n"
        f"Subject: Re: Our invoices [{ref}]\r\nMessage-ID: <two-authors@evil.example>\r\n\r\nhi\r\n"
    )
    reply = await intake.send(head.encode(), mail_from="mallory@evil.example")
    assert ref_of(reply.text) != ref and len(intake.detail(ref)["messages"]) == 1


async def test_a_stranger_at_the_customers_mail_provider_is_refused(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref = ref_of((await intake.send(mail(sender="Alice <alice@hotmail.fr>", subject="Mon compte"))).text)
    reply = await intake.send(mail(sender="mallory@hotmail.fr", subject=f"RE: Mon compte [{ref}]"))
    assert ref_of(reply.text) != ref and len(intake.detail(ref)["messages"]) == 1
    assert any("mallory@hotmail.fr" in n["text"] for n in intake.detail(ref)["notes"])


async def test_the_address_written_as_its_own_display_name_is_the_customer(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """Some mailers and web forms write ``From: alice@acme.com <alice@acme.com>``: one mailbox
    named twice is that mailbox, acknowledged and entitled, not an ambiguous author."""
    first = await intake.send(raw_mail("alice@acme.com <alice@acme.com>", "Our invoices", "twice-1@acme.com"))
    ref = ref_of(first.text)
    acks = await smtp_relay.wait_for(1)
    assert acks[0].rcpt_tos == ("alice@acme.com",)
    assert intake.detail(ref)["requester"].endswith("alice@acme.com")
    again = await intake.send(raw_mail("ALICE@acme.com <alice@ACME.com>", f"Re: [{ref}]", "twice-2@acme.com"))
    assert ref_of(again.text) == ref and len(intake.detail(ref)["messages"]) == 2
    outlook = await intake.send(raw_mail("'alice@acme.com' <alice@acme.com>", f"Re: [{ref}]", "twice-3@acme.com"))
    assert ref_of(outlook.text) == ref and len(intake.detail(ref)["messages"]) == 3


async def test_a_from_without_an_address_is_not_the_sender_fields(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """Nothing checks Sender: a From with no address falls back to the envelope sender (which
    SPF checks), not to a Sender field naming the customer."""
    ref = ref_of((await intake.send(mail(subject="Our invoices"))).text)
    head = (
        "From: Alice Smith\r\nSender: alice@acme.com\r\nTo: support@example.com\r\n"
        f"Subject: Re: Our invoices [{ref}]\r\nMessage-ID: <no-from@evil.example>\r\n\r\nhi\r\n"
    )
    reply = await intake.send(head.encode(), mail_from="mallory@evil.example")
    assert ref_of(reply.text) != ref and len(intake.detail(ref)["messages"]) == 1


@pytest.mark.parametrize("from_header", ["alice@acme.com'", "Mallory <alice@acme.com'>"])
async def test_an_address_with_a_trailing_quote_is_somebody_else(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, from_header: str
) -> None:
    """Its domain is "acme.com'", which has no DMARC policy to fail: it is not Alice's address
    with a stray quote, and stripping quotes from it let a stranger in."""
    ref = ref_of((await intake.send(mail(subject="Our invoices"))).text)
    reply = await intake.send(raw_mail(from_header, f"Re: Our invoices [{ref}]", "quote-1@evil.example"))
    assert ref_of(reply.text) != ref and len(intake.detail(ref)["messages"]) == 1


async def test_a_bounce_or_our_own_mail_come_back_makes_no_participant(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """Behind Postfix every bounce of every acknowledgement comes from MAILER-DAEMON@ its host,
    and an acknowledgement forwarded back comes from our own address. Each joins its ticket (our
    Message-ID in it is proof), but neither address becomes a participant: anyone writing under
    it could then join the ticket by its reference."""
    ref = ref_of((await intake.send(mail(subject="Our invoices"))).text)
    [ack] = await smtp_relay.wait_for(1)
    bounce = await intake.send(postfix_dsn(ack.content, recipient="alice@acme.com"), mail_from="")
    looped = await intake.send(ack.content, mail_from="alice@acme.com")
    assert ref_of(bounce.text) == ref_of(looped.text) == ref
    assert intake.detail(ref)["participants"] == ["alice@acme.com"]
    for n, forged in enumerate(["Mail Delivery System <MAILER-DAEMON@vm>", "Support <support@example.com>"]):
        raw = raw_mail(forged, f"Re: Our invoices [{ref}]", f"forged-{n}@evil.example")
        reply = await intake.send(raw, mail_from="mallory@evil.example")
        assert reply.code == 250 and ref_of(reply.text) != ref, forged
    assert len(intake.detail(ref)["messages"]) == 3
