"""Ticket reference numbers: short, readable aloud, unguessable and self-checking.

A reference looks like ``SUP-7K3M-9QX4``: a configurable prefix, then eight characters of
Crockford's base-32 alphabet (digits and letters without I, L, O and U, so nothing is
ambiguous on the phone). Seven are random (35 bits from :mod:`secrets`: counting up finds
nothing) and the eighth is a Luhn mod 32 check character, which catches every single mistyped
character and most swapped neighbours, so a typo is recognised as a typo instead of landing
on somebody else's ticket.

Reading is forgiving as people are: any case, ``O`` for ``0``, ``I``/``L`` for ``1``, with or
without the dashes, and as mail clients, input methods and copies from rendered text write it:
fullwidth forms, typographic dashes, no-break spaces, invisible zero-width characters. Letters
of other scripts that look like ours (Cyrillic, Greek) are not read as ours.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_INDEX = {ch: i for i, ch in enumerate(ALPHABET)}
# Crockford's decoding aliases: what a person may type for what they saw.
_ALIASES = str.maketrans({"O": "0", "I": "1", "L": "1"})
RANDOM_LENGTH = 7
DEFAULT_PREFIX = "SUP"

# Invisible characters that copies from HTML, PDFs and word processors leave inside words.
_INVISIBLE = frozenset("\u00ad\u200b\u200c\u200d\u2060\ufeff")
# Dashes that autocorrect and rendered text put where a person typed "-".
_DASHES = frozenset("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d")


# Where those characters are (and the other compatibility forms people type: superscripts,
# circled digits, mathematical letters): text with none of them is read as it is, without
# _fold's loop over every character (17 µs for a Japanese subject of 88).
_FOLDABLE = re.compile(
    "[\u00a0\u00ad\u00b2\u00b3\u00b9\u2000-\u209f\u2100-\u218f\u2212\u2460-\u24ff\u3000"
    "\ufe50-\ufe6b\ufeff\uff01-\uff5e\U0001d400-\U0001d7ff]"
)


def _fold(text: str) -> tuple[str, list[int]]:
    """``text`` as a person meant it for reading references, and where each character came from.

    Fullwidth and other compatibility forms become their ASCII character (NFKC, only when that
    gives one ASCII character: never a letter of another script), typographic dashes "-",
    invisible characters are dropped. ``at[i]`` is the index in ``text`` of folded character
    ``i``; ``at[len(folded)]`` is ``len(text)``.
    """
    out: list[str] = []
    at: list[int] = []
    for i, ch in enumerate(text):
        if ch.isascii():
            out.append(ch)
        elif ch in _INVISIBLE:
            continue
        elif ch in _DASHES:
            out.append("-")
        else:
            plain = unicodedata.normalize("NFKC", ch)
            out.append(plain if len(plain) == 1 and plain.isascii() else ch)
        at.append(i)
    at.append(len(text))
    return "".join(out), at


def _check_character(body: str) -> str:
    """Luhn mod N over the Crockford alphabet (N = 32)."""
    n = len(ALPHABET)
    factor = 2
    total = 0
    for ch in reversed(body):
        addend = factor * _INDEX[ch]
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return ALPHABET[(n - total % n) % n]


def _is_valid(code: str) -> bool:
    return len(code) == RANDOM_LENGTH + 1 and _check_character(code[:-1]) == code[-1]


@dataclass(frozen=True, slots=True)
class Found:
    """A reference-shaped token found in text. ``reference`` is None when its check failed."""

    text: str
    reference: str | None
    loose: bool = False  # written without a separator after the prefix: maybe a word, not a citation


class References:
    """Makes and recognises references with one prefix (``SUP`` by default)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,9}", prefix):
            raise ValueError("reference prefix must be 1-10 letters or digits, starting with a letter")
        self.prefix = prefix.upper()
        # Fixed pattern (not user input): bounded repetitions only, so it cannot backtrack badly.
        self._pattern = re.compile(
            rf"(?<![A-Za-z0-9]){re.escape(self.prefix)}([ #:-]?)"
            r"([0-9A-Za-z]{4})([ -]?)([0-9A-Za-z]{4})(?![A-Za-z0-9])",
            re.IGNORECASE,
        )

    def new(self) -> str:
        # 35 random bits in one draw, five to a character (32 symbols: uniform, as seven
        # secrets.choice calls were, for one read of the system's randomness instead of seven).
        bits = secrets.randbits(5 * RANDOM_LENGTH)
        body = "".join(ALPHABET[(bits >> (5 * i)) & 31] for i in range(RANDOM_LENGTH))
        return self._format(body + _check_character(body))

    def _format(self, code: str) -> str:
        return f"{self.prefix}-{code[:4]}-{code[4:]}"

    def normalise(self, text: str) -> str | None:
        """The canonical form of a typed reference, or None if it is not a valid one."""
        t = text.strip().upper().replace(" ", "").replace("-", "").replace("#", "").replace(":", "")
        if t.startswith(self.prefix):
            t = t[len(self.prefix) :]
        t = t.translate(_ALIASES)
        if len(t) != RANDOM_LENGTH + 1 or any(ch not in _INDEX for ch in t):
            return None
        return self._format(t) if _is_valid(t) else None

    def find(self, text: str) -> list[Found]:
        """Every reference in ``text``, in order, and every token written as one that fails.

        A valid reference is found in any case, with dashes, spaces, "#" or ":" after the prefix,
        or with no separator at all ("SUPFKABFWKF", as a customer may retype it; marked
        ``loose``). A token that fails (``reference`` None: a mistyped reference) is reported only
        when it is written as references are, with both dashes ("SUP-FKAB-FWKX") or within
        brackets: words have the other shapes ("Sup need help", "SUP-PORT TEAM", "SUPERFICIAL").
        """
        original = text
        at: list[int] | None = None
        if not text.isascii() and _FOLDABLE.search(text):
            text, at = _fold(text)
        found: list[Found] = []
        for m in self._pattern.finditer(text):
            code = (m.group(2) + m.group(4)).upper().translate(_ALIASES)
            ok = all(ch in _INDEX for ch in code) and _is_valid(code)
            loose = not m.group(1)
            if not ok:
                dashed = m.group(1) == "-" and m.group(3) == "-"
                bracketed = text[m.start() - 1 : m.start()] in ("[", "(") and text[m.end() : m.end() + 1] in ("]", ")")
                if loose or not (dashed or bracketed):
                    continue
            elif loose and m.group(3):  # "SUPPORT-ABCD" is no reference
                continue
            typed = m.group(0) if at is None else original[at[m.start()] : at[m.end() - 1] + 1]
            found.append(Found(text=typed, reference=self._format(code) if ok else None, loose=loose))
        return found

    def tag(self, reference: str, tag_format: str = "[{reference}]") -> str:
        return tag_format.format(reference=reference)
