"""Keyword rules that spot suspected security incidents and data breaches.

Support policy: every suspected security or data-breach incident is Severity 1 and pages the
Incident Response Team lead. This module turns a message's text into a :class:`Verdict` that
says so, with the evidence (rule, field, phrase, excerpt) a person needs to judge the call.

Rules are data, not code: small named things in a TOML file (``intake/data/rules.toml`` is the
shipped default), each a list of *phrases*, never regular expressions. A trailing ``*`` on the
last word takes inflections (``breach*``: breach, breaches, breached). A broken file raises
:class:`~intake.errors.RulesError` naming the file, the rule and what is wrong.

Matching is what a person expects: case- and accent-insensitive ("AUTORIZACIÓN" is
"autorizacion"), whole words ("hack" does not fire inside "hackathon"), and indifferent to the
line breaks, tabs, runs of spaces and punctuation between the words of a phrase
("data\\n  breach", "data-breach"). Evidence offsets always refer to the original text.

Why Aho-Corasick (ahocorasick-rs) rather than regular expressions or RE2
------------------------------------------------------------------------
* Linear time, always: one pass over the text whatever it contains. Nothing is ever compiled
  from rule text or message text, so there is no pattern that can backtrack.
* The scan cost does not grow with the number of phrases: all phrases of all rules live in one
  automaton built once per :class:`RuleSet`; 10 or 10,000 phrases cost about the same per byte
  (``bench/bench_classify.py`` measures it).
* RE2 would be linear too, but it is a native C++ library with bindings to build, pin and
  patch, and a large alternation of phrases can exhaust its DFA memory budget, after which it
  falls back to a slower NFA simulation.
* ahocorasick-rs wraps the Rust ``aho-corasick`` crate (the one ripgrep uses) in one small
  wheel with no dependencies. Over bytes with a DFA it scans support mail at about twice the
  speed of pyahocorasick (its predecessor here: ~70-100 MB/s on this machine, which alone
  ate the 50 MB/s budget); above ``_Automaton.DFA_MAX_KEYS`` keys it uses a contiguous NFA,
  whose memory stays small.

How a text is matched
---------------------
1. *Fold* the text (``_fold``): NFKD, casefold, NFKD again, drop combining marks (accents),
   and turn every character that is not a letter, digit or spacing mark into one space. The
   fold is defined character by character (``_fold_char``), which is what lets offsets be
   mapped back. ASCII text takes one ``bytes.translate`` and keeps offsets 1:1. Other text is
   folded in chunks, with C-level string operations only: Latin-1 text (plus ’ “ ” – — …) by
   one ``bytes.translate``, which mostly keeps offsets 1:1 too; any other script by folding its
   non-ASCII runs through a cached per-character table. When a chunk's fold changes lengths
   ("ß" -> "ss", dropped accents), its index map back to the original is rebuilt lazily, in
   blocks, only for the few offsets a verdict shows.
2. Each phrase has an *anchor*: its rarest-looking word (long, not a common word such as
   "our", "account", "datos"). The automaton holds one key per anchor, " word " with its
   spaces (or " word" for the ``stem*`` of a last word), so it only fires on whole words.
   The automaton scans the UTF-8 of " " + folded text + " " (bytes: offsets are mapped back
   to the folded string only for the few hits a verdict shows); one pass gives every anchor
   occurrence, and most mail, which holds no anchor at all, is done there. The texts
   of a message that the same rules look at (subject, body, attachment names) are joined by
   a NUL, which no phrase can cross, and share that one pass.
3. For a phrase of several words, the other words are checked around the anchor in Python,
   skipping any run of spaces between words (which is how "data\\n\\n  breach" matches without
   a pass to collapse runs of spaces). Anchors are rare words, so this runs rarely; every
   check is bounded by the length of the phrase and the gaps it spans (phrases that share an
   anchor are each checked at its occurrences: keep anchors specific). Once a phrase is found
   in a field it is not looked for again there, so a text full of matches stays fast.

4. A rule's ``unless`` phrases are set phrases that contain one of its phrases and are not the
   incident: legal footers ("any unauthorized access, use or disclosure is prohibited"),
   product names ("data leak prevention"). An occurrence of the rule's phrase inside one is no
   hit; the check runs only where a phrase was found (rarely), never as another pass, and a
   later occurrence of the same phrase outside it still counts.

Negation ("we had no data breach") never removes a hit nor lowers severity: the hit is only
marked ``negated`` so that a person reading it knows to look twice.
"""

from __future__ import annotations

import bisect
import functools
import importlib.resources
import itertools
import os
import pathlib
import re
import tomllib
import unicodedata
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ahocorasick_rs

from intake.errors import RulesError
from intake.model import RuleHit, Severity, Verdict

__all__ = [
    "FIELDS",
    "MAX_HITS",
    "MAX_PHRASES",
    "MAX_PHRASE_CHARS",
    "MAX_RULES",
    "PhraseFound",
    "PhraseMatcher",
    "Rule",
    "RuleSet",
    "default_rules_path",
    "format_verdict",
    "lint",
]

#: The parts of a message a rule may look at (``fields`` in the rules file).
FIELDS: tuple[str, ...] = ("subject", "body", "attachments")

# Caps that keep a hostile or mistaken rules file from exhausting memory at start-up.
MAX_RULES = 10_000
MAX_PHRASES = 100_000  # in total, over all rules of one file
MAX_PHRASE_CHARS = 200
MAX_FILE_BYTES = 32 * 1024 * 1024
_MAX_NAME_CHARS = 64
_MAX_DESCRIPTION_CHARS = 2_000
_MAX_TAGS = 32
_MAX_TAG_CHARS = 64

#: At most this many hits are stored on a verdict (a 10 MB body full of matches stays small).
MAX_HITS = 20
_CONTEXT = 40  # characters of context each side of a match in an excerpt
_MAX_EXCERPT = 300
_NEGATION_WINDOW = 4  # words before a phrase that may negate it

_RULE_KEYS = ("name", "description", "phrases", "fields", "severity", "tags", "quoted", "unless")

# Negation words, folded (lower case, no accents). "n't" folds to "n t": see _negated().
_NEGATIONS = frozenset(
    {
        # English
        "no", "not", "never", "nor", "neither", "without", "none", "nothing", "nobody",
        "cannot", "cant", "dont", "doesnt", "didnt", "isnt", "wasnt", "werent", "arent",
        "havent", "hasnt", "hadnt", "wont", "wouldnt", "couldnt", "shouldnt",
        # Spanish
        "nunca", "jamas", "sin", "ni", "ningun", "ninguna", "ninguno", "nada", "nadie", "tampoco",
    }
)  # fmt: skip

# Words too frequent in support mail to anchor a phrase (folded). A phrase made only of such
# words still works: its longest word is the anchor, it is merely checked more often.
_COMMON_WORDS = frozenset(
    """
    a an the and or of to in on at by for from with as is are was were be been being has have
    had do does did it its this that these those we our ours us you your i my me he she they
    their them someone some any all no not new one two also please can could would should will
    account accounts access data email emails user users login password passwords file files
    system systems server servers site website customer customers information info team
    over unknown attachment attachments computer detected found permission invoice invoices
    page pages service personal private security database take
    el la los las lo un una unos unas de del al y o en con por para que se su sus es son fue
    fueron ha han sido mi mis nuestro nuestra nuestros nuestras alguien cuenta cuentas datos
    acceso sesion inicio informacion sistema sistemas archivo archivos correo correos usuario
    contrasena contrasenas factura facturas personales seguridad pagina paginas
    """.split()
)


# --------------------------------------------------------------------------------------------
# Folding: text -> searchable form, with a way back to original offsets
# --------------------------------------------------------------------------------------------

# ASCII: letters and digits lower-cased, everything else one space; one char for one char.
_ASCII_FOLD = {i: (chr(i).lower() if chr(i).isalnum() else " ") for i in range(128)}
_ASCII_FOLD_BYTES = bytes((ord(chr(i).lower()) if chr(i).isalnum() else 0x20) if i < 128 else i for i in range(256))
# A fixed pattern of our own (one character class, cannot backtrack): the non-ASCII runs.
_NON_ASCII_RUN = re.compile("([^\x00-\x7f]+)")  # captured: split() keeps the runs
_CHUNK = 8192  # characters folded at a time when the text is not ASCII
_BLOCK = 256  # characters per block of a chunk's lazy index map
_FOLD_CACHE_MAX = 65_536  # entries kept by each fold cache
_RUN_CACHE_MAX_CHARS = 16  # longer non-ASCII runs (words of other scripts) are not cached
_ZERO_WIDTH_SPACE = "\u200b"  # a format character that does break words


def _fold_char(ch: str) -> str:
    """The fold of one code point: the definition every other fold path must agree with.

    NFKD, casefold, NFKD (a fixed point for every code point of Unicode 14); then combining
    marks and invisible format characters (soft hyphen, zero-width joiner) are dropped, letters,
    digits and spacing marks (Devanagari vowel signs...) kept, and anything else becomes one
    space. "É" -> "e", "ß" -> "ss", "ﬁ" -> "fi", "Ａ" -> "a", "—" -> " ".
    """
    if ch.isascii():
        return _ASCII_FOLD[ord(ch)]
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", ch).casefold())
    out: list[str] = []
    for c in decomposed:
        if c.isascii():
            out.append(_ASCII_FOLD[ord(c)])
        elif unicodedata.combining(c):
            continue
        elif c != _ZERO_WIDTH_SPACE and unicodedata.category(c) == "Cf":
            continue  # soft hyphen, zero-width joiners, BOM, bidi controls: not a word break
        elif c.isalnum() or unicodedata.category(c).startswith("M"):
            out.append(c)
        else:
            out.append(" ")
    return "".join(out)


class _CharFold(dict[int, str]):
    """Code point -> ``_fold_char``, computed on first use; a ``str.translate`` table."""

    def __missing__(self, cp: int) -> str:
        folded = _fold_char(chr(cp))
        if len(self) < _FOLD_CACHE_MAX:
            self[cp] = folded
        return folded


class _RunFold(dict[str, str]):
    """A run of non-ASCII characters -> its fold (the folds of its characters, concatenated)."""

    def __missing__(self, run: str) -> str:
        folded = run.translate(_CHAR_FOLD)
        if len(run) <= _RUN_CACHE_MAX_CHARS and len(self) < _FOLD_CACHE_MAX:
            self[run] = folded
        return folded


_CHAR_FOLD = _CharFold(_ASCII_FOLD)
_RUN_FOLD = _RunFold()

# The Latin-1 fast path of _fold: a byte table for the characters U+0000..U+00FF whose fold is
# one Latin-1 character ("É" -> "e"), and str.replace first for the others, plus the
# typographic marks that keep most Western mail out of Latin-1 (’ “ ” – — … € •) and U+FFFD.
_LATIN1_ODD = [chr(i) for i in range(256) if len(f := _fold_char(chr(i))) != 1 or ord(f) > 0xFF]
_LATIN1_FOLD = bytes(
    ord(f) if (f := _fold_char(chr(i))) and len(f) == 1 and ord(f) <= 0xFF else 0x20 for i in range(256)
)
_REPLACED_FIRST = (
    *_LATIN1_ODD,
    *"\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u20ac\u2022\u2122\u200b",
    "\ufffd",  # the replacement character: mail decoded leniently is full of it
)


def _fold_bytes(text: str) -> bytes:
    """UTF-8 of ``_fold(text)``: what the automaton scans (ASCII mail: no str built at all)."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_FOLD_BYTES)
    if len(text) <= _CHUNK and not any(ch in text for ch in _LATIN1_ODD):
        # Western mail in Latin-1 ("¿Podrían...?"): its fold is nearly always ASCII, which is
        # its own UTF-8; else (æ, ø, ð, þ stay as they are) take the general path.
        try:
            folded = text.encode("latin-1").translate(_LATIN1_FOLD)
        except UnicodeEncodeError:
            pass
        else:
            if folded.isascii():
                return folded
    return _fold(text).encode("utf-8", "surrogatepass")


def _fold(text: str) -> str:
    """Fold ``text``: always equal to joining ``_fold_char`` of each character, only faster."""
    if len(text) <= _CHUNK or text.isascii():
        return _fold_chunk(text)[0]
    # Chunks: one odd character (not Latin-1) sends only its own chunk down the slow path.
    return "".join(_fold_chunk(text[i : i + _CHUNK])[0] for i in range(0, len(text), _CHUNK))


def _fold_chunk(text: str) -> tuple[str, bool]:
    """The fold of ``text``, and True when it is known to keep offsets 1:1 (one character each)."""
    if text.isascii():  # bytes.translate: about twice as fast as str.translate
        return text.encode("ascii").translate(_ASCII_FOLD_BYTES).decode("ascii"), True
    # Western mail: Latin-1 letters plus a few typographic marks. Replace those marks (and the
    # Latin-1 characters whose fold is not one Latin-1 character) by their folds, then fold
    # every remaining character with one bytes.translate. A fold is its own fold, so folding
    # the replaced text again changes nothing.
    one_to_one = True
    for ch in _REPLACED_FIRST:
        if ch in text:
            folded_ch = _CHAR_FOLD[ord(ch)]
            text = text.replace(ch, folded_ch)
            one_to_one = one_to_one and len(folded_ch) == 1
    try:
        latin1 = text.encode("latin-1")
    except UnicodeEncodeError:
        pass
    else:
        return latin1.translate(_LATIN1_FOLD).decode("latin-1"), one_to_one
    # Anything else: fold the non-ASCII runs through the cached table, then every ASCII byte
    # at once (the table leaves bytes >= 0x80, i.e. the UTF-8 of folded runs, alone).
    parts = _NON_ASCII_RUN.split(text)
    parts[1::2] = map(_RUN_FOLD.__getitem__, parts[1::2])
    joined = "".join(parts).encode("utf-8", "surrogatepass")
    return joined.translate(_ASCII_FOLD_BYTES).decode("utf-8", "surrogatepass"), False


_NO_CHUNKS: list[int] = []
_NO_FLAGS: list[bool] = []
_NO_MAPS: dict[int, list[int]] = {}


class _Folded:
    """A text folded and padded for matching (``text`` = " " + fold + " "), with a lazy map
    from positions in ``text`` back to positions in ``original``."""

    __slots__ = ("_chunk_direct", "_maps", "_norm_starts", "_orig_starts", "original", "text")

    _maps: dict[int, list[int]]  # chunk -> _block_starts
    _norm_starts: list[int]  # where each chunk starts in ``text``
    _orig_starts: list[int]  # where each chunk starts in ``original``
    _chunk_direct: list[bool]  # the chunk's fold keeps offsets 1:1

    def __init__(self, original: str) -> None:
        self.original = original
        if original.isascii():  # the common case: one translate, offsets unchanged, no chunks
            self.text = f" {original.encode('ascii').translate(_ASCII_FOLD_BYTES).decode('ascii')} "
            self._norm_starts = self._orig_starts = _NO_CHUNKS  # shared, never written to
            self._chunk_direct = _NO_FLAGS
            self._maps = _NO_MAPS
            return
        self._maps = {}
        self._norm_starts = []
        self._orig_starts = []
        self._chunk_direct = []
        pieces: list[str] = [" "]
        pos = 1
        for start in range(0, len(original), _CHUNK):
            chunk = original[start : start + _CHUNK]
            piece, direct = _fold_chunk(chunk)
            pieces.append(piece)
            self._norm_starts.append(pos)
            self._orig_starts.append(start)
            self._chunk_direct.append(direct)
            pos += len(piece)
        pieces.append(" ")
        self.text = "".join(pieces)

    def _block_starts(self, i: int) -> list[int]:
        """Where each _BLOCK-character block of non-ASCII chunk ``i`` starts in its fold."""
        cached = self._maps.get(i)
        if cached is None:
            chunk_start = self._orig_starts[i]
            chunk = self.original[chunk_start : chunk_start + _CHUNK]
            cached = [0]
            for block in range(0, len(chunk), _BLOCK):  # C-level folds, no per-character loop
                cached.append(cached[-1] + len(_fold(chunk[block : block + _BLOCK])))
            self._maps[i] = cached
        return cached

    def _orig_index(self, p: int) -> int:
        """Original index of the character that produced ``text[p]`` (a word character)."""
        if not self._norm_starts:
            return p - 1
        i = bisect.bisect_right(self._norm_starts, p) - 1
        local = p - self._norm_starts[i]
        chunk_start = self._orig_starts[i]
        if self._chunk_direct[i]:
            return chunk_start + local
        # Find the block, then walk its characters (at most _BLOCK) adding up their folds.
        starts = self._block_starts(i)
        block = min(bisect.bisect_right(starts, local) - 1, len(starts) - 2)
        folded = starts[block]
        first = chunk_start + block * _BLOCK
        for offset, ch in enumerate(self.original[first : first + _BLOCK], first):
            folded += len(_CHAR_FOLD[ord(ch)])
            if folded > local:
                return offset
        return first + _BLOCK - 1  # not reached for a word character

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Original ``[start, end)`` of ``text[start:end]`` (both ends on word characters)."""
        o_start = self._orig_index(start)
        o_end = self._orig_index(end - 1) + 1
        if self._norm_starts:  # take in the few accents that follow (they fold to nothing)
            original = self.original
            stop = min(len(original), o_end + 16)
            while o_end < stop and not _CHAR_FOLD[ord(original[o_end])]:
                o_end += 1
        return o_start, o_end


# --------------------------------------------------------------------------------------------
# Phrases and the matcher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhraseFound:
    """One occurrence of ``phrases[index]``: ``text[start:end]`` of the original text."""

    index: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A phrase, folded: its words, whether the last one is a stem, and its anchor word."""

    words: tuple[str, ...]
    stem: bool
    anchor: int  # index into words

    @property
    def key(self) -> str:
        """The automaton key: the anchor word with the spaces that make it a whole word."""
        word = self.words[self.anchor]
        open_end = self.stem and self.anchor == len(self.words) - 1
        return f" {word}" if open_end else f" {word} "


def _anchor(words: tuple[str, ...]) -> int:
    """The word least likely to occur by chance: long and not common; the later on a tie."""
    return max(range(len(words)), key=lambda i: (words[i] not in _COMMON_WORDS, len(words[i]), i))


def _compile_phrase(phrase: object) -> _Compiled:
    """Check one phrase and fold it; ValueError says what is wrong."""
    if not isinstance(phrase, str):
        raise ValueError(f"must be a string, not {type(phrase).__name__}")
    if len(phrase) > MAX_PHRASE_CHARS:
        raise ValueError(f"is {len(phrase):,} characters long; the limit is {MAX_PHRASE_CHARS} characters per phrase")
    body = phrase.strip()
    stem = body.endswith("*")
    if stem:
        body = body[:-1]
    if "*" in body:
        raise ValueError(
            "has `*` before its end: `*` is allowed only at the very end of a phrase, "
            "directly after the last word (`breach*`)"
        )
    folded = _fold(body)
    words = tuple(folded.split())
    if not words:
        raise ValueError("is empty or only punctuation or `*`: it needs at least one letter or digit")
    if stem and folded.endswith(" "):
        raise ValueError("has `*` after a space or punctuation: write it directly after a word (`breach*`)")
    return _Compiled(words, stem, _anchor(words))


_SPACE = 0x20  # b" "[0]: the scanned text is bytes, and indexing bytes gives ints


def _skip_spaces_back(u: bytes, i: int) -> int:
    """The smallest j <= i with u[j:i] all spaces (windows double: linear in the run)."""
    if i >= 2 and (u[i - 1] != _SPACE or u[i - 2] != _SPACE):  # the usual gaps: none or one space
        return i if u[i - 1] != _SPACE else i - 1
    width = 32
    j = i
    while j > 0:
        lo = max(0, j - width)
        kept = u[lo:j].rstrip(b" ")
        if kept:
            return lo + len(kept)
        j = lo
        width *= 2
    return 0


def _skip_spaces_forward(u: bytes, i: int) -> int:
    """The largest j >= i with u[i:j] all spaces (windows double: linear in the run)."""
    n = len(u)
    if i + 1 < n and (u[i] != _SPACE or u[i + 1] != _SPACE):  # the usual gaps: none or one space
        return i if u[i] != _SPACE else i + 1
    width = 32
    j = i
    while j < n:
        hi = min(n, j + width)
        window = u[j:hi]
        kept = window.lstrip(b" ")
        if kept:
            return j + len(window) - len(kept)
        j = hi
        width *= 2
    return n


# One phrase under its anchor: (phrase index, folded words in UTF-8, anchor index, stem).
_Entry = tuple[int, tuple[bytes, ...], int, bool]


class _Anchor:
    """What the automaton returns for one anchor key: the phrases it anchors, indexed by the
    word next to the anchor, so that an anchor shared by many phrases costs a few dictionary
    lookups per occurrence instead of one check per phrase."""

    __slots__ = (
        "by_next",
        "by_next_stem",
        "by_previous",
        "entries",
        "has_neighbours",
        "key_id",
        "key_len",
        "open_end",
        "single",
    )

    def __init__(self, key_id: int, key: bytes, entries: Sequence[_Entry]) -> None:
        self.key_id = key_id
        self.key_len = len(key)
        self.open_end = key[-1] != _SPACE  # the stem of a last word: any continuation
        self.entries = tuple(entries)
        single: list[_Entry] = []
        by_next: dict[bytes, list[_Entry]] = {}
        by_next_stem: dict[int, dict[bytes, list[_Entry]]] = {}  # stem length -> stem -> phrases
        by_previous: dict[bytes, list[_Entry]] = {}
        for entry in entries:
            _, words, anchor, stem = entry
            last = len(words) - 1
            if not last:
                single.append(entry)
            elif anchor == last:
                by_previous.setdefault(words[anchor - 1], []).append(entry)
            elif stem and anchor + 1 == last:  # the next word is a stem: look it up by prefix
                word = words[last]
                by_next_stem.setdefault(len(word), {}).setdefault(word, []).append(entry)
            else:
                by_next.setdefault(words[anchor + 1], []).append(entry)
        self.single = tuple(single)
        self.by_next = {word: tuple(found) for word, found in by_next.items()}
        self.by_next_stem = {
            length: {word: tuple(found) for word, found in table.items()} for length, table in by_next_stem.items()
        }
        self.by_previous = {word: tuple(found) for word, found in by_previous.items()}
        self.has_neighbours = bool(by_next or by_next_stem or by_previous)

    def candidates(self, u: bytes, start: int, end: int) -> tuple[_Entry, ...]:
        """The phrases worth checking around an occurrence of the anchor at ``u[start:end]``."""
        found = self.single
        if self.by_next or self.by_next_stem:
            first = end + 1  # the next word: usually after one space
            if first >= len(u) or u[first] == _SPACE:
                first = _skip_spaces_forward(u, end)
            word = u[first : u.find(b" ", first)] if first < len(u) else b""
            more = self.by_next.get(word)
            if more:
                found += more
            for length, table in self.by_next_stem.items():
                more = table.get(word[:length])
                if more:
                    found += more
        if self.by_previous:
            stop = start - 1  # the end of the previous word: usually before one space
            if stop < 1 or u[stop - 1] == _SPACE:
                stop = _skip_spaces_back(u, start)
            more = self.by_previous.get(u[u.rfind(b" ", 0, stop) + 1 : stop])
            if more:
                found += more
        return found


def _around(u: bytes, start: int, end: int, words: tuple[bytes, ...], anchor: int, stem: bool) -> tuple[int, int]:
    """Check the words around an anchor found at ``u[start:end]``; (-1, -1) if they are not there.

    Words must follow each other separated by at least one space (any run), each a whole
    word; the last one may be a stem. ``u`` is padded with a space at both ends.
    """
    for word in reversed(words[:anchor]):
        word_end = _skip_spaces_back(u, start)
        if word_end == start:
            return -1, -1
        word_start = word_end - len(word)
        if word_start < 1 or u[word_start - 1] != _SPACE or not u.startswith(word, word_start):
            return -1, -1
        start = word_start
    last = len(words) - 1
    for i in range(anchor + 1, len(words)):
        word_start = _skip_spaces_forward(u, end)
        if word_start == end or not u.startswith(words[i], word_start):
            return -1, -1
        end = word_start + len(words[i])
        if i == last and stem:
            end = u.find(b" ", end)
        elif u[end] != _SPACE:
            return -1, -1
    return start, end


# Occurrences of one phrase vetoed by its ``unless`` phrases in one field before the rest
# count as hits: a 20 MB body of footers took 12 times as long as without vetoes.
_MAX_VETOED = 64

# A set phrase around a phrase, as ``unless``: (its folded words in UTF-8, the index of the
# phrase's first word among them, stem).
_Veto = tuple[tuple[bytes, ...], int, bool]


def _occurrences_in(phrase: _Compiled, within: _Compiled) -> list[int]:
    """Where ``phrase``'s words stand in ``within``'s words (as an index of its first word)."""
    n = len(phrase.words)
    found = []
    for k in range(len(within.words) - n + 1):
        last = within.words[k + n - 1]
        if within.words[k : k + n - 1] == phrase.words[:-1] and (
            last.startswith(phrase.words[-1]) if phrase.stem else last == phrase.words[-1]
        ):
            found.append(k)
    return found


def _vetoed(u: bytes, start: int, vetoes: Sequence[_Veto]) -> bool:
    """Whether a phrase found at ``u[start:...]`` stands inside one of its ``unless`` phrases."""
    for words, k, stem in vetoes:
        first = words[k]
        if not u.startswith(first, start):
            continue
        stop = start + len(first)
        if stem and k == len(words) - 1:
            stop = u.find(b" ", stop)
        elif u[stop] != _SPACE:
            continue
        if _around(u, start, stop, words, k, stem)[0] >= 0:
            return True
    return False


class PhraseMatcher:
    """Finds whole-word, case- and accent-insensitive phrases in linear time.

    The reusable building block of :class:`RuleSet`, also meant for other phrase lists (e.g.
    "please escalate"). A phrase may end in ``*`` to take inflections of its last word. An
    invalid phrase raises ValueError naming its index.
    """

    __slots__ = ("_automaton", "_vetoes", "phrases")

    def __init__(self, phrases: Sequence[str]) -> None:
        compiled: list[_Compiled] = []
        for index, phrase in enumerate(phrases):
            try:
                compiled.append(_compile_phrase(phrase))
            except ValueError as exc:
                raise ValueError(f"phrase {index} {_show(phrase)} {exc}") from None
        self.phrases: tuple[str, ...] = tuple(phrases)
        self._automaton = self._build(compiled)
        self._vetoes: dict[int, tuple[_Veto, ...]] = {}

    @classmethod
    def _from_compiled(
        cls,
        phrases: Sequence[str],
        compiled: Sequence[_Compiled],
        vetoes: Mapping[int, Sequence[_Veto]] | None = None,
    ) -> PhraseMatcher:
        """``vetoes``: phrase index -> the set phrases around it that make an occurrence no hit."""
        matcher = cls.__new__(cls)
        matcher.phrases = tuple(phrases)
        matcher._automaton = cls._build(compiled)
        matcher._vetoes = {index: tuple(found) for index, found in (vetoes or {}).items() if found}
        return matcher

    @staticmethod
    def _build(compiled: Sequence[_Compiled]) -> _Automaton | None:
        if not compiled:
            return None
        entries: dict[bytes, list[_Entry]] = {}
        for index, phrase in enumerate(compiled):
            words = tuple(word.encode("utf-8", "surrogatepass") for word in phrase.words)
            key = phrase.key.encode("utf-8", "surrogatepass")
            entries.setdefault(key, []).append((index, words, phrase.anchor, phrase.stem))
        anchors = [_Anchor(key_id, key, found) for key_id, (key, found) in enumerate(entries.items())]
        return _Automaton(list(entries), anchors)

    def find(self, text: str) -> list[PhraseFound]:
        """Every occurrence of every phrase in ``text``, in text order (overlaps included)."""
        u = b" " + _fold_bytes(text) + b" "
        occurrences = [(index, start, end) for _, index, start, end in self._scan(u)]
        if not occurrences:
            return []
        folded = _Folded(text)
        chars = _char_offset_map(u, itertools.chain.from_iterable((s, e) for _, s, e in occurrences))
        found = [PhraseFound(index, *folded.span(chars[s], chars[e])) for index, s, e in occurrences]
        found.sort(key=lambda f: (f.start, f.end, f.index))
        return found

    def _scan(
        self,
        u: bytes,
        excluded: Container[int] = frozenset(),
        seen: Sequence[set[int]] | None = None,
        bounds: Sequence[int] = (),
        keys: list[tuple[int, int, int]] | None = None,
    ) -> Iterator[tuple[int, int, int, int]]:
        """(segment, phrase index, start, end) in padded folded ``u`` for each occurrence.

        ``u`` is the UTF-8 of folded text and the offsets are byte offsets into it
        (``_char_offset_map`` turns them into offsets into the folded string).

        ``u`` may hold several texts (segments), each padded with spaces and joined by a NUL that
        no phrase can cross; ``bounds`` says where segments 1, 2... start. Phrases in
        ``excluded`` are not looked for. With ``seen`` (one set per segment; segments may share
        one), only the first occurrence of a phrase not yet in the segment's set is reported,
        and added to it: once all phrases of an anchor are found, its later occurrences cost
        next to nothing, so a text full of matches stays fast. ``keys`` are the automaton's
        matches in ``u`` when the caller has them already.
        """
        automaton = self._automaton
        if automaton is None:
            return
        anchors = automaton.anchors
        vetoes = self._vetoes
        segment = 0
        next_bound = bounds[0] if bounds else len(u)
        found = None if seen is None else seen[0]
        pending: dict[int, int] = {}  # anchor -> phrases still to find under it (with ``seen``)
        vetoed: dict[int, int] = {}  # phrase -> occurrences found inside an ``unless`` phrase
        if keys is None:
            keys = automaton.matcher.find_matches_as_indexes(u, overlapping=True)
        for key, _, key_end in keys:
            anchor_ = anchors[key]
            last = key_end - 1  # the last byte of the key (its closing space, for a whole word)
            if last >= next_bound:  # into the next segment: its own first occurrences
                while last >= next_bound:
                    segment += 1
                    next_bound = bounds[segment] if segment < len(bounds) else len(u)
                found = None if seen is None else seen[segment]
                pending = {}
                vetoed = {}
            if found is not None:
                left = pending.get(anchor_.key_id)
                if left is None:
                    left = sum(1 for e in anchor_.entries if e[0] not in excluded and e[0] not in found)
                    pending[anchor_.key_id] = left
                if not left:
                    continue
            start = last - anchor_.key_len + 2  # the anchor word, without its spaces
            end = u.find(b" ", last) if anchor_.open_end else last
            candidates = anchor_.single
            if anchor_.has_neighbours:  # (inlined: this runs at every occurrence of an anchor)
                candidates = anchor_.candidates(u, start, end)
            for index, words, anchor, stem in candidates:
                if index in excluded or (found is not None and index in found):
                    continue
                if len(words) == 1:
                    first, stop = start, end
                else:
                    first, stop = _around(u, start, end, words, anchor, stem)
                    if first < 0:
                        continue
                if vetoes and index in vetoes:
                    times = vetoed.get(index, 0)
                    # Inside a set phrase that is not the incident: a later one may count. A
                    # vetoed occurrence is not "found", so each next one is checked again:
                    # past _MAX_VETOED in one field (a text of footers, hostile or absurd),
                    # they count, and the phrase is found and skipped from there as usual.
                    if times < _MAX_VETOED and _vetoed(u, first, vetoes[index]):
                        vetoed[index] = times + 1
                        continue
                if found is not None:
                    found.add(index)
                    pending[anchor_.key_id] -= 1
                yield segment, index, first, stop


class _Automaton:
    """One Aho-Corasick automaton over the anchor keys (UTF-8), and what each key anchors."""

    __slots__ = ("anchors", "matcher")

    #: Above this many keys the automaton is a contiguous NFA instead of a DFA: the DFA scans
    #: about twice as fast but its memory grows quickly with the keys (~11 MB at 10,000).
    DFA_MAX_KEYS = 20_000

    def __init__(self, keys: list[bytes], anchors: list[_Anchor]) -> None:
        implementation = (
            ahocorasick_rs.Implementation.DFA
            if len(keys) <= self.DFA_MAX_KEYS
            else ahocorasick_rs.Implementation.ContiguousNFA
        )
        self.matcher = ahocorasick_rs.BytesAhoCorasick(keys, implementation=implementation)
        self.anchors = anchors


def _char_offset_map(u: bytes, offsets: Iterable[int]) -> dict[int, int]:
    """Byte offset -> offset into the folded string, for each of ``offsets`` (all on character
    boundaries); one pass over ``u`` for all of them, none at all for ASCII."""
    if u.isascii():
        return {offset: offset for offset in offsets}
    mapping: dict[int, int] = {}
    done_bytes = done_chars = 0
    for offset in sorted(set(offsets)):
        done_chars += len(u[done_bytes:offset].decode("utf-8", "surrogatepass"))
        done_bytes = offset
        mapping[offset] = done_chars
    return mapping


def _show(value: object, limit: int = 60) -> str:
    """repr() of a phrase or name for an error message, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One named keyword rule, as written in the rules file."""

    name: str  # stable kebab-case name, unique in its file; stored on every hit
    description: str = ""
    phrases: tuple[str, ...]
    fields: tuple[str, ...] = FIELDS  # any of "subject", "body", "attachments"
    severity: Severity
    tags: tuple[str, ...] = ()  # "security" makes a hit a security incident
    quoted: bool = False  # also look at quoted history
    unless: tuple[str, ...] = ()  # set phrases around a phrase that make that occurrence no hit


def _is_kebab(name: str) -> bool:
    return (
        0 < len(name) <= _MAX_NAME_CHARS
        and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in name)
        and not name.startswith("-")
        and not name.endswith("-")
        and "--" not in name
    )


def _where(source: str, index: int, name: object = None) -> str:
    rule = f"rule #{index + 1}"
    if isinstance(name, str) and name:
        rule += f" {_show(name)}"
    return f"{source}: {rule}"


class RuleSet:
    """An ordered set of rules compiled into one automaton; ``classify`` is a pure function."""

    __slots__ = ("_matcher", "_not_quoted", "_phrase_rule", "_rule_fields", "rules", "source")

    def __init__(self, rules: Iterable[Rule], *, source: str = "<rules>") -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.source = source
        if len(self.rules) > MAX_RULES:
            raise RulesError(f"{source}: {len(self.rules):,} rules; the limit is {MAX_RULES:,} rules per file")
        phrases: list[str] = []
        compiled: list[_Compiled] = []
        phrase_rule: list[int] = []
        vetoes: dict[int, list[_Veto]] = {}
        seen_names: dict[str, int] = {}
        for r, rule in enumerate(self.rules):
            where = _where(source, r, rule.name)
            _check_rule(rule, where)
            if rule.name in seen_names:
                raise RulesError(
                    f"{where}: duplicate rule name (rule #{seen_names[rule.name] + 1} has it too); "
                    "rule names must be unique"
                )
            seen_names[rule.name] = r
            if len(phrases) + len(rule.phrases) + len(rule.unless) > MAX_PHRASES:
                raise RulesError(
                    f"{where}: too many phrases: more than {MAX_PHRASES:,} in total "
                    f"({len(phrases) + len(rule.phrases) + len(rule.unless):,} so far); the limit is "
                    f"{MAX_PHRASES:,} phrases per rules file"
                )
            first_index = len(compiled)
            for p, phrase in enumerate(rule.phrases):
                try:
                    compiled.append(_compile_phrase(phrase))
                except ValueError as exc:
                    raise RulesError(f"{where}: phrase #{p + 1} {_show(phrase)} {exc}") from None
                phrases.append(phrase)
                phrase_rule.append(r)
            for n, set_phrase in enumerate(rule.unless):
                try:
                    around = _compile_phrase(set_phrase)
                except ValueError as exc:
                    raise RulesError(f"{where}: unless #{n + 1} {_show(set_phrase)} {exc}") from None
                words = tuple(word.encode("utf-8", "surrogatepass") for word in around.words)
                applies = False
                for index in range(first_index, len(compiled)):
                    for k in _occurrences_in(compiled[index], around):
                        vetoes.setdefault(index, []).append((words, k, around.stem))
                        applies = True
                if not applies:
                    raise RulesError(
                        f"{where}: unless #{n + 1} {_show(set_phrase)} contains none of the rule's phrases, "
                        "so it could never apply: write the whole set phrase, e.g. 'unauthorized access, "
                        "use or disclosure' for the phrase 'unauthorized access'"
                    )
        self._matcher = PhraseMatcher._from_compiled(phrases, compiled, vetoes)
        self._phrase_rule = tuple(phrase_rule)
        # Per field: phrase indexes whose rule does NOT look at it (skipped while scanning).
        # Equal sets become one object, so that classify can group texts by identity.
        canonical: dict[frozenset[int], frozenset[int]] = {}

        def excluded(looks: Callable[[Rule], bool]) -> frozenset[int]:
            indexes = frozenset(i for i, r in enumerate(phrase_rule) if not looks(self.rules[r]))
            return canonical.setdefault(indexes, indexes)

        def looks_at(field: str) -> Callable[[Rule], bool]:
            return lambda rule: field in rule.fields

        self._rule_fields = {field: excluded(looks_at(field)) for field in FIELDS}
        not_quoted = excluded(lambda rule: rule.quoted)
        self._not_quoted = not_quoted

    def __repr__(self) -> str:
        return f"RuleSet({len(self.rules)} rules from {self.source})"

    @property
    def phrase_count(self) -> int:
        return len(self._phrase_rule)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RuleSet:
        """Read and check a rules file; RulesError names the file, the rule and the problem."""
        p = pathlib.Path(path)
        try:
            with p.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise RulesError(f"{p}: cannot read the rules file: {exc.strerror or exc}") from exc
        if len(data) > MAX_FILE_BYTES:
            raise RulesError(f"{p}: the rules file is larger than {MAX_FILE_BYTES:,} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RulesError(f"{p}: the rules file is not UTF-8 (bad byte at offset {exc.start})") from None
        return cls.from_toml(text, source=str(p))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> RuleSet:
        """Parse rules from TOML text: ``[[rule]]`` tables (see intake/data/rules.toml)."""
        if len(text) > MAX_FILE_BYTES:
            raise RulesError(f"{source}: the rules text is longer than {MAX_FILE_BYTES:,} characters")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"{source}: invalid TOML{_rule_at_error(text, str(exc))}: {exc}") from None
        unknown = sorted(set(doc) - {"rule"})
        if unknown:
            raise RulesError(f"{source}: unknown top-level key {unknown[0]!r}: a rules file holds only [[rule]] tables")
        tables = doc.get("rule")
        if tables is None:
            raise RulesError(f"{source}: no rules: write at least one [[rule]] table")
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise RulesError(f"{source}: `rule` must be an array of tables, written [[rule]]")
        if len(tables) > MAX_RULES:
            raise RulesError(f"{source}: {len(tables):,} rules; the limit is {MAX_RULES:,} rules per file")
        total = 0
        rules: list[Rule] = []
        for index, table in enumerate(tables):
            rule = _rule_from_table(table, _where(source, index, table.get("name")))
            total += len(rule.phrases) + len(rule.unless)
            if total > MAX_PHRASES:
                raise RulesError(
                    f"{_where(source, index, rule.name)}: too many phrases: more than {MAX_PHRASES:,} "
                    f"in total ({total:,} so far); the limit is {MAX_PHRASES:,} phrases per rules file"
                )
            rules.append(rule)
        return cls(rules, source=source)

    @classmethod
    def default(cls) -> RuleSet:
        """The shipped rules (intake/data/rules.toml), compiled once per process."""
        return _default_rule_set()

    # ---- classifying -----------------------------------------------------------------------

    def classify(
        self,
        *,
        subject: str = "",
        body: str = "",
        quoted: str = "",
        attachments: Sequence[str] = (),
    ) -> Verdict:
        """What the rules say of one message. Pure: no I/O, no state.

        ``body`` is the author's new text (without quoted history and signature); ``quoted`` is
        the quoted history, looked at only by rules with ``quoted = true``. ``attachments`` are
        file names.
        """
        if isinstance(attachments, str):
            attachments = (attachments,)
        fields = self._rule_fields
        found: list[tuple[int, int, int, int, int]] = []  # (rule, segment, start, phrase, end)
        matched_rules: set[int] = set()
        phrase_rule = self._phrase_rule
        if (
            not attachments
            and (not quoted or len(self._not_quoted) == len(self._phrase_rule))
            and fields["subject"] is fields["body"]
        ):
            # The common case: subject and body, looked at by the same phrases, in one scan.
            automaton = self._matcher._automaton
            if automaton is None:
                return _QUIET
            head = b" " + _fold_bytes(subject) + b" \x00 "
            bound = len(head) - 1
            joined = head + _fold_bytes(body) + b" "
            keys = automaton.matcher.find_matches_as_indexes(joined, overlapping=True)
            if not keys:  # most mail holds no anchor word at all
                return _QUIET
            for segment, index, start, end in self._matcher._scan(
                joined, fields["body"], [set(), set()], (bound,), keys
            ):
                rule = phrase_rule[index]
                matched_rules.add(rule)
                offset = bound if segment else 0
                found.append((rule, segment, start - offset, index, end - offset))
            if not found:
                return _QUIET
            segments = [("subject", subject, joined[: bound - 1]), ("body", body, joined[bound:])]
        else:
            segments = self._scan_fields(subject, body, quoted, attachments, found, matched_rules)
        if not found:
            return _QUIET

        chosen = _select(found)
        folded_segments: dict[int, tuple[_Folded, dict[int, int]]] = {}
        for _rule, number, *_ in chosen:
            if number not in folded_segments:
                _, text, u = segments[number]
                offsets = itertools.chain.from_iterable((c[2], c[4]) for c in chosen if c[1] == number)
                folded_segments[number] = (_Folded(text), _char_offset_map(u, offsets))
        hits = [
            self._hit(segments[number][0], *folded_segments[number], index, start, end)
            for _rule, number, start, index, end in chosen
        ]
        rules = [self.rules[r] for r in sorted(matched_rules)]
        return Verdict(
            severity=min(rule.severity for rule in rules),
            security=any("security" in rule.tags for rule in rules),
            hits=tuple(hits),
        )

    def _scan_fields(
        self,
        subject: str,
        body: str,
        quoted: str,
        attachments: Sequence[str],
        found: list[tuple[int, int, int, int, int]],
        matched_rules: set[int],
    ) -> list[tuple[str, str, bytes]]:
        """Scan every field (the general case of classify); fills ``found`` and ``matched_rules``
        and returns the segments (field, text, padded folded UTF-8) that ``found`` numbers."""
        fields = self._rule_fields
        texts: list[tuple[str, str, frozenset[int]]] = [
            ("subject", subject, fields["subject"]),
            ("body", body, fields["body"]),
        ]
        if quoted and len(self._not_quoted) < len(self._phrase_rule):
            texts.append(("quoted", quoted, self._not_quoted))
        if attachments:
            texts.extend(("attachment", name, fields["attachments"]) for name in attachments)

        # Texts the same phrases look at are scanned in one pass (usually all of them). Only
        # the folded strings are built here: the way back to original offsets (_Folded) is
        # built for the few texts that have a hit.
        groups: dict[int, tuple[frozenset[int], list[tuple[str, str]]]] = {}
        for field, text, excluded in texts:
            if text:
                groups.setdefault(id(excluded), (excluded, []))[1].append((field, text))
        segments: list[tuple[str, str, bytes]] = []
        seen_in: dict[str, set[int]] = {}  # field -> phrases found there (all attachments: one field)
        scan = self._matcher._scan
        phrase_rule = self._phrase_rule
        for excluded, members in groups.values():
            base = len(segments)
            padded = [b" " + _fold_bytes(text) + b" " for _, text in members]
            segments.extend((field, text, u) for (field, text), u in zip(members, padded, strict=True))
            if len(members) == 1:
                joined, starts = padded[0], [0]
            else:
                joined = b"\x00".join(padded)
                starts = list(itertools.accumulate((len(u) + 1 for u in padded), initial=0))
            seen = [seen_in.setdefault(field, set()) for field, _ in members]
            for segment, index, start, end in scan(joined, excluded, seen, starts[1:-1]):
                rule = phrase_rule[index]
                matched_rules.add(rule)
                offset = starts[segment]
                found.append((rule, base + segment, start - offset, index, end - offset))
        return segments

    def _hit(self, field: str, folded: _Folded, chars: dict[int, int], index: int, start: int, end: int) -> RuleHit:
        rule = self.rules[self._phrase_rule[index]]
        start, end = chars[start], chars[end]
        o_start, o_end = folded.span(start, end)
        return RuleHit(
            rule=rule.name,
            phrase=self._matcher.phrases[index],
            field=field,
            excerpt=_excerpt(folded.original, o_start, o_end),
            negated=_negated(folded.text, start),
            severity=rule.severity,
            tags=rule.tags,
        )


_QUIET = Verdict()  # what most messages get: frozen, so one shared value will do


def _select(found: list[tuple[int, int, int, int, int]]) -> list[tuple[int, int, int, int, int]]:
    """At most MAX_HITS hits: first one per rule, then the rest, in rule and text order."""
    found.sort()
    chosen: list[tuple[int, int, int, int, int]] = []
    rest: list[tuple[int, int, int, int, int]] = []
    last_rule = -1
    for item in found:
        if item[0] != last_rule:
            chosen.append(item)
            last_rule = item[0]
        else:
            rest.append(item)
    chosen = chosen[:MAX_HITS]
    chosen.extend(rest[: MAX_HITS - len(chosen)])
    chosen.sort()
    return chosen


def _negated(u: str, start: int) -> bool:
    """Whether a negation word stands within the few words before folded ``u[start]``."""
    lo = max(0, start - 160)
    words = u[lo:start].split()
    if lo and words and u[lo - 1] != " " and u[lo] != " ":
        words = words[1:]  # the window cut a word in two
    for i in range(max(0, len(words) - _NEGATION_WINDOW), len(words)):
        word = words[i]
        if word in _NEGATIONS:
            return True
        if word == "t" and i and words[i - 1].endswith("n"):  # didn't, don't, can't, isn't...
            return True
    return False


def _excerpt(original: str, start: int, end: int) -> str:
    """The matched text with about _CONTEXT characters each side, whitespace collapsed."""
    lo = max(0, start - _CONTEXT)
    hi = min(len(original), end + _CONTEXT)
    if end - start > _MAX_EXCERPT // 2:  # a huge match (a stem on an endless word): trim it
        hi = start + _MAX_EXCERPT // 2
    text = " ".join(original[lo:hi].split())
    if len(text) > _MAX_EXCERPT:
        text = text[: _MAX_EXCERPT // 2] + " … " + text[-_MAX_EXCERPT // 2 :]
    return ("…" if lo > 0 else "") + text + ("…" if hi < len(original) else "")


# --------------------------------------------------------------------------------------------
# The rules file
# --------------------------------------------------------------------------------------------


def _check_rule(rule: Rule, where: str) -> None:
    """Semantic checks shared by files and rules built in code."""
    if not _is_kebab(rule.name):
        raise RulesError(
            f"{where}: invalid name: use lower-case kebab-case (letters, digits, single hyphens), "
            f"at most {_MAX_NAME_CHARS} characters, e.g. 'data-breach'"
        )
    if not isinstance(rule.severity, Severity):
        raise RulesError(f"{where}: severity must be a Severity (1 to 4)")
    if not rule.phrases:
        raise RulesError(f"{where}: no phrases: a rule needs at least one")
    if not rule.fields:
        raise RulesError(f"{where}: no fields: leave `fields` out to look at {', '.join(FIELDS)}")
    for field in rule.fields:
        if field not in FIELDS:
            raise RulesError(f"{where}: unknown field {_show(field)}: fields are {', '.join(FIELDS)}")


def _rule_from_table(table: Mapping[str, Any], where: str) -> Rule:
    unknown = [key for key in table if key not in _RULE_KEYS]
    if unknown:
        raise RulesError(f"{where}: unknown key {unknown[0]!r}: a rule has only {', '.join(_RULE_KEYS)}")
    if "name" not in table:
        raise RulesError(f"{where}: missing name: every rule needs a stable kebab-case `name`")
    name = table["name"]
    if not isinstance(name, str):
        raise RulesError(f"{where}: name must be a string")
    description = table.get("description", "")
    if not isinstance(description, str) or len(description) > _MAX_DESCRIPTION_CHARS:
        raise RulesError(f"{where}: description must be a string of at most {_MAX_DESCRIPTION_CHARS} characters")
    if "phrases" not in table:
        raise RulesError(f"{where}: no phrases: a rule needs a `phrases` list")
    phrases = table["phrases"]
    if not isinstance(phrases, list):
        raise RulesError(f"{where}: phrases must be a list of strings")
    if len(phrases) > MAX_PHRASES:
        raise RulesError(
            f"{where}: too many phrases: {len(phrases):,}; the limit is {MAX_PHRASES:,} phrases per rules file"
        )
    for p, phrase in enumerate(phrases):
        if not isinstance(phrase, str):
            raise RulesError(f"{where}: phrase #{p + 1} must be a string, not {type(phrase).__name__}")
    fields = table.get("fields", list(FIELDS))
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise RulesError(f"{where}: fields must be a list of strings among {', '.join(FIELDS)}")
    if len(set(fields)) != len(fields):
        raise RulesError(f"{where}: fields lists a field twice")
    if "severity" not in table:
        raise RulesError(f"{where}: missing severity: write `severity = 1` (most urgent) to 4")
    severity = table["severity"]
    if type(severity) is not int or not 1 <= severity <= 4:
        raise RulesError(f"{where}: invalid severity {severity!r}: it must be an integer from 1 to 4")
    tags = table.get("tags", [])
    if (
        not isinstance(tags, list)
        or len(tags) > _MAX_TAGS
        or not all(isinstance(t, str) and t.strip() and len(t) <= _MAX_TAG_CHARS for t in tags)
    ):
        raise RulesError(
            f"{where}: tags must be a list of at most {_MAX_TAGS} non-empty strings "
            f"of at most {_MAX_TAG_CHARS} characters"
        )
    quoted = table.get("quoted", False)
    if not isinstance(quoted, bool):
        raise RulesError(f"{where}: quoted must be true or false")
    unless = table.get("unless", [])
    if not isinstance(unless, list) or len(unless) > MAX_PHRASES:
        raise RulesError(f"{where}: unless must be a list of at most {MAX_PHRASES:,} strings")
    for p, phrase in enumerate(unless):
        if not isinstance(phrase, str):
            raise RulesError(f"{where}: unless #{p + 1} must be a string, not {type(phrase).__name__}")
    return Rule(
        name=name,
        description=description,
        phrases=tuple(phrases),
        fields=tuple(fields),
        severity=Severity(severity),
        tags=tuple(tags),
        quoted=quoted,
        unless=tuple(unless),
    )


def _rule_at_error(text: str, message: str) -> str:
    """Which [[rule]] table a TOML syntax error is in, as " in rule #N (...)"; "" if none."""
    _, found, tail = message.rpartition("(at line ")
    line_text = tail.split(",", 1)[0]
    if not found or not line_text.isdigit():
        return ""
    line = int(line_text)
    headers = [n for n, s in enumerate(text.splitlines()[:line], 1) if s.strip().startswith("[[rule]]")]
    return f" in rule #{len(headers)} (its [[rule]] starts at line {headers[-1]})" if headers else ""


def default_rules_path() -> pathlib.Path:
    """Where the shipped rules file is (intake/data/rules.toml)."""
    return pathlib.Path(str(importlib.resources.files("intake") / "data" / "rules.toml"))


@functools.cache
def _default_rule_set() -> RuleSet:
    resource = importlib.resources.files("intake") / "data" / "rules.toml"
    return RuleSet.from_toml(resource.read_text(encoding="utf-8"), source=str(default_rules_path()))


def lint(path: str | os.PathLike[str]) -> list[str]:
    """Check a rules file: RulesError if it is broken, else a summary and any warnings."""
    rule_set = RuleSet.load(path)
    lines = [f"{path}: OK: {len(rule_set.rules)} rules, {rule_set.phrase_count} phrases"]
    first_seen: dict[tuple[tuple[str, ...], bool], tuple[str, str]] = {}
    for rule in rule_set.rules:
        for phrase in rule.phrases:
            compiled = _compile_phrase(phrase)
            key = (compiled.words, compiled.stem)
            if key in first_seen:
                other_rule, other_phrase = first_seen[key]
                lines.append(
                    f"warning: rule {rule.name!r} phrase {phrase!r} matches the same text as "
                    f"rule {other_rule!r} phrase {other_phrase!r}"
                )
            else:
                first_seen[key] = (rule.name, phrase)
            if len("".join(compiled.words)) < 4:
                lines.append(f"warning: rule {rule.name!r} phrase {phrase!r} is very short and may fire often")
    return lines


# --------------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------------


def format_verdict(verdict: Verdict) -> str:
    """The verdict as a few lines of plain text for the command line."""
    severity = verdict.severity.label if verdict.severity is not None else "none"
    lines = [
        f"Severity: {severity}",
        f"Security incident: {'yes' if verdict.security else 'no'}",
    ]
    if not verdict.hits:
        lines.append("Hits: none")
        return "\n".join(lines)
    lines.append(f"Hits: {len(verdict.hits)}")
    for number, hit in enumerate(verdict.hits, 1):
        negated = "  [possibly negated]" if hit.negated else ""
        lines.append(f"  {number}. {hit.rule} ({hit.severity.label}) in {hit.field}: phrase {hit.phrase!r}{negated}")
        lines.append(f"     {hit.excerpt}")
    return "\n".join(lines)
