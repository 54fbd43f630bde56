"""Red-team cases of which ticket a message joins: what a person types, and what a stranger tries."""

from __future__ import annotations

import pytest

from intake.model import Route
from intake.routing import may_be_told, place
from tests.intake.test_routing import POLICY, REFS, msg, ticket


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)


# What mail clients, word processors, IMEs and copies from PDFs / web pages make of a reference a
# person meant to type: fullwidth forms (CJK input methods), typographic dashes (autocorrect,
# non-breaking hyphens from rendered text), invisible characters (copied from HTML), no-break
# spaces. Each still carries the reference, as "any case" does.
TYPED_FORMS = {
    "fullwidth": lambda r: _fullwidth(r),
    "non-breaking hyphen U+2011": lambda r: r.replace("-", "\u2011"),
    "hyphen U+2010": lambda r: r.replace("-", "\u2010"),
    "en dash": lambda r: r.replace("-", "\u2013"),
    "em dash": lambda r: r.replace("-", "\u2014"),
    "minus sign": lambda r: r.replace("-", "\u2212"),
    "zero-width space inside": lambda r: r[:6] + "\u200b" + r[6:],
    "soft hyphen inside": lambda r: r[:10] + "\u00ad" + r[10:],
    "word joiner and BOM": lambda r: "\u2060" + r[:4] + "\ufeff" + r[4:],
    "no-break spaces": lambda r: r.replace("-", "\u00a0"),
    "fullwidth brackets": lambda r: "\uff3b" + r + "\uff3d",
}


@pytest.mark.parametrize("form", sorted(TYPED_FORMS))
def test_a_reference_typed_with_unicode_look_alike_punctuation_or_width_is_found(form: str) -> None:
    r = REFS.new()
    typed = TYPED_FORMS[form](r)
    subject = f"Re: printer [{typed}] still broken"
    found = REFS.find(subject)
    assert [f.reference for f in found] == [r], (form, typed)
    # The text found is what the person typed, as it stands in the subject (so that it can be
    # quoted or taken out of the subject again).
    assert found[0].text in subject


@pytest.mark.parametrize("form", sorted(TYPED_FORMS))
def test_such_a_reference_joins_for_the_customer_and_never_for_a_stranger(form: str) -> None:
    r = REFS.new()
    t = ticket(r)
    subject = f"Re: printer [{TYPED_FORMS[form](r)}]"
    own = place(msg("alice@acme.com", subject), policy=POLICY, cited=REFS.find(subject), by_reference={r: t})
    assert own.route is Route.REFERENCE and own.ticket == t, form
    stranger = place(msg("mallory@evil.example", subject), policy=POLICY, cited=REFS.find(subject), by_reference={r: t})
    assert stranger.route is Route.NEW and [x.ticket for x in stranger.refusals] == [t], form


def test_a_mistyped_reference_in_fullwidth_is_told_as_mistyped() -> None:
    code = REFS.new()[4:].replace("-", "")
    typo = code[:7] + ("0" if code[7] != "0" else "1")
    subject = f"Re: [{_fullwidth(f'SUP-{typo[:4]}-{typo[4:]}')}]"
    [found] = REFS.find(subject)
    assert found.reference is None and found.text in subject


def test_words_stay_words_in_non_ascii_subjects() -> None:
    fullwidth_superb = "\uff33\uff35\uff30\uff25\uff32\uff22"
    for subject in ("Re: SUPERFICIAL question \u00e9", "SUPPORT\u2011ABCD\u2011EFGH", f"{fullwidth_superb} team"):
        assert REFS.find(subject) == [], subject


def test_only_someone_entitled_is_told_which_ticket_has_a_message() -> None:
    t = ticket(REFS.new())
    assert may_be_told(msg("alice@acme.com", ""), t, POLICY)
    assert may_be_told(msg("carol@acme.com", ""), t, POLICY)
    assert not may_be_told(msg("mallory@evil.example", ""), t, POLICY)
    assert not may_be_told(msg("mailer-daemon@mx.evil.example", ""), t, POLICY)


@pytest.mark.parametrize(
    "domain",
    ["hotmail.fr", "hotmail.de", "outlook.de", "live.fr", "yahoo.de", "yahoo.com.br", "gmx.at", "yandex.ua",
     "aol.co.uk", "orange.fr", "wanadoo.fr", "t-online.de", "libero.it", "btinternet.com", "comcast.net", "pm.me"],
)  # fmt: skip
def test_a_stranger_at_the_same_public_mail_provider_is_no_colleague(domain: str) -> None:
    """The listed providers exist under many country domains (hotmail.es is listed, hotmail.fr is
    the same service), and big ISPs give addresses to anyone who pays for a line."""
    r = REFS.new()
    t = ticket(r, requester=f"alice@{domain}", org=None)
    m = msg(f"mallory@{domain}", f"Re: [{r}]")
    p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r: t})
    assert p.route is Route.NEW and [x.ticket for x in p.refusals] == [t], domain


@pytest.mark.parametrize("domain", ["small.io", "mail.smallco.com", "hotmailer.fr", "live-events.de", "acmeyahoo.com"])
def test_a_company_domain_still_makes_colleagues(domain: str) -> None:
    r = REFS.new()
    t = ticket(r, requester=f"alice@{domain}", org=None)
    m = msg(f"frank@{domain}", f"Re: [{r}]")
    p = place(m, policy=POLICY, cited=REFS.find(m.subject), by_reference={r: t})
    assert p.route is Route.REFERENCE and "same domain as the requester" in p.note, domain
