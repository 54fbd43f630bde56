"""Tests of adapters.language: lingua behind the core's LanguageDetector port, and the plain
English rule that answers before it (see the module docstring).

The rule must never change an answer: on every text at hand (the corpus and test messages as
the service hands them over, the load client's messages, the templates, the sample messages
written in these tests) the detector gives what lingua alone gives.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from adapters.email.parsing import parse_email
from adapters.language import LinguaDetector, _surely_english
from intake.service import language_sample
from tests.corpus import corpus_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def detector() -> LinguaDetector:
    return LinguaDetector(["en", "es"])


def _texts() -> Iterator[str]:
    mails = [*corpus_files(), *sorted((ROOT / "tests" / "data" / "email").glob("*.eml"))]
    for path in mails:
        m = parse_email(path.read_bytes(), recipient="support@example.com")
        yield language_sample(m)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from smtp_load import build_messages
    finally:
        sys.path.remove(str(ROOT / "bench"))
    for _, data in build_messages(16):
        m = parse_email(data, recipient="support@example.com")
        yield language_sample(m)
    for template in resources.files("intake").joinpath("data", "templates").iterdir():
        for path in template.iterdir():
            yield path.read_text(encoding="utf-8")[:300]
    # Every sample sentence the tests write (English and Spanish support mail, mostly).
    for module in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 15:
                yield node.value.strip()[:300]


def test_the_rule_never_changes_an_answer(detector: LinguaDetector) -> None:
    texts = sorted({t for t in _texts() if t.strip()})
    ruled = 0
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            continue  # lingua refuses lone surrogates; parsing never hands it any
        if _surely_english(text):
            ruled += 1
        assert detector.detect(text) == detector.lingua(text), text
    assert ruled >= 100  # the rule does answer for plain English mail


def test_the_rule_never_changes_an_answer_on_chat_sized_texts(detector: LinguaDetector) -> None:
    # Windows of 5 to 12 words of the same texts: Slack messages are short, and the rule's
    # thresholds (five function words, a share of 0.3) sit closest to lingua's doubt there.
    windows = set()
    for text in {t for t in _texts() if t.strip()}:
        words = text.split()
        for k in (5, 7, 9, 12):
            windows.update(" ".join(words[i : i + k]) for i in range(0, max(1, len(words) - k), k))
    ruled = 0
    for text in sorted(windows):
        if not _surely_english(text):
            continue
        ruled += 1
        assert detector.lingua(text) == "en", text
    assert ruled >= 200  # 243 when written


@pytest.mark.parametrize(
    "text",
    [
        "Hola, desde esta mañana no puedo acceder a los informes. ¿Pueden ayudarme?",
        "Hello, the export is not working and we have tried it with the new version. Gracias",
        "Hi, the system is down for all of our users and we have no idea why, it is el problema",
        "Hello, this is about the invoice that we got from you and it is wrong, see the attached file.\u00a0",
        "Thanks",
        # Found by mutating the corpus: lingua reads the base64 line's letters and says Spanish.
        "Here is your dingus fish\nA text/plain part\n\nfFZ1dxUmeA2oQRQ3RuGXNGLFV9/XbGFGPV6kfzk1TBBCd+izc7q1H+"
        'OHMJwmaBX2IQNYVAKHYepV\nContent-Type: text/plain; charset="us-ascii"\n\nHi there,\n\nThis is the dingus fish.',
    ],
)
def test_the_rule_leaves_anything_doubtful_to_lingua(text: str) -> None:
    assert not _surely_english(text)


@pytest.mark.parametrize(
    "text",
    [
        "Cannot log in\nHello, since this morning I cannot open the reports. We have tried two "
        "browsers and it is the same. Can you help? Thanks",
        # Many nouns, few of the first list's words: these went to lingua before the stop words.
        "Scheduled reports arrive empty\nSince Monday all scheduled reports arrive empty. Same "
        "filters, same recipients, same time zone as before; nothing else changed on our end. "
        "Could someone please check?",
        "Invoice total looks wrong\nThe invoice for November shows each seat twice: both monthly "
        "and annual. Every other invoice before it was right. Please correct it before the "
        "payment run.",
    ],
)
def test_the_rule_answers_for_plain_english(detector: LinguaDetector, text: str) -> None:
    assert _surely_english(text)
    assert detector.detect(text) == detector.lingua(text) == "en"


def test_the_rule_is_only_used_where_it_was_checked() -> None:
    assert LinguaDetector(["en", "es"])._rule
    assert not LinguaDetector(["en", "es", "fr"])._rule
    assert not LinguaDetector(["en", "es"], min_confidence=0.75)._rule
