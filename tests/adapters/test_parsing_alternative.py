"""Tests of adapters.email.alternative: when the plain part of a multipart/alternative does not
stand for its HTML, the HTML's text is the body.

The messages in ``tests/data/email/alt_*.eml`` are written as their senders write them: the
placeholders are the defaults of real mailers (Entourage's "This message is in HTML format",
PHPMailer's Spanish AltBody, Stud.IP's German one, a Django app's French one, Marketo's "To view
this email as a web page"), an Outlook message whose plain part kept only the signature (as in
SuiteCRM issue 8505), and a plain part cut mid-word. The opposite cases are Outlook pairs whose
plain part is the whole text: a reply with quoted history, and one whose HTML alone carries a
confidentiality notice and a tracking pixel.
"""

from __future__ import annotations

import email
import email.policy
import html
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.email import alternative
from adapters.email.alternative import choose
from adapters.email.parsing import parse_email
from intake.model import InboundMessage
from tests.corpus import CORPUS, needs_corpus

DATA = Path(__file__).resolve().parent.parent / "data" / "email"


def data(name: str) -> InboundMessage:
    return parse_email((DATA / name).read_bytes(), recipient="support@example.net")


def texts(name: str) -> tuple[str, str]:
    """The plain and the HTML part of an ``alt_*.eml`` file, decoded."""
    found = {}
    for part in email.message_from_bytes((DATA / name).read_bytes(), policy=email.policy.default).walk():
        if part.get_content_type() in ("text/plain", "text/html"):
            found[part.get_content_type()] = part.get_content()
    return found["text/plain"], found["text/html"]


# -- the report is in the HTML ------------------------------------------------------------------

PLACEHOLDERS = [
    # (file, a phrase of the placeholder, a phrase of the report in the HTML)
    ("alt_placeholder_entourage.eml", "This message is in HTML format", "I think we were hacked overnight."),
    ("alt_placeholder_es.eml", "Este mensaje está en formato HTML", "nos hackearon la cuenta de administración"),
    ("alt_placeholder_de.eml", "Diese Nachricht ist im HTML-Format", "bricht der Export der Monatsberichte"),
    ("alt_placeholder_fr.eml", "ne supporte pas le HTML", "n'affiche plus aucune donnée pour nos 40 utilisateurs"),
    ("alt_placeholder_webpage.eml", "copy and paste it into your browser", "found ransomware on two file servers"),
]


@pytest.mark.parametrize(("name", "placeholder", "report"), PLACEHOLDERS, ids=[p[0] for p in PLACEHOLDERS])
def test_a_placeholder_plain_part_gives_way_to_the_html(name: str, placeholder: str, report: str) -> None:
    msg = data(name)
    assert msg.html is True  # the body came from HTML, and the message says so
    assert report in msg.body and report in msg.new_text
    assert placeholder not in msg.body
    assert "<" not in msg.body


def test_a_long_placeholder_before_a_short_report_gives_way() -> None:
    """The Spanish placeholder has more words than the report: it is the plain part's talk of
    "HTML", which the HTML itself never mentions, that marks it as a note about the HTML."""
    msg = data("alt_placeholder_es.eml")
    assert msg.body == "Hola, nos hackearon la cuenta de administración anoche. Llamadme al 600 000 000.\n\nLucía"
    assert choose(
        "«« Este mensaje está en formato HTML pero el equipo no está configurado para mostrarlo "
        "automáticamente. Active la opción HTML del menú Ver en su cliente de correo electrónico.>>",
        ["<p>Nos hackearon.</p>"],
    ).why == ("the plain part speaks of the HTML, not of what it says")


def test_a_plain_part_with_only_the_signature_gives_way() -> None:
    msg = data("alt_plain_signature_only.eml")
    assert msg.html is True
    assert msg.body.startswith("Goedemiddag,\n\nSinds vanochtend zien wij in het klantportaal geen enkele factuur")
    assert "[cid:" not in msg.body
    assert [a.filename for a in msg.attachments] == ["image001.png"]


def test_a_reply_whose_plain_part_kept_only_the_signature_and_the_history_gives_way() -> None:
    """The quoted history is most of the text: that the plain part has it says nothing about
    the report before the signature, which it lacks."""
    msg = data("alt_plain_signature_only_reply.eml")
    assert msg.html is True
    assert "We were hacked overnight. Please call me." in msg.new_text


HISTORY = [
    "From: Support <support@example.net>",
    "Sent: Monday, November 23, 2026 10:02 AM",
    "Subject: [SUP-ABCD-EFGH] Dashboard empty",
    "Hello Ana, we opened ticket SUP-ABCD-EFGH. Please tell us which users are affected and since when.",
    "From: Ana Ruiz <ana@acme.example>",
    "Hi, since this morning the dashboard shows no data for our 40 users. Could you take a look? Ana",
]


def paragraphs(lines: list[str]) -> str:
    return "<html><body>" + "".join(f"<p>{html.escape(line)}</p>" for line in lines) + "</body></html>"


@pytest.mark.parametrize(
    "report",
    [
        "Someone got into our admin account, please call me today.",
        "Our dashboard data: which users? Since Monday, no ticket shows.",  # every word is in the quote
    ],
    ids=["new-words", "words-of-the-quote"],
)
def test_a_report_before_the_signature_of_a_reply_is_not_lost(report: str) -> None:
    signature = ["Ana Ruiz", "IT Manager | Acme Corp"]
    choice = choose("\n".join(signature + HISTORY), [paragraphs([report, *signature, *HISTORY])])
    assert choice.html, choice.why
    assert report in choice.html_texts[0]


def test_a_plain_part_cut_in_the_middle_of_a_line_gives_way() -> None:
    msg = data("alt_plain_truncated.eml")
    assert msg.html is True
    assert "We believe we were hacked" in msg.body
    assert "downloaded every invoice of 2026." in msg.body


# -- the plain part stands ------------------------------------------------------------------------


def test_a_footer_only_the_html_carries_keeps_the_plain_part() -> None:
    msg = data("alt_html_footer.eml")
    assert msg.html is False
    assert msg.body == (
        "Hello,\n\nsince 10:30 today the revenue dashboard at https://app.example.com/d/7 shows no data for any "
        "of our users.\n\nBest regards,\nPetra Novak\nAcme Corp | +1 555 010 2030"
    )
    plain, page = texts("alt_html_footer.eml")
    assert choose(plain, [page]).why == "the HTML adds lines at the end (a signature or footer)"


def test_a_footer_only_the_html_carries_is_known_without_rendering_the_html(monkeypatch: pytest.MonkeyPatch) -> None:
    """The footer is seen on the HTML's stripped words, with the tags that start a line: an
    Outlook pair with an HTML-only disclaimer cost 556 us instead of 188 when rendered."""
    rendered: list[str] = []
    real = alternative.html_to_text
    monkeypatch.setattr(alternative, "html_to_text", lambda html: rendered.append(html) or real(html))
    plain, page = texts("alt_html_footer.eml")
    assert choose(plain, [page]).why == "the HTML adds lines at the end (a signature or footer)"
    cut = "Our admin account was hacked last night and the attackers"
    assert choose(cut, [f"<p>{cut} <b>downloaded</b> every invoice.</p>"]).html is True  # in mid-line
    assert rendered == [f"<p>{cut} <b>downloaded</b> every invoice.</p>"]


def test_an_ordinary_outlook_reply_keeps_the_plain_part_without_rendering_the_html(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cost on the ordinary path: the HTML is not rendered when, its tags stripped, it has
    no word that the plain part lacks (Outlook's head of styles, <o:p>, &nbsp;, a linked
    signature written "Acme Corp<https://www.acme.com/>" in the plain part)."""

    rendered: list[str] = []
    monkeypatch.setattr(alternative, "html_to_text", lambda html: rendered.append(html) or "")
    msg = data("alt_outlook_reply.eml")
    assert rendered == []
    assert msg.html is False and msg.parse_problem is None
    assert msg.body.startswith("Hi,\n\nthe data is back since 10:50.")
    assert "> " not in msg.body and "From: Support <support@example.net>" in msg.body


def test_persian_text_with_a_footer_only_the_html_carries_keeps_the_plain_part() -> None:
    """Persian writes a zero-width non-joiner inside words ("می‌خواهم"); it made every such
    word two words in one part and one in the other, and the pair went to the HTML."""
    new = "می‌خواهم گزارش بدهم که خروجی‌گرفتن از ساعت ۱۰ کار نمی‌کند و گزارش‌های ماهانه خالی هستند."
    plain = f"سلام،\n\n{new}\n\nآنا"
    footer = "<p style='font-size:8pt'>Confidential: for the addressee only.</p>"
    page = f"<div>سلام،</div><div>{new}</div><div>آنا</div>{footer}"
    choice = choose(plain, [page])
    assert (choice.html, choice.why) == (False, "the HTML adds lines at the end (a signature or footer)")


def test_an_html_stub_keeps_the_plain_part() -> None:
    """A gateway that removed the HTML leaves "Removed part": fewer words, and other ones."""
    plain = "Solicitudes de reservas para el grupo de marzo: 12 habitaciones dobles, del 3 al 7, media pensión."
    assert choose(plain, ["<html>Removed part</html>"]).html is False


@pytest.mark.parametrize(
    ("plain", "page"),
    [
        ("To view this email as a web page, go here.", "<p>Our admin account was hacked.</p>"),
        ("If you cannot read this message, view it in your browser.", "<p>Account hacked.</p>"),
        ("Plain version wins.\n\n> Earlier answer.", "<p>HTML version loses.</p>"),
    ],
    ids=["web-page", "browser", "other-words"],
)
def test_a_placeholder_before_a_shorter_report_gives_way(plain: str, page: str) -> None:
    """A plain part that has none of the HTML's words stands for it only beside a stub: a
    placeholder need not say "HTML", and the report after it may be the shorter text."""
    assert choose(plain, [page]).html is True


def test_a_short_placeholder_before_a_short_report_gives_way() -> None:
    msg = data("alt_placeholder_webpage_short.eml")
    assert msg.html is True
    assert "Someone got into our admin account. Please call Sam." in msg.new_text


@pytest.mark.parametrize(
    "plain",
    ["Hi,", "Hello team,\n\nquick update from Acme."],
    ids=["greeting", "first-paragraph"],
)
def test_a_plain_part_with_only_the_first_lines_gives_way(plain: str) -> None:
    lines = ["Hello team,", "quick update from Acme."] if "team" in plain else ["Hi,"]
    report = "We were hacked last night: ransomware encrypted our file server and the attackers demand payment."
    choice = choose(plain, [paragraphs([*lines, report])])
    assert choice.html, choice.why


def test_an_html_without_words_keeps_the_plain_part() -> None:
    # The style block in the body is words to the cheap check, none to a reader.
    page = '<body><style>p { color: navy }</style><p><img src="cid:shot"></p><p>&nbsp;</p></body>'
    choice = choose("See the screenshot.", [page])
    assert (choice.html, choice.why) == (False, "the HTML shows no words")


@pytest.mark.parametrize(
    "plain",
    ["", " \n", "\xa0", "--", "[cid:image001.png@01DA1F2E.5B3C4D10]", "https://acme.example/track?id=1"],
    ids=["empty", "blank", "nbsp", "dashes", "cid-only", "link-only"],
)
def test_a_plain_part_without_words_gives_way(plain: str) -> None:
    assert choose(plain, ["<p>Our admin account was hacked.</p>"]).html is True


def test_a_word_cut_by_a_tag_still_counts_on_the_cheap_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered: list[str] = []
    monkeypatch.setattr(alternative, "html_to_text", lambda html: rendered.append(html) or "")
    assert choose("Un flusso nord-occidentale.", ["<p>Un flusso nord-o<b>ccidentale</b>.</p>"]).html is False
    assert choose("all'attività", ["<p>all’attività</p>"]).html is False
    assert rendered == []


def test_plain_text_wrapped_inside_cjk_runs_still_stands_for_the_html() -> None:
    """Japanese clients wrap the plain part at a fixed width, in the middle of a run of
    characters with no spaces: compared character by character, it is the same text."""
    text = "お世話になっております。ダッシュボードに本日午前十時からデータが表示されません。ご確認をお願いいたします。"
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))
    assert choose(wrapped, [f"<div>{text}</div>"]).html is False


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")), min_size=1, max_size=60),
        min_size=1,
        max_size=8,
    )
)
def test_a_plain_part_written_from_its_html_always_stands(paragraphs: list[str]) -> None:
    """The opposite error: whatever the text, an HTML that is the plain part's own paragraphs
    is never preferred to it."""
    plain = "\n\n".join(paragraphs)
    page = "<html><body>" + "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs) + "</body></html>"
    assert choose(plain, [page]).html is False


@pytest.mark.parametrize(
    "name",
    [
        "django-helpdesk/utf-nondecodable.eml",
        "flufl-bounce/groupwise_03.eml",
        "mail-parser/mail_test_10.eml",
        "mail-parser/mail_test_2.eml",
        "mail-parser/mail_test_3.eml",
        "mail-parser/mail_test_7.eml",
    ],
)
@needs_corpus
def test_the_corpus_alternatives_keep_their_plain_part(name: str) -> None:
    """Every alternative with a plain and an HTML part in the real-world corpus: a forwarded
    message whose HTML is a fragment, GroupWise's "Removed part" stub, and four newsletters
    and notices whose two parts say the same."""
    msg = parse_email((CORPUS / name).read_bytes(), recipient="support@example.net")
    assert msg.html is False


def test_deeply_nested_quotes_in_an_alternative_give_a_bounded_body() -> None:
    """Every alternative may now be rendered: 9,000 nested <blockquote> (0.25 MB) took 16 s
    and gave a body of 320 million characters; the quote prefix stops at eight levels."""
    page = "<blockquote>\r\n" * 9000 + "x<br>\r\n" * 18000
    raw = (
        "From: m@evil.example\r\nTo: support@example.net\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n'
        f"--b\r\nContent-Type: text/html\r\n\r\n{page}\r\n--b--\r\n"
    ).encode()
    started = time.perf_counter()
    msg = parse_email(raw, recipient="support@example.net")
    assert time.perf_counter() - started < 1.0
    assert msg.html is True and len(msg.body) <= 2 * len(raw)
    assert msg.body.splitlines()[-1] == "> " * 8 + "x"
