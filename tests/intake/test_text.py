"""Tests of intake.text: HTML to readable text, and splitting new text from history.

The split cases are written the way the common clients write them (Gmail, Outlook, Apple
Mail, Thunderbird; English, Spanish, German, French). Both functions promise linear time and
never to raise, so both are also fed hostile input with a time budget and random input.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intake import text as text_module
from intake.text import Split, html_to_text, split_message

# -- html_to_text --------------------------------------------------------------------------------


def test_blocks_become_lines_and_paragraphs() -> None:
    assert html_to_text("<p>one</p><p>two</p>") == "one\n\ntwo"
    assert html_to_text("<div>one</div><div>two</div>") == "one\ntwo"
    assert html_to_text("<h1>Title</h1>text<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>") == (
        "Title\n\ntext\n\na b\nc"
    )


def test_br_is_a_newline_and_blank_lines_do_not_pile_up() -> None:
    assert html_to_text("a<br>b<br/>c") == "a\nb\nc"
    assert html_to_text("a<br><br>b") == "a\n\nb"
    assert html_to_text("a<br><br><br><br><p></p><p></p><div><br></div>b") == "a\n\nb"
    assert html_to_text("<div>line</div><div><br></div><div>after a Gmail blank line</div>") == (
        "line\n\nafter a Gmail blank line"
    )


def test_list_items_get_dashes() -> None:
    html = "<p>Steps:</p><ul><li>restart</li><li>check <b>logs</b><ul><li>nested</li></ul></li></ul><p>done</p>"
    assert html_to_text(html) == "Steps:\n\n- restart\n- check logs\n  - nested\n\ndone"
    assert html_to_text("<ol><li><p>in a paragraph</p></li></ol>") == "- in a paragraph"


def test_links_show_their_target_when_it_differs() -> None:
    assert html_to_text('<a href="https://status.example.com/42">status page</a>') == (
        "status page (https://status.example.com/42)"
    )
    assert html_to_text('see <a href="https://example.com/">example.com</a>.') == "see example.com."
    assert html_to_text('<a href="mailto:help@example.com">help@example.com</a>') == "help@example.com"
    assert html_to_text('<a href="#top">top</a> <a href="javascript:void(0)">x</a>') == "top x"
    assert html_to_text('<a href="https://x.example/?a=1&amp;b=2">go</a>') == "go (https://x.example/?a=1&b=2)"


def test_script_style_head_and_comments_are_dropped() -> None:
    html = (
        "<html><head><title>Title</title><style>p { color: red }</style>"
        "<script>var x = '<p>not text</p>';</script></head>"
        "<body><!-- a comment --><!--[if mso]><p>outlook only</p><![endif]-->"
        "<p>visible</p><script type='text/javascript'>alert(1)</script></body></html>"
    )
    assert html_to_text(html) == "visible"


def test_unclosed_head_ends_at_the_body_content() -> None:
    assert html_to_text("<head><meta charset='utf-8'><p>hello</p>") == "hello"
    assert html_to_text("<html><head><title>t</title>plain text") == "plain text"


def test_entities_are_unescaped() -> None:
    assert html_to_text("<p>A &amp; B &lt;tag&gt; caf&eacute; &#8364;5 &#x41; &nbsp;x</p>") == (
        "A & B <tag> café €5 A x"
    )


def test_whitespace_collapses_but_pre_is_kept() -> None:
    assert html_to_text("<p>  lots   of\n\n   space\t\there </p>") == "lots of space here"
    assert html_to_text("<pre>  indented\n    more\n\nend</pre>") == "  indented\n    more\n\nend"
    assert html_to_text("a\u200b\u200c b\xadc \u200c\xa0\u200c") == "a bc"  # invisible padding characters
    assert html_to_text("<p>می‌خواهم</p>") == "می\u200cخواهم"  # a Persian word keeps its non-joiner


def test_blockquote_becomes_quoted_lines() -> None:
    html = (
        "<div>Thanks, fixed.</div>"
        '<div class="gmail_quote"><div class="gmail_attr">On Mon, 1 Jan 2024 at 10:00, '
        "Alice &lt;alice@example.com&gt; wrote:<br></div>"
        "<blockquote><div>It is broken.</div><div>Please help.</div>"
        "<blockquote>older</blockquote></blockquote></div>"
    )
    text = html_to_text(html)
    assert text == (
        "Thanks, fixed.\nOn Mon, 1 Jan 2024 at 10:00, Alice <alice@example.com> wrote:\n\n"
        "> It is broken.\n> Please help.\n>\n> > older"
    )
    split = split_message(text)
    assert split.new == "Thanks, fixed."
    assert split.quoted.startswith("On Mon, 1 Jan 2024") and "> > older" in split.quoted


def test_outlook_html_reply_splits() -> None:
    html = (
        "<div>We restarted the gateway.</div><div>Regards, Bob</div>"
        '<hr style="display:inline-block;width:98%"><div id="divRplyFwdMsg">'
        "<b>From:</b> Alice &lt;alice@example.com&gt;<br><b>Sent:</b> Monday, January 1, 2024 10:00<br>"
        "<b>To:</b> Support<br><b>Subject:</b> Gateway down</div><div>It is down.</div>"
    )
    split = split_message(html_to_text(html))
    assert split.new == "We restarted the gateway.\nRegards, Bob"
    assert split.quoted.startswith("From: Alice <alice@example.com>") and "It is down." in split.quoted


@pytest.mark.parametrize(
    "broken",
    [
        "<",
        "<<<>>>",
        "<a href='x",
        '<a href="x>y</a> tail',
        "<!--",
        "<!-- never closed <p>x</p>",
        "<![CDATA[ x",
        "<![if !supportLists]>",
        "</>",
        "</ p>",
        "<p",
        "<?xml",
        "&#99999999999; &#xD800; &bogus; &",
        "<table><tr><td>1<td>2",
        "<script>never closed",
        "<style>",
        "<div><span><b>unclosed",
        "</div></div></blockquote></ul></a>",
        "<a title=It's>x</a>",
        "\x00<p>\x00nul</p>",
    ],
)
def test_broken_html_never_raises(broken: str) -> None:
    text = html_to_text(broken)
    assert isinstance(text, str)
    assert "\n\n\n" not in text


def test_broken_html_keeps_readable_text() -> None:
    assert html_to_text("<table><tr><td>1<td>2") == "1 2"
    assert html_to_text("<div><span><b>unclosed") == "unclosed"
    assert html_to_text("a < b and c > d") == "a < b and c > d"
    assert html_to_text("<!-- never closed <p>x</p>") == ""


@pytest.mark.parametrize("unit", ["<a\n", '<a b="x', "<a b='", "<!--", "<![CDATA[", "</", "<a", "<a<", "&#"])
def test_hostile_html_is_linear(unit: str) -> None:
    # CPython 3.11's HTMLParser alone needs 80 s for 60 KB of "<a\n"; the guard keeps it linear.
    html = unit * 40_000
    started = time.perf_counter()
    html_to_text(html)
    assert time.perf_counter() - started < 3.0


@pytest.mark.parametrize(
    ("opening", "closing"),
    [
        ("<blockquote>\r\n", ""),  # "> " * depth on every line: 400 million characters before
        ("<ul><li>x", ""),  # the list indent grew the same way
        ('<a href="https://x.example/">y', "</a>"),  # each close re-read every enclosing link's text
    ],
    ids=["blockquote", "list", "link"],
)
def test_deep_nesting_is_bounded(opening: str, closing: str) -> None:
    count = 20_000
    html = opening * count + "x<br>\r\n" * count + "<p>x" * count + closing * count
    started = time.perf_counter()
    text = html_to_text(html)
    assert time.perf_counter() - started < 1.0
    assert len(text) <= 4 * len(html)
    assert text.count("\n") >= count  # the lines are there, their prefix capped


def test_quotes_stop_deepening_after_eight_levels() -> None:
    text = html_to_text("<blockquote>" * 12 + "deep" + "</blockquote>" * 12 + "<p>after</p>")
    assert text == "> " * 8 + "deep\n\nafter"


def test_a_link_inside_an_open_link_closes_it() -> None:
    assert html_to_text('<a href="https://a.example/">one <a href="https://b.example/">two</a>') == (
        "one (https://a.example/) two (https://b.example/)"
    )


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/!-=\"' abp&#;\n\tdivlhrefsc[]?")), max_size=300))
def test_html_fuzz_never_raises(html: str) -> None:
    text = html_to_text(html)
    assert "\n\n\n" not in text


def test_empty_html() -> None:
    assert html_to_text("") == ""
    assert html_to_text("<html><body></body></html>") == ""


# -- split_message ---------------------------------------------------------------------------------


def test_no_history_is_all_new() -> None:
    text = "Hello,\n\nthe dashboard is down.\n\nThanks,\nAlice"
    assert split_message(text) == Split(new=text, quoted="", signature="")


def test_empty_text() -> None:
    assert split_message("") == Split(new="", quoted="", signature="")
    assert split_message("\n\n  \n") == Split(new="", quoted="", signature="")


def test_gmail_reply() -> None:
    text = (
        "Thanks, that fixed it.\n\n"
        "On Mon, 1 Jan 2024 at 10:00, Support <support@example.net> wrote:\n\n"
        "> Please restart the agent.\n>\n> Support\n"
    )
    split = split_message(text)
    assert split.new == "Thanks, that fixed it."
    assert split.quoted == (
        "On Mon, 1 Jan 2024 at 10:00, Support <support@example.net> wrote:\n\n> Please restart the agent.\n>\n> Support"
    )
    assert split.signature == ""


def test_gmail_attribution_wrapped_over_two_lines() -> None:
    text = (
        "Still broken.\n\n"
        "On Mon, Jan 1, 2024 at 10:00 AM Support Team of Example Incorporated <\n"
        "support@example.net> wrote:\n\n"
        "> Fixed now.\n"
    )
    split = split_message(text)
    assert split.new == "Still broken."
    assert split.quoted.startswith("On Mon, Jan 1, 2024 at 10:00 AM")
    assert split.quoted.endswith("> Fixed now.")


def test_apple_mail_reply_with_mobile_signature() -> None:
    text = (
        "Yes, all users are affected.\n\n"
        "Sent from my iPhone\n\n"
        "> On 1 Jan 2024, at 10:00, Support <support@example.net> wrote:\n"
        ">\n"
        "> How many users are affected?\n"
    )
    split = split_message(text)
    assert split.new == "Yes, all users are affected."
    assert split.signature == "Sent from my iPhone"
    assert split.quoted.startswith("> On 1 Jan 2024") and split.quoted.endswith("affected?")


def test_outlook_original_message() -> None:
    text = (
        "Please escalate.\n\n"
        "-----Original Message-----\n"
        "From: Alice <alice@example.com>\n"
        "Sent: Monday, January 1, 2024 10:00 AM\n"
        "To: Support\n"
        "Subject: Outage\n\n"
        "Everything is down.\n"
    )
    split = split_message(text)
    assert split.new == "Please escalate."
    assert split.quoted.startswith("-----Original Message-----")
    assert split.quoted.endswith("Everything is down.")


def test_outlook_header_block_without_separator() -> None:
    text = (
        "We are on it.\n\n"
        "From: Alice Example <alice@example.com>\n"
        "Sent: Monday, January 1, 2024 10:00 AM\n"
        "To: Support <support@example.net>\n"
        "Cc: Bob <bob@example.com>\n"
        "Subject: RE: Outage\n\n"
        "Everything is down.\n"
        "> and an older quote\n"
        "unprefixed older text\n"
    )
    split = split_message(text)
    assert split.new == "We are on it."
    assert split.quoted.startswith("From: Alice Example") and split.quoted.endswith("unprefixed older text")


def test_outlook_underscore_rule_and_bold_fields() -> None:
    text = (
        "Done.\n\n"
        "________________________________\n"
        "*From:* Alice <alice@example.com>\n"
        "*Sent:* Monday, January 1, 2024 10:00\n"
        "*To:* Support\n"
        "*Subject:* Outage\n\n"
        "Down.\n"
    )
    split = split_message(text)
    assert split.new == "Done."
    assert split.quoted.startswith("________________________________")


def test_spanish_clients() -> None:
    gmail = "Ya funciona.\n\nEl lun, 1 ene 2024 a las 10:00, Soporte (<soporte@example.es>) escribió:\n> Reinicie.\n"
    split = split_message(gmail)
    assert split.new == "Ya funciona."
    assert split.quoted.startswith("El lun, 1 ene 2024")
    outlook = (
        "Gracias.\n\n"
        "-----Mensaje original-----\n"
        "De: Soporte <soporte@example.es>\n"
        "Enviado el: lunes, 1 de enero de 2024 10:00\n"
        "Para: Ana\n"
        "Asunto: Incidencia\n\n"
        "Texto anterior.\n"
    )
    assert split_message(outlook).new == "Gracias."
    block = "Listo.\n\nDe: Soporte\nEnviado: lunes\nPara: Ana\nAsunto: RE: caída\n\nantes\n"
    split = split_message(block)
    assert (split.new, split.quoted.splitlines()[0]) == ("Listo.", "De: Soporte")
    mobile = "Ok\n\nEnviado desde mi iPhone\n"
    assert split_message(mobile) == Split(new="Ok", quoted="", signature="Enviado desde mi iPhone")


def test_german_and_french_attributions() -> None:
    german = "Danke.\n\nAm 01.01.2024 um 10:00 schrieb Support <support@example.de>:\n> Erledigt.\n"
    assert split_message(german) == Split(
        new="Danke.",
        quoted="Am 01.01.2024 um 10:00 schrieb Support <support@example.de>:\n> Erledigt.",
        signature="",
    )
    french = "Merci.\n\nLe lun. 1 janv. 2024 à 10:00, Support <support@example.fr> a écrit :\n> C'est réglé.\n"
    split = split_message(french)
    assert split.new == "Merci."
    assert split.quoted.startswith("Le lun. 1 janv. 2024")


def test_attribution_without_quote_prefix_takes_the_rest() -> None:
    text = "Top.\n\nOn Mon, 1 Jan 2024 at 10:00, Alice <a@example.com> wrote:\n\nunprefixed original\nmore\n"
    split = split_message(text)
    assert split.new == "Top."
    assert split.quoted.endswith("unprefixed original\nmore")


def test_interleaved_replies_stay_new() -> None:
    text = (
        "On Mon, 1 Jan 2024 at 10:00, Support <support@example.net> wrote:\n"
        "> Which version do you run?\n"
        "4.2.1\n"
        ">\n"
        "> Does a restart help?\n"
        "\n"
        "No, it crashes again after a minute.\n"
        "> Anything in the logs?\n"
        "Yes: OutOfMemoryError.\n"
        "\n"
        "-- \n"
        "Alice\n"
    )
    split = split_message(text)
    assert split.new == "4.2.1\n\nNo, it crashes again after a minute.\n\nYes: OutOfMemoryError."
    assert split.quoted == (
        "On Mon, 1 Jan 2024 at 10:00, Support <support@example.net> wrote:\n"
        "> Which version do you run?\n>\n> Does a restart help?\n> Anything in the logs?"
    )
    assert split.signature == "Alice"


def test_bottom_posting_is_new() -> None:
    text = "Bob wrote:\n> Is it fixed?\n\nNot yet, it is still failing.\n"
    split = split_message(text)
    assert split.new == "Not yet, it is still failing."
    assert split.quoted == "Bob wrote:\n> Is it fixed?"


def test_sentence_ending_with_wrote_is_not_an_attribution() -> None:
    text = "On Monday the monitor wrote:\nERROR disk full\nERROR disk full\n"
    assert split_message(text).new == text.strip()


def test_gmail_forward_stays_new() -> None:
    text = (
        "FYI, see below.\n\n"
        "---------- Forwarded message ---------\n"
        "From: Alice <alice@example.com>\n"
        "Date: Mon, 1 Jan 2024 at 10:00\n"
        "Subject: Breach suspected\n"
        "To: Bob <bob@example.com>\n\n"
        "We saw logins from an unknown country.\n"
        "> an older quote inside the forward\n"
    )
    split = split_message(text)
    assert split.new == text.strip()
    assert split.quoted == ""


def test_apple_and_outlook_forwards_stay_new() -> None:
    apple = "Look.\n\nBegin forwarded message:\n\nFrom: Alice <alice@example.com>\nSubject: x\n\ncontent\n"
    assert split_message(apple).new == apple.strip()
    outlook = (
        "Forwarding this.\n\n"
        "________________________________\n"
        "From: Alice <alice@example.com>\n"
        "Sent: Monday, January 1, 2024 10:00\n"
        "To: Bob\n"
        "Subject: FW: Breach suspected\n\n"
        "Content of the forward.\n"
    )
    split = split_message(outlook)
    assert "Content of the forward." in split.new
    assert split.quoted == ""


def test_signature_before_a_forward() -> None:
    text = "See below.\n-- \nBob\n\n---------- Forwarded message ---------\nFrom: a@example.com\n\nforwarded\n"
    split = split_message(text)
    assert split.signature == "Bob"
    assert split.new == "See below.\n\n---------- Forwarded message ---------\nFrom: a@example.com\n\nforwarded"


def test_signature_delimiters() -> None:
    standard = "The fix works.\n\n-- \nAlice Example\nACME Corp\n+1 555 0100\n"
    assert split_message(standard) == Split(
        new="The fix works.", quoted="", signature="Alice Example\nACME Corp\n+1 555 0100"
    )
    plain = "The fix works.\n--\nAlice\n"
    assert split_message(plain) == Split(new="The fix works.", quoted="", signature="Alice")
    # A bare "--" far from the end is a separator in the text, not a signature.
    far = "Steps\n--\n" + "".join(f"step {i}\n" for i in range(15))
    assert split_message(far).signature == ""
    # "-- " always starts the signature, even with a long signature after it.
    long_sig = "Hi\n-- \n" + "".join(f"sig line {i}\n" for i in range(15))
    assert split_message(long_sig).new == "Hi"


@pytest.mark.parametrize(
    "line",
    [
        "Sent from my iPhone",
        "Sent from my Galaxy",
        "Get Outlook for iOS",
        "Von meinem iPhone gesendet",
        "Envoyé de mon iPad",
    ],
)
def test_mobile_signatures(line: str) -> None:
    split = split_message(f"Restarted, works now.\n\n{line}\n")
    assert split.new == "Restarted, works now."
    assert split.signature == line


def test_mobile_phrase_in_the_middle_is_text() -> None:
    text = "Sent from my iPhone is what my mail says.\nLine two.\nLine three.\nLine four.\n"
    assert split_message(text).signature == ""


def test_crlf_and_cr_line_endings() -> None:
    lf = "Answer.\n\nOn Mon, 1 Jan 2024, Alice <a@example.com> wrote:\n> question\n\n-- \nsig\n"
    expected = split_message(lf)
    assert expected.new == "Answer."
    assert split_message(lf.replace("\n", "\r\n")) == expected
    assert split_message(lf.replace("\n", "\r")) == expected


@pytest.mark.parametrize(
    "unit",
    ["From: a\n", "> a\n", "On x\n", "x wrote:\n", "-- \n", "________________\n", "On Mon 1 wrote:\n", "a\n\n"],
)
def test_split_is_linear(unit: str) -> None:
    text = unit * 100_000
    started = time.perf_counter()
    split_message(text)
    assert time.perf_counter() - started < 5.0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "",
                "> quoted",
                ">",
                "text",
                "-- ",
                "--",
                "On Mon, 1 Jan 2024 Alice <a@b.c> wrote:",
                "On Mon",
                "x> wrote:",
                "From: a",
                "Sent: b",
                "To: c",
                "Subject: FW: d",
                "-----Original Message-----",
                "____________",
                "---------- Forwarded message ---------",
                "Sent from my iPhone",
                "\r",
            ]
        ),
        max_size=30,
    ),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_split_fuzz_keeps_every_line_somewhere(lines: list[str], newline: str) -> None:
    split = split_message(newline.join(lines))
    kept = "\n".join((split.new, split.quoted, split.signature))
    for line in lines:
        text = line.strip()
        if text and text not in ("--",):
            assert text in kept


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=500))
def test_split_never_raises(text: str) -> None:
    split = split_message(text)
    assert isinstance(split, Split)
    assert len(split.new) <= len(text) + 2


# -- the shortcuts of the split keep its results -------------------------------------------------


def _join_line_by_line(lines: list[str]) -> str:
    """How the split joined lines before it joined them in one go (the reference)."""
    out: list[str] = []
    for line in lines:
        if not line or line.isspace():
            if out and out[-1]:
                out.append("")
            continue
        out.append(line.rstrip())
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("a b\t\x0b\x1c\u2028\u3000\xa0>-:")), max_size=6), max_size=12))
def test_joining_lines_in_one_go_is_joining_them_one_by_one(lines: list[str]) -> None:
    assert text_module._join(lines) == _join_line_by_line(lines)


def test_header_block_gate_lets_every_from_field_through() -> None:
    """Lines that cannot open a "From:" field skip the header-block probe; the gate is the
    first character, so it must hold every character a From field name can start with."""
    firsts = {name[0] for name in text_module._FROM_FIELDS}
    for code in range(0x110000):
        char = chr(code)
        if char.lower()[:1] in firsts:
            assert char in text_module._FIELD_FIRST, hex(code)
    for line in ("From: a", "*From:* a", "**De:** b", "VON: c", "Från: d", "Od: e"):
        assert text_module._field(line) in text_module._FROM_FIELDS and line[0] in text_module._FIELD_FIRST
