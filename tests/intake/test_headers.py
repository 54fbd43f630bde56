"""intake.headers: customer text made safe for an outgoing header line."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intake.acknowledgement import reply_subject
from intake.headers import ELLIPSIS, clean_header_text, display_name

_FORBIDDEN = {chr(c) for c in range(0x20)} | {chr(c) for c in range(0x7F, 0xA0)}
_FORBIDDEN |= {"\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hi\r\nBcc: victim@example.com", "Hi Bcc: victim@example.com"),
        ("\nX-Evil: 1", "X-Evil: 1"),
        ("Hello\rX-Evil: 1", "Hello X-Evil: 1"),
        ("Hello\u2028X-Evil: 1\u2029end", "Hello X-Evil: 1 end"),
        ("Hello\x85X-Evil: 1", "Hello X-Evil: 1"),  # NEL, a C1 line break
        ("tab\tand\x0bvertical\x0cfeed", "tab and vertical feed"),
        ("nul\x00bell\x07esc\x1b[31mdel\x7f", "nulbellesc[31mdel"),
        ("c1\x80\x9bcontrols", "c1controls"),
        ("invoice\u202egpj.exe", "invoicegpj.exe"),  # RLO: "Trojan Source"
        ("\u2066isolated\u2069 \u202aembedded\u202c", "isolated embedded"),
        ("  lots   of \t\t space  ", "lots of space"),
        ("non\xa0breaking\u3000ideographic", "non breaking ideographic"),
        ("Grüße, Zoë — 日本語 ✓", "Grüße, Zoë — 日本語 ✓"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("", ""),
        ("\r\n\t ", ""),
    ],
)
def test_clean_header_text_makes_one_safe_line(raw: str, expected: str) -> None:
    assert clean_header_text(raw) == expected


def test_short_text_is_not_cut() -> None:
    assert clean_header_text("x" * 200) == "x" * 200
    assert clean_header_text("x" * 10, max_length=10) == "x" * 10


def test_long_text_is_cut_with_an_ellipsis_within_the_cap() -> None:
    result = clean_header_text("ä" * 1000)
    assert result == "ä" * 199 + ELLIPSIS
    assert len(result) == 200


def test_cut_does_not_leave_a_trailing_space_before_the_ellipsis() -> None:
    assert clean_header_text("abcd efgh", max_length=6) == "abcd" + ELLIPSIS


def test_cut_never_separates_a_letter_from_its_combining_marks() -> None:
    decomposed = "e\u0301" * 10  # "é" as e + COMBINING ACUTE ACCENT
    result = clean_header_text(decomposed, max_length=6)
    assert result == "e\u0301e\u0301" + ELLIPSIS
    kept = result.removesuffix(ELLIPSIS)
    assert not unicodedata.combining(decomposed[len(kept)])  # the first dropped char is a base


def test_cut_drops_a_whole_encoded_word_rather_than_half_of_it() -> None:
    text = "Ticket =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_Berlin?= and more"
    result = clean_header_text(text, max_length=20)
    assert result == "Ticket" + ELLIPSIS
    assert "=?" not in result


def test_a_whole_encoded_word_before_the_cut_is_kept_as_literal_text() -> None:
    text = "=?utf-8?q?hello?= " + "x" * 50
    result = clean_header_text(text, max_length=30)
    assert result.startswith("=?utf-8?q?hello?= xxx")
    assert len(result) == 30


def test_encoded_word_syntax_is_left_literal_not_decoded() -> None:
    assert clean_header_text("Re: =?utf-8?q?=0D=0ABcc:_x?=") == "Re: =?utf-8?q?=0D=0ABcc:_x?="


def test_max_length_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_length"):
        clean_header_text("x", max_length=0)


def test_display_name_is_cleaned_and_capped_at_80() -> None:
    assert display_name("Zoë\r\nBcc: x@example.com") == "Zoë Bcc: x@example.com"
    long_name = display_name("Ö" * 300)
    assert len(long_name) == 80
    assert long_name.endswith(ELLIPSIS)


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_result_is_always_one_capped_line_without_controls(raw: str, max_length: int) -> None:
    result = clean_header_text(raw, max_length=max_length)
    assert len(result) <= max_length
    assert not _FORBIDDEN & set(result)
    assert "  " not in result
    assert result == result.strip()
    result.encode("utf-8")  # no lone surrogate left


@given(st.text())
def test_cleaning_is_idempotent(raw: str) -> None:
    once = clean_header_text(raw)
    assert clean_header_text(once) == once


@pytest.mark.parametrize(
    "subject",
    [
        "RE: AW: Printer",
        "回复：Printer",
        "Réf. : Printer",
        "RIF: R: Printer",
        "Odp: Printer",
        "ΑΠ: Printer",
        "RE[2]: Printer",
    ],
)
def test_the_acknowledgement_subject_drops_every_clients_reply_prefix(subject: str) -> None:
    assert reply_subject(subject, "[SUP-1234-5678]") == "Re: Printer [SUP-1234-5678]"


def test_storable_text_and_stored_names_are_what_every_database_takes() -> None:
    from intake.headers import STORED_NAME_MAX, storable_text, stored_name

    assert storable_text("a\x00b") == "ab" and storable_text("caf\udce9 \x00é") == "caf\ufffd é"
    assert stored_name("Alice") == "Alice"
    long = stored_name("N" * 300)
    assert len(long) == STORED_NAME_MAX and long.endswith("…")
