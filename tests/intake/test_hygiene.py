"""Tests of intake.hygiene: automation detection, bounced Message-IDs, Authentication-Results.

Hand-built messages pin each rule (a hit and a near miss); the real bounces and vacation
replies of flufl.bounce (``../shared/corpus/flufl-bounce/``) check that the rules hold on
mail nobody here wrote.
"""

from __future__ import annotations

import collections
import email
import re
import time
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32
from email.utils import parseaddr
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intake.hygiene import (
    LOOP_HEADER,
    AuthVerdict,
    Automation,
    AutomationKind,
    authentication,
    bounced_message_ids,
    delivery_failed,
    detect_automation,
)
from intake.model import Channel, InboundMessage
from tests.corpus import CORPUS, corpus_files, needs_corpus

FLUFL = CORPUS / "flufl-bounce"
FLUFL_FILES = sorted(p.name for p in corpus_files() if p.parent.name == "flufl-bounce")

BOUNCE = AutomationKind.BOUNCE
AUTO_REPLY = AutomationKind.AUTO_REPLY


def msg(**kw: Any) -> InboundMessage:
    """A plain customer email; keyword arguments override any field."""
    fields: dict[str, Any] = {
        "channel": Channel.EMAIL,
        "sender": "alice@customer.example",
        "sender_name": "Alice Example",
        "envelope_sender": "alice@customer.example",
        "subject": "Re: [SUP-7K3M-9QX4] Dashboard down",
        "body": "Hi, the dashboard is still down for all of our users. Can you help?\n\nAlice",
        "message_id": "abc123@customer.example",
    }
    fields.update(kw)
    return InboundMessage(**fields)


# -- building an InboundMessage from real bytes, as the email adapter would ---------------------


def _decoded(value: Any) -> str:
    try:
        return str(make_header(decode_header(str(value))))
    except (LookupError, ValueError, UnicodeError):  # unknown charset, broken encoded word
        return str(value)


def _plain_text(top: Message) -> str:
    """Text of the text/* parts outside attached messages (HTML crudely stripped)."""
    texts: list[str] = []
    stack = [top]
    while stack:
        part = stack.pop()
        ctype = part.get_content_type()
        if ctype.startswith("message/"):
            continue
        if part.is_multipart():
            payload = part.get_payload()
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
        elif ctype in ("text/plain", "text/html"):
            data = part.get_payload(decode=True)
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else ""
            texts.append(re.sub(r"<[^>]*>", " ", text) if ctype == "text/html" else text)
    return "\n".join(texts)


def from_bytes(raw: bytes) -> InboundMessage:
    """The envelope sender comes from Return-Path (what the delivering MTA recorded), if any."""
    parsed = email.message_from_bytes(raw, policy=compat32)
    headers: dict[str, list[str]] = {}
    for name, value in parsed.items():
        headers.setdefault(name.lower(), []).append(_decoded(value))
    name, address = parseaddr(_decoded(parsed.get("from", "")))
    return_path = parsed.get("return-path")
    return InboundMessage(
        channel=Channel.EMAIL,
        sender=address.lower(),
        sender_name=name,
        envelope_sender=None if return_path is None else str(return_path).strip().strip("<>").strip(),
        subject=" ".join(_decoded(parsed.get("subject", "")).split()),
        body=_plain_text(parsed),
        message_id=str(parsed.get("message-id", "")).strip().strip("<>"),
        headers={k: "\n".join(v) for k, v in headers.items()},
        raw=raw,
    )


def corpus(name: str) -> InboundMessage:
    return from_bytes((FLUFL / name).read_bytes())


def kind(message: InboundMessage, **kw: Any) -> AutomationKind | None:
    found = detect_automation(message, **kw)
    return found.kind if found else None


# -- people, not machines ----------------------------------------------------------------------


def test_a_customer_reply_is_not_automated() -> None:
    assert detect_automation(msg()) is None


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("Is this an automatic reply?", "I got a message from you, is this an automatic reply? Out of office?"),
        ("Re: Automatic reply: Re: Dashboard down", "Your auto-reply said to write again. Still broken."),
        ("Re: Out of office", "Sorry, I was out of office. The export still fails."),
        ("Out of office replies are broken in your product", "They never get sent."),
        ("Fwd: Undelivered Mail Returned to Sender", "We got this bounce when writing to you: user unknown"),
        ("Delivery failure", "Our parcels could not be delivered to the warehouse since Monday."),
        ("Mail error in the invoice module", "The invoice mail to the following customers fails."),
        ("Question about noreply addresses and bounces", "Do you send from a no-reply address?"),
    ],
)
def test_people_writing_about_automation_are_not_automated(subject: str, body: str) -> None:
    assert detect_automation(msg(subject=subject, body=body)) is None


def test_a_chat_message_is_not_automated() -> None:
    chat = InboundMessage(channel=Channel.SLACK, sender="U024BE7LH", body="Out of office? No, it is down!")
    assert detect_automation(chat) is None
    # Not even when its words are a bounce's, or it came with mail-like headers attached.
    pasted = InboundMessage(
        channel=Channel.SLACK, sender="mailer-daemon", subject="Undelivered Mail Returned to Sender",
        body="Delivery to the following recipient failed permanently", headers={"auto-submitted": "auto-replied"},
    )  # fmt: skip
    assert detect_automation(pasted) is None


def test_unknown_envelope_is_not_a_null_reverse_path() -> None:
    assert detect_automation(msg(envelope_sender=None)) is None


# -- our own loop ------------------------------------------------------------------------------


def test_loop_marker_without_a_token_is_our_own_loop() -> None:
    found = detect_automation(msg(headers={LOOP_HEADER: "anything"}))
    assert found is not None and found.kind is AutomationKind.OWN_LOOP
    assert LOOP_HEADER in found.reason


def test_loop_marker_with_our_token_is_our_own_loop_whatever_the_case() -> None:
    message = msg(headers={"x-intake-LOOP": "other-install\nTok-42"})
    assert kind(message, loop_token="tok-42") is AutomationKind.OWN_LOOP


def test_another_installations_marker_is_not_our_loop() -> None:
    assert detect_automation(msg(headers={LOOP_HEADER: "tok-99"}), loop_token="tok-42") is None
    # ... but its Auto-Submitted header still keeps us from answering it.
    other = msg(headers={LOOP_HEADER: "tok-99", "Auto-Submitted": "auto-replied"})
    assert kind(other, loop_token="tok-42") is AUTO_REPLY


def test_no_loop_marker_no_loop() -> None:
    assert detect_automation(msg(), loop_token="tok-42") is None


def test_own_loop_wins_over_everything() -> None:
    message = msg(
        sender="mailer-daemon@relay.example",
        envelope_sender="",
        headers={LOOP_HEADER: "t", "Content-Type": "multipart/report; report-type=delivery-status"},
    )
    assert kind(message, loop_token="t") is AutomationKind.OWN_LOOP


# -- bounces -----------------------------------------------------------------------------------

DSN_RAW = (
    b"From: postmaster@relay.example\r\n"
    b"To: support@ours.example\r\n"
    b"Subject: Report\r\n"
    b"Content-Type: MULTIPART/REPORT; BOUNDARY=b1\r\n"
    b"\r\n"
    b"--b1\r\nContent-Type: text/plain\r\n\r\nThe message could not be delivered.\r\n"
    b"--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
    b"Reporting-MTA: dns; relay.example\r\n\r\nFinal-Recipient: rfc822; bob@x.example\r\n"
    b"Action: failed\r\nStatus: 5.1.1\r\n"
    b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: support@ours.example\r\nMessage-ID: <ack-1@ours.example>\r\nSubject: x\r\n\r\nhello\r\n"
    b"--b1--\r\n"
)


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/report; report-type=delivery-status; boundary=x",
        'Multipart/Report; boundary="x"; REPORT-TYPE="Delivery-Status"',
        "multipart/mixed; report-type=delivery-status; boundary=x",  # Exchange, half right
    ],
)
def test_delivery_status_content_type_is_a_bounce(content_type: str) -> None:
    found = detect_automation(msg(headers={"Content-Type": content_type}))
    assert found is not None and found.kind is BOUNCE
    assert "report-type=delivery-status" in found.reason


def test_a_report_without_report_type_is_judged_by_its_parts() -> None:
    message = msg(
        sender="relay@relay.example",
        subject="Report",
        headers={"Content-Type": "MULTIPART/REPORT; BOUNDARY=b1"},
        raw=DSN_RAW,
    )
    found = detect_automation(message)
    assert found is not None and found.kind is BOUNCE
    assert "message/delivery-status part" in found.reason


def test_a_mixed_message_with_a_delivery_status_part_is_a_bounce() -> None:
    raw = DSN_RAW.replace(b"MULTIPART/REPORT", b"multipart/mixed")
    message = msg(sender="relay@relay.example", headers={"Content-Type": "multipart/mixed; boundary=b1"}, raw=raw)
    assert kind(message) is BOUNCE


@pytest.mark.parametrize(
    "written", [b"CONTENT-TYPE: Message/Delivery-Status", b"content-type:\tmessage/DELIVERY-status"]
)
def test_the_delivery_status_part_is_found_in_any_case(written: bytes) -> None:
    raw = DSN_RAW.replace(b"MULTIPART/REPORT", b"multipart/mixed").replace(
        b"Content-Type: message/delivery-status", written
    )
    message = msg(sender="relay@relay.example", headers={"Content-Type": "multipart/mixed; boundary=b1"}, raw=raw)
    assert kind(message) is BOUNCE


def test_the_delivery_status_part_is_found_below_other_part_headers_and_a_quoted_boundary() -> None:
    raw = DSN_RAW.replace(b"MULTIPART/REPORT; BOUNDARY=b1", b'multipart/mixed; boundary="b 1"').replace(
        b"--b1", b"--b 1"
    )
    raw = raw.replace(
        b"Content-Type: message/delivery-status",
        b"Content-Description: Delivery report\r\nContent-Transfer-Encoding: 7bit\r\n"
        b"Content-Type: message/delivery-status",
    )
    message = msg(sender="relay@relay.example", headers={"Content-Type": 'multipart/mixed; boundary="b 1"'}, raw=raw)
    assert kind(message) is BOUNCE


def test_a_delivery_status_line_in_a_text_part_is_not_a_part() -> None:
    raw = (
        b"From: alice@customer.example\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\nOur MTA logs say:\r\n"
        b"Content-Type: message/delivery-status\r\nwhat does it mean?\r\n--b1--\r\n"
    )
    message = msg(subject="Question", headers={"Content-Type": "multipart/mixed; boundary=b1"}, raw=raw)
    assert detect_automation(message) is None


def test_a_forwarded_dsn_inside_a_customer_message_is_not_a_bounce() -> None:
    inner = DSN_RAW.replace(b"\r\n", b"\n")
    raw = (
        b"From: alice@customer.example\nSubject: Fwd: bounce\n"
        b"Content-Type: multipart/mixed; boundary=outer\n\n"
        b"--outer\nContent-Type: text/plain\n\nWe got this when writing to you.\n"
        b"--outer\nContent-Type: message/rfc822\n\n" + inner + b"\n--outer--\n"
    )
    message = msg(subject="Fwd: bounce", headers={"Content-Type": "multipart/mixed; boundary=outer"}, raw=raw)
    assert detect_automation(message) is None


@pytest.mark.parametrize(
    ("sender", "name", "envelope"),
    [
        ("mailer-daemon@mx.example", "", "mailer-daemon@mx.example"),
        ("MAILER-DAEMON@MX.EXAMPLE", "", None),
        ("mailer_daemon@mx.example", "", None),
        ("postmaster@mx.example", "System Administrator", None),
        ("mail.delivery.system@mx.example", "", None),
        ("mdaemon@mx.example", "", None),
        ("relay@mx.example", "Mail Delivery Subsystem", None),
        ("", "Mail Delivery System", None),
        ("scanner@mx.example", "", "MAILER-DAEMON"),  # sendmail's Return-Path for <>
        ("scanner@mx.example", "", "prvs=1234abcd=postmaster@mx.example"),  # BATV-signed
    ],
)
def test_delivery_daemons_send_bounces(sender: str, name: str, envelope: str | None) -> None:
    message = msg(sender=sender, sender_name=name, envelope_sender=envelope, subject="Hi", body="x")
    found = detect_automation(message)
    assert found is not None and found.kind is BOUNCE
    assert "sender" in found.reason


@pytest.mark.parametrize("sender", ["daemon@mx.example", "post.master.jones@example.com", "mailer@example.com"])
def test_lookalike_daemon_names_are_people(sender: str) -> None:
    assert detect_automation(msg(sender=sender, envelope_sender=sender)) is None


@pytest.mark.parametrize(
    "subject",
    [
        "Undelivered Mail Returned to Sender",
        "Undeliverable: Re: [SUP-7K3M-9QX4] Dashboard down",
        "Delivery Status Notification (Failure)",
        "failure notice",
        "Returned mail: see transcript for details",
        "Mail delivery failed: returning message to sender",
        "Warning: message 14jRTi-0007jE-00 delayed 24 hours",
    ],
)
def test_null_reverse_path_with_a_bounce_subject_is_a_bounce(subject: str) -> None:
    found = detect_automation(msg(sender="relay@mx.example", envelope_sender="", subject=subject, body="x"))
    assert found is not None and found.kind is BOUNCE
    assert found.reason.startswith("null reverse-path (MAIL FROM:<>)")


def test_bounce_subject_alone_is_not_enough() -> None:
    message = msg(subject="Undelivered Mail Returned to Sender", body="Please call me back.")
    assert detect_automation(message) is None


def test_bounce_subject_with_delivery_software_wording_is_a_bounce() -> None:
    body = "Your message could not be delivered to the following recipients:\n\nbob@x.example\n"
    found = detect_automation(msg(sender="av-gateway@mx.example", subject="Delivery failure", body=body))
    assert found is not None and found.kind is BOUNCE
    assert "following recipient" in found.reason


def test_null_reverse_path_with_bounce_wording_in_the_body_is_a_bounce() -> None:
    message = msg(envelope_sender="", subject="(no subject)", body="550 5.1.1 <bob@x.example>: user unknown")
    assert kind(message) is BOUNCE


def test_exim_failed_recipients_header_is_a_bounce() -> None:
    found = detect_automation(msg(headers={"X-Failed-Recipients": "bob@x.example"}))
    assert found == Automation(BOUNCE, "X-Failed-Recipients: bob@x.example")


def test_bounce_wins_over_auto_submitted() -> None:
    message = msg(sender="mailer-daemon@mx.example", headers={"Auto-Submitted": "auto-replied"})
    assert kind(message) is BOUNCE


# -- auto-replies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["auto-replied", "auto-generated", "Auto-Replied (vacation)", "auto-notified; owner-email=x@y.example"]
)
def test_auto_submitted_other_than_no_is_an_auto_reply(value: str) -> None:
    found = detect_automation(msg(headers={"Auto-Submitted": value}))
    assert found == Automation(AUTO_REPLY, f"Auto-Submitted: {value}")


@pytest.mark.parametrize("value", ["no", "No", "no (sent by a person)", ""])
def test_auto_submitted_no_is_a_person(value: str) -> None:
    assert detect_automation(msg(headers={"Auto-Submitted": value})) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Autoreply", "yes"), ("X-AUTORESPOND", "Vacation autoresponder"), ("X-AutoGenerated", "Reply")],
)
def test_autoreply_headers(name: str, value: str) -> None:
    found = detect_automation(msg(headers={name: value}))
    assert found is not None and found.kind is AUTO_REPLY
    assert value in found.reason


def test_autoreply_header_saying_no_is_a_person() -> None:
    assert detect_automation(msg(headers={"X-Autoreply": "no"})) is None


@pytest.mark.parametrize("value", ["All", "OOF", "DR, OOF", "AutoReply", "DR, RN, NRN, OOF, AutoReply"])
def test_auto_response_suppress_forbids_an_acknowledgement(value: str) -> None:
    # The sender asks for no automatic answer; our acknowledgement would be one.
    found = detect_automation(msg(headers={"X-Auto-Response-Suppress": value}))
    assert found is not None and found.kind is AUTO_REPLY
    assert "no automatic replies" in found.reason


@pytest.mark.parametrize("value", ["None", "DR, NDR", "RN, NRN"])
def test_auto_response_suppress_of_receipts_only_allows_an_acknowledgement(value: str) -> None:
    assert detect_automation(msg(headers={"X-Auto-Response-Suppress": value})) is None


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office",
        "Out of Office: Re: [SUP-7K3M-9QX4] Dashboard down",
        "Out of Office AutoReply: Dashboard down",
        "Automatic reply: Dashboard down",
        "AUTOREPLY: Dashboard down",
        "Auto reply",
        "Auto-Reply: Dashboard down",
        "Respuesta automática: Dashboard down",
        "Abwesenheitsnotiz: Dashboard down",
        "Réponse automatique : Dashboard down",
        "Jane Doe is out of the office.",
    ],
)
def test_auto_reply_subjects(subject: str) -> None:
    found = detect_automation(msg(subject=subject, body="I am away until Monday."))
    assert found is not None and found.kind is AUTO_REPLY
    assert found.reason.startswith("subject ")


def test_precedence_auto_reply_is_an_auto_reply() -> None:
    assert detect_automation(msg(headers={"Precedence": "auto_reply"})) == Automation(
        AUTO_REPLY, "Precedence: auto_reply"
    )


def test_read_receipt_is_an_auto_reply_not_a_bounce() -> None:
    message = msg(headers={"Content-Type": "multipart/report; report-type=disposition-notification; boundary=x"})
    found = detect_automation(message)
    assert found is not None and found.kind is AUTO_REPLY
    assert "read receipt" in found.reason


# -- lists and bulk ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bulk", AutomationKind.BULK),
        ("Junk", AutomationKind.BULK),
        ("list", AutomationKind.LIST),
        ("bulk (newsletter)", AutomationKind.BULK),
    ],
)
def test_precedence(value: str, expected: AutomationKind) -> None:
    assert kind(msg(headers={"Precedence": value})) is expected


@pytest.mark.parametrize("value", ["first-class", "normal", ""])
def test_ordinary_precedence_is_a_person(value: str) -> None:
    assert detect_automation(msg(headers={"Precedence": value})) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("List-Id", "<dev.lists.example.org>"),
        ("LIST-UNSUBSCRIBE", "<mailto:leave@lists.example.org>"),
        ("List-Post", "<mailto:dev@lists.example.org>"),
    ],
)
def test_list_headers(name: str, value: str) -> None:
    found = detect_automation(msg(headers={name: value}))
    assert found is not None and found.kind is AutomationKind.LIST
    assert found.reason.lower() == f"{name}: {value}".lower()


def test_list_help_alone_is_not_a_list() -> None:
    assert detect_automation(msg(headers={"List-Help": "<mailto:help@lists.example.org>"})) is None


# -- null reverse-path and system senders ------------------------------------------------------


def test_null_reverse_path_alone_is_an_auto_reply() -> None:
    found = detect_automation(msg(envelope_sender=""))
    assert found == Automation(AUTO_REPLY, "null reverse-path (MAIL FROM:<>)")


@pytest.mark.parametrize(
    "sender",
    [
        "no-reply@vendor.example",
        "noreply@vendor.example",
        "NoReply@Vendor.Example",
        "do-not-reply@vendor.example",
        "donotreply@vendor.example",
        "invoices-noreply@vendor.example",
        "bounce@vendor.example",
        "bounces+12345-abcd@vendor.example",
        "gpc-talk-bounces@grizz.example",
    ],
)
def test_system_senders(sender: str) -> None:
    found = detect_automation(msg(sender=sender, envelope_sender=sender))
    assert found == Automation(AutomationKind.SYSTEM_SENDER, f"sender {sender}")


@pytest.mark.parametrize("sender", ["noreen@customer.example", "bouncer@club.example", "reply@customer.example"])
def test_names_that_merely_resemble_system_senders(sender: str) -> None:
    assert detect_automation(msg(sender=sender, envelope_sender=sender)) is None


# -- the real corpus ---------------------------------------------------------------------------

# groupwise_03.eml is a person's reply ("RE: Vuille - (PO28169) - IND" from a hotel's
# reservations desk, written in Outlook): flufl.bounce keeps it to check that it finds no
# bounce in it. It carries no automation signal at all, and it deserves an answer.
HUMAN_IN_FLUFL = {"groupwise_03.eml"}


@needs_corpus
@pytest.mark.parametrize("name", FLUFL_FILES)
def test_every_flufl_bounce_file_is_classified(name: str) -> None:
    found = detect_automation(corpus(name))
    if name in HUMAN_IN_FLUFL:
        assert found is None
    else:
        assert found is not None, f"{name} not detected as automated"
        assert found.reason


@needs_corpus
def test_flufl_bounce_classification_summary() -> None:
    kinds: dict[str, AutomationKind | None] = {name: kind(corpus(name)) for name in FLUFL_FILES}
    counts = collections.Counter(str(k) if k else "not automated" for k in kinds.values())
    assert len(kinds) == 87
    # Every real bounce is a bounce, not merely "list" or "bulk" mail: many of them came
    # through a Mailman list and still carry its List-Id and Precedence headers.
    assert counts == {"bounce": 85, "auto-reply": 1, "not automated": 1}
    assert kinds["qmail_08.eml"] is AUTO_REPLY  # Spanish vacation reply, Precedence: auto_reply


@needs_corpus
@pytest.mark.parametrize(
    ("name", "expected_reason"),
    [
        ("dsn_01.eml", "Content-Type: multipart/report; report-type=delivery-status"),
        ("dsn_02.eml", "Content-Type: multipart/report with a message/delivery-status part"),
        ("dsn_17.eml", "Content-Type: multipart/mixed with a message/delivery-status part"),
        ("simple_15.eml", "envelope sender MAILER-DAEMON@sb7.songbird.com"),
        ("simple_22.eml", "subject 'Delivery failure notification' and body 'following recipient'"),
        ("simple_36.eml", "subject 'Delivery Failure' and body 'following recipient'"),
        (
            "simple_43.eml",
            "subject 'Mail delivery failed: returning message to sender' and body 'mail delivery software'",
        ),
        ("bounce_01.eml", "subject 'Mail Error' and body 'following address'"),
        ("qmail_08.eml", "Precedence: auto_reply"),
    ],
)
def test_corpus_files_that_need_more_than_a_daemon_sender(name: str, expected_reason: str) -> None:
    found = detect_automation(corpus(name))
    assert found is not None and found.reason == expected_reason


@needs_corpus
def test_the_whole_corpus_goes_through_without_errors() -> None:
    files = sorted(CORPUS.glob("*/*.eml"))
    assert len(files) > 100
    people = [f.name for f in files if "flufl" not in f.parts[-2] and detect_automation(from_bytes(f.read_bytes()))]
    # Besides flufl-bounce, only two DSNs, one bounce stub and the GTUBE spam (Precedence: junk).
    assert sorted(people) == ["mail_malformed_2.eml", "mail_test_16.eml", "msg_05.eml", "msg_16.eml", "msg_42.eml"]
    for f in files:
        assert isinstance(bounced_message_ids(from_bytes(f.read_bytes())), tuple)


# -- bounced_message_ids -----------------------------------------------------------------------


@needs_corpus
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dsn_01.eml", "F1218V8zDv60gxapzha000001ae@hotmail.com"),  # RFC 3464, message/rfc822
        ("dsn_07.eml", "Pine.LNX.4.33.0108011605240.12261-100000@robot.metu.edu.tr"),  # rfc822-headers
        ("dsn_15.eml", "mailman.4360.1149475419.1567.gpc-talk@grizz.org"),  # DSN forwarded whole
        ("dsn_17.eml", "mailman.150418.1209869464.31038.pray4-team@strategicnetwork.org"),  # QP headers
        ("yahoo_13.eml", "130907fb-848c-d154-8e59-ed1e08319fcf@yahoo.com"),
        ("postfix_02.eml", "14915.64162.965657.699956@anthem.concentric.net"),  # postfix, no DSN
        ("groupwise_01.eml", "20010720085308.H17468@magic.example.org"),
        ("dumbass_01.eml", "927suu$r5l$1@panix2.panix.com"),
        ("bounce_01.eml", "Pine.LNX.4.30.0102051415240.27504-100000@onca.example.net"),  # free-form
        # Free-form, the returned copy is a digest whose parts have ids too: only the first counts.
        ("bounce_03.eml", "20021027170004.27298.9909.Mailman@mail.python.org"),
        ("simple_43.eml", "ea184277-2081-cdae-1478-0639bb427e8c@our-domain.de"),
    ],
)
def test_bounced_message_ids_on_real_bounces(name: str, expected: str) -> None:
    message = corpus(name)
    assert bounced_message_ids(message) == (expected,)
    assert b"<" + expected.encode() + b">" in message.raw


@needs_corpus
@pytest.mark.parametrize("name", ["simple_15.eml", "qmail_02.eml", "microsoft_01.eml", "dsn_12.eml"])
def test_bounces_whose_returned_message_was_removed_give_no_ids(name: str) -> None:
    # These captures had the returned message cut ("Message removed"); the only Message-ID
    # left in them is the bounce's own, which must never be reported.
    message = corpus(name)
    assert message.message_id
    assert bounced_message_ids(message) == ()


@needs_corpus
def test_bounced_ids_are_real_ids_of_the_files_and_never_the_bounce_itself() -> None:
    seen = 0
    for name in FLUFL_FILES:
        message = corpus(name)
        for mid in bounced_message_ids(message):
            seen += 1
            assert mid != message.message_id
            assert mid.encode() in message.raw or name == "dsn_17.eml"  # dsn_17: quoted-printable
    assert seen >= 18


def test_bounced_ids_from_a_hand_built_dsn() -> None:
    message = msg(sender="postmaster@relay.example", raw=DSN_RAW, body="")
    assert bounced_message_ids(message) == ("ack-1@ours.example",)


@pytest.mark.parametrize(
    "body",
    [
        "--- Below this line is a copy of the message.\n\nFrom: x@ours.example\nMessage-ID: <ack-2@ours.example>\n",
        "   > message-id: <ack-2@ours.example>\n",
        "Message-Id:\n <ack-2@ours.example>\nSubject: x\n",
        "Message-ID: ack-2@ours.example\n",
    ],
)
def test_bounced_ids_quoted_in_a_free_form_bounce(body: str) -> None:
    assert bounced_message_ids(msg(body=body)) == ("ack-2@ours.example",)


def test_bounced_ids_never_the_bounce_own_id() -> None:
    message = msg(message_id="own@mx.example", body="Message-ID: <own@mx.example>\n")
    assert bounced_message_ids(message) == ()


@pytest.mark.parametrize(
    "raw", [b"", b"\xff\xfe\x00garbage", b"Content-Type: multipart/report\n\n--", b"Content-Type: message/rfc822\n\n"]
)
def test_bounced_ids_on_junk_is_empty(raw: bytes) -> None:
    assert bounced_message_ids(msg(raw=raw, body="no ids here")) == ()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2000))
def test_bounced_ids_never_raise(raw: bytes) -> None:
    assert isinstance(bounced_message_ids(msg(raw=b"Content-Type: multipart/mixed; boundary=x\n\n" + raw)), tuple)


# -- delivery_failed ---------------------------------------------------------------------------


def test_a_dsn_whose_recipient_failed_says_delivery_failed() -> None:
    assert delivery_failed(msg(sender="postmaster@relay.example", raw=DSN_RAW, body="")) is True
    # One recipient failed and one is still being tried: our message did not reach everyone.
    both = DSN_RAW.replace(
        b"Action: failed\r\n", b"Action: failed\r\n\r\nFinal-Recipient: rfc822; c@x\r\nAction: delayed\r\n"
    )
    assert delivery_failed(msg(raw=both, body="")) is True


@pytest.mark.parametrize("action", [b"delayed", b"Delayed (will retry)", b"delivered", b"relayed", b"expanded"])
def test_a_dsn_that_only_warns_or_confirms_says_no_failure(action: bytes) -> None:
    """Postfix sends "Delayed Mail (still being retried)" (Action: delayed) to a non-null
    reverse-path after delay_warning_time: the message may well arrive."""
    raw = DSN_RAW.replace(b"Action: failed", b"Action: " + action)
    assert delivery_failed(msg(raw=raw, subject="Delayed Mail (still being retried)", body="")) is False


@pytest.mark.parametrize(
    ("subject", "failed"),
    [
        ("Mail delivery failed: returning message to sender", True),
        ("Undelivered Mail Returned to Sender", True),
        ("Warning: message 14jRTi-0007jE-00 delayed 24 hours", False),  # Exim
        ("Warning: could not send message for past 4 hours", False),  # sendmail
        ("Delivery Status Notification (Delay)", False),
    ],
)
def test_a_free_form_bounce_is_a_failure_unless_it_says_delayed(subject: str, failed: bool) -> None:
    assert (
        delivery_failed(msg(subject=subject, envelope_sender="", body="Message-ID: <ack-2@ours.example>\n")) is failed
    )


@needs_corpus
@pytest.mark.parametrize(
    ("name", "failed"),
    [("dsn_01.eml", True), ("dsn_06.eml", False), ("dsn_07.eml", False), ("dsn_08.eml", False), ("dsn_17.eml", False)],
)
def test_delivery_failed_on_real_dsns(name: str, failed: bool) -> None:
    assert delivery_failed(corpus(name)) is failed


# -- authentication ----------------------------------------------------------------------------

OURS = ("mx.ours.example",)


def authed(*results: str, sender: str = "alice@example.com", envelope: str | None = None) -> AuthVerdict:
    message = msg(sender=sender, envelope_sender=envelope, headers={"Authentication-Results": "\n".join(results)})
    return authentication(message, trusted_authserv_ids=OURS)


def test_trusted_spf_pass_aligned() -> None:
    verdict = authed("mx.ours.example; spf=pass smtp.mailfrom=bounce.example.com")
    assert verdict.authenticated
    assert verdict.reason == "spf=pass smtp.mailfrom=bounce.example.com aligned with From (by mx.ours.example)"


def test_spf_pass_without_mailfrom_uses_the_envelope_sender() -> None:
    assert authed("mx.ours.example; spf=pass", envelope="alice@example.com").authenticated
    assert not authed("mx.ours.example; spf=pass", envelope="x@elsewhere.example").authenticated


def test_trusted_spf_pass_unaligned_does_not_count() -> None:
    verdict = authed("mx.ours.example; spf=pass smtp.mailfrom=bounces@sendgrid.example")
    assert not verdict.authenticated
    assert "not aligned" in verdict.reason


def test_spf_fail() -> None:
    assert authed("mx.ours.example; spf=fail smtp.mailfrom=example.com") == AuthVerdict(False, "spf=fail")


def test_untrusted_forged_copy_is_ignored() -> None:
    verdict = authed("mx.attacker.example; spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com")
    assert verdict == AuthVerdict(False, "no Authentication-Results from a trusted server")


def test_forged_pass_does_not_outweigh_a_trusted_fail() -> None:
    verdict = authed(
        "mx.ours.example; spf=softfail smtp.mailfrom=example.com; dkim=none",
        "mx.ours.example.attacker.example; spf=pass smtp.mailfrom=example.com",
    )
    assert verdict == AuthVerdict(False, "spf=softfail; dkim=none")


def test_header_without_an_authserv_id_is_ignored() -> None:
    assert not authed("spf=pass smtp.mailfrom=example.com").authenticated
    assert not authed("; spf=pass smtp.mailfrom=example.com").authenticated


def test_dkim_pass_aligned() -> None:
    verdict = authed("mx.ours.example; dkim=pass header.d=example.com header.s=sel")
    assert verdict == AuthVerdict(True, "dkim=pass header.d=example.com aligned with From (by mx.ours.example)")


@pytest.mark.parametrize(
    ("result", "sender"),
    [
        ("dkim=pass header.d=mail.example.com", "alice@example.com"),  # signer a subdomain
        ("dkim=pass header.d=example.com", "alice@eu.example.com"),  # signer a parent
        ("dkim=pass header.i=@example.com", "alice@example.com"),  # only header.i
        ("dkim=pass header.i=alice@sub.example.com", "alice@example.com"),
    ],
)
def test_dkim_alignment_same_parent_or_subdomain(result: str, sender: str) -> None:
    assert authed(f"mx.ours.example; {result}", sender=sender).authenticated


@pytest.mark.parametrize(
    "result",
    [
        "dkim=pass header.d=mailer.example.net",  # a different domain (an ESP signing as itself)
        "dkim=pass header.d=badexample.com",  # suffix without the dot
        "dkim=pass header.d=com",  # a single label
        "dkim=pass header.s=sel",  # no signer at all
    ],
)
def test_dkim_pass_unaligned_does_not_count(result: str) -> None:
    verdict = authed(f"mx.ours.example; {result}")
    assert not verdict.authenticated
    assert "not aligned" in verdict.reason


def test_dkim_fail_and_no_from_domain() -> None:
    assert authed("mx.ours.example; dkim=fail header.d=example.com") == AuthVerdict(False, "dkim=fail")
    verdict = authed("mx.ours.example; dkim=pass header.d=example.com", sender="")
    assert verdict == AuthVerdict(False, "no From domain to align with")


def test_multiple_headers_any_trusted_aligned_pass_counts() -> None:
    verdict = authed(
        "mx.ours.example; dkim=fail header.d=example.com",  # opendkim's header
        "other.example; dkim=pass header.d=example.com",  # untrusted
        "mx.ours.example; spf=pass smtp.mailfrom=alice@example.com",  # policyd-spf's header
    )
    assert verdict.authenticated and verdict.reason.startswith("spf=pass")


def test_comments_quotes_odd_spacing_and_case() -> None:
    header = (
        'MX.Ours.Example (Postfix (2.1)) 1 ; SPF = Fail (sender "a; b=c" (nested; really)) '
        'smtp.mailfrom="alice@example.com" ;\n\tDKIM/1=Pass (good sig) header.b=AbC+/dE= header.d=EXAMPLE.com.'
    )
    verdict = authed(header)
    assert verdict == AuthVerdict(True, "dkim=pass header.d=example.com aligned with From (by mx.ours.example)")


def test_a_trusted_header_with_no_results() -> None:
    assert authed("mx.ours.example; none") == AuthVerdict(False, "no SPF or DKIM result from a trusted server")
    assert authed("mx.ours.example (unterminated; spf=pass smtp.mailfrom=example.com").authenticated is False


def test_no_trusted_ids_means_nothing_is_trusted() -> None:
    message = msg(headers={"Authentication-Results": "mx.ours.example; spf=pass smtp.mailfrom=customer.example"})
    assert not authentication(message, trusted_authserv_ids=[]).authenticated
    assert authentication(message, trusted_authserv_ids=["MX.OURS.EXAMPLE"]).authenticated


def test_authentication_is_linear_on_hostile_input() -> None:
    hostile = "mx.ours.example; " + "(" * 200_000 + '"' * 200_000 + "spf=" * 100_000 + ";" * 100_000
    start = time.perf_counter()
    verdict = authed(hostile)
    assert not verdict.authenticated
    assert time.perf_counter() - start < 5.0  # a quadratic parser would take hours here


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('mx.ours.example;=()"\\ \n\tspfdkimpasheader@')), max_size=300))
def test_authentication_never_raises(text: str) -> None:
    verdict = authed(text)
    assert isinstance(verdict.authenticated, bool) and verdict.reason


def test_a_subject_of_gateway_tags_takes_linear_time() -> None:
    """Gateway tags before a reply prefix ("*** SPAM *** WG:", "[EXTERNAL] FW:") are skipped by
    a loop whose "*****" runs could be read two ways: each run doubled the backtracking when no
    prefix followed, and a 300-character subject held a listener for hours (every retry of the
    sending MTA again). Run apart, so that a regression fails here instead of hanging the run."""
    import subprocess
    import sys

    probe = (
        "from intake.hygiene import _REPLY_PREFIX\n"
        "for n in (24, 200, 5000):\n"
        "    assert _REPLY_PREFIX.match('** a ' + '***** a ' * n + '**') is None\n"
        "for s in ('[EXTERNAL] FW: x', '*** SPAM *** WG: x', '[A] [B] *** SPAM *** RE: x', '** SPAM ** AW: x',\n"
        "          '**SPAM****EXTERNAL** RE: x'):\n"
        "    assert _REPLY_PREFIX.match(s), s\n"
        "assert _REPLY_PREFIX.match('[EXTERNAL] Undeliverable: RE: x') is None\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=20)
