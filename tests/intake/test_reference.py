"""Reference numbers: readable, case-insensitive, unguessable, self-checking."""

from __future__ import annotations

import itertools
import re

import pytest

from intake.reference import ALPHABET, References

refs = References("SUP")


def test_shape_and_uniqueness() -> None:
    made = {refs.new() for _ in range(5000)}
    assert len(made) == 5000
    for r in itertools.islice(made, 200):
        assert re.fullmatch(r"SUP-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}", r), r
        assert refs.normalise(r) == r


def test_every_symbol_is_equally_likely_in_every_random_position() -> None:
    counts = [dict.fromkeys(ALPHABET, 0) for _ in range(7)]
    for _ in range(32_000):
        body = refs.new().replace("-", "")[3:10]  # the seven random characters
        for position, ch in enumerate(body):
            counts[position][ch] += 1
    # 1,000 expected per cell; a bit left out or counted twice would empty or double cells.
    assert all(800 < n < 1200 for cell in counts for n in cell.values()), counts


def test_not_counting_up() -> None:
    a, b = refs.new(), refs.new()
    # Consecutive references share no numeric relation: their bodies differ in several places.
    assert sum(x != y for x, y in zip(a, b, strict=True)) >= 2 or a != b


@pytest.mark.parametrize(
    "typed",
    ["{r}", "{r_lower}", "{body}", "{body_lower}", "sup {b1} {b2}", "SUP#{b1}{b2}", "  {r}  "],
)
def test_forgiving_reading(typed: str) -> None:
    r = refs.new()
    body = r[4:].replace("-", "")
    text = typed.format(r=r, r_lower=r.lower(), body=body, body_lower=body.lower(), b1=body[:4], b2=body[4:])
    assert refs.normalise(text) == r


def test_crockford_aliases() -> None:
    r = next(x for x in (refs.new() for _ in range(10000)) if "0" in x[4:] or "1" in x[4:])
    typed = r.replace("0", "O").replace("1", "l")
    assert refs.normalise(typed) == r


def test_every_single_substitution_is_caught() -> None:
    r = refs.new()
    code = r[4:].replace("-", "")
    for pos in range(len(code)):
        for ch in ALPHABET:
            if ch == code[pos]:
                continue
            wrong = code[:pos] + ch + code[pos + 1 :]
            assert refs.normalise(wrong) is None, (code, wrong)


def test_most_adjacent_swaps_are_caught() -> None:
    caught = total = 0
    for _ in range(300):
        code = refs.new()[4:].replace("-", "")
        for pos in range(len(code) - 1):
            if code[pos] == code[pos + 1]:
                continue
            swapped = code[:pos] + code[pos + 1] + code[pos] + code[pos + 2 :]
            total += 1
            caught += refs.normalise(swapped) is None
    assert caught / total > 0.9


def test_find_in_subjects() -> None:
    r = refs.new()
    body = r[4:]
    subjects = [
        f"Re: Printer on fire [{r}]",
        f"RE: AW: Fwd: [{r.lower()}] printer",
        f"[{r}] Re: printer",
        f"printer {r} still broken",
        f"Re: [JIRA-123] [Ticket#2024010110000012] printer [SUP {body.replace('-', ' ')}]",
        f"Re: Printer down [{r.replace('-', '')}]",  # retyped without the dashes
        f"Re: Printer down {r.replace('-', '').lower()}",
    ]
    for s in subjects:
        found = [f for f in refs.find(s) if f.reference]
        assert [f.reference for f in found] == [r], s


def test_words_shaped_like_a_reference_are_not_reported_as_mistyped() -> None:
    """Words have a reference's shapes: "SUP" and eight letters (a reference retyped without its
    dashes), "SUP", a space and two words of four. Only a token that passes the check is found
    in those shapes (a compact one marked loose, so that routing says nothing of it when no
    ticket has it); the others are words, not mistyped references."""
    words = ["SUPERFICIAL", "SUPPLEMENTS", "SUPERSTARS!", "Supplements", "SUPPORT-ABCD-EFGH", "Sup need help",
             "SUP-PORT TEAM", "sup: team room"]  # fmt: skip
    for w in words:
        assert refs.find(f"Re: {w} question") == [], w
    # Random compact codes with their check character replaced: most fail, and are not found;
    # the few that pass by chance (1 in 32) are found, loose.
    many = [refs.new().replace("-", "")[:-1] + "0" for _ in range(400)]
    found = [f for text in many for f in refs.find(text)]
    assert 0 < len(found) < 40 and all(f.reference is not None and f.loose for f in found)
    # Written as references are, a failing token is reported: with both dashes, or in brackets.
    code = refs.new()[4:].replace("-", "")
    typo = code[:7] + ("0" if code[7] != "0" else "1")
    for text in (f"SUP-{typo[:4]}-{typo[4:]}", f"[SUP {typo[:4]} {typo[4:]}]", f"(sup#{typo})"):
        [f] = refs.find(f"Re: {text} again")
        assert f.reference is None and not f.loose, text


def test_find_reports_mistyped() -> None:
    r = refs.new()
    code = r[4:].replace("-", "")
    wrong_ch = next(c for c in ALPHABET if c != code[3])
    typo = f"SUP-{code[:3]}{wrong_ch}-{code[4:]}"
    found = refs.find(f"Re: help [{typo}]")
    assert len(found) == 1 and found[0].reference is None and found[0].text == typo


def test_other_prefix_and_no_false_hits() -> None:
    other = References("HELP")
    r = other.new()
    assert other.find(f"Re: x [{r}]")[0].reference == r
    assert refs.find(f"Re: x [{r}]") == []
    assert refs.find("SUPPORT-ABCD-EFGH needed; issue SUPERB") == []
    with pytest.raises(ValueError):
        References("9bad")
