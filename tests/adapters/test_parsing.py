"""Tests of adapters.email.parsing: raw bytes to InboundMessage, never raising.

Three sources of messages: every file of the real-world corpus (``../shared/corpus``, mail
nobody here wrote), hand-written tricky messages in ``tests/data/email/``, and messages built
here (deep nesting, garbage, size caps). Failures of mail-parser and of the stdlib are
simulated with ``monkeypatch`` because no real input is known to break the stdlib's parser
except deep nesting, which is tested for real.
"""

from __future__ import annotations

import base64
import email
import email.parser
import email.utils
import random
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import mailparser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailparser.exceptions import MailParserError

from adapters.email import parsing
from adapters.email.parsing import parse_email
from intake.model import Attachment, Channel, InboundMessage
from tests.corpus import CORPUS, corpus_files, needs_corpus

CORPUS_FILES = [str(p.relative_to(CORPUS)) for p in corpus_files()]
DATA = Path(__file__).resolve().parent.parent / "data" / "email"


def parse(raw: bytes, **kwargs: object) -> InboundMessage:
    kwargs.setdefault("recipient", "Support@Example.NET")
    return parse_email(raw, **kwargs)  # type: ignore[arg-type]


def corpus(name: str, **kwargs: object) -> InboundMessage:
    return parse((CORPUS / name).read_bytes(), **kwargs)


def data(name: str, **kwargs: object) -> InboundMessage:
    return parse((DATA / name).read_bytes(), **kwargs)


def assert_well_formed(msg: InboundMessage, raw: bytes) -> None:
    """What every parse result must satisfy, whatever the input."""
    assert isinstance(msg, InboundMessage)
    assert msg.raw == raw
    assert msg.channel is Channel.EMAIL
    assert msg.recipient == "support@example.net"
    assert "<" not in msg.message_id and ">" not in msg.message_id
    assert msg.message_id == msg.message_id.strip()
    for mid in (*msg.in_reply_to, *msg.references):
        assert mid and "<" not in mid and ">" not in mid and not any(c.isspace() for c in mid)
    for address in (msg.sender, *msg.to, *msg.cc, *msg.reply_to):
        assert address == address.lower() and " " not in address
    assert "\n" not in msg.subject and "\r" not in msg.subject and msg.subject == msg.subject.strip()
    assert msg.date is None or msg.date.tzinfo is not None
    assert all(key == key.lower() for key in msg.headers)
    assert "\x00" not in msg.body and "\r" not in msg.body
    assert all(isinstance(a, Attachment) and a.size >= 0 for a in msg.attachments)
    msg.body.encode("utf-8")  # no lone surrogates anywhere a database would choke on them
    msg.subject.encode("utf-8")
    for value in msg.headers.values():
        value.encode("utf-8")


# -- the real-world corpus ---------------------------------------------------------------------


@needs_corpus
@pytest.mark.parametrize("name", CORPUS_FILES)
def test_every_corpus_file_parses_and_keeps_its_bytes(name: str) -> None:
    raw = (CORPUS / name).read_bytes()
    msg = parse(raw, envelope_sender="bounces@example.org")
    assert_well_formed(msg, raw)
    # Nothing in the corpus needs a fallback: mail-parser plus salvage reads all of it. Three
    # files have a From that names no one author: mail-parser's own spoof case ("alice@x <bob@x>")
    # and two bounces from <"System Administrator"@example.com>; that is said, not hidden.
    assert msg.parse_problem is None or msg.parse_problem.startswith(
        ("multipart not closed", "the From field does not give one readable author")
    )
    assert len(msg.new_text) <= len(msg.body)


@needs_corpus
def test_corpus_has_the_expected_size() -> None:
    assert len(CORPUS_FILES) == 134


@needs_corpus
def test_corpus_plain_message() -> None:
    msg = corpus("cpython-test_email/msg_01.eml")
    assert msg.sender == "bbb@ddd.com"
    assert msg.sender_name == "John X. Doe"
    assert msg.subject == "This is a test message"
    assert msg.message_id == "15090.61304.110929.45684@aaa.zzz.org"
    assert msg.date == datetime(2001, 5, 4, 14, 5, 44, tzinfo=timezone(timedelta(hours=-4)))
    assert msg.body == "Hi,\n\nDo you like this message?\n\n-Me"


@needs_corpus
def test_corpus_encoded_words_split_across_two_words_join() -> None:
    msg = corpus("django-helpdesk/utf-nondecodable.eml")
    assert msg.subject == "Fwd: Cyklozaměstnavatel - změna vyhodnocení"
    assert msg.sender == "john.smith@example.cz"
    assert msg.message_id == "00d73ce5-774a-5ea1-6742-af73ef58c01c@example.cz"
    assert msg.in_reply_to == ("CAK0Q_=uQY=3V5iUSgEN16GLtYoJ-6oQu-vYjsgQ=jv6DwOkuLQ@mail.gmail.com",)
    # A forward is content sent now: it stays in new_text.
    assert msg.new_text.startswith("-------- Forwarded Message --------")


@needs_corpus
def test_corpus_unknown_body_charset_falls_back() -> None:
    msg = corpus("flufl-bounce/qmail_08.eml")  # charset=ansi_x3.110-1983, Latin-1 bytes
    assert msg.subject == "Auto reply"
    assert msg.sender == "contact@example.com"
    assert "a la mayor brevedad posible tendrás noticias" in msg.body


@needs_corpus
def test_corpus_uft8_typo_charset_is_read_as_utf8() -> None:
    msg = corpus("flufl-bounce/simple_30.eml")  # charset="uft-8"
    assert msg.sender == "mail.delivery.system@sb7.songbird.com"
    assert "Delivery Status Notification" in msg.body


@needs_corpus
def test_corpus_cjk_and_cyrillic_subjects() -> None:
    assert corpus("mail-parser/mail_test_12.eml").subject == "代开各地增值税发票"  # GB2312 words
    assert corpus("flufl-bounce/simple_39.eml").subject == "Ваше сообщение не доставлено. Mail failure."
    # Raw GB2312 bytes in the Subject (no encoded words): the body's charset is the hint.
    assert corpus("flufl-bounce/sina_01.eml").subject == "邮件传输失败！"


@needs_corpus
def test_corpus_html_only_spam_becomes_text() -> None:
    msg = corpus("mail-parser/mail_test_9.eml")
    assert msg.html is True
    assert "<" not in msg.body and "http://go2buy.com.cn/" in msg.body
    assert msg.message_id == "5AF385F77A53C2509D46E44914A76433@ljhw"


@needs_corpus
def test_corpus_bounce_keeps_report_and_original_as_attachments() -> None:
    msg = corpus("flufl-bounce/dsn_01.eml")
    assert msg.sender == "postmaster@go.com"
    assert [a.content_type for a in msg.attachments] == ["message/delivery-status", "message/rfc822"]
    assert msg.body.startswith("This report relates to a message you sent")
    assert msg.headers["received"].count("\n") == 6  # all seven Received copies are kept


@needs_corpus
def test_corpus_large_message_attachments_and_caps() -> None:
    msg = corpus("mail-parser/mail_test_2.eml", max_attachment_bytes=1_000_000)
    assert [(a.filename, a.size, a.kept) for a in msg.attachments] == [
        ("intestazione.jpg", 9918, True),
        ("logometeo.jpg", 7321, True),
        ("Bollettino.pdf", 1089942, False),
    ]
    assert msg.body.startswith("\t\tUfficio Meteorologico")


@needs_corpus
def test_corpus_boundary_reused_by_nested_part_recovers_epilogue() -> None:
    # The nested multipart reuses the outer boundary; the zip lands in the epilogue.
    msg = corpus("mail-parser/mail_malformed_1.eml")
    assert msg.attachments == (
        Attachment(filename="20160523_916527.jpg_.zip", content_type="application/zip", size=86908),
    )


@needs_corpus
def test_corpus_wrong_boundary_is_salvaged() -> None:
    # Declares boundary "--=_HsWzsKVZkho" but writes "----=_GlSzQZUbRbpVOpy".
    msg = corpus("mail-parser/mail_malformed_3.eml")
    assert msg.html is True
    assert msg.body.startswith("Problemas para visualizar")
    assert msg.subject == "Ahorre Dinero en su Recibo de Luz"


@needs_corpus
def test_corpus_multipart_without_boundary_lines_keeps_text() -> None:
    msg = corpus("cpython-test_email/msg_17.eml")
    assert "This is the dingus fish." in msg.body
    assert msg.attachments == ()


@needs_corpus
def test_corpus_top_level_rfc822_uses_inner_body() -> None:
    msg = corpus("cpython-test_email/msg_11.eml")
    assert msg.body == "Here is the body of the message."
    assert msg.sender == ""  # no From, no Sender, no envelope sender


@needs_corpus
def test_corpus_named_inline_text_is_body_when_nothing_else_is() -> None:
    msg = corpus("cpython-test_email/msg_44.eml")
    assert msg.body.startswith("a simple kind of mirror")
    assert [a.filename for a in msg.attachments] == ["msg.txt", "msg.txt"]


@needs_corpus
def test_corpus_pgp_signature_is_an_attachment() -> None:
    msg = corpus("django-helpdesk/pgp.eml")
    assert msg.body.startswith("hi, thanks for looking into this :)")
    assert [(a.filename, a.content_type) for a in msg.attachments] == [("signature.asc", "application/pgp-signature")]


# -- hand-written tricky messages (tests/data/email) ---------------------------------------------


def test_data_files_all_parse() -> None:
    files = sorted(DATA.glob("*.eml"))
    assert len(files) >= 20
    for path in files:
        raw = path.read_bytes()
        assert_well_formed(parse(raw), raw)


def test_html_only() -> None:
    msg = data("html_only.eml")
    assert msg.html is True
    assert msg.sender == "carla.ruiz@example.com" and msg.sender_name == "Carla Ruiz"
    assert msg.body.startswith("Hi team,\n\nThe VPN is still down & nobody can log in.\nStarted at 09:14.")
    assert "- Office Madrid\n- Office Lyon" in msg.body
    assert "incident page (https://status.example.com/incident/42)" in msg.body
    assert "ignored title" not in msg.body and "not text" not in msg.body and "color" not in msg.body
    # The Gmail blockquote becomes "> " quoting, so the history is split off.
    assert "> We are looking into it." in msg.body
    assert "looking into it" not in msg.new_text
    assert msg.quoted.endswith("> We are looking into it.")
    assert msg.new_text.endswith("incident page (https://status.example.com/incident/42)")


def test_no_subject_no_message_id() -> None:
    msg = data("no_subject_no_message_id.eml")
    assert msg.subject == ""
    assert msg.message_id == ""
    assert msg.dedup_key.startswith("sha256:")
    assert msg.date == datetime(2024, 1, 3, 8, 0, tzinfo=timezone(timedelta(hours=-5)))


def test_empty_body_and_header_only() -> None:
    empty = data("empty_body.eml")
    assert (empty.body, empty.new_text, empty.subject) == ("", "", "nothing to say")
    assert empty.parse_problem is None
    header_only = data("header_only.eml")
    assert header_only.body == ""
    assert header_only.subject == "only headers"
    assert header_only.message_id == "header-only@example.com"
    assert header_only.date == datetime(2024, 1, 4, 12, 0, tzinfo=UTC)
    assert header_only.parse_problem is None


def test_undeclared_8bit_charset() -> None:
    msg = data("undeclared_8bit.eml")
    assert msg.body == "El servidor está caído desde las 9. Grácias, José"
    assert msg.sender_name == "José"


def test_wrong_charset_labels() -> None:
    msg = data("wrong_charset.eml")
    # Labelled us-ascii but UTF-8; labelled UTF-8 but cp1252.
    assert msg.body == "Grüße aus Köln – der Drucker brennt.\n\nSmart quotes “like this” cost 5 €."


def test_non_utf8_bytes_in_headers() -> None:
    msg = data("nonutf8_headers.eml")
    assert msg.sender_name == "François Müller"
    assert msg.subject == "Problème d'accès"
    assert msg.headers["x-custom"] == "café"


@pytest.mark.parametrize(
    ("raw_subject", "subject"),
    [
        (b"caf\xc3\xa9 na\xefve", "café naïve"),  # UTF-8 with a stray Latin-1 byte: was "cafÃ© naïve"
        (b"Se\xc3\xb1or Mu\xc3\xb1oz: \x93urgente\x94", "Señor Muñoz: “urgente”"),  # cp1252 quotes pasted in
        (b"Probl\xe8me d'acc\xe8s", "Problème d'accès"),  # no UTF-8 at all: cp1252 whole, as before
        # More stray bytes than UTF-8 characters: a cp1252 text with a UTF-8 pair by chance.
        (b"\x93Gr\xfc\xdfe\x94 se\xc3\xb1or", "“Grüße” seÃ±or"),
        (b"caf\xc3\xa9", "café"),
        ("„Spaß“".encode("cp1252"), "„Spaß“"),  # "ß“" is a valid UTF-8 pair (NKo): no UTF-8 here
        ("Frage zu „Fuß“ und „Maß“".encode("cp1252"), "Frage zu „Fuß“ und „Maß“"),
        ("Jose\u0301 Pe\u0301rez".encode() + b" \xe9t\xe9", "Jose\u0301 Pe\u0301rez été"),  # as macOS writes é
        ("مرحبا بكم".encode() + b" \xe9t\xe9", "مرحبا بكم été"),
    ],
)
@pytest.mark.parametrize("declared", [b"", b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"])
def test_raw_header_bytes_mixing_utf8_and_a_single_byte_charset(
    raw_subject: bytes, subject: str, declared: bytes
) -> None:
    raw = (
        b"From: a@b.example\r\nSubject: " + raw_subject + b"\r\nMessage-ID: <mixed@b.example>\r\n"
        + declared + b"\r\nhello\r\n"
    )  # fmt: skip
    assert parse(raw).subject == subject


def test_a_declared_windows_1252_reads_raw_header_bytes_as_declared() -> None:
    raw = (
        b"From: a@b.example\r\nSubject: caf\xc3\xa9 \x93na\xefve\x94\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=windows-1252\r\n\r\nhello\r\n"
    )
    assert parse(raw).subject == "cafÃ© “naïve”"


def test_a_declared_single_byte_charset_reads_raw_header_bytes_whole() -> None:
    # "Пётр" in windows-1251 holds a valid UTF-8 pair ("Пё" is D0 B8): the declared charset wins.
    subject = "Пётр: Віктор не може увійти"
    raw = (
        b"From: a@b.example\r\nSubject: " + subject.encode("cp1251") + b"\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=windows-1251\r\n\r\n" + "Фёдор".encode("cp1251") + b"\r\n"
    )
    assert parse(raw).subject == subject


def test_a_declared_multibyte_charset_still_reads_raw_header_bytes_whole() -> None:
    # Shift_JIS bytes may hold a valid UTF-8 sequence by chance; the declared charset comes first.
    raw_subject = "サーバー障害".encode("cp932")
    raw = (
        b"From: a@b.example\r\nSubject: " + raw_subject + b"\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=shift_jis\r\n\r\n" + "本文".encode("cp932") + b"\r\n"
    )
    assert parse(raw).subject == "サーバー障害"


@pytest.mark.parametrize(
    ("name", "subject", "sender_name"),
    [
        ("subject_iso8859.eml", "Problème de connexion à l'intranet", "André Pérez"),
        ("subject_utf8.eml", "Servidor caído — ¡urgente! 🚨", "Zoë Łukasz"),
        ("subject_shift_jis.eml", "サーバー障害 (urgent)", "山田太郎"),
    ],
)
def test_encoded_word_subjects(name: str, subject: str, sender_name: str) -> None:
    msg = data(name)
    assert msg.subject == subject
    assert msg.sender_name == sender_name
    assert msg.headers["subject"] == subject


def test_shift_jis_body() -> None:
    assert data("subject_shift_jis.eml").body == "サーバーが落ちました。"


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        ("ISO-2022-JP", "プリンターが燃えています。"),  # RFC 1468: Japanese mail's own charset
        ("iso-2022-kr", "프린터에 불이 났습니다."),
        ("UTF-7", "Drucker brennt – Grüße"),
    ],
    ids=["iso-2022-jp", "iso-2022-kr", "utf-7"],
)
def test_seven_bit_charsets_are_read_as_declared(charset: str, text: str) -> None:
    """Their bytes are all ASCII (escape sequences, "+...-" runs): read as ASCII they left
    ESC characters and letters no one wrote in the subject and the body."""
    codec = charset.lower().replace("-", "_").replace("utf_7", "utf-7")
    word = base64.b64encode(f"Re: {text}".encode(codec)).decode()
    raw = (
        (
            f"From: a@acme.com\r\nTo: support@example.com\r\nSubject: =?{charset}?B?{word}?=\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n"
        ).encode()
        + text.encode(codec)
        + b"\r\n"
    )
    msg = parse(raw)
    assert msg.subject == f"Re: {text}"
    assert msg.body == text


def test_unknown_charsets_do_not_crash() -> None:
    msg = data("unknown_charset.eml")
    assert msg.subject == "café down and résumé"  # "uft-8" and "ansi_x3.110-1983" words
    assert msg.body == "Straße ist gesperrt."  # x-no-such-charset, Latin-1 bytes


def test_in_reply_to_with_junk_and_repeats() -> None:
    msg = data("in_reply_to_junk.eml")
    assert msg.message_id == "reply-1@example.com"
    assert msg.in_reply_to == ("orig-1@support.example.net", "orig-2@support.example.net")
    assert msg.references == ("orig-1@support.example.net",)
    assert msg.headers["in-reply-to"].count("\n") == 1  # both copies kept


def test_references_with_twenty_ids() -> None:
    msg = data("references_20.eml")
    assert len(msg.references) == 20
    assert msg.references[0] == "ref-01.7919@lists.example.org"
    assert msg.references[-1] == "ref-20.158380@lists.example.org"
    assert msg.related_ids[0] == "ref-20.158380@lists.example.org"


def test_references_are_capped_keeping_root_and_nearest() -> None:
    ids = " ".join(f"<id{i}@example.org>" for i in range(500))
    raw = f"From: a@example.org\nSubject: x\nReferences: {ids}\n\nbody\n".encode()
    refs = parse(raw).references
    assert len(refs) == 64
    assert refs[0] == "id0@example.org" and refs[-1] == "id499@example.org"


def test_rfc2231_filenames_and_caps() -> None:
    msg = data("rfc2231_filename.eml", max_attachment_bytes=1000)
    assert msg.body == "See the attached report and log."
    assert msg.attachments == (
        Attachment(filename="Informe de año 2024.pdf", content_type="application/pdf", size=1033, kept=False),
        Attachment(filename="résumé-very-long-name-part3.log", content_type="text/plain", size=19, kept=True),
    )


def test_nested_message_rfc822() -> None:
    msg = data("nested_rfc822.eml")
    assert msg.body == "Please look at the attached suspicious message."
    assert len(msg.attachments) == 1
    attached = msg.attachments[0]
    assert (attached.filename, attached.content_type) == ("suspicious.eml", "message/rfc822")
    assert attached.size > 300
    assert "Click" not in msg.body  # the attached message's text is not the author's


def test_truncated_multipart() -> None:
    msg = data("truncated_multipart.eml")
    assert msg.body == "The first part arrived whole."
    assert [a.filename for a in msg.attachments] == ["dump.bin"]
    assert msg.parse_problem == "multipart not closed: the message may be truncated"


def test_alternative_prefers_plain_and_addresses() -> None:
    msg = data("alternative.eml")
    assert msg.html is False
    assert msg.body.startswith("Plain version wins.")
    assert msg.new_text == "Plain version wins."
    assert msg.quoted == "On Thu, 4 Jan 2024 at 09:00, Support <support@example.net> wrote:\n> Earlier answer."
    assert msg.to == ("support@example.net", "jane.doe@example.net")
    assert msg.cc == ("hans@example.de",)  # "not-an-address" and "<>" are dropped
    assert msg.reply_to == ("tickets@example.com",)
    assert msg.headers["cc"].startswith("Müller, Hans <hans@example.de>")
    assert msg.date == datetime(2024, 1, 5, 16, 45, tzinfo=UTC)  # "-0000": read as UTC


def _mime(content_type: str, *parts: bytes) -> bytes:
    boundary = f"b{len(parts)}{len(content_type)}".encode()
    body = b"".join(b"--" + boundary + b"\n" + part + b"\n" for part in parts) + b"--" + boundary + b"--\n"
    return f'Content-Type: {content_type}; boundary="{boundary.decode()}"\n\n'.encode() + body


PLAIN = b"Content-Type: text/plain; charset=utf-8\n\nplain words"
HTML = b"Content-Type: text/html; charset=utf-8\n\n<p>html <b>words</b></p>"
PNG = b"Content-Type: image/png\nContent-ID: <logo>\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo="
PDF = b'Content-Type: application/pdf\nContent-Disposition: attachment; filename="a.pdf"\n\n%PDF-1.4'


def test_alternative_inside_mixed_with_related_images() -> None:
    # The HTML says what the plain part says (one that says something else would be the body).
    page = b"Content-Type: text/html; charset=utf-8\n\n<p>plain <b>words</b></p>"
    related = _mime("multipart/related", page, PNG)
    raw = b"From: a@example.org\nSubject: s\nMIME-Version: 1.0\n" + _mime(
        "multipart/mixed", _mime("multipart/alternative", PLAIN, related), PDF
    )
    msg = parse(raw)
    assert (msg.body, msg.html) == ("plain words", False)
    assert [(a.filename, a.content_type, a.size) for a in msg.attachments] == [
        ("", "image/png", 8),
        ("a.pdf", "application/pdf", 8),
    ]


def test_html_body_with_a_plain_list_footer_keeps_both() -> None:
    footer = b"Content-Type: text/plain\n\n--\nlist mailing list\nhttps://lists.example.org/"
    raw = b"From: a@example.org\nSubject: s\nMIME-Version: 1.0\n" + _mime("multipart/mixed", HTML, footer)
    msg = parse(raw)
    assert msg.html is True
    assert msg.body == "html words\n\n--\nlist mailing list\nhttps://lists.example.org/"
    assert msg.new_text == "html words"


def test_alternative_flattened_into_mixed_keeps_the_plain_part() -> None:
    raw = b"From: a@example.org\nSubject: s\nMIME-Version: 1.0\n" + _mime("multipart/mixed", PLAIN, HTML)
    msg = parse(raw)
    assert (msg.body, msg.html) == ("plain words", False)


def test_empty_plain_alternative_falls_back_to_html() -> None:
    empty_plain = b"Content-Type: text/plain\n\n  \n"
    raw = b"From: a@example.org\nSubject: s\nMIME-Version: 1.0\n" + _mime("multipart/alternative", empty_plain, HTML)
    assert (parse(raw).body, parse(raw).html) == ("html words", True)


def test_crlf_and_lf_give_the_same_message() -> None:
    lf = (DATA / "lf_message.eml").read_bytes()
    crlf = lf.replace(b"\n", b"\r\n")
    a, b = parse(lf), parse(crlf)
    assert b.raw == crlf
    for field in ("sender", "subject", "body", "new_text", "attachments", "message_id", "headers"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.subject == "line endings folded onto a second line"
    assert a.new_text == "First line.\nSecond line."
    assert a.attachments == (Attachment(filename="dot.png", content_type="image/png", size=70),)
    cr_only = parse(lf.replace(b"\n", b"\r"))
    assert cr_only.subject == a.subject and cr_only.new_text == a.new_text


def test_broken_multipart_salvage_does_not_eat_option_lines() -> None:
    raw = (
        b'From: a@example.org\nSubject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="nope"\n\n'
        b"Run it with\n--verbose\nand tell me.\n"
    )
    msg = parse(raw)
    assert msg.body == "Run it with\n--verbose\nand tell me."
    assert msg.attachments == ()


def test_without_from_the_sender_is_the_envelopes_never_the_sender_field() -> None:
    # Nothing at the border checks the Sender field; SPF checks the envelope sender.
    msg = data("no_from.eml", envelope_sender="Owner@Lists.Example.org")
    assert msg.sender == "owner@lists.example.org" and msg.sender_name == ""
    msg = parse(b"To: support@example.net\nSubject: anonymous\n\nhi\n", envelope_sender="<Bounce@Example.COM>")
    assert msg.sender == "bounce@example.com"
    assert msg.envelope_sender == "<Bounce@Example.COM>"  # kept as given


def test_nul_bytes_are_dropped_from_text() -> None:
    msg = data("nul_bytes.eml")
    assert msg.subject == "has nul"
    assert msg.body == "beforeafter"
    assert b"\x00" in msg.raw


def test_repeated_headers_are_joined_and_decoded() -> None:
    raw = (
        b"Received: from a by b; Mon, 1 Jan 2024 10:00:00 +0000\n"
        b"Received: from c\n by d; Mon, 1 Jan 2024 09:59:00 +0000\n"
        b"Authentication-Results: mx.example.net; spf=pass\n"
        b"Authentication-Results: mx.example.net; dkim=fail\n"
        b"From: a@example.org\n"
        b"X-Note: =?utf-8?q?caf=C3=A9?=\n"
        b"Subject: x\n\nbody\n"
    )
    headers = parse(raw).headers
    assert headers["received"] == (
        "from a by b; Mon, 1 Jan 2024 10:00:00 +0000\nfrom c by d; Mon, 1 Jan 2024 09:59:00 +0000"
    )
    assert headers["authentication-results"].split("\n") == [
        "mx.example.net; spf=pass",
        "mx.example.net; dkim=fail",
    ]
    assert headers["x-note"] == "café"


def test_bad_dates_are_none() -> None:
    for value in ("not a date", "Mon, 99 Foo 2024 25:61:00 +9999", "", "Mon, 1 Jan 99999 00:00:00 +0000"):
        msg = parse(f"From: a@example.org\nDate: {value}\nSubject: d\n\nx\n".encode())
        assert msg.date is None, value


# -- attachment caps ---------------------------------------------------------------------------


def _with_attachments(*sizes: int) -> bytes:
    parts = [
        b'From: a@example.org\nSubject: files\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="B"\n\n'
        b"--B\nContent-Type: text/plain\n\nsee files\n"
    ]
    for index, size in enumerate(sizes):
        head = f'--B\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename="f{index}"\n'
        parts.append(head.encode() + b"\n" + b"x" * size + b"\n")
    parts.append(b"--B--\n")
    return b"".join(parts)


def test_caps_per_file_and_in_total() -> None:
    raw = _with_attachments(100, 300, 120)
    assert [a.size for a in parse(raw).attachments] == [100, 300, 120]
    assert all(a.kept for a in parse(raw).attachments)
    per_file = parse(raw, max_attachment_bytes=250).attachments
    assert [a.kept for a in per_file] == [True, False, True]
    total = parse(raw, max_attachments_total=250).attachments
    assert [a.kept for a in total] == [True, False, True]  # 100 kept, 400 > 250, 100 + 120 fits
    both = parse(raw, max_attachment_bytes=250, max_attachments_total=200).attachments
    assert [a.kept for a in both] == [True, False, False]
    zero = parse(raw, max_attachments_total=0).attachments
    assert not any(a.kept for a in zero)


# -- hostile and broken input --------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    head = b"From: Deep <deep@example.com>\r\nSubject: deep\r\nMessage-ID: <deep@example.com>\r\nMIME-Version: 1.0\r\n"
    opening = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\nhello from the bottom\r\n" + closing


def test_moderate_nesting_parses_fully() -> None:
    msg = parse(_nested(60))
    assert msg.parse_problem is None
    assert msg.body == "hello from the bottom"


def test_deep_nesting_is_salvaged_from_the_headers() -> None:
    raw = _nested(1200)  # mail-parser raises MailParserRecursionError
    msg = parse(raw)
    assert_well_formed(msg, raw)
    assert msg.parse_problem is not None and msg.parse_problem.startswith("unparseable MIME")
    assert "MailParserRecursionError" in msg.parse_problem
    assert (msg.subject, msg.sender, msg.message_id) == ("deep", "deep@example.com", "deep@example.com")
    assert "hello from the bottom" in msg.body


def test_zero_bytes() -> None:
    msg = parse(b"", envelope_sender="x@example.org")
    assert msg.raw == b""
    assert msg.parse_problem == "empty message"
    assert (msg.body, msg.subject, msg.sender) == ("", "", "x@example.org")


def test_binary_garbage() -> None:
    raw = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd" + random.Random(7).randbytes(64 * 1024)
    msg = parse(raw)
    assert_well_formed(msg, raw)
    assert msg.parse_problem == "no header fields found"
    assert msg.subject == "" and msg.sender == ""
    assert len(msg.body) > 1000  # kept as text for a person to look at


def test_not_bytes_is_accepted() -> None:
    raw = b"From: a@example.org\nSubject: ba\n\nbody\n"
    msg = parse_email(bytearray(raw), recipient="s@example.net")  # type: ignore[arg-type]
    assert msg.raw == raw and msg.subject == "ba"


def test_mail_parser_failure_falls_back_to_stdlib(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes) -> object:
        raise MailParserError("simulated")

    monkeypatch.setattr(parsing, "_read_mime", broken)
    raw = (DATA / "alternative.eml").read_bytes()
    msg = parse(raw)
    assert msg.parse_problem == "mail-parser failed: MailParserError"
    assert msg.subject == "multipart alternative"
    assert msg.new_text == "Plain version wins."
    assert msg.cc == ("hans@example.de",)


def test_mail_parser_bug_falls_back_to_stdlib(monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(raw: bytes) -> object:
        raise KeyError("simulated")

    monkeypatch.setattr(parsing, "_read_mime", buggy)
    msg = data("subject_utf8.eml")
    assert msg.parse_problem == "mail-parser failed: KeyError"
    assert msg.subject == "Servidor caído — ¡urgente! 🚨"


def test_everything_failing_still_returns_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise MemoryError("simulated")

    monkeypatch.setattr(parsing, "_read_mime", fail)
    monkeypatch.setattr(email, "message_from_bytes", fail)
    monkeypatch.setattr(email.parser.BytesHeaderParser, "parsebytes", fail)
    raw = "Subject: lost\n\nthe text survives \x00 ünïcode\n".encode() + b"\xff"
    msg = parse(raw, envelope_sender="Who@Example.org")
    assert msg.parse_problem == "unparseable MIME: MemoryError"
    assert msg.subject == ""
    assert msg.raw == raw
    assert msg.body == "Subject: lost\n\nthe text survives  ünïcode\n\ufffd"
    assert msg.sender == "who@example.org"


def test_unparseable_body_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise ValueError("simulated")

    monkeypatch.setattr(parsing, "_read_mime", fail)
    monkeypatch.setattr(email, "message_from_bytes", fail)
    monkeypatch.setattr(email.parser.BytesHeaderParser, "parsebytes", fail)
    raw = b"x" * 2_000_000
    msg = parse(raw)
    assert msg.raw == raw
    assert 0 < len(msg.body) <= 256 * 1024


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert_well_formed(parse(raw), raw)


_HEADER_NAMES = ["From", "To", "Cc", "Subject", "Message-ID", "In-Reply-To", "References", "Date", "Content-Type"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_HEADER_NAMES), st.text(max_size=60)),
        max_size=8,
    ),
    st.binary(max_size=512),
)
def test_arbitrary_header_values_never_raise(headers: list[tuple[str, str]], body: bytes) -> None:
    head = "".join(f"{name}: {value}\n" for name, value in headers)
    raw = head.encode("utf-8", "surrogatepass") + b"\n" + body
    assert_well_formed(parse(raw), raw)


def test_no_angle_bracket_survives_inside_a_message_id() -> None:
    """Found by hypothesis: a Message-ID header of '0<@' kept its '<'."""
    raw = b"From: a@example.com\r\nMessage-ID: 0<@\r\nIn-Reply-To: x<y@z\r\n\r\nhi\r\n"
    msg = parse_email(raw, recipient="support@example.net")
    assert "<" not in msg.message_id and ">" not in msg.message_id
    assert all("<" not in i and ">" not in i for i in msg.in_reply_to)


# -- what the cheaper paths must keep ------------------------------------------------------------


def _delivery() -> parsing._Delivery:
    return parsing._Delivery(
        recipient="support@example.net",
        envelope_sender="x@example.org",
        max_attachment_bytes=None,
        max_attachments_total=None,
    )


@needs_corpus
def test_mail_parser_analysis_changes_nothing_we_read() -> None:
    """We take mail-parser's reading of the bytes without its analysis (MailParser.parse()):
    the message built from it is the one built from mail-parser's fully parsed message."""
    for name in [*CORPUS_FILES, *(f"../{p.name}" for p in sorted(DATA.glob("*.eml")))]:
        path = CORPUS / name if not name.startswith("../") else DATA / name[3:]
        raw = path.read_bytes()
        full = mailparser.parse_from_bytes(raw)
        assert full.message is not None
        lean = parsing._read_mime(raw)
        assert parsing._build(lean, raw, _delivery(), problem=None) == parsing._build(
            full.message, raw, _delivery(), problem=None
        ), name


def test_deep_nesting_still_stops_mail_parser() -> None:
    with pytest.raises(MailParserError):
        parsing._read_mime(_nested(1200))


_ADDRESS_PIECES = st.sampled_from(
    [
        "Jane Doe", "A. B", "O'Neil", "x_y-z", "jd", "jd@example.com", "j.d+tag@mail.example.co.uk", "a..b@c.de",
        ".a@b.cd", "a@b", "a@b.", "@", "<", ">", ",", ", ", " ", "  ", "\t", '"', "(", ")", "[1.2.3.4]", ":", ";",
        "\\", "é", "=?utf-8?q?x?=", "@a,@b:", "e-x.com", "example.org",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_ADDRESS_PIECES, max_size=7).map("".join), max_size=3))
def test_plain_address_lists_read_as_the_stdlib_reads_them(values: list[str]) -> None:
    fast = parsing._simple_addresses(values)
    if fast is not None:  # anything not plain goes to the stdlib parser itself
        assert fast == email.utils.getaddresses(values)


def test_plain_address_lists_take_the_fast_path() -> None:
    assert parsing._simple_addresses(["Jane  Doe <JD@Example.com>, x@y.org", "B <b@c.de>"]) == [
        ("Jane Doe", "JD@Example.com"),
        ("", "x@y.org"),
        ("B", "b@c.de"),
    ]
    assert parsing._simple_addresses(['"Doe, Jane" <jd@example.com>']) is None
    assert parsing._simple_addresses([]) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*'aZ09 :;\t\r\n\x00=?<>@"é', "=?utf-8?q?x?="]), max_size=20).map("".join))
def test_plain_header_values_read_as_the_general_path_reads_them(value: str) -> None:
    if parsing._is_plain_header(value):
        assert value.strip() == parsing._clean(parsing._decode_words(parsing._unfold(value, "utf-8")))


def test_plain_text_labelled_base64_is_kept_as_sent() -> None:
    """Broken mailers (and spam) label plain text base64: decoding it gives bytes nobody wrote.
    Text with spaces between words and characters base64 lacks is kept as sent, and said so;
    real base64 with a stray line (a signature added after encoding) still decodes."""
    head = (
        b"From: a@b.com\r\nTo: support@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    msg = parse(head + b"Hello, this is plain text, not base64 at all!\r\nSecond line here.\r\n")
    assert msg.body == "Hello, this is plain text, not base64 at all!\nSecond line here."
    assert msg.parse_problem == "a text part labelled base64 is not base64: kept as sent"
    encoded = base64.encodebytes("Grüße, the export fails again.\n".encode()).replace(b"\n", b"\r\n")
    real = parse(head + encoded + b"-- \r\n")
    assert real.body == "Grüße, the export fails again." and real.parse_problem is None


@pytest.mark.parametrize(
    ("from_header", "author"),
    [
        ('"Doe, Jane" <Jane@Acme.com>', ("Doe, Jane", "jane@acme.com")),  # Outlook's quoted name
        ('"alice@acme.com" <mallory@evil.example>', ("alice@acme.com", "mallory@evil.example")),
        ('"x" <alice@acme.com@evil.example>', None),  # not one plain address in the brackets
        ('"Doe, Jane" <jane@acme.com>, mallory@evil.example', None),
    ],
)
def test_a_quoted_display_name_and_one_address(from_header: str, author: tuple[str, str] | None) -> None:
    raw = f"From: {from_header}\r\nSubject: x\r\n\r\nhi\r\n".encode()
    msg = parse(raw, envelope_sender="bounce@evil.example")
    assert (msg.sender_name, msg.sender) == (author if author else ("", ""))
