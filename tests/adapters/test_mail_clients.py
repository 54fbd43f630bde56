"""Follow-ups, forwards and replies as real mail clients write them, over real SMTP.

Each message is written byte for byte as the client writes it (Outlook desktop and on the
web, Gmail, Apple Mail, Thunderbird, phones, gateways, mailing lists): its folding, its
encoded words, its Message-ID style, its Thread-Index, its References kept, cut or dropped.
What a support team expects of each is asserted: which ticket it joins, whether it is
acknowledged, and the reason recorded on the message.
"""

from __future__ import annotations

import asyncio
import base64
import quopri
from pathlib import Path
from typing import Any

import pytest

from intake.reference import References
from tests.adapters.conftest import CapturedMessage, RelayStandIn
from tests.adapters.harness import Harness, mail, ref_of, running_intake, settings_for

ORIGINAL_ID = "<AM6PR04MB5639F1B2A7D38C8E0E1A9C44D6A90@AM6PR04MB5639.eurprd04.prod.outlook.com>"


@pytest.fixture
async def intake(tmp_path: Path, smtp_relay: RelayStandIn):  # type: ignore[no-untyped-def]
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port)) as h:
        yield h


async def opened(
    intake: Harness,
    relay: RelayStandIn,
    *,
    sender: str = "Alice Example <alice@acme.com>",
    subject: str = "Printer on fire",
    message_id: str = ORIGINAL_ID,
    cc: str | None = None,
    body: str = "Hello,\nour printer is on fire since this morning.\n",
) -> tuple[str, CapturedMessage]:
    """A ticket opened by the customer, and its acknowledgement as the relay received it."""
    before = len(relay.messages)
    reply = await intake.send(mail(sender=sender, subject=subject, message_id=message_id, cc=cc, body=body))
    ref = ref_of(reply.text)
    acks = await relay.wait_for(before + 1)
    ack = next(a for a in acks if ref in str(a.message["Subject"]))
    return ref, ack


async def no_more_mail(relay: RelayStandIn, count: int) -> None:
    await asyncio.sleep(0.3)
    await relay.wait_for(count)


def b64_word(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def q_word(text: str, charset: str = "utf-8") -> str:
    encoded = quopri.encodestring(text.encode(charset), header=True).decode()
    return f"=?{charset}?Q?{encoded.replace('[', '=5B').replace(']', '=5D')}?="


def outlook(
    *,
    sender: str = '"Example, Alice" <alice@acme.com>',
    subject: str,
    thread_topic: str = "Printer on fire",
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    message_id: str = "<DB9PR04MB84371C7E5F9A0B2D3C4E5F60718293A4@DB9PR04MB8437.eurprd04.prod.outlook.com>",
    body: str = "Any news on this? The printer is still smoking.",
    to: str = "Support <support@example.com>",
    cc: str | None = None,
    extra: str = "",
) -> bytes:
    """Outlook for Windows (Microsoft 365) as Exchange Online hands it to the internet:
    Thread-Topic / Thread-Index, References folded one id a line, multipart/alternative."""
    refs = ""
    if references:
        refs = "References: " + "\r\n ".join(references) + "\r\n"
    irt = f"In-Reply-To: {in_reply_to}\r\n" if in_reply_to else ""
    ccs = f"CC: {cc}\r\n" if cc else ""
    return (
        f"From: {sender}\r\n"
        f"To: {to}\r\n{ccs}"
        f"Subject: {subject}\r\n"
        f"Thread-Topic: {thread_topic}\r\n"
        "Thread-Index: AQHbPQ3yJ5c0nS7pHEuX4xX6v0k2mrLRm1Qw\r\n"
        "Date: Mon, 23 Nov 2026 09:14:07 +0000\r\n"
        f"Message-ID: {message_id}\r\n"
        f"{refs}{irt}"
        "Accept-Language: de-DE, en-US\r\n"
        "Content-Language: de-DE\r\n"
        "X-MS-Has-Attach:\r\n"
        "X-MS-TNEF-Correlator:\r\n"
        "msip_labels:\r\n"
        "x-ms-publictraffictype: Email\r\n"
        "x-ms-traffictypediagnostic: DB9PR04MB8437:EE_|AS8PR04MB7621:EE_\r\n"
        "x-ms-office365-filtering-correlation-id: 6b2c3d4e-5f60-4718-92a3-b4c5d6e7f809\r\n"
        f"{extra}"
        "Content-Type: multipart/alternative;\r\n"
        '\tboundary="_000_DB9PR04MB84371C7E5F9A0B2D3C4E5F60718293A4DB9PR04MB8437eurp_"\r\n'
        "MIME-Version: 1.0\r\n"
        "\r\n"
        "--_000_DB9PR04MB84371C7E5F9A0B2D3C4E5F60718293A4DB9PR04MB8437eurp_\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        + base64.encodebytes(body.encode()).decode().replace("\n", "\r\n")
        + "\r\n--_000_DB9PR04MB84371C7E5F9A0B2D3C4E5F60718293A4DB9PR04MB8437eurp_\r\n"
        'Content-Type: text/html; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n"
        '<html><head><meta http-equiv=3D"Content-Type" content=3D"text/html; charset=3Dutf-8">'
        f"</head><body><p>{body}</p></body></html>\r\n"
        "--_000_DB9PR04MB84371C7E5F9A0B2D3C4E5F60718293A4DB9PR04MB8437eurp_--\r\n"
    ).encode()


def gmail(
    *,
    sender: str = "Alice Example <alice.example@gmail.com>",
    subject: str,
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    message_id: str = "<CAKq3=Yx8+4e7H_pQvZ3n0V2h-u5Jd9T1mW6o8bXcYwLs2F0aRg@mail.gmail.com>",
    body: str = "Any news?",
    to: str = "support@example.com",
    cc: str | None = None,
) -> bytes:
    """Gmail's web client: References on one line, Message-ID at mail.gmail.com, text and
    HTML alternatives, the subject as given (already encoded by the caller when needed)."""
    refs = f"References: {' '.join(references)}\r\n" if references else ""
    irt = f"In-Reply-To: {in_reply_to}\r\n" if in_reply_to else ""
    ccs = f"Cc: {cc}\r\n" if cc else ""
    return (
        "MIME-Version: 1.0\r\n"
        "Date: Mon, 23 Nov 2026 10:02:31 +0100\r\n"
        f"{refs}{irt}"
        f"Message-ID: {message_id}\r\n"
        f"Subject: {subject}\r\n"
        f"From: {sender}\r\n"
        f"To: {to}\r\n{ccs}"
        'Content-Type: multipart/alternative; boundary="000000000000a1b2c3062d4e5f60"\r\n'
        "\r\n"
        "--000000000000a1b2c3062d4e5f60\r\n"
        'Content-Type: text/plain; charset="UTF-8"\r\n'
        "\r\n"
        f"{body}\r\n"
        "\r\n"
        "--000000000000a1b2c3062d4e5f60\r\n"
        'Content-Type: text/html; charset="UTF-8"\r\n'
        "\r\n"
        f'<div dir="ltr">{body}</div>\r\n'
        "\r\n"
        "--000000000000a1b2c3062d4e5f60--\r\n"
    ).encode()


def plain(
    *,
    sender: str,
    subject: str,
    message_id: str,
    headers: str = "",
    body: str = "Any news?",
    to: str = "support@example.com",
) -> bytes:
    """A text/plain message as Apple Mail, Thunderbird and phones write it: ``headers`` are
    the client's own (User-Agent, X-Mailer, In-Reply-To, References) as it writes them."""
    return (
        f"From: {sender}\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n"
        "Date: Mon, 23 Nov 2026 11:40:12 +0100\r\n"
        f"{headers}"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8; format=flowed\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


def messages(intake: Harness, ref: str) -> list[dict[str, Any]]:
    return list(intake.detail(ref)["messages"])


def notes(intake: Harness, ref: str) -> list[str]:
    return [n["text"] for n in intake.detail(ref)["notes"]]


async def joins(intake: Harness, relay: RelayStandIn, raw: bytes, ref: str, route: str, **send: Any) -> str:
    """Send ``raw``; assert it joined ``ref`` by ``route`` without another acknowledgement."""
    before = len(relay.messages)
    reply = await intake.send(raw, **send)
    assert reply.code == 250, reply
    assert ref_of(reply.text) == ref, reply.text
    last = messages(intake, ref)[-1]
    assert last["route"] == route, last
    await no_more_mail(relay, before)
    return str(last["route_note"])


# -- Outlook: localised and stacked prefixes, gateway tags, Thread-Index --------------------

OUTLOOK_SUBJECTS = [
    "RE: Printer on fire [{ref}]",
    "AW: Printer on fire [{ref}]",
    "WG: Printer on fire [{ref}]",
    "VS: Printer on fire [{ref}]",
    "Odp: Printer on fire [{ref}]",
    "RIF: Printer on fire [{ref}]",
    "R: Printer on fire [{ref}]",
    "Antw: Printer on fire [{ref}]",
    "Ynt: Printer on fire [{ref}]",
    "RES: Printer on fire [{ref}]",
    "ENC: Printer on fire [{ref}]",
    "Fw: Printer on fire [{ref}]",
    "TR: Printer on fire [{ref}]",
    "RE: AW: RE: WG: Printer on fire [{ref}]",
    "[EXTERNAL] RE: Printer on fire [{ref}]",
    "RE: [EXT] Printer on fire [{ref}]",
    "*** SPAM *** RE: Printer on fire [{ref}]",
    "[SPAM] [EXTERNAL] AW: Printer on fire [{ref}]",
]


@pytest.mark.parametrize("form", OUTLOOK_SUBJECTS)
async def test_outlook_replies_with_any_prefix_or_gateway_tag_join_by_reference(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, form: str
) -> None:
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    raw = outlook(subject=form.format(ref=ref), in_reply_to=ack_id, references=[ORIGINAL_ID, ack_id])
    note = await joins(intake, smtp_relay, raw, ref, "reference")
    assert note == f"reference {ref} in the subject; sender is participant of the ticket"


NON_ASCII_PREFIXES = ["回复: ", "答复: ", "转发: ", "回复：", "Réf. : ", "ΑΠ: ", "RE: AW: 回复: "]


@pytest.mark.parametrize("prefix", NON_ASCII_PREFIXES)
@pytest.mark.parametrize("encode", [b64_word, q_word], ids=["b", "q"])
async def test_encoded_localised_prefixes_join_by_reference(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, prefix: str, encode: Any
) -> None:
    """Outlook in Chinese, French, Greek writes its prefix in the subject, which then goes out
    as encoded words (Exchange: B; others: Q)."""
    ref, _ = await opened(intake, smtp_relay)
    raw = outlook(subject=encode(f"{prefix}Printer on fire [{ref}]"))
    await joins(intake, smtp_relay, raw, ref, "reference")


async def test_outlook_subject_encoded_in_two_words_splitting_the_reference(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    ref, _ = await opened(intake, smtp_relay, subject="Drucker brennt")
    text = f"AW: Drucker brennt – bitte dringend prüfen [{ref}]"
    cut = text.index(ref) + 6
    subject = q_word(text[:cut]) + "\r\n " + q_word(text[cut:])
    await joins(intake, smtp_relay, outlook(subject=subject, thread_topic="Drucker brennt"), ref, "reference")


async def test_owa_reply_to_the_acknowledgement_without_the_reference_joins_by_headers(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """Outlook on the web: the customer cleared the subject; In-Reply-To and References hold."""
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    raw = outlook(
        subject="RE: printer",
        in_reply_to=ack_id,
        references=[ORIGINAL_ID, ack_id],
        extra="X-MS-Exchange-Organization-AuthAs: Internal\r\nx-ms-exchange-messagesentrepresentingtype: 1\r\n",
    )
    note = await joins(intake, smtp_relay, raw, ref, "header")
    assert "sent by intake" in note


# -- Gmail ---------------------------------------------------------------------------------


async def test_gmail_subject_encoded_word_split_in_the_middle_of_the_reference(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    ref, _ = await opened(intake, smtp_relay, sender="Alice <alice@acme.com>", subject="Impresora en llamas")
    text = f"Re: Impresora en llamas – ¿alguna novedad? [{ref}]"
    data = text.encode()
    cut = data.index(ref.encode()) + 5
    subject = b64_word(data[:cut].decode()) + "\r\n " + b64_word(data[cut:].decode())
    raw = gmail(sender="Alice <alice@acme.com>", subject=subject)
    await joins(intake, smtp_relay, raw, ref, "reference")


async def test_gmail_split_inside_a_multibyte_character_next_to_the_reference(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """Gmail cuts B words by bytes: one word can end in the middle of a UTF-8 character."""
    ref, _ = await opened(intake, smtp_relay)
    data = f"Re: 打印机着火了 {ref}".encode()
    cut = 8  # inside the second character
    subject = (
        f"=?UTF-8?B?{base64.b64encode(data[:cut]).decode()}?=\r\n =?UTF-8?B?{base64.b64encode(data[cut:]).decode()}?="
    )
    await joins(intake, smtp_relay, gmail(sender="Alice <alice@acme.com>", subject=subject), ref, "reference")


async def test_gmail_reply_all_and_inline_forward(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    # Reply-all: support and a colleague in To/Cc, the reference kept.
    raw = gmail(
        sender="Alice Example <alice@acme.com>",
        subject=f"Re: Printer on fire [{ref}]",
        in_reply_to=ack_id,
        references=[ORIGINAL_ID, ack_id],
        to="Support <support@example.com>",
        cc="Bob <bob@acme.com>",
    )
    await joins(intake, smtp_relay, raw, ref, "reference")
    # Forward inline: "Fwd:", and Gmail keeps the forwarded message's ids in References.
    body = (
        "FYI, see below.\r\n\r\n---------- Forwarded message ---------\r\n"
        f"From: Support <support@example.com>\r\nDate: Mon, Nov 23, 2026 at 9:30 AM\r\n"
        f"Subject: Re: Printer on fire [{ref}]\r\nTo: <alice@acme.com>\r\n"
    )
    fwd = gmail(
        sender="Alice Example <alice@acme.com>",
        subject=f"Fwd: Re: Printer on fire [{ref}]",
        in_reply_to=ack_id,
        references=[ORIGINAL_ID, ack_id],
        message_id="<CAKq3=Yx9fwd+QZ@mail.gmail.com>",
        body=body,
    )
    await joins(intake, smtp_relay, fwd, ref, "reference")


async def test_a_japanese_client_writing_iso_2022_jp(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """Thunderbird, Becky! and Outlook in Japan write ISO-2022-JP (RFC 1468): 7-bit bytes with
    escape sequences, in the subject's encoded words and in the body."""

    def japanese(subject: str, body: str, message_id: str, headers: str = "") -> bytes:
        word = base64.b64encode(subject.encode("iso2022_jp")).decode()
        return (
            (
                "From: =?ISO-2022-JP?B?GyRCOzNFRBsoQiAbJEJCQE86GyhC?= <taro.yamada@acme.com>\r\n"
                f"To: support@example.com\r\nSubject: =?ISO-2022-JP?B?{word}?=\r\nMessage-ID: {message_id}\r\n"
                f"Date: Tue, 24 Nov 2026 10:00:00 +0900\r\nUser-Agent: Mozilla Thunderbird\r\n{headers}"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=ISO-2022-JP\r\n"
                "Content-Transfer-Encoding: 7bit\r\n\r\n"
            ).encode()
            + body.encode("iso2022_jp")
            + b"\r\n"
        )

    reply = await intake.send(
        japanese("プリンターが燃えています", "朝からプリンターが燃えています。", "<jp-1@acme.com>")
    )
    ref = ref_of(reply.text)
    [ack] = await smtp_relay.wait_for(1)
    assert ack.message["Subject"] == f"Re: プリンターが燃えています [{ref}]"
    assert messages(intake, ref)[0]["body"] == "朝からプリンターが燃えています。"
    follow = japanese(f"Re: プリンターが燃えています [{ref}]", "まだ燃えています。", "<jp-2@acme.com>")
    await joins(intake, smtp_relay, follow, ref, "reference")
    assert messages(intake, ref)[1]["body"] == "まだ燃えています。"


# -- Apple Mail, Thunderbird, phones ---------------------------------------------------------


async def test_apple_mail_and_thunderbird_replies(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    apple = plain(
        sender="Alice Example <alice@acme.com>",
        subject=f"Re: Printer on fire [{ref}]",
        message_id="<6F1C3A52-9B7D-4E21-A0C8-3D2E5F4A1B90@acme.com>",
        headers=(
            "X-Mailer: Apple Mail (2.3774.200.91.1.1)\r\n"
            f"In-Reply-To: {ack_id}\r\nReferences: {ORIGINAL_ID}\r\n {ack_id}\r\n"
        ),
    )
    await joins(intake, smtp_relay, apple, ref, "reference")
    thunderbird = plain(
        sender="Alice Example <alice@acme.com>",
        subject="Re: printer",  # the reference deleted by hand
        message_id="<0b6e2c4a-8f31-4d7e-9a5b-1c2d3e4f5a6b@acme.com>",
        headers=(
            "User-Agent: Mozilla Thunderbird\r\nContent-Language: en-US\r\n"
            f"References: {ORIGINAL_ID}\r\n {ack_id}\r\n"
            "<6F1C3A52-9B7D-4E21-A0C8-3D2E5F4A1B90@acme.com>\r\n".replace("\r\n<", "\r\n <")
            + "In-Reply-To: <6F1C3A52-9B7D-4E21-A0C8-3D2E5F4A1B90@acme.com>\r\n"
        ),
    )
    note = await joins(intake, smtp_relay, thunderbird, ref, "header")
    assert "participant of the ticket" in note


@pytest.mark.parametrize(
    "headers",
    [
        "In-Reply-To: {ack}\r\n",  # Samsung Email, older Android: no References
        'In-Reply-To: {ack} (Support\'s message of "Mon, 23 Nov 2026 09:30:00 +0000")\r\n',  # Emacs, Mutt
        "References: {orig},{ack}\r\n",  # comma-separated, as some webmail writes them
        "References: {ack} {orig}\r\n",  # reordered
        "In-Reply-To: {ack_bare}\r\n",  # BlackBerry: no angle brackets
    ],
    ids=["in-reply-to-only", "in-reply-to-comment", "commas", "reordered", "bare"],
)
async def test_phones_and_old_clients_that_cut_the_threading_headers(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, headers: str
) -> None:
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    raw = plain(
        sender="alice@acme.com",
        subject="Re: Printer on fire",
        message_id="<1480516232.7281.1732351212345@android.acme.com>",
        headers=headers.format(ack=ack_id, orig=ORIGINAL_ID, ack_bare=ack_id.strip("<>")),
        body="Still burning.\r\n\r\nSent from my Galaxy",
    )
    await joins(intake, smtp_relay, raw, ref, "header")


async def test_references_cut_to_the_root_and_the_last_few_still_thread(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """A long thread: clients keep the root and the nearest ids only (Outlook, Thunderbird at
    998 octets); our acknowledgement is among those cut, the root is the customer's."""
    ref, _ = await opened(intake, smtp_relay)
    middle = [f"<reply-{i}.{'x' * 40}@partner.example>" for i in range(80)]
    raw = outlook(
        subject="RE: printer",
        in_reply_to=middle[-1],
        references=[ORIGINAL_ID, *middle[-8:]],
    )
    await joins(intake, smtp_relay, raw, ref, "header")


async def test_a_client_that_drops_both_headers_and_the_reference_opens_a_new_ticket(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """Nothing says which ticket it is: only Outlook's Thread-Topic, which is not evidence of
    anything (anyone can write it). A new ticket, acknowledged."""
    ref, _ = await opened(intake, smtp_relay)
    reply = await intake.send(outlook(subject="RE: Printer on fire"))
    assert ref_of(reply.text) != ref
    await smtp_relay.wait_for(2)


# -- References typed by people, in other systems' tags --------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        "re: printer {lower}",
        "Re: printer {spaced}",
        "Re: printer [{ref}] [JIRA-12]",
        "[JIRA-12][{ref}] Re: printer",
        "Re: printer ({ref})",
        "Re: printer (ref. {ref})",
        "Re: printer - Ticket#{ref}",
        "[acme-ops] Re: printer [{ref}]",
        "Re: [acme-ops] printer {ref}",
    ],
)
async def test_references_typed_or_tagged_by_people_and_lists(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, form: str
) -> None:
    ref, _ = await opened(intake, smtp_relay)
    subject = form.format(ref=ref, lower=ref.lower(), spaced=ref.lower().replace("-", " "))
    raw = plain(sender="Alice <alice@acme.com>", subject=subject, message_id="<typed-1@acme.com>")
    await joins(intake, smtp_relay, raw, ref, "reference")


async def test_a_reference_to_no_ticket_or_with_a_wrong_check_character(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """Mistyped or unknown: a new ticket, acknowledged, the remark on it; but a reply whose
    headers name the ticket still joins it."""
    ref, ack = await opened(intake, smtp_relay)
    last = ref[-1]
    wrong = ref[:-1] + ("0" if last != "0" else "1")
    reply = await intake.send(plain(sender="alice@acme.com", subject=f"Re: [{wrong}]", message_id="<w1@acme.com>"))
    other = ref_of(reply.text)
    assert other != ref
    assert any("fails its check" in n for n in notes(intake, other))
    await smtp_relay.wait_for(2)
    ack_id = str(ack.message["Message-ID"])
    raw = plain(
        sender="alice@acme.com",
        subject=f"Re: [{wrong}]",
        message_id="<w2@acme.com>",
        headers=f"In-Reply-To: {ack_id}\r\n",
    )
    await joins(intake, smtp_relay, raw, ref, "header")
    # A well-formed reference no ticket has (another installation's, or made up).
    unknown = References().new()
    reply = await intake.send(plain(sender="alice@acme.com", subject=f"Re: [{unknown}]", message_id="<u1@acme.com>"))
    third = ref_of(reply.text)
    assert third not in (ref, other, unknown)
    assert any(f"cites {unknown}, which is not a known ticket" in n for n in notes(intake, third))
    await smtp_relay.wait_for(3)


async def test_two_references_in_one_subject_join_the_first_entitled(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    first, _ = await opened(intake, smtp_relay, subject="Printer on fire")
    second, _ = await opened(intake, smtp_relay, subject="Scanner jammed", message_id="<scanner@acme.com>")
    raw = plain(sender="alice@acme.com", subject=f"Re: [{second}] same as [{first}]", message_id="<two@acme.com>")
    await joins(intake, smtp_relay, raw, second, "reference")


# -- People around the customer --------------------------------------------------------------


async def test_a_colleague_replying_to_the_acknowledgement(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    # Same configured organisation (a subsidiary's domain under it).
    raw = outlook(
        sender="Bob Builder <bob@eu.acme.com>",
        subject=f"RE: Printer on fire [{ref}]",
        in_reply_to=ack_id,
        references=[ORIGINAL_ID, ack_id],
        message_id="<bob-1@eu.acme.com>",
    )
    note = await joins(intake, smtp_relay, raw, ref, "reference")
    assert "same organisation (acme)" in note


async def test_a_colleague_of_an_unconfigured_company(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    ref, _ = await opened(intake, smtp_relay, sender="Carol <carol@initech.example>", message_id="<c1@initech.example>")
    raw = outlook(
        sender="Dave <dave@initech.example>",
        subject=f"RE: Printer on fire [{ref}]",
        message_id="<d1@initech.example>",
    )
    note = await joins(intake, smtp_relay, raw, ref, "reference")
    assert "same domain as the requester (initech.example)" in note


async def test_the_customers_personal_address_gets_a_ticket_of_its_own(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """alice.example@gmail.com may be anyone: refused, noted on both tickets, acknowledged."""
    ref, _ = await opened(intake, smtp_relay)
    reply = await intake.send(gmail(subject=f"Re: Printer on fire [{ref}]"))
    other = ref_of(reply.text)
    assert other != ref
    assert any("alice.example@gmail.com cited" in n for n in notes(intake, ref))
    acks = await smtp_relay.wait_for(2)
    assert ref not in acks[1].content.decode()


async def test_the_customers_personal_address_replying_to_the_forwarded_acknowledgement(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """The customer forwarded our acknowledgement to her Gmail and answers from there: its
    References carry our Message-ID, which only the ticket's people have seen."""
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    raw = gmail(
        subject=f"Re: Fw: Printer on fire [{ref}]",
        in_reply_to="<fw-1@acme.com>",
        references=[ack_id, "<fw-1@acme.com>"],
    )
    note = await joins(intake, smtp_relay, raw, ref, "header")
    assert note == f"replies to <{ack_id.strip('<>')}>, sent by intake for {ref}"
    assert not any("not entitled" in n for n in notes(intake, ref)), notes(intake, ref)


async def test_the_customer_forwards_our_acknowledgement_to_her_vendor_who_writes(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    ref, ack = await opened(intake, smtp_relay)
    ack_id = str(ack.message["Message-ID"])
    # The customer's forward (Outlook: no In-Reply-To, Thread-Index only) to the vendor; the
    # vendor replies to it, adding support, the reference in the subject.
    raw = outlook(
        sender="Victor Vendor <victor@printers.example>",
        subject=f"RE: FW: Printer on fire [{ref}]",
        in_reply_to="<fw-vendor@acme.com>",
        references=["<fw-vendor@acme.com>"],
        message_id="<v2@printers.example>",
    )
    reply = await intake.send(raw)
    other = ref_of(reply.text)
    assert other != ref  # a reference alone is no entitlement
    await smtp_relay.wait_for(2)
    # Gmail as the vendor's client keeps the forwarded acknowledgement's id in References.
    raw = gmail(
        sender="Victor Vendor <victor@printers.example>",
        subject=f"Re: Fwd: Printer on fire [{ref}]",
        in_reply_to="<fw-vendor-2@acme.com>",
        references=[ORIGINAL_ID, ack_id, "<fw-vendor-2@acme.com>"],
        message_id="<CAv3ndor@mail.gmail.com>",
    )
    await joins(intake, smtp_relay, raw, ref, "header")
    # Its first message was refused (noted, with where it went); this one was not.
    assert notes(intake, ref) == [
        f"victor@printers.example cited {ref} but is not entitled to it; it went to {other} instead"
    ]


async def test_a_third_party_in_cc_replying_all_is_not_yet_entitled(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn
) -> None:
    """The customer Cc'd her printer vendor on her report; the vendor answers all. Entitlement
    is by sender only (a Cc'd address is no participant, and the customer's Message-ID is no
    secret): the vendor gets a ticket of their own and the customer's ticket is told where it
    went. Reported to the lead as a product decision, not changed here."""
    ref, _ = await opened(intake, smtp_relay, cc="Victor Vendor <victor@printers.example>")
    raw = outlook(
        sender="Victor Vendor <victor@printers.example>",
        subject="RE: Printer on fire",
        in_reply_to=ORIGINAL_ID,
        references=[ORIGINAL_ID],
        to='"Example, Alice" <alice@acme.com>',
        cc="Support <support@example.com>",
        message_id="<v1@printers.example>",
    )
    reply = await intake.send(raw)
    other = ref_of(reply.text)
    assert other != ref and len(messages(intake, ref)) == 1
    assert notes(intake, ref) == [
        f"victor@printers.example replied to a message of {ref} but is not entitled; it went to {other} instead"
    ]
    acks = await smtp_relay.wait_for(2)
    assert acks[1].rcpt_tos == ("victor@printers.example",) and ref not in acks[1].content.decode()


@pytest.mark.parametrize(
    ("list_from", "joins_ticket"),
    [
        ('"Alice Example via acme-ops" <acme-ops@lists.acme.com>', True),  # Mailman's DMARC munging
        ("'Alice Example' via acme-ops <acme-ops@googlegroups.com>", False),  # Google Groups
    ],
    ids=["mailman-company-list", "google-group"],
)
async def test_a_follow_up_through_the_customers_mailing_list(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, list_from: str, joins_ticket: bool
) -> None:
    """support@ is a member of the customer's list, whose software rewrote From (DMARC) and the
    subject ("[acme-ops]"). The list's address is the author as the border reads it: on the
    customer's own domain it is a colleague; at a public list host it is anyone. List mail is
    never acknowledged."""
    ref, _ = await opened(intake, smtp_relay)
    raw = plain(
        sender=list_from,
        subject=f"Re: [acme-ops] Printer on fire [{ref}]",
        message_id="<list-1@acme.com>",
        headers=(
            "Reply-To: Alice Example <alice@acme.com>\r\n"
            "List-Id: Acme operations <acme-ops.lists.acme.com>\r\n"
            "List-Post: <mailto:acme-ops@lists.acme.com>\r\n"
            "Precedence: list\r\n"
            f"In-Reply-To: {ORIGINAL_ID}\r\nReferences: {ORIGINAL_ID}\r\n"
        ),
    )
    reply = await intake.send(raw)
    assert (ref_of(reply.text) == ref) is joins_ticket
    if joins_ticket:
        assert messages(intake, ref)[-1]["route"] == "reference"
    await no_more_mail(smtp_relay, 1)


async def test_a_reply_to_the_irt_alert(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    reply = await intake.send(
        mail(subject="Possible data breach", body="We saw unauthorized access to our admin account.")
    )
    ref = ref_of(reply.text)
    msgs = await smtp_relay.wait_for(2)
    alert = next(m for m in msgs if m.rcpt_tos == ("irt-lead@example.com",))
    alert_id = str(alert.message["Message-ID"])
    raw = outlook(
        sender="IRT Lead <irt-lead@example.com>",
        subject="RE: " + str(alert.message["Subject"]),
        in_reply_to=alert_id,
        references=[alert_id],
        message_id="<irt-1@example.com>",
        body="On it. Rotating credentials now.",
    )
    note = await joins(intake, smtp_relay, raw, ref, "reference")  # the lead is one of our own
    assert "one of our own" in note, note
    assert not any("irt-lead@example.com cited" in n for n in notes(intake, ref)), notes(intake, ref)


async def test_the_irt_lead_forwarding_the_alert_by_hand(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """The lead forwards the alert to support from their own client: a new Message-ID, no
    References (Outlook's forward), the reference in the subject. It joins the incident's
    ticket as a note to staff: no new Severity 1 ticket, no second page, no acknowledgement,
    and the lead is not made one of the customer's people."""
    ref = ref_of((await intake.send(mail(subject="Possible data breach", body="We saw unauthorized access."))).text)
    alert = next(m for m in await smtp_relay.wait_for(2) if m.rcpt_tos == ("irt-lead@example.com",))
    raw = outlook(
        sender="IRT Lead <irt-lead@example.com>",
        subject="FW: " + str(alert.message["Subject"]),
        message_id="<irt-fw-1@example.com>",
        body="Adding support. Unauthorized access confirmed; customer data may be exposed.\n\n"
        + alert.message.get_content(),
    )
    note = await joins(intake, smtp_relay, raw, ref, "reference")
    assert "one of our own" in note, note
    assert intake.detail(ref)["participants"] == ["alice@acme.com"]
    assert len(intake.tickets()) == 1


async def test_our_own_people_opening_a_ticket_get_no_acknowledgement_and_the_lead_no_page_of_his_own(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """A customer's breach report reached the IRT lead directly; he forwards it to support (no
    reference, no known ids): a Severity 1 ticket, but no acknowledgement to him and no page
    about his own mail. Triage forwarding one: no acknowledgement to triage, the lead paged."""
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra='[triage]\nemail = "triage@example.com"\n')
    async with running_intake(settings) as h:
        fw = outlook(
            sender="IRT Lead <irt-lead@example.com>",
            subject="FW: urgent - our admin account",
            message_id="<irt-fw-2@example.com>",
            body="Forwarding for the record.\n\nFrom: Bob <bob@globex.com>\nWe were hacked last night.",
        )
        lead = ref_of((await h.send(fw, mail_from="irt-lead@example.com")).text)
        await h.outbox_settled()
        detail = h.detail(lead)
        assert (detail["severity"], detail["security"]) == (1, True)
        assert any("from the IRT lead's address: not paged" in n for n in notes(h, lead)), notes(h, lead)
        assert any("sent by one of our own people" in n for n in notes(h, lead)), notes(h, lead)
        # Only the triage notice of the new ticket went out.
        assert [m.rcpt_tos for m in await smtp_relay.wait_for(1)] == [("triage@example.com",)]
        tr = outlook(
            sender="Tess Triage <triage@example.com>",
            subject="FW: ransomware at Initech",
            message_id="<tr-fw-1@example.com>",
            body="Forwarding: Initech says ransomware encrypted their file server.",
        )
        ref = ref_of((await h.send(tr, mail_from="triage@example.com")).text)
        assert ref != lead
        await h.outbox_settled()
        later = [m.rcpt_tos for m in (await smtp_relay.wait_for(3))[1:]]
        assert sorted(later) == [("irt-lead@example.com",), ("triage@example.com",)], later


async def test_mail_from_the_irt_lead_s_address_does_not_keep_the_customer_s_report_from_paging(
    intake, smtp_relay: RelayStandIn
) -> None:  # type: ignore[no-untyped-def]
    """Anyone can write the lead's address into From and cite a ticket's reference with breach
    words: that mail pages no one, but the customer's own report after it still does."""
    ref = ref_of((await intake.send(mail(subject="Export is slow"))).text)
    await smtp_relay.wait_for(1)
    forged = mail(sender="IRT Lead <irt-lead@example.com>", subject=f"Re: [{ref}]", body="We were hacked.")
    assert ref_of((await intake.send(forged, mail_from="x@attacker.example")).text) == ref
    await intake.outbox_settled()
    assert [m.rcpt_tos for m in smtp_relay.messages] == [("alice@acme.com",)]
    report = mail(subject=f"Re: Export is slow [{ref}]", body="Ransomware encrypted our file server overnight.")
    assert ref_of((await intake.send(report)).text) == ref
    await intake.outbox_settled()
    later = [m.rcpt_tos for m in (await smtp_relay.wait_for(2))[1:]]
    assert later == [("irt-lead@example.com",)], later


async def test_a_reply_to_the_triage_announcement(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """A support agent answers the new-ticket notice from their own mailbox (not a configured
    staff address), the reference cut from the subject by their client."""
    settings = settings_for(tmp_path, relay_port=smtp_relay.port, extra='[triage]\nemail = "triage@example.com"\n')
    async with running_intake(settings) as h:
        ref = ref_of((await h.send(mail(subject="Printer on fire"))).text)
        msgs = await smtp_relay.wait_for(2)
        notice = next(m for m in msgs if m.rcpt_tos == ("triage@example.com",))
        notice_id = str(notice.message["Message-ID"])
        raw = outlook(
            sender="Tess Triage <tess@example.com>",
            subject="RE: new ticket",
            in_reply_to=notice_id,
            references=[notice_id],
            message_id="<tess-1@example.com>",
            body="I'll take this one.",
        )
        note = await joins(h, smtp_relay, raw, ref, "header")
        assert "sent by intake" in note


TRIAGE_AND_CHAIN = (
    '[triage]\nemail = "triage@example.com"\n'
    '[[escalation.chain]]\nname = "Tier I"\n[[escalation.chain]]\nname = "Tier II"\ncontact = "tier2@example.com"\n'
)


async def triage_thread(h: Harness, relay: RelayStandIn, body: str, message_id: str) -> tuple[str, str]:
    """Alice's ticket, and Tess (support, not a configured staff address) answering its triage
    notice: (the reference, the notice's Message-ID)."""
    ref = ref_of((await h.send(mail(subject="Export is slow"))).text)
    msgs = await relay.wait_for(2)
    note_id = str(next(m for m in msgs if m.rcpt_tos == ("triage@example.com",)).message["Message-ID"])
    assert note_id.startswith("<staff.")
    tess = outlook(
        sender="Tess Triage <tess@example.com>",
        subject="RE: new ticket",
        in_reply_to=note_id,
        references=[note_id],
        message_id=message_id,
        body=body,
    )
    assert (await h.send(tess, mail_from="tess@example.com")).code == 250
    return ref, note_id


async def test_a_reply_to_a_staff_note_is_answered_with_no_customer_text(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """A colleague (not a configured staff address) answers the triage notice with words that
    raise the ticket to Severity 1, and asks to escalate: the ticket is raised, the lead
    alerted, the step taken, but the colleague gets neither the customer's security notice
    nor an escalation reply, and the alert does not claim that the customer was told."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=TRIAGE_AND_CHAIN)) as h:
        ref, note_id = await triage_thread(h, smtp_relay, "I'll take this one.", "<tess-1@example.com>")
        # Her next message answers her own (its id is no staff note's; the note's stays in
        # References): still one of our own people, still no customer text.
        raw = outlook(
            sender="Tess Triage <tess@example.com>",
            subject=f"RE: new ticket [{ref}]",
            in_reply_to="<tess-1@example.com>",
            references=[note_id, "<tess-1@example.com>"],
            message_id="<tess-2@example.com>",
            body="Careful: I think their admin account was compromised. Please escalate this.",
        )
        assert (await h.send(raw, mail_from="tess@example.com")).code == 250
        await h.outbox_settled()
        await asyncio.sleep(0.3)
        later = {m.rcpt_tos[0]: " ".join(m.message.get_content().split()) for m in smtp_relay.messages[2:]}
        assert sorted(later) == ["irt-lead@example.com", "tier2@example.com"], sorted(later)
        text = later["irt-lead@example.com"]
        assert "The customer has not been told that the IRT lead will reach out (raised by one of our own" in text
        # Nor is her request called the customer's, on the ticket or to the next step's contact.
        assert (
            "One of our own people (not the customer), in a note to staff, asked for escalation"
            in later["tier2@example.com"]
        )
        assert any("escalated on request of one of our own people" in n for n in notes(h, ref)), notes(h, ref)
        assert not any("customer's request" in n for n in notes(h, ref))
        detail = h.detail(ref)
        assert (detail["severity"], detail["security"], detail["escalation_step"]) == (1, True, 1)
        assert detail["participants"] == ["alice@acme.com"]  # our own people answering are no customers


async def test_the_customer_answering_in_a_thread_a_staff_note_began_is_still_the_customer(
    tmp_path: Path, smtp_relay: RelayStandIn
) -> None:
    """A colleague answers the triage notice to the customer, support in Cc; the customer's
    reply-all carries the note's id in References. She is the ticket's customer all the same:
    told that the IRT lead will reach out, answered when she asks to escalate."""
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=TRIAGE_AND_CHAIN)) as h:
        ref, note_id = await triage_thread(
            h, smtp_relay, "Alice, could you send the export log?", "<tess-3@example.com>"
        )
        alice = outlook(
            sender="Alice Example <alice@acme.com>",
            subject=f"RE: new ticket [{ref}]",
            in_reply_to="<tess-3@example.com>",
            references=[note_id, "<tess-3@example.com>"],
            message_id="<alice-3@acme.com>",
            body="We now found ransomware on the export server. Please escalate this.",
        )
        assert (await h.send(alice, mail_from="alice@acme.com")).code == 250
        await h.outbox_settled()
        later = (await smtp_relay.wait_for(6))[2:]
        [contact] = [m for m in later if m.rcpt_tos == ("tier2@example.com",)]
        assert "The customer asked for escalation" in " ".join(contact.message.get_content().split())
        assert any("escalated on the customer's request" in n for n in notes(h, ref)), notes(h, ref)
        to_alice = sorted(
            " ".join(m.message.get_content().split())[:60] for m in later if m.rcpt_tos == ("alice@acme.com",)
        )
        assert len(to_alice) == 2 and any("escalate" in t for t in to_alice), to_alice
        [alert] = [m for m in later if m.rcpt_tos == ("irt-lead@example.com",)]
        assert "The customer was told that the IRT lead will reach out" in " ".join(alert.message.get_content().split())


async def test_a_reply_to_the_escalation_note(tmp_path: Path, smtp_relay: RelayStandIn) -> None:
    """Tier II answers the escalation note from a mailbox that is not a configured staff address."""
    extra = (
        '[[escalation.chain]]\nname = "Tier I"\n[[escalation.chain]]\nname = "Tier II"\ncontact = "tier2@example.com"\n'
    )
    async with running_intake(settings_for(tmp_path, relay_port=smtp_relay.port, extra=extra)) as h:
        ref = ref_of((await h.send(mail(subject="Sync fails"))).text)
        await smtp_relay.wait_for(1)
        await h.send(mail(subject=f"Re: Sync fails [{ref}]", body="Still broken. Please escalate this."))
        msgs = await smtp_relay.wait_for(3)
        note = next(m for m in msgs if m.rcpt_tos == ("tier2@example.com",))
        note_id = str(note.message["Message-ID"])
        raw = outlook(
            sender="Tier Two <tier2@example.com>",
            subject="RE: escalation",
            in_reply_to=note_id,
            references=[note_id],
            message_id="<t2-1@example.com>",
            body="Looking at it.",
        )
        assert "sent by intake" in await joins(h, smtp_relay, raw, ref, "header")


# -- Automatic forwards ----------------------------------------------------------------------


async def test_an_auto_forward_from_a_colleagues_mailbox(intake, smtp_relay: RelayStandIn) -> None:  # type: ignore[no-untyped-def]
    """Exchange inbox rule "forward to support": a new message from the colleague's mailbox,
    marked auto-generated. It joins by the reference; nothing is sent back (RFC 3834)."""
    ref, _ = await opened(intake, smtp_relay)
    raw = outlook(
        sender="Bob Builder <bob@acme.com>",
        subject=f"FW: RE: Printer on fire [{ref}]",
        message_id="<bob-rule-1@acme.com>",
        extra=(
            "Auto-Submitted: auto-generated\r\n"
            "X-MS-Exchange-Inbox-Rules-Loop: bob@acme.com\r\n"
            "X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent\r\n"
        ),
    )
    await joins(intake, smtp_relay, raw, ref, "reference")


@pytest.mark.parametrize(
    "prefix",
    [
        "FW: ",
        "WG: ",
        "TR: ",
        "RV: ",
        "I: ",  # Outlook in Italian forwards with "I:", replies with "R:" or "RIF:"
        "R: ",
        "RIF: ",
        "PD: ",  # Polish
        "VL: ",  # Finnish
        "Doorst: ",  # Dutch
        "İlt: ",  # Turkish
        "ΠΡΘ: ",  # Greek
        "Réf. : ",  # Lotus Notes in French
        "转发: ",
        "轉寄: ",
        "回复：",  # a fullwidth colon, as Chinese clients write it
        "[EXTERNAL] FW: ",  # a gateway's tag before the prefix
        "*** SPAM *** WG: ",
    ],
)
async def test_a_person_forwarding_a_bounce_is_answered(  # type: ignore[no-untyped-def]
    intake, smtp_relay: RelayStandIn, prefix: str
) -> None:
    """A colleague forwards a delivery failure she got to support, asking why: a person wrote
    it, in whatever language her Outlook speaks, so it is acknowledged and not taken for a
    bounce (whose quoted Message-IDs would mark our own mail undeliverable)."""
    subject = f"{prefix}Undeliverable: Invoice 4471"
    raw = outlook(
        sender="Bob Builder <bob@acme.com>",
        subject=b64_word(subject) if not subject.isascii() else subject,
        message_id="<bob-fw-ndr@acme.com>",
        body=(
            "Why does our mail to you bounce?\r\n\r\n"
            "Delivery has failed to these recipients or groups:\r\n"
            "billing@example.com\r\nThe recipient's mailbox is full and can't accept messages now."
        ),
    )
    reply = await intake.send(raw)
    ref = ref_of(reply.text)
    assert intake.detail(ref)["messages"][0]["automation"] is None
    [ack] = await smtp_relay.wait_for(1)
    assert ack.rcpt_tos == ("bob@acme.com",)
    if not prefix.startswith(("[", "*")):  # the acknowledgement's subject has one "Re:" of ours
        assert ack.message["Subject"] == f"Re: Undeliverable: Invoice 4471 [{ref}]"
