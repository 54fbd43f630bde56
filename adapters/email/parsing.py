"""Raw RFC 5322 / MIME bytes to the channel-neutral :class:`~intake.model.InboundMessage`.

:func:`parse_email` runs for every delivered message, on the event loop, and never raises:
whatever the bytes, the caller gets a message to store (``parse_problem`` says what could not
be read) and ``raw`` keeps the bytes untouched. The ladder, from the happy path down::

    mail-parser (its reading of the bytes and its nesting guard, not its analysis: see
    _MimeReader); its stdlib Message is read for headers, text and attachments
       | raises: any MailParserError, or any other exception (a bug there or here)
    stdlib email.message_from_bytes, compat32          parse_problem "mail-parser failed: <class>"
       | raises too (skipped after MailParserRecursionError: it recurses the same way)
    stdlib header-only parse; body = the raw text after the headers    "unparseable MIME: <class>"
       | raises
    nothing parsed; body = the raw bytes as UTF-8 (replace), capped    "unparseable MIME: <class>"

Broken structure is salvaged rather than reported: a multipart whose declared boundary never
occurs is re-read with the boundary it does use, and parts that a reused boundary pushed into
the epilogue are read back. A multipart never closed is flagged ("may be truncated").

The body is the text/plain parts; else the text/html parts as text (``html=True``); else
named inline text parts; else the body of the first attached message. In a
multipart/alternative whose plain part does not stand for its HTML (a placeholder such as
"This message is in HTML format", or a plain part cut short: ``alternative.choose``), the
HTML's text is the body (``html=True``). Attached messages and delivery reports are
attachments, not the author's text.

Text is decoded leniently everywhere: the declared charset, then UTF-8, then cp1252, then
Latin-1 (which cannot fail). A part labelled ASCII/Latin-1/cp1252 that is valid UTF-8 is read
as UTF-8: mislabelled UTF-8 is common, Latin-1 text that happens to be valid UTF-8 is not.
Raw 8-bit header bytes that are not UTF-8 are read in the charset the message declares for
its text. NUL characters are dropped from text (PostgreSQL cannot store them).
"""

from __future__ import annotations

import binascii
import dataclasses
import email
import email.parser
import email.utils
import io
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import (
    CloseBoundaryNotFoundDefect,
    InvalidBase64CharactersDefect,
    InvalidBase64LengthDefect,
    InvalidBase64PaddingDefect,
)
from email.generator import BytesGenerator
from email.headerregistry import HeaderRegistry
from email.message import Message
from email.policy import compat32

import mailparser
from mailparser.exceptions import MailParserError, MailParserRecursionError

from adapters.email.alternative import choose
from intake.headers import stored_name
from intake.model import Attachment, Channel, InboundMessage
from intake.text import html_to_text, split_message

__all__ = ["parse_email"]

log = logging.getLogger(__name__)
# mail-parser logs "Email content 'alternative' not handled" at WARNING for ordinary multiparts.
logging.getLogger("mailparser").setLevel(logging.CRITICAL)

_RAW_BODY_CAP = 256 * 1024  # bytes of raw text kept as the body when MIME could not be read
_MAX_REFERENCES = 64  # the root and the nearest ancestors are what threading needs
_MAX_INNER_DEPTH = 3  # attached messages looked into for a body when the outer one has none
_MAX_SALVAGE = 8  # broken multiparts re-read per message

# An RFC 2047 encoded word. No part of it can cross a "?" so a failed attempt stops at the
# next "?": linear, unlike a ".*?" body (the stdlib's ecre allows spaces; so do we).
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?]*)\?=")
_ANGLE_ID = re.compile(r"<([^<>]*)>")
# An address: no whitespace, no specials, no control character (C reads a From with a NUL as
# empty; PostgreSQL refuses NUL in text) and no lone surrogate.
_ADDRESS_CHAR = r"[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_ADDRESS = re.compile(rf"{_ADDRESS_CHAR}+@{_ADDRESS_CHAR}+")
_SURROGATE = re.compile("[\ud800-\udfff]")
# One entry of a plain address list: "Jane Doe <jd@example.com>" or "jd@example.com", ASCII
# atoms only (no quotes, comments, routes, groups or encoded words). What the stdlib parser
# makes of such an entry is known (the name's words joined by one space), so it is read here.
_NAME_WORD = r"[A-Za-z0-9.'_-]+"
_ADDR_SPEC = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
# One quoted display name and one plain address, as Outlook writes "Doe, Jane" <jd@x.com>:
# every parser, OpenDMARC's included, reads the address in the brackets.
_QUOTED_NAME_ADDRESS = re.compile(rf'[ \t]*"([^"\\\r\n]*)"[ \t]*<({_ADDR_SPEC})>[ \t]*')
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:((?:{_NAME_WORD}[ \t]+)*{_NAME_WORD}[ \t]*|)<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*"
)

# Codecs that cannot produce lone surrogates; anything else is checked after decoding.
_SAFE_CODECS = frozenset({"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin-1", "cp1252"})
# Labels that are often a client's default rather than the truth; UTF-8 is tried first.
_WEAK_LABELS = frozenset(
    {"us-ascii", "ascii", "iso-8859-1", "iso8859-1", "latin-1", "latin1", "cp1252", "windows-1252"}
)
# Supersets that decode what mailers actually send under the narrower label.
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "windows-874": "cp874",
    "utf8": "utf-8",
}


class _MimeReader(mailparser.MailParser):  # type: ignore[misc]
    """mail-parser's reading of the bytes, without the analysis nobody here reads.

    ``MailParser.from_bytes`` builds the stdlib ``Message`` (compat32) and turns a
    ``RecursionError`` of deep nesting into ``MailParserRecursionError``; its constructor then
    runs ``MailParser.parse()``, which decodes every address header, every Date and Received
    header, collects defects, re-encodes attachments to base64 and builds two dicts of every
    header. We read only ``.message`` (our own extraction below works on it), and that
    analysis cost five times the parse itself (~750 µs against ~150 µs for a 4 KB message),
    so it is left out: ``parse`` does nothing here. A side effect: a crash inside that analysis
    (mail-parser raised AttributeError on some truncated multiparts) no longer sends the message
    down the stdlib fallback, which read the same bytes the same way but noted "mail-parser
    failed" on the ticket.
    """

    def parse(self) -> _MimeReader:
        return self


def _read_mime(raw: bytes) -> Message:
    """The bytes as a stdlib ``Message``, read by mail-parser (raises its MailParserError)."""
    message = _MimeReader.from_bytes(raw).message
    assert isinstance(message, Message)
    return message


@dataclass(frozen=True, slots=True, kw_only=True)
class _Delivery:
    """What the SMTP transaction told us, besides the bytes."""

    recipient: str
    envelope_sender: str | None
    max_attachment_bytes: int | None
    max_attachments_total: int | None


# --------------------------------------------------------------------------------------------
# Text decoding
# --------------------------------------------------------------------------------------------


def _try_decode(data: bytes, codec: str) -> str | None:
    try:
        text = data.decode(codec)
    except (LookupError, UnicodeError, ValueError, TypeError):
        return None
    if codec not in _SAFE_CODECS and _SURROGATE.search(text):
        return None  # e.g. UTF-7 or unicode_escape can yield lone surrogates
    return text


def _codec(charset: str | None) -> str:
    label = (charset or "").strip().strip("\"'").lower()
    return _CHARSET_ALIASES.get(label, label)


# Charsets whose text is all 7-bit bytes (ISO-2022 escape sequences, UTF-7's "+...-" runs,
# HZ's "~{...~}"): ASCII bytes under these labels are not ASCII text.
_SEVEN_BIT = ("iso-2022", "iso2022", "csiso2022", "utf-7", "utf7", "unicode-1-1-utf-7", "hz")


def _decode_bytes(data: bytes, charset: str | None, *, hint: str | None = None) -> str:
    """Bytes to text: declared charset, UTF-8, ``hint``, cp1252, Latin-1. Never fails."""
    if not data:
        return ""
    if data.isascii() and not (charset and _codec(charset).startswith(_SEVEN_BIT)):
        return data.decode("ascii")  # the common case: no charset looked up
    label = _codec(charset)
    if label and label not in _WEAK_LABELS:
        text = _try_decode(data, label)
        if text is not None:
            return text
    for codec in ("utf-8", _codec(hint), "cp1252"):
        if codec:
            text = _try_decode(data, codec)
            if text is not None:
                return text
    return data.decode("latin-1")


# A run of well-formed multi-byte UTF-8 sequences (RFC 3629: no overlongs, no surrogates).
_UTF8_RUN = re.compile(
    rb"(?:[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf4[\x80-\x8f][\x80-\xbf]{2})+"
)


# Where the mixed reading is tried: what a message says of its text, and a header's size (it
# walks the header's UTF-8 runs in Python: a few ms for the largest, 2 s for 5 MB).
_MIXED_HINTS = frozenset({"", "utf-8", "utf8", "us-ascii", "ascii"})
_MIXED_MAX = 16_384
# A lone two-byte "UTF-8 character" that is a cp1252 letter followed by one of cp1252's
# punctuation bytes (80-9F: “ ” … – € ...): "ß“" reads as NKo, "É…" as Latin Extended-B. Lead
# C3, CC and CD are left out: UTF-8's own Latin-1 capitals (À-ß) are C3 80-9F, macOS writes
# "é" as "e" and a combining accent (CC 81), and "Ã", "Ì" or "Í" before “ are rare in cp1252.
_ACCIDENT = re.compile(rb"[\xc0-\xc2\xc4-\xcb\xce-\xdf][\x80-\x9f]")


def _mixed_utf8(data: bytes) -> str | None:
    """A raw header in UTF-8 with stray bytes of a single-byte charset ("café" typed in one
    program, a name pasted from another): the UTF-8 sequences as UTF-8, the stray bytes as
    cp1252 (Latin-1 where cp1252 has none). Read whole as cp1252 instead, every UTF-8 "é" came
    out "Ã©". None unless UTF-8 is the better reading: no more stray bytes than UTF-8
    characters, and none of those in the scripts a cp1252 pair reads as by chance."""
    parts: list[str] = []
    utf8_chars = stray = pos = 0
    for run in _UTF8_RUN.finditer(data):
        between = data[pos : run.start()]
        stray += len(between) - len(between.decode("ascii", "ignore"))
        parts.append(_single_byte_text(between))
        text = run.group().decode("utf-8")
        if len(run.group()) == 2 and _ACCIDENT.fullmatch(run.group()):
            return None  # one cp1252 letter and a punctuation byte ("ß“", "É…"): no UTF-8 at all
        utf8_chars += len(text)
        parts.append(text)
        pos = run.end()
    tail = data[pos:]
    stray += len(tail) - len(tail.decode("ascii", "ignore"))
    if stray > utf8_chars or utf8_chars == 0:
        return None
    parts.append(_single_byte_text(tail))
    return "".join(parts)


def _single_byte_text(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _fix_surrogates(value: str, hint: str | None = None) -> str:
    """Raw 8-bit header bytes arrive as surrogate escapes: read them as UTF-8, else in the
    charset the message declares for its text (``hint``), else cp1252."""
    if value.isascii():
        return value
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escapes of bytes
        return value.encode("utf-8", "replace").decode("utf-8")
    if len(data) <= _MIXED_MAX and _codec(hint) in _MIXED_HINTS and _try_decode(data, "utf-8") is None:
        # Not UTF-8 as a whole, where the message says UTF-8, ASCII or nothing: UTF-8 with a
        # stray byte or two is likelier than cp1252 throughout. A single-byte charset that
        # the message declares (windows-1251, even windows-1252) is read as declared.
        mixed = _mixed_utf8(data)
        if mixed is not None:
            return mixed
    return _decode_bytes(data, "utf-8", hint=hint)


def _word_bytes(encoding: str, text: str) -> bytes | None:
    try:
        if encoding in "qQ":
            return binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
        data = text.encode("ascii", "replace").rstrip(b"=")
        data += b"=" * (-len(data) % 4)
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        return None


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words. Whitespace between two encoded words is dropped, and
    adjacent words in one charset are decoded together (mailers split multi-byte characters
    across words). A word that does not decode stays as it is."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: list[bytes] = []
    pending_charset = ""
    after_word = False
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        pos = match.end()
        data = _word_bytes(match.group(2), match.group(3))
        if data is None:
            out.append(_decode_bytes(b"".join(pending), pending_charset))
            pending.clear()
            out.append(between + match.group())
            after_word = False
            continue
        charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 language: utf-8*en
        joined = after_word and (not between or between.isspace())
        if not joined or charset != pending_charset:
            out.append(_decode_bytes(b"".join(pending), pending_charset))
            pending.clear()
        if not joined:
            out.append(between)
        pending.append(data)
        pending_charset = charset
        after_word = True
    out.append(_decode_bytes(b"".join(pending), pending_charset))
    out.append(value[pos:])
    return "".join(out)


def _clean(value: str) -> str:
    """Header text for storage: no line breaks, no NULs, trimmed."""
    if "\r" in value or "\n" in value:
        value = value.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value.strip()


def _unfold(value: object, hint: str | None = None) -> str:
    """A raw header value (possibly an email.header.Header) unfolded, bytes read leniently."""
    text = value if isinstance(value, str) else str(value)
    if "\n" in text or "\r" in text:
        text = text.replace("\r\n", "").replace("\n", "").replace("\r", "")
    return _fix_surrogates(text, hint)


def _text_charset(message: Message) -> str | None:
    """The first charset the message declares for a text part (a hint for raw 8-bit headers)."""
    stack = [message]
    for _ in range(32):
        if not stack:
            break
        part = stack.pop()
        charset = part.get_param("charset")
        if isinstance(charset, str) and charset:
            return charset
        children = part.get_payload()
        if isinstance(children, list):
            stack.extend(child for child in reversed(children) if isinstance(child, Message))
    return None


# --------------------------------------------------------------------------------------------
# Header fields
# --------------------------------------------------------------------------------------------


def _address_pairs(values: list[str]) -> list[tuple[str, str]]:
    """Display names and valid bare addresses from unfolded raw values.

    The raw value is split first and the names decoded afterwards, so an encoded name with a
    comma ("Doe, John") stays one name. Only if that finds no address is the decoded value
    tried (spam encodes the address itself).
    """
    pairs = _getaddresses(values)
    if not pairs and any("=?" in value for value in values):
        pairs = _getaddresses([_decode_words(value) for value in values])
    return pairs


_HEADERS = HeaderRegistry()


def _mailbox(address: str) -> str:
    """An address as a border check compares it: only spaces and tabs trimmed, letters lowered
    but never into ASCII from outside it (``str.lower`` makes the Kelvin sign a "k"; ``strip``
    drops a no-break space that a byte-level parser keeps in the domain)."""
    address = address.strip(" \t")
    if address.isascii():
        return address.lower()
    return "".join(c if not c.isascii() and c.lower().isascii() else c.lower() for c in address)


def _outlook_quoted(written: str) -> bool:
    """Outlook's display-name form of an address: ``'alice@acme.com'``."""
    return len(written) > 2 and written[0] == written[-1] == "'"


def _names(written: str, address: str) -> bool:
    """Whether ``written`` is ``address``, or Outlook's ``'address'`` display-name form of it."""
    return written == address or (_outlook_quoted(written) and written[1:-1] == address)


def _author(headers: _Headers) -> tuple[tuple[str, str] | None, bool]:
    """(display name, address) of the message's author, and whether From was ambiguous.

    The author's address decides who may join a ticket, so it is read as a DMARC check at the
    border reads it, and nothing else: the one mailbox of From, as written. An address that
    only appears once encoded words are decoded was never checked by anyone, and neither was
    the Sender field. So a From field that names more than one mailbox ("alice@acme.com
    <evil@x.com>", "alice@acme.com, <"m"@evil.example>", whatever Sender says), one that is not
    a plain address (a quoted local part, a domain literal, an encoded word), or one whose
    forms the lenient and the strict parser read differently, is ambiguous: no author. One
    mailbox named twice ("alice@acme.com <alice@acme.com>", Outlook's "'alice@acme.com'
    <alice@acme.com>") is that mailbox. A From without anything address-like has no author
    either: the envelope sender (which SPF checks) stands in, never Sender (which nothing does).
    """
    values = headers.all("from")
    if len(values) == 1 and (quoted := _QUOTED_NAME_ADDRESS.fullmatch(values[0])) is not None:
        return (_display(quoted.group(1)), _mailbox(quoted.group(2))), False
    found = _parsed_addresses(values)
    if found is None:
        return None, True
    written = [_mailbox(address) for _, address in found if "@" in address]
    if not written:
        return (None, True) if any("@" in _decode_words(value) for value in values) else (None, False)
    plain = {w for w in written if not _outlook_quoted(w)}
    if len(plain) != 1:
        return None, True
    (address,) = plain
    if len(address) > 320 or not _ADDRESS.fullmatch(address) or not all(_names(w, address) for w in written):
        return None, True
    if _simple_addresses(values) is None and not (
        sum(map(len, values)) <= _FROM_MAX and _plain_form(values, address) and _strict_agrees(values, address)
    ):
        return None, True
    name = next((n for n, a in found if n and _names(_mailbox(a), address)), "")
    return (_display(name), address), False


def _display(name: str) -> str:
    """A display name as stored: decoded, one line, cut as Slack's are (``stored_name``)."""
    return stored_name(_clean(_decode_words(name)))


# Off the fast path a From is read twice more (below); no author's From is longer than this,
# and the stdlib's strict parser takes seconds over a few hundred KB of comments.
_FROM_MAX = 4096
_QUOTED_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"|\((?:[^()\\]|\\.)*\)')


def _plain_form(values: list[str], address: str) -> bool:
    """Whether each From value is the plain shape of one mailbox, ``address``: quoted strings
    and comments aside, either one "@" and no angle brackets, or one <...> holding ``address``
    with no other "@" around it but the address itself as its name. Both Python parsers skip
    what they cannot read ("alice@acme.com <@evil.example>": an empty route address), where
    OpenDMARC reads the first <...> (evil.example) or nothing at all (no check was made)."""
    for value in values:
        bare = _QUOTED_OR_COMMENT.sub(" ", value)
        if '"' in bare or "(" in bare or ")" in bare:
            return False  # unbalanced (or nested) quotes or comments
        opens, closes = bare.count("<"), bare.count(">")
        if opens != closes or opens > 1:
            return False
        if not opens:
            if bare.count("@") != 1:
                return False
            continue
        start, end = bare.index("<"), bare.index(">")
        if end < start or _mailbox(bare[start + 1 : end]) != address:
            return False
        name = (bare[:start] + bare[end + 1 :]).strip(" \t,;")
        if "@" in name and not _names(_mailbox(name), address):
            return False
    return True


def _strict_agrees(values: list[str], address: str) -> bool:
    """Whether the strict RFC 5322 parser finds no mailbox in From but ``address`` (or its
    Outlook form). The lenient one skips what it cannot read: "mallory@evil.example
    x@<alice@acme.com>" is Alice to it and Mallory to the strict one, as to a DMARC check."""
    try:
        parsed = [_HEADERS("From", value) for value in values]
    except Exception:  # the strict parser has raised on odd input: no agreement
        return False
    return all(_names(_mailbox(a.addr_spec), address) for h in parsed for a in h.addresses if "@" in a.addr_spec)


def _simple_addresses(values: list[str]) -> list[tuple[str, str]] | None:
    """What ``email.utils.getaddresses`` returns for plain lists ("Jane Doe <jd@example.com>,
    x@example.org"), or None for anything else (quotes, comments, groups, encoded words,
    non-ASCII, routes, empty entries): those go to the stdlib parser."""
    if not values:
        return []
    pairs: list[tuple[str, str]] = []
    for piece in ", ".join(values).split(","):
        found = _SIMPLE_ADDRESS.fullmatch(piece)
        if found is None:
            return None
        name, routed, bare = found.groups()
        pairs.append((" ".join(name.split()), routed) if routed else ("", bare))
    return pairs


def _parsed_addresses(values: list[str]) -> list[tuple[str, str]] | None:
    """(name, address) as the parser reads them, valid or not; None when the parser failed."""
    found = _simple_addresses(values)
    if found is None:
        try:
            found = email.utils.getaddresses(values)
        except Exception:  # the stdlib address parser has raised IndexError on odd input
            return None
    return found


def _getaddresses(values: list[str]) -> list[tuple[str, str]]:
    found = _parsed_addresses(values)
    if found is None:
        return []
    pairs: list[tuple[str, str]] = []
    for name, address in found:
        address = _mailbox(address)  # as the author's: no letter lowered into ASCII from outside it
        if len(address) > 320 or not _ADDRESS.fullmatch(address):
            continue
        pairs.append((_clean(_decode_words(name)), address))
    return pairs


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# Dropped from a Message-ID: C0 controls, DEL, C1 controls, and lone surrogates (no database
# stores one). Whitespace is already gone.
_ID_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# A longer "id" is none (a header line holds 998 characters; the database's column 1,000,
# which PostgreSQL enforces: every delivery of the message was answered 451). A message
# without a Message-ID is the same message by its bytes.
_ID_MAX = 990


def _ids(value: str | None) -> list[str]:
    """Message-IDs without brackets: the <...> tokens, or bare id-like words if there are none."""
    if not value:
        return []
    tokens = _ANGLE_ID.findall(value)
    if not tokens:
        tokens = [word for word in value.replace(",", " ").split() if "@" in word]
    ids: list[str] = []
    for token in tokens:
        # No angle bracket may survive inside an id ("0<@" from a broken header): ids are
        # stored and matched without them, and written back between them. Nor may a control
        # character (no part of RFC 5322's msg-id): a NUL made PostgreSQL refuse the message,
        # every delivery of it answered 451.
        token = "".join(token.split()).replace("<", "").replace(">", "")
        if not token.isprintable():
            token = _ID_UNPRINTABLE.sub("", token)
        if token and len(token) <= _ID_MAX:
            ids.append(token)
    return ids


def _references(value: str | None) -> tuple[str, ...]:
    ids = _unique(_ids(value))
    if len(ids) > _MAX_REFERENCES:
        ids = (ids[0], *ids[-(_MAX_REFERENCES - 1) :])
    return ids


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:  # "-0000": the zone is unknown; read it as UTC
        parsed = parsed.replace(tzinfo=UTC)
    try:  # stored in UTC: "31 Dec 9999 23:59 -1200" is past datetime's last day there
        parsed.astimezone(UTC)
    except OverflowError:
        return None
    return parsed


_KEYS: dict[str, str] = {}  # raw header name -> key; the common names recur in every message
_MAX_KEYS = 1024


def _header_key(name: object) -> str:
    if not isinstance(name, str):
        return _clean(_unfold(name)).lower()
    key = _KEYS.get(name)
    if key is None:
        key = _clean(_unfold(name)).lower()
        if len(_KEYS) < _MAX_KEYS:
            _KEYS[name] = key
    return key


def _is_plain_header(value: str) -> bool:
    """One line of ASCII with no encoded word and no NUL: nothing to unfold, decode or clean."""
    return value.isascii() and "\n" not in value and "\r" not in value and "=?" not in value and "\x00" not in value


class _Headers:
    """Every header field once: decoded for ``InboundMessage.headers``, raw for parsing."""

    def __init__(self, message: Message) -> None:
        self.decoded: dict[str, str] = {}
        self.raw: dict[str, list[str]] = {}
        hint: str | None = None
        hint_known = False
        for name, value in message.raw_items():
            key = _header_key(name)
            if not key:
                continue
            if isinstance(value, str) and _is_plain_header(value):
                # Most values are one line of ASCII without encoded words or NULs: what the
                # general path below would make of them, without its steps.
                unfolded, text = value, value.strip()
            else:
                if not hint_known and isinstance(value, str) and not value.isascii():
                    hint, hint_known = _text_charset(message), True
                unfolded = _unfold(value, hint)
                text = _clean(_decode_words(unfolded))
            self.raw.setdefault(key, []).append(unfolded)
            previous = self.decoded.get(key)
            self.decoded[key] = text if previous is None else previous + "\n" + text

    def first(self, name: str) -> str | None:
        values = self.raw.get(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return self.raw.get(name, [])


# --------------------------------------------------------------------------------------------
# Body and attachments
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Parts:
    texts: list[tuple[str, bool, int]]  # (text, is_html, alternative group; 0 = none), in order
    named_text: list[tuple[str, bool]]  # (text, is_html) of named inline parts: a last resort
    files: list[tuple[str, str, int]]  # filename, content type, size
    inner: list[Message]  # attached messages, for a body when the outer one has none
    problems: list[str]
    salvaged: int = 0


def _filename(part: Message) -> str:
    if "content-disposition" not in part and "name" not in str(part.get("content-type", "")).lower():
        return ""  # no header a file name can come from: get_filename() would parse for nothing
    name = part.get_filename()
    if not name:
        return ""
    return _clean(_decode_words(_fix_surrogates(str(name))))


def _message_size(part: Message) -> int:
    """Size of an attached message/* part, as the bytes a client would save."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        data = part.get_payload(decode=True)
        return len(data) if isinstance(data, bytes) else 0
    buffer = io.BytesIO()
    generator = BytesGenerator(buffer, mangle_from_=False, maxheaderlen=0)
    try:
        for inner in payload:
            if isinstance(inner, Message):
                generator.flatten(inner)
    except Exception:  # a size is not worth losing the attachment entry over
        return 0
    return buffer.tell()


def _text_of(part: Message, problems: list[str] | None = None) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    if part.defects and _not_base64(part):
        # Labelled base64 but written as plain text (broken mailers, some spam): decoding it
        # gives bytes no one wrote. Keep the text as it was sent, and say so.
        if problems is not None:
            problems.append("a text part labelled base64 is not base64: kept as sent")
        data = part.get_payload(decode=False).encode("utf-8", "surrogateescape")
    text = _decode_bytes(data, part.get_content_charset())
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text.removeprefix("\ufeff")


_BAD_BASE64 = (InvalidBase64CharactersDefect, InvalidBase64PaddingDefect, InvalidBase64LengthDefect)


def _not_base64(part: Message) -> bool:
    """The part says base64, but decoding it hit characters base64 has none of, and most of
    its lines have spaces between words (base64 has none): plain text, mislabelled."""
    if not any(isinstance(d, _BAD_BASE64) for d in part.defects):
        return False
    if str(part.get("content-transfer-encoding", "")).strip().lower() != "base64":
        return False
    sent = part.get_payload(decode=False)
    if not isinstance(sent, str):
        return False
    lines = [line for line in sent.splitlines() if line.strip()]
    return bool(lines) and sum(" " in line.strip() for line in lines) * 2 >= len(lines)


def _salvage_multipart(part: Message) -> Message | None:
    """Re-read a multipart whose declared boundary never occurs, with the boundary it uses.

    Broken mailers (and spam) declare one boundary and write another; the stdlib then leaves
    the whole body as one opaque string. The first "--token" line is taken as the boundary.
    """
    payload = part.get_payload()
    if not isinstance(payload, str):
        return None
    for line in payload.splitlines():
        if line.startswith("--") and len(line) > 2 and not line.startswith("---- "):
            boundary = line[2:].rstrip()
            if boundary.endswith("--"):
                boundary = boundary[:-2]
            break
    else:
        return None
    rebuilt = _reparse(boundary, payload)
    if rebuilt is None:
        return None
    # A "--verbose" line in plain text is no boundary: real parts carry MIME headers.
    children = rebuilt.get_payload()
    if not any(isinstance(child, Message) and "content-type" in child for child in children):
        return None
    return rebuilt


def _reparse(boundary: str, text: str) -> Message | None:
    """``text`` read as the body of a multipart/mixed with ``boundary``; None if it is not."""
    if not boundary or '"' in boundary:
        return None
    head = f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
    rebuilt = email.message_from_bytes(
        head.encode("utf-8", "surrogateescape") + text.encode("utf-8", "surrogateescape"),
        policy=compat32,
    )
    return rebuilt if rebuilt.is_multipart() else None


def _salvage_epilogue(part: Message) -> Message | None:
    """Parts after a premature closing boundary (a boundary reused by a nested multipart)
    land in the epilogue; read them back when the epilogue still uses the boundary."""
    epilogue = part.epilogue
    boundary = part.get_boundary()
    if not epilogue or not boundary or "--" + boundary not in epilogue:
        return None
    return _reparse(boundary, epilogue)


def _leaf(part: Message, content_type: str, group: int, parts: _Parts, stack: list[tuple[Message, int]]) -> None:
    filename = _filename(part)
    disposition = part.get_content_disposition()
    if content_type.startswith("multipart/"):
        # A multipart whose boundary was never found: re-read it, or keep its text.
        rebuilt = _salvage_multipart(part) if parts.salvaged < _MAX_SALVAGE else None
        parts.salvaged += 1
        if rebuilt is not None:
            stack.append((rebuilt, group))
        else:
            parts.texts.append((_text_of(part), False, group))
        return
    if content_type in ("text/plain", "text/html") and disposition != "attachment":
        if not filename:
            parts.texts.append((_text_of(part, parts.problems), content_type == "text/html", group))
            return
        parts.named_text.append((_text_of(part, parts.problems), content_type == "text/html"))
    data = part.get_payload(decode=True)
    size = len(data) if isinstance(data, bytes) else 0
    parts.files.append((filename, content_type, size))


def _walk(message: Message) -> _Parts:
    """Collect text parts and attachments in document order, without recursion.

    Attached messages (message/rfc822, delivery reports) are one attachment each; their
    contents are not the author's text.
    """
    parts = _Parts(texts=[], named_text=[], files=[], inner=[], problems=[])
    stack: list[tuple[Message, int]] = [(message, 0)]
    groups = 0
    while stack:
        part, group = stack.pop()
        try:
            content_type = part.get_content_type()
            if not part.is_multipart():
                _leaf(part, content_type, group, parts, stack)
                continue
            children = part.get_payload()
            if any(isinstance(defect, CloseBoundaryNotFoundDefect) for defect in part.defects):
                parts.problems.append("multipart not closed: the message may be truncated")
            if content_type.startswith("message/") and part is not message:
                parts.files.append((_filename(part), content_type, _message_size(part)))
                if content_type == "message/rfc822" and isinstance(children, list) and children:
                    first = children[0]
                    if isinstance(first, Message):
                        parts.inner.append(first)
            elif isinstance(children, list):
                if content_type == "multipart/alternative":
                    groups += 1
                    group = groups  # its text/plain, if any, stands for its text/html
                if part.epilogue and parts.salvaged < _MAX_SALVAGE:
                    parts.salvaged += 1
                    rebuilt = _salvage_epilogue(part)
                    if rebuilt is not None:
                        stack.append((rebuilt, group))  # after the regular children
                stack.extend((child, group) for child in reversed(children) if isinstance(child, Message))
        except Exception as exc:  # one unreadable part must not cost us the message
            parts.problems.append(f"unreadable MIME part ({type(exc).__name__})")
    return parts


def _body(parts: _Parts, depth: int = 0) -> tuple[str, bool]:
    """The text of the message and whether any of it came from HTML.

    Text parts in document order, except HTML that a plain part stands for: in a
    multipart/alternative with a text/plain part that stands for its text/html
    (``alternative.choose``: not a placeholder, not cut short; else the HTML's text instead),
    and, outside any alternative, an HTML part after a plain one (broken mailers flatten
    alternatives into multipart/mixed). An HTML body followed by a plain footer (mailing lists)
    keeps both. Failing any text part: named inline text parts, then the body of the first
    attached message.
    """
    with_plain, html_instead = _alternatives(parts.texts)
    chosen: list[tuple[str, bool]] = []
    plain_seen = False  # a plain part outside any alternative came before
    for text, is_html, group in parts.texts:
        if not text.strip():
            continue
        if group in html_instead:
            if not is_html:
                continue  # the plain part does not stand for the HTML
            text = next(html_instead[group])
        elif is_html:
            if (group and group in with_plain) or (not group and plain_seen):
                continue
            text = html_to_text(text)
        elif not group:
            plain_seen = True
        if text.strip():
            chosen.append((_trim(text), is_html))
    if chosen:
        return "\n\n".join(text for text, _ in chosen), any(is_html for _, is_html in chosen)
    named = [(html_to_text(text) if is_html else text) for text, is_html in parts.named_text]
    if any(text.strip() for text in named):
        return "\n\n".join(text for text in named if text.strip()), all(is_html for _, is_html in parts.named_text)
    if parts.inner and depth < _MAX_INNER_DEPTH:
        return _body(_walk(parts.inner[0]), depth + 1)
    return "", False


def _alternatives(texts: list[tuple[str, bool, int]]) -> tuple[set[int], dict[int, Iterator[str]]]:
    """The alternatives with a plain part (not blank), and of those, the ones whose plain part
    does not stand for their HTML, with the text of each of their HTML parts in turn."""
    plain: dict[int, list[str]] = {}
    html: dict[int, list[str]] = {}
    for text, is_html, group in texts:
        if group and text.strip():
            (html if is_html else plain).setdefault(group, []).append(text)
    instead: dict[int, Iterator[str]] = {}
    for group, plain_texts in plain.items():
        if group in html:
            try:
                choice = choose("\n\n".join(plain_texts), html[group])
            except Exception:  # a bug there must not cost the message its body: the plain part, as before
                log.warning("could not compare the parts of an alternative", exc_info=True)
                continue
            if choice.html:
                instead[group] = iter(choice.html_texts)
    return set(plain), instead


def _trim(text: str) -> str:
    """Blank lines at both ends dropped; the first line keeps its indent."""
    text = text.rstrip()
    return text[text[: len(text) - len(text.lstrip())].rfind("\n") + 1 :]


def _normalise_body(text: str) -> str:
    """LF line endings; blank lines at both ends dropped (the first line keeps its indent)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _trim(text)


def _attachments(files: list[tuple[str, str, int]], delivery: _Delivery) -> tuple[Attachment, ...]:
    """Apply the size caps: a file over the per-file cap, or one that would take the kept total
    over the overall cap, is listed with kept=False (its bytes remain in ``raw``)."""
    kept_total = 0
    result: list[Attachment] = []
    per_file, overall = delivery.max_attachment_bytes, delivery.max_attachments_total
    for filename, content_type, size in files:
        kept = (per_file is None or size <= per_file) and (overall is None or kept_total + size <= overall)
        if kept:
            kept_total += size
        result.append(Attachment(filename=filename, content_type=content_type, size=size, kept=kept))
    return tuple(result)


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _bare(address: str | None) -> str:
    """The envelope sender as the author's stand-in: "" for the null reverse-path and for
    anything that is not one plain address of at most 320 characters (RFC 5321 allows 256;
    the database's column holds 320 and PostgreSQL enforced it with a 451 for ever)."""
    bare = (address or "").strip().strip("<>").strip().lower()
    return bare if len(bare) <= 320 and _ADDRESS.fullmatch(bare) else ""


def _build(
    message: Message,
    raw: bytes,
    delivery: _Delivery,
    *,
    problem: str | None,
    headers_only: bool = False,
) -> InboundMessage:
    headers = _Headers(message)
    problems = [problem] if problem else []
    if not headers.raw and raw.strip():
        problems.append("no header fields found")

    sender_name = ""
    author, ambiguous = _author(headers)
    if author is not None:
        sender_name, sender = author
    elif ambiguous:
        sender = ""  # no one's identity: joins no ticket on anyone's behalf, and is not answered
        problems.append("the From field does not give one readable author address: not answered, joins no ticket")
    else:
        sender = _bare(delivery.envelope_sender)

    attachments: tuple[Attachment, ...] = ()
    if headers_only:
        payload = message.get_payload()
        text = payload if isinstance(payload, str) else ""
        body = _decode_bytes(text.encode("utf-8", "surrogateescape")[:_RAW_BODY_CAP], None)
        body, html = _normalise_body(body.replace("\x00", "")), False
    else:
        parts = _walk(message)
        problems.extend(dict.fromkeys(parts.problems))
        body, html = _body(parts)
        body = _normalise_body(body)
        attachments = _attachments(parts.files, delivery)

    subject = headers.decoded.get("subject", "").split("\n", 1)[0]
    split = split_message(body)
    return InboundMessage(
        channel=Channel.EMAIL,
        sender=sender,
        sender_name=sender_name,
        reply_to=_unique(address for _, address in _address_pairs(headers.all("reply-to"))),
        to=_unique(address for _, address in _address_pairs(headers.all("to"))),
        cc=_unique(address for _, address in _address_pairs(headers.all("cc"))),
        recipient=delivery.recipient,
        envelope_sender=delivery.envelope_sender,
        subject=" ".join(subject.split()),
        body=body,
        new_text=split.new,
        quoted=split.quoted,
        html=html,
        attachments=attachments,
        message_id=next(iter(_ids(headers.first("message-id"))), ""),
        in_reply_to=_unique(_ids(" ".join(headers.all("in-reply-to")))),
        references=_references(" ".join(headers.all("references"))),
        date=_date(headers.first("date")),
        headers=headers.decoded,
        raw=raw,
        parse_problem="; ".join(problems) or None,
    )


def _unparseable(raw: bytes, delivery: _Delivery, problem: str) -> InboundMessage:
    body = raw[:_RAW_BODY_CAP].decode("utf-8", errors="replace").replace("\x00", "")
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    return InboundMessage(
        channel=Channel.EMAIL,
        sender=_bare(delivery.envelope_sender),
        recipient=delivery.recipient,
        envelope_sender=delivery.envelope_sender,
        subject="",
        body=body,
        new_text=body,
        raw=raw,
        parse_problem=problem,
    )


def parse_email(
    raw: bytes,
    *,
    recipient: str,
    envelope_sender: str | None = None,
    max_attachment_bytes: int | None = None,
    max_attachments_total: int | None = None,
) -> InboundMessage:
    """Turn the bytes of one delivered email into an :class:`InboundMessage`. Never raises.

    Attachments over the caps are not kept: their bytes are cut out of ``raw`` (each replaced
    by a short text part that names it), so what is stored respects the caps.
    """
    message = _parse_email(
        raw,
        recipient=recipient,
        envelope_sender=envelope_sender,
        max_attachment_bytes=max_attachment_bytes,
        max_attachments_total=max_attachments_total,
    )
    dropped = [a for a in message.attachments if not a.kept]
    if not dropped:
        return message
    stripped = strip_attachments(message.raw, dropped)
    return dataclasses.replace(message, raw=stripped) if stripped is not None else message


def strip_attachments(raw: bytes, dropped: list[Attachment]) -> bytes | None:
    """``raw`` with the payloads of the ``dropped`` attachments replaced by a note, or None."""
    try:
        msg = email.message_from_bytes(raw, policy=compat32)
        todo = [(a.filename, a.content_type) for a in dropped]
        for part in msg.walk():
            if part.is_multipart():
                continue
            key = (part.get_filename() or "", part.get_content_type())
            if key not in todo:
                continue
            todo.remove(key)
            size = next(a.size for a in dropped if (a.filename, a.content_type) == key)
            for header in ("Content-Transfer-Encoding", "Content-Type"):
                del part[header]
            note = f"[attachment {key[0] or '(unnamed)'} ({key[1]}, {size} bytes) not kept: over the size limit]\n"
            part.set_payload(note, charset="us-ascii" if note.isascii() else "utf-8")
        out = io.BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=compat32).flatten(msg)
        return out.getvalue()
    except Exception:  # keeping the original bytes beats losing the message
        log.warning("could not cut over-size attachments out of a message", exc_info=True)
        return None


def _parse_email(
    raw: bytes,
    *,
    recipient: str,
    envelope_sender: str | None = None,
    max_attachment_bytes: int | None = None,
    max_attachments_total: int | None = None,
) -> InboundMessage:
    """Turn the bytes of one delivered email into an :class:`InboundMessage`. Never raises.

    ``recipient`` is the envelope recipient this copy was delivered to; ``envelope_sender``
    the MAIL FROM ("" for the null reverse-path). The caps decide which attachments are
    ``kept``. ``parse_problem`` says what went wrong when the bytes could not be read fully.
    """
    if not isinstance(raw, bytes):
        try:
            raw = bytes(raw)
        except Exception:
            raw = b""
    delivery = _Delivery(
        recipient=str(recipient or "").strip().lower(),
        envelope_sender=envelope_sender,
        max_attachment_bytes=max_attachment_bytes,
        max_attachments_total=max_attachments_total,
    )
    if not raw.strip():
        return _unparseable(raw, delivery, "empty message")

    too_deep = False
    try:
        message = _read_mime(raw)
        return _build(message, raw, delivery, problem=None)
    except MailParserError as exc:
        problem = f"mail-parser failed: {type(exc).__name__}"
        # The stdlib parser would recurse just as deep: go straight to the headers.
        too_deep = isinstance(exc, MailParserRecursionError)
        log.warning("mail-parser could not parse a message (%s)", problem)
    except Exception as exc:  # a bug in mail-parser or in _build: salvage what we can
        problem = f"mail-parser failed: {type(exc).__name__}"
        log.warning("parsing a message failed; trying the stdlib parser", exc_info=True)

    if too_deep:
        problem = "unparseable MIME: MailParserRecursionError (nesting too deep)"
    else:
        try:
            message = email.message_from_bytes(raw, policy=compat32)
            return _build(message, raw, delivery, problem=problem)
        except Exception as exc:
            problem = f"unparseable MIME: {type(exc).__name__}"

    try:
        message = email.parser.BytesHeaderParser(policy=compat32).parsebytes(raw)
        return _build(message, raw, delivery, problem=problem, headers_only=True)
    except Exception as exc:
        log.warning("could not read even the headers of a message", exc_info=True)
        return _unparseable(raw, delivery, f"unparseable MIME: {type(exc).__name__}")
