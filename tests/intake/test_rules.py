"""Tests of the keyword rules engine (intake/rules.py) and the shipped rules (intake/data/rules.toml).

Pure core tests: no I/O except rules files written under tmp_path.
"""

from __future__ import annotations

import pathlib
import random
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intake import rules as rules_module
from intake.errors import RulesError
from intake.model import RuleHit, Severity, Verdict
from intake.rules import (
    MAX_HITS,
    MAX_PHRASE_CHARS,
    MAX_PHRASES,
    PhraseFound,
    PhraseMatcher,
    Rule,
    RuleSet,
    default_rules_path,
    format_verdict,
    lint,
)

DEFAULT = RuleSet.default()
DEFAULT_NAMES = (
    "security-breach",
    "unauthorized-access",
    "account-compromise",
    "suspicious-login",
    "credential-exposure",
    "data-exposure",
    "malware",
    "phishing",
)


def rule_names(verdict: Verdict) -> set[str]:
    return {hit.rule for hit in verdict.hits}


def only_hit(verdict: Verdict) -> RuleHit:
    assert len(verdict.hits) == 1, verdict.hits
    return verdict.hits[0]


def make_rules(*rules: Rule) -> RuleSet:
    return RuleSet(rules, source="<test>")


def rule(name: str, *phrases: str, **kwargs: object) -> Rule:
    kwargs.setdefault("severity", Severity.S1)
    kwargs.setdefault("tags", ("security",))
    return Rule(name=name, phrases=phrases, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The shipped rules: a positive and a negative case for every rule, in both languages
# --------------------------------------------------------------------------------------------

CASES = [
    # (rule, language, message that must fire it, ordinary message that must not fire anything)
    (
        "security-breach",
        "en",
        "Hi, we think there was a data breach on our tenant last night.",
        "Our vendor is in breach of contract and the SLA was breached twice this month.",
    ),
    (
        "security-breach",
        "es",
        "Creemos que hubo una brecha de seguridad en la plataforma.",
        "La brecha entre los dos equipos de seguridad es cada vez mayor.",
    ),
    (
        "unauthorized-access",
        "en",
        "We noticed unauthorized access to the admin panel from an unknown IP.",
        "Please give access to the authorized users listed below; they cannot sign in.",
    ),
    (
        "unauthorized-access",
        "es",
        "Detectamos un acceso no autorizado a la consola de administración.",
        "El acceso está autorizado para todo el equipo de administración.",
    ),
    (
        "account-compromise",
        "en",
        "Our Slack workspace was hacked this morning, please help.",
        "We had a hackathon last week and built a hacky workaround for the export.",
    ),
    (
        "account-compromise",
        "es",
        "Nos hackearon el correo del director y está enviando facturas falsas.",
        "La empresa está comprometida con la calidad; revisen la cuenta anual, por favor.",
    ),
    (
        "suspicious-login",
        "en",
        "We got an alert about a suspicious sign-in to our admin account from abroad.",
        "Sign-in works again, nothing suspicious; the new login page looks great.",
    ),
    (
        "suspicious-login",
        "es",
        "Recibimos un aviso de inicio de sesión sospechoso en la cuenta principal.",
        "El inicio de sesión ya funciona; no vimos nada sospechoso en el panel.",
    ),
    (
        "credential-exposure",
        "en",
        "Our API key was leaked on a public GitHub repository yesterday.",
        "I need a password reset: I forgot my password and the reset link expired.",
    ),
    (
        "credential-exposure",
        "es",
        "Encontramos contraseñas filtradas de nuestros empleados en un foro.",
        "Necesito restablecer mi contraseña; olvidé la contraseña y el enlace caducó.",
    ),
    (
        "data-exposure",
        "en",
        "There has been a data leak from the export bucket, customer emails are public.",
        "Please export the customer data to CSV; also the office kitchen tap has a leak.",
    ),
    (
        "data-exposure",
        "es",
        "Sufrimos una filtración de datos de clientes durante el fin de semana.",
        "Los datos filtrados por fecha no aparecen y los datos expuestos en la tabla son viejos.",
    ),
    (
        "malware",
        "en",
        "All our files have been encrypted by ransomware, the note asks for bitcoin.",
        "This email has been scanned for viruses and malware by Mimecast. Virus-free. www.avast.com",
    ),
    (
        "malware",
        "es",
        "Un virus informático infectó los equipos de la oficina central.",
        "Este correo ha sido analizado en busca de virus y malware por nuestro antivirus.",
    ),
    (
        "phishing",
        "en",
        "Several of our staff received a phishing email pretending to be your billing team.",
        "We went fishing last weekend; the billing email you sent is fine.",
    ),
    (
        "phishing",
        "es",
        "Recibimos un intento de suplantación de identidad por correo con su logo.",
        "Cambiamos la identidad corporativa y el correo de facturación.",
    ),
]


def test_cases_cover_every_default_rule_in_both_languages() -> None:
    assert {(name, lang) for name, lang, _, _ in CASES} == {(n, lang) for n in DEFAULT_NAMES for lang in ("en", "es")}


@pytest.mark.parametrize(("name", "lang", "text"), [(n, lang, pos) for n, lang, pos, _ in CASES])
def test_default_rule_fires(name: str, lang: str, text: str) -> None:
    verdict = DEFAULT.classify(body=text)
    assert name in rule_names(verdict), (lang, verdict)
    assert verdict.severity is Severity.S1
    assert verdict.security is True


@pytest.mark.parametrize(("name", "lang", "text"), [(n, lang, neg) for n, lang, _, neg in CASES])
def test_default_rules_stay_quiet_on_ordinary_mail(name: str, lang: str, text: str) -> None:
    assert DEFAULT.classify(subject=text, body=text) == Verdict()


@pytest.mark.parametrize(
    "text",
    [
        "Can you send me a password reset link? I reset my password but it still fails.",
        "This email has been scanned for viruses. No virus found in this message.",
        "Virus-free. www.avast.com",
        "This message has been checked for spam and malware by our gateway.",
        "If you are not the intended recipient, any unauthorized review, use, disclosure or "
        "distribution is prohibited.",
        "Top stories today on Hacker News: a new hackathon in Lisbon.",
        "The SLA breach penalty is in section 4; we consider it a breach of contract.",
        "Security update: we rotated the TLS certificates as planned, no action needed.",
        "La exportación de datos filtrados por región tarda mucho.",
        "Los datos expuestos en el informe mensual no coinciden con el panel.",
        "Nuestra empresa está comprometida con la protección de datos.",
        "Olvidé mi contraseña, ¿pueden restablecerla?",
        "Could you whitelist the IP for our login page? Access is denied from the VPN.",
    ],
)
def test_ordinary_support_mail_is_not_an_incident(text: str) -> None:
    assert DEFAULT.classify(subject="Re: your ticket", body=text) == Verdict()


@pytest.mark.parametrize(
    "subject",
    [
        "API key leaked on GitHub",
        "Admin password leaked in a paste site",
        "URGENT: credentials leaked",
        "Access token leaked in our CI logs",
        "Clave de API filtrada en GitHub",
        "Token de acceso filtrado en un repositorio público",
    ],
)
def test_headline_style_reports_of_leaked_secrets_fire(subject: str) -> None:
    # Subjects drop the verb's "was": "API key leaked on GitHub" went in as Severity 3.
    verdict = DEFAULT.classify(subject=subject, body="Please check for misuse.")
    assert "credential-exposure" in rule_names(verdict), verdict
    assert verdict.severity is Severity.S1 and verdict.security


def test_every_default_rule_is_a_paging_security_rule() -> None:
    assert tuple(r.name for r in DEFAULT.rules) == DEFAULT_NAMES
    for r in DEFAULT.rules:
        assert r.severity is Severity.S1, r.name
        assert "security" in r.tags, r.name
        assert r.quoted is False, r.name
        assert r.fields == ("subject", "body", "attachments"), r.name
        assert r.description, r.name


@pytest.mark.parametrize("rule_", DEFAULT.rules, ids=lambda r: r.name)
def test_every_default_phrase_fires_its_rule(rule_: Rule) -> None:
    for phrase in rule_.phrases:
        text = f"Hello team. Today {phrase.rstrip('*')}. Please call us back."
        assert rule_.name in rule_names(DEFAULT.classify(body=text)), phrase


def test_default_rules_load_from_the_path_they_ship_at() -> None:
    path = default_rules_path()
    assert path.name == "rules.toml"
    assert path.is_file()
    assert [r.name for r in RuleSet.load(path).rules] == list(DEFAULT_NAMES)
    assert RuleSet.default() is DEFAULT  # compiled once per process


# --------------------------------------------------------------------------------------------
# Matching as a person expects
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "data breach",
        "DATA BREACH",
        "Data\nBreach",
        "data\n  breach",
        "data\r\n\r\n\tbreach",
        "data-breach",
        "data — breach",
        "data,   breach",
        "data) [breach",
        "ＤＡＴＡ　ＢＲＥＡＣＨ",  # fullwidth letters and ideographic space
        "da\u00adta breach",  # a soft hyphen does not split a word
        "data" + " " * 5000 + "breach",
    ],
)
def test_case_spacing_and_punctuation_between_words_do_not_matter(text: str) -> None:
    found = PhraseMatcher(["data breach"]).find(f"We had a {text} yesterday.")
    assert [f.index for f in found] == [0]
    start = len("We had a ")
    assert (found[0].start, found[0].end) == (start, start + len(text))


@pytest.mark.parametrize(
    ("phrase", "text"),
    [
        ("autorizacion", "AUTORIZACIÓN"),
        ("autorización", "autorizacion"),
        ("autorización", "autorizacio\u0301n"),  # decomposed accent
        ("straße", "STRASSE"),
        ("strasse", "Straße"),
        ("naïve", "NAIVE"),
        ("file", "ﬁle"),  # ligature
        ("contraseñas filtradas", "CONTRASENAS FILTRADAS"),
        ("пароль", "ПАРОЛЬ"),  # other scripts fold too
    ],
)
def test_case_and_accents_are_ignored(phrase: str, text: str) -> None:
    found = PhraseMatcher([phrase]).find(f"« {text} »")
    assert len(found) == 1
    assert f"« {text} »"[found[0].start : found[0].end] == text


def test_whole_words_only() -> None:
    matcher = PhraseMatcher(["hack", "hacked", "data breach"])
    text = "hackathon whacked hacked hacks metadata breach data breaches"
    found = {(text[f.start : f.end], matcher.phrases[f.index]) for f in matcher.find(text)}
    assert found == {("hacked", "hacked")}


def test_default_rules_tell_hacked_from_hackathon() -> None:
    assert DEFAULT.classify(body="Join our hackathon!") == Verdict()
    assert only_hit(DEFAULT.classify(body="We were HACKED.")).rule == "account-compromise"


def test_star_takes_inflections_of_the_last_word_only() -> None:
    matcher = PhraseMatcher(["breach*", "data leak*"])
    text = "breach, Breaches, BREACHED, data leaks, data leakage, a breachX, databreach, leak"
    found = [text[f.start : f.end] for f in matcher.find(text)]
    assert found == ["breach", "Breaches", "BREACHED", "data leaks", "data leakage", "breachX"]


def test_a_phrase_without_star_does_not_take_inflections() -> None:
    assert PhraseMatcher(["hacked"]).find("hackedx hacked") == [PhraseFound(0, 8, 14)]


def test_overlapping_phrases_are_all_found_in_text_order() -> None:
    matcher = PhraseMatcher(["data breach", "breach", "security breach", "a data"])
    text = "a data breach; security breach"
    found = [(matcher.phrases[f.index], text[f.start : f.end]) for f in matcher.find(text)]
    assert found == [
        ("a data", "a data"),
        ("data breach", "data breach"),
        ("breach", "breach"),
        ("security breach", "security breach"),
        ("breach", "breach"),
    ]


@pytest.mark.parametrize("text", ["suspicious", "this is suspicious", "suspicious.", "login", "data"])
def test_part_of_a_phrase_at_the_very_start_or_end_of_a_text(text: str) -> None:
    assert DEFAULT.classify(subject=text, body=text, attachments=[text]) == Verdict()
    assert PhraseMatcher(["suspicious login*", "data breach", "no data"]).find(text) == []


def test_phrases_of_several_words_need_every_word() -> None:
    matcher = PhraseMatcher(["someone accessed our account*"])
    assert matcher.find("someone accessed our") == []
    assert matcher.find("someone accessed their account") == []
    found = matcher.find("I think someone\naccessed our ACCOUNTS.")
    assert [("I think someone\naccessed our ACCOUNTS."[f.start : f.end]) for f in found] == [
        "someone\naccessed our ACCOUNTS"
    ]


def test_matcher_without_phrases_finds_nothing() -> None:
    assert PhraseMatcher([]).find("data breach") == []


def test_matcher_rejects_bad_phrases_with_their_index() -> None:
    with pytest.raises(ValueError, match=r"phrase 1 'da\*ta'.*only at the very end"):
        PhraseMatcher(["ok", "da*ta"])
    with pytest.raises(ValueError, match=r"phrase 0 '\.\.\.'.*at least one letter or digit"):
        PhraseMatcher(["..."])


def test_other_scripts_and_odd_characters_do_not_break_matching() -> None:
    matcher = PhraseMatcher(["数据泄露", "data breach"])
    text = "\ud800 😀 مرحبا 数据泄露 देवनागरी \u202e data breach \ufeff"
    found = [text[f.start : f.end] for f in matcher.find(text)]
    assert found == ["数据泄露", "data breach"]


# --------------------------------------------------------------------------------------------
# Offsets and excerpts refer to the original text
# --------------------------------------------------------------------------------------------


def test_offsets_point_at_the_original_text_after_length_changing_folds() -> None:
    text = "Straße ½ ﬁ… Ｘ — Hubo un ACCESO NO AUTORIZADO ayer"
    found = PhraseMatcher(["acceso no autorizado"]).find(text)
    assert [text[f.start : f.end] for f in found] == ["ACCESO NO AUTORIZADO"]


def test_offsets_stay_right_far_into_a_long_non_ascii_text() -> None:
    filler = "La configuración de la exportación falló otra vez, ¿podrían revisarlo? " * 400
    text = filler + "Además, vimos un Acceso No Autorizado en la consola. ß" + filler
    assert len(text) > 3 * rules_module._CHUNK  # several chunks, each mapped back lazily
    found = PhraseMatcher(["acceso no autorizado"]).find(text)
    assert [(f.start, text[f.start : f.end]) for f in found] == [
        (len(filler) + len("Además, vimos un "), "Acceso No Autorizado")
    ]


@pytest.mark.parametrize(
    "alphabet",
    [
        "abc XYZ,.-\n",  # ASCII: offsets 1:1
        "abc áéñÜ¿¡’“”–— ",  # Latin-1 and typographic marks: still 1:1
        "abc ßéñ…½™\u00ad ",  # Latin-1 whose folds change lengths
        "abc пароль ěž 한국어 e\u0301 \ufffd 😀 ",  # other scripts, decomposed accents, Hangul
    ],
)
def test_offsets_stay_right_in_long_texts_of_any_alphabet(alphabet: str) -> None:
    rng = random.Random(alphabet)
    pieces, expected, position = [], [], 0
    for _ in range(12):  # ~60,000 characters: several chunks, many blocks
        filler = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9000))) + " "
        pieces += [filler, "Data\nBreach"]
        position += len(filler)
        expected.append((position, position + len("Data\nBreach")))
        position += len("Data\nBreach")
        pieces.append(" ")
        position += 1
    text = "".join(pieces)
    found = [(f.start, f.end) for f in PhraseMatcher(["data breach"]).find(text)]
    assert found == expected


def test_excerpt_shows_the_original_accented_cased_text_with_context() -> None:
    body = (
        "Buenos días, les escribo por un tema urgente.\n\n"
        "El lunes   detectamos un ACCESO NO AUTORIZADO a la cuenta de facturación."
    )
    hit = only_hit(DEFAULT.classify(body=body))
    assert hit.rule == "unauthorized-access"
    assert hit.phrase == "acceso no autorizado"
    assert hit.field == "body"
    assert "ACCESO NO AUTORIZADO" in hit.excerpt
    assert "detectamos un ACCESO NO AUTORIZADO a la cuenta de facturación" in hit.excerpt
    assert "  " not in hit.excerpt and "\n" not in hit.excerpt  # whitespace collapsed
    assert hit.excerpt.startswith("…")  # context was cut on the left


def test_excerpt_of_the_first_occurrence() -> None:
    body = "First: data breach one. " + "filler " * 50 + "Then: DATA BREACH two."
    hit = only_hit(DEFAULT.classify(body=body))
    assert "data breach one" in hit.excerpt
    assert "two" not in hit.excerpt


@settings(max_examples=200, deadline=None, database=None)
@given(prefix=st.text(max_size=40), suffix=st.text(max_size=40))
def test_found_offsets_survive_any_surrounding_unicode(prefix: str, suffix: str) -> None:
    text = f"{prefix} Data Breach {suffix}"
    found = PhraseMatcher(["data breach"]).find(text)
    start = len(prefix) + 1
    assert PhraseFound(0, start, start + len("Data Breach")) in found
    for f in found:
        assert rules_module._fold(text[f.start : f.end]).split() == ["data", "breach"]


def reference_matches(phrases: list[str], text: str) -> set[tuple[int, int, int]]:
    """The obvious quadratic matcher, in folded coordinates: consecutive whole words."""
    u = f" {rules_module._fold(text)} "
    tokens, position = [], 0
    for word in u.split(" "):
        if word:
            tokens.append((word, position, position + len(word)))
        position += len(word) + 1
    found = set()
    for index, phrase in enumerate(phrases):
        stem = phrase.endswith("*")
        words = rules_module._fold(phrase.rstrip("*")).split()
        for t in range(len(tokens) - len(words) + 1):
            window = tokens[t : t + len(words)]
            same = all(token == word for (token, _, _), word in zip(window[:-1], words[:-1], strict=True))
            last = window[-1][0]
            if same and (last == words[-1] or (stem and last.startswith(words[-1]))):
                found.add((index, window[0][1], window[-1][2]))
    return found


VOCABULARY = ["data", "breach", "da", "ta", "breaches", "no", "acceso", "autorizado", "Straße", "strasse"]
SEPARATORS = [" ", "  ", "\n", "-", ". ", "", "\u00ad", " \u0301"]


@settings(max_examples=400, deadline=None, database=None)
@given(
    phrase_words=st.lists(
        st.tuples(st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=3), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    text_parts=st.lists(st.tuples(st.sampled_from(VOCABULARY), st.sampled_from(SEPARATORS)), max_size=12),
)
def test_matcher_agrees_with_the_obvious_quadratic_matcher(
    phrase_words: list[tuple[list[str], bool]], text_parts: list[tuple[str, str]]
) -> None:
    phrases = [" ".join(words) + ("*" if stem else "") for words, stem in phrase_words]
    text = "".join(word + separator for word, separator in text_parts)
    matcher = PhraseMatcher(phrases)
    u = f" {rules_module._fold(text)} ".encode()  # the scan works on the UTF-8 of the fold
    scanned = [(index, start, end) for _, index, start, end in matcher._scan(u)]
    chars = rules_module._char_offset_map(u, [offset for _, start, end in scanned for offset in (start, end)])
    found = {(index, chars[start], chars[end]) for index, start, end in scanned}
    assert found == reference_matches(phrases, text)
    assert len(matcher.find(text)) == len(found)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=60))
def test_fold_is_defined_character_by_character(text: str) -> None:
    assert rules_module._fold(text) == "".join(rules_module._fold_char(c) for c in text)


# --------------------------------------------------------------------------------------------
# Negation marks, never removes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule_set", "body", "rule_name"),
    [
        (make_rules(rule("breach", "breach*")), "We had no breach.", "breach"),
        (DEFAULT, "We had no data breach, just a slow export.", "security-breach"),
        (DEFAULT, "We didn't see any unauthorized access.", "unauthorized-access"),
        (DEFAULT, "There was NOT a security incident.", "security-breach"),
        (DEFAULT, "No hubo acceso no autorizado.", "unauthorized-access"),
        (DEFAULT, "Sin filtración de datos, por suerte.", "data-exposure"),
    ],
)
def test_negation_marks_the_hit_and_keeps_severity_1(rule_set: RuleSet, body: str, rule_name: str) -> None:
    verdict = rule_set.classify(body=body)
    hit = only_hit(verdict)
    assert hit.rule == rule_name
    assert hit.negated is True
    assert verdict.severity is Severity.S1
    assert verdict.security is True


@pytest.mark.parametrize(
    "body",
    [
        "We were hacked last night.",
        "No idea how it started, but the attackers said they hacked the admin account.",
        "Nobody noticed for a week that the whole billing account was hacked.",  # 5+ words away
    ],
)
def test_no_negation_mark_without_a_nearby_negation(body: str) -> None:
    assert only_hit(DEFAULT.classify(body=body)).negated is False


# --------------------------------------------------------------------------------------------
# Fields: subject, body, quoted history, attachments
# --------------------------------------------------------------------------------------------


def test_quoted_history_is_ignored_by_default_rules() -> None:
    quoted = "> On Monday you wrote:\n> Our security newsletter: how to spot phishing."
    assert DEFAULT.classify(body="Thanks, all good now.", quoted=quoted) == Verdict()


def test_quoted_history_is_read_by_rules_that_ask_for_it() -> None:
    rule_set = make_rules(
        rule("phishing", "phishing"),
        rule("escalation", "escalate", quoted=True, severity=Severity.S2, tags=()),
    )
    verdict = rule_set.classify(body="See below.", quoted="> please escalate this phishing case")
    hit = only_hit(verdict)
    assert (hit.rule, hit.field, hit.phrase) == ("escalation", "quoted", "escalate")
    assert verdict.severity is Severity.S2
    assert verdict.security is False


def test_a_phrase_never_spans_two_fields() -> None:
    assert DEFAULT.classify(subject="Our data", body="breach of contract, see below") == Verdict()
    names = ["report data", "breach.txt"]
    assert DEFAULT.classify(body="data", attachments=names) == Verdict()


def test_the_same_phrase_in_subject_and_body_gives_one_hit_each() -> None:
    verdict = DEFAULT.classify(subject="Data breach!", body="Yes, a DATA BREACH: details below.")
    assert [(h.field, h.excerpt) for h in verdict.hits] == [
        ("subject", "Data breach!"),
        ("body", "Yes, a DATA BREACH: details below."),
    ]


def test_attachment_names_are_looked_at() -> None:
    verdict = DEFAULT.classify(body="See attached.", attachments=["invoice.pdf", "Data_Breach_Report-2024.PDF"])
    hit = only_hit(verdict)
    assert (hit.rule, hit.field, hit.excerpt) == ("security-breach", "attachment", "Data_Breach_Report-2024.PDF")


def test_one_hit_per_rule_phrase_and_field_across_attachments() -> None:
    verdict = DEFAULT.classify(attachments=("ransomware.txt", "ransomware-note.txt"), body="ransomware")
    assert [(h.rule, h.field, h.excerpt) for h in verdict.hits] == [
        ("malware", "body", "ransomware"),
        ("malware", "attachment", "ransomware.txt"),
    ]


def test_a_single_attachment_name_given_as_a_string_is_one_name() -> None:
    hit = only_hit(DEFAULT.classify(attachments="phishing-sample.eml"))  # type: ignore[arg-type]
    assert hit.excerpt == "phishing-sample.eml"


def test_rules_look_only_at_their_fields() -> None:
    rule_set = make_rules(
        rule("subject-only", "urgent", fields=("subject",), severity=Severity.S2, tags=()),
        rule("body-only", "outage", fields=("body",), severity=Severity.S3, tags=()),
    )
    verdict = rule_set.classify(subject="outage", body="urgent", attachments=["urgent outage.txt"])
    assert verdict == Verdict()
    verdict = rule_set.classify(subject="URGENT: outage", body="total outage")
    assert [(h.rule, h.field) for h in verdict.hits] == [("subject-only", "subject"), ("body-only", "body")]
    assert verdict.severity is Severity.S2  # the most urgent of the matched rules
    assert verdict.security is False


def test_hits_carry_rule_severity_and_tags() -> None:
    rule_set = make_rules(rule("low", "printer jam", severity=Severity.S4, tags=("hardware", "office")))
    hit = only_hit(rule_set.classify(body="Another printer jam"))
    assert (hit.severity, hit.tags) == (Severity.S4, ("hardware", "office"))


# --------------------------------------------------------------------------------------------
# `unless`: set phrases around a phrase that are not the incident (legal footers, product names)
# --------------------------------------------------------------------------------------------


def test_an_occurrence_inside_an_unless_phrase_is_no_hit_but_another_one_is() -> None:
    rule_set = make_rules(
        rule(
            "access",
            "unauthorized access",
            "data leak*",
            unless=("any unauthorized access, use", "data leak prevention"),
        )
    )
    assert rule_set.classify(body="Any unauthorized access, use or disclosure is prohibited.") == Verdict()
    assert rule_set.classify(body="We bought the Data-Leak Prevention add-on.") == Verdict()
    footer_first = "Any unauthorized\naccess, use... is prohibited.\n\nPS: we saw unauthorized access today."
    hit = only_hit(rule_set.classify(subject="Re: any unauthorized access, use", body=footer_first))
    assert hit.field == "body" and hit.excerpt.endswith("PS: we saw unauthorized access today.")
    # Literal: an unless phrase takes no inflection of its own words, the rule's stem still does.
    assert only_hit(rule_set.classify(body="data leakage prevention")).phrase == "data leak*"


def test_unless_words_may_stand_before_the_phrase() -> None:
    rule_set = make_rules(rule("es", "acceso no autorizado", unless=("queda prohibido el acceso no autorizado",)))
    assert rule_set.classify(body="Queda PROHIBIDO el acceso no autorizado a este mensaje.") == Verdict()
    assert only_hit(rule_set.classify(body="Detectamos el acceso no autorizado.")).rule == "es"


def test_an_unless_phrase_must_contain_a_phrase_of_its_rule() -> None:
    with pytest.raises(RulesError, match=r"rule #1 'x': unless #2 'data breach notice' contains none of the rule's"):
        make_rules(rule("x", "unauthorized access", unless=("unauthorized access is prohibited", "data breach notice")))
    with pytest.raises(RulesError, match=r"unless must be a list"):
        RuleSet.from_toml('[[rule]]\nname = "x"\nphrases = ["y"]\nseverity = 1\nunless = "y z"\n')
    with pytest.raises(RulesError, match=r"unless #1 must be a string"):
        RuleSet.from_toml('[[rule]]\nname = "x"\nphrases = ["y"]\nseverity = 1\nunless = [1]\n')


@pytest.mark.parametrize(
    "footer",
    [
        "CONFIDENTIALITY NOTICE: intended only for the named recipient. Any unauthorized access, use, "
        "disclosure or distribution is strictly prohibited.",
        "This email is confidential. Unauthorised access to this e-mail by anyone other than the addressee "
        "is prohibited.",
        "Unauthorized access to this message is strictly prohibited.",
        "AVISO: queda prohibido cualquier acceso no autorizado, uso, copia o distribución de este mensaje.",
        "Si usted no es el destinatario, el acceso no autorizado a este correo está prohibido.",
    ],
)
def test_default_rules_leave_legal_footers_alone_but_not_a_report_beside_them(footer: str) -> None:
    assert DEFAULT.classify(subject="Renewal quote", body=f"Please send the quote.\n\n{footer}") == Verdict()
    report = f"We found unauthorized access to our admin account.\n\n{footer}"
    assert only_hit(DEFAULT.classify(body=report)).rule == "unauthorized-access"
    spanish = f"Hubo un acceso no autorizado a la consola.\n\n{footer}"
    assert only_hit(DEFAULT.classify(body=spanish)).rule == "unauthorized-access"


@pytest.mark.parametrize(
    "text",
    [
        "There was unauthorized access to this email account last night.",
        "We see unauthorized access or use of our API keys from an unknown IP.",
        "Hubo acceso no autorizado a este correo corporativo desde otro país.",
    ],
)
def test_a_report_worded_like_the_start_of_a_footer_still_fires(text: str) -> None:
    assert only_hit(DEFAULT.classify(body=text)).rule == "unauthorized-access"


# --------------------------------------------------------------------------------------------
# Large inputs: linear time, bounded verdicts
# --------------------------------------------------------------------------------------------


def test_ten_megabyte_body_with_one_incident_at_the_end() -> None:
    body = "Lorem ipsum dolor sit amet, the export failed again at 10:42. " * 170_000
    body += "PS: we also had a DATA\nBREACH."
    assert len(body) > 10_000_000
    hit = only_hit(DEFAULT.classify(body=body))
    assert hit.rule == "security-breach"
    assert hit.excerpt.endswith("we also had a DATA BREACH.")


def test_ten_megabyte_body_full_of_matches_gives_a_small_verdict() -> None:
    body = "data breach hacked phishing, acceso no autorizado! " * 220_000
    assert len(body) > 10_000_000
    verdict = DEFAULT.classify(body=body)
    assert verdict.severity is Severity.S1
    assert [(h.rule, h.phrase) for h in verdict.hits] == [
        ("security-breach", "data breach*"),
        ("unauthorized-access", "acceso no autorizado"),
        ("account-compromise", "hacked"),
        ("phishing", "phishing*"),
    ]
    assert all(len(h.excerpt) < 200 for h in verdict.hits)


def test_hits_are_capped_and_every_matched_rule_keeps_one() -> None:
    rule_set = make_rules(*(rule(f"r{i}", f"word{i}", f"alias{i}", severity=Severity.S3, tags=()) for i in range(30)))
    body = " ".join(f"word{i} alias{i}" for i in range(30)) * 1000
    verdict = rule_set.classify(body=body)
    assert len(verdict.hits) == MAX_HITS
    assert [h.rule for h in verdict.hits] == [f"r{i}" for i in range(MAX_HITS)]
    assert verdict.severity is Severity.S3

    few = make_rules(*(rule(f"r{i}", f"word{i}", f"alias{i}", tags=()) for i in range(5)))
    verdict = few.classify(body=body)
    assert [h.rule for h in verdict.hits] == [f"r{i}" for i in range(5) for _ in range(2)]


def test_large_non_ascii_body_with_matches_everywhere() -> None:
    body = "¡Atención! Hubo una FILTRACIÓN de datos y contraseñas robadas. " * 40_000
    verdict = DEFAULT.classify(body=body)
    assert [h.rule for h in verdict.hits] == ["credential-exposure", "data-exposure"]
    assert "FILTRACIÓN de datos y contraseñas robadas. ¡Atención!" in verdict.hits[0].excerpt
    assert verdict.hits[1].excerpt.startswith("¡Atención! Hubo una FILTRACIÓN de datos y contraseñas robadas.")


# --------------------------------------------------------------------------------------------
# Rules files: the happy path and every way to break one
# --------------------------------------------------------------------------------------------

GOOD = """
[[rule]]
name = "escalation-request"
description = "The customer asks us to escalate."
phrases = ["please escalate", "escalar el caso"]
fields = ["subject", "body"]
severity = 2
tags = ["escalation"]
quoted = true
"""


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "rules.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_load_a_good_rules_file(tmp_path: pathlib.Path) -> None:
    rule_set = RuleSet.load(write(tmp_path, GOOD))
    assert rule_set.rules == (
        Rule(
            name="escalation-request",
            description="The customer asks us to escalate.",
            phrases=("please escalate", "escalar el caso"),
            fields=("subject", "body"),
            severity=Severity.S2,
            tags=("escalation",),
            quoted=True,
        ),
    )
    verdict = rule_set.classify(body="Por favor, ¿pueden ESCALAR el caso?")
    assert (verdict.severity, verdict.security, only_hit(verdict).rule) == (Severity.S2, False, "escalation-request")


def test_rule_defaults() -> None:
    rule_set = RuleSet.from_toml('[[rule]]\nname = "x"\nphrases = ["y"]\nseverity = 3\n')
    assert rule_set.rules == (Rule(name="x", phrases=("y",), severity=Severity.S3),)
    assert rule_set.rules[0].fields == ("subject", "body", "attachments")
    assert (rule_set.rules[0].tags, rule_set.rules[0].quoted, rule_set.rules[0].description) == ((), False, "")


def rule_file(body: str, name: str = "bad-rule") -> str:
    return f'[[rule]]\nname = "ok"\nphrases = ["fine"]\nseverity = 1\n\n[[rule]]\nname = "{name}"\n{body}\n'


@pytest.mark.parametrize(
    ("text", "rule_ref", "problem"),
    [
        (rule_file('phrases = [""]\nseverity = 1'), 'rule #2 "bad-rule"', "empty or only punctuation"),
        (rule_file('phrases = ["   "]\nseverity = 1'), "rule #2 'bad-rule'", "empty or only punctuation"),
        (rule_file('phrases = ["?!..."]\nseverity = 1'), "rule #2 'bad-rule'", "empty or only punctuation"),
        (rule_file('phrases = ["*"]\nseverity = 1'), "rule #2 'bad-rule'", "empty or only punctuation or `*`"),
        (
            rule_file('phrases = ["data *breach"]\nseverity = 1'),
            "rule #2 'bad-rule': phrase #1 'data *breach'",
            "only at the very end",
        ),
        (
            rule_file('phrases = ["ok", "da*ta"]\nseverity = 1'),
            "rule #2 'bad-rule': phrase #2 'da*ta'",
            "only at the very end",
        ),
        (rule_file('phrases = ["breach *"]\nseverity = 1'), "rule #2 'bad-rule'", "directly after a word"),
        (
            rule_file(f'phrases = ["{"x" * 201}"]\nseverity = 1'),
            "rule #2 'bad-rule'",
            f"limit is {MAX_PHRASE_CHARS} characters",
        ),
        (rule_file("phrases = []\nseverity = 1"), "rule #2 'bad-rule'", "no phrases"),
        (rule_file("severity = 1"), "rule #2 'bad-rule'", "no phrases"),
        (rule_file('phrases = "breach"\nseverity = 1'), "rule #2 'bad-rule'", "phrases must be a list"),
        (rule_file("phrases = [42]\nseverity = 1"), "rule #2 'bad-rule'", "phrase #1 must be a string"),
        (rule_file('phrases = ["x"]\nseverity = 0'), "rule #2 'bad-rule'", "invalid severity 0"),
        (rule_file('phrases = ["x"]\nseverity = 5'), "rule #2 'bad-rule'", "invalid severity 5"),
        (rule_file('phrases = ["x"]\nseverity = "1"'), "rule #2 'bad-rule'", "invalid severity '1'"),
        (rule_file('phrases = ["x"]\nseverity = true'), "rule #2 'bad-rule'", "invalid severity True"),
        (rule_file('phrases = ["x"]\nseverity = 1.0'), "rule #2 'bad-rule'", "invalid severity 1.0"),
        (rule_file('phrases = ["x"]'), "rule #2 'bad-rule'", "missing severity"),
        (rule_file('phrases = ["x"]\nseverity = 1', name="ok"), 'rule #2 "ok"', "duplicate rule name"),
        (rule_file('phrases = ["x"]\nseverity = 1', name="Data_Breach"), "rule #2 'Data_Breach'", "kebab-case"),
        (
            rule_file('phrases = ["x"]\nseverity = 1\nfields = ["headers"]'),
            "rule #2 'bad-rule'",
            "unknown field 'headers'",
        ),
        (rule_file('phrases = ["x"]\nseverity = 1\nfields = []'), "rule #2 'bad-rule'", "no fields"),
        (rule_file('phrases = ["x"]\nseverity = 1\nfields = ["body", "body"]'), "rule #2 'bad-rule'", "a field twice"),
        (rule_file('phrases = ["x"]\nseverity = 1\nregex = "br.*ch"'), "rule #2 'bad-rule'", "unknown key 'regex'"),
        (rule_file('phrases = ["x"]\nseverity = 1\ntags = "security"'), "rule #2 'bad-rule'", "tags must be a list"),
        (
            rule_file('phrases = ["x"]\nseverity = 1\nquoted = "yes"'),
            "rule #2 'bad-rule'",
            "quoted must be true or false",
        ),
        ('[[rule]]\nphrases = ["x"]\nseverity = 1\n', "rule #1", "missing name"),
        ('[[rule]]\nname = 7\nphrases = ["x"]\nseverity = 1\n', "rule #1", "name must be a string"),
        (rule_file('phrases = ["x"\nseverity = 1'), "rule #2 (its [[rule]] starts at line 6)", "invalid TOML"),
    ],
)
def test_broken_rules_files_name_the_file_the_rule_and_the_problem(
    tmp_path: pathlib.Path, text: str, rule_ref: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RulesError) as caught:
        RuleSet.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert rule_ref.replace('"', "'") in message.replace('"', "'")
    assert problem in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no rules"),
        ("# only a comment\n", "no rules"),
        ('version = 2\n[[rule]]\nname = "x"\nphrases = ["y"]\nseverity = 1\n', "unknown top-level key 'version'"),
        ('[rule]\nname = "x"\nphrases = ["y"]\nseverity = 1\n', "array of tables"),
        ("this is not toml", "invalid TOML"),
    ],
)
def test_broken_rules_files_without_a_rule_to_name(tmp_path: pathlib.Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RulesError, match=problem) as caught:
        RuleSet.load(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_unreadable_and_undecodable_rules_files(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(RulesError, match="cannot read the rules file") as caught:
        RuleSet.load(missing)
    assert str(missing) in str(caught.value)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[[rule]]\nname = "x"\nphrases = ["contraseña"]\nseverity = 1\n'.encode("latin-1"))
    with pytest.raises(RulesError, match="not UTF-8") as caught:
        RuleSet.load(latin1)
    assert str(latin1) in str(caught.value)


def test_a_file_with_more_than_100_000_phrases_is_refused(tmp_path: pathlib.Path) -> None:
    phrases = ", ".join(f'"p{i}"' for i in range(MAX_PHRASES + 1))
    path = write(tmp_path, f'[[rule]]\nname = "huge"\nseverity = 1\nphrases = [{phrases}]\n')
    with pytest.raises(RulesError) as caught:
        RuleSet.load(path)
    assert str(caught.value) == (
        f"{path}: rule #1 'huge': too many phrases: 100,001; the limit is 100,000 phrases per rules file"
    )


def test_too_many_phrases_in_total_is_refused_clearly() -> None:
    half = MAX_PHRASES // 2 + 1
    rules_ = [rule("first", *(f"a{i}" for i in range(half))), rule("second", *(f"b{i}" for i in range(half)))]
    with pytest.raises(RulesError, match=r"<test>: rule #2 'second': too many phrases: more than 100,000") as caught:
        make_rules(*rules_)
    assert "the limit is 100,000 phrases per rules file" in str(caught.value)


def test_too_many_phrases_in_a_file_is_refused_before_compiling(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules_module, "MAX_PHRASES", 5)  # same code path as 100,000, smaller file
    text = "".join(f'[[rule]]\nname = "r{i}"\nphrases = ["a", "b"]\nseverity = 1\n' for i in range(3))
    path = write(tmp_path, text)
    with pytest.raises(RulesError) as caught:
        RuleSet.load(path)
    assert str(caught.value) == (
        f"{path}: rule #3 'r2': too many phrases: more than 5 in total (6 so far); "
        "the limit is 5 phrases per rules file"
    )


def test_too_many_rules_is_refused(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules_module, "MAX_RULES", 2)
    text = "".join(f'[[rule]]\nname = "r{i}"\nphrases = ["a"]\nseverity = 1\n' for i in range(3))
    path = write(tmp_path, text)
    with pytest.raises(RulesError, match=r": 3 rules; the limit is 2 rules per file"):
        RuleSet.load(path)


def test_rules_built_in_code_are_checked_too() -> None:
    with pytest.raises(RulesError, match=r"<test>: rule #1 'x': unknown field 'headers'"):
        make_rules(rule("x", "y", fields=("headers",)))
    with pytest.raises(RulesError, match=r"<test>: rule #2 'x': duplicate rule name"):
        make_rules(rule("x", "y"), rule("x", "z"))


# --------------------------------------------------------------------------------------------
# lint and format_verdict (what the CLI prints)
# --------------------------------------------------------------------------------------------


def test_lint_summarises_the_default_rules() -> None:
    lines = lint(default_rules_path())
    assert lines[0] == f"{default_rules_path()}: OK: 8 rules, {DEFAULT.phrase_count} phrases"
    assert DEFAULT.phrase_count == sum(len(r.phrases) for r in DEFAULT.rules) > 300
    assert lines[1:] == []  # the shipped file has no duplicate or very short phrase


def test_lint_warns_about_duplicates_and_raises_on_broken_files(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """
        [[rule]]
        name = "a"
        phrases = ["Data Breach", "ok"]
        severity = 1
        [[rule]]
        name = "b"
        phrases = ["data-breach"]
        severity = 2
        """,
    )
    lines = lint(path)
    assert lines[0] == f"{path}: OK: 2 rules, 3 phrases"
    assert any("'data-breach' matches the same text as rule 'a' phrase 'Data Breach'" in line for line in lines)
    assert any("'ok' is very short" in line for line in lines)
    path.write_text('[[rule]]\nname = "a"\nphrases = ["x*y"]\nseverity = 1\n', encoding="utf-8")
    with pytest.raises(RulesError, match=r"rule #1 'a': phrase #1 'x\*y'"):
        lint(path)


def test_format_verdict_shows_everything_a_person_needs() -> None:
    verdict = DEFAULT.classify(
        subject="Possible data breach",
        body="We have no proof of unauthorized access yet.",
        attachments=["phishing-mail.eml"],
    )
    text = format_verdict(verdict)
    assert text.splitlines()[:3] == ["Severity: Severity 1", "Security incident: yes", "Hits: 3"]
    assert "security-breach (Severity 1) in subject: phrase 'data breach*'" in text
    assert "unauthorized-access (Severity 1) in body: phrase 'unauthorized access'  [possibly negated]" in text
    assert "phishing (Severity 1) in attachment: phrase 'phishing*'" in text
    assert "We have no proof of unauthorized access yet." in text
    assert text.count("possibly negated") == 1


def test_format_verdict_of_a_quiet_message() -> None:
    assert format_verdict(Verdict()) == "Severity: none\nSecurity incident: no\nHits: none"


def test_vetoed_occurrences_past_a_cap_count_as_hits() -> None:
    """Each occurrence inside an ``unless`` phrase is checked again (it was no hit), so a body of
    footers cost up to 12 times the scan: past _MAX_VETOED in one field they count, and a
    security rule errs toward alerting on such a text."""
    from intake.rules import _MAX_VETOED

    footer = "Any unauthorized access, use or disclosure is strictly prohibited.\n"
    assert not RuleSet.default().classify(body="Quote attached.\n" + footer * 3).security
    assert RuleSet.default().classify(body=footer * (_MAX_VETOED + 1)).security
