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
wording. It takes the HTML's text when the plain part does not stand for it:

* the plain part has (nearly) every word pair of the HTML's text: **plain**, the ordinary
  case. When the HTML, its tags stripped, has no word that the plain part lacks, this is
  known without rendering the HTML (:func:`intake.text.html_to_text`, which costs far more);
* the plain part has the start of the HTML's text and lacks the rest: **plain** when the rest
  begins on a line of its own (a signature, legal disclaimer or "Sent with ..." line that
  only the HTML carries), **html** when the plain part stops in the middle of a line (cut);
* the plain part lacks words at the start or in the middle (it kept only the signature, or
  dropped a table): **html**;
* the plain part says other things than the HTML (under half of its word pairs are there):
  **html** when the HTML's text has more words (a placeholder before a report),
  or when the plain part speaks of "HTML" and the HTML's text does not (a long placeholder
  before a short report); else **plain** (an HTML stub: a gateway's "Removed part").

A word is a run of letters or digits, or one CJK character, case-folded; links are left out
(each part writes them its own way: "text <url>", "text (url)", "text [1]"). Word pairs rather
than words, so that common words ("the", "de") do not make two different texts look alike.
"""

from __future__ import annotations

import html as htmllib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from intake.text import html_to_text

__all__ = ["Alternative", "choose"]


@dataclass(frozen=True, slots=True)
class Alternative:
    """Whether the HTML's text is the body instead of the plain part's, and why."""

    html: bool
    why: str
    html_texts: tuple[str, ...] = ()  # each HTML part's text, when ``html``


# The plain part has the HTML's words when at most this share of the HTML's word pairs is
# missing from it (the two renderings differ a little: table cells, Outlook's "[cid:...]").
_MISSING = 0.1
# The plain part is taken from the HTML when at least this share of its word pairs is there.
_TAKEN = 0.5

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
_SPACED = bytes(b if b in _ALNUM or b >= 0x80 else 0x20 for b in range(256))
# Non-ASCII spaces and punctuation (no-break space, « », ’ “ ” – — …, CJK and full-width
# punctuation): one converter writes "all’attività", another "all'attività".
_PUNCTUATION = re.compile("[\u00a0-\u00bf\u2000-\u206f\u3000-\u303f\uff00-\uff0f]")


def _words(text: str) -> list[str]:
    return _WORD.findall(_LINK.sub(" ", text.casefold()))


def _rough_words(text: str) -> list[bytes]:
    """The words of ``text`` for the cheap check: case-folded, split at punctuation."""
    if not text.isascii():
        text = _PUNCTUATION.sub(" ", text)
    return text.casefold().encode("utf-8", "replace").translate(_SPACED).split()


def _stripped_words(html: str) -> list[bytes]:
    """The rough words of the HTML, tags stripped: every word it shows, and maybe some it does
    not (a style block in the body, the text of an Outlook conditional comment)."""
    body = _BODY.search(html)
    text = _TAG.sub(" ", html[body.start() :] if body else html)
    if "&" in text:
        text = htmllib.unescape(text)
    return _rough_words(text)


def _has_all(known: set[bytes], words: list[bytes]) -> bool:
    """Whether every word is in ``known``, read with its neighbour where a tag cut it in two
    ("o<b>ccidentale</b>")."""
    for index, word in enumerate(words):
        if word in known:
            continue
        before = words[index - 1] + word if index else b""
        after = word + words[index + 1] if index + 1 < len(words) else b""
        if before not in known and after not in known:
            return False
    return True


def _pairs(words: Sequence[str]) -> list[tuple[str, str]]:
    """Each word with the one before it; the first and the last with the text's edge ("")."""
    edged = ["", *words, ""]
    return list(itertools.pairwise(edged))


def choose(plain: str, htmls: Sequence[str]) -> Alternative:
    """Whether the text of ``htmls`` (an alternative's text/html parts, as sent) is the body
    rather than ``plain`` (its text/plain parts, joined). See the module docstring."""
    known = set(_rough_words(plain))
    if all(_has_all(known, _stripped_words(html)) for html in htmls):
        return Alternative(False, "the HTML has no word the plain part lacks")
    plain_words = _words(plain)
    texts = tuple(html_to_text(html) for html in htmls)
    folded = _LINK.sub(" ", "\n\n".join(texts).casefold())
    spans = [match.span() for match in _WORD.finditer(folded)]
    if not spans:
        return Alternative(False, "the HTML shows no words")
    html_words = [folded[start:end] for start, end in spans]
    html_pairs = _pairs(html_words)
    plain_pairs = set(_pairs(plain_words))
    covered = [pair in plain_pairs for pair in html_pairs]
    if covered.count(False) <= _MISSING * len(covered):
        return Alternative(False, "the plain part has the HTML's words")

    shown = set(html_pairs)
    if sum(pair in shown for pair in plain_pairs) < _TAKEN * len(plain_pairs):
        if len(html_words) > len(plain_words):
            return Alternative(True, "the plain part says other things than the HTML, which says more", texts)
        if "html" in plain_words and "html" not in html_words:
            return Alternative(True, "the plain part speaks of the HTML, not of what it says", texts)
        return Alternative(False, "the plain part says other things than the HTML, which says less")

    split = _split(covered)
    head, tail = covered[:split], covered[split:]
    if not head or head.count(False) > _MISSING * len(head) or tail.count(True) > _MISSING * len(tail):
        return Alternative(True, "the plain part lacks words at the start or in the middle of the HTML", texts)
    if split >= len(spans):  # all but the end of the text: the plain part goes on after it
        return Alternative(False, "the plain part has the HTML's words")
    # Pair ``split`` joins the last word the plain part has (``split - 1``) to the first it lacks.
    if "\n" not in folded[spans[split - 1][1] : spans[split][0]]:
        return Alternative(True, "the plain part stops in the middle of a line of the HTML", texts)
    return Alternative(False, "the HTML adds lines at the end (a signature or footer)")


def _split(covered: list[bool]) -> int:
    """Where the HTML's word pairs are best cut into a head the plain part has and a tail it
    lacks: the (last) index with the most pairs covered before it and missing from it on."""
    best = score = covered.count(False)  # cut at 0: all tail
    where = 0
    for index, hit in enumerate(covered, 1):
        score += 1 if hit else -1
        if score >= best:
            best, where = score, index
    return where
