"""Plain text out of mail bodies: HTML to readable text, and what the author wrote now.

Two pure functions, both linear in the size of their input and neither ever raises:

* :func:`html_to_text` renders HTML the way a person would read it in a text client: block
  elements become line breaks, ``<blockquote>`` becomes ``> `` quoting (so that
  :func:`split_message` recognises quoted history in HTML-only mail), links keep their target.
  Its output is at most a few times as long as its input: quoting and list indents stop
  growing after a few levels, an ``<a>`` inside an open ``<a>`` closes it (as in a browser),
  and rendering stops at :data:`_OUTPUT_FACTOR` times the input's length. Without these,
  thousands of nested ``<blockquote>`` (0.5 MB) wrote ``"> " * depth`` on every line: a body
  of 320 million characters, 16 s and 1 GB of memory for one message.
* :func:`split_message` separates the part of a message body the author wrote now (``new``)
  from the quoted history (``quoted``) and the signature (``signature``).

Why there is a guard in front of :class:`html.parser.HTMLParser`: on unterminated markup it
re-scans the rest of the document once per ``<`` (measured here: CPython 3.11.7 took 81 s for
60 KB of ``<a\\n``; later CPython security releases fix some of this, not all the pythons we
run on have them). :func:`_canonical_html` first reduces the input, in one linear pass, to
text plus complete tags that contain no ``<``; comments, declarations and script/style content
are dropped there. The parser then never has to look ahead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import unescape
from html.parser import HTMLParser

__all__ = ["Split", "html_to_text", "split_message"]

# --------------------------------------------------------------------------------------------
# HTML to text
# --------------------------------------------------------------------------------------------

# One token of markup: a complete start or end tag with no "<" inside and balanced quotes
# (group 1), a comment opening (group 2), or a declaration / processing instruction (group 3).
# Possessive quantifiers (Python 3.11+) rule out backtracking and nothing can cross a "<", so
# a failed attempt costs at most the distance to the next "<": the pre-pass is linear.
_MARKUP = re.compile(r"""<(?:(/?[A-Za-z][^\s/<>]*+(?:[^<>"']++|"[^"<]*+"|'[^'<]*+')*+>)|(!--)|[!?])""")
_RAWTEXT = re.compile(r"(script|style)(?![^\s/>])", re.IGNORECASE)
_RAWTEXT_END = {
    "script": re.compile(r"</script", re.IGNORECASE),
    "style": re.compile(r"</style", re.IGNORECASE),
}
_WS = re.compile(r"\s+")
# Invisible characters that newsletters use as padding; they only get in the way of matching.
# The zero-width non-joiner is also spelling (Persian "می‌خواهم"): it stays between letters.
_INVISIBLE = str.maketrans({"\u200b": None, "\ufeff": None, "\xad": None, "\u034f": None})
_PADDING_ZWNJ = re.compile(r"(?<!\w)\u200c+|\u200c+(?!\w)")

# Quoting and list indents stop growing here: deeper levels read the same, and the prefix of
# every line must not grow with a nesting depth that costs the sender one tag per level.
_MAX_DEPTH = 8
# The rendered text is never longer than this many times the HTML (a line of "x<br>" eight
# quotes deep is 3.6 times its markup); what would go beyond is dropped.
_OUTPUT_FACTOR = 4

_SKIP = frozenset({"head", "title", "script", "style", "template"})
# What may stand in <head>; anything else means the author forgot to close it.
_HEAD_CONTENT = frozenset({"meta", "link", "base", "title", "style", "script", "noscript", "template"})
_LINE_BLOCKS = frozenset(
    {
        "div", "tr", "dt", "dd", "section", "article", "header", "footer", "nav", "aside",
        "main", "form", "fieldset", "figure", "figcaption", "address", "center", "details",
        "summary", "caption", "tbody", "thead", "tfoot", "option", "legend", "li",
    }
)  # fmt: skip
_PARAGRAPH_BLOCKS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "dl", "table", "hr"})


def _canonical_html(html: str) -> str:
    """Keep text and complete tags; escape stray ``<``; drop comments, declarations, scripts."""
    out: list[str] = []
    append = out.append
    search = _MARKUP.search
    find = html.find
    pos = 0
    while True:
        m = search(html, pos)
        if m is None:
            append(html[pos:].replace("<", "&lt;"))
            break
        start = m.start()
        if start > pos:
            append(html[pos:start].replace("<", "&lt;"))  # a "<" that starts no complete tag
        tag = m.group(1)
        if tag is not None:
            pos = m.end()
            if tag[0] in "sS" and (raw := _RAWTEXT.match(tag)) is not None:
                # Script and style content never reaches the parser.
                end_tag = _RAWTEXT_END[raw.group(1).lower()].search(html, pos)
                if end_tag is None:
                    break
                gt = find(">", end_tag.end())
                pos = len(html) if gt < 0 else gt + 1
                continue
            append(html[start:pos])
            continue
        # Comment, doctype, CDATA, conditional comment or processing instruction: nothing a
        # reader sees. An unterminated one swallows the rest, as it does in a browser.
        if m.group(2) is not None:
            close, width = find("-->", start + 2), 3
        else:
            close, width = find(">", start + 2), 1
        if close < 0:
            break
        pos = close + width
    return "".join(out)


def _comparable(url: str) -> str:
    u = url.strip().lower()
    for prefix in ("mailto:", "tel:", "https://", "http://", "www."):
        if u.startswith(prefix):
            u = u[len(prefix) :]
    return u.rstrip("/")


class _Full(Exception):
    """The rendered text has reached its size limit."""


class _TextRenderer(HTMLParser):
    """Collects readable text from parser events; see :func:`html_to_text`."""

    def __init__(self, room: int) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._room = room  # characters the finished lines may still take
        self._cur: list[str] = []
        self._cur_depth = 0  # quote depth of the current line
        self._started = False
        self._pending_nl = 0  # 1 = line break, 2 = blank line
        self._pending_space = False
        self._marker = ""  # list bullet waiting for the first text of its item
        self._skip: list[str] = []
        self._quote = 0
        self._pre = 0
        self._lists = 0
        self._links: list[tuple[str, list[str]]] = []

    # -- output ---------------------------------------------------------------------------
    def _break(self, count: int) -> None:
        if self._started and count > self._pending_nl:
            self._pending_nl = count

    def _prefix(self, depth: int) -> str:
        return "> " * min(depth, _MAX_DEPTH)

    def _add(self, line: str) -> None:
        self._room -= len(line) + 1
        if self._room < 0:
            raise _Full
        self.lines.append(line)

    def _newline(self) -> None:
        self._add((self._prefix(self._cur_depth) + "".join(self._cur)).rstrip())
        self._cur = []
        self._cur_depth = self._quote

    def _write(self, text: str) -> None:
        if self._started:
            if self._pending_nl:
                previous_depth = self._cur_depth
                self._newline()
                if self._pending_nl >= 2:
                    self._add(self._prefix(min(previous_depth, self._quote)).rstrip())
                self._pending_space = False
        else:
            self._started = True
            self._cur_depth = self._quote
        self._pending_nl = 0
        if self._marker:
            self._cur.append(self._marker)
            self._marker = ""
            self._pending_space = False
        if self._pending_space and self._cur:
            self._cur.append(" ")
        self._pending_space = False
        self._cur.append(text)

    def _hard_newline(self) -> None:
        """A line break inside <pre>; a pending block break already provides one."""
        if self._started and not self._pending_nl:
            self._newline()

    def finish(self) -> str:
        if self._cur:
            try:
                self._newline()
            except _Full:
                pass
        result: list[str] = []
        for line in self.lines:
            if not line and (not result or not result[-1]):
                continue
            result.append(line)
        while result and not result[-1]:
            result.pop()
        return "\n".join(result)

    # -- parser events ----------------------------------------------------------------------
    def handle_data(self, data: str) -> None:
        if self._skip:
            if self._skip != ["head"] or not data.strip():
                return
            self._skip.clear()  # text in an unclosed <head>: the body has begun
        data = data.translate(_INVISIBLE)
        if "\u200c" in data:
            data = _PADDING_ZWNJ.sub("", data)
        if self._links:
            self._links[-1][1].append(data)
        if self._pre:
            chunks = data.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ").split("\n")
            for index, chunk in enumerate(chunks):
                if index:
                    self._hard_newline()
                if chunk:
                    self._write(chunk)
            return
        text = _WS.sub(" ", data)
        if not text:
            return
        if text[0] == " ":
            self._pending_space = True
            text = text[1:]
        trailing = text.endswith(" ")
        if trailing:
            text = text[:-1]
        if text:
            self._write(text)
        if trailing:
            self._pending_space = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self._skip.clear()  # a <head> left open ends where the body starts
            return
        if self._skip == ["head"] and tag not in _HEAD_CONTENT:
            self._skip.clear()  # an unclosed <head> ends at the first body element
        if tag in _SKIP:
            self._skip.append(tag)
            return
        if self._skip:
            return
        if tag == "br":
            if self._started:
                self._pending_nl = min(2, self._pending_nl + 1)
        elif tag in ("ul", "ol"):
            self._break(1 if self._lists else 2)
            self._lists += 1
        elif tag == "li":
            self._break(1)
            self._marker = "  " * min(max(0, self._lists - 1), _MAX_DEPTH) + "- "
        elif tag in _LINE_BLOCKS:
            self._break(1)
        elif tag in _PARAGRAPH_BLOCKS:
            self._break(2)
        elif tag == "blockquote":
            self._break(2)
            self._quote += 1
        elif tag == "pre":
            self._break(2)
            self._pre += 1
        elif tag in ("td", "th"):
            if self._cur:
                self._pending_space = True
        elif tag == "a":
            if self._links:  # no link inside a link: a browser closes the open one
                spaced = self._pending_space
                self.handle_endtag("a")
                self._pending_space = spaced
            href = ""
            for name, value in attrs:
                if name == "href" and value:
                    href = value.strip()
            self._links.append((href, []))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/> and friends: a start tag only (the default would also fire an end tag).
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            if tag in self._skip:
                while self._skip and self._skip.pop() != tag:
                    pass
            return
        if self._skip:
            return
        if tag == "br":
            self.handle_starttag("br", [])
        elif tag in ("ul", "ol"):
            self._lists = max(0, self._lists - 1)
            self._break(1 if self._lists else 2)
        elif tag in _LINE_BLOCKS:
            self._break(1)
        elif tag in _PARAGRAPH_BLOCKS:
            self._break(2)
        elif tag == "blockquote":
            self._break(2)
            self._quote = max(0, self._quote - 1)
        elif tag == "pre":
            self._break(2)
            self._pre = max(0, self._pre - 1)
        elif tag == "a" and self._links:
            href, pieces = self._links.pop()
            if self._links:
                self._links[-1][1].extend(pieces)
            text = _WS.sub(" ", "".join(pieces)).strip()
            low = href.lower()
            if text and href and not low.startswith(("#", "javascript:", "cid:")):
                if _comparable(href) != _comparable(text):
                    self._pending_space = True
                    self._write(f"({href})")


def _strip_tags(html: str) -> str:
    """Last resort when the parser fails: drop anything tag-like, unescape, tidy spaces."""
    text = unescape(re.sub(r"<[^<>]*>", " ", html))
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def html_to_text(html: str) -> str:
    """Render ``html`` as readable plain text (see the module docstring). Never raises."""
    if not html:
        return ""
    try:
        renderer = _TextRenderer(_OUTPUT_FACTOR * len(html))
        try:
            renderer.feed(_canonical_html(html))
            renderer.close()
        except _Full:
            pass  # hostile nesting: the text so far
        return renderer.finish()
    except Exception:  # the stdlib parser has raised AssertionError on odd declarations
        try:
            return _strip_tags(html)
        except Exception:
            return ""


# --------------------------------------------------------------------------------------------
# New text, quoted history, signature
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Split:
    """A message body in three parts: written now, quoted history, signature."""

    new: str
    quoted: str
    signature: str


# Attribution lines: (opening word, phrase that must occur before the final colon).
_ATTRIBUTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("on ", ("wrote",)),  # English: On Mon, 1 Jan 2024, Alice <a@b> wrote:
    ("el ", ("escribió", "escribio")),  # Spanish
    ("am ", ("schrieb",)),  # German: Am 01.01.2024 um 10:00 schrieb Alice <a@b>:
    ("le ", ("a écrit", "a ecrit")),  # French: Le 1 janv. 2024, Alice a écrit :
    ("op ", ("schreef",)),  # Dutch
    ("il ", ("ha scritto",)),  # Italian
    ("em ", ("escreveu",)),  # Portuguese
    ("den ", ("skrev",)),  # Scandinavian
)
_ORIGINAL_MESSAGE = frozenset(
    {
        "original message",
        "mensaje original",
        "ursprüngliche nachricht",
        "message d'origine",
        "messaggio originale",
        "mensagem original",
        "oorspronkelijk bericht",
        "originalmeddelande",
        "original meddelelse",
    }
)
_FORWARD_MARKERS = (
    "forwarded message",
    "begin forwarded message",
    "forwarded e-mail",
    "forwarded email",
    "mensaje reenviado",
    "weitergeleitete nachricht",
    "message transféré",
    "doorgestuurd bericht",
    "messaggio inoltrato",
    "mensagem encaminhada",
)
# Outlook-style header blocks, by field name (the text before the colon, lower-cased).
_FROM_FIELDS = frozenset({"from", "de", "von", "van", "da", "från", "fra", "od"})
_DATE_FIELDS = frozenset(
    {
        "sent", "date", "enviado", "enviado el", "fecha", "gesendet", "datum", "envoyé",
        "verzonden", "inviato", "data", "skickat", "sendt",
    }
)  # fmt: skip
_SUBJECT_FIELDS = frozenset(
    {"subject", "asunto", "betreff", "objet", "onderwerp", "oggetto", "assunto", "ämne", "emne"}
)
_TO_FIELDS = _SUBJECT_FIELDS | {"to", "cc", "para", "an", "à", "aan", "a", "till"}
_FORWARD_SUBJECT = ("fw:", "fwd:", "fw :", "fwd :", "rv:", "wg:", "tr:", "i:")
_MOBILE_SIGNATURES = (
    "sent from my ",
    "sent from outlook",
    "sent from mail for windows",
    "sent from yahoo mail",
    "sent from proton mail",
    "sent from the all new aol app",
    "sent via ",
    "sent with ",
    "get outlook for ",
    "enviado desde mi ",
    "enviado desde outlook",
    "enviado do meu ",
    "von meinem ",
    "gesendet von meinem ",
    "envoyé de mon ",
    "envoyé depuis mon ",
    "inviato da ",
    "verzonden vanaf mijn ",
)

_NEW, _QUOTED, _SIGNATURE, _FORWARD = 0, 1, 2, 3
_PLAIN_DASH_REACH = 10  # a bare "--" only counts as a delimiter this close to the end
_MOBILE_REACH = 3  # "Sent from my iPhone" only counts among the last lines of a run
_OPENINGS = tuple(opening for opening, _ in _ATTRIBUTIONS)
_MOBILE_FIRST = frozenset(prefix[0] for prefix in _MOBILE_SIGNATURES)
_LOOKAHEAD = 3  # blank lines skipped when looking for what follows a line
# How a line that opens a "From:" field can start ("*From:*" in Outlook's rich text): any other
# first character rules the header block out before the field name is read. Only the ASCII
# capitals lower-case to these letters.
_FIELD_FIRST = frozenset({"*"} | {c for name in _FROM_FIELDS for c in (name[0], name[0].upper())})


def _field(text: str) -> str:
    """The header field name a stripped line starts with ("*From:* x" -> "from"), or ""."""
    colon = text.find(":", 0, 20)
    if colon <= 0:
        return ""
    return text[:colon].replace("*", "").strip().lower()


def _is_attribution(text: str, *, generic: bool) -> bool:
    """``text`` (stripped) is an attribution line; ``generic``: a ">" block follows it."""
    if len(text) > 400 or not text.endswith(":"):
        return False
    lower = text.lower()
    if not lower.startswith(_OPENINGS) and not lower.endswith("wrote:"):
        return False
    # An attribution names a date or an address; without a ">" block below it, insist on one
    # so that a sentence like "On Monday the monitor wrote:" is not taken for history.
    if not generic and not any(ch.isdigit() or ch == "@" for ch in text):
        return False
    for opening, verbs in _ATTRIBUTIONS:
        if lower.startswith(opening) and any(verb in lower for verb in verbs):
            return True
    # "Alice <alice@example.com> wrote:" with no date: only when a quote follows (generic).
    return generic and lower.endswith("wrote:")


class _Scan:
    """Line classification over stripped lines; every probe looks at most a few lines ahead."""

    def __init__(self, stripped: list[str]) -> None:
        self.s = stripped
        self.count = len(stripped)
        self._fields: list[str | None] = [None] * self.count

    def field(self, index: int) -> str:
        """The header field name line ``index`` starts with, computed once (blocks overlap)."""
        name = self._fields[index]
        if name is None:
            name = self._fields[index] = _field(self.s[index])
        return name

    def next_content(self, start: int) -> int:
        """Index of the first non-blank line in ``start`` .. ``start + 2``, or -1."""
        for index in range(start, min(self.count, start + _LOOKAHEAD)):
            if self.s[index]:
                return index
        return -1

    def quote_follows(self, start: int) -> bool:
        follower = self.next_content(start)
        return follower >= 0 and self.s[follower][0] == ">"

    def attribution_length(self, index: int) -> int:
        """How many lines (0, 1 or 2) form an attribution starting at ``index``."""
        text = self.s[index]
        if text[-1] == ":":
            return 1 if _is_attribution(text, generic=self.quote_follows(index + 1)) else 0
        if index + 1 < self.count and text[:4].lower().startswith(_OPENINGS):
            second = self.s[index + 1]
            if second and second[0] != ">" and second[-1] == ":":
                joined = text + " " + second
                return 2 if _is_attribution(joined, generic=self.quote_follows(index + 2)) else 0
        return 0

    def header_block(self, index: int) -> tuple[bool, bool]:
        """An Outlook-style "From: / Sent: / To:" block starts here; and is it a forward?"""
        if self.field(index) not in _FROM_FIELDS:
            return False, False
        has_date = has_to = forward = False
        for follower in range(index + 1, min(self.count, index + 8)):
            name = self.field(follower)
            if name in _DATE_FIELDS:
                has_date = True
            elif name in _TO_FIELDS:
                has_to = True
                if name in _SUBJECT_FIELDS:
                    value = self.s[follower].split(":", 1)[1].replace("*", "").strip().lower()
                    forward = value.startswith(_FORWARD_SUBJECT)
        return has_date and has_to, forward

    def separator(self, index: int) -> int | None:
        """History starts at "-----Original Message-----", or at a "_____" rule followed by a
        From: line; a forward does, when the header block below has an "FW:" subject."""
        text = self.s[index]
        follower = self.next_content(index + 1)
        if text.startswith("--"):
            if text.strip("-_ ").strip().lower() not in _ORIGINAL_MESSAGE:
                return None
        elif len(text) < 10 or text.strip("_") or follower < 0 or self.field(follower) not in _FROM_FIELDS:
            return None
        if follower >= 0 and self.header_block(follower) == (True, True):
            return _FORWARD
        return _QUOTED

    def forward_marker(self, index: int) -> bool:
        text = self.s[index]
        core = text.strip("-_= ").lower()
        if core.startswith("begin forwarded message"):
            return True
        return text.startswith("--") and core.startswith(_FORWARD_MARKERS)


def _label(stripped: list[str]) -> list[int]:
    """One label per line: new, quoted or forward (signatures are found afterwards)."""
    scan = _Scan(stripped)
    count = len(stripped)
    labels = [_NEW] * count
    index = 0
    while index < count:
        text = stripped[index]
        if not text:
            index += 1
            continue
        first = text[0]
        if first == ">":
            labels[index] = _QUOTED
            index += 1
            continue
        rest: int | None = None  # label for every line from here on, when history starts
        if first in "-_bB" and scan.forward_marker(index):
            rest = _FORWARD  # a forward is content the author sends now
        elif first in "-_" and (separated := scan.separator(index)) is not None:
            rest = separated
        else:
            # Cheap gates first: an attribution ends with ":" (on this line or, wrapped, on the
            # next one); a header block starts with "Name:" within the first few characters.
            wrapped = index + 1 < count and first.lower() in "oelaid" and stripped[index + 1][-1:] == ":"
            length = scan.attribution_length(index) if text[-1] == ":" or wrapped else 0
            if length:
                labels[index : index + length] = [_QUOTED] * length
                index += length
                if not scan.quote_follows(index):
                    # An attribution without ">" quoting: the rest is the unprefixed original.
                    labels[index:] = [_QUOTED] * (count - index)
                    break
                continue
            if first in _FIELD_FIRST and text.find(":", 0, 20) > 0:
                is_block, is_forward = scan.header_block(index)
                if is_block:
                    rest = _FORWARD if is_forward else _QUOTED
        if rest is not None:
            labels[index:] = [rest] * (count - index)
            break
        index += 1

    # Blank lines inside a quoted block belong to it.
    previous = _NEW
    run_start = -1
    for index, text in enumerate(stripped):
        if not text:
            if run_start < 0:
                run_start = index
            continue
        if run_start >= 0 and previous == _QUOTED and labels[index] == _QUOTED:
            labels[run_start:index] = [_QUOTED] * (index - run_start)
        run_start = -1
        previous = labels[index]
    return labels


def _mark_signatures(lines: list[str], stripped: list[str], labels: list[int]) -> None:
    """Relabel the signature at the end of each run of new lines (delimiter line dropped)."""
    count = len(lines)
    start = 0
    while start < count:
        if labels[start] != _NEW:
            start += 1
            continue
        end = start
        while end < count and labels[end] == _NEW:
            end += 1
        content = [i for i in range(start, end) if stripped[i]]
        total = len(content)
        for position, i in enumerate(content):
            text = stripped[i]
            remaining = total - position - 1
            first = text[0]
            if first == "-":
                is_delimiter = text == "--" and (lines[i].rstrip("\r\n") == "-- " or remaining <= _PLAIN_DASH_REACH)
                if is_delimiter:
                    labels[i:end] = [_SIGNATURE] * (end - i)
                    stripped[i] = lines[i] = ""
                    break
            elif (
                remaining < _MOBILE_REACH
                and first.lower() in _MOBILE_FIRST
                and len(text) <= 80
                and text.lower().startswith(_MOBILE_SIGNATURES)
            ):
                labels[i:end] = [_SIGNATURE] * (end - i)
                break
        start = end


_BLANK_RUN = re.compile(r"\n{3,}")


def _join(lines: list[str]) -> str:
    """Join lines, trimming blank lines at both ends and collapsing runs of blank lines.

    Trailing whitespace goes first, which leaves every blank line empty (and no other line):
    then blank lines are runs of newlines, trimmed at the ends and collapsed to one.
    """
    text = "\n".join([line.rstrip() for line in lines]).strip("\n")
    return _BLANK_RUN.sub("\n\n", text) if "\n\n\n" in text else text


def split_message(text: str) -> Split:
    """Split a plain-text body into what the author wrote now, quoted history and signature.

    Quoted history starts at the first ">" line, attribution line ("On ... wrote:", "El ...
    escribió:", "Am ... schrieb ...:", "Le ... a écrit :", also wrapped over two lines),
    "-----Original Message-----" separator, "____" rule before a From: line, or Outlook
    "From:/Sent:/To:/Subject:" header block. Unquoted lines between or after ">" blocks are
    inline answers and stay new; after an unprefixed quote (Outlook, or an attribution with no
    ">" below it) everything is history. A forwarded message is content the author sends now:
    it stays in ``new``. The signature is what follows a "-- " line (or a bare "--" near the
    end) or a "Sent from my iPhone"-style line; the delimiter itself is dropped.
    """
    if not isinstance(text, str) or not text:
        return Split(new="", quoted="", signature="")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    stripped = [line.strip() for line in lines]
    labels = _label(stripped)
    _mark_signatures(lines, stripped, labels)
    if _QUOTED not in labels and _SIGNATURE not in labels:
        # Nothing quoted, no signature (most messages): every line is new, none to set apart.
        return Split(new=_join(lines), quoted="", signature="")

    new: list[str] = []
    quoted: list[str] = []
    signature: list[str] = []
    previous = _NEW
    for line, text_line, label in zip(lines, stripped, labels, strict=True):
        if label == _QUOTED:
            quoted.append(line)
        elif label == _SIGNATURE:
            signature.append(line)
        else:
            if previous != _NEW and previous != _FORWARD and new:
                new.append("")  # keep inline answers apart, and text that follows a signature
            new.append(line)
        if text_line:
            previous = label
    return Split(new=_join(new), quoted=_join(quoted), signature=_join(signature))
