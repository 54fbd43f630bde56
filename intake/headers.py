"""Safe header text: what we copy from a customer into an outgoing header goes through here.

A customer controls their subject and their display name, and both end up in the headers of
the acknowledgements and alerts we send. :func:`clean_header_text` turns such text into one
harmless line of readable text:

* line breaks (CR, LF, NEL, U+2028, U+2029, ...) become spaces, so no header can be injected;
* every other control character (C0, DEL, C1) is removed, and so are the bidi embeddings,
  overrides and isolates (U+202A–U+202E, U+2066–U+2069) that can make "gpj.exe" read "exe.jpg"
  (CVE-2021-42574, "Trojan Source"); a lone surrogate becomes U+FFFD;
* whitespace runs collapse to one space and the ends are stripped;
* the text is capped at a character boundary (never between a letter and its combining
  marks), with "…" when it was cut, and never cut inside something that looks like an
  RFC 2047 encoded word ``=?charset?q?...?=``.

Encoded-word syntax that is still in the text stays *literal text*: it is not decoded here, and
the MIME layer (``adapters.email.sender``) encodes it so that a mail client shows it as typed.

Pure functions, no I/O.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "ELLIPSIS",
    "REPLY_PREFIX",
    "STORED_NAME_MAX",
    "UNSTORABLE",
    "clean_header_text",
    "display_name",
    "storable_text",
    "stored_name",
]

ELLIPSIS = "…"

# Removed outright: C0 controls that are not whitespace, DEL, C1 controls except NEL (U+0085,
# a line break), bidi embeddings/overrides U+202A–U+202E and isolates U+2066–U+2069.
_REMOVED = re.compile(
    "["
    "\x00-\x08\x0e-\x1b\x1f"  # C0 minus TAB, LF, VT, FF, CR and FS/GS/RS (line breaks)
    "\x7f"  # DEL
    "\x80-\x84\x86-\x9f"  # C1 minus NEL
    "\u202a-\u202e"  # LRE, RLE, PDF, LRO, RLO
    "\u2066-\u2069"  # LRI, RLI, FSI, PDI
    "]"
)
_SURROGATE = re.compile("[\ud800-\udfff]")

# Anything that looks like an RFC 2047 encoded word, leniently (charset, encoding, text).
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[^?\s]*\?[^\s]*?\?=")

DISPLAY_NAME_MAX = 80
# A person's name as stored (the database's column: PostgreSQL refuses a longer one, and every
# delivery of the message was answered 451). Email's display names and Slack's alike.
STORED_NAME_MAX = 200
# What no database stores in text: NUL (PostgreSQL refuses it) and a lone surrogate (a byte
# that was not UTF-8, kept by surrogateescape, or a JSON "\ud800"; none takes one).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# One reply or forward prefix as mail clients write it in their users' languages (Outlook,
# Thunderbird, Apple Mail, Gmail, Lotus Notes): "RE:", "AW:", "WG:", "RIF:", "I:", "Odp:",
# "Réf. :", "回复：", with a counter ("RE[2]:"), a space before the colon (French usage) or a
# fullwidth colon (CJK input). Not anchored: callers anchor it and repeat it as they need.
REPLY_PREFIX = (
    r"(?:re|fwd?|aw|wg|sv|vs|vl|tr|rv|r|rif|i|antw|doorst|res|enc|odp|pd|ynt|[iİ]lt|r[ée]f\.?"
    r"|απ|σχετ|πρθ|回复|答复|转发|回覆|轉寄|轉發)"
    r"[ \t]*+(?:\[\d+\][ \t]*+)?[:：]"  # possessive: "RE" and 100,000 spaces took 34 s
)


def clean_header_text(value: str, *, max_length: int = 200) -> str:
    """Return ``value`` as one safe line of at most ``max_length`` characters (see module doc)."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, not {max_length}")
    text = _SURROGATE.sub("\ufffd", value)
    text = _REMOVED.sub("", text)
    # split() with no argument splits on every Unicode whitespace character, line breaks
    # included (CR, LF, VT, FF, FS/GS/RS, NEL, U+2028, U+2029): they collapse to one space.
    text = " ".join(text.split())
    if len(text) <= max_length:
        return text
    return _cut(text, max_length - len(ELLIPSIS)) + ELLIPSIS


def storable_text(text: str) -> str:
    """``text`` as every database stores it: NUL removed, each lone surrogate U+FFFD."""
    if text.isascii():
        return text.replace("\x00", "")
    return UNSTORABLE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", text)


def stored_name(name: str) -> str:
    """A person's name as stored: at most STORED_NAME_MAX characters, "…" where it was cut."""
    if len(name) <= STORED_NAME_MAX:
        return name
    return _cut(name, STORED_NAME_MAX - len(ELLIPSIS)).rstrip() + ELLIPSIS


def display_name(name: str) -> str:
    """A customer's name made safe for a From/To display name (cleaned, at most 80 characters)."""
    return clean_header_text(name, max_length=DISPLAY_NAME_MAX)


def _cut(text: str, limit: int) -> str:
    """The longest prefix of ``text`` of at most ``limit`` characters that splits nothing."""
    cut = limit
    # Do not strand a base character without its combining marks: drop the cluster whole.
    while cut > 0 and unicodedata.combining(text[cut]):
        cut -= 1
    # Never leave half an encoded word behind: a decoder would show garbage, or worse,
    # a later join could complete it. Drop the whole word instead.
    for match in _ENCODED_WORD.finditer(text, 0, len(text)):
        if match.start() < cut < match.end():
            cut = match.start()
            break
        if match.start() >= cut:
            break
    return text[:cut].rstrip()


# What our relay can be asked to deliver to: a plain ASCII addr-spec (no SMTPUTF8).
ANSWERABLE_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
)


def answerable(address: str) -> bool:
    """Whether an acknowledgement can be sent to ``address`` at all (the sender's own check)."""
    return len(address) <= 254 and ANSWERABLE_ADDRESS.fullmatch(address) is not None
