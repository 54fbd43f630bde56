"""Whether the text/plain part of a multipart/alternative stands for its text/html part.

RFC 2046 has the parts of an alternative say the same thing, and intake reads the plain one.
Some senders break that: their plain part is a placeholder ("This message is in HTML format",
"Your email client does not support HTML messages", "To view this email as a web page, go
here", "Diese Nachricht ist im HTML-Format verfasst", "Su cliente de correo no soporta HTML",
"Votre client de messagerie ne supporte pas le HTML": the defaults of mailer libraries, CRMs
and Entourage), blank, cut short, or only the signature of what the author wrote (a broken
HTML-to-plain conversion), and the report is in the HTML. "We were hacked" must then reach the
keyword rules and the stored body from the HTML.

:func:`choose` compares the words of the two texts, in any language; it knows no placeholder's
wording. Each of the HTML's words is **had** when the plain part has it beside the same word
before or after it (a word pair), else **lacked**; what counts is where the lacked words are,
not their share of the whole (a reply's quoted history is most of its text). It takes the
HTML's text when the plain part does not stand for it:

* the plain part has every word of the HTML's text: **plain**, the ordinary case;
* it lacks words before the first it has, or a passage (three words in a row, or more than a
  tenth of them) among those it has: **html** (it kept only the signature, or dropped a
  table); a word here and there is how renderings differ (table cells, "[cid:...]");
* it has the start of the HTML's text and lacks the rest: **html** when the plain part stops
  in the middle of a line (cut) or when the rest is longer than what it has (a plain part
  that is only the greeting or the first paragraph of a report); **plain** when the rest
  begins on a line of its own and is no longer (a signature, legal disclaimer or "Sent with
  ..." line that only the HTML carries), or up to four times as long after a message of at
  least twelve words (a disclaimer under a short message);
* it has none of the HTML's words (it says other things): **html**, a placeholder of any
  wording before a report longer or shorter than it; except **plain** when the HTML's text
  is a stub of at most ten words beside a plain part eight times as long (a gateway's
  "Removed part", a fragment of a forward), unless the plain part speaks of "HTML" and the
  HTML's text does not (a long placeholder before a short report).

The **plain** answers are first sought on the HTML with its tags stripped (C-speed steps, the
tags that start a line marked): when one holds there, the HTML is not rendered
(:func:`intake.text.html_to_text` costs several times more); else the rules are read on the
HTML's rendered text.

A word is a run of letters or digits, or one CJK character, case-folded; links are left out
(each part writes them its own way: "text <url>", "text (url)", "text [1]"). Word pairs rather
than words, so that common words ("the", "de") do not make two different texts look alike, nor
a report written with the words of the quote below it look like that quote.
"""

from __future__ import annotations

import html as htmllib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from intake.text import html_to_text

__all__ = ["Alternative", "choose"]

_W = TypeVar("_W", str, bytes)


@dataclass(frozen=True, slots=True)
class Alternative:
    """Whether the HTML's text is the body instead of the plain part's, and why."""

    html: bool
    why: str
    html_texts: tuple[str, ...] = ()  # each HTML part's text, when ``html``


# Among the words the plain part has, it may lack at most this share of the HTML's words, and
# no run of _RUN of them: the two renderings differ here and there by a word (table cells,
# Outlook's "[cid:...]", a link's text), never by a passage.
_MISSING = 0.1
_RUN = bytes(3 * [True])
# Lines that only the HTML adds at the end are a footer when they are no more words than the
# plain part has; or, after a plain part of at least _SAYS words (a message, not a greeting or
# a first line), up to _FOOTER times as many (a legal disclaimer under a short message).
_SAYS = 12
_FOOTER = 4
# A plain part that has none of the HTML's words is a placeholder, whatever its wording and
# length, unless the HTML is a stub of at most _STUB words beside a plain part that says at
# least _STUB_FACTOR times as much (a gateway's "Removed part", a fragment of a forward).
_STUB = 10
_STUB_FACTOR = 8

_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_LINK = re.compile(r"(?:https?://|mailto:|tel:|cid:|www\.)[^\s<>()\[\]\"']*")  # in case-folded text

# The cheap check reads the HTML with its tags stripped, from <body on (the head's styles and
# title are no text), and splits both texts into words with C-speed steps only: ASCII
# punctuation is a space, anything else (non-ASCII letters, CJK) stays in its word. Linear:
# neither pattern can cross a "<".
_BODY = re.compile(r"<body[\s>]", re.IGNORECASE)
_TAG = re.compile(r"<[/!?A-Za-z][^<>]*>")
_ALNUM = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SPACED = bytes(b if b in _ALNUM or b >= 0x80 or b == 0 else 0x20 for b in range(256))
# The tags after which html_to_text starts a new line; the cheap check marks them with a NUL
# (a NUL in the text itself only splits a line there).
_LINE_TAG = re.compile(
    r"</?(?:br|p|div|tr|li|ul|ol|dl|dt|dd|h[1-6]|table|tbody|thead|tfoot|caption|hr|blockquote|pre|"
    r"section|article|header|footer|nav|aside|main|form|fieldset|figure|figcaption|address|center|"
    r"details|summary|option|legend)(?![^\s/>])[^<>]*>",
    re.IGNORECASE,
)
# Non-ASCII spaces and punctuation (no-break space, « », ’ “ ” – — …, CJK and full-width
# punctuation): one converter writes "all’attività", another "all'attività".
_PUNCTUATION = re.compile("[\u00a0-\u00bf\u2000-\u206f\u3000-\u303f\uff00-\uff0f]")


# Left out of words: the zero-width non-joiner (Persian writes it inside words, some
# converters drop it) and the soft hyphen.
_JOINERS = re.compile("[\u00ad\u200c]")


def _words(text: str) -> list[str]:
    text = text.casefold()
    if not text.isascii():
        text = _JOINERS.sub("", text)
    return _WORD.findall(_LINK.sub(" ", text))


def _rough_bytes(text: str) -> bytes:
    """``text`` case-folded, links left out, punctuation a space: its rough words, unsplit."""
    text = _LINK.sub(" ", text.casefold())
    if not text.isascii():
        text = _PUNCTUATION.sub(" ", _JOINERS.sub("", text))
    return text.encode("utf-8", "replace").translate(_SPACED)


def _rough_words(text: str) -> list[bytes]:
    """The words of ``text`` for the cheap check."""
    return _rough_bytes(text).split()


def _stripped(html: str, *, lines: bool = False) -> bytes:
    """The HTML's text, tags stripped, as rough words: every word it shows, and maybe some it
    does not (a style block in the body, the text of an Outlook conditional comment). With
    ``lines``, a NUL where html_to_text starts a line (a second pass: only a tail needs it)."""
    body = _BODY.search(html)
    text = html[body.start() :] if body else html
    if lines:
        text = _LINE_TAG.sub("\x00", text.replace("\n", " ").replace("\r", " "))
    text = _TAG.sub(" ", text)
    if "&" in text:
        text = htmllib.unescape(text)
    return _rough_bytes(text)


def _mended(words: list[bytes], known: set[bytes]) -> list[bytes]:
    """``words`` with a word the plain part lacks joined to its neighbour where together they
    are one of its words: a tag cut it in two ("o<b>ccidentale</b>")."""
    if known.issuperset(words):
        return words
    mended: list[bytes] = []
    index, count = 0, len(words)
    while index < count:
        word = words[index]
        if word not in known:
            if index + 1 < count and word + words[index + 1] in known:
                mended.append(word + words[index + 1])
                index += 2
                continue
            if mended and mended[-1] + word in known:
                mended[-1] += word
                index += 1
                continue
        mended.append(word)
        index += 1
    return mended


def _pairs(words: Sequence[_W], edge: _W) -> list[tuple[_W, _W]]:
    """Each word with the one after it; the first and the last with the text's ``edge``."""
    return list(itertools.pairwise([edge, *words, edge]))


def _missing(html_pairs: list[tuple[_W, _W]], plain_pairs: set[tuple[_W, _W]]) -> list[bool]:
    """For each of the HTML's words, whether the plain part lacks it there: neither the pair it
    makes with the word before it nor the one with the word after it is the plain part's. (A
    word the plain part adds between two of the HTML's costs one pair, no word.)"""
    hits = [pair in plain_pairs for pair in html_pairs]
    return [not (before or after) for before, after in itertools.pairwise(hits)]


@dataclass(frozen=True, slots=True)
class _Cover:
    """Which of the HTML's words the plain part has, in order: where those it lacks are."""

    start: int  # the first word it has (words before it: the plain part lacks the start)
    end: int  # one past the last word it has (words from here on: a tail)
    gaps: bool  # it lacks a passage among the words it has (or too many words there)
    covered: int  # how many words it has


def _cover(missing: list[bool]) -> _Cover | None:
    """Where the words the plain part lacks are; ``None`` when it has none of them."""
    if False not in missing:
        return None
    start = missing.index(False)
    # The end is where the HTML is best cut into words the plain part has and a tail it lacks:
    # a footer may repeat a few of them ("Acme Corp" under the disclaimer).
    best = score = missing.count(True)
    end = 0
    for index, lacked in enumerate(missing, 1):
        score += -1 if lacked else 1
        if score >= best:
            best, end = score, index
    inside, tail = missing[start:end], missing[end:]
    lacked = inside.count(True)
    gaps = lacked > _MISSING * len(inside) or _RUN in bytes(inside) or tail.count(False) > _MISSING * len(tail)
    return _Cover(start, end, gaps, len(inside) - lacked)


def _cheap(html: str, known: set[bytes], plain_pairs: set[tuple[bytes, bytes]]) -> str:
    """Why the plain part stands for the HTML, read from its stripped text; or "" when the
    HTML must be rendered to tell."""
    words = _mended(_stripped(html).split(), known)
    if plain_pairs.issuperset(itertools.pairwise([b"", *words, b""])):
        return "the HTML has no word the plain part lacks"
    cover = _cover(_missing(_pairs(words, b""), plain_pairs))
    if cover is None or cover.start or cover.gaps:
        return ""
    tail = len(words) - cover.end
    if not tail:
        return "the plain part has the HTML's words"
    if not _footer(tail, cover.covered):
        return ""
    # Does the tail start a line? Count the words line by line up to the end of the head.
    seen = 0
    for line in _stripped(html, lines=True).split(b"\x00"):
        seen += len(_mended(line.split(), known))
        if seen >= cover.end:
            break
    if seen != cover.end:
        return ""
    return "the HTML adds lines at the end (a signature or footer)"


def _footer(tail: int, covered: int) -> bool:
    """Whether ``tail`` words that only the HTML adds on lines of their own, after ``covered``
    words that the plain part has, are a footer (see :data:`_SAYS`)."""
    return tail <= covered or (covered >= _SAYS and tail <= _FOOTER * covered)


def choose(plain: str, htmls: Sequence[str]) -> Alternative:
    """Whether the text of ``htmls`` (an alternative's text/html parts, as sent) is the body
    rather than ``plain`` (its text/plain parts, joined). See the module docstring."""
    rough = _rough_words(plain)
    rough_pairs = set(_pairs(rough, b""))
    known = set(rough)
    whys = [_cheap(html, known, rough_pairs) for html in htmls]
    if (len(whys) == 1 and whys[0]) or all(why == "the HTML has no word the plain part lacks" for why in whys):
        return Alternative(False, whys[0])
    plain_words = _words(plain)
    texts = tuple(html_to_text(html) for html in htmls)
    folded = _LINK.sub(" ", _JOINERS.sub("", "\n\n".join(texts).casefold()))
    spans = [match.span() for match in _WORD.finditer(folded)]
    if not spans:
        return Alternative(False, "the HTML shows no words")
    html_words = [folded[start:end] for start, end in spans]
    missing = _missing(_pairs(html_words, ""), set(_pairs(plain_words, "")))
    if True not in missing:
        return Alternative(False, "the plain part has the HTML's words")
    cover = _cover(missing)
    if cover is None:
        if "html" in plain_words and "html" not in html_words:
            return Alternative(True, "the plain part speaks of the HTML, not of what it says", texts)
        if len(html_words) <= _STUB and len(plain_words) >= _STUB_FACTOR * len(html_words):
            return Alternative(False, "the HTML is a stub beside a plain part that says much more")
        return Alternative(True, "the plain part says other things than the HTML", texts)
    if cover.start or cover.gaps:
        return Alternative(True, "the plain part lacks words at the start or in the middle of the HTML", texts)
    if cover.end == len(spans):
        return Alternative(False, "the plain part has the HTML's words")
    if "\n" not in folded[spans[cover.end - 1][1] : spans[cover.end][0]]:
        return Alternative(True, "the plain part stops in the middle of a line of the HTML", texts)
    if not _footer(len(spans) - cover.end, cover.covered):
        return Alternative(True, "the plain part has only the start of the HTML", texts)
    return Alternative(False, "the HTML adds lines at the end (a signature or footer)")
